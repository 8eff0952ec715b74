"""The node as a PACS administrator runs it, driven by real DCMTK peers.

A study sent with DCMTK ``storescu`` must come back as a SEG at a DCMTK
``storescp`` destination, whichever instruction source carries the request;
a destination that is down gets the SEG when it returns; bad configuration
is refused with clear errors.  Models are the shipped demo bundles (real
inference on the CPU).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsegagent.node.config import ConfigError, parse_config
from medsegagent.node.jobs import FailureReason, JobState
from medsegagent.node.service import Node
from tests.conftest import dciodvfy_errors

pytestmark = pytest.mark.slow

ENV = {**os.environ, "TCP_NODELAY": "1"}
TOKEN = "test-token-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on port {port}")


class StoreSCP:
    """DCMTK storescp as the receiving PACS."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        # -uf: unique file names, so a duplicate delivery would show up as a second file.
        self.proc = subprocess.Popen(
            ["/usr/bin/storescp", "-aet", "PACS", "-uf", "-od", str(self.folder), str(self.port)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def segs(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.name.startswith("SG"))


def _config(tmp_path: Path, dest_port: int, **extra) -> dict:
    config = {
        "node": {"ae_title": "MEDSEG", "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "var"),
                 "quiet_seconds": 0.5, "collection": "demo", "min_free_disk_mb": 1},
        "peers": [{"ae_title": "MODALITY", "host": "127.0.0.1"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest_port}],
        "presets": {"LIVERSEG": "liver"},
        "instruction_sources": ["request", "sr", "tags", "preset"],
        "http": {"host": "127.0.0.1", "port": 0, "token_env": "MEDSEG_TEST_TOKEN"},
        "delivery": {"retry_initial_seconds": 0.5, "retry_max_seconds": 1.0},
    }  # fmt: skip
    for key, value in extra.items():
        config[key] = value
    return config


@pytest.fixture
def node_factory(tmp_path, monkeypatch, start_node) -> Callable[..., Node]:
    """``make(dest_port, **config sections) -> Node``: a running node (demo models), stopped after the test."""
    monkeypatch.setenv("MEDSEG_TEST_TOKEN", TOKEN)
    return lambda dest_port, **extra: start_node(_config(tmp_path, dest_port, **extra))


def _storescu(files: list[Path], port: int, called: str = "MEDSEG", calling: str = "MODALITY") -> None:
    result = subprocess.run(
        ["/usr/bin/storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def _wait_state(node: Node, states: set[JobState], timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.store.list()
        if jobs and all(j.state in states for j in jobs):
            return jobs
        time.sleep(0.1)
    pytest.fail(f"jobs did not reach {states}: {[(j.id, j.state, j.error) for j in node.store.list()]}")


def _copy_study(files: list[Path], dest: Path, **tags) -> list[Path]:
    dest.mkdir(parents=True)
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(dest / path.name)
        out.append(dest / path.name)
    return out


def _request_sr(reference: Path, text: str, out: Path) -> Path:
    """A Basic Text SR in the study of ``reference`` carrying the request."""
    src = pydicom.dcmread(reference, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):  # fmt: skip
        setattr(ds, key, src.get(key, ""))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "121144", "DCM", "Document Title"
    ds.ConceptNameCodeSequence = [title]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121106", "DCM", "Comment"
    item.ConceptNameCodeSequence = [name]
    item.TextValue = text
    ds.ContentSequence = [item]
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("source", ["preset", "tags", "sr", "request"])
def test_study_comes_back_as_seg_for_each_instruction_source(node_factory, phantom_factory, tmp_path, source):
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        node = node_factory(pacs.port)
        _, files = phantom_factory("CT", seed=2, size=96, slices=32)
        study = files.series["CT"]
        called = "MEDSEG"
        if source == "preset":
            called = "LIVERSEG"
        elif source == "tags":
            study = _copy_study(study, tmp_path / "tagged", RequestedProcedureDescription="CT ABD - SPLEEN VOLUMETRY")
        elif source == "sr":
            study = [*study, _request_sr(study[0], "please segment the spleen", tmp_path / "request_sr.dcm")]
        if source == "request":
            # No automatic source knows what to do: the job fails with reasons, then the API asks explicitly.
            _storescu(study, node.scp.port)
            failed = _wait_state(node, {JobState.FAILED})
            assert "no usable request" in failed[0].error
            client = httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}")
            assert client.get("/jobs").status_code == 401
            headers = {"Authorization": f"Bearer {TOKEN}"}
            study_uid = failed[0].study_uid
            response = client.post("/jobs", json={"study_uid": study_uid, "request": "spleen"}, headers=headers)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
        else:
            _storescu(study, node.scp.port, called=called)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not pacs.segs():
            time.sleep(0.2)
        segs = pacs.segs()
        assert len(segs) == 1, [(j.state, j.error) for j in node.store.list()]
        assert dciodvfy_errors(segs[0]) == []
        seg = pydicom.dcmread(segs[0])
        expected = "Liver" if source == "preset" else "Spleen"
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [expected]
        assert seg.StudyInstanceUID == pydicom.dcmread(study[0]).StudyInstanceUID
        assert seg.ContentDescription.startswith(source)
        delivered = _wait_state(node, {JobState.DELIVERED, JobState.FAILED})
        done = [j for j in delivered if j.state is JobState.DELIVERED]
        assert len(done) == 1 and done[0].request_source == source
        if source == "request":
            detail = client.get(f"/jobs/{job_id}", headers=headers).json()
            assert detail["state"] == "delivered"
            assert detail["deliveries"][0]["state"] == "sent"
            assert client.get(f"/jobs/{job_id}/preview", headers=headers).headers["content-type"] == "image/png"
            assert client.get("/health").json()["status"] == "ok"
            assert "/jobs" in client.get("/openapi.json").json()["paths"]
    finally:
        pacs.stop()


def test_destination_down_gets_the_seg_when_it_returns(node_factory, phantom_factory, tmp_path):
    port = _free_port()
    node = node_factory(port)
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    _storescu(files.series["CT"], node.scp.port, called="LIVERSEG")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        items = [i for j in node.store.list() for i in node.store.outbox(j.id)]
        if items and items[0].attempts >= 2:
            break
        time.sleep(0.2)
    assert items and items[0].state == "pending" and items[0].last_error
    pacs = StoreSCP(tmp_path / "pacs", port).start()
    try:
        _wait_state(node, {JobState.DELIVERED}, timeout=30)
        assert len(pacs.segs()) == 1
    finally:
        pacs.stop()


def test_unknown_caller_is_rejected(node_factory, phantom_factory):
    node = node_factory(_free_port())
    _, files = phantom_factory("CT")
    result = subprocess.run(
        ["/usr/bin/storescu", "-aet", "INTRUDER", "-aec", "MEDSEG", "127.0.0.1", str(node.scp.port),
         str(files.series["CT"][0])],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    spool = Path(node.config.node.data_dir) / "spool"
    assert not [path for path in spool.rglob("*") if path.is_file()]  # nothing, not even an incoming file


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "node": {"ae_title": "WAY_TOO_LONG_AE_TITLE", "port": 70000, "colour": 1},
                "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": "x"}],
                "instruction_sources": ["request", "telepathy"],
                "bogus": 1,
            }
        )
    message = str(err.value)
    for fragment in ("node.ae_title", "node.port", "node.colour: unknown key", "destinations[0].port",
                     "instruction_sources[1]", "bogus: unknown section"):  # fmt: skip
        assert fragment in message


def test_serve_refuses_without_token(tmp_path, monkeypatch):
    from medsegagent.node.cli import main

    monkeypatch.delenv("MEDSEG_TOKEN", raising=False)
    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{port: 0, data_dir: {tmp_path / 'var'}}}\nhttp: {{port: 0}}\n")
    assert main(["serve", "--config", str(config)]) == 2
    shutil.rmtree(tmp_path / "var", ignore_errors=True)


def _worklist_item(reference: Path, folder: Path, procedure: str) -> None:
    """A worklist file for ``wlmscpfs`` scheduling the study of ``reference``."""
    src = pydicom.dcmread(reference, stop_before_pixels=True)
    ds = Dataset()
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber"):
        setattr(ds, key, src.get(key, ""))
    ds.RequestedProcedureID = "RP1"
    ds.RequestedProcedureDescription = procedure
    ds.ReasonForTheRequestedProcedure = "volumetry"
    ds.ReferringPhysicianName = "REFERRER"
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = "CT1"
    step.ScheduledProcedureStepStartDate = "20240315"
    step.ScheduledProcedureStepStartTime = "101500"
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = procedure
    step.ScheduledProcedureStepID = "SPS1"
    ds.ScheduledProcedureStepSequence = [step]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "item1.wl", enforce_file_format=False)


def test_worklist_source_with_dcmtk_wlmscpfs(node_factory, phantom_factory, tmp_path):
    """The request comes from a C-FIND to DCMTK's worklist SCP by Accession Number."""
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study = files.series["CT"]
    wl_dir = tmp_path / "worklists"
    _worklist_item(study[0], wl_dir / "WLM", "CT ABD W CON - SPLEEN VOLUMETRY")
    (wl_dir / "WLM" / "lockfile").write_text("")
    wl_port = _free_port()
    wlm = subprocess.Popen(["/usr/bin/wlmscpfs", "-dfp", str(wl_dir), str(wl_port)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        _wait_port(wl_port)
        node = node_factory(
            pacs.port,
            worklist={"ae_title": "WLM", "host": "127.0.0.1", "port": wl_port},
            instruction_sources=["request", "worklist", "preset"],
        )
        _storescu(study, node.scp.port)
        jobs = _wait_state(node, {JobState.DELIVERED, JobState.FAILED})
        assert [(j.state, j.request_source, j.request_text) for j in jobs] == [
            (JobState.DELIVERED, "worklist", "CT ABD W CON - SPLEEN VOLUMETRY")
        ], jobs[0].error
        seg = pydicom.dcmread(pacs.segs()[0])
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    finally:
        pacs.stop()
        wlm.terminate()
        wlm.wait(timeout=10)


def test_destinations_choose_sr_and_secondary_capture(node_factory, phantom_factory, tmp_path):
    """Per destination: one PACS gets the SEG only, the other also the volume SR and the preview SC."""
    plain, full = StoreSCP(tmp_path / "plain").start(), StoreSCP(tmp_path / "full").start()
    try:
        node = node_factory(
            plain.port,
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": plain.port},
                {"name": "archive", "ae_title": "PACS", "host": "127.0.0.1", "port": full.port,
                 "volume_report": True, "preview_sc": True},
            ],
        )  # fmt: skip
        _, files = phantom_factory("CT", seed=2, size=96, slices=32)
        _storescu(files.series["CT"], node.scp.port, called="LIVERSEG")
        _wait_state(node, {JobState.DELIVERED})
        modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in full.folder.iterdir())
        assert modalities == ["OT", "SEG", "SR"]
        assert [pydicom.dcmread(p, stop_before_pixels=True).Modality for p in plain.folder.iterdir()] == ["SEG"]
        for path in full.folder.iterdir():
            assert dciodvfy_errors(path) == []
    finally:
        plain.stop()
        full.stop()


def test_a_job_is_planned_once_and_a_resumed_job_runs_its_stored_plan(phantom_factory, tmp_path, monkeypatch):
    """The processor plans the request once and stores the plan; after a crash the stored plan runs unplanned."""
    monkeypatch.setenv("MEDSEG_TEST_TOKEN", TOKEN)
    node = Node(parse_config(_config(tmp_path, _free_port())))  # not started: the test drives the processor
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study_uid = str(pydicom.dcmread(files.series["CT"][0]).StudyInstanceUID)
    shutil.copytree(files.series["CT"][0].parent, node.spool_dir / study_uid)
    planned: list[str] = []
    plan = node.router.plan
    monkeypatch.setattr(node.router, "plan", lambda text, **kw: planned.append(text) or plan(text, **kw))

    first = node.store.create_job(study_uid, explicit_request="spleen")
    done = node.process(node.store.claim_next())
    assert (done.state, done.error) == (JobState.WRITTEN, None)
    assert planned == ["spleen"]  # once: not again to run it
    assert done.plan == done.report["plan"] and done.plan["selection"]

    # A crash while it ran: the job is resumed from "received" with its plan, which runs without planning.
    resumed = node.store.create_job(study_uid, explicit_request="spleen")
    node.store.update(resumed.id, request_text="spleen", request_source="request", plan=done.plan)
    monkeypatch.setattr(node.router, "plan", lambda *a, **kw: pytest.fail("planned again"))
    again = node.process(node.store.claim_next())
    assert (again.state, again.report["plan"]) == (JobState.WRITTEN, done.plan)
    assert [s["label"] for s in again.report["segments"]] == ["spleen"]

    # A retried job is planned afresh (against the models installed now): its stored plan is dropped.
    failed = node.store.fail(first.id, FailureReason.INTERNAL_ERROR, "test")
    assert failed.plan is not None and node.store.retry(first.id).plan is None
    node.executor.close()
