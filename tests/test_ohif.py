"""OHIF Viewer beside Orthanc: the node's SEG seen by a radiologist.

``orthanc/start-orthanc.sh`` serves the pinned npm ``@ohif/app`` build
(installed by ``scripts/bootstrap.sh test`` into ``.cache/ohif/app``) at
``/ohif/`` through Orthanc's ServeFolders plugin, rewritten for that path by
``orthanc/prepare-ohif.py`` and configured on Orthanc's DICOMweb plugin
(``orthanc/ohif-app-config.js``).  The browser test segments a phantom CT
through the node, follows the "View in OHIF" link of the Orthanc Explorer
study page, loads the SEG and reads the segment names in OHIF's segmentation
panel.  Debian's Chromium renders WebGL2 headless through SwiftShader.

Screenshots go to the test's temporary folder, or to ``$MEDSEG_SCREENSHOT_DIR``
(``scripts/docs-screenshots.sh`` sets it to ``docs/img``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

from tests.test_orthanc_integration import (
    ORTHANC_DIR,
    ROOT,
    Stack,
    assert_valid_seg_in_study,
    fresh_study,
    start_stack,
    stop_stack,
)

CHROMIUM = "/usr/bin/chromium"
#: WebGL2 without a GPU: ANGLE on SwiftShader (Chromium refuses software WebGL unless told it is wanted).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]  # fmt: skip
OHIF_DIST = ROOT / ".cache" / "ohif" / "app" / "dist"


def _load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_ohif", ORTHANC_DIR / "prepare-ohif.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare_ohif = _load_prepare()


def screenshot_dir(tmp_path: Path) -> Path:
    """Where a test saves its screenshots: ``$MEDSEG_SCREENSHOT_DIR`` when set, else its own temporary folder."""
    folder = Path(os.environ.get("MEDSEG_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- prepare-ohif.py (no browser) -----------------------------------------------------------------


def _fake_dist(root: Path) -> Path:
    dist = root / "app" / "dist"
    (dist / "assets").mkdir(parents=True)
    (root / "app" / "package.json").write_text(json.dumps({"name": "@ohif/app", "version": "3.13.2"}))
    (dist / "index.html").write_text(
        '<script>window.PUBLIC_URL="/"</script><link href="/app.bundle.css" rel="stylesheet">'
        '<script src="/app-config.js"></script><script src="/app.bundle.1.js"></script>'
        '<a href="//elsewhere.example/x">x</a>'
    )
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a.woff2)}")
    (dist / "app.bundle.1.js").write_text('(() => {\n__webpack_require__.p = "/";\n})();')
    (dist / "app-config.js").write_text("window.config = {dataSources: ['https://public.example']};")
    (dist / "assets" / "logo.png").write_bytes(b"\x89PNG")
    return dist


def test_prepare_ohif_rewrites_root_paths_and_replaces_the_config(tmp_path):
    dist = _fake_dist(tmp_path)
    site = tmp_path / "site"
    assert prepare_ohif.prepare(dist, site) is True
    index = (site / "index.html").read_text()
    assert 'window.PUBLIC_URL="/ohif/"' in index
    assert 'href="/ohif/app.bundle.css"' in index and 'src="/ohif/app.bundle.1.js"' in index
    assert 'href="//elsewhere.example/x"' in index  # protocol-relative URLs are not paths
    assert (site / "app.bundle.css").read_text() == "@font-face{src:url(/ohif/a.woff2)}"
    assert '__webpack_require__.p = "/ohif/";' in (site / "app.bundle.1.js").read_text()
    assert (site / "app-config.js").read_text() == (ORTHANC_DIR / "ohif-app-config.js").read_text()
    assert (site / "assets" / "logo.png").stat().st_ino == (dist / "assets" / "logo.png").stat().st_ino  # linked
    assert "public.example" in (dist / "app-config.js").read_text()  # the package itself is untouched
    # Up to date: left alone; another prefix: rebuilt in place.
    assert prepare_ohif.prepare(dist, site) is False
    assert prepare_ohif.prepare(dist, site, "/viewer/") is True
    assert 'window.PUBLIC_URL="/viewer/"' in (site / "index.html").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_prepare_ohif_refuses_a_build_it_does_not_know(tmp_path):
    dist = _fake_dist(tmp_path)
    (dist / "app.bundle.1.js").write_text("console.log('public path set elsewhere')")
    with pytest.raises(prepare_ohif.LayoutError, match="webpack public path"):
        prepare_ohif.prepare(dist, tmp_path / "site")
    assert not (tmp_path / "site").exists()
    with pytest.raises(FileNotFoundError, match="not the dist/ folder"):
        prepare_ohif.prepare(tmp_path, tmp_path / "site")
    with pytest.raises(ValueError, match="must look like /ohif/"):
        prepare_ohif.prepare(dist, tmp_path / "site", "/../")


def test_pinned_ohif_build_is_installed_and_prepares(tmp_path):
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"OHIF is not installed in {OHIF_DIST}; run scripts/bootstrap.sh test")
    assert json.loads((OHIF_DIST.parent / "package.json").read_text())["version"] == "3.13.2"
    assert prepare_ohif.prepare(OHIF_DIST, tmp_path / "site") is True  # the real build has every rewrite point


# -- the browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack-ohif"), "python")
    yield running
    stop_stack(running)


def _dismiss_overlays(page: Page) -> None:
    """OHIF's first-visit tour and its investigational-use banner cover the panels."""
    page.locator('[data-cy="study-browser-thumbnail-no-image"]').first.wait_for(timeout=60_000)
    for control in (page.get_by_text("Skip all", exact=True), page.locator('[data-cy="confirm-and-hide-button"]')):
        with contextlib.suppress(PlaywrightError):  # not shown this time
            control.click(timeout=15_000)


def _load_seg(page: Page) -> None:
    """Double-click the SEG thumbnail and accept loading it (prompt and LOAD badge come in either order)."""
    modality = page.locator('[data-cy="series-modality-label"]', has_text=re.compile(r"^\s*SEG\s*$"))
    page.locator('[data-cy="study-browser-thumbnail-no-image"]', has=modality).dblclick()
    accept = [page.get_by_role("button", name="Yes", exact=True), page.get_by_text("LOAD", exact=True)]
    for _ in range(60):
        if page.locator('[data-cy="data-row-title"]').count():
            return
        for control in accept:
            if control.count():
                with contextlib.suppress(PlaywrightError):  # re-rendered or gone meanwhile: look again
                    control.first.click(timeout=2_000)
        page.wait_for_timeout(1_000)


@pytest.mark.slow
def test_seg_opens_in_ohif_with_its_segment_names(stack, phantom_factory, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed; run scripts/bootstrap.sh test")
    assert "serve-folders" in stack.orthanc.get_json("/plugins")
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study = stack.orthanc.upload(fresh_study(files.series["CT"], tmp_path / "study", StudyDescription="RESEARCH CT"))
    status, answer = stack.orthanc.post_json("/medsegagent/segment", {"study": study, "request": "liver and spleen"})
    assert status == 200, answer
    seg = assert_valid_seg_in_study(stack, study, tmp_path)
    names = [s.SegmentLabel for s in seg.SegmentSequence]
    assert len(names) == 2
    shots = screenshot_dir(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 860}, service_workers="block")
            page = context.new_page()
            page.goto(f"{stack.orthanc.url}/app/explorer.html#study?uuid={study}")
            link = page.locator("#medsegagent-ohif")
            link.wait_for(state="visible", timeout=30_000)
            page.wait_for_function("document.querySelector('#medsegagent-ohif').getAttribute('href') !== '#'")
            href = link.get_attribute("href")
            assert href == f"../ohif/viewer?StudyInstanceUIDs={seg.StudyInstanceUID}"
            page.goto(f"{stack.orthanc.url}/app/{href}")
            _dismiss_overlays(page)
            _load_seg(page)
            if not page.locator('[data-cy="data-row-title"]').count():
                page.locator('[data-cy="panelSegmentation-btn"]').click()
            rows = page.locator('[data-cy="data-row-title"]')
            rows.first.wait_for(state="visible", timeout=60_000)
            page.wait_for_timeout(2_000)  # let the overlay render
            # OHIF opens the SEG at the first segment's first slice, the liver's edge: show the middle of it.
            page.mouse.move(700, 450)
            for _ in range(8):
                page.keyboard.press("ArrowDown")
            page.wait_for_timeout(1_000)
            page.screenshot(path=shots / "ohif-seg.png")
            shown = [t.strip() for t in rows.all_inner_texts()]
        finally:
            browser.close()
    assert sorted(shown) == sorted(names)
