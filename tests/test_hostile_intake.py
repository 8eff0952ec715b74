"""Bad instances refused at the door, and idle sockets that cannot lock peers out (issue #15: 1, 3, 4, 7).

Every instance whose problem the instance alone shows gets a DICOM failure
status and an Error Comment that says what is wrong; nothing of it stays in
the spool, and the association and the listener go on serving.  Real peers:
pynetdicom and DCMTK's ``storescu`` and ``echoscu``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from medsegagent.node.intake import StorageSCP
from tests.conftest import echo_ok, wait_until

CALLER = "MODALITY"
DCMTK = "/usr/bin"


def dcmtk(name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    path = os.path.join(DCMTK, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"DCMTK {name} missing at {path}; run scripts/bootstrap.sh test")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([path, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def node(tmp_path):
    scp = StorageSCP(tmp_path / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, allowed_callers={CALLER})
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    files = write_phantom(make_phantom("CT", seed=4, slices=2, size=32), tmp_path_factory.mktemp("hostile-intake"))
    return files.series["CT"][0]


def _fresh(template: Path) -> Dataset:
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def _store(port: int, datasets: list[Dataset | Path], sop_class: str = CTImageStorage) -> list[tuple[int, str]]:
    """C-STORE each data set on one association; (status, Error Comment) per data set."""
    ae = AE(ae_title=CALLER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, contexts=[build_context(sop_class)], ae_title="MEDSEG")
    assert assoc.is_established
    try:
        answers = [assoc.send_c_store(ds) for ds in datasets]
        return [(int(a.Status), str(a.get("ErrorComment", ""))) for a in answers]
    finally:
        assoc.release()


def _set(**changes) -> Callable[[Dataset], None]:
    """Set attributes (``None`` deletes one); invalid values go out as given (pydicom only warns)."""

    def apply(ds: Dataset) -> None:
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return apply


def _text(tag: int, value: str) -> Callable[[Dataset], None]:
    """Put ``value`` into ``tag`` as it is (VR LO): pydicom cannot hold a DS that is not a number."""

    def apply(ds: Dataset) -> None:
        ds[tag] = DataElement(tag, "LO", value)

    return apply


A900, C000 = 0xA900, 0xC000

#: case -> (change, status, the Error Comment starts with)
REFUSED = {
    "Bits Stored above Bits Allocated": (_set(BitsStored=17, HighBit=16), A900, "Bits Stored 17 does not fit Bits"),
    "High Bit inconsistent": (_set(HighBit=15), A900, "High Bit 15 with Bits Stored 12 (must be 11)"),
    "no Bits Stored": (_set(BitsStored=None), A900, "no Bits Stored or High Bit"),
    "no Modality": (_set(Modality=None), A900, "no Modality (0008,0060)"),
    "empty Modality": (_set(Modality=""), A900, "no Modality (0008,0060)"),
    "Modality OT in a CT image": (_set(Modality="OT"), A900, "Modality 'OT': CT Image Storage requires CT"),
    "Modality MR in a CT image": (_set(Modality="MR"), A900, "Modality 'MR': CT Image Storage requires CT"),
    "NaN Image Position": (_set(ImagePositionPatient=["NaN", 0, 0]), A900, "Image Position (Patient) is not finite"),
    "infinite Image Position": (_set(ImagePositionPatient=[0, "-inf", 0]), A900,
                                "Image Position (Patient) is not finite"),
    "Image Position 1e300": (_set(ImagePositionPatient=[0, 0, "1e300"]), A900, "Image Position (Patient) beyond"),
    "Image Position of two values": (_set(ImagePositionPatient=[0, 0]), A900,
                                     "Image Position (Patient) has 2 values, not 3"),
    "Image Position not a number": (_text(0x00200032, "x\\0\\0"), C000,
                                    "bad data set: Image Position (Patient) 'x/0/0' is"),
    "Image Orientation of zeros": (_set(ImageOrientationPatient=[0] * 6), A900,
                                   "Image Orientation (Patient) is not 2 orthogonal"),
    "Image Orientation not orthogonal": (_set(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]), A900,
                                         "Image Orientation (Patient) is not 2 orthogonal"),
    "NaN Image Orientation": (_set(ImageOrientationPatient=[1, 0, 0, 0, "nan", 0]), A900,
                              "Image Orientation (Patient) is not finite"),
    "Pixel Spacing 0": (_set(PixelSpacing=[0, 0]), A900, "Pixel Spacing (0, 0) mm is not physical"),
    "negative Pixel Spacing": (_set(PixelSpacing=[0.7, -0.7]), A900, "Pixel Spacing (0.7, -0.7) mm is not physical"),
    "Pixel Spacing 1e300": (_set(PixelSpacing=["1e300", "1e300"]), A900, "Pixel Spacing (1e+300, 1e+300) mm is not"),
    "infinite Pixel Spacing": (_set(PixelSpacing=["inf", 1]), A900, "Pixel Spacing is not finite"),
    "unknown Specific Character Set": (_set(SpecificCharacterSet="ISO_IR 999"), C000,
                                       "unknown Specific Character Set 'ISO_IR 999'"),
    "unknown second character set": (_set(SpecificCharacterSet=["", "ISO 2022 IR 999"]), C000,
                                     "unknown Specific Character Set 'ISO 2022 IR 999'"),
}  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values it is told to write
def test_instances_that_show_their_problem_are_refused_and_the_association_goes_on(node, template, caplog):
    """Each bad instance gets its status and comment; good instances before and after it on the same
    association are stored; nothing of a refused one is in the spool."""
    bad = []
    for change, _, _ in REFUSED.values():
        ds = _fresh(template)
        change(ds)
        bad.append(ds)
    first, last = _fresh(template), _fresh(template)
    with caplog.at_level(logging.WARNING, logger="medsegagent.node.intake"):
        answers = _store(node.port, [first, *bad, last])
    assert answers[0] == answers[-1] == (0, "")
    for case, (status, comment), ds in zip(REFUSED, answers[1:-1], bad, strict=True):
        expected_status, expected_comment = REFUSED[case][1:]
        assert (hex(status), comment[: len(expected_comment)]) == (hex(expected_status), expected_comment), case
        assert f"refused (0x{expected_status:04X}) for {ds.SOPInstanceUID}" in caplog.text, case
    stored = {p.stem for p in node.spool_dir.rglob("*.dcm")}
    assert stored == {first.SOPInstanceUID, last.SOPInstanceUID}
    assert not list((node.spool_dir / ".incoming").iterdir())
    assert echo_ok(node.port, CALLER)


ACCEPTED = {
    "misspelt character set pydicom mends": _set(SpecificCharacterSet="ISO IR 100"),
    "ISO 2022 with a default first value": _set(SpecificCharacterSet=["", "ISO 2022 IR 87"]),
    "rounded direction cosines": _set(ImageOrientationPatient=[0.999998, 0.002, 0, -0.002, 0.999998, 0]),
    "oblique orientation": _set(ImageOrientationPatient=[0.7071068, 0.7071068, 0, 0, 0, -1]),
    "fine pixel spacing": _set(PixelSpacing=[0.05, 0.05]),
    "no geometry at all": _set(ImagePositionPatient=None, ImageOrientationPatient=None, PixelSpacing=None),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unusual_but_valid_instances_are_stored(node, template):
    """The checks refuse what is wrong, not what is unusual."""
    datasets = []
    for change in ACCEPTED.values():
        ds = _fresh(template)
        change(ds)
        datasets.append(ds)
    assert _store(node.port, datasets) == [(0, "")] * len(ACCEPTED)


def test_modality_must_be_the_one_of_the_sop_class(node, tmp_path):
    """An MR instance sent as MR is stored; the same data set labelled CT on the MR context is refused."""
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    source = write_phantom(make_phantom("MR", seed=4, slices=1, size=16), tmp_path / "mr").series["MR"][0]
    good, bad = _fresh(source), _fresh(source)
    bad.Modality = "CT"
    answers = _store(node.port, [good, bad], sop_class=MRImageStorage)
    assert answers == [(0, ""), (A900, "Modality 'CT': MR Image Storage requires MR")]


def test_uid_with_a_trailing_newline_is_refused(node, template, tmp_path, monkeypatch, caplog):
    """``re.match(... $)`` accepted "1.2.3\\n"; such bytes on the wire must not become a spool directory.

    pydicom and DCMTK both strip the newline when they encode, so the file is patched and sent as it is
    (pynetdicom's chunked sending reads the data set from the file without decoding it).
    """
    import pynetdicom

    ds = _fresh(template)
    ds.StudyInstanceUID = "1.2.826.0.1.9"  # 13 characters: written with one NUL to pad it
    path = tmp_path / "newline.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert raw.count(b"1.2.826.0.1.9\x00") == 1
    path.write_bytes(raw.replace(b"1.2.826.0.1.9\x00", b"1.2.826.0.1.9\n"))
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    with caplog.at_level(logging.WARNING, logger="medsegagent.node.intake"):
        answers = _store(node.port, [path, _fresh(template)])
    assert answers == [(C000, "StudyInstanceUID '1.2.826.0.1.9/n' is not a valid DICOM UID"), (0, "")]
    assert "StudyInstanceUID '1.2.826.0.1.9\\n' is not a valid DICOM UID" in caplog.text
    assert not [p for p in node.spool_dir.rglob("*") if "\n" in p.name or p.name == f"{ds.SOPInstanceUID}.dcm"]


def test_post_jobs_refuses_a_uid_with_a_trailing_newline(tmp_path, monkeypatch):
    """``POST /jobs`` answers 422, even when a directory of that name exists (an old intake made such)."""
    from medsegagent.node.api import create_app
    from medsegagent.node.config import parse_config
    from medsegagent.node.service import Node

    config = parse_config({"node": {"port": 0, "data_dir": str(tmp_path / "var")}, "http": {"port": 0}})
    node = Node(config)
    (node.spool_dir / "1.2.3\n").mkdir(parents=True)
    (node.spool_dir / "1.2.3").mkdir()
    client = TestClient(create_app(node, "secret"))
    headers = {"Authorization": "Bearer secret"}
    response = client.post("/jobs", json={"study_uid": "1.2.3\n", "request": "liver"}, headers=headers)
    assert response.status_code == 422, response.text
    assert "not a valid Study Instance UID" in response.text
    assert node.store.list() == []
    assert client.post("/jobs", json={"study_uid": "1.2.3", "request": "liver"}, headers=headers).status_code == 202


# -- idle connections (issue #15.7) -----------------------------------------------------------------------


def test_idle_connections_do_not_lock_out_a_configured_peer(tmp_path, caplog):
    """70 connections that never associate: DCMTK echoscu from the allowed peer still succeeds, at once,
    and the silent connections are closed (the oldest over the cap at once, the rest at the deadline)."""
    scp = StorageSCP(tmp_path / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, allowed_callers={CALLER},
                     max_associations=2, max_pending_connections=16, association_request_seconds=2.0)  # fmt: skip
    scp.start()
    idle: list[socket.socket] = []
    try:
        with caplog.at_level(logging.WARNING, logger="medsegagent.dicom.acceptor"):
            for _ in range(70):
                idle.append(socket.create_connection(("127.0.0.1", scp.port), timeout=5))
            acceptor = scp._server.acceptor
            assert wait_until(lambda: acceptor.pending_connections == 16)
            started = time.monotonic()
            result = dcmtk("echoscu", "-aet", CALLER, "-aec", "MEDSEG", "127.0.0.1", str(scp.port), timeout=20)
            assert result.returncode == 0, result.stdout + result.stderr
            assert time.monotonic() - started < 1.5  # not after the idle ones' deadline
            assert "closed the oldest connection without an association" in caplog.text
            # Both association slots stay usable while the idle connections are open.
            assert echo_ok(scp.port, CALLER) and echo_ok(scp.port, CALLER)
            assert wait_until(lambda: acceptor.active_associations == 0, timeout=5.0)
            assert all(_closed(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
        scp.stop()


def test_associations_are_limited_apart_from_pending_connections(tmp_path):
    """Established associations hold the association slots; a pending connection does not take one."""
    scp = StorageSCP(tmp_path / "spool", ae_title="MEDSEG", host="127.0.0.1", port=0, max_associations=1,
                     max_pending_connections=4)  # fmt: skip
    scp.start()
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(Verification)
    try:
        with socket.create_connection(("127.0.0.1", scp.port), timeout=5):
            held = ae.associate("127.0.0.1", scp.port, ae_title="MEDSEG")
            assert held.is_established  # the silent connection did not take the one slot
            second = ae.associate("127.0.0.1", scp.port, ae_title="MEDSEG")
            assert second.is_rejected  # the slot is taken by an association
            held.release()
    finally:
        scp.stop()


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset; a silent node is not closed)."""
    sock.settimeout(0.5)
    try:
        return sock.recv(64) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True
