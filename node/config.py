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

The schema is a tree of frozen pydantic models that refuse unknown keys;
:func:`parse_config` turns pydantic's errors into one :class:`ConfigError`
that names, for every problem, the key path, the bad value and what is
allowed.  Relative paths are relative to the configuration file.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from medsegagent import is_loopback
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


class RemoteKind(enum.Enum):
    """How the node talks to a PACS: DIMSE on its DICOM port, or DICOMweb over HTTP."""

    DICOM = "dicom"
    DICOMWEB = "dicomweb"


class RetrieveMethod(enum.Enum):
    """How a study is pulled from a DICOM source."""

    MOVE = "move"  # C-MOVE to the node's own AE title: the source must know the node
    GET = "get"  # C-GET: the instances come back on the node's association


class ExecutorKind(enum.Enum):
    """Where the models of a study run."""

    INPROCESS = "inprocess"
    RAY = "ray"


# -- value types: each check names the bad value and what is allowed (ConfigError adds the key path) ------------

#: Error types whose message already shows the value (pydantic's own get "(got ...)" appended).
_OWN_ERRORS = ("invalid_value", "invalid_combination")


def _invalid(value: Any, allowed: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", "{value} " + allowed, {"value": repr(value)})


def _combination(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_combination", message)


def _ae_title(value: Any) -> str:
    # YAML reads ``ae_title: 1234`` as a number; it is still a valid title.
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not is_valid_ae_title(text):
        raise _invalid(value, "is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return text.strip()


def _port(lowest: int) -> BeforeValidator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= 65535:
            raise _invalid(value, f"is not a valid TCP port ({lowest}-65535)")
        return value

    return BeforeValidator(check)


_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def _host(value: Any) -> str:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOST_NAME.fullmatch(value):
                return value
    raise _invalid(value, "is not an IP address or host name")


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise _invalid(value, "is not an environment variable name (letters, digits and _)")
    return value


def _name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise _invalid(value, "is not a name (1-64 letters, digits, '.', '_' or '-', a letter or digit first)")
    return value


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the configuration file's folder, not to the working directory."""
    path = value.expanduser()
    source = (info.context or {}).get("source")
    return source.resolve().parent / path if source is not None and not path.is_absolute() else path


def _readable_file(path: Path) -> Path:
    if not path.is_file():
        raise _invalid(str(path), "is not a readable file")
    return path


def _text(value: str) -> str:
    if not value.strip():
        raise _invalid(value, "must not be empty")
    return value.strip()


AeTitle = Annotated[str, BeforeValidator(_ae_title)]
Port = Annotated[int, _port(1)]
#: A port the node listens on; 0 lets the system pick a free one (tests, several nodes on one machine).
ListenPort = Annotated[int, _port(0)]
Host = Annotated[str, BeforeValidator(_host)]
EnvName = Annotated[str, AfterValidator(_env_name)]
Name = Annotated[str, AfterValidator(_name)]
Text = Annotated[str, AfterValidator(_text)]
ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]
ConfigFile = Annotated[Path, AfterValidator(_relative_to_config), AfterValidator(_readable_file)]
# Strict: YAML's ``5`` is a number but ``"5"`` or ``true`` is not.
Positive = Annotated[float, Field(gt=0, strict=True)]
NonNegative = Annotated[float, Field(ge=0, strict=True)]
Count = Annotated[int, Field(ge=1, strict=True)]
NonNegativeCount = Annotated[int, Field(ge=0, strict=True)]


class _Section(BaseModel):
    """A mapping of the configuration: frozen, and an unknown key is an error, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def yaml_keys(cls) -> tuple[str, ...]:
        """The keys this section takes in the YAML file."""
        return tuple(cls.model_fields)


# -- sections -----------------------------------------------------------------------------------------------------


class InstructionSettings(_Section):
    """Limits on a request text (``instructions:``), whatever its source."""

    max_request_chars: Count = 2000
    max_targets: Count = 64
    on_unusable_request: UnusableRequest = UnusableRequest.FAIL


class TlsSettings(_Section):
    """DICOM over TLS (BCP 195): the node's certificate and key, and whom to trust."""

    certificate: ConfigFile
    private_key: ConfigFile
    ca_certificates: ConfigFile | None = None
    require_client_certificate: StrictBool = False

    @model_validator(mode="after")
    def _clients_need_a_ca(self) -> Self:
        if self.require_client_certificate and self.ca_certificates is None:
            raise _combination("require_client_certificate needs ca_certificates to verify clients against")
        return self


class NodeSettings(_Section):
    """The node's own DICOM identity and storage."""

    ae_title: AeTitle = "MEDSEG"
    host: Host = "127.0.0.1"
    port: ListenPort = 11112
    # validate_default: the default ./var is relative to the configuration file too.
    data_dir: ConfigPath = Field(default=Path("./var"), validate_default=True)
    quiet_seconds: Positive = 5.0
    max_associations: Count = 8
    #: Connections not yet associated (one more closes the oldest) and the seconds they have to do so.
    max_pending_connections: Count = 32
    association_request_seconds: Positive = 5.0
    max_study_instances: Count = 5000
    min_free_disk_mb: NonNegativeCount = 1024
    collection: str | None = None
    intake_processes: Count = 1
    tls: TlsSettings | None = None
    #: The models folder (``${MEDSEG_MODELS}`` of registry locations); ``None``: the environment's.
    models_dir: ConfigPath | None = None
    #: Keep freed memory in the process for the next study (:mod:`medsegagent.node.memory`).
    retain_memory: StrictBool = True


class Peer(_Section):
    """A caller allowed to associate (AE title and optional address)."""

    ae_title: AeTitle
    host: Host | None = None


class WebEndpoint(_Section):
    """A DICOMweb service (its base URL, e.g. ``https://pacs/dicom-web``), its credentials and TLS.

    Secrets are never in the configuration: a bearer token or a password is
    read, when it is used, from an environment variable or a file.
    """

    url: str
    token_env: EnvName | None = None
    token_file: ConfigFile | None = None
    username: Text | None = None
    password_env: EnvName | None = None
    password_file: ConfigFile | None = None
    #: ``false`` turns certificate checks off; ``ca_certificates`` names the CA file of a private PKI instead.
    tls_verify: StrictBool = True
    ca_certificates: ConfigFile | None = None
    timeout_s: Positive = 60.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise _invalid(url, "is not an http(s) URL")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> Self:
        token = [key for key in ("token_env", "token_file") if getattr(self, key)]
        password = [key for key in ("password_env", "password_file") if getattr(self, key)]
        if len(token) > 1 or len(password) > 1 or (token and (password or self.username)):
            raise _combination("give one of token_env, token_file, or username with password_env or password_file")
        if bool(self.username) != bool(password):
            raise _combination("username needs password_env or password_file (and these need a username)")
        parsed = urllib.parse.urlsplit(self.url)
        if (token or password) and parsed.scheme == "http" and not is_loopback(parsed.hostname or ""):
            raise _combination(f"{self.url}: credentials would cross the network in clear text; use https")
        return self


class _Remote(_Section):
    """What destinations and sources share: a DIMSE address or a DICOMweb endpoint, by ``kind``.

    In the YAML file a DICOMweb endpoint's keys sit beside ``name`` and
    ``kind``; they are gathered into :attr:`web` here.  Each kind refuses
    the keys of the other.
    """

    #: Keys of ``kind: dicom`` only.
    _DIMSE_KEYS: ClassVar[tuple[str, ...]] = ("ae_title", "host", "port")

    name: Name
    kind: RemoteKind = RemoteKind.DICOM
    ae_title: AeTitle = ""
    host: Host = ""
    port: Port = 0
    web: WebEndpoint | None = None

    @classmethod
    def yaml_keys(cls) -> tuple[str, ...]:
        """The keys this section takes in the YAML file (the DICOMweb keys flat, no ``web``)."""
        own = [key for key in cls.model_fields if key != "web"]
        return (*own, *(key for key in WebEndpoint.model_fields if key not in own))

    @model_validator(mode="before")
    @classmethod
    def _gather_web_keys(cls, data: Any) -> Any:
        kinds = {kind.value: kind for kind in RemoteKind}
        if not isinstance(data, dict) or data.get("kind", "dicom") not in kinds:
            return data  # pydantic names the wrong type or the unknown kind
        if "web" in data:
            raise _combination("web: unknown key (a DICOMweb endpoint's keys sit beside name and kind)")
        kind = kinds[data.get("kind", "dicom")]
        web_keys = [key for key in data if key in WebEndpoint.model_fields]
        if kind is RemoteKind.DICOM:
            foreign = [key for key in web_keys if key not in cls.model_fields]
            own = dict(data)
        else:
            foreign = [key for key in cls._DIMSE_KEYS if key in data]
            own = {key: value for key, value in data.items() if key not in web_keys or key in cls.model_fields}
            own["web"] = {key: data[key] for key in web_keys}
        if foreign:
            other = RemoteKind.DICOMWEB if kind is RemoteKind.DICOM else RemoteKind.DICOM
            what = "a key" if len(foreign) == 1 else "keys"
            raise _combination(f"{', '.join(foreign)}: {what} of kind {other.value}, not of kind {kind.value}")
        return own

    @model_validator(mode="after")
    def _dimse_address(self) -> Self:
        missing = [key for key in ("ae_title", "host", "port") if key not in self.model_fields_set]
        if self.kind is RemoteKind.DICOM and missing:
            raise _combination(f"kind dicom needs {', '.join(missing)}")
        return self

    def describe(self) -> str:
        """``AE@host:port`` or the DICOMweb URL, for log lines and errors."""
        return self.web.url if self.web is not None else f"{self.ae_title}@{self.host}:{self.port}"


def _seg_type(value: Any) -> Any:
    """``seg_type`` in either case; BINARY or LABELMAP only (the node fuses to labels: no FRACTIONAL)."""
    if isinstance(value, str) and value.upper() in (SegType.BINARY.value, SegType.LABELMAP.value):
        return SegType(value.upper())
    if isinstance(value, SegType) and value is not SegType.FRACTIONAL:
        return value
    raise _invalid(value, "is not a SEG type a destination takes (BINARY or LABELMAP)")


class Destination(_Remote):
    """Where results are stored: C-STORE to an AE (``kind: dicom``) or STOW-RS (``kind: dicomweb``)."""

    volume_report: StrictBool = False
    preview_sc: StrictBool = False
    #: The SEG this destination gets: BINARY (every viewer reads it) or LABELMAP (RLE, 10x smaller, newer).
    seg_type: Annotated[SegType, BeforeValidator(_seg_type)] = SegType.BINARY


class Source(_Remote):
    """A PACS the node may pull a study from (``POST /jobs`` with ``source``).

    ``kind: dicom`` retrieves by C-MOVE to the node's own AE title or by
    C-GET; ``kind: dicomweb`` by WADO-RS (its ``timeout_s`` is the HTTP one).
    """

    _DIMSE_KEYS: ClassVar[tuple[str, ...]] = ("ae_title", "host", "port", "retrieve")

    retrieve: RetrieveMethod = RetrieveMethod.MOVE
    #: Positive a C-MOVE or C-GET may take.
    timeout_s: Positive = 600.0


class Worklist(_Section):
    """The modality worklist SCP queried for requests."""

    ae_title: AeTitle
    host: Host
    port: Port


class HttpSettings(_Section):
    """HTTP API binding and the environment variable holding its bearer token."""

    host: Host = "127.0.0.1"
    port: ListenPort = 8080
    token_env: EnvName = "MEDSEG_TOKEN"
    enabled: StrictBool = True


class McpSettings(_Section):
    """Where ``medsegagent mcp --transport http`` listens (it takes the HTTP API's token)."""

    host: Host = "127.0.0.1"
    port: Port = 8765


class Delivery(_Section):
    """Retry policy of the outbox."""

    retry_initial_seconds: Positive = 5.0
    retry_max_seconds: Positive = 300.0
    give_up_after_hours: Positive = 72.0


def _ray_address(value: str | None) -> str | None:
    if value is None or value == "auto" or re.fullmatch(r"(ray://)?[^:/\s]+(:\d{1,5})?", value):
        return value
    raise _invalid(value, "is not null, auto, HOST:PORT or ray://HOST:PORT")


def _placement(value: dict[str, Any]) -> dict[str, Any]:
    from medsegagent.models.ray_executor import ModelPlacement  # plain data; Ray itself is imported on use

    try:
        ModelPlacement.of(value)
    except (TypeError, ValueError) as exc:
        raise _combination(str(exc)) from None
    return value


_LOCAL_RAY_KEYS = ("num_cpus", "num_gpus", "object_store_mb", "resources", "temp_dir")


def _local_ray(value: dict[str, Any]) -> dict[str, Any]:
    if unknown := sorted(set(value) - set(_LOCAL_RAY_KEYS)):
        raise _invalid(unknown, f"are not keys of a local Ray (known: {', '.join(_LOCAL_RAY_KEYS)})")
    return value


class ExecutorSettings(_Section):
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
    address: Annotated[str | None, AfterValidator(_ray_address)] = None
    workers: Count = 2
    timeout_s: Positive | None = None
    num_cpus_per_model: NonNegative = 1.0
    num_gpus_per_model: NonNegative = 0.0
    replicas: Count = 1
    spread: StrictBool = False
    max_restarts: NonNegativeCount = 3
    max_task_retries: NonNegativeCount = 3
    retries: NonNegativeCount = 2
    head_grace_s: Positive = 15.0
    max_job_attempts: Count = 3
    retry_delay_s: NonNegative = 10.0
    # Placements are checked here so that a typo fails at start, not at the first study.
    models: dict[str, Annotated[dict[str, Any], AfterValidator(_placement)]] = {}
    local: Annotated[dict[str, Any], AfterValidator(_local_ray)] = {}


class Config(_Section):
    """The whole node configuration."""

    node: NodeSettings = NodeSettings()
    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    #: Called AE Title -> request text.
    presets: dict[AeTitle, Text] = {}
    worklist: Worklist | None = None
    instruction_sources: tuple[InstructionSource, ...] = tuple(InstructionSource)
    instructions: InstructionSettings = InstructionSettings()
    http: HttpSettings = HttpSettings()
    delivery: Delivery = Delivery()
    executor: ExecutorSettings = ExecutorSettings()
    mcp: McpSettings = McpSettings()
    #: PACS the node may pull studies from (``sources:``; not :attr:`instruction_sources`).
    sources: tuple[Source, ...] = ()
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this configuration was read from (``None``: built in code)."""
        return self._source

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # ``http:`` with nothing under it is the defaults; node is always validated, for data_dir's default.
        if not isinstance(data, dict):
            return data
        return {"node": {}, **{key: value for key, value in data.items() if value is not None}}

    @field_validator("destinations", "sources")
    @classmethod
    def _unique_names(cls, remotes: tuple[_Remote, ...]) -> tuple[_Remote, ...]:
        names = [remote.name for remote in remotes]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise _combination(f"names must be unique ({', '.join(twice)} more than once)")
        return remotes

    @field_validator("instruction_sources")
    @classmethod
    def _worklist_configured(cls, sources: tuple[InstructionSource, ...], info: ValidationInfo) -> Any:
        if InstructionSource.WORKLIST in sources and info.data.get("worklist") is None:
            raise _combination("'worklist' is listed but no worklist section is configured")
        return sources

    @field_validator("sources")
    @classmethod
    def _move_sources_are_peers(cls, sources: tuple[Source, ...], info: ValidationInfo) -> tuple[Source, ...]:
        # A C-MOVE source sends the study to the node itself: the node's allow-list must let it in.
        allowed = {peer.ae_title for peer in info.data.get("peers", ())}
        for src in sources:
            moves = src.kind is RemoteKind.DICOM and src.retrieve is RetrieveMethod.MOVE
            if allowed and moves and src.ae_title not in allowed:
                raise _combination(
                    f"{src.name}: C-MOVE brings the study from {src.ae_title}, which is not among the peers"
                )
        return sources

    @model_validator(mode="after")
    def _remember_source(self, info: ValidationInfo) -> Self:
        self._source = (info.context or {}).get("source")
        return self


def parse_config(data: Any, source: Path | None = None) -> Config:
    """Validate a parsed YAML document into a :class:`Config`.

    Parameters
    ----------
    data : Any
        The document (``None``, an empty file, is the defaults).
    source : Path, optional
        The file it was read from: relative paths are relative to its folder.

    Raises
    ------
    ConfigError
        Listing every problem with its key path, value and what is allowed
        (``node.port: 70000 is not a valid TCP port (0-65535)``).
    """
    where = f"{source}: " if source else ""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}the top level must be a mapping of sections, not {type(data).__name__}")
    try:
        return Config.model_validate(data or {}, context={"source": source})
    except ValidationError as exc:
        problems = [_problem(error) for error in exc.errors(include_url=False)]
        raise ConfigError(where + "invalid configuration:\n  - " + "\n  - ".join(problems)) from None


#: Pydantic's words for a wrong container, in the words of a YAML file.
_SHAPES = {"model_type": "a mapping", "dict_type": "a mapping", "tuple_type": "a list", "list_type": "a list"}


def _problem(error: ErrorDetails) -> str:
    """One line of a :class:`ConfigError`: ``key.path: what is wrong (got value)``."""
    # ``web`` is internal (its keys sit flat in the file); ``[key]`` marks a mapping key's own error.
    loc = [part for part in error["loc"] if part not in ("web", "[key]")]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        known = _section_at(error["loc"][:-1]).yaml_keys()
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        return f"{where}: unknown {'section' if len(loc) == 1 else 'key'}{hint} (known: {', '.join(known)})"
    if kind == "missing":
        return f"{where}: required"
    message = f"expected {_SHAPES[kind]}" if kind in _SHAPES else error["msg"]
    if kind not in _OWN_ERRORS and not isinstance(value, dict | list):
        message += f" (got {value!r})"
    return f"{where or 'configuration'}: {message}"


def _section_at(loc: tuple[int | str, ...]) -> type[_Section]:
    """The section (model) at a location of a validation error."""
    section: type[_Section] = Config
    for part in loc:
        if isinstance(part, str) and part in section.model_fields:
            section = _section_in(section.model_fields[part].annotation) or section
    return section


def _section_in(annotation: Any) -> type[_Section] | None:
    if isinstance(annotation, type) and issubclass(annotation, _Section):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (tuple, typing.Union):
        return next(filter(None, map(_section_in, typing.get_args(annotation))), None)
    return None


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
