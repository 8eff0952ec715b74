"""A real Orthanc (Debian package) accepts what the node writes, and keeps it unmodified.

The fixture starts Orthanc (``tests.orthanc_helpers``: ``start-orthanc.sh``
with a bare configuration, REST through ``orthanc-api-client``) on free
loopback ports with a throw-away storage folder.  SEG (BINARY,
FRACTIONAL), SR and Secondary Capture go in by C-STORE with DCMTK's
``storescu -R`` (propose only the SOP classes needed: the
default proposal list of Debian's DCMTK does not include SEG); the LABELMAP
SEG, whose SOP class DCMTK 3.6.7 does not know, and a BINARY SEG go in by
REST (``POST /instances``).  "Unmodified" means: same SOP class and
transfer syntax, same pixel data, same data set bytes after the file meta
header (a C-STORE makes Orthanc write its own meta header; a REST upload is
stored byte for byte).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from medsegagent.dicom.secondary_capture import write_preview_sc
from medsegagent.dicom.seg import SegType
from medsegagent.dicom.sr import segment_volumes_ml, write_volume_report
from tests.orthanc_helpers import OrthancProcess

STORESCU = "/usr/bin/storescu"  # DCMTK's, not pynetdicom's same-named app in the venv
#: A bare Orthanc: no plugins, files kept byte for byte.
CONFIG = {"Name": "medsegagent-test", "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
          "AuthenticationEnabled": False, "StorageCompression": False, "DicomCheckCalledAet": False,
          "Plugins": []}  # fmt: skip


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[OrthancProcess]:
    """Orthanc on free loopback ports with a throw-away storage folder, stopped (by its own pid) at the end."""
    if not Path(STORESCU).exists():
        pytest.fail("DCMTK storescu is not installed (apt package 'dcmtk')")
    server = OrthancProcess(tmp_path_factory.mktemp("orthanc"), config=CONFIG).start()
    yield server
    server.stop()


def _dataset_bytes(path_or_bytes: Path | bytes) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information group."""
    raw = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + group_length :]


def _storescu(orthanc: OrthancProcess, *paths: Path) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run(
        [STORESCU, "-R", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Failed" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def _assert_stored_unmodified(orthanc: OrthancProcess, path: Path, *, byte_identical: bool) -> None:
    ours = pydicom.dcmread(path)
    stored_bytes = orthanc.instance_file(str(ours.SOPInstanceUID))
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
    instance = orthanc.client.instances.lookup(str(seg.SOPInstanceUID))
    series = orthanc.client.get_json(f"/instances/{instance}/series")
    assert series["MainDicomTags"]["Modality"] == "SEG"


def test_rest_upload_labelmap_and_binary_stored_byte_for_byte(orthanc, results):
    for kind in ("LABELMAP", "BINARY_REST"):
        assert len(orthanc.client.upload_file(results[kind])) == 1
        _assert_stored_unmodified(orthanc, results[kind], byte_identical=True)


def test_resend_is_idempotent(orthanc, results):
    # Deterministic SOP Instance UIDs: a second C-STORE of the same result does not add an instance.
    _storescu(orthanc, results["BINARY"])
    before = len(orthanc.client.instances.get_all_ids())
    _storescu(orthanc, results["BINARY"])
    assert len(orthanc.client.instances.get_all_ids()) == before
