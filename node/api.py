"""HTTP API of the node (FastAPI): health, jobs, explicit requests.

Every route but ``/health`` needs ``Authorization: Bearer <token>``; the
token is read from the environment variable named by ``http.token_env``.
The OpenAPI description is served at ``/openapi.json`` (and ``/docs``).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, status
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from pydicom.errors import InvalidDicomError

from medsegagent import __version__
from medsegagent.node.inventory import StudySummary, VolumeReport, segment_volumes, spooled_studies
from medsegagent.node.jobs import DeliveryState, FailureReason, IllegalTransition, Job, JobState

if TYPE_CHECKING:
    import uvicorn

    from medsegagent.node.service import Node

log = logging.getLogger(__name__)


class JobRequest(BaseModel):
    """Body of ``POST /jobs``."""

    study_uid: str = Field(description="Study Instance UID of a study this node has received, or one to pull")
    request: str = Field(min_length=1, max_length=1024, description='the request, e.g. "liver and both kidneys"')
    source: str | None = Field(
        default=None, max_length=64,
        description="a configured source (sources:) to pull the study from first (C-MOVE, C-GET or WADO-RS)",
    )  # fmt: skip


class RetryRequest(BaseModel):
    """Optional body of ``POST /jobs/{id}/retry``: a new request to plan the job from."""

    request: str = Field(min_length=1, max_length=1024, description="the new request, e.g. 'liver and spleen'")


class PlanQuery(BaseModel):
    """Body of ``POST /plan``: a request, or the Called AE title whose preset is the request."""

    request: str | None = Field(None, min_length=1, max_length=1024, description="the request text")
    called_ae: str | None = Field(None, max_length=16, description="a preset's Called AE title (when no request)")
    modality: str | None = Field(None, description="CT, MR, MR:T1 …, PT, PT+CT or US; none: from the text")


class PlanCheck(BaseModel):
    """What a request would select, and which selected datasets have no installed model."""

    request: str
    source: str = Field(description="request or preset")
    selection: dict[str, list[int]]
    unmatched: list[str] = Field(description="the reason each unmatched target selects nothing")
    missing_models: list[str] = Field(description="selected datasets with no installed model")
    runnable: bool = Field(description="at least one selected dataset has an installed model")


# -- responses: what /openapi.json promises, and what every route's answer is validated against ---------------


class Problem(BaseModel):
    """An error (401, 404, 409): what went wrong, in words an operator can act on."""

    detail: str


class Health(BaseModel):
    """Liveness of the node and its jobs per state."""

    status: Literal["ok"]
    version: str
    ae_title: str = Field(description="the node's AE title")
    dicom_port: int = Field(description="the port the DICOM listener is bound to")
    jobs: dict[JobState, int] = Field(description="jobs per state")
    time: float = Field(description="the node's clock (seconds since the epoch)")


class RequestInfo(BaseModel):
    """A job's request and where it came from."""

    text: str | None = Field(description="the request text, once the job has one")
    source: str | None = Field(description="request, sr, worklist, tags or preset")


class JobInfo(BaseModel):
    """A job: its study, request and state (``GET /jobs``; the ``POST`` routes answer with one)."""

    id: str
    study_uid: str
    state: JobState
    created_at: float = Field(description="seconds since the epoch")
    updated_at: float = Field(description="seconds since the epoch")
    request: RequestInfo
    called_ae: str | None = Field(description="the AE title the study was sent to")
    calling_ae: str | None = Field(description="the AE title that sent it")
    attempts: int
    error: str | None = Field(description="why the job failed, in words")
    reason: FailureReason | None = Field(description="why the job failed, as a code")
    retrieve_from: str | None = Field(description="the configured source the study is pulled from, if any")


class StateChange(BaseModel):
    """One entry of a job's history."""

    state: JobState
    at: float = Field(description="seconds since the epoch")
    reason: FailureReason | None = None
    error: str | None = None


class DeliveryInfo(BaseModel):
    """One result file's delivery to one destination."""

    destination: str
    file: str = Field(description="the result file's name")
    state: DeliveryState
    attempts: int
    last_error: str | None


class JobDetail(JobInfo):
    """A job with its plan, report, history and deliveries."""

    plan: dict[str, Any] | None = Field(description="the plan computed for the request (see POST /plan)")
    report: dict[str, Any] | None = Field(description="the written result's report: timings, segments, volumes")
    history: list[StateChange]
    result_dir: str | None
    deliveries: list[DeliveryInfo]
    preview: str | None = Field(description="the route of the PNG preview, once the result is written")


#: What each error status means; 401 goes with every route but /health.
_STATUS_MEANING = {
    401: "missing or wrong bearer token",
    404: "no such job, study or file",
    409: "the job's state does not allow this",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route's error statuses, each a :class:`Problem`."""
    return {code: {"model": Problem, "description": _STATUS_MEANING[code]} for code in (401, *statuses)}


class TokenMissingError(RuntimeError):
    """The HTTP API is enabled but its token variable is not set."""


def create_app(node: Node, token: str) -> FastAPI:
    """The FastAPI application bound to ``node``, guarded by ``token``."""
    app = FastAPI(title="MedSegAgent node", version=__version__,
                  description="Instructive segmentation node: jobs, requests, results.")  # fmt: skip
    bearer = HTTPBearer(auto_error=False)

    # A default value, not an Annotated hint: hints of this closure are strings that FastAPI
    # resolves in module scope, where ``bearer`` does not exist.
    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.get("/health")
    def health() -> Health:
        """Liveness and a count of jobs per state (no token needed)."""
        return Health(status="ok", version=__version__, ae_title=node.config.node.ae_title,
                      dicom_port=node.scp.port, jobs=node.store.count_by_state(), time=time.time())  # fmt: skip

    for router in (_job_reads(node), _job_actions(node), _planning_and_studies(node)):
        app.include_router(router, dependencies=[Depends(authorised)])
    return app


def _job_or_404(node: Node, job_id: str) -> Job:
    try:
        return node.store.get(job_id)
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None


def _job_reads(node: Node) -> APIRouter:
    """``GET /jobs``, ``/jobs/{id}``, ``/jobs/{id}/preview`` and ``/jobs/{id}/volumes``."""
    router = APIRouter()

    @router.get("/jobs", responses=_errors())
    def list_jobs(
        state: Annotated[JobState | None, Query()] = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[JobInfo]:
        """Newest jobs first."""
        return [JobInfo.model_validate(job.to_json()) for job in node.store.list(state=state, limit=limit)]

    @router.get("/jobs/{job_id}", responses=_errors(404))
    def job_detail(job_id: str) -> JobDetail:
        """State, request, plan, report (timings, segments), history, deliveries."""
        job = _job_or_404(node, job_id)
        deliveries = [
            DeliveryInfo(destination=i.destination, file=Path(i.path).name, state=i.state, attempts=i.attempts,
                         last_error=i.last_error)
            for i in node.store.outbox(job_id)
        ]  # fmt: skip
        preview = f"/jobs/{job_id}/preview" if job.result_dir else None
        return JobDetail.model_validate({**job.to_json(detail=True), "deliveries": deliveries, "preview": preview})

    @router.get("/jobs/{job_id}/preview", response_class=FileResponse,
                responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                           **_errors(404)})  # fmt: skip
    def job_preview(job_id: str) -> FileResponse:
        """The PNG preview of a written job."""
        job = _job_or_404(node, job_id)
        path = Path(job.result_dir or "") / "preview.png"
        if not job.result_dir or not path.is_file():
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no preview for this job")
        return FileResponse(path, media_type="image/png")

    @router.get("/jobs/{job_id}/volumes", responses=_errors(404, 409))
    def job_volumes(job_id: str) -> VolumeReport:
        """Each segment's volume (mL) and coded concepts, once the job's SEG is written."""
        job = _job_or_404(node, job_id)
        if job.report is None or not job.result_dir:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {job.state.value}; it has no SEG yet")
        try:
            return segment_volumes(job.id, job.study_uid, job.report, Path(job.result_dir) / "seg.dcm")
        except (OSError, InvalidDicomError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)  # an OSError's text names a local path
            raise HTTPException(status.HTTP_409_CONFLICT, f"the SEG of job {job_id} cannot be read: {reason}") from None

    return router


def _job_actions(node: Node) -> APIRouter:
    """``POST /jobs`` and the state changes of a job: retry, redeliver, cancel."""
    router = APIRouter()

    @router.post("/jobs", status_code=status.HTTP_202_ACCEPTED, responses=_errors(404))
    def create_job(body: JobRequest) -> JobInfo:
        """Segment a received study with an explicit request, or pull it from a ``source`` first."""
        try:
            return JobInfo.model_validate(node.submit(body.study_uid, body.request, body.source).to_json())
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None

    def act_on(job_id: str, action: Callable[[str], Job]) -> JobInfo:
        """``action(job_id)``'s job: 404 for an unknown job, 409 when its state (or a lost file) refuses it."""
        _job_or_404(node, job_id)
        try:
            return JobInfo.model_validate(action(job_id).to_json())
        except (IllegalTransition, FileNotFoundError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None

    @router.post("/jobs/{job_id}/retry", responses=_errors(404, 409))
    def retry_job(job_id: str, body: RetryRequest | None = None) -> JobInfo:
        """Re-run a failed/cancelled job (planned from ``request`` when given), or re-queue its failed deliveries."""
        request = body.request if body is not None else None
        job = act_on(job_id, lambda job_id: node.store.retry(job_id, request))
        node.wake()
        return job

    @router.post("/jobs/{job_id}/redeliver", responses=_errors(404, 409))
    def redeliver_job(job_id: str) -> JobInfo:
        """Send a delivered job's results again: same files, same SOP Instance UIDs (409 unless delivered)."""
        return act_on(job_id, node.store.redeliver)

    @router.post("/jobs/{job_id}/cancel", responses=_errors(404, 409))
    def cancel_job(job_id: str) -> JobInfo:
        """Cancel a job that has not finished (409 for a delivered, failed or cancelled one)."""
        return act_on(job_id, node.store.cancel)

    return router


def _planning_and_studies(node: Node) -> APIRouter:
    """``POST /plan`` and ``GET /studies``."""
    router = APIRouter()

    @router.post("/plan", responses=_errors())
    def check_plan(body: PlanQuery) -> PlanCheck:
        """Plan a request without a study (Orthanc's plugin checks its routing rules with it)."""
        text = body.request or node.config.presets.get(body.called_ae or "")
        if text is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give a request, or a Called AE with a preset")
        try:
            plan = node.router.plan(text, modality=body.modality, collection=node.config.node.collection)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        missing = sorted(m["dataset"] for m in plan.missing_models)
        return PlanCheck(
            request=text, source="request" if body.request else "preset", selection=plan.selection,
            unmatched=[u.reason for u in plan.unmatched], missing_models=missing,
            runnable=bool(set(plan.selection) - set(missing)),
        )  # fmt: skip

    @router.get("/studies", responses=_errors())
    def list_studies(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[StudySummary]:
        """Studies received (UIDs, date, descriptions, series), the most recent first."""
        return spooled_studies(node.spool_dir, limit)

    return router


def start_http(node: Node) -> uvicorn.Server:
    """Serve the API in a background thread on the configured interface."""
    import uvicorn

    settings = node.config.http
    token = os.environ.get(settings.token_env, "")
    if not token:
        raise TokenMissingError(
            f"the HTTP API needs a bearer token in ${settings.token_env} (or set http.enabled: false)"
        )
    app = create_app(node, token)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="medseg-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"HTTP API did not start on {settings.host}:{settings.port}")
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
    node.http_port = port
    log.info("HTTP API on http://%s:%d (token from $%s)", settings.host, port, settings.token_env)
    return server
