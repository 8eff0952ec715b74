"""Node configuration (YAML), validated at start with clear errors.

The contract (more keys may be added)::

    node: {ae_title: MEDSEG, host: 127.0.0.1, port: 11112, data_dir: ./var, quiet_seconds: 5}
          # models_dir: /srv/medseg/models   (sets MEDSEG_MODELS for the node; see docs/models.md)
    peers: [{ae_title: ORTHANC, host: 127.0.0.1}]          # allow-list of callers
    destinations: [{name: pacs, ae_title: ORTHANC, host: 127.0.0.1, port: 4242},
                   {name: web, kind: dicomweb, url: https://pacs/dicom-web, token_env: PACS_TOKEN}]
    sources: [{name: pacs, ae_title: ORTHANC, host: 127.0.0.1, port: 4242, retrieve: move}]   # or get, or
             # {name: web, kind: dicomweb, url: ..., username: medseg, password_file: /etc/medseg/pacs.pw}
    presets: {LIVERSEG: "liver and liver tumour"}         # Called AE Title -> request
    instruction_sources: [request, sr, worklist, tags, preset]
    instructions: {max_request_chars: 2000, max_targets: 64, on_unusable_request: fail}   # or fallback
    worklist: {ae_title: WLM, host: 127.0.0.1, port: 2005}
    http: {host: 127.0.0.1, port: 8080, token_env: MEDSEG_TOKEN}
    mcp: {host: 127.0.0.1, port: 8765}   # `medsegagent mcp --transport http` (same token; see docs/mcp.md)
    executor: {kind: inprocess}       # or {kind: ray, address: null|auto|HOST:PORT|ray://HOST:PORT,
                                      #     num_gpus_per_model: 0.5, models: {NAME: {prefer: gpu_a}}}
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medsegagent.dicom.seg import SegType
from medsegagent.dicom.uids import is_valid_ae_title


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message lists every problem."""


class InstructionSource(enum.Enum):
    """Where a job's request text may come from."""

    REQUEST = "request"
    SR = "sr"
    WORKLIST = "worklist"
    TAGS = "tags"
    PRESET = "preset"


class UnusableRequest(enum.Enum):
    """What a job does with a request that is present but breaks a limit (or is empty)."""

    FAIL = "fail"  # the job fails with reason request_unusable
    FALLBACK = "fallback"  # the next instruction sources are tried; report.json records why


@dataclass(frozen=True)
class InstructionSettings:
    """Limits on a request text (``instructions:``), whatever its source."""

    max_request_chars: int = 2000
    max_targets: int = 64
    on_unusable_request: UnusableRequest = UnusableRequest.FAIL


@dataclass(frozen=True)
class NodeSettings:
    """The node's own DICOM identity and storage."""

    ae_title: str = "MEDSEG"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: Path = Path("./var")
    quiet_seconds: float = 5.0
    max_associations: int = 8
    #: Connections not yet associated (one more closes the oldest) and the seconds they have to do so.
    max_pending_connections: int = 32
    association_request_seconds: float = 5.0
    max_study_instances: int = 5000
    min_free_disk_mb: int = 1024
    collection: str | None = None
    workers: int = 1
    intake_processes: int = 1
    tls: TlsSettings | None = None
    #: The models folder (``${MEDSEG_MODELS}`` of registry locations); ``None``: the environment's.
    models_dir: Path | None = None


@dataclass(frozen=True)
class TlsSettings:
    """DICOM over TLS (BCP 195): the node's certificate and key, and whom to trust."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class Peer:
    """A caller allowed to associate (AE title and optional address)."""

    ae_title: str
    host: str | None = None


class RemoteKind(enum.Enum):
    """How the node talks to a PACS: DIMSE on its DICOM port, or DICOMweb over HTTP."""

    DICOM = "dicom"
    DICOMWEB = "dicomweb"


class RetrieveMethod(enum.Enum):
    """How a study is pulled from a DICOM source."""

    MOVE = "move"  # C-MOVE to the node's own AE title: the source must know the node
    GET = "get"  # C-GET: the instances come back on the node's association


@dataclass(frozen=True)
class WebEndpoint:
    """A DICOMweb service (its base URL, e.g. ``https://pacs/dicom-web``), its credentials and TLS.

    Secrets are never in the configuration: a bearer token or a password is
    read, when it is used, from an environment variable or a file.
    """

    url: str
    token_env: str | None = None
    token_file: Path | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    tls_verify: bool = True
    ca_certificates: Path | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Destination:
    """Where results are stored: C-STORE to an AE (``kind: dicom``) or STOW-RS (``kind: dicomweb``)."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    volume_report: bool = False
    preview_sc: bool = False
    kind: RemoteKind = RemoteKind.DICOM
    web: WebEndpoint | None = None
    #: The SEG this destination gets: BINARY (every viewer reads it) or LABELMAP (RLE, 10x smaller, newer).
    seg_type: SegType = SegType.BINARY

    def describe(self) -> str:
        """``AE@host:port`` or the DICOMweb URL, for log lines and errors."""
        return self.web.url if self.web is not None else f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Source:
    """A PACS the node may pull a study from (``POST /jobs`` with ``source``).

    ``kind: dicom`` retrieves by C-MOVE to the node's own AE title or by
    C-GET; ``kind: dicomweb`` by WADO-RS.
    """

    name: str
    kind: RemoteKind = RemoteKind.DICOM
    ae_title: str = ""
    host: str = ""
    port: int = 0
    retrieve: RetrieveMethod = RetrieveMethod.MOVE
    timeout_s: float = 600.0
    web: WebEndpoint | None = None

    def describe(self) -> str:
        """``AE@host:port`` or the DICOMweb URL, for log lines and errors."""
        return self.web.url if self.web is not None else f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Worklist:
    """The modality worklist SCP queried for requests."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class HttpSettings:
    """HTTP API binding and the environment variable holding its bearer token."""

    host: str = "127.0.0.1"
    port: int = 8080
    token_env: str = "MEDSEG_TOKEN"
    enabled: bool = True


@dataclass(frozen=True)
class McpSettings:
    """Where ``medsegagent mcp --transport http`` listens (it takes the HTTP API's token)."""

    host: str = "127.0.0.1"
    port: int = 8765


@dataclass(frozen=True)
class Delivery:
    """Retry policy of the outbox."""

    retry_initial_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    give_up_after_hours: float = 72.0


class ExecutorKind(enum.Enum):
    """Where the models of a study run."""

    INPROCESS = "inprocess"
    RAY = "ray"


@dataclass(frozen=True)
class ExecutorSettings:
    """The model executor (``executor:`` section; see ``docs/scale-out.md``).

    ``kind: inprocess`` runs models in threads of the node (``workers`` at a
    time); ``kind: ray`` runs them on Ray actors: a private local Ray when
    ``address`` is null, else the cluster at ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``.  The other keys are
    :class:`~medsegagent.models.ray_executor.RayExecutor` parameters;
    ``models`` maps a model name to its placement (``num_cpus``,
    ``num_gpus``, ``resources``, ``prefer``, ``replicas``); ``local`` sizes a
    private local Ray (``num_cpus``, ``num_gpus``, ``object_store_mb``,
    ``resources``, ``temp_dir``).  A study whose cluster is unreachable goes
    back to the queue after ``retry_delay_s``, at most ``max_job_attempts``
    times, then fails (``POST /jobs/{id}/retry`` runs it again).
    """

    kind: ExecutorKind = ExecutorKind.INPROCESS
    address: str | None = None
    workers: int = 2
    timeout_s: float | None = None
    num_cpus_per_model: float = 1.0
    num_gpus_per_model: float = 0.0
    replicas: int = 1
    spread: bool = False
    max_restarts: int = 3
    max_task_retries: int = 3
    retries: int = 2
    head_grace_s: float = 15.0
    max_job_attempts: int = 3
    retry_delay_s: float = 10.0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    local: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """The whole node configuration."""

    node: NodeSettings = field(default_factory=NodeSettings)
    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    presets: dict[str, str] = field(default_factory=dict)
    instruction_sources: tuple[InstructionSource, ...] = tuple(InstructionSource)
    worklist: Worklist | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    delivery: Delivery = field(default_factory=Delivery)
    source: Path | None = None
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    mcp: McpSettings = field(default_factory=McpSettings)
    instructions: InstructionSettings = field(default_factory=InstructionSettings)
    #: PACS the node may pull studies from (``sources:``; not :attr:`instruction_sources`).
    sources: tuple[Source, ...] = ()


_SECTIONS = {
    "node": NodeSettings,
    "peers": Peer,
    "destinations": Destination,
    "presets": dict,
    "instruction_sources": list,
    "instructions": InstructionSettings,
    "worklist": Worklist,
    "http": HttpSettings,
    "delivery": Delivery,
    "executor": ExecutorSettings,
    "mcp": McpSettings,
    "sources": Source,
}


def _ae_title(value: Any, where: str, errors: list[str]) -> str:
    text = str(value) if value is not None else ""
    if not is_valid_ae_title(text):
        errors.append(f"{where}: {text!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return text.strip()


def _port(value: Any, where: str, errors: list[str], allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not ((0 if allow_zero else 1) <= value <= 65535):
        errors.append(f"{where}: {value!r} is not a valid TCP port")
        return 0
    return value


def _host(value: Any, where: str, errors: list[str]) -> str:
    text = str(value or "")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not text or any(c.isspace() for c in text):
            errors.append(f"{where}: {text!r} is not an IP address or host name")
    return text


def _build(cls: type, raw: Any, where: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return {}
    known = set(cls.__dataclass_fields__)
    for key in raw:
        if key not in known:
            errors.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return {k: v for k, v in raw.items() if k in known}


def parse_config(data: Any, source: Path | None = None) -> Config:
    """Validate a parsed YAML document into a :class:`Config`.

    Raises
    ------
    ConfigError
        Listing every problem with its location (``node.port: ...``).
    """
    errors: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: top level must be a mapping")
    for key in data:
        if key not in _SECTIONS:
            errors.append(f"{key}: unknown section (known: {', '.join(_SECTIONS)})")

    node_raw = _build(NodeSettings, data.get("node", {}), "node", errors)
    node = NodeSettings(
        ae_title=_ae_title(node_raw.get("ae_title", "MEDSEG"), "node.ae_title", errors),
        host=_host(node_raw.get("host", "127.0.0.1"), "node.host", errors),
        port=_port(node_raw.get("port", 11112), "node.port", errors, allow_zero=True),
        data_dir=_resolve(node_raw.get("data_dir", "./var"), source),
        quiet_seconds=_positive(node_raw.get("quiet_seconds", 5), "node.quiet_seconds", errors),
        max_associations=int(_positive(node_raw.get("max_associations", 8), "node.max_associations", errors)),
        max_pending_connections=int(
            _positive(node_raw.get("max_pending_connections", 32), "node.max_pending_connections", errors)
        ),
        association_request_seconds=_positive(
            node_raw.get("association_request_seconds", 5), "node.association_request_seconds", errors
        ),
        max_study_instances=int(
            _positive(node_raw.get("max_study_instances", 5000), "node.max_study_instances", errors)
        ),
        min_free_disk_mb=int(
            _positive(node_raw.get("min_free_disk_mb", 1024), "node.min_free_disk_mb", errors, zero=True)
        ),
        collection=node_raw.get("collection"),
        workers=int(_positive(node_raw.get("workers", 1), "node.workers", errors)),
        intake_processes=int(_positive(node_raw.get("intake_processes", 1), "node.intake_processes", errors)),
        tls=_tls(node_raw.get("tls"), source, errors),
        models_dir=_resolve(node_raw["models_dir"], source) if node_raw.get("models_dir") is not None else None,
    )

    peers = []
    for i, raw in enumerate(_list(data.get("peers", []), "peers", errors)):
        item = _build(Peer, raw, f"peers[{i}]", errors)
        host = item.get("host")
        peers.append(Peer(_ae_title(item.get("ae_title"), f"peers[{i}].ae_title", errors),
                          _host(host, f"peers[{i}].host", errors) if host is not None else None))  # fmt: skip

    destinations = [_destination(raw, f"destinations[{i}]", i, source, errors)
                    for i, raw in enumerate(_list(data.get("destinations", []), "destinations", errors))]  # fmt: skip
    if len({d.name for d in destinations}) != len(destinations):
        errors.append("destinations: names must be unique")
    retrieve_sources = [_source(raw, f"sources[{i}]", i, source, errors)
                        for i, raw in enumerate(_list(data.get("sources", []), "sources", errors))]  # fmt: skip
    if len({s.name for s in retrieve_sources}) != len(retrieve_sources):
        errors.append("sources: names must be unique")
    _check_move_sources(retrieve_sources, peers, errors)

    presets_raw = data.get("presets", {}) or {}
    presets: dict[str, str] = {}
    if not isinstance(presets_raw, dict):
        errors.append("presets: expected a mapping of Called AE Title -> request text")
    else:
        for ae, text in presets_raw.items():
            title = _ae_title(ae, f"presets.{ae}", errors)
            if not isinstance(text, str) or not text.strip():
                errors.append(f"presets.{ae}: the request text must be a non-empty string")
            else:
                presets[title] = text.strip()

    sources: list[InstructionSource] = []
    for i, raw in enumerate(_list(data.get("instruction_sources", [s.value for s in InstructionSource]),
                                  "instruction_sources", errors)):  # fmt: skip
        try:
            sources.append(InstructionSource(raw))
        except ValueError:
            known = ", ".join(s.value for s in InstructionSource)
            errors.append(f"instruction_sources[{i}]: {raw!r} is not one of {known}")

    worklist = None
    if data.get("worklist") is not None:
        item = _build(Worklist, data["worklist"], "worklist", errors)
        worklist = Worklist(
            _ae_title(item.get("ae_title"), "worklist.ae_title", errors),
            _host(item.get("host"), "worklist.host", errors),
            _port(item.get("port"), "worklist.port", errors),
        )
    if InstructionSource.WORKLIST in sources and worklist is None and "instruction_sources" in data:
        errors.append("instruction_sources: 'worklist' is listed but no worklist section is configured")

    http_raw = _build(HttpSettings, data.get("http", {}) or {}, "http", errors)
    http = HttpSettings(
        host=_host(http_raw.get("host", "127.0.0.1"), "http.host", errors),
        port=_port(http_raw.get("port", 8080), "http.port", errors, allow_zero=True),
        token_env=str(http_raw.get("token_env", "MEDSEG_TOKEN")),
        enabled=bool(http_raw.get("enabled", True)),
    )
    delivery_raw = _build(Delivery, data.get("delivery", {}) or {}, "delivery", errors)
    delivery = Delivery(
        **{k: _positive(v, f"delivery.{k}", errors) for k, v in delivery_raw.items()}  # type: ignore[arg-type]
    )
    executor = _executor(data.get("executor", {}) or {}, errors)
    mcp_raw = _build(McpSettings, data.get("mcp", {}) or {}, "mcp", errors)
    mcp = McpSettings(_host(mcp_raw.get("host", "127.0.0.1"), "mcp.host", errors),
                      _port(mcp_raw.get("port", 8765), "mcp.port", errors))  # fmt: skip
    instructions = _instructions(data.get("instructions") or {}, errors)
    if errors:
        where = f"{source}: " if source else ""
        raise ConfigError(where + "invalid configuration:\n  - " + "\n  - ".join(errors))
    return Config(
        node, tuple(peers), tuple(destinations), presets, tuple(sources), worklist, http, delivery, source, executor,
        mcp, instructions=instructions, sources=tuple(retrieve_sources),
    )  # fmt: skip


def _instructions(raw: Any, errors: list[str]) -> InstructionSettings:
    """The ``instructions`` section: request limits and what an unusable request does."""
    item = _build(InstructionSettings, raw, "instructions", errors)
    values: dict[str, Any] = {}
    for key in ("max_request_chars", "max_targets"):
        if key in item:
            values[key] = int(_positive(item[key], f"instructions.{key}", errors))
    if "on_unusable_request" in item:
        try:
            values["on_unusable_request"] = UnusableRequest(item["on_unusable_request"])
        except ValueError:
            errors.append(f"instructions.on_unusable_request: {item['on_unusable_request']!r} is not fail or fallback")
    return InstructionSettings(**values)


def _executor(raw: Any, errors: list[str]) -> ExecutorSettings:
    """The ``executor`` section; placement keys are checked here so a typo fails at start, not at the first study."""
    item = _build(ExecutorSettings, raw, "executor", errors)
    values: dict[str, Any] = {}
    try:
        values["kind"] = ExecutorKind(item.get("kind", "inprocess"))
    except ValueError:
        errors.append(f"executor.kind: {item.get('kind')!r} is not one of {', '.join(k.value for k in ExecutorKind)}")
    address = item.get("address")
    if address is not None:
        if isinstance(address, str) and (address == "auto" or re.fullmatch(r"(ray://)?[^:/\s]+(:\d{1,5})?", address)):
            values["address"] = address
        else:
            errors.append(f"executor.address: {address!r} is not null, auto, HOST:PORT or ray://HOST:PORT")
    for key in ("workers", "replicas", "max_job_attempts"):
        if key in item:
            values[key] = int(_positive(item[key], f"executor.{key}", errors))
    for key in ("max_restarts", "max_task_retries", "retries"):
        if key in item:
            values[key] = int(_positive(item[key], f"executor.{key}", errors, zero=True))
    for key in ("num_cpus_per_model", "num_gpus_per_model", "retry_delay_s"):
        if key in item:
            values[key] = _positive(item[key], f"executor.{key}", errors, zero=True)
    for key in ("timeout_s", "head_grace_s"):
        if item.get(key) is not None:
            values[key] = _positive(item[key], f"executor.{key}", errors)
    if "spread" in item:
        values["spread"] = bool(item["spread"])
    models = item.get("models") or {}
    if not isinstance(models, dict):
        errors.append("executor.models: expected a mapping of model name -> placement")
        models = {}
    from medsegagent.models.ray_executor import ModelPlacement  # plain data; Ray itself is imported on use

    for name, placement in models.items():
        if not isinstance(placement, dict):
            errors.append(f"executor.models.{name}: expected a mapping of placement keys")
            continue
        try:
            ModelPlacement.of(placement)
        except (TypeError, ValueError) as exc:
            errors.append(f"executor.models.{name}: {exc}")
    values["models"] = {str(k): dict(v) for k, v in models.items() if isinstance(v, dict)}
    local = item.get("local") or {}
    known_local = {"num_cpus", "num_gpus", "object_store_mb", "resources", "temp_dir"}
    if not isinstance(local, dict) or set(local) - known_local:
        errors.append(f"executor.local: expected a mapping with keys among {', '.join(sorted(known_local))}")
    else:
        values["local"] = dict(local)
    return ExecutorSettings(**values)


def load_config(path: Path) -> Config:
    """Read and validate a YAML configuration file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(expand_environment(data, Path(path)), Path(path))


#: ``${NAME}`` or ``${NAME:-default}``, as in the shell (``orthanc/start-orthanc.sh`` reads the same variables).
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(data: Any, source: Path | None = None, environ: Mapping[str, str] | None = None) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in the string values of a parsed configuration.

    A value that is one reference and nothing else takes the type its text
    reads as (``port: ${MEDSEG_DICOM_PORT:-11112}`` is the number 11112);
    keys are never expanded.  An empty variable counts as unset, as with the
    shell's ``:-``.

    Raises
    ------
    ConfigError
        Naming every reference to an unset variable that has no default.
    """
    environ = os.environ if environ is None else environ
    unset: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        value = environ.get(match[1]) or match[2]
        if value is None:
            unset.append(match[1])
            return ""
        return value

    def expand(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: expand(item) for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item) for item in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        text = _ENV_REFERENCE.sub(substitute, value)
        return _scalar(text) if _ENV_REFERENCE.fullmatch(value) else text

    expanded = expand(data)
    if unset:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}environment variable(s) {', '.join(sorted(set(unset)))} not set and no default")
    return expanded


def _scalar(text: str) -> int | float | bool | str:
    """A substituted value as YAML would have read it, for the types the configuration uses."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"[+-]?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?", text):  # not float(): "INF" is an AE title
        return float(text)
    return text


def _list(value: Any, where: str, errors: list[str]) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append(f"{where}: expected a list")
        return []
    return value


def _positive(value: Any, where: str, errors: list[str], zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not zero):
        errors.append(f"{where}: {value!r} must be a {'non-negative' if zero else 'positive'} number")
        return 1.0
    return float(value)


def _resolve(value: Any, source: Path | None) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and source is not None:
        path = source.resolve().parent / path
    return path


def _tls(raw: Any, source: Path | None, errors: list[str]) -> TlsSettings | None:
    if raw is None:
        return None
    item = _build(TlsSettings, raw, "node.tls", errors)
    paths = {}
    for key in ("certificate", "private_key", "ca_certificates"):
        if item.get(key) is None:
            if key != "ca_certificates":
                errors.append(f"node.tls.{key}: required")
            continue
        path = _resolve(item[key], source)
        if not path.is_file():
            errors.append(f"node.tls.{key}: {path} is not a readable file")
        paths[key] = path
    require = bool(item.get("require_client_certificate", False))
    if require and "ca_certificates" not in paths:
        errors.append("node.tls.require_client_certificate: needs ca_certificates to verify clients against")
    if "certificate" not in paths or "private_key" not in paths:
        return None
    return TlsSettings(paths["certificate"], paths["private_key"], paths.get("ca_certificates"), require)


# -- PACS endpoints: destinations (C-STORE / STOW-RS) and sources (C-MOVE / C-GET / WADO-RS) --------------------

_DIMSE_KEYS = ("ae_title", "host", "port")
_WEB_KEYS = tuple(WebEndpoint.__dataclass_fields__)


def _remote_kind(item: dict[str, Any], where: str, own: tuple[str, ...], errors: list[str]) -> RemoteKind:
    """The ``kind`` of a destination or source; each kind refuses the other kind's keys (but not ``own``)."""
    try:
        kind = RemoteKind(item.get("kind", "dicom"))
    except ValueError:
        errors.append(f"{where}.kind: {item.get('kind')!r} is not one of {', '.join(k.value for k in RemoteKind)}")
        return RemoteKind.DICOM
    foreign = _WEB_KEYS if kind is RemoteKind.DICOM else _DIMSE_KEYS
    for key in foreign:
        if key in item and key not in own:
            errors.append(f"{where}.{key}: not a key of kind {kind.value}")
    return kind


def _remote_keys(item: Any, where: str, own: tuple[str, ...], errors: list[str]) -> dict[str, Any]:
    """A destination's or source's mapping, checked for unknown keys (the web keys sit beside the others)."""
    if not isinstance(item, dict):
        errors.append(f"{where}: expected a mapping, got {type(item).__name__}")
        return {}
    known = set(own) | set(_DIMSE_KEYS) | set(_WEB_KEYS)
    for key in item:
        if key not in known:
            errors.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return item


def _destination(raw: Any, where: str, index: int, source: Path | None, errors: list[str]) -> Destination:
    own = ("name", "kind", "volume_report", "preview_sc", "seg_type")
    item = _remote_keys(raw, where, own, errors)
    kind = _remote_kind(item, where, own, errors)
    common = {"name": str(item.get("name") or f"destination{index + 1}"), "kind": kind,
              "volume_report": bool(item.get("volume_report", False)),
              "preview_sc": bool(item.get("preview_sc", False)),
              "seg_type": _seg_type(item.get("seg_type", SegType.BINARY.value), where, errors)}  # fmt: skip
    if kind is RemoteKind.DICOMWEB:
        return Destination(**common, web=_web_endpoint(item, where, source, errors))
    return Destination(**common, **_dimse_address(item, where, errors))


def _seg_type(value: Any, where: str, errors: list[str]) -> SegType:
    """A destination's ``seg_type``: BINARY or LABELMAP (the node fuses to labels: no FRACTIONAL)."""
    allowed = (SegType.BINARY, SegType.LABELMAP)
    if str(value).upper() in {t.value for t in allowed}:
        return SegType(str(value).upper())
    errors.append(f"{where}.seg_type: expected one of {', '.join(t.value for t in allowed)}, got {value!r}")
    return SegType.BINARY


def _source(raw: Any, where: str, index: int, source: Path | None, errors: list[str]) -> Source:
    own = ("name", "kind", "retrieve", "timeout_s")
    item = _remote_keys(raw, where, own, errors)
    kind = _remote_kind(item, where, own, errors)
    name = str(item.get("name") or f"source{index + 1}")
    if kind is RemoteKind.DICOMWEB:
        if "retrieve" in item:
            errors.append(f"{where}.retrieve: a DICOMweb source retrieves by WADO-RS (no retrieve key)")
        web = _web_endpoint(item, where, source, errors)
        return Source(name, kind, timeout_s=web.timeout_s, web=web)
    try:
        method = RetrieveMethod(item.get("retrieve", "move"))
    except ValueError:
        errors.append(f"{where}.retrieve: {item.get('retrieve')!r} is not one of move, get")
        method = RetrieveMethod.MOVE
    timeout = _positive(item.get("timeout_s", 600), f"{where}.timeout_s", errors)
    return Source(name, kind, **_dimse_address(item, where, errors), retrieve=method, timeout_s=timeout)


def _dimse_address(item: dict[str, Any], where: str, errors: list[str]) -> dict[str, Any]:
    return {"ae_title": _ae_title(item.get("ae_title"), f"{where}.ae_title", errors),
            "host": _host(item.get("host"), f"{where}.host", errors),
            "port": _port(item.get("port"), f"{where}.port", errors)}  # fmt: skip


def _web_endpoint(item: dict[str, Any], where: str, source: Path | None, errors: list[str]) -> WebEndpoint:
    """The DICOMweb keys of a destination or source: URL, one way to authenticate, TLS."""
    url = str(item.get("url") or "")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        errors.append(f"{where}.url: {url!r} is not an http(s) URL")
    files = {key: _resolve(item[key], source) for key in ("token_file", "password_file", "ca_certificates")
             if item.get(key) is not None}  # fmt: skip
    for key, path in files.items():
        if not path.is_file():
            errors.append(f"{where}.{key}: {path} is not a readable file")
    token = [key for key in ("token_env", "token_file") if item.get(key)]
    password = [key for key in ("password_env", "password_file") if item.get(key)]
    if len(token) > 1 or len(password) > 1 or (token and (password or item.get("username"))):
        errors.append(f"{where}: give one of token_env, token_file, or username with password_env or password_file")
    elif bool(item.get("username")) != bool(password):
        errors.append(f"{where}: username needs password_env or password_file (and these need a username)")
    credentials = bool(token or password)
    if credentials and parsed.scheme == "http" and not _is_loopback(parsed.hostname or ""):
        errors.append(f"{where}.url: credentials would cross the network in clear text; use https")
    verify = item.get("tls_verify", True)
    if not isinstance(verify, bool):
        errors.append(f"{where}.tls_verify: {verify!r} must be true or false (ca_certificates names a CA file)")
        verify = True
    return WebEndpoint(
        url=url.rstrip("/"), token_env=item.get("token_env"), token_file=files.get("token_file"),
        username=item.get("username"), password_env=item.get("password_env"),
        password_file=files.get("password_file"), tls_verify=verify, ca_certificates=files.get("ca_certificates"),
        timeout_s=_positive(item.get("timeout_s", 60), f"{where}.timeout_s", errors),
    )  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_move_sources(sources: list[Source], peers: list[Peer], errors: list[str]) -> None:
    """A C-MOVE source sends the study to the node itself: the node's allow-list must let it in."""
    allowed = {p.ae_title for p in peers}
    for i, src in enumerate(sources):
        moves = src.kind is RemoteKind.DICOM and src.retrieve is RetrieveMethod.MOVE
        if moves and peers and src.ae_title not in allowed:
            errors.append(f"sources[{i}]: C-MOVE brings the study from {src.ae_title}, which is not among the peers")
