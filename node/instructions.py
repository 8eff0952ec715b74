"""Find a study's request text, from the configured instruction sources in order.

Sources (see :class:`~medsegagent.node.config.InstructionSource`):

``request``
    Text given explicitly with the job (HTTP API, Orthanc button).
``sr``
    An SR document in the study: the first TEXT content item (the Orthanc
    plugin writes the request this way, so it is archived with the images).
``worklist``
    Modality worklist C-FIND by Accession Number (else Study Instance UID):
    Scheduled Procedure Step Description, Requested Procedure Description,
    Reason for the Requested Procedure.
``tags``
    The study's Requested Procedure Description, then Study Description.
``preset``
    The request bound to the Called AE Title the study was sent to.

A source "yields" when it gives text from which the router selects at least
one dataset; otherwise the next source is tried and the reasons are kept.

Every text is held to the limits of ``instructions:`` (length, number of
targets) first.  A request that is present but breaks them, or an SR request
whose text is blank, is *unusable*: the job fails with
:attr:`~medsegagent.node.jobs.FailureReason.REQUEST_UNUSABLE`, or, with
``on_unusable_request: fallback``, the next sources are tried and the
result records what was passed over and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind

from medsegagent.models.parse import parse_request
from medsegagent.node.config import Config, InstructionSettings, InstructionSource, UnusableRequest
from medsegagent.node.jobs import FailureReason
from medsegagent.node.manifest import StudyManifest
from medsegagent.node.scu import scu_ae, set_nodelay

log = logging.getLogger(__name__)

_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

#: Document titles of SRs that report results rather than ask for work: the node's own TID 1500
#: volume report (sent back with the study), and CT / radiopharmaceutical dose reports (TID 10011,
#: 10021). Their TEXT items (comments) are never a request.
_RESULT_TITLES = frozenset({("126000", "DCM"), ("113701", "DCM"), ("113500", "DCM")})


@dataclass(frozen=True)
class Problem:
    """Why a request text cannot be used."""

    reason: FailureReason
    detail: str


@dataclass(frozen=True)
class Attempt:
    """One instruction source that was tried and not used."""

    source: InstructionSource
    detail: str
    reason: FailureReason | None = None  #: ``None``: the source had no text
    text: str | None = None

    def to_json(self) -> dict[str, str]:
        """``{"source", "reason", "text"?}`` (the text cut to 200 characters)."""
        out = {"source": self.source.value, "reason": self.detail}
        if self.text is not None:
            out["text"] = self.text if len(self.text) <= 200 else self.text[:200] + "…"
        return out


@dataclass
class Instruction:
    """The chosen request and how it was found.

    Attributes
    ----------
    text, source
        The request and its source; ``None`` when no source was usable.
    tried
        The sources tried before, with the reason each was passed over.
    fallback
        The unusable request passed over under ``on_unusable_request: fallback``.
    refused
        The unusable request that ends the job under ``on_unusable_request: fail``.
    """

    text: str | None
    source: InstructionSource | None
    tried: list[Attempt] = field(default_factory=list)
    fallback: Attempt | None = None
    refused: Attempt | None = None

    def failure(self) -> Problem:
        """Why no request was found (for a job that fails with it)."""
        if self.refused is not None:
            return Problem(FailureReason.REQUEST_UNUSABLE, f"the {self.refused.source.value} request is unusable: "
                           f"{self.refused.detail}")  # fmt: skip
        found = {a.reason for a in self.tried}
        order = (FailureReason.NO_MODEL_INSTALLED, FailureReason.NOTHING_MATCHED, FailureReason.REQUEST_UNUSABLE)
        reason = next((r for r in order if r in found), FailureReason.NO_REQUEST)
        tried = "; ".join(f"{a.source.value}: {a.detail}" for a in self.tried) or "no sources configured"
        return Problem(reason, f"no usable request ({tried})")


def request_problem(text: str, limits: InstructionSettings) -> str | None:
    """Why ``text`` breaks the request limits, or ``None`` when it does not.

    Targets are counted as the grammar splits the request (cheap, before any planning).
    """
    if not text.strip():
        return "the request text is empty"
    if len(text) > limits.max_request_chars:
        return (f"the request has {len(text):,} characters, more than the {limits.max_request_chars:,} allowed "
                "(instructions.max_request_chars)")  # fmt: skip
    targets = len(parse_request(text).targets)
    if targets > limits.max_targets:
        return (f"the request names {targets} targets, more than the {limits.max_targets} allowed "
                "(instructions.max_targets)")  # fmt: skip
    return None


def study_headers(study_dir: Path, job_id: str | None = None, files: Iterable[str] | None = None) -> Iterator[Dataset]:
    """Headers of the study's instances (pixel data left on disk): all of them, or ``files`` (relative paths)."""
    paths = sorted(Path(study_dir).rglob("*.dcm")) if files is None else [Path(study_dir) / f for f in files]
    for path in paths:
        try:
            yield pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # a file that does not parse is not a reason to lose the study
            log.warning("job %s: cannot read %s: %s", job_id or "-", path.name, exc)


def sr_request(study_dir: Path, job_id: str | None = None, manifest: StudyManifest | None = None) -> str | None:
    """First non-blank TEXT content item of the newest SR document in the study.

    With the study's ``manifest`` only the SR files it names are read; without it, every header.

    Newest by Content Date/Time (then Instance Creation Date/Time): a second
    request on the same study must win over the first one.  An SR whose TEXT
    items are all blank gives ``""`` (a request present but empty); an SR
    without TEXT items is not a request.
    """
    requests: list[tuple[str, str]] = []
    for ds in study_headers(study_dir, job_id, manifest.sr_files if manifest is not None else None):
        if not str(ds.get("SOPClassUID", "")).startswith(_SR_PREFIX) or _document_title(ds) in _RESULT_TITLES:
            continue
        text = _first_text(ds.get("ContentSequence", []))
        if text is not None:
            when = "".join(str(ds.get(k, "") or "") for k in ("ContentDate", "ContentTime"))
            when = when or "".join(str(ds.get(k, "") or "") for k in ("InstanceCreationDate", "InstanceCreationTime"))
            requests.append((when, text))
    return max(requests, key=lambda item: item[0])[1] if requests else None


def _document_title(ds: Dataset) -> tuple[str, str] | None:
    """(Code Value, Coding Scheme Designator) of an SR's root Concept Name, or ``None``."""
    titles = ds.get("ConceptNameCodeSequence") or []
    if not titles:
        return None
    return str(titles[0].get("CodeValue", "")), str(titles[0].get("CodingSchemeDesignator", ""))


def _first_text(items: list[Dataset]) -> str | None:
    """The first non-blank TEXT value under ``items``; ``""`` when all are blank, ``None`` when none exists."""
    blank = False
    for item in items:
        if item.get("ValueType") == "TEXT":
            text = str(item.get("TextValue", "") or "").strip()
            if text:
                return text
            blank = True
        nested = _first_text(item.get("ContentSequence", []))
        if nested:
            return nested
        blank = blank or nested == ""
    return "" if blank else None


def tag_request(study_dir: Path, job_id: str | None = None, manifest: StudyManifest | None = None) -> str | None:
    """Requested Procedure Description (or in the Request Attributes), else Study Description.

    With the study's ``manifest``, its keys: the intake's scan read the Requested Procedure
    Description at the top level and inside the Request Attributes Sequence, so no file is
    parsed; only instances whose sequence the scan could not walk (and journals of older
    versions) are read, up to the first that names a procedure.
    """
    if manifest is not None:
        keys = manifest.keys
        named = keys.requested_procedure_description or keys.request_attributes_procedure
        if named:
            return named
        carriers = study_headers(study_dir, job_id, manifest.request_attribute_files)
        return _requested_procedure(carriers) or keys.study_description or None
    headers = list(study_headers(study_dir, job_id))
    return _requested_procedure(headers) or _study_description(headers)


def _requested_procedure(headers: Iterable[Dataset]) -> str | None:
    """The first Requested Procedure Description, top-level or in the Request Attributes Sequence."""
    for ds in headers:
        text = str(ds.get("RequestedProcedureDescription", "") or "").strip()
        for item in ds.get("RequestAttributesSequence", []):
            text = text or str(item.get("RequestedProcedureDescription", "") or "").strip()
        if text:
            return text
    return None


def _study_description(headers: list[Dataset]) -> str | None:
    for ds in headers:
        text = str(ds.get("StudyDescription", "") or "").strip()
        if text:
            return text
    return None


class WorklistMismatch(LookupError):
    """The worklist items found for a study belong to another patient."""


def same_patient(study: Dataset, item: Dataset) -> bool:
    """Whether a worklist ``item`` is for the patient of ``study``.

    Patient ID must be equal; Patient's Name too when both carry one
    (compared by its alphabetic components, case and spacing aside).
    """
    if str(study.get("PatientID", "") or "").strip() != str(item.get("PatientID", "") or "").strip():
        return False
    names = [_name_key(ds.get("PatientName")) for ds in (study, item)]
    return not all(names) or names[0] == names[1]


def _name_key(value: object) -> str:
    alphabetic = str(value or "").split("=")[0]
    parts = [" ".join(part.split()).upper() for part in alphabetic.split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def worklist_request(study_dir: Path, config: Config, timeout: float = 10.0, job_id: str | None = None,
                     manifest: StudyManifest | None = None) -> str | None:  # fmt: skip
    """Query the configured worklist SCP for the study's scheduled procedure.

    Only items for the study's patient count (:func:`same_patient`).  The keys come from the
    study's ``manifest`` when given, else from its first header.

    Raises
    ------
    ConnectionError
        The worklist SCP did not accept the association.
    WorklistMismatch
        Items matched the Accession Number (or Study Instance UID) but are for another patient.
    """
    if config.worklist is None:
        return None
    header = _key_header(manifest) if manifest is not None else next(study_headers(study_dir, job_id), None)
    if header is None:
        return None
    query = Dataset()
    query.AccessionNumber = str(header.get("AccessionNumber", "") or "")
    query.StudyInstanceUID = "" if query.AccessionNumber else str(header.get("StudyInstanceUID", ""))
    query.PatientID = ""
    query.PatientName = ""
    query.RequestedProcedureDescription = ""
    query.ReasonForTheRequestedProcedure = ""
    step = Dataset()
    step.ScheduledProcedureStepDescription = ""
    step.Modality = ""
    query.ScheduledProcedureStepSequence = [step]
    ae = scu_ae(config.node.ae_title, timeout)
    ae.add_requested_context(ModalityWorklistInformationFind)
    wl = config.worklist
    assoc = ae.associate(wl.host, wl.port, ae_title=wl.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        raise ConnectionError(f"worklist {wl.ae_title}@{wl.host}:{wl.port} did not accept the association")
    others = 0
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status is None or identifier is None or status.Status not in (0xFF00, 0xFF01):
                continue
            if not same_patient(header, identifier):
                others += 1
                continue
            candidates = [
                str(item.get("ScheduledProcedureStepDescription", "") or "")
                for item in identifier.get("ScheduledProcedureStepSequence", [])
            ]
            candidates += [
                str(identifier.get("RequestedProcedureDescription", "") or ""),
                str(identifier.get("ReasonForTheRequestedProcedure", "") or ""),
            ]
            for text in candidates:
                if text.strip():
                    return text.strip()
    finally:
        if assoc.is_established:  # an early return leaves pending responses; release still ends it cleanly
            assoc.release()
    if others:
        # Patient identifiers stay out of the message: it goes to logs and the job's error.
        key = "Accession Number" if query.AccessionNumber else "Study Instance UID"
        raise WorklistMismatch(f"{others} worklist item(s) match the study's {key} but are for another patient "
                               "(Patient ID or Patient's Name differs)")  # fmt: skip
    return None


def _key_header(manifest: StudyManifest) -> Dataset | None:
    """The manifest's worklist keys as the header :func:`worklist_request` reads them (``None``: no instances)."""
    if not manifest.series:
        return None
    keys = manifest.keys
    header = Dataset()
    header.AccessionNumber = keys.accession_number
    header.StudyInstanceUID = manifest.study_instance_uid
    header.PatientID = keys.patient_id
    header.PatientName = keys.patient_name
    return header


def resolve_instruction(
    study_dir: Path,
    config: Config,
    *,
    explicit: str | None,
    called_ae: str | None,
    usable: Callable[[str], Problem | None],
    job_id: str | None = None,
    manifest: StudyManifest | None = None,
) -> Instruction:
    """Walk the configured sources in order and return the first usable request.

    Parameters
    ----------
    study_dir : Path
        The spooled study.
    config : Config
        Source order, presets, worklist, request limits.
    explicit : str, optional
        Text given with the job.
    called_ae : str, optional
        The AE title the study was sent to (presets).
    usable : callable
        ``text -> None`` when the router can serve ``text``, else the :class:`Problem`.
    job_id : str, optional
        Named in log lines.
    manifest : StudyManifest, optional
        The study's manifest: the SR, worklist and tags sources read it instead of every header.

    Returns
    -------
    Instruction
        With ``text`` ``None`` when no source is usable (:meth:`Instruction.failure` says why).
    """
    result = Instruction(None, None)
    limits = config.instructions
    for source in config.instruction_sources:
        try:
            text = _text_from(source, study_dir, config, explicit, called_ae, job_id, manifest)
        except Exception as exc:  # a worklist that is down must not stop the other sources
            log.warning("job %s: instruction source %s failed: %s", job_id or "-", source.value, exc)
            result.tried.append(Attempt(source, f"failed: {exc}"))
            continue
        if text is None:
            result.tried.append(Attempt(source, "no text"))
            continue
        broken = request_problem(text, limits)
        if broken:
            attempt = Attempt(source, broken, FailureReason.REQUEST_UNUSABLE, text)
            log.warning("job %s: the %s request is unusable: %s", job_id or "-", source.value, broken)
            if limits.on_unusable_request is UnusableRequest.FAIL:
                result.refused = attempt
                return result
            result.fallback = result.fallback or attempt
            result.tried.append(attempt)
            continue
        problem = usable(text)
        if problem:
            result.tried.append(Attempt(source, problem.detail, problem.reason, text))
            continue
        result.text, result.source = text, source
        return result
    return result


def _text_from(
    source: InstructionSource,
    study_dir: Path,
    config: Config,
    explicit: str | None,
    called_ae: str | None,
    job_id: str | None,
    manifest: StudyManifest | None,
) -> str | None:
    if source is InstructionSource.REQUEST:
        return explicit
    if source is InstructionSource.SR:
        return sr_request(study_dir, job_id, manifest)
    if source is InstructionSource.WORKLIST:
        return worklist_request(study_dir, config, job_id=job_id, manifest=manifest)
    if source is InstructionSource.TAGS:
        return tag_request(study_dir, job_id, manifest)
    return config.presets.get((called_ae or "").strip())
