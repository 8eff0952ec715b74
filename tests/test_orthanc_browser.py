"""MedSegAgent on Orthanc Explorer's study page, in a real browser; what an administrator sees in Orthanc.

Debian's Chromium runs headless, driven by Playwright (its Python package
only: no browser download); Orthanc and the node are the stack of
``test_orthanc_integration``.

* The button: open a study, click "Segment…", answer the prompt, wait until
  the status line says the job was delivered and the SEG series is listed;
  the status is shown again when the page is opened again.
* A failed auto-routed study: its failure and reason are recorded on the study
  (metadata ``MedSegAgentStatus``) and shown on its page; a rule whose request
  the node has no model for is skipped and says so.

Screenshots go to the test's temporary folder, or to ``$MEDSEG_SCREENSHOT_DIR``
(``scripts/docs-screenshots.sh`` sets it to ``docs/img``):
``orthanc-segment-button.png``, ``orthanc-seg-series.png`` and ``orthanc-failed-status.png``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.test_ohif import screenshot_dir
from tests.test_orthanc_integration import (
    Stack,
    assert_valid_seg_in_study,
    fresh_study,
    plugin,
    request_srs,
    start_stack,
    stop_stack,
    wait_for,
    wait_for_log,
)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
#: A CT rule forced past the rule check, whose request the demo models cannot serve: the node's job fails.
FAILING_RULE = {"Name": "ct-research-brain", "Modality": "CT", "StudyDescription": "*FAILTEST*",
                "Request": "brain tumour", "Force": True}  # fmt: skip
#: The shipped MR brain rule: no installed model in the demo collection, so it is skipped.
BRAIN_RULE = {"Name": "brain-mr-tumour", "Modality": "MR", "BodyPart": "BRAIN|HEAD",
              "StudyDescription": "*BRAIN*|*GLIOM*|*TUMO*",
              "Request": "brain tumour: whole tumour, tumour core and enhancing tumour"}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack-browser"), "python")
    yield running
    stop_stack(running)


def _browser(playwright):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed; run scripts/bootstrap.sh test")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _open_study(page: Page, stack: Stack, study: str) -> None:
    page.goto(f"{stack.orthanc.url}/app/explorer.html#study?uuid={study}")
    page.locator("#medsegagent-segment").wait_for(state="visible", timeout=30_000)
    page.wait_for_selector("#list-series li h3", timeout=30_000)


def _status_text(page: Page, contains: str) -> str:
    page.wait_for_function(
        f"document.querySelector('#medsegagent-status').textContent.includes({json.dumps(contains)})",
        timeout=180_000,
    )
    return page.locator("#medsegagent-status").inner_text()


def recorded_status(stack: Stack, study: str) -> dict | None:
    """The study's ``MedSegAgentStatus`` metadata, read from Orthanc (not from the plugin)."""
    metadata = stack.orthanc.get_json(f"/studies/{study}/metadata?expand")
    return plugin.parse_status(metadata.get(plugin.STATUS_METADATA))


def test_segment_button_in_orthanc_explorer(stack, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    # No rule matches this description: only the button sends the study.
    study = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "study", StudyDescription="RESEARCH CT"))
    shots = screenshot_dir(tmp_path)
    dialogs = []

    def answer(dialog) -> None:
        dialogs.append((dialog.type, dialog.message, dialog.default_value))
        dialog.accept("spleen")

    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            _open_study(page, stack, study)
            assert not page.locator("#medsegagent-status").is_visible()  # nothing sent yet, nothing to say
            page.screenshot(path=shots / "orthanc-segment-button.png")
            page.once("dialog", answer)
            page.locator("#medsegagent-segment").click()
            assert "the SEG series is in this study" in _status_text(page, "delivered")
            page.wait_for_function("document.querySelector('#list-series').textContent.includes('SEG')")
            page.screenshot(path=shots / "orthanc-seg-series.png")
            # To the patient's page and back: the study page shows the status again.
            page.locator("#study .patient-link").first.click()
            page.locator("#patient").wait_for(state="visible", timeout=30_000)
            page.go_back()
            page.locator("#study").wait_for(state="visible", timeout=30_000)
            assert "the SEG series is in this study" in _status_text(page, "delivered")
        finally:
            browser.close()
    assert dialogs == [("prompt", "What should MedSegAgent segment in this study?",
                        "liver, spleen, both kidneys, pancreas and aorta")]  # fmt: skip
    seg = assert_valid_seg_in_study(stack, study, tmp_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    assert [sr.ContentSequence[0].TextValue for sr in request_srs(stack, study)] == ["spleen"]
    [job] = stack.jobs(seg.StudyInstanceUID)
    assert job.request_source == "sr"
    recorded = wait_for(lambda: (r := recorded_status(stack, study)) and r["state"] == "delivered" and r, 30,
                        "the delivered status on the study", stack)  # fmt: skip
    assert (recorded["job"], recorded["request"]) == (job.id, "spleen")


def test_failed_auto_routed_study_is_visible_in_orthanc(phantom_factory, tmp_path):
    failing = start_stack(tmp_path / "stack", "python", {"MedSegAgent": {"Rules": [FAILING_RULE, BRAIN_RULE]}})
    try:
        # The rule check at start-up: the shipped brain rule is skipped, the forced one is kept.
        wait_for_log(failing, r"rule brain-mr-tumour: .*; skipped \(add \"Force\": true to route anyway\)")
        wait_for_log(failing, r"rule ct-research-brain: .*; routed anyway \(Force\)")
        _, ct = phantom_factory("CT", seed=2, size=96, slices=32)
        study = failing.orthanc.upload(fresh_study(ct.series["CT"], tmp_path / "ct", StudyDescription="CT FAILTEST"))
        _, mr = phantom_factory("MR", seed=2, size=64, slices=16)
        brain = {"StudyDescription": "MRI BRAIN TUMOUR", "BodyPartExamined": "BRAIN"}
        mr_study = failing.orthanc.upload(fresh_study(mr.series["MR"], tmp_path / "mr", **brain))
        recorded = wait_for(lambda: (r := recorded_status(failing, study)) and r["state"] == "failed" and r, 180,
                            "the failed status on the study", failing)  # fmt: skip
        [job] = failing.jobs(failing.orthanc.get_json(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"])
        assert job.state.value == "failed" and recorded["job"] == job.id and recorded["reason"] == job.error
        assert recorded["rule"] == "ct-research-brain" and "no usable request" in recorded["reason"]
        assert failing.orthanc.series(study, "SEG") == []
        skipped = wait_for(lambda: recorded_status(failing, mr_study), 60, "the skipped status", failing)
        assert skipped["state"] == "skipped" and skipped["reason"].startswith("rule brain-mr-tumour skipped: ")
        mr_uid = failing.orthanc.get_json(f"/studies/{mr_study}")["MainDicomTags"]["StudyInstanceUID"]
        assert failing.jobs(mr_uid) == [] and not (failing.node.spool_dir / mr_uid).exists()
        with sync_playwright() as playwright:
            browser = _browser(playwright)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                _open_study(page, failing, study)
                text = _status_text(page, "failed")
                assert f"job {job.id[:8]}: failed — no usable request" in text
                colour = page.locator("#medsegagent-status").evaluate("e => getComputedStyle(e).color")
                assert colour == "rgb(187, 0, 0)"  # shown as an error
                page.screenshot(path=screenshot_dir(tmp_path) / "orthanc-failed-status.png", full_page=True)
            finally:
                browser.close()
    finally:
        stop_stack(failing)
