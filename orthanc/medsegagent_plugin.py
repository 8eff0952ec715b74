"""MedSegAgent plugin for Orthanc: auto-routing, a "Segment…" button, REST routes.

Runs inside Orthanc's Python plugin (Debian ``orthanc-python`` 4.0, which
embeds Debian's Python 3.11); standard library only, so it needs nothing
from the node's virtual environment.  Configuration: the ``MedSegAgent``
section of Orthanc's configuration (see ``orthanc/orthanc.json`` and
``docs/orthanc.md``).

What it adds to Orthanc
-----------------------
``STABLE_STUDY`` auto-routing (when ``MedSegAgent.AutoRouting`` is ``python``)
    The first rule of ``MedSegAgent.Rules`` that matches a stable study sends
    its matching image series to the node (``SendTo``: a DICOM modality whose
    AE title may be a node preset), after adding a request SR when the rule
    has a ``Request``.  ``orthanc/medsegagent_routing.lua`` is the same logic
    for Orthanc's Lua engine (``AutoRouting: lua``).
``POST /medsegagent/segment`` ``{"study": ORTHANC_ID, "request": TEXT}``
    Writes the request as a Basic Text SR into the study (archived with the
    images) and sends the image series and that SR to the node.
``GET /medsegagent/studies/{id}/jobs`` and ``GET /medsegagent/jobs/{job}``
    The node's job status, proxied; the node's bearer token stays in Orthanc.
``GET /medsegagent/ui/segment.html?study=ID``
    A small form for Orthanc Explorer 2's ``CustomButtons``.
``GET /ohif/…`` (when ``MedSegAgent.OhifRoot`` is set)
    OHIF Viewer's ``index.html`` for the viewer's own routes (``/ohif/viewer?…``);
    its files come from Orthanc's ServeFolders plugin.
A "Segment…" button and a "View in OHIF" link on the study page of the legacy
Orthanc Explorer, with the study's last MedSegAgent status under them.

Rule check: at start-up and every ``RuleCheckSeconds`` the plugin asks the
node (``POST /plan``) what each rule's request selects; a rule whose datasets
have no installed model is logged and skipped, unless it has ``"Force": true``.

Status in Orthanc: what happened to a study sent to the node (sent, skipped,
routing failed, then the node job's end: delivered, failed with its reason,
cancelled) is kept in the study metadata ``MedSegAgentStatus``, so an
administrator sees a failed auto-routed study in Orthanc without the node.

Loop guard: the node's own objects (Modality SEG, or Manufacturer
``MedSegAgent`` on a non-image series) are never sent to the node, and a
study whose candidate series were all sent already (same instance counts,
recorded in the study metadata ``MedSegAgentRouted``) is not routed again
when the node's SEG arrives and the study becomes stable once more.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import orthanc  # provided by Orthanc's Python plugin
except ImportError:  # imported by the unit tests, outside Orthanc
    orthanc = None
if not hasattr(orthanc, "RegisterRestCallback"):  # e.g. this very folder, seen as a namespace package
    orthanc = None

#: Orthanc identifiers are SHA-1 based: five groups of eight hex digits.
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
#: The node's job ids (uuid4 hex).
JOB_ID = re.compile(r"[0-9a-f]{32}")
#: Modalities of the series the node can segment (it accepts these images and SR only).
IMAGE_MODALITIES = frozenset({"CT", "MR", "PT", "US"})
#: Manufacturer the node writes into every object it creates (SEG, SR, SC).
NODE_MANUFACTURER = "MedSegAgent"
#: Manufacturer and series of the request SRs this plugin writes.
REQUEST_MANUFACTURER = "MedSegAgent Orthanc plugin"
REQUEST_SERIES_DESCRIPTION = "MedSegAgent request"
#: Study metadata (declared in ``UserMetadata``) recording what was sent: ``{"series": {id: count}}``.
ROUTED_METADATA = "MedSegAgentRouted"
#: Study metadata (declared in ``UserMetadata``): the last MedSegAgent status of the study, as JSON.
STATUS_METADATA = "MedSegAgentStatus"
#: Node job states after which nothing more happens to a job.
FINAL_JOB_STATES = frozenset({"delivered", "failed", "cancelled"})
#: The node stores the request in the SEG's Content Description (ST, 1024 characters).
MAX_REQUEST_CHARS = 1024
RULE_KEYS = frozenset({"Name", "Modality", "BodyPart", "StudyDescription", "Station", "SendTo", "Request"})
#: Rule keys whose value is true or false rather than text.
RULE_FLAGS = frozenset({"Force"})
HERE = Path(__file__).resolve().parent


class HttpError(Exception):
    """An error answered to the REST client with ``status`` and a JSON message."""

    def __init__(self, status: int, message: str, node_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: The node's own HTTP status, when the error is the node's answer.
        self.node_status = node_status


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One auto-routing rule; ``None`` criteria match anything."""

    name: str
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    station: str | None = None
    send_to: str | None = None
    request: str | None = None
    #: Route even when the node has no installed model for what the rule asks.
    force: bool = False


@dataclass(frozen=True)
class RuleCheck:
    """What the node said about a rule's request (``POST /plan``)."""

    runnable: bool
    reason: str = ""


@dataclass(frozen=True)
class Settings:
    """The ``MedSegAgent`` section of Orthanc's configuration."""

    node_modality: str = "medseg"
    node_url: str = "http://127.0.0.1:8080"
    node_token_env: str = "MEDSEG_TOKEN"
    node_token: str | None = None
    node_timeout: float = 10.0
    auto_routing: str = "python"
    default_request: str = ""
    rules: tuple[Rule, ...] = ()
    #: Called AE title of each DICOM modality (the node's presets are keyed by it).
    modality_aets: dict[str, str] = field(default_factory=dict)
    #: URL path OHIF Viewer is served under (``/ohif/``), and the folder ServeFolders serves it from.
    ohif_root: str | None = None
    ohif_folder: str | None = None
    record_status: bool = True
    rule_check_seconds: float = 600.0
    problems: tuple[str, ...] = field(default=())

    def token(self) -> str:
        """The node's bearer token: from the environment, else from the configuration."""
        return os.environ.get(self.node_token_env, "") or (self.node_token or "")


def parse_settings(config: dict[str, Any]) -> Settings:
    """Read the ``MedSegAgent`` section; invalid rules are dropped and listed in ``problems``."""
    section = config.get("MedSegAgent") or {}
    problems: list[str] = []
    rules: list[Rule] = []
    for i, raw in enumerate(section.get("Rules") or []):
        where = f"MedSegAgent.Rules[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected an object")
            continue
        unknown = sorted(set(raw) - RULE_KEYS - RULE_FLAGS)
        bad = [k for k in RULE_KEYS & set(raw) if not isinstance(raw[k], str) or not raw[k].strip()]
        bad += [k for k in RULE_FLAGS & set(raw) if not isinstance(raw[k], bool)]
        if unknown or bad:
            problems.append(f"{where}: unknown keys {unknown}, non-text or empty values {sorted(bad)}; rule ignored")
            continue
        request = raw.get("Request")
        if request is not None and (problem := request_problem(request)):
            problems.append(f"{where}.Request: {problem}; rule ignored")
            continue
        rules.append(
            Rule(
                name=raw.get("Name", f"rule-{i + 1}"),
                modality=raw.get("Modality"),
                body_part=raw.get("BodyPart"),
                study_description=raw.get("StudyDescription"),
                station=raw.get("Station"),
                send_to=raw.get("SendTo"),
                request=request,
                force=raw.get("Force", False),
            )
        )
    url = str(section.get("NodeUrl", Settings.node_url)).rstrip("/")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        problems.append(f"MedSegAgent.NodeUrl: {url!r} is not an http(s) URL; job status is unavailable")
        url = ""
    routing = str(section.get("AutoRouting", "python")).lower()
    if routing not in ("python", "lua", "off"):
        problems.append(f"MedSegAgent.AutoRouting: {routing!r} is not python, lua or off; using off")
        routing = "off"
    modalities = config.get("DicomModalities") or {}
    ohif_root = section.get("OhifRoot")
    ohif_folder = (config.get("ServeFolders") or {}).get(str(ohif_root or "").rstrip("/"))
    if ohif_root is not None and (not re.fullmatch(r"/[A-Za-z0-9_-]+/", str(ohif_root)) or not ohif_folder):
        problems.append(f"MedSegAgent.OhifRoot: {ohif_root!r} is not /NAME/ with ServeFolders[/NAME]; no OHIF link")
        ohif_root = ohif_folder = None
    return Settings(
        node_modality=str(section.get("NodeModality", Settings.node_modality)),
        node_url=url,
        node_token_env=str(section.get("NodeTokenEnv", Settings.node_token_env)),
        node_token=section.get("NodeToken"),
        node_timeout=float(section.get("NodeTimeout", Settings.node_timeout)),
        auto_routing=routing,
        default_request=str(section.get("DefaultRequest", "")),
        rules=tuple(rules),
        modality_aets={name: _aet(m) for name, m in modalities.items()},
        ohif_root=ohif_root,
        ohif_folder=ohif_folder,
        record_status=bool(section.get("RecordStatus", True)),
        rule_check_seconds=float(section.get("RuleCheckSeconds", Settings.rule_check_seconds)),
        problems=tuple(problems),
    )


def _aet(modality: Any) -> str:
    # Orthanc takes a modality as {"AET": …} or as ["AET", host, port].
    if isinstance(modality, dict):
        return str(modality.get("AET", ""))
    return str(modality[0]) if isinstance(modality, list) and modality else ""


# -- matching (pure functions, shared semantics with the Lua script) --------------------------------


def _glob_regex(glob: str) -> re.Pattern[str]:
    # Only * and ? are wildcards (as in DICOM matching and in the Lua script); the rest is literal.
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob]
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str | None, value: str | None) -> bool:
    """Case-insensitive wildcard match; ``|`` separates alternatives; ``None`` matches anything."""
    if pattern is None:
        return True
    text = (value or "").strip().upper()
    alternatives = [alt for alt in pattern.split("|") if alt]  # as Lua's gmatch("[^|]+")
    return any(_glob_regex(alt.strip().upper()).fullmatch(text) for alt in alternatives)


def is_node_output(series_tags: dict[str, str]) -> bool:
    """True for what the node writes (SEG, and its SR/SC): never routed back to it."""
    modality = (series_tags.get("Modality") or "").strip().upper()
    manufacturer = (series_tags.get("Manufacturer") or "").strip()
    if modality == "SEG":
        return True
    return manufacturer.lower() == NODE_MANUFACTURER.lower() and modality not in IMAGE_MODALITIES


def candidate_series(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Image series of a study the node can segment (node output excluded)."""
    out = []
    for item in series:
        tags = item.get("MainDicomTags", {})
        if is_node_output(tags):
            continue
        if (tags.get("Modality") or "").strip().upper() in IMAGE_MODALITIES:
            out.append(item)
    return out


def rule_series(rule: Rule, study_tags: dict[str, str], series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series of a study that ``rule`` sends (empty when the rule does not match)."""
    if not glob_match(rule.study_description, study_tags.get("StudyDescription")):
        return []
    return [
        s
        for s in candidate_series(series)
        if glob_match(rule.modality, s["MainDicomTags"].get("Modality"))
        and glob_match(rule.body_part, s["MainDicomTags"].get("BodyPartExamined"))
        and glob_match(rule.station, s["MainDicomTags"].get("StationName"))
    ]


def choose_rule(
    rules: tuple[Rule, ...], study_tags: dict[str, str], series: list[dict[str, Any]]
) -> tuple[Rule, list[dict[str, Any]]] | None:
    """The first matching rule and its series, or ``None``."""
    for rule in rules:
        hits = rule_series(rule, study_tags, series)
        if hits:
            return rule, hits
    return None


def parse_routed(value: str | bytes | None) -> dict[str, int]:
    """Series id -> instance count already sent, from the study metadata (tolerant of junk)."""
    try:
        recorded = json.loads(value or "{}").get("series", {})
    except (ValueError, AttributeError):
        return {}
    # Counts are JSON numbers; digit strings are accepted too (what Lua's DumpJson(x, true) writes).
    return {k: int(v) for k, v in recorded.items() if isinstance(v, int) or (isinstance(v, str) and v.isdigit())}


def already_sent(recorded: dict[str, int], series: list[dict[str, Any]]) -> bool:
    """True when every series was sent before with the same number of instances."""
    return bool(series) and all(recorded.get(s["ID"]) == len(s.get("Instances", [])) for s in series)


def request_problem(text: Any) -> str | None:
    """Why ``text`` cannot be a request (``None`` when it can)."""
    if not isinstance(text, str) or not text.strip():
        return "the request must be non-empty text"
    if len(text) > MAX_REQUEST_CHARS:
        return f"the request is longer than {MAX_REQUEST_CHARS} characters"
    if any(not c.isprintable() for c in text):
        return "the request contains control characters"
    return None


def plan_query(settings: Settings, rule: Rule) -> dict[str, str] | None:
    """The node's ``POST /plan`` body for what ``rule`` asks, or ``None`` when the request is not in the rule.

    A rule's request is its ``Request`` (a request SR, read first by the node),
    else the preset of the Called AE title it sends to; a rule that sends to
    the node's own AE title without a request leaves the request to the
    worklist or the study tags, which only the study will tell.
    """
    if rule.request is not None:
        query = {"request": rule.request}
    elif rule.send_to is not None and rule.send_to != settings.node_modality:
        query = {"called_ae": settings.modality_aets.get(rule.send_to, rule.send_to)}
    else:
        return None
    modality = (rule.modality or "").strip().upper()
    if modality in IMAGE_MODALITIES:  # a pattern ("CT|MR") leaves the modality to the text
        query["modality"] = modality
    return query


def rule_check(answer: dict[str, Any]) -> RuleCheck:
    """Read the node's ``POST /plan`` answer for one rule."""
    if answer.get("runnable"):
        return RuleCheck(True)
    missing = list(answer.get("missing_models") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return RuleCheck(False, f"no installed model for {', '.join(missing[:3])}{more}")
    reasons = "; ".join(answer.get("unmatched") or []) or "no target recognised"
    return RuleCheck(False, f"the request selects nothing on the node ({reasons})")


def status_record(state: str, reason: str = "", **details: Any) -> dict[str, Any]:
    """The JSON kept in the study metadata ``MedSegAgentStatus``."""
    record = {"state": state, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record.update({k: v for k, v in details.items() if v is not None})
    return record


def parse_status(value: str | bytes | None) -> dict[str, Any] | None:
    """The recorded status of a study, or ``None`` (never recorded, or not ours)."""
    try:
        record = json.loads(value or "null")
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("state"), str) else None


def new_job(jobs: list[dict[str, Any]], known: list[str]) -> dict[str, Any] | None:
    """The newest job of a study that is not one of ``known`` (jobs come newest first)."""
    return next((job for job in jobs if job.get("id") not in known), None)


def _dcm_code(value: str, meaning: str) -> list[dict[str, str]]:
    return [{"CodeValue": value, "CodingSchemeDesignator": "DCM", "CodeMeaning": meaning}]


def next_series_number(series: list[dict[str, Any]]) -> str:
    """One above the highest Series Number among a study's series (Orthanc's ``/studies/{id}/series``), as IS."""
    numbers = []
    for item in series:
        value = str(item.get("MainDicomTags", {}).get("SeriesNumber", "")).strip()
        if value.lstrip("-").isdigit() and int(value) < 2**30:  # near the IS limit: a header's mistake
            numbers.append(int(value))
    return str(max([0, *numbers]) + 1)


def request_sr_body(study_id: str, text: str, series_number: str = "1") -> dict[str, Any]:
    """``/tools/create-dicom`` body of a Basic Text SR carrying ``text`` in study ``study_id``.

    The node reads the first TEXT content item of an SR in the study (instruction source ``sr``).
    ``series_number`` is :func:`next_series_number` of the study: each request SR is a series of its own.
    """
    return {
        "Parent": study_id,
        "Tags": {
            "SpecificCharacterSet": "ISO_IR 192",  # UTF-8: the request is free text
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR Storage
            "Modality": "SR",
            "Manufacturer": REQUEST_MANUFACTURER,
            "SeriesDescription": REQUEST_SERIES_DESCRIPTION,
            "SeriesNumber": series_number,
            "InstanceNumber": "1",
            "ReferencedPerformedProcedureStepSequence": [],
            "PerformedProcedureCodeSequence": [],
            "ValueType": "CONTAINER",
            "ConceptNameCodeSequence": _dcm_code("121144", "Document Title"),
            "ContinuityOfContent": "SEPARATE",
            "CompletionFlag": "COMPLETE",
            "VerificationFlag": "UNVERIFIED",
            "ContentSequence": [
                {
                    "RelationshipType": "CONTAINS",
                    "ValueType": "TEXT",
                    "ConceptNameCodeSequence": _dcm_code("121106", "Comment"),
                    "TextValue": text,
                }
            ],
        },
    }


# -- Orthanc access --------------------------------------------------------------------------------


def _get_json(uri: str) -> Any:
    return json.loads(orthanc.RestApiGet(uri))


def _post_json(uri: str, body: dict[str, Any]) -> Any:
    return json.loads(orthanc.RestApiPost(uri, json.dumps(body)))


def _study(study_id: str) -> dict[str, Any]:
    if not ORTHANC_ID.fullmatch(study_id or ""):
        raise HttpError(400, "'study' must be an Orthanc study identifier (e.g. from /studies)")
    try:
        return _get_json(f"/studies/{study_id}")
    except orthanc.OrthancException:
        raise HttpError(404, f"no study {study_id} in this Orthanc") from None


def _metadata(study_id: str) -> dict[str, str]:
    # ?expand answers {} for a study without user metadata (asking for a missing key would log an error).
    return _get_json(f"/studies/{study_id}/metadata?expand")


def _put_metadata(study_id: str, name: str, value: str) -> None:
    try:
        orthanc.RestApiPut(f"/studies/{study_id}/metadata/{name}", value)
    except orthanc.OrthancException as exc:  # not declared in UserMetadata: everything else still works
        orthanc.LogWarning(f"MedSegAgent: cannot write {name} of study {study_id} ({exc}); declare it in UserMetadata")


def _routed(study_id: str) -> dict[str, int]:
    return parse_routed(_metadata(study_id).get(ROUTED_METADATA))


def recorded_status(study_id: str) -> dict[str, Any] | None:
    """The study's last MedSegAgent status (metadata ``MedSegAgentStatus``)."""
    return parse_status(_metadata(study_id).get(STATUS_METADATA))


def record_status(settings: Settings, study_id: str, record: dict[str, Any]) -> None:
    """Keep ``record`` as the study's MedSegAgent status, unless ``RecordStatus`` is false."""
    if settings.record_status:
        _put_metadata(study_id, STATUS_METADATA, json.dumps(record))


def send_to_node(settings: Settings, study_id: str, series: list[dict[str, Any]], modality: str, extra: list[str]):
    """C-STORE ``series`` (+ ``extra`` instances) in one association, then record them as sent."""
    resources = [s["ID"] for s in series] + extra
    answer = _post_json(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})
    recorded = _routed(study_id)
    recorded.update({s["ID"]: len(s.get("Instances", [])) for s in series})
    _put_metadata(study_id, ROUTED_METADATA, json.dumps({"series": recorded}))
    return answer


def create_request_sr(study_id: str, text: str) -> str:
    """Write the request SR into the study; its Orthanc instance id."""
    number = next_series_number(_get_json(f"/studies/{study_id}/series"))
    return _post_json("/tools/create-dicom", request_sr_body(study_id, text, number))["ID"]


def node_call(settings: Settings, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) on the node's HTTP API with its bearer token (never sent to the browser)."""
    if not settings.node_url:
        raise HttpError(503, "MedSegAgent.NodeUrl is not configured")
    token = settings.token()
    if not token:
        raise HttpError(503, f"the node token is not configured (${settings.node_token_env})")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(settings.node_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=settings.node_timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise HttpError(404, "the node does not know this job") from None
        try:
            detail = json.loads(exc.read()).get("detail")
        except (OSError, ValueError, AttributeError):
            detail = None
        reason = f": {detail}" if isinstance(detail, str) else ""
        raise HttpError(502, f"the node answered HTTP {exc.code}{reason}", exc.code) from None
    except (OSError, ValueError) as exc:
        raise HttpError(502, f"the node is not reachable: {type(exc).__name__}") from None


def study_jobs(settings: Settings, study_uid: str) -> list[dict[str, Any]]:
    """The node's jobs for one Study Instance UID, newest first."""
    jobs = node_call(settings, "/jobs?limit=1000")
    keep = ("id", "state", "created_at", "updated_at", "request", "error", "called_ae")
    return [{k: j.get(k) for k in keep} for j in jobs if j.get("study_uid") == study_uid]


def _known_jobs(settings: Settings, study_uid: str) -> list[str]:
    # The ids a new job must differ from (best effort: without the node, every job is new).
    try:
        return [j["id"] for j in study_jobs(settings, study_uid)]
    except HttpError:
        return []


# -- what the node says about the rules, and about each study sent ---------------------------------


class RuleChecker:
    """The node's answer (``POST /plan``) for each rule, refreshed in the background."""

    def __init__(self) -> None:
        self._checks: dict[str, RuleCheck] = {}
        self._lock = threading.Lock()

    def refresh(self, settings: Settings) -> bool:
        """Ask the node about every rule it can judge; ``False`` when the node could not be asked."""
        for rule in settings.rules:
            query = plan_query(settings, rule)
            if query is None:
                continue
            try:
                check = rule_check(node_call(settings, "/plan", query))
            except HttpError as exc:
                if exc.node_status != 422:  # unreachable, or not configured: ask again later
                    return False
                check = RuleCheck(False, f"the node cannot plan its request ({exc.message})")
            self._update(rule, check)
        return True

    def _update(self, rule: Rule, check: RuleCheck) -> None:
        with self._lock:
            before = self._checks.get(rule.name)
            self._checks[rule.name] = check
        if check == before:
            return
        if not check.runnable:
            what = "routed anyway (Force)" if rule.force else 'skipped (add "Force": true to route anyway)'
            orthanc.LogWarning(f"MedSegAgent: rule {rule.name}: {check.reason}; {what}")
        elif before is not None:
            orthanc.LogWarning(f"MedSegAgent: rule {rule.name}: the node can run it now; routing again")

    def blocked(self, rule: Rule) -> str | None:
        """Why ``rule`` is skipped, or ``None`` (runnable, forced, or not judged yet)."""
        with self._lock:
            check = self._checks.get(rule.name)
        return None if check is None or check.runnable or rule.force else check.reason


@dataclass
class _Watch:
    uid: str
    known: list[str]
    details: dict[str, Any]
    deadline: float
    state: str = "sent"


class StatusWatcher:
    """Follows the node's job for each study sent until it ends, and records each new state on the study."""

    #: How long to wait for the node to make a job of a study it was sent.
    PATIENCE_SECONDS = 24 * 3600

    def __init__(self) -> None:
        self._studies: dict[str, _Watch] = {}
        self._lock = threading.Lock()

    def watch(self, study_id: str, uid: str, known: list[str], **details: Any) -> None:
        """Follow the first job of ``uid`` that is not one of ``known``."""
        with self._lock:
            self._studies[study_id] = _Watch(uid, known, details, time.monotonic() + self.PATIENCE_SECONDS)

    def poll(self, settings: Settings) -> None:
        """One look at the node's jobs (one request, whatever the number of studies followed)."""
        with self._lock:
            watched = dict(self._studies)
        if not watched:
            return
        try:
            jobs = node_call(settings, "/jobs?limit=1000")
        except HttpError:
            return  # the node is away: its jobs will still be there
        for study_id, item in watched.items():
            job = new_job([j for j in jobs if j.get("study_uid") == item.uid], item.known)
            if job is None or job.get("state") == item.state:
                if job is None and time.monotonic() > item.deadline:
                    self._forget(study_id, item)
                continue
            item.state = str(job.get("state"))
            record = status_record(item.state, str(job.get("error") or ""), job=job.get("id"), **item.details)
            record_status(settings, study_id, record)
            if item.state in FINAL_JOB_STATES:
                self._forget(study_id, item)

    def _forget(self, study_id: str, item: _Watch) -> None:
        with self._lock:
            if self._studies.get(study_id) is item:
                del self._studies[study_id]


# -- actions ----------------------------------------------------------------------------------------


def segment(settings: Settings, study_id: str, text: Any) -> dict[str, Any]:
    """The button and ``POST /medsegagent/segment``: request SR into the study, study to the node."""
    study = _study(study_id)
    if problem := request_problem(text):
        raise HttpError(400, problem)
    text = text.strip()
    series = candidate_series(_get_json(f"/studies/{study_id}/series"))
    if not series:
        raise HttpError(409, f"the study has no {'/'.join(sorted(IMAGE_MODALITIES))} series to segment")
    uid = study["MainDicomTags"].get("StudyInstanceUID", "")
    known = _known_jobs(settings, uid)  # ids the browser must ignore while it waits for the new job
    sr_id = create_request_sr(study_id, text)
    try:
        answer = send_to_node(settings, study_id, series, settings.node_modality, [sr_id])
    except orthanc.OrthancException as exc:
        reason = f"sending the study to {settings.node_modality} failed: {exc}"
        record_status(settings, study_id, status_record("failed", reason, request=text))
        raise HttpError(502, reason) from None
    orthanc.LogWarning(f"MedSegAgent: study {study_id} sent to {settings.node_modality} with request {text!r}")
    record_status(settings, study_id, status_record("sent", request=text))
    _WATCHER.watch(study_id, uid, known, request=text)
    return {
        "study": study_id,
        "StudyInstanceUID": uid,
        "request": text,
        "sr": sr_id,
        "series": [s["ID"] for s in series],
        "instances": answer.get("InstancesCount") if isinstance(answer, dict) else None,
        "known_jobs": known,
        "status": f"/medsegagent/studies/{study_id}/jobs",
    }


def route_stable_study(settings: Settings, study_id: str, checker: RuleChecker | None = None) -> str:
    """Apply the rules to a stable study; returns what was done (for the log)."""
    checker = checker or _CHECKER
    study = _get_json(f"/studies/{study_id}")
    series = _get_json(f"/studies/{study_id}/series")
    tags = study.get("MainDicomTags", {})
    chosen = choose_rule(tuple(r for r in settings.rules if not checker.blocked(r)), tags, series)
    if chosen is None:
        blocked = choose_rule(settings.rules, tags, series)
        if blocked is None:
            return "no rule matches"
        reason = f"rule {blocked[0].name} skipped: {checker.blocked(blocked[0])}"
        if parse_status(_metadata(study_id).get(STATUS_METADATA)) is None:  # not over a real job's status
            record_status(settings, study_id, status_record("skipped", reason, rule=blocked[0].name))
        return reason
    rule, hits = chosen
    if already_sent(_routed(study_id), hits):
        return f"already routed (rule {rule.name}); skipped"
    uid = tags.get("StudyInstanceUID", "")
    known = _known_jobs(settings, uid)
    extra = [create_request_sr(study_id, rule.request)] if rule.request else []
    target = rule.send_to or settings.node_modality
    try:
        send_to_node(settings, study_id, hits, target, extra)
    except orthanc.OrthancException as exc:
        reason = f"rule {rule.name}: sending to {target} failed ({exc}); it is sent again when the study changes"
        record_status(settings, study_id, status_record("failed", reason, rule=rule.name))
        raise
    record_status(settings, study_id, status_record("sent", rule=rule.name, request=rule.request))
    _WATCHER.watch(study_id, uid, known, rule=rule.name, request=rule.request)
    n = sum(len(s.get("Instances", [])) for s in hits)
    return f"rule {rule.name}: {len(hits)} series ({n} instances){' + request SR' if extra else ''} sent to {target}"


# -- Orthanc glue ---------------------------------------------------------------------------------


_SETTINGS = Settings()
_QUEUE: queue.Queue[str | None] = queue.Queue()
_CHECKER = RuleChecker()
_WATCHER = StatusWatcher()
_STOP = threading.Event()


def _answer(output, status: int, body: Any) -> None:
    data = json.dumps(body)  # ASCII (json escapes the rest): characters == bytes
    if status == 200:
        output.AnswerBuffer(data, "application/json")
    elif status == 405:  # Orthanc insists on its dedicated call for 405
        output.SendMethodNotAllowed("POST")
    else:
        output.SetHttpHeader("Content-Type", "application/json")
        output.SendHttpStatus(status, data, len(data))  # plugin 4.0: (status, str, size)


def _rest(handler):
    """Wrap a REST handler: HttpError -> its status, anything else -> 500 (logged)."""

    def callback(output, uri: str, **request) -> None:
        try:
            _answer(output, 200, handler(request, *request.get("groups", ())))
        except HttpError as exc:
            _answer(output, exc.status, {"error": exc.message})
        except Exception as exc:  # a plugin bug must not take Orthanc's HTTP thread down
            orthanc.LogError(f"MedSegAgent: {uri} failed: {exc!r}")
            _answer(output, 500, {"error": "internal error in the MedSegAgent plugin (see Orthanc's log)"})

    return callback


def _on_segment(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("method") != "POST":
        raise HttpError(405, "use POST")
    # A JSON content type forces a CORS preflight: a foreign page cannot forge this request.
    content_type = request.get("headers", {}).get("content-type", "")
    if not content_type.startswith("application/json"):
        raise HttpError(415, "send a JSON body (Content-Type: application/json)")
    try:
        body = json.loads(request.get("body") or b"{}")
    except ValueError:
        raise HttpError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, 'expected {"study": ORTHANC_ID, "request": TEXT}')
    return segment(_SETTINGS, str(body.get("study", "")), body.get("request"))


def _on_study_jobs(request: dict[str, Any], study_id: str) -> dict[str, Any]:
    """The node's jobs for the study, and the status recorded on it (which outlives the node's answer)."""
    study = _study(study_id)
    uid = study["MainDicomTags"].get("StudyInstanceUID", "")
    try:
        jobs, node_error = study_jobs(_SETTINGS, uid), None
    except HttpError as exc:
        jobs, node_error = [], exc.message
    return {"study": study_id, "StudyInstanceUID": uid, "jobs": jobs, "node_error": node_error,
            "recorded": recorded_status(study_id)}  # fmt: skip


def _on_job(request: dict[str, Any], job_id: str) -> dict[str, Any]:
    if not JOB_ID.fullmatch(job_id):
        raise HttpError(400, "not a job id")
    return node_call(_SETTINGS, f"/jobs/{job_id}")


def _on_form(output, uri: str, **request) -> None:
    output.AnswerBuffer((HERE / "segment.html").read_bytes(), "text/html; charset=utf-8")


def _on_ohif_page(output, uri: str, **request) -> None:
    # ServeFolders has no single-page-app fallback: the viewer's own routes (/ohif/viewer?…) get index.html.
    output.AnswerBuffer((Path(_SETTINGS.ohif_folder) / "index.html").read_bytes(), "text/html; charset=utf-8")


def _worker() -> None:
    # STABLE_STUDY callbacks only queue the id: a C-STORE from Orthanc's change thread would block it.
    while (study_id := _QUEUE.get()) is not None:
        try:
            orthanc.LogWarning(f"MedSegAgent: stable study {study_id}: {route_stable_study(_SETTINGS, study_id)}")
        except Exception as exc:  # one study's failure must not stop routing
            orthanc.LogError(f"MedSegAgent: routing of study {study_id} failed: {exc!r}")


def _monitor() -> None:
    # Rule checks (when this engine routes) and the jobs of the studies sent, in one background thread.
    next_check = 0.0
    while not _STOP.is_set():
        try:
            if _SETTINGS.auto_routing == "python" and time.monotonic() >= next_check:
                answered = _CHECKER.refresh(_SETTINGS)
                next_check = time.monotonic() + (_SETTINGS.rule_check_seconds if answered else 15.0)
            _WATCHER.poll(_SETTINGS)
        except Exception as exc:  # never let the monitor die
            orthanc.LogError(f"MedSegAgent: status monitor: {exc!r}")
        _STOP.wait(2.0)


def _on_change(change_type, level, resource_id: str) -> None:
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        if _SETTINGS.auto_routing == "python":
            _QUEUE.put(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        _STOP.set()
        _QUEUE.put(None)


def _explorer_js(settings: Settings) -> str:
    script = (HERE / "explorer.js").read_text(encoding="utf-8")
    # json.dumps makes JS literals: configuration text cannot break out of them.
    return (
        f"var MEDSEGAGENT_DEFAULT_REQUEST = {json.dumps(settings.default_request)};\n"
        f"var MEDSEGAGENT_OHIF_ROOT = {json.dumps(settings.ohif_root)};\n{script}"
    )


def register() -> None:
    """Entry point when Orthanc loads this file."""
    global _SETTINGS
    _SETTINGS = parse_settings(json.loads(orthanc.GetConfiguration()))
    for problem in _SETTINGS.problems:
        orthanc.LogError(f"MedSegAgent: {problem}")
    orthanc.RegisterRestCallback("/medsegagent/segment", _rest(_on_segment))
    orthanc.RegisterRestCallback("/medsegagent/studies/([0-9a-f-]{44})/jobs", _rest(_on_study_jobs))
    orthanc.RegisterRestCallback("/medsegagent/jobs/([0-9a-f]{32})", _rest(_on_job))
    orthanc.RegisterRestCallback("/medsegagent/ui/segment.html", _on_form)
    if _SETTINGS.ohif_root:
        # Paths without a dot are the viewer's routes; files (all with a dot) are left to ServeFolders.
        orthanc.RegisterRestCallback(_SETTINGS.ohif_root.rstrip("/") + "(?:/[^.]*)?", _on_ohif_page)
    orthanc.ExtendOrthancExplorer(_explorer_js(_SETTINGS))
    if _SETTINGS.auto_routing == "python":
        threading.Thread(target=_worker, name="medsegagent-routing", daemon=True).start()
    orthanc.RegisterOnChangeCallback(_on_change)
    threading.Thread(target=_monitor, name="medsegagent-status", daemon=True).start()
    orthanc.LogWarning(
        f"MedSegAgent plugin: node modality {_SETTINGS.node_modality!r}, API {_SETTINGS.node_url or '-'}, "
        f"auto-routing {_SETTINGS.auto_routing} ({len(_SETTINGS.rules)} rule(s)), OHIF {_SETTINGS.ohif_root or 'off'}"
    )


if orthanc is not None:
    register()
