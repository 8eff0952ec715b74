"""The transfer syntaxes PACS send: accepted, stored as sent, decoded, and segmented (issue #16, part 3).

Files are compressed by the encoders a PACS would use -- DCMTK's ``dcmcjpeg``,
``dcmcjpls`` and ``dcmcrle``; pydicom (OpenJPEG) for JPEG 2000, imagecodecs
for HTJ2K, which neither DCMTK 3.6.7 nor pydicom encodes -- and sent by
DCMTK ``storescu`` proposing that syntax (pynetdicom for JPEG Lossless
Process 14 and HTJ2K, which ``storescu`` 3.6.7 has no option for).  The spooled instance must keep the
syntax it came in, and decode to the original pixels (lossless) or close to
them (lossy).  A JPEG Lossless SV1 study and a JPEG 2000 study go through a
live node to a DCMTK ``storescp`` as SEGs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from medsegagent.node.config import parse_config
from medsegagent.node.intake import StorageSCP, supported_transfer_syntaxes
from medsegagent.node.jobs import JobState
from medsegagent.node.service import Node

ENV = {**os.environ, "TCP_NODELAY": "1"}
CALLER = "MODALITY"


def dcmtk(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    path = f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        pytest.fail(f"DCMTK {name} missing at {path}; run scripts/bootstrap.sh test")
    result = subprocess.run([path, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{name} failed: {result.stdout}{result.stderr}"
    return result


def _pydicom(syntax: str, **options) -> Callable[[Path, Path], None]:
    def encode(source: Path, out: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, **options)
        ds.save_as(out, enforce_file_format=True)

    return encode


def _htj2k(source: Path, out: Path) -> None:
    import imagecodecs

    ds = pydicom.dcmread(source)
    codestream = imagecodecs.htj2k_encode(ds.pixel_array)  # reversible by default
    assert b"\xff\x50" in codestream[:256], "no CAP marker: not a High-Throughput codestream"
    ds.PixelData = encapsulate([codestream])
    ds.file_meta.TransferSyntaxUID = uid.HTJ2KLossless
    ds.save_as(out, enforce_file_format=True)


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    return lambda source, out: dcmtk(tool, *options, source, out) and None


@dataclass(frozen=True)
class Encoding:
    """How a PACS makes and sends one transfer syntax."""

    syntax: str
    make: Callable[[Path, Path], None]
    storescu: tuple[str, ...] | None  # the option proposing it; None: sent by pynetdicom
    lossless: bool = True
    image: str = "CT"  # JPEG Baseline is 8-bit: ultrasound


ENCODINGS = {
    "JPEG Lossless SV1": Encoding(uid.JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1"), ("-xs",)),
    "JPEG Lossless": Encoding(uid.JPEGLossless, _dcmtk("dcmcjpeg", "+el"), None),  # no storescu option
    "JPEG Baseline (US)": Encoding(uid.JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb"), ("-xy",), False, "US"),
    "JPEG-LS Lossless": Encoding(uid.JPEGLSLossless, _dcmtk("dcmcjpls", "+el"), ("-xt",)),
    "JPEG-LS Near-Lossless": Encoding(uid.JPEGLSNearLossless, _dcmtk("dcmcjpls", "+en"), ("-xu",), False),
    "RLE Lossless": Encoding(uid.RLELossless, _dcmtk("dcmcrle"), ("-xr",)),
    "JPEG 2000 Lossless": Encoding(uid.JPEG2000Lossless, _pydicom(uid.JPEG2000Lossless), ("-xv",)),
    "JPEG 2000": Encoding(uid.JPEG2000, _pydicom(uid.JPEG2000, j2k_cr=[20]), ("-xw",), False),
    "HTJ2K Lossless": Encoding(uid.HTJ2KLossless, _htj2k, None),
}


def test_every_syntax_a_pacs_sends_is_offered():
    """Each syntax has a decoder here, so the node offers it; nothing is offered that does not decode."""
    offered = supported_transfer_syntaxes()
    for name, encoding in ENCODINGS.items():
        assert encoding.syntax in offered, name
    assert {uid.HTJ2KLosslessRPCL, uid.HTJ2K} <= set(offered)
    assert all(pydicom.pixels.get_decoder(s).is_available for s in offered if uid.UID(s).is_compressed)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A 12-bit CT slice and an 8-bit ultrasound image made from it, uncompressed."""
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    out = tmp_path_factory.mktemp("sources")
    ct = write_phantom(make_phantom("CT", seed=7, slices=1, size=64), out / "ct").series["CT"][0]
    us = pydicom.dcmread(ct)
    pixels = us.pixel_array.astype(np.float32)
    us.PixelData = np.round(255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8).tobytes()
    us.SOPClassUID = us.file_meta.MediaStorageSOPClassUID = uid.UID("1.2.840.10008.5.1.4.1.1.6.1")
    us.SOPInstanceUID = us.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    us.Modality, us.BitsAllocated, us.BitsStored, us.HighBit, us.PixelRepresentation = "US", 8, 8, 7, 0
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
        if keyword in us:
            delattr(us, keyword)
    us.save_as(out / "us.dcm", enforce_file_format=True)
    return {"CT": ct, "US": out / "us.dcm"}


@pytest.fixture(scope="module")
def intake(tmp_path_factory):
    scp = StorageSCP(tmp_path_factory.mktemp("intake") / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0,
                     allowed_callers={CALLER})  # fmt: skip
    scp.start()
    yield scp
    scp.stop()


def _send_pynetdicom(path: Path, port: int) -> None:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=CALLER)
    assoc = ae.associate("127.0.0.1", port, [build_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)],
                         ae_title="MEDSEG")  # fmt: skip
    assert assoc.is_established and assoc.accepted_contexts
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_compressed_instance_is_stored_as_sent_and_decodes(name, sources, intake, tmp_path):
    encoding = ENCODINGS[name]
    source = sources[encoding.image]
    compressed = tmp_path / "compressed.dcm"
    encoding.make(source, compressed)
    sent = pydicom.dcmread(compressed)
    assert sent.file_meta.TransferSyntaxUID == encoding.syntax
    if encoding.storescu is None:
        _send_pynetdicom(compressed, intake.port)
    else:
        dcmtk("storescu", *encoding.storescu, "-aet", CALLER, "-aec", "MEDSEG", "127.0.0.1", intake.port, compressed)
    (spooled,) = intake.spool_dir.rglob(f"{sent.SOPInstanceUID}.dcm")
    received = pydicom.dcmread(spooled)
    assert received.file_meta.TransferSyntaxUID == encoding.syntax  # stored as sent, no transcoding
    assert received.PixelData == sent.PixelData
    original = pydicom.dcmread(source).pixel_array.astype(np.int32)
    decoded = received.pixel_array.astype(np.int32)
    assert decoded.shape == original.shape
    if encoding.lossless:
        np.testing.assert_array_equal(decoded, original)
    else:  # close to the original: a lossy codec, not garbage
        assert np.corrcoef(decoded.ravel(), original.ravel())[0, 1] > 0.99
        assert np.abs(decoded - original).mean() < 0.05 * np.ptp(original)  # the phantom's noise is smoothed


def test_jpeg_extended_is_not_accepted_because_nothing_here_decodes_its_12_bit_samples(sources, intake, tmp_path):
    """JPEG Extended (4.51) is refused at negotiation, so the sender knows before it sends: pydicom's
    gdcm and pillow plugins refuse 12-bit samples (only the GPL pylibjpeg-libjpeg decodes them)."""
    compressed = tmp_path / "extended.dcm"
    dcmtk("dcmcjpeg", "+ee", sources["CT"], compressed)
    with pytest.raises(RuntimeError, match="12-bit"):
        _ = pydicom.dcmread(compressed).pixel_array
    assert uid.JPEGExtended12Bit not in supported_transfer_syntaxes()
    ae = AE(ae_title=CALLER)
    contexts = [build_context(uid.CTImageStorage, uid.JPEGExtended12Bit), build_context(Verification)]
    assoc = ae.associate("127.0.0.1", intake.port, contexts, ae_title="MEDSEG")
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        assert [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts] == [(uid.CTImageStorage, 0x04)]
    finally:
        assoc.release()


# -- end to end: compressed studies in, SEGs out ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compressed_study(files: list[Path], out: Path, encode: Callable[[Path, Path], None]) -> list[Path]:
    """The study re-identified (a new Study/Series Instance UID, new SOP Instance UIDs), then compressed."""
    out.mkdir()
    study, series = uid.generate_uid(), uid.generate_uid()
    result = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        plain = out / f"plain-{path.name}"
        ds.save_as(plain, enforce_file_format=True)
        encode(plain, out / path.name)
        plain.unlink()
        result.append(out / path.name)
    return result


@pytest.mark.slow
def test_jpeg_lossless_and_jpeg_2000_studies_come_back_as_segs(phantom_factory, tmp_path):
    """Sent by storescu in JPEG Lossless SV1 (-xs) and JPEG 2000 lossless (-xv): both segmented, and each
    SEG goes out in a syntax the destination accepted (storescp's default: uncompressed only)."""
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    sv1 = _compressed_study(files.series["CT"], tmp_path / "sv1", ENCODINGS["JPEG Lossless SV1"].make)
    j2k = _compressed_study(files.series["CT"], tmp_path / "j2k", ENCODINGS["JPEG 2000 Lossless"].make)
    pacs_dir, pacs_port = tmp_path / "pacs", _free_port()
    pacs_dir.mkdir()
    pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-uf", "-od", str(pacs_dir), str(pacs_port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    config = parse_config({
        "node": {"ae_title": "MEDSEG", "port": 0, "data_dir": str(tmp_path / "var"), "quiet_seconds": 0.5,
                 "collection": "demo", "min_free_disk_mb": 1},
        "peers": [{"ae_title": CALLER, "host": "127.0.0.1"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "presets": {"LIVERSEG": "liver"},
        "instruction_sources": ["preset"],
        "http": {"enabled": False},
    })  # fmt: skip
    node = Node(config, poll_seconds=0.1)
    node.start()
    try:
        for study, option in ((sv1, "-xs"), (j2k, "-xv")):
            dcmtk("storescu", option, "-aet", CALLER, "-aec", "LIVERSEG", "127.0.0.1", node.scp.port, *study)
        jobs = _wait_for(node, lambda jobs: len(jobs) == 2 and all(j.state == JobState.DELIVERED for j in jobs))
        segs = [pydicom.dcmread(p) for p in pacs_dir.iterdir()]
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(timeout=10)
    spooled = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
               for p in node.spool_dir.rglob("*.dcm")}  # fmt: skip
    assert spooled == {uid.JPEGLosslessSV1, uid.JPEG2000Lossless}
    assert sorted(ds.StudyInstanceUID for ds in segs) == sorted(j.study_uid for j in jobs)
    for ds in segs:
        assert ds.Modality == "SEG"
        assert ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
        assert "liver" in [s.SegmentLabel.lower() for s in ds.SegmentSequence]


def _wait_for(node: Node, done: Callable[[list], bool], timeout: float = 240.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.store.list()
        if done(jobs):
            return jobs
        if any(j.state == JobState.FAILED for j in jobs):
            break
        time.sleep(0.2)
    pytest.fail(f"jobs: {[(j.id, j.state, j.error) for j in node.store.list()]}")
