"""DICOM conformance of the node, driven only with DCMTK tools.

By default the suite starts its own ``medsegagent serve`` on free loopback
ports.  To check an installed node instead, set::

    MEDSEG_NODE=MEDSEG@127.0.0.1:11112   # called AE title @ host : port
    MEDSEG_CALLING_AE=ORTHANC            # an AE title the node allows

(tests that need to look into the node's spool then skip).  See
``docs/conformance.md`` for the statement these tests check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from tests.test_node import ENV, StoreSCP, _free_port, _wait_port
from tests.test_node_crash import ServeProcess

pytestmark = pytest.mark.slow

#: (name, how to make the file from an uncompressed one (None: pydicom), storescu proposal, transfer syntax)
SYNTAXES = [
    ("implicit-le", ["/usr/bin/dcmconv", "+ti"], "-xi", uid.ImplicitVRLittleEndian),
    ("explicit-le", ["/usr/bin/dcmconv", "+te"], "-xe", uid.ExplicitVRLittleEndian),
    ("explicit-be", ["/usr/bin/dcmconv", "+tb"], "-xb", uid.ExplicitVRBigEndian),
    ("deflate", ["/usr/bin/dcmconv", "+td"], "-xd", uid.DeflatedExplicitVRLittleEndian),
    ("rle", ["/usr/bin/dcmcrle"], "-xr", uid.RLELossless),
    ("jpeg-lossless-sv1", ["/usr/bin/dcmcjpeg", "+e1"], "-xs", uid.JPEGLosslessSV1),
    ("jpeg-ls-lossless", ["/usr/bin/dcmcjpls", "+el"], "-xt", uid.JPEGLSLossless),
    ("jpeg2000-lossless", None, "-xv", uid.JPEG2000Lossless),
]


class Target:
    """The node under test: external (env) or one this suite runs."""

    def __init__(self, tmp_path: Path) -> None:
        spec = os.environ.get("MEDSEG_NODE")
        self.process: ServeProcess | None = None
        self.calling = os.environ.get("MEDSEG_CALLING_AE", "MODALITY")
        if spec:
            self.ae, address = spec.split("@", 1)
            self.host, port = address.rsplit(":", 1)
            self.port = int(port)
            self.spool: Path | None = None
        else:
            self.pacs_port = _free_port()
            self.process = ServeProcess(tmp_path, self.pacs_port).start()
            self.ae, self.host, self.port = "MEDSEG", "127.0.0.1", self.process.dicom_port
            self.spool = tmp_path / "var" / "spool"

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def dcmtk(self, tool: str, *args: str, files=(), calling: str | None = None, called: str | None = None):
        """Run a DCMTK tool against the node: options, then peer and port, then files."""
        return subprocess.run(
            [f"/usr/bin/{tool}", "-aet", calling or self.calling, "-aec", called or self.ae, *args, self.host,
             str(self.port), *map(str, files)],
            env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    node = Target(tmp_path_factory.mktemp("conformance"))
    yield node
    node.stop()


def test_verification(target):
    result = target.dcmtk("echoscu", "-v")
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr


def test_unknown_calling_ae_is_rejected(target):
    result = target.dcmtk("echoscu", calling="NOT-ALLOWED")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr


@pytest.mark.parametrize(("name", "convert", "propose", "syntax"), SYNTAXES, ids=[s[0] for s in SYNTAXES])
def test_storage_with_each_transfer_syntax(target, phantom_factory, tmp_path, name, convert, propose, syntax):
    _, files = phantom_factory("CT", seed=9, size=64, slices=8)
    source = files.series["CT"][3]
    encoded = tmp_path / f"{name}.dcm"
    if convert is None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(encoded)
    else:
        subprocess.run([*convert, str(source), str(encoded)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    # -R: propose only the file's SOP class; the -x option proposes the syntax under test.
    result = target.dcmtk("storescu", "-v", "-R", propose, files=[encoded])
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr
    if target.spool is not None:
        original = pydicom.dcmread(source)
        stored = pydicom.dcmread(next(target.spool.rglob(f"{original.SOPInstanceUID}.dcm")))
        # Stored as received (no transcoding), and it decodes to the original pixels.
        assert stored.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)


def test_unsupported_sop_class_gets_no_presentation_context(target, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=9, size=64, slices=8)
    ds = pydicom.dcmread(files.series["CT"][0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan
    path = tmp_path / "rtplan.dcm"
    ds.save_as(path)
    result = target.dcmtk("storescu", "-v", "-R", files=[path])
    assert result.returncode != 0
    assert "No presentation context" in result.stderr or "no acceptable presentation contexts" in result.stderr.lower()


def test_refused_instance_gets_failure_status_and_node_keeps_serving(target, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=9, size=64, slices=8)
    ds = pydicom.dcmread(files.series["CT"][1])
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    result = target.dcmtk("storescu", "-v", files=[path])
    assert "Error: CannotUnderstand" in result.stderr
    assert target.dcmtk("echoscu").returncode == 0


def test_worklist_peer_with_shipped_worklists(tmp_path):
    """DCMTK's own worklist files served by wlmscpfs answer findscu (the MWL set-up the node queries)."""
    shipped = Path("/usr/share/doc/dcmtk/examples/wlistdb/OFFIS")
    if not shipped.is_dir():
        pytest.fail("DCMTK example worklists are missing (package dcmtk)")
    db = tmp_path / "wlistdb" / "OFFIS"
    db.mkdir(parents=True)
    (db / "lockfile").write_text("")
    for dump in sorted(shipped.glob("*.dump")):
        subprocess.run(["/usr/bin/dump2dcm", str(dump), str(db / (dump.stem + ".wl"))], check=True,
                       capture_output=True, timeout=30)  # fmt: skip
    port = _free_port()
    server = subprocess.Popen(["/usr/bin/wlmscpfs", "-dfp", str(db.parent), str(port)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_port(port)
        result = subprocess.run(
            ["/usr/bin/findscu", "-v", "-W", "-aec", "OFFIS", "-k", "AccessionNumber", "-k", "PatientName",
             "-k", "ScheduledProcedureStepSequence[0].Modality=CT", "127.0.0.1", str(port)],
            env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Find Response:") >= 2
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_study_to_seg_at_a_storescp_pacs(target, phantom_factory, tmp_path):
    """storescu sends a study to the preset AE title; the SEG arrives at DCMTK storescp."""
    if target.process is None:
        pytest.skip("end to end needs the suite's own node (its destination is the suite's storescp)")
    pacs = StoreSCP(tmp_path / "pacs", target.pacs_port).start()
    try:
        _, files = phantom_factory("CT", seed=6, size=96, slices=32)
        result = target.dcmtk("storescu", files=files.series["CT"], called="LIVERSEG")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not pacs.segs():
            time.sleep(0.2)
        assert len(pacs.segs()) == 1
        seg = pydicom.dcmread(pacs.segs()[0])
        assert seg.SOPClassUID == uid.SegmentationStorage
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver"]
    finally:
        pacs.stop()
        shutil.rmtree(tmp_path / "pacs", ignore_errors=True)
