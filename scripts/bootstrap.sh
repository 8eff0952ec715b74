#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for the node and run one job.
#
#   bash scripts/bootstrap.sh demo   # install, then `medsegagent demo`
#   bash scripts/bootstrap.sh test   # install (with test tools), then the test suite
#
# Installs the Debian packages the node and its tests use (as root, or with
# sudo), creates ./.venv and installs the project into it. Re-running skips
# what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-demo}"
shift || true
case "$job" in demo|test|install) ;; *) echo "usage: $0 demo|test|install [args...]" >&2; exit 2 ;; esac

# mricron-data: Colin27, a real T1 MRI, and its brain mask (the demo's and the tests' real scan).
apt_packages=(dcmtk python3-venv mricron-data)
if [ "$job" = test ]; then apt_packages+=(orthanc orthanc-python orthanc-dicomweb chromium); fi
# npm fetches OHIF Viewer for the tests; a Node.js from elsewhere (NodeSource) brings its own.
if [ "$job" = test ] && ! command -v npm >/dev/null; then apt_packages+=(npm); fi
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== apt: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
extras=""; [ "$job" = test ] && extras="[test,nnunet,totalseg]"
stamp=".venv/.medsegagent-installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== pip: installing the project$extras"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: on this platform the pin resolves to the CPU build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".$extras"
  # TAPS (whole prostate, ONNX) declares onnxruntime-gpu; the project already has the CPU runtime.
  .venv/bin/python -m pip install -q --no-deps "lavlab-taps==1.1.2"
  # PyPI's torchvision is built for the CUDA torch and cannot load beside the CPU build (nnunetv2 ->
  # timm pulls it in). A torchvision that cannot load breaks every transformers model import; without
  # it only timm's architectures (nnU-Net's Primus trainers) are missing, and they could not load
  # with the broken one either. So it goes; on a CUDA build of torch it loads and stays.
  if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
  fi
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The tests' real CT: the TotalSegmentator source distribution ships a real Siemens CT series and
# real CT/MR volumes (tests/reference_files). Fetched once from PyPI into .cache/.
if [ "$job" = test ]; then
  sdist=.cache/realdata/totalsegmentator-2.18.0.tar.gz
  if [ ! -f "$sdist" ]; then
    echo "== pip: fetching the TotalSegmentator sdist (real CT test data)"
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "totalsegmentator==2.18.0" -d .cache/realdata
  fi
fi

# OHIF Viewer, served beside Orthanc by orthanc/start-orthanc.sh: the pinned npm build, unpacked once into
# .cache/ohif/app (npm pack fetches the one tarball and checks its integrity; the build needs no dependencies).
ohif_version=3.13.2
if [ "$job" = test ] && ! grep -qs "\"version\": \"$ohif_version\"" .cache/ohif/app/package.json; then
  command -v npm >/dev/null || { echo "npm is needed for OHIF Viewer (apt-get install npm)" >&2; exit 1; }
  echo "== npm: fetching @ohif/app@$ohif_version (OHIF Viewer)"
  rm -rf .cache/ohif/app && mkdir -p .cache/ohif/app
  tarball=$(npm pack --silent --pack-destination .cache/ohif "@ohif/app@$ohif_version")
  tar -xzf ".cache/ohif/$tarball" -C .cache/ohif/app --strip-components=1 && rm ".cache/ohif/$tarball"
fi

case "$job" in
  demo) exec .venv/bin/medsegagent demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  install) echo "installed: .venv/bin/medsegagent" ;;
esac
