"""The job store's state machine, failure reasons, request limits and worklist patient matching.

Fast tests on a real SQLite store and the real HTTP API (FastAPI's test client);
the end-to-end cases (bad studies through a running node) are in ``test_hostile.py``.
"""

from __future__ import annotations

import json
import sqlite3
import types
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from medsegagent.dicom.series import SeriesProblem
from medsegagent.node.api import create_app
from medsegagent.node.config import ConfigError, InstructionSource, UnusableRequest, parse_config
from medsegagent.node.instructions import Problem, request_problem, resolve_instruction, same_patient, sr_request
from medsegagent.node.jobs import TRANSITIONS, FailureReason, IllegalTransition, Job, JobState, JobStore

STUDY = "1.2.826.0.1.3680043.8.498.1"
TOKEN = "jobs-test-token"


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite")


def _claimed(store: JobStore) -> Job:
    """A new job, taken by the processor (``planned``)."""
    job = store.create_job(STUDY)
    assert store.claim_next().id == job.id
    return store.get(job.id)


def _written(store: JobStore, tmp_path: Path, destinations: tuple[str, ...] = ("pacs",)) -> str:
    """A job run to ``written``, its one result (``tmp_path/seg.dcm``) queued for every destination."""
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"result")
    job = _claimed(store)
    store.transition(job.id, JobState.RUNNING)
    store.enqueue_results(job.id, {d: [str(seg)] for d in destinations}, {"outputs": [seg.name]})
    return job.id


def _delivered(store: JobStore, tmp_path: Path, destinations: tuple[str, ...] = ("pacs",)) -> str:
    """A job taken through the whole happy path, its one result sent to every destination."""
    job_id = _written(store, tmp_path, destinations)
    for item in store.outbox(job_id):
        store.delivery_succeeded(item.id)
    assert store.get(job_id).state is JobState.DELIVERED
    return job_id


# -- the state machine --------------------------------------------------------------------------------


def test_transition_table_reaches_every_state_and_only_redeliver_leaves_delivered():
    reachable = {JobState.RECEIVED}
    for _ in JobState:
        reachable |= {to for frm, to in TRANSITIONS if frm in reachable}
    assert reachable == set(JobState)
    assert {to for frm, to in TRANSITIONS if frm is JobState.DELIVERED} == {JobState.WRITTEN}
    # Nothing is delivered without being written first, and a finished job never goes back to running.
    assert {frm for frm, to in TRANSITIONS if to is JobState.DELIVERED} <= {JobState.RUNNING, JobState.WRITTEN}
    finished = {JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED}
    assert not {(frm, to) for frm, to in TRANSITIONS if frm in finished and to in (JobState.PLANNED, JobState.RUNNING)}


def test_illegal_transition_raises_and_changes_nothing(store):
    job = store.create_job(STUDY)
    with pytest.raises(IllegalTransition) as err:
        store.transition(job.id, JobState.DELIVERED, error="x")
    assert (err.value.current, err.value.wanted) == (JobState.RECEIVED, JobState.DELIVERED)
    after = store.get(job.id)
    assert (after.state, after.error, after.history) == (JobState.RECEIVED, None, job.history)


def test_failure_is_stored_with_its_reason_and_cleared_by_retry(store):
    job = _claimed(store)
    failed = store.fail(job.id, FailureReason.IMPLAUSIBLE_GEOMETRY, "Pixel Spacing [1e+300, 1e+300] mm is absurd")
    assert failed.state is JobState.FAILED and failed.reason is FailureReason.IMPLAUSIBLE_GEOMETRY
    assert failed.to_json()["reason"] == "implausible_geometry"
    assert failed.history[-1]["reason"] == "implausible_geometry"
    with pytest.raises(ValueError, match="FailureReason"):
        store.transition(_claimed(store).id, JobState.FAILED, error="no reason")
    again = store.retry(job.id)
    assert (again.state, again.reason, again.error) == (JobState.RECEIVED, None, None)


def test_every_study_problem_is_a_failure_reason():
    assert {FailureReason.of(p).value for p in SeriesProblem} == {p.value for p in SeriesProblem}


def test_retry_and_cancel_of_a_delivered_job_are_refused(store, tmp_path):
    job_id = _delivered(store, tmp_path)
    with pytest.raises(IllegalTransition, match="redeliver"):
        store.retry(job_id)
    with pytest.raises(IllegalTransition, match="only an unfinished job is cancelled"):
        store.cancel(job_id)
    job = store.get(job_id)
    assert job.state is JobState.DELIVERED and [i.state for i in store.outbox(job_id)] == ["sent"]


def test_redeliver_queues_the_same_files_again(store, tmp_path):
    job_id = _delivered(store, tmp_path, ("pacs", "archive"))
    before = store.outbox(job_id)
    job = store.redeliver(job_id)
    assert job.state is JobState.WRITTEN
    after = store.outbox(job_id)
    assert [(i.id, i.path, i.state, i.attempts) for i in after] == [(i.id, i.path, "pending", 0) for i in before]
    for item in after:
        store.delivery_succeeded(item.id)
    assert store.get(job_id).state is JobState.DELIVERED
    with pytest.raises(IllegalTransition, match="only a delivered job"):
        store.redeliver(store.create_job(STUDY).id)
    Path(before[0].path).unlink()
    with pytest.raises(FileNotFoundError, match=r"seg\.dcm"):
        store.redeliver(job_id)
    assert store.get(job_id).state is JobState.DELIVERED


def test_retry_after_a_failed_delivery_sends_again_without_running_again(store, tmp_path):
    job_id = _written(store, tmp_path)
    (item,) = store.outbox(job_id)
    store.delivery_failed(item.id, "refused by pacs: C-STORE status 0xC000", None)
    failed = store.get(job_id)
    assert failed.reason is FailureReason.DELIVERY_FAILED and "0xC000" in failed.error
    assert store.retry(job_id).state is JobState.WRITTEN
    assert [(i.state, i.attempts) for i in store.outbox(job_id)] == [("pending", 0)]


def test_a_job_run_again_queues_its_results_afresh(store, tmp_path):
    job_id = _written(store, tmp_path)
    store.cancel(job_id)  # the pending delivery is dropped
    assert [i.state for i in store.outbox(job_id)] == ["failed"]
    store.retry(job_id)
    store.claim_next()
    store.transition(job_id, JobState.RUNNING)
    assert store.enqueue_results(job_id, {"pacs": [str(tmp_path / "seg.dcm")]}, {}).state is JobState.WRITTEN
    assert [i.state for i in store.outbox(job_id)] == ["pending"]


def test_jobs_are_counted_per_state_by_the_database(store):
    for _ in range(3):
        store.create_job(STUDY)
    store.claim_next()
    counts = store.count_by_state()
    assert counts.keys() == set(JobState) and sum(counts.values()) == 3
    assert (counts[JobState.RECEIVED], counts[JobState.PLANNED], counts[JobState.DELIVERED]) == (2, 1, 0)


def test_resume_puts_back_only_interrupted_jobs(store):
    waiting = store.create_job(STUDY)
    running = store.create_job(STUDY)
    store.claim_next()  # the older one
    store.transition(waiting.id, JobState.RUNNING)
    assert store.resume_unfinished() == [waiting.id]
    assert store.get(running.id).history == running.history
    assert store.get(waiting.id).state is JobState.RECEIVED


def test_a_database_from_before_failure_reasons_gains_the_column(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE jobs (id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, called_ae TEXT, calling_ae TEXT, explicit_request TEXT,
        request_text TEXT, request_source TEXT, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, plan_json TEXT,
        report_json TEXT, result_dir TEXT, history_json TEXT NOT NULL DEFAULT '[]')""")
    db.execute("INSERT INTO jobs(id, study_uid, state, created_at, updated_at, error) "
               "VALUES ('old', '1.2.3', 'failed', 0, 0, 'internal error: boom')")  # fmt: skip
    db.commit()
    db.close()
    store = JobStore(path)
    old = store.get("old")
    assert (old.state, old.reason) == (JobState.FAILED, None)
    assert store.fail(_claimed(store).id, FailureReason.NO_REQUEST, "x").reason is FailureReason.NO_REQUEST


# -- the HTTP API ------------------------------------------------------------------------------------------


def test_api_answers_409_with_the_reason_for_a_delivered_job(store, tmp_path):
    job_id = _delivered(store, tmp_path)
    node = types.SimpleNamespace(store=store, wake=lambda: None, config=parse_config({}))
    client = TestClient(create_app(node, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    for action in ("retry", "cancel"):
        answer = client.post(f"/jobs/{job_id}/{action}")
        assert answer.status_code == 409 and f"job {job_id} is delivered" in answer.json()["detail"], answer.text
    assert client.get(f"/jobs/{job_id}").json()["state"] == "delivered"
    answer = client.post(f"/jobs/{job_id}/redeliver")
    assert answer.status_code == 200 and answer.json()["state"] == "written"
    assert client.get(f"/jobs/{job_id}").json()["deliveries"][0]["state"] == "pending"
    assert client.post(f"/jobs/{job_id}/redeliver").status_code == 409
    failed = store.fail(_claimed(store).id, FailureReason.NON_FINITE_GEOMETRY, "Image Position holds NaN")
    detail = client.get(f"/jobs/{failed.id}").json()
    assert (detail["state"], detail["reason"], detail["error"]) == ("failed", "non_finite_geometry", failed.error)


def test_retry_with_a_new_request_plans_the_job_from_it(store, tmp_path):
    node = types.SimpleNamespace(store=store, wake=lambda: None, config=parse_config({}))
    client = TestClient(create_app(node, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    job = _claimed(store)
    store.transition(job.id, JobState.RUNNING, plan={"targets": []})
    store.fail(job.id, FailureReason.NOTHING_MATCHED, "'ligament' selects nothing")
    pending = _written(store, tmp_path)
    delivery = _written(store, tmp_path)
    (item,) = store.outbox(delivery)
    store.delivery_failed(item.id, "refused", retry_in=None)
    answer = client.post(f"/jobs/{job.id}/retry", json={"request": "liver and spleen"})
    assert answer.status_code == 200 and answer.json()["state"] == "received", answer.text
    again = store.get(job.id)
    assert (again.explicit_request, again.plan) == ("liver and spleen", None)
    # a failed delivery retried with a new request runs the whole job again, not only the delivery
    assert store.get(delivery).state is JobState.FAILED
    assert store.retry(delivery, "spleen").state is JobState.RECEIVED
    # a written job with deliveries pending has nothing to re-plan
    answer = client.post(f"/jobs/{pending}/retry", json={"request": "spleen"})
    assert answer.status_code == 409 and "is written" in answer.json()["detail"]
    assert client.post(f"/jobs/{job.id}/retry", json={"request": ""}).status_code == 422


# -- request limits and sources ----------------------------------------------------------------------------


def _config(**instructions) -> object:
    return parse_config({"presets": {"LIVERSEG": "liver"}, "instruction_sources": ["sr", "preset"],
                         "instructions": instructions})  # fmt: skip


def test_request_limits():
    limits = _config(max_request_chars=100, max_targets=3).instructions
    assert request_problem("liver and both kidneys", limits) is None
    assert "empty" in request_problem("   ", limits)
    assert "101 characters" in request_problem("x" * 101, limits)
    assert "4 targets" in request_problem("liver, spleen, pancreas, aorta", limits)
    with pytest.raises(ConfigError, match="on_unusable_request"):
        parse_config({"instructions": {"on_unusable_request": "guess"}})
    assert parse_config({}).instructions.on_unusable_request is UnusableRequest.FAIL


def _sr_study(folder: Path, text: str, title: tuple[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", pydicom.uid.generate_uid()
    if title is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = title[0], "DCM", title[1]
        ds.ConceptNameCodeSequence = [code]
    item = Dataset()
    item.ValueType, item.TextValue = "TEXT", text
    ds.ContentSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(folder / "sr.dcm", enforce_file_format=True)
    return folder


def test_a_result_sr_in_the_study_is_not_a_request(tmp_path):
    """The node's own volume report (TID 1500) or a dose report sent back with the study asks for nothing."""
    report = _sr_study(tmp_path / "report", "liver volume 1500 ml", ("126000", "Imaging Measurement Report"))
    dose = _sr_study(tmp_path / "dose", "scan aborted", ("113701", "X-Ray Radiation Dose Report"))
    assert sr_request(report) is None and sr_request(dose) is None
    asked = _sr_study(tmp_path / "asked", "liver", ("121144", "Document Title"))
    assert sr_request(asked) == "liver"


def _always_usable(text: str) -> Problem | None:
    return None


def test_an_unusable_sr_request_fails_the_job_or_falls_back_when_configured(tmp_path):
    study = _sr_study(tmp_path / "study", "liver, " * 20_000)
    refused = resolve_instruction(study, _config(), explicit=None, called_ae="LIVERSEG", usable=_always_usable)
    assert refused.text is None and refused.refused.source is InstructionSource.SR
    problem = refused.failure()
    assert problem.reason is FailureReason.REQUEST_UNUSABLE and "139,999 characters" in problem.detail
    fallback = resolve_instruction(study, _config(on_unusable_request="fallback"), explicit=None,
                                   called_ae="LIVERSEG", usable=_always_usable)  # fmt: skip
    assert (fallback.text, fallback.source) == ("liver", InstructionSource.PRESET)
    recorded = fallback.fallback.to_json()
    assert recorded["source"] == "sr" and "max_request_chars" in recorded["reason"] and len(recorded["text"]) < 210


def test_a_blank_sr_request_is_unusable_and_no_source_is_no_request(tmp_path):
    blank = _sr_study(tmp_path / "blank", "   ")
    assert sr_request(blank) == ""
    result = resolve_instruction(blank, _config(), explicit=None, called_ae="LIVERSEG", usable=_always_usable)
    assert result.failure() == Problem(FailureReason.REQUEST_UNUSABLE, "the sr request is unusable: "
                                       "the request text is empty")  # fmt: skip
    nothing = resolve_instruction(tmp_path / "none", _config(), explicit=None, called_ae="OTHER", usable=_always_usable)
    assert nothing.failure() == Problem(FailureReason.NO_REQUEST, "no usable request (sr: no text; preset: no text)")
    nothing_matched = Problem(FailureReason.NOTHING_MATCHED, "selects nothing")
    unmatched = resolve_instruction(tmp_path / "none", _config(), explicit=None, called_ae="LIVERSEG",
                                    usable=lambda text: nothing_matched)  # fmt: skip
    assert unmatched.failure().reason is FailureReason.NOTHING_MATCHED
    assert json.dumps([a.to_json() for a in unmatched.tried])  # the report's form is JSON


def _patient(pid: str, name: str | None) -> Dataset:
    ds = Dataset()
    ds.PatientID = pid
    if name is not None:
        ds.PatientName = name
    return ds


def test_a_worklist_item_must_be_for_the_studys_patient():
    study = _patient("P1", "Doe^Jane")
    assert same_patient(study, _patient("P1", "DOE^JANE^^"))
    assert same_patient(study, _patient("P1", None))  # a name on one side only is not compared
    assert not same_patient(study, _patient("P2", "Doe^Jane"))
    assert not same_patient(study, _patient("P1", "Roe^Richard"))
    assert not same_patient(_patient("", None), _patient("P1", None))


def test_the_documented_state_diagram_is_the_table_in_code():
    text = (Path(__file__).resolve().parents[1] / "docs" / "node.md").read_text()
    diagram = text.split("```mermaid\nstateDiagram-v2\n", 1)[1].split("```", 1)[0]
    drawn = set()
    for line in diagram.splitlines():
        frm, to = (part.split(":")[0].strip() for part in line.split("-->"))
        if frm != "[*]":
            drawn.add((JobState(frm), JobState(to)))
    assert drawn == set(TRANSITIONS)
