"""Make OHIF Viewer's pre-built ``dist/`` servable under a sub-path of Orthanc.

The npm package ``@ohif/app`` ships a build that assumes it is served at
``/``: absolute ``/app.bundle…js`` and ``/app-config.js`` in ``index.html``,
``window.PUBLIC_URL = "/"``, ``url(/….woff2)`` in the style sheet and
``__webpack_require__.p = "/"`` in the main bundle and its web workers.
This script writes a copy whose URLs start with PREFIX (default ``/ohif/``),
with ``orthanc/ohif-app-config.js`` as its ``app-config.js``; Orthanc's
ServeFolders plugin then serves it (``orthanc/start-orthanc.sh`` does both).

    python3 orthanc/prepare-ohif.py DIST SITE [--prefix /ohif/]

Files that need no rewrite are hard-linked (copied across file systems), so
the site costs the size of the rewritten text files only.  A stamp in SITE
records what it was made from; an up-to-date site is left alone, and a new
one replaces the old in one rename.  Standard library only (it runs with the
system Python, like the start script).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP_CONFIG = HERE / "ohif-app-config.js"
STAMP = ".medsegagent-site.json"


class LayoutError(RuntimeError):
    """The build does not look like the one this script knows (another OHIF version?)."""


def _rewrite_index(text: str, prefix: str) -> str:
    text = text.replace('window.PUBLIC_URL="/"', f"window.PUBLIC_URL={json.dumps(prefix)}")
    # src="/x", href="/x", content="/assets/x": every root-relative URL of the page.
    return re.sub(r'(src|href|content)="/(?!/)', rf'\1="{prefix}', text)


def _rewrite_css(text: str, prefix: str) -> str:
    return re.sub(r"url\(/(?!/)", f"url({prefix}", text)


def _rewrite_js(text: str, prefix: str) -> str:
    return text.replace('__webpack_require__.p = "/";', f"__webpack_require__.p = {json.dumps(prefix)};")


def _rewriter(path: Path):
    if path.name == "index.html" and path.parent.name == "dist":
        return _rewrite_index
    if path.suffix == ".css":
        return _rewrite_css
    if path.suffix == ".js":
        return _rewrite_js
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def build_site(dist: Path, site: Path, prefix: str) -> int:
    """Write the rewritten copy of ``dist`` into the empty folder ``site``; the number of files rewritten.

    Raises
    ------
    LayoutError
        When the places this script rewrites are not all found: served as is,
        the viewer would load from ``/`` and fail, so nothing is written.
    """
    rewritten = 0
    public_paths = 0
    for source in sorted(dist.rglob("*")):
        target = site / source.relative_to(dist)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        rewrite = _rewriter(source.relative_to(dist.parent))
        if rewrite is None:
            _link_or_copy(source, target)
            continue
        text = source.read_text(encoding="utf-8")
        new = rewrite(text, prefix)
        public_paths += new.count(f"__webpack_require__.p = {json.dumps(prefix)};")
        if new == text:
            _link_or_copy(source, target)
            continue
        target.write_text(new, encoding="utf-8")
        rewritten += 1
    index = (site / "index.html").read_text(encoding="utf-8")
    if f"window.PUBLIC_URL={json.dumps(prefix)}" not in index or f'src="{prefix}app-config.js"' not in index:
        raise LayoutError(f"{dist}/index.html: no window.PUBLIC_URL or /app-config.js to rewrite")
    if public_paths == 0:
        raise LayoutError(f"{dist}: no webpack public path to rewrite in any bundle")
    (site / "app-config.js").unlink()
    shutil.copyfile(APP_CONFIG, site / "app-config.js")
    return rewritten


def _fingerprint(dist: Path, prefix: str) -> dict[str, str]:
    package = json.loads((dist.parent / "package.json").read_text(encoding="utf-8"))
    digest = hashlib.sha256(Path(__file__).read_bytes() + APP_CONFIG.read_bytes()).hexdigest()
    return {"dist": str(dist.resolve()), "version": package.get("version", "?"), "prefix": prefix, "sha256": digest}


def prepare(dist: Path, site: Path, prefix: str = "/ohif/") -> bool:
    """Make ``site`` from ``dist`` unless it is up to date; ``True`` when it was (re)built."""
    if not (dist / "index.html").is_file() or not (dist.parent / "package.json").is_file():
        raise FileNotFoundError(f"{dist} is not the dist/ folder of an unpacked @ohif/app package")
    if not re.fullmatch(r"/(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)+", prefix):
        raise ValueError(f"prefix {prefix!r} must look like /ohif/")
    wanted = _fingerprint(dist, prefix)
    try:
        if json.loads((site / STAMP).read_text(encoding="utf-8")) == wanted:
            return False
    except (OSError, ValueError):
        pass
    site.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{site.name}-", dir=site.parent))
    try:
        build_site(dist, fresh, prefix)
        (fresh / STAMP).write_text(json.dumps(wanted), encoding="utf-8")
        fresh.chmod(0o755)
        old = site.with_name(f".{site.name}-old-{os.getpid()}")
        if site.exists():
            site.rename(old)
        fresh.rename(site)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", type=Path, help="the dist/ folder of the unpacked @ohif/app package")
    parser.add_argument("site", type=Path, help="the folder to write (served by ServeFolders)")
    parser.add_argument("--prefix", default="/ohif/", help="the URL path it is served under (default /ohif/)")
    args = parser.parse_args(argv)
    try:
        built = prepare(args.dist, args.site, args.prefix)
    except (OSError, ValueError, LayoutError) as exc:
        print(f"prepare-ohif: {exc}", file=sys.stderr)
        return 1
    state = "written" if built else "up to date"
    print(f"prepare-ohif: {args.site} {state} (served at {args.prefix})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
