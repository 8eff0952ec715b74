"""C-STORE delivery: a compressed result goes out uncompressed to a peer that accepts only that."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from medsegagent.node.config import parse_config
from medsegagent.node.dispatch import Outcome, deliver, send_files


@pytest.fixture
def uncompressed_only_scp():
    """A pynetdicom Storage SCP for CT in Explicit VR Little Endian only; yields (port, received data sets)."""
    received: list[pydicom.Dataset] = []
    lock = threading.Lock()

    def on_store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta  # the negotiated transfer syntax
        with lock:
            received.append(dataset)
        return 0x0000

    ae = AE(ae_title="STRICT")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def _rle_copy(path: Path, out: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_compressed_file_is_sent_uncompressed_when_the_peer_takes_only_that(
    uncompressed_only_scp, phantom_factory, tmp_path
):
    port, received = uncompressed_only_scp
    _, files = phantom_factory("CT")
    original = files.series["CT"][0]
    rle = _rle_copy(original, tmp_path / "rle.dcm")
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    result = send_files([rle], host="127.0.0.1", port=port, called_ae="STRICT")
    assert result.sent == 1 and not result.failed and not result.unsent
    (got,) = received
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, pydicom.dcmread(original).pixel_array)


def test_a_sop_class_the_peer_refuses_is_given_up_with_the_reason(uncompressed_only_scp, phantom_factory):
    port, received = uncompressed_only_scp
    ct = phantom_factory("CT")[1].series["CT"][0]
    mr_files = phantom_factory("MR")[1]
    mr = mr_files.series[next(iter(mr_files.series))][0]
    assert pydicom.dcmread(mr, stop_before_pixels=True).SOPClassUID == MRImageStorage
    destination = parse_config(
        {"destinations": [{"name": "strict", "ae_title": "STRICT", "host": "127.0.0.1", "port": port}]}
    ).destinations[0]
    outcomes = deliver(destination, [ct, mr], calling_ae="MEDSEG")
    assert outcomes[ct].outcome is Outcome.DELIVERED and len(received) == 1
    assert outcomes[mr].outcome is Outcome.GIVE_UP  # a wrong configuration, not an outage: retrying cannot help
    assert "no presentation context" in outcomes[mr].reason and "MR Image Storage" in outcomes[mr].reason
