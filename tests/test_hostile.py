"""Malformed and hostile input: each gets a clear refusal or a named failure, and the node keeps serving.

Thirty cases against the node's DICOM listener: bad data sets (refused with
a C-STORE failure status and a log line), bad associations (rejected), and
bad bytes on the wire (aborted).  After every case a C-ECHO and a good
C-STORE must still succeed, and nothing of the bad input is in the spool.

Then studies that arrive but cannot be segmented meaningfully (issue 15): a
running node (real demo models, DCMTK ``storescp`` as the PACS) must fail
each job with its :class:`~medsegagent.node.jobs.FailureReason`, log it with
the job and study, deliver no SEG, and still segment a good study after
them.  Last, the delivery guarantee against a real Orthanc: a request passed
over by ``on_unusable_request: fallback`` is recorded, a delivered job
refuses retry and cancel (409), and a redelivered SEG is one instance.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage

from medsegagent.models.lexicon import load_lexicon
from medsegagent.node.intake import StorageSCP
from medsegagent.node.jobs import FailureReason, Job, JobState
from medsegagent.node.service import Node
from tests.conftest import echo_ok, tool
from tests.test_node import ENV, TOKEN, StoreSCP, _config, _free_port, _request_sr, _storescu

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


# -- studies that arrive but cannot be segmented: a failed job with a named reason --------------------------
LIVERSEG = "LIVERSEG"  # the called AE whose preset ("liver") would segment any of these studies


def _copy(files: list[Path], change: Callable[[Dataset, int], None] | None = None, keep: int | None = None
          ) -> list[Dataset]:  # fmt: skip
    """The phantom series under new UIDs (a study of its own), each instance changed by ``change(ds, index)``."""
    study, series = generate_uid(), generate_uid()
    out = []
    for index, path in enumerate(files[:keep]):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if change is not None:
            change(ds, index)
        out.append(ds)
    return out


def _with_request_sr(text: str) -> Callable[[list[Path], Path], list[Dataset]]:
    def build(files: list[Path], work: Path) -> list[Dataset]:
        study = _copy(files)
        reference = work / f"{study[0].StudyInstanceUID}.dcm"
        study[0].save_as(reference, enforce_file_format=True)
        return [*study, pydicom.dcmread(_request_sr(reference, text, work / f"{reference.stem}-sr.dcm"))]

    return build


def _changed(change: Callable[[Dataset, int], None], keep: int | None = None):
    return lambda files, work: _copy(files, change, keep)


def _set(**tags) -> Callable[[Dataset, int], None]:
    def change(ds: Dataset, index: int) -> None:
        for key, value in tags.items():
            setattr(ds, key, value)

    return change


def _other_frame_of_reference(ds: Dataset, index: int) -> None:
    if index == 5:
        ds.FrameOfReferenceUID = generate_uid()


def _nan_position(ds: Dataset, index: int) -> None:
    if index == 3:
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], "NaN"]


_R = FailureReason
#: Case -> (study builder, the job's failure reason).  Some the intake refuses at C-STORE already;
#: these are written straight into the spool, so the job's own checks are what is tested.
JOB_CASES = {
    "one-slice CT": (_changed(lambda ds, index: None, keep=1), _R.IMPLAUSIBLE_GEOMETRY),
    "pixel spacing 1e300": (_changed(_set(PixelSpacing=[1e300, 1e300])), _R.IMPLAUSIBLE_GEOMETRY),
    "100 kB SR request": (_with_request_sr("liver and spleen " * 6_000), _R.REQUEST_UNUSABLE),
    # Every structure the lexicon knows, each a target of its own (hundreds; numbered "lesion 0..499" no
    # longer serve: numbers of three digits are record numbers to the worklist grammar, not indices).
    "SR naming every structure": (
        _with_request_sr(", ".join(sorted(c.canonical for c in load_lexicon().concepts.values()))),
        _R.REQUEST_UNUSABLE,
    ),
    "inconsistent frame of reference": (_changed(_other_frame_of_reference), _R.INCONSISTENT_FRAME_OF_REFERENCE),
    "non-finite image position": (_changed(_nan_position), _R.NON_FINITE_GEOMETRY),
    "unknown character set": (_changed(_set(SpecificCharacterSet="ISO_IR 999")), _R.UNKNOWN_CHARACTER_SET),
    "modality OT": (_changed(_set(Modality="OT")), _R.UNSUPPORTED_MODALITY),
    "no modality": (_changed(lambda ds, index: delattr(ds, "Modality")), _R.UNSUPPORTED_MODALITY),
    "bits stored above bits allocated": (_changed(_set(BitsStored=20)), _R.UNREADABLE_PIXELS),
}
del _R


def _spool(node: Node, datasets: list[Dataset], called_ae: str = LIVERSEG) -> str:
    """Put a study into the node's spool as the intake would, and record its arrival; its Study Instance UID."""
    for ds in datasets:
        folder = node.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    node.store.touch_study(datasets[0].StudyInstanceUID, called_ae, GOOD_CALLER)
    return datasets[0].StudyInstanceUID


@pytest.fixture
def serving(tmp_path, monkeypatch, start_node) -> Callable[..., Node]:
    """``make(dest_port, **config sections) -> Node``: a running node (demo models), stopped after the test."""
    monkeypatch.setenv("MEDSEG_TEST_TOKEN", TOKEN)
    return lambda dest_port, **extra: start_node(_config(tmp_path, dest_port, **extra))


def _settled(node: Node, count: int, timeout: float = 180.0) -> list[Job]:
    """The node's jobs once ``count`` of them have finished (delivered, failed or cancelled)."""
    done = {JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in node.store.list(limit=1000) if j.state in done]
        if len(jobs) >= count:
            return jobs
        time.sleep(0.1)
    pytest.fail(f"jobs did not finish: {[(j.state.value, j.reason, j.error) for j in node.store.list()]}")


def test_bad_studies_fail_with_a_named_reason_no_seg_and_the_node_keeps_serving(
    serving, phantom_factory, tmp_path, caplog
):
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        # Longer texts than the default 2,000 characters, so that the hundreds of targets meet their own limit.
        node = serving(pacs.port, instructions={"max_request_chars": 10_000})
        _, files = phantom_factory("CT", seed=2, size=96, slices=32)
        cases = {_spool(node, build(files.series["CT"], tmp_path)): case for case, (build, _) in JOB_CASES.items()}
        with caplog.at_level(logging.WARNING, logger="medsegagent.node.service"):
            jobs = _settled(node, len(cases))
        got = {cases[j.study_uid]: (j.state, j.reason) for j in jobs}
        assert got == {case: (JobState.FAILED, reason) for case, (_, reason) in JOB_CASES.items()}, [
            (cases[j.study_uid], j.error) for j in jobs
        ]
        for job in jobs:
            assert "Traceback" not in job.error and "internal error" not in job.error, job.error
            assert f"job {job.id} (study {job.study_uid}) failed: {job.reason.value}: " in caplog.text
        too_long = next(j.error for j in jobs if cases[j.study_uid] == "100 kB SR request")
        assert "the sr request is unusable: the request has 101,999 characters, more than the 10,000" in too_long
        too_many = next(j.error for j in jobs if cases[j.study_uid] == "SR naming every structure")
        assert "targets, more than the 64 allowed (instructions.max_targets)" in too_many
        assert pacs.segs() == []
        assert echo_ok(node.scp.port, GOOD_CALLER)
        _storescu(files.series["CT"], node.scp.port, called=LIVERSEG)
        good = [j for j in _settled(node, len(cases) + 1) if j.study_uid not in cases]
        assert [(j.state, j.request_source) for j in good] == [(JobState.DELIVERED, "preset")], good
        assert len(pacs.segs()) == 1
    finally:
        pacs.stop()


class _PlainOrthanc:
    """Orthanc (Debian package) with no plugins on free loopback ports: the PACS a SEG is delivered to."""

    def __init__(self, root: Path) -> None:
        self.http_port, self.dicom_port = _free_port(), _free_port()
        config = {"Name": "hostile", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                  "Plugins": []}  # fmt: skip
        root.mkdir(parents=True)
        (root / "orthanc.json").write_text(json.dumps(config))
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)
        with open(root / "orthanc.log", "wb") as log:
            self.proc = subprocess.Popen([tool("Orthanc"), str(root / "orthanc.json")], stdout=log,
                                         stderr=subprocess.STDOUT, env=ENV)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.get("/system").raise_for_status()
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def copies(self, sop_instance_uid: str) -> int:
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        return len(self.client.post("/tools/find", json=query).json())

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=20)


def test_fallback_is_recorded_delivered_jobs_refuse_retry_and_a_redelivered_seg_is_one_instance(
    serving, phantom_factory, tmp_path
):
    orthanc = _PlainOrthanc(tmp_path / "orthanc")
    try:
        node = serving(orthanc.dicom_port, instructions={"on_unusable_request": "fallback"},
                       destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                      "port": orthanc.dicom_port}])  # fmt: skip
        _, files = phantom_factory("CT", seed=2, size=96, slices=32)
        _spool(node, _with_request_sr("liver and spleen " * 6_000)(files.series["CT"], tmp_path))
        (job,) = _settled(node, 1)
        assert (job.state, job.request_source, job.request_text) == (JobState.DELIVERED, "preset", "liver"), job.error
        on_disk = json.loads((Path(job.result_dir) / "report.json").read_text())
        for report in (job.report, on_disk):
            assert report["request"]["fallback"]["source"] == "sr"
            assert "instructions.max_request_chars" in report["request"]["fallback"]["reason"]
        sop = str(pydicom.dcmread(Path(job.result_dir) / "seg.dcm", stop_before_pixels=True).SOPInstanceUID)
        assert orthanc.copies(sop) == 1
        instances = len(orthanc.client.get("/instances").json())

        api = httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", headers={"Authorization": f"Bearer {TOKEN}"})
        for action in ("retry", "cancel"):
            answer = api.post(f"/jobs/{job.id}/{action}")
            assert answer.status_code == 409 and "is delivered" in answer.json()["detail"], answer.text
        assert api.post(f"/jobs/{job.id}/redeliver").json()["state"] == "written"
        deadline = time.monotonic() + 60
        while sum(h["state"] == "delivered" for h in node.store.get(job.id).history) < 2:
            assert time.monotonic() < deadline, node.store.outbox(job.id)
            time.sleep(0.1)
        # At least once, with stable UIDs: the second C-STORE is the same SOP Instance, and Orthanc keeps one.
        assert orthanc.copies(sop) == 1
        assert len(orthanc.client.get("/instances").json()) == instances
        assert api.get(f"/jobs/{job.id}").json()["deliveries"][0]["attempts"] == 1
    finally:
        orthanc.stop()
