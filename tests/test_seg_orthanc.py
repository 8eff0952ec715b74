"""A real Orthanc (Debian package) accepts what the node writes, and keeps it unmodified.

The fixture starts Orthanc on free loopback ports with a throw-away storage
folder.  SEG (BINARY, FRACTIONAL), SR and Secondary Capture go in by C-STORE
with DCMTK's ``storescu -R`` (propose only the SOP classes needed: the
default proposal list of Debian's DCMTK does not include SEG); the LABELMAP
SEG, whose SOP class DCMTK 3.6.7 does not know, and a BINARY SEG go in by
REST (``POST /instances``).  "Unmodified" means: same SOP class and
transfer syntax, same pixel data, same data set bytes after the file meta
header (a C-STORE makes Orthanc write its own meta header; a REST upload is
stored byte for byte).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from medsegagent.dicom.secondary_capture import write_preview_sc
from medsegagent.dicom.seg import SegType
from medsegagent.dicom.sr import segment_volumes_ml, write_volume_report

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCU = "/usr/bin/storescu"  # DCMTK's, not pynetdicom's same-named app in the venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """A running Orthanc: REST helpers bound to 127.0.0.1."""

    def __init__(self, http_port: int, dicom_port: int, aet: str) -> None:
        self.url = f"http://127.0.0.1:{http_port}"
        self.dicom_port = dicom_port
        self.aet = aet

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def post(self, path: str, data: bytes) -> dict:
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def find_instance(self, sop_instance_uid: str) -> str:
        body = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}).encode()
        request = urllib.request.Request(self.url + "/tools/find", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            found = json.loads(response.read())
        assert len(found) == 1, f"{sop_instance_uid} stored {len(found)} times"
        return found[0]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Start Orthanc on free loopback ports; stop it (by its own pid) at the end."""
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc is not installed; run scripts/bootstrap.sh test (apt package 'orthanc')")
    if not Path(STORESCU).exists():
        pytest.fail("DCMTK storescu is not installed (apt package 'dcmtk')")
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "medsegagent-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageCompression": False,  # keep files byte for byte
        "DicomCheckCalledAet": False,
        "Plugins": [],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
    server = OrthancServer(http_port, dicom_port, "ORTHANC")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _dataset_bytes(path_or_bytes: Path | bytes) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information group."""
    raw = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + group_length :]


def _storescu(orthanc: OrthancServer, *paths: Path) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run(
        [STORESCU, "-R", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Failed" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def _assert_stored_unmodified(orthanc: OrthancServer, path: Path, *, byte_identical: bool) -> None:
    ours = pydicom.dcmread(path)
    instance = orthanc.find_instance(str(ours.SOPInstanceUID))
    stored_bytes = orthanc.get(f"/instances/{instance}/file")
    if byte_identical:
        assert stored_bytes == path.read_bytes(), "Orthanc changed the uploaded file"
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(stored_bytes))
    assert stored.SOPClassUID == ours.SOPClassUID
    assert stored.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID, "Orthanc transcoded the object"
    assert _dataset_bytes(stored_bytes) == _dataset_bytes(path), "Orthanc changed the data set"
    if "PixelData" in ours:
        assert stored.BitsAllocated == ours.BitsAllocated
        assert stored.PixelData == ours.PixelData


@pytest.fixture(scope="module")
def results(seg_factory, tmp_path_factory):
    """SEGs of every type, the SR and the SC of one oblique phantom study."""
    out = tmp_path_factory.mktemp("results")
    written = {t: seg_factory(out / t.value.lower(), t, orientation="oblique") for t in SegType}
    binary = written[SegType.BINARY]
    volumes = segment_volumes_ml(binary.labels, len(binary.specs), binary.volume.geometry.voxel_volume_ml)
    write_volume_report(binary.dataset, volumes, out / "sr.dcm", "orthanc-job")
    colors = [s.color for s in binary.specs]
    write_preview_sc(binary.volume, binary.sources, binary.labels, colors, out / "sc.dcm", uid_key="orthanc-job")
    # A second BINARY SEG (another job key, so other UIDs) that only ever travels by REST.
    rest = seg_factory(out / "rest", SegType.BINARY, orientation="oblique", uid_key="orthanc-rest-job")
    return {
        **{t.value: w.path for t, w in written.items()},
        "BINARY_REST": rest.path,
        "SR": out / "sr.dcm",
        "SC": out / "sc.dcm",
    }


def test_cstore_seg_sr_sc_stored_unmodified(orthanc, results):
    paths = [results["BINARY"], results["FRACTIONAL"], results["SR"], results["SC"]]
    _storescu(orthanc, *paths)
    for path in paths:
        _assert_stored_unmodified(orthanc, path, byte_identical=False)
    # Orthanc sees the SEG as a SEG series of the source study.
    seg = pydicom.dcmread(results["BINARY"], stop_before_pixels=True)
    series = orthanc.get_json(f"/instances/{orthanc.find_instance(str(seg.SOPInstanceUID))}/series")
    assert series["MainDicomTags"]["Modality"] == "SEG"


def test_rest_upload_labelmap_and_binary_stored_byte_for_byte(orthanc, results):
    for kind in ("LABELMAP", "BINARY_REST"):
        answer = orthanc.post("/instances", results[kind].read_bytes())
        assert answer["Status"] == "Success"
        _assert_stored_unmodified(orthanc, results[kind], byte_identical=True)


def test_resend_is_idempotent(orthanc, results):
    # Deterministic SOP Instance UIDs: a second C-STORE of the same result does not add an instance.
    _storescu(orthanc, results["BINARY"])
    before = len(orthanc.get_json("/instances"))
    _storescu(orthanc, results["BINARY"])
    assert len(orthanc.get_json("/instances")) == before
