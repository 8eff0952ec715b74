"""The "Segment…" button of Orthanc Explorer, clicked in a real browser.

Debian's Chromium runs headless, driven by Playwright (its Python package
only: no browser download); Orthanc and the node are the stack of
``test_orthanc_integration``.  The test opens a study in the legacy Orthanc
Explorer, clicks "Segment…", answers the prompt, waits until the status line
says the job was delivered and the SEG series is listed, and saves two
screenshots (``$MEDSEG_SCREENSHOT_DIR``, default ``docs/img``):
``orthanc-segment-button.png`` and ``orthanc-seg-series.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.test_orthanc_integration import (
    ROOT,
    Stack,
    assert_valid_seg_in_study,
    fresh_study,
    request_srs,
    start_stack,
    stop_stack,
)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
SCREENSHOTS = Path(os.environ.get("MEDSEG_SCREENSHOT_DIR", ROOT / "docs" / "img"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack-browser"), "python")
    yield running
    stop_stack(running)


def test_segment_button_in_orthanc_explorer(stack, phantom_factory, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed; run scripts/bootstrap.sh test")
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    # No rule matches this description: only the button sends the study.
    study = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "study", StudyDescription="RESEARCH CT"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    dialogs = []

    def answer(dialog) -> None:
        dialogs.append((dialog.type, dialog.message, dialog.default_value))
        dialog.accept("spleen")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(f"{stack.orthanc.url}/app/explorer.html#study?uuid={study}")
            button = page.locator("#medsegagent-segment")
            button.wait_for(state="visible", timeout=30_000)
            page.wait_for_selector("#list-series li h3", timeout=30_000)
            page.screenshot(path=SCREENSHOTS / "orthanc-segment-button.png")
            page.once("dialog", answer)
            button.click()
            status = page.locator("#medsegagent-status")
            page.wait_for_function(
                "document.querySelector('#medsegagent-status').textContent.includes('delivered')", timeout=180_000
            )
            assert "the SEG series is in this study" in status.inner_text()
            page.wait_for_function("document.querySelector('#list-series').textContent.includes('SEG')")
            page.screenshot(path=SCREENSHOTS / "orthanc-seg-series.png")
        finally:
            browser.close()
    assert dialogs == [("prompt", "What should MedSegAgent segment in this study?",
                        "liver, spleen, both kidneys, pancreas and aorta")]  # fmt: skip
    seg = assert_valid_seg_in_study(stack, study, tmp_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen"]
    assert [sr.ContentSequence[0].TextValue for sr in request_srs(stack, study)] == ["spleen"]
    [job] = stack.jobs(seg.StudyInstanceUID)
    assert job.request_source == "sr"
