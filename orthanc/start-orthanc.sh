#!/usr/bin/env bash
# Start a local Orthanc configured for the MedSegAgent node (Debian packages
# orthanc, orthanc-python, orthanc-dicomweb; the worklist plugin ships with orthanc).
#
#   orthanc/start-orthanc.sh                  # foreground; data in ./var/orthanc
#   ORTHANC_HTTP_PORT=8043 MEDSEG_DICOM_PORT=11113 orthanc/start-orthanc.sh
#
# The configuration is orthanc/orthanc.json with these environment overrides,
# rendered to $ORTHANC_DATA/orthanc.rendered.json (read it to see what runs):
#   ORTHANC_DATA          storage, index and worklists folder root   (./var/orthanc)
#   ORTHANC_NAME, ORTHANC_AET, ORTHANC_HTTP_PORT, ORTHANC_DICOM_PORT, ORTHANC_STABLE_AGE
#   ORTHANC_WORKLISTS     folder of .wl files served by the worklist plugin ($ORTHANC_DATA/worklists)
#   MEDSEG_DICOM_HOST, MEDSEG_DICOM_PORT   the node's DICOM listener (every "medseg*" modality)
#   MEDSEG_AET            the node's AE title (modality "medseg")
#   MEDSEG_URL            the node's HTTP API (job status); its token is read from $MEDSEG_TOKEN
#   MEDSEG_HTTP_PORT      the node's HTTP port on loopback, when MEDSEG_URL is not given
#   (orthanc/node.yaml reads the same MEDSEG_* and ORTHANC_* variables: set them once for both)
#   MEDSEG_ROUTING        python | lua | off: which engine applies the auto-routing rules
#   ORTHANC_REMOTE_ACCESS=true with ORTHANC_USERNAME and ORTHANC_PASSWORD: HTTP beyond
#                         loopback, with authentication (refused without credentials)
#   ORTHANC_CONFIG        another base configuration (pure JSON)
#   ORTHANC_EXTRA_CONFIG  a JSON file merged last (objects merged, other values replaced)
#   ORTHANC_BIN           the Orthanc executable (Orthanc)
#   OHIF_DIST             the dist/ folder of the npm package @ohif/app (.cache/ohif/app/dist, which
#                         `scripts/bootstrap.sh test` installs); when present, OHIF Viewer is served
#                         at /ohif/ from OHIF_SITE (.cache/ohif/site, made by prepare-ohif.py);
#                         OHIF_DIST=none turns the viewer off
#
# Orthanc starts with TCP_NODELAY=1: Debian's Orthanc leaves Nagle's algorithm on,
# which makes every C-STORE to or from the node wait 40-90 ms.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export ORTHANC_DATA=${ORTHANC_DATA:-$PWD/var/orthanc}
mkdir -p "$ORTHANC_DATA"
rendered="$ORTHANC_DATA/orthanc.rendered.json"

# OHIF Viewer beside Orthanc (same origin, so it may call the DICOMweb plugin): rewritten for /ohif/.
ohif_dist=${OHIF_DIST:-$here/../.cache/ohif/app/dist}
export OHIF_SITE=${OHIF_SITE:-$here/../.cache/ohif/site}
if [ "$ohif_dist" != none ] && [ -f "$ohif_dist/index.html" ]; then
  "${PYTHON:-python3}" "$here/prepare-ohif.py" "$ohif_dist" "$OHIF_SITE"
else
  OHIF_SITE=""
fi

"${PYTHON:-python3}" - "$here" "${ORTHANC_CONFIG:-$here/orthanc.json}" > "$rendered" <<'PY'
import json, os, sys
from pathlib import Path

here, base = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads(base.read_text())
env = os.environ


def merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) and isinstance(into.get(key), dict) else value
    return into


data = Path(env["ORTHANC_DATA"]).resolve()
config["StorageDirectory"] = config["IndexDirectory"] = str(data / "db")
worklists = Path(env.get("ORTHANC_WORKLISTS") or data / "worklists").resolve()
worklists.mkdir(parents=True, exist_ok=True)
config.setdefault("Worklists", {})["Database"] = str(worklists)
for key, var, kind in (("Name", "ORTHANC_NAME", str), ("DicomAet", "ORTHANC_AET", str),
                       ("HttpPort", "ORTHANC_HTTP_PORT", int), ("DicomPort", "ORTHANC_DICOM_PORT", int),
                       ("StableAge", "ORTHANC_STABLE_AGE", int)):
    if env.get(var):
        config[key] = kind(env[var])
for name, modality in config.get("DicomModalities", {}).items():
    if name.startswith("medseg") and isinstance(modality, dict):
        modality["Host"] = env.get("MEDSEG_DICOM_HOST", modality["Host"])
        modality["Port"] = int(env.get("MEDSEG_DICOM_PORT", modality["Port"]))
        if name == config.get("MedSegAgent", {}).get("NodeModality", "medseg") and env.get("MEDSEG_AET"):
            modality["AET"] = env["MEDSEG_AET"]
section = config.setdefault("MedSegAgent", {})
if env.get("MEDSEG_URL"):
    section["NodeUrl"] = env["MEDSEG_URL"]
elif env.get("MEDSEG_HTTP_PORT"):
    section["NodeUrl"] = f"http://127.0.0.1:{int(env['MEDSEG_HTTP_PORT'])}"
if env.get("MEDSEG_ROUTING"):
    section["AutoRouting"] = env["MEDSEG_ROUTING"]
if env.get("ORTHANC_REMOTE_ACCESS", "").lower() == "true":
    user, password = env.get("ORTHANC_USERNAME"), env.get("ORTHANC_PASSWORD")
    if not user or not password:
        sys.exit("ORTHANC_REMOTE_ACCESS=true needs ORTHANC_USERNAME and ORTHANC_PASSWORD")
    config.update(RemoteAccessAllowed=True, AuthenticationEnabled=True, RegisteredUsers={user: password})
if env.get("OHIF_SITE"):
    config["Plugins"].append("/usr/share/orthanc/plugins/libServeFolders.so")
    config.setdefault("ServeFolders", {})["/ohif"] = str(Path(env["OHIF_SITE"]).resolve())
    section["OhifRoot"] = "/ohif/"
if env.get("ORTHANC_EXTRA_CONFIG"):
    merge(config, json.loads(Path(env["ORTHANC_EXTRA_CONFIG"]).read_text()))
# Scripts are named relative to this folder; Orthanc would resolve them against its working directory.
if "PythonScript" in config:
    config["PythonScript"] = str((here / config["PythonScript"]).resolve())
config["LuaScripts"] = [str((here / p).resolve()) for p in config.get("LuaScripts", [])]
json.dump(config, sys.stdout, indent=2)
PY

echo "orthanc: starting with $rendered" >&2
export TCP_NODELAY=1
exec "${ORTHANC_BIN:-Orthanc}" "$rendered"
