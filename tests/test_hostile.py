"""Malformed and hostile input: each gets a clear refusal and the node keeps serving.

Thirty cases against the node's DICOM listener: bad data sets (refused with
a C-STORE failure status and a log line), bad associations (rejected), and
bad bytes on the wire (aborted).  After every case a C-ECHO and a good
C-STORE must still succeed, and nothing of the bad input is in the spool.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage

from medsegagent.node.intake import StorageSCP
from tests.conftest import echo_ok

GOOD_CALLER = "MODALITY"


@pytest.fixture
def node(tmp_path):
    state = {"full": False}

    def admit(study: str | None) -> str | None:
        return "disk below watermark (simulated)" if state["full"] else None

    scp = StorageSCP(tmp_path / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0,
                     allowed_callers={GOOD_CALLER}, admit=admit)  # fmt: skip
    scp.start()
    scp.state = state
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    files = write_phantom(make_phantom("CT", seed=3, slices=4, size=32), tmp_path_factory.mktemp("hostile"))
    return files.series["CT"][0]


def _store(port: int, ds: Dataset | Path, calling: str = GOOD_CALLER, sop_class: str = CTImageStorage) -> int:
    """C-STORE one data set; returns the status (or -1 when no association)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, contexts=[build_context(sop_class)], ae_title="MEDSEG")
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if status and "Status" in status else -2
    finally:
        assoc.release()


def _echo_ok(port: int) -> bool:
    return echo_ok(port, GOOD_CALLER)


def _raw(port: int, payload: bytes, hold: float = 0.3) -> bytes:
    """Send raw bytes on a fresh TCP connection; return whatever comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        time.sleep(hold)
        sock.settimeout(2)
        try:
            return sock.recv(65536)
        except (TimeoutError, ConnectionError):
            return b""


def _assoc_rq(
    calling: str = GOOD_CALLER, called: str = "MEDSEG", length: int | None = None, body: bytes = b""
) -> bytes:
    """A-ASSOCIATE-RQ header (type 0x01) with an optional lying length field."""
    fixed = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    content = fixed + body
    return struct.pack(">BBL", 0x01, 0, len(content) if length is None else length) + content


def _mutate(**changes) -> Callable[[Dataset], Dataset]:
    def apply(ds: Dataset) -> Dataset:
        for key, value in changes.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        return ds

    return apply


def _truncate_pixels(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    return ds


# -- data set cases: refused with a failure status -------------------------------------------
DATASET_CASES = {
    "missing pixel data": (_mutate(PixelData=None), 0xC000),
    "truncated pixel data": (_truncate_pixels, 0xC000),
    "path-like study UID": (_mutate(StudyInstanceUID="../../../etc"), 0xC000),
    "path-like series UID": (_mutate(SeriesInstanceUID="1.2.3/../../x"), 0xC000),
    "absolute-path study UID": (_mutate(StudyInstanceUID="/etc/passwd"), 0xC000),
    "empty study UID": (_mutate(StudyInstanceUID=""), 0xC000),
    "missing series UID": (_mutate(SeriesInstanceUID=None), 0xC000),
    "UID with letters": (_mutate(StudyInstanceUID="1.2.abc.4"), 0xC000),
    "UID with leading zero": (_mutate(SeriesInstanceUID="1.2.03.4"), 0xC000),
    "UID too long": (_mutate(StudyInstanceUID="1." + "2" * 70), 0xC000),
    "UID with trailing dot": (_mutate(StudyInstanceUID="1.2.3."), 0xC000),
    "UID with space": (_mutate(SeriesInstanceUID="1.2 .3"), 0xC000),
    "oversized rows claim": (_mutate(Rows=65535), 0xC000),
    "oversized frame claim": (_mutate(NumberOfFrames=1_000_000_000), 0xC000),
    "zero columns": (_mutate(Columns=0), 0xC000),
    "odd bits allocated": (_mutate(BitsAllocated=12), 0xC000),
    "missing rows": (_mutate(Rows=None), 0xC000),
    "four samples per pixel": (_mutate(SamplesPerPixel=4), 0xC000),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_bad_dataset_is_refused(node, template, case, caplog):
    mutate, expected = DATASET_CASES[case]
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds = mutate(ds)
    with caplog.at_level(logging.WARNING, logger="medsegagent.node.intake"):
        assert _store(node.port, ds) == expected
    assert "C-STORE from MODALITY refused" in caplog.text
    assert not any(ds.SOPInstanceUID in p.name for p in node.spool_dir.rglob("*"))
    assert not list((node.spool_dir / ".incoming").iterdir())  # the partial instance went with the refusal
    assert _echo_ok(node.port)
    good = pydicom.dcmread(template)
    assert _store(node.port, good) == 0


def test_full_disk_refuses_with_out_of_resources(node, template):
    node.state["full"] = True
    assert _store(node.port, pydicom.dcmread(template)) == 0xA700
    assert not list((node.spool_dir / ".incoming").iterdir())
    node.state["full"] = False
    assert _store(node.port, pydicom.dcmread(template)) == 0


# -- association cases: rejected ----------------------------------------------------------------
def test_unknown_calling_ae_is_rejected(node, template):
    assert _store(node.port, pydicom.dcmread(template), calling="INTRUDER") == -1
    assert _echo_ok(node.port)


def test_unsupported_sop_class_gets_no_context(node, template):
    ds = pydicom.dcmread(template)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan
    ae = AE(ae_title=GOOD_CALLER)
    assoc = ae.associate("127.0.0.1", node.port, contexts=[build_context(ds.SOPClassUID)], ae_title="MEDSEG")
    # The association is accepted or rejected, but the RT Plan context never is.
    if assoc.is_established:
        assert not assoc.accepted_contexts
        assoc.release()
    assert _echo_ok(node.port)


# -- wire-level cases: aborted, listener unharmed -------------------------------------------------
WIRE_CASES = {
    "random bytes": b"\x13\x37" * 64,
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls client hello": bytes.fromhex("16030100a5010000a10303") + bytes(160),
    "unknown pdu type": struct.pack(">BBL", 0x09, 0, 4) + b"abcd",
    "p-data before association": struct.pack(">BBL", 0x04, 0, 6) + struct.pack(">L", 2) + b"\x01\x03",
    "associate-rq with lying short length": _assoc_rq(length=10),
    "associate-rq with bad protocol version": struct.pack(">BBL", 0x01, 0, 68)
    + struct.pack(">HH", 0x7777, 0)
    + b"MEDSEG".ljust(16)
    + GOOD_CALLER.encode().ljust(16)
    + bytes(32),
    "associate-rq with garbage items": _assoc_rq(body=b"\xff\x00\x00\x10" + bytes(16)),
    "empty connection": b"",
}


@pytest.mark.parametrize("case", list(WIRE_CASES))
def test_garbage_on_the_wire_is_dropped(node, case):
    _raw(node.port, WIRE_CASES[case])
    assert _echo_ok(node.port)


def test_oversized_length_claim_does_not_block_others(node):
    """A PDU claiming 4 GB holds one connection at most; other peers are served meanwhile."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(_assoc_rq(length=0xFFFFFFF0)[:40])
        assert _echo_ok(node.port)
