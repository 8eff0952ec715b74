"""Pull a study the node does not have: C-MOVE, C-GET and WADO-RS from a real Orthanc.

Orthanc runs the shipped ``orthanc/orthanc.json`` (DICOMweb plugin, the
node in its DicomModalities) with C-MOVE and C-GET allowed to the node and
auto-routing off; the node runs in-process with three sources on that
Orthanc, one per method, and Orthanc as its destination.  Each test owns its
study (fresh UIDs).  Checked for each method: every instance reaches the
spool through the intake (File Meta written by the node), the job goes
``retrieving -> received`` and no second job is made from the arrivals; a
study Orthanc does not hold, a source that is down, and a study with an
instance the node's intake refuses fail the job with their reasons.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from medsegagent.dicom.uids import MEDSEGAGENT_IMPLEMENTATION_UID
from medsegagent.node.api import create_app
from medsegagent.node.config import parse_config
from medsegagent.node.jobs import FailureReason, Job, JobState
from medsegagent.node.service import Node
from tests.orthanc_helpers import OrthancProcess, free_port

pytestmark = pytest.mark.slow

TOKEN = "retrieve-test-token"
#: Orthanc lets the node query and pull (the shipped configuration does not) and routes nothing itself.
ORTHANC_EXTRA = {"DicomModalities": {"medseg": {"AllowFind": True, "AllowMove": True, "AllowGet": True}}}


class Stack:
    """Orthanc and a node that knows it as three sources (move, get, web) and as its destination."""

    def __init__(self, root: Path) -> None:
        self.orthanc = OrthancProcess(root / "orthanc", env={"MEDSEG_ROUTING": "off"}, extra_config=ORTHANC_EXTRA,
                                      plugins=("dicom-web", "python"))  # fmt: skip
        dicom = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.orthanc.dicom_port}
        down = free_port()
        config = {
            "node": {"ae_title": "MEDSEG", "port": 0, "data_dir": str(root / "node"), "quiet_seconds": 0.5,
                     "collection": "demo", "min_free_disk_mb": 1},
            "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
            "destinations": [{"name": "pacs", **dicom}],
            "sources": [
                {"name": "pacs-move", **dicom, "retrieve": "move", "timeout_s": 60},
                {"name": "pacs-get", **dicom, "retrieve": "get", "timeout_s": 60},
                {"name": "pacs-web", "kind": "dicomweb", "url": f"{self.orthanc.url}/dicom-web", "timeout_s": 60},
                {"name": "down-dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": down, "retrieve": "get",
                 "timeout_s": 5},
                {"name": "down-web", "kind": "dicomweb", "url": f"http://127.0.0.1:{down}/dicom-web", "timeout_s": 5},
            ],
            "instruction_sources": ["request"],
            "http": {"enabled": False},
        }  # fmt: skip
        self.node = Node(parse_config(config), poll_seconds=0.1)

    def start(self) -> Stack:
        self.node.start()
        self.orthanc.env["MEDSEG_DICOM_PORT"] = str(self.node.scp.port)
        try:
            self.orthanc.start()
        except BaseException:
            self.node.stop()
            raise
        return self

    def stop(self) -> None:
        self.orthanc.stop()
        self.node.stop()

    def jobs(self, study_uid: str) -> list[Job]:
        return [j for j in self.node.store.list(limit=1000) if j.study_uid == study_uid]

    def wait_job(self, job_id: str, done: Callable[[Job], bool], timeout: float = 120) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.node.store.get(job_id)
            if done(job):
                return job
            time.sleep(0.1)
        pytest.fail(f"job {job_id} is {job.state.value} ({job.error}); log:\n{self.orthanc.log()[-2000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("retrieve")).start()
    yield running
    running.stop()


def study_in_orthanc(stack: Stack, files: list[Path], dest: Path, edit: Callable[[Any], None] | None = None) -> str:
    """A copy of ``files`` with fresh UIDs uploaded to Orthanc (``edit`` changes the last instance); its UID."""
    dest.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if edit is not None and i == len(files) - 1:
            edit(ds)
        ds.save_as(dest / path.name)
    stack.orthanc.upload(sorted(dest.iterdir()))
    return study_uid


def left_retrieving(job: Job) -> bool:
    return job.state is not JobState.RETRIEVING


@pytest.mark.parametrize("source", ["pacs-move", "pacs-get", "pacs-web"])
def test_pull_study_into_the_spool_through_the_intake(stack, phantom_factory, tmp_path, source):
    _, files = phantom_factory("CT", seed=3, size=64, slices=12)
    study_uid = study_in_orthanc(stack, files.series["CT"], tmp_path / "study")
    assert not (stack.node.spool_dir / study_uid).exists()
    job = stack.node.submit(study_uid, "spleen", source)
    assert (job.state, job.retrieve_from) == (JobState.RETRIEVING, source)
    job = stack.wait_job(job.id, left_retrieving)
    assert job.error is None and [h["state"] for h in job.history][:2] == ["retrieving", "received"]
    spooled = sorted((stack.node.spool_dir / study_uid).rglob("*.dcm"))
    assert len(spooled) == len(files.series["CT"])
    meta = pydicom.dcmread(spooled[0], stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == MEDSEGAGENT_IMPLEMENTATION_UID  # written by the node's intake
    # The arrivals belong to the job: no second job is made once the study is quiet.
    time.sleep(stack.node.config.node.quiet_seconds + 0.5)
    assert [j.id for j in stack.jobs(study_uid)] == [job.id]


def test_pulled_study_is_segmented_and_its_seg_stored_back(stack, phantom_factory, tmp_path):
    _, files = phantom_factory("CT", seed=3, size=64, slices=12)
    study_uid = study_in_orthanc(stack, files.series["CT"], tmp_path / "study")
    job = stack.node.submit(study_uid, "spleen", "pacs-move")
    job = stack.wait_job(job.id, lambda j: j.state in (JobState.DELIVERED, JobState.FAILED), timeout=240)
    assert job.state is JobState.DELIVERED, job.error
    study_id = stack.orthanc.study_id(study_uid)
    [seg] = stack.orthanc.series(study_id, "SEG")
    assert len(seg["Instances"]) == 1


@pytest.mark.parametrize("source", ["pacs-move", "pacs-get", "pacs-web"])
def test_study_the_source_does_not_hold_fails_the_job(stack, source):
    study_uid = generate_uid()
    job = stack.wait_job(stack.node.submit(study_uid, "spleen", source).id, left_retrieving)
    assert (job.state, job.reason) == (JobState.FAILED, FailureReason.STUDY_NOT_AT_SOURCE)
    assert study_uid in job.error and source in job.error
    assert not (stack.node.spool_dir / study_uid).exists()


@pytest.mark.parametrize("source", ["down-dicom", "down-web"])
def test_source_that_is_down_fails_the_job_and_a_retry_pulls_again(stack, source):
    job = stack.wait_job(stack.node.submit(generate_uid(), "spleen", source).id, left_retrieving, timeout=60)
    assert (job.state, job.reason) == (JobState.FAILED, FailureReason.SOURCE_UNREACHABLE)
    assert source in job.error and ("did not answer" in job.error), job.error
    assert stack.node.store.retry(job.id).state is JobState.RETRIEVING


@pytest.mark.parametrize("source", ["pacs-move", "pacs-get", "pacs-web"])
def test_instance_refused_by_the_intake_makes_a_partial_retrieve(stack, phantom_factory, tmp_path, source):
    _, files = phantom_factory("CT", seed=3, size=64, slices=12)

    def truncate(ds) -> None:  # the intake refuses native pixel data shorter than Rows x Columns claims
        ds.Rows = ds.Rows * 2

    study_uid = study_in_orthanc(stack, files.series["CT"], tmp_path / "study", truncate)
    job = stack.wait_job(stack.node.submit(study_uid, "spleen", source).id, left_retrieving)
    assert (job.state, job.reason) == (JobState.FAILED, FailureReason.RETRIEVE_INCOMPLETE), job.error
    assert "of 12 instance(s)" in job.error, job.error


def test_post_jobs_with_source(stack):
    client = TestClient(create_app(stack.node, TOKEN))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"study_uid": generate_uid(), "request": "spleen", "source": "nowhere"}
    answer = client.post("/jobs", json=body, headers=headers)
    assert answer.status_code == 422 and "no source named 'nowhere'" in answer.json()["detail"]
    answer = client.post("/jobs", json={**body, "source": "pacs-web"}, headers=headers)
    assert answer.status_code == 202
    assert (answer.json()["state"], answer.json()["retrieve_from"]) == ("retrieving", "pacs-web")
    stack.wait_job(answer.json()["id"], left_retrieving)
