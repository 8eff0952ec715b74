"""``medsegagent mcp``: the node's tools for an AI assistant, over the Model Context Protocol.

A thin layer, in its own process, over what the node already does (see docs/mcp.md):

* ``plan`` and ``list_models`` run the node's router and model catalogue in
  this process, read-only, on the registry and models folder the node's
  configuration names: they answer what the node would do, even while it is down;
* studies and jobs go through the running node's HTTP API with its token, so the
  node's own validation, job store and error reasons apply unchanged (a second
  process cannot open the node's job store: the node holds its data directory).

Over stdio (a desktop assistant starts it) it runs as the local user; over
streamable HTTP it listens on ``mcp.host:mcp.port`` and refuses any call without
the node's API token.  Tool outputs carry UIDs, descriptions, plans, states and
volumes: never pixel data, local paths or patient identity.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import itertools
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from pydantic import BaseModel, Field

from medsegagent import __version__
from medsegagent.node.inventory import StudySummary, VolumeReport
from medsegagent.node.jobs import JobState

# The MCP SDK (half a second to import) is imported where it is used: the CLI imports this
# module to register ``mcp``, and no other sub-command should pay for it.
if TYPE_CHECKING:
    from mcp.server.auth.provider import AccessToken
    from mcp.server.mcpserver import MCPServer

    from medsegagent.models.catalogue import Catalogue, CatalogueEntry
    from medsegagent.models.routing import Router
    from medsegagent.node.config import Config, HttpSettings

log = logging.getLogger(__name__)

#: States after which a job no longer changes by itself.
_SETTLED = {JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED}

#: What the assistant is told about the server as a whole.
_INSTRUCTIONS = (
    "Tools of a MedSegAgent node next to a hospital PACS. Plan a request, then segment a study the node has "
    "received (list_studies) and follow the job with job_status until it is delivered; segment_volumes then "
    "gives each segment's volume and SNOMED CT code. Results are for research; a 'caution' must be passed on."
)


class Transport(StrEnum):
    """How the assistant reaches the server."""

    STDIO = "stdio"
    HTTP = "http"


# -- tool outputs --------------------------------------------------------------------------------


class PlanCandidate(BaseModel):
    """A dataset whose labels match a target."""

    dataset: str
    labels: list[str]
    values: list[int]
    score: float
    installed: bool = Field(description="a model of this dataset is installed")
    models: list[str]
    selected: bool


class PlanTarget(BaseModel):
    """One structure the request names, and the datasets that can segment it."""

    target: str = Field(description="the phrase as read from the request")
    concept: str
    laterality: str | None
    kind: str = Field(description="organ, lesion, vessel, ...")
    negated: bool = Field(description="an 'except ...' target")
    candidates: list[PlanCandidate]


class Unmatched(BaseModel):
    """A target that selects nothing, and why."""

    target: str
    reason: str


class MissingModel(BaseModel):
    """A selected dataset without an installed model, and how to install one."""

    dataset: str
    install_hint: str | None


class PlanResult(BaseModel):
    """Which datasets' models would segment a request, and why."""

    text: str
    modality: str | None
    modality_source: str | None = Field(description="caller (given), text (read from the request) or null")
    collection: str | None
    selection: dict[str, list[int]] = Field(description="dataset -> label values to segment")
    targets: list[PlanTarget]
    unmatched: list[Unmatched]
    missing_models: list[MissingModel]
    explain: list[dict[str, Any]] = Field(description="per stage (modality, anatomy, label): kept, dropped and why")
    summary: str = Field(description="the plan in plain text")


class ModelInfo(BaseModel):
    """One model of the registry's catalogue."""

    name: str
    backend: str
    dataset: str
    labels: list[str]
    installed: bool
    size_bytes: int | None
    licence: str | None
    licence_gated: bool
    installable: bool = Field(description="`medsegagent models install NAME` can fetch it")


class ModelList(BaseModel):
    """The model catalogue, installed or not."""

    models: list[ModelInfo]


class StudyList(BaseModel):
    """Studies the node has received, the most recent first."""

    studies: list[StudySummary]


class JobSummary(BaseModel):
    """A job: its study, request and state."""

    job_id: str
    study_uid: str
    state: JobState
    request: str | None = Field(description="the request text, once the job has planned")
    request_source: str | None = Field(description="where the request came from: request, sr, worklist, tags, preset")
    error: str | None = Field(description="why the job failed, if it did")
    reason: str | None = Field(default=None, description="the failure's code (no_request, nothing_matched ...)")
    updated_at: datetime


class JobList(BaseModel):
    """Jobs, newest first."""

    jobs: list[JobSummary]


class ModelFailure(BaseModel):
    """A model that did not contribute, and why."""

    model: str
    error: str


class DeliveryStatus(BaseModel):
    """One result file's delivery to one destination."""

    destination: str
    state: str = Field(description="pending, sent or failed")
    attempts: int
    last_error: str | None


class JobStatus(JobSummary):
    """A job in detail: timings, failures, deliveries."""

    created_at: datetime
    attempts: int
    state_seconds: dict[str, float] = Field(description="seconds spent in each past state (received, running ...)")
    pipeline_seconds: dict[str, float] = Field(description="seconds per pipeline step (read, plan, inference ...)")
    model_failures: list[ModelFailure]
    deliveries: list[DeliveryStatus]
    segments: int | None = Field(description="segments in the written SEG")
    caution: str | None = Field(description="the result's warning (demo models, disagreement), if any")


# -- the node's HTTP API ---------------------------------------------------------------------------


def node_url(http: HttpSettings) -> str:
    """The base URL of the node's HTTP API, as configured (a wildcard bind is reached on loopback).

    Raises
    ------
    ValueError
        The API is disabled, or listens on a port chosen at start (0).
    """
    if not http.enabled:
        raise ValueError("the node's HTTP API is disabled (http.enabled: false); the MCP server needs it")
    if http.port == 0:
        raise ValueError("http.port is 0 (chosen at start): give the node a fixed HTTP port for the MCP server")
    host = http.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{http.port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{http.port}" if address.version == 6 else f"http://{address}:{http.port}"


class NodeClient:
    """The node's HTTP API with its bearer token; every refusal becomes a tool error with the node's reason.

    Parameters
    ----------
    base_url : str
        See :func:`node_url`.
    token : str
        The node's API token.
    timeout : float
        Seconds per request.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def get(self, path: str, **params: Any) -> Any:
        """``GET path`` with the query ``params`` (``None`` values left out); the decoded JSON."""
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """``POST path`` with a JSON ``body``; the decoded JSON."""
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        from mcp.server.mcpserver.exceptions import ToolError

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ToolError(
                f"the node's HTTP API at {self.base_url} does not answer ({exc}); is `medsegagent serve` running?"
            ) from None
        if response.status_code == httpx.codes.UNAUTHORIZED:
            raise ToolError("the node refused this server's API token (the MCP server and the node need the same)")
        if response.is_error:
            raise ToolError(_reason(response))
        return response.json()


def _reason(response: httpx.Response) -> str:
    """The node's own words for a refusal (FastAPI's ``detail``: a string, or a list of field errors)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ...}, ...]
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
    return str(detail or f"the node answered HTTP {response.status_code}")


def _job_summary(data: dict[str, Any]) -> JobSummary:
    return JobSummary(
        job_id=data["id"], study_uid=data["study_uid"], state=JobState(data["state"]),
        request=data["request"]["text"], request_source=data["request"]["source"], error=data["error"],
        reason=data.get("reason"), updated_at=datetime.fromtimestamp(data["updated_at"], UTC),
    )  # fmt: skip


def _job_status(data: dict[str, Any]) -> JobStatus:
    """The detail the HTTP API gives, less what an assistant must not see (local paths)."""
    report = data.get("report") or {}
    state_seconds: dict[str, float] = defaultdict(float)
    history = data.get("history") or []
    for entered, left in itertools.pairwise(history):
        state_seconds[entered["state"]] += left["at"] - entered["at"]
    return JobStatus(
        **_job_summary(data).model_dump(),
        created_at=datetime.fromtimestamp(data["created_at"], UTC),
        attempts=data["attempts"],
        state_seconds={k: round(v, 3) for k, v in state_seconds.items()},
        pipeline_seconds=report.get("timings_s", {}),
        model_failures=[ModelFailure(model=m["name"], error=m.get("error") or "failed")
                        for m in report.get("models", []) if m.get("status") != "ok"],
        deliveries=[DeliveryStatus(destination=d["destination"], state=d["state"], attempts=d["attempts"],
                                   last_error=d["last_error"]) for d in data.get("deliveries", [])],
        segments=len(report["segments"]) if "segments" in report else None,
        caution=(report.get("quality") or {}).get("caution"),
    )  # fmt: skip


# -- routing and catalogue, in this process ---------------------------------------------------------


class Library:
    """The node's router and model catalogue, loaded on first use (the sentence encoder takes a second or two).

    Parameters
    ----------
    collection : str or None
        The registry collection the node routes within (``node.collection``).
    """

    def __init__(self, collection: str | None) -> None:
        self.collection = collection
        self._lock = threading.Lock()
        self._router: Router | None = None
        self._catalogue: Catalogue | None = None

    def _load(self) -> tuple[Router, Catalogue]:
        with self._lock:
            if self._router is None or self._catalogue is None:
                from medsegagent.models.catalogue import Catalogue
                from medsegagent.models.registry import load_registry
                from medsegagent.models.routing import Router

                registry = load_registry()
                self._router, self._catalogue = Router(registry), Catalogue(registry)
            return self._router, self._catalogue

    def plan(self, text: str, modality: str | None) -> PlanResult:
        """The node's plan for ``text`` (``ValueError`` for an unknown modality)."""
        from medsegagent.models.routing_cli import format_plan

        router, _ = self._load()
        plan = router.plan(text, modality, collection=self.collection)
        return PlanResult.model_validate({**plan.to_json(), "summary": format_plan(plan)})

    def models(self) -> ModelList:
        """Every model reference of the registry, with its install state."""
        _, catalogue = self._load()
        return ModelList(models=[_model_info(entry) for entry in catalogue.entries()])


def _model_info(entry: CatalogueEntry) -> ModelInfo:
    """A :class:`~medsegagent.models.catalogue.CatalogueEntry` without its paths and sources."""
    ref, licence = entry.ref, entry.ref.licence
    return ModelInfo(
        name=ref.name, backend=ref.backend.value, dataset=ref.dataset, labels=list(entry.labels),
        installed=entry.installed, size_bytes=entry.size_bytes, licence=licence.name if licence else None,
        licence_gated=bool(licence and licence.gated), installable=ref.source is not None,
    )  # fmt: skip


# -- the server --------------------------------------------------------------------------------------

_UID = Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$", description="a DICOM UID")
_JOB_ID = Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$", description="a job ID (from segment or list_jobs)")


class _NodeToken:
    """The SDK's token verifier for the HTTP transport: exactly the node's API token passes."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        from mcp.server.auth.provider import AccessToken

        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="medsegagent-node-token", scopes=[])
        return None


def build_server(config: Config, token: str, *, require_token: bool = False) -> MCPServer:
    """The MCP server and its tools, for the node that ``config`` describes.

    Parameters
    ----------
    config : Config
        The node's configuration (``http`` says where its API is; ``mcp`` where to listen).
    token : str
        The node's API token: this server calls the API with it.
    require_token : bool
        Refuse MCP requests without ``Authorization: Bearer <token>`` (the HTTP transport).

    Returns
    -------
    MCPServer
        Run it with ``run("stdio")``, or serve :meth:`MCPServer.streamable_http_app`.
    """
    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import MCPServer

    api = node_url(config.http)
    auth = {}
    if require_token:
        # The SDK's bearer middleware with a static verifier; no OAuth metadata is published
        # (resource_server_url unset), so the issuer named here is never advertised.
        auth = {"token_verifier": _NodeToken(token), "auth": AuthSettings(issuer_url=api, resource_server_url=None)}
    server = MCPServer("medsegagent", version=__version__, instructions=_INSTRUCTIONS, **auth)
    _add_tools(server, NodeClient(api, token), Library(config.node.collection))
    return server


def _add_tools(server: MCPServer, node: NodeClient, library: Library) -> None:
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    reads = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    acts = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

    @server.tool(annotations=reads)
    def plan(
        request: Annotated[str, Field(min_length=1, max_length=1024, description='e.g. "liver and both kidneys"')],
        modality: Annotated[
            str | None, Field(description="CT, MR, MR:T1, MR:T2, PT+CT, US...; none: from the text")
        ] = None,
    ) -> PlanResult:
        """Plan which models would segment a request, with the reasons (nothing is run)."""
        try:
            return library.plan(request, modality)
        except ValueError as exc:
            raise ToolError(str(exc)) from None

    @server.tool(annotations=reads)
    def list_models() -> ModelList:
        """List the model catalogue: every model of the registry, installed or not, and what it segments."""
        return library.models()

    @server.tool(annotations=reads)
    def list_studies(limit: Annotated[int, Field(ge=1, le=1000)] = 50) -> StudyList:
        """List the studies the node has received (UIDs, date, descriptions, series), the most recent first."""
        return StudyList(studies=node.get("/studies", limit=limit))

    @server.tool(annotations=reads)
    def list_jobs(
        state: Annotated[JobState | None, Field(description="only jobs in this state")] = None,
        limit: Annotated[int, Field(ge=1, le=1000)] = 20,
    ) -> JobList:
        """List jobs, newest first, with their state and any failure reason."""
        jobs = node.get("/jobs", state=state.value if state else None, limit=limit)
        return JobList(jobs=[_job_summary(j) for j in jobs])

    @server.tool(annotations=acts)
    def segment(
        study_uid: Annotated[str, _UID],
        request: Annotated[str, Field(min_length=1, max_length=1024, description='e.g. "segment the spleen"')],
    ) -> JobSummary:
        """Segment a received study as the request says; returns the job to follow with job_status."""
        return _job_summary(node.post("/jobs", {"study_uid": study_uid, "request": request}))

    @server.tool(annotations=reads)
    def job_status(
        job_id: Annotated[str, _JOB_ID],
        wait_s: Annotated[float, Field(ge=0, le=60, description="wait up to this long for the job to settle")] = 0,
    ) -> JobStatus:
        """A job's state, per-stage timings, failed models, deliveries and failure reason."""
        deadline = time.monotonic() + wait_s
        data = node.get(f"/jobs/{job_id}")
        while JobState(data["state"]) not in _SETTLED and time.monotonic() < deadline:
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
            data = node.get(f"/jobs/{job_id}")
        return _job_status(data)

    @server.tool(annotations=reads)
    def segment_volumes(job_id: Annotated[str, _JOB_ID]) -> VolumeReport:
        """Each segment of a finished job: volume in mL and its SNOMED CT code."""
        return VolumeReport.model_validate(node.get(f"/jobs/{job_id}/volumes"))

    @server.tool(annotations=acts)
    def retry(job_id: Annotated[str, _JOB_ID]) -> JobSummary:
        """Run a failed or cancelled job again, or re-send a written job's failed deliveries."""
        return _job_summary(node.post(f"/jobs/{job_id}/retry"))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False))
    def cancel(job_id: Annotated[str, _JOB_ID]) -> JobSummary:
        """Cancel a job that has not finished (its pending deliveries are dropped)."""
        return _job_summary(node.post(f"/jobs/{job_id}/cancel"))


# -- command line ------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mcp`` to the CLI.

    Parameters
    ----------
    subparsers
        The top-level sub-parsers of the ``medsegagent`` CLI.
    """
    p = subparsers.add_parser(
        "mcp",
        help="serve the node's tools to an AI assistant (Model Context Protocol)",
        description="An MCP server over a running node: plan, models, studies, jobs, volumes (see docs/mcp.md).",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="the node's configuration")
    p.add_argument("--transport", choices=[t.value for t in Transport], default=Transport.STDIO.value,
                   help="stdio (default; an assistant starts this command) or http (streamable HTTP on mcp.host:"
                   "mcp.port, the node's API token required)")  # fmt: skip
    p.set_defaults(func=run_mcp)


def run_mcp(args: argparse.Namespace) -> int:
    """``medsegagent mcp``: serve until the assistant closes stdin, or until SIGINT/SIGTERM (HTTP)."""
    from medsegagent.models.registry import MODELS_ENV
    from medsegagent.node.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        node_url(config.http)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get(config.http.token_env, "")
    if not token:
        print(f"error: the MCP server needs the node's API token in ${config.http.token_env}", file=sys.stderr)
        return 2
    if config.node.models_dir is not None:  # as the node does: registry locations resolve through it
        os.environ[MODELS_ENV] = str(config.node.models_dir)
    transport = Transport(args.transport)
    server = build_server(config, token, require_token=transport is Transport.HTTP)
    if transport is Transport.STDIO:
        server.run("stdio")
        return 0
    return _serve_http(server, config)


def _serve_http(server: MCPServer, config: Config) -> int:
    import uvicorn

    host, port = config.mcp.host, config.mcp.port
    app = server.streamable_http_app(host=host)
    print(f"medsegagent MCP server on http://{host}:{port}/mcp (bearer token: ${config.http.token_env})",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    except OSError as exc:  # the port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
