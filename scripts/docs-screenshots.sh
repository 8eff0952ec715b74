#!/usr/bin/env bash
# Make the screenshots of docs/img from the real stack (Orthanc, the node, Debian's Chromium, OHIF):
#
#   bash scripts/docs-screenshots.sh
#
# The browser tests save their screenshots under their temporary folders; this runs them with
# MEDSEG_SCREENSHOT_DIR=docs/img so that they write the documentation's copies instead. It is the
# only thing that writes docs/img (a test run leaves the work tree clean). Needs the test set-up
# (`bash scripts/bootstrap.sh test`, which installs Orthanc, Chromium and OHIF Viewer).
set -euo pipefail
cd "$(dirname "$0")/.."
export MEDSEG_SCREENSHOT_DIR="$PWD/docs/img"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_orthanc_browser.py tests/test_ohif.py "$@"
