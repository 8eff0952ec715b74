"""The HTTP API's OpenAPI description: a real schema for every route, and answers that match it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsegagent.node.api import create_app
from medsegagent.node.config import parse_config
from medsegagent.node.jobs import FailureReason, JobState
from medsegagent.node.service import Node

TOKEN = "api-test-token"
STUDY = "1.2.826.0.1.3680043.8.498.17"
SERIES = "1.2.826.0.1.3680043.8.498.17.1"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    web_source = {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:9/dicom-web"}  # never reached
    config = parse_config({"node": {"data_dir": str(tmp_path / "var"), "port": 0}, "http": {"enabled": False},
                           "sources": [web_source]})  # fmt: skip
    node = Node(config)
    try:
        yield node
    finally:
        node.executor.close()
        node.store.close()


@pytest.fixture
def client(node: Node) -> TestClient:
    return TestClient(create_app(node, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


def _answer_schema(openapi: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    return openapi["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]


def _assert_matches(openapi: dict[str, Any], response: httpx.Response, path: str, method: str = "get") -> Any:
    """The response's JSON, checked against the schema /openapi.json gives for its route and status."""
    schema = _answer_schema(openapi, path, method, response.status_code)
    validator = jsonschema.Draft202012Validator({**schema, "components": openapi["components"]})
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(response.json())]
    assert not problems, f"{method.upper()} {path} {response.status_code}: {problems}"
    return response.json()


def _spool_study(node: Node) -> None:
    """One CT instance in the spool, as intake leaves it (``<study>/<series>/<instance>.dcm``)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, STUDY, SERIES
    ds.StudyDate, ds.StudyDescription, ds.Modality, ds.SeriesDescription, ds.SeriesNumber = (
        "20261203", "ABDOMEN", "CT", "venous", 2)  # fmt: skip
    folder = node.spool_dir / STUDY / SERIES
    folder.mkdir(parents=True)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def test_openapi_names_a_schema_for_every_answer(client: TestClient):
    openapi = client.get("/openapi.json").json()
    expected = {
        ("/health", "get"): {"$ref": "#/components/schemas/Health"},
        ("/jobs", "get"): {"type": "array", "items": {"$ref": "#/components/schemas/JobInfo"}},
        ("/jobs", "post"): {"$ref": "#/components/schemas/JobInfo"},
        ("/jobs/{job_id}", "get"): {"$ref": "#/components/schemas/JobDetail"},
        ("/jobs/{job_id}/retry", "post"): {"$ref": "#/components/schemas/JobInfo"},
        ("/jobs/{job_id}/redeliver", "post"): {"$ref": "#/components/schemas/JobInfo"},
        ("/jobs/{job_id}/cancel", "post"): {"$ref": "#/components/schemas/JobInfo"},
        ("/jobs/{job_id}/volumes", "get"): {"$ref": "#/components/schemas/VolumeReport"},
        ("/studies", "get"): {"type": "array", "items": {"$ref": "#/components/schemas/StudySummary"}},
        ("/plan", "post"): {"$ref": "#/components/schemas/PlanCheck"},
    }
    for (path, method), schema in expected.items():
        status = 202 if (path, method) == ("/jobs", "post") else 200
        answer = _answer_schema(openapi, path, method, status)
        assert {key: answer[key] for key in schema} == schema, (path, method)
        if path != "/health":  # every other route needs the token
            assert _answer_schema(openapi, path, method, 401) == {"$ref": "#/components/schemas/Problem"}
    preview = openapi["paths"]["/jobs/{job_id}/preview"]["get"]["responses"]
    assert list(preview["200"]["content"]) == ["image/png"] and "404" in preview
    job = openapi["components"]["schemas"]["JobDetail"]
    assert {"state", "request", "reason", "history", "deliveries", "plan"} <= set(job["properties"])
    assert set(openapi["components"]["schemas"]["JobState"]["enum"]) == {s.value for s in JobState}
    assert set(openapi["components"]["schemas"]["FailureReason"]["enum"]) == {r.value for r in FailureReason}
    assert set(openapi["components"]["schemas"]["DeliveryState"]["enum"]) == {"pending", "sent", "failed"}
    assert _answer_schema(openapi, "/jobs/{job_id}/volumes", "get", 409) == {"$ref": "#/components/schemas/Problem"}


def test_answers_match_their_schemas(node: Node, client: TestClient, tmp_path: Path):
    openapi = client.get("/openapi.json").json()
    _spool_study(node)
    [study] = _assert_matches(openapi, client.get("/studies"), "/studies")
    assert (study["study_uid"], study["modalities"], study["series"][0]["number"]) == (STUDY, ["CT"], 2)

    created = client.post("/jobs", json={"study_uid": STUDY, "request": "liver"})
    job = _assert_matches(openapi, created, "/jobs", "post")
    assert (created.status_code, job["state"], job["request"]) == (202, "received", {"text": None, "source": None})
    pulled = _assert_matches(openapi, client.post("/jobs", json={"study_uid": "1.2.3", "request": "liver",
                                                                 "source": "web"}), "/jobs", "post")  # fmt: skip
    assert (pulled["state"], pulled["retrieve_from"]) == ("retrieving", "web")

    # A job taken to ``written``, its SEG waiting in the outbox; another one failed.
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"result")
    assert node.store.claim_next().id == job["id"]
    node.store.transition(job["id"], JobState.RUNNING)
    node.store.enqueue_results(job["id"], {"pacs": [str(seg)]}, {"outputs": ["seg.dcm"]})
    node.store.create_job(STUDY)
    failed = node.store.fail(node.store.claim_next().id, FailureReason.NO_REQUEST, "no instruction source")

    detail = _assert_matches(openapi, client.get(f"/jobs/{job['id']}"), "/jobs/{job_id}")
    assert [h["state"] for h in detail["history"]] == ["received", "planned", "running", "written"]
    assert detail["deliveries"] == [{"destination": "pacs", "file": "seg.dcm", "state": "pending", "attempts": 0,
                                     "last_error": None}]  # fmt: skip
    detail = _assert_matches(openapi, client.get(f"/jobs/{failed.id}"), "/jobs/{job_id}")
    assert (detail["reason"], detail["history"][-1]["reason"]) == ("no_request", "no_request")
    listed = _assert_matches(openapi, client.get("/jobs"), "/jobs")
    assert {j["id"] for j in listed} == {job["id"], pulled["id"], failed.id}
    health = _assert_matches(openapi, client.get("/health", headers={"Authorization": ""}), "/health")
    assert (health["jobs"]["written"], health["jobs"]["failed"], health["jobs"]["retrieving"]) == (1, 1, 1)

    cancelled = _assert_matches(openapi, client.post(f"/jobs/{pulled['id']}/cancel"), "/jobs/{job_id}/cancel", "post")
    assert cancelled["state"] == "cancelled"
    for answer, path, method, status in (
        (client.post(f"/jobs/{job['id']}/redeliver"), "/jobs/{job_id}/redeliver", "post", 409),
        (client.get(f"/jobs/{failed.id}/volumes"), "/jobs/{job_id}/volumes", "get", 409),
        (client.get("/jobs/nope"), "/jobs/{job_id}", "get", 404),
        (client.post("/jobs", json={"study_uid": "1.2.4", "request": "liver"}), "/jobs", "post", 404),
        (client.get("/jobs", headers={"Authorization": "Bearer wrong"}), "/jobs", "get", 401),
    ):
        assert answer.status_code == status, (path, answer.text)
        assert _assert_matches(openapi, answer, path, method)["detail"]
