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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind

from medsegagent.node.config import Config, InstructionSource
from medsegagent.node.scu import scu_ae, set_nodelay

log = logging.getLogger(__name__)

_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@dataclass
class Instruction:
    """The chosen request and how it was found."""

    text: str | None
    source: str | None
    tried: list[dict[str, str]] = field(default_factory=list)


def study_headers(study_dir: Path) -> Iterator[Dataset]:
    """Headers of the study's instances (pixel data left on disk)."""
    for path in sorted(Path(study_dir).rglob("*.dcm")):
        try:
            yield pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # a file that does not parse is not a reason to lose the study
            log.warning("cannot read %s: %s", path, exc)


def sr_request(study_dir: Path) -> str | None:
    """First TEXT content item of the newest SR document in the study.

    Newest by Content Date/Time (then Instance Creation Date/Time): a second
    request on the same study must win over the first one.
    """
    requests: list[tuple[str, str]] = []
    for ds in study_headers(study_dir):
        if not str(ds.get("SOPClassUID", "")).startswith(_SR_PREFIX):
            continue
        text = _first_text(ds.get("ContentSequence", []))
        if text:
            when = "".join(str(ds.get(k, "") or "") for k in ("ContentDate", "ContentTime"))
            when = when or "".join(str(ds.get(k, "") or "") for k in ("InstanceCreationDate", "InstanceCreationTime"))
            requests.append((when, text))
    return max(requests, key=lambda item: item[0])[1] if requests else None


def _first_text(items: list[Dataset]) -> str | None:
    for item in items:
        if item.get("ValueType") == "TEXT" and str(item.get("TextValue", "")).strip():
            return str(item.TextValue).strip()
        nested = _first_text(item.get("ContentSequence", []))
        if nested:
            return nested
    return None


def tag_request(study_dir: Path) -> str | None:
    """Requested Procedure Description (or in the Request Attributes), else Study Description."""
    headers = list(study_headers(study_dir))
    for ds in headers:
        text = str(ds.get("RequestedProcedureDescription", "") or "").strip()
        for item in ds.get("RequestAttributesSequence", []):
            text = text or str(item.get("RequestedProcedureDescription", "") or "").strip()
        if text:
            return text
    for ds in headers:
        text = str(ds.get("StudyDescription", "") or "").strip()
        if text:
            return text
    return None


def worklist_request(study_dir: Path, config: Config, timeout: float = 10.0) -> str | None:
    """Query the configured worklist SCP for the study's scheduled procedure."""
    if config.worklist is None:
        return None
    header = next(study_headers(study_dir), None)
    if header is None:
        return None
    query = Dataset()
    query.AccessionNumber = str(header.get("AccessionNumber", "") or "")
    query.StudyInstanceUID = "" if query.AccessionNumber else str(header.get("StudyInstanceUID", ""))
    query.PatientID = ""
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
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status is None or identifier is None or status.Status not in (0xFF00, 0xFF01):
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
        assoc.release()
    return None


def resolve_instruction(
    study_dir: Path,
    config: Config,
    *,
    explicit: str | None,
    called_ae: str | None,
    usable: Callable[[str], str | None],
) -> Instruction:
    """Walk the configured sources in order and return the first usable request.

    Parameters
    ----------
    study_dir : Path
        The spooled study.
    config : Config
        Source order, presets, worklist.
    explicit : str, optional
        Text given with the job.
    called_ae : str, optional
        The AE title the study was sent to (presets).
    usable : callable
        ``text -> None`` when the router can serve ``text``, else the reason.
    """
    result = Instruction(None, None)
    for source in config.instruction_sources:
        try:
            text = _text_from(source, study_dir, config, explicit, called_ae)
        except Exception as exc:  # a worklist that is down must not stop the other sources
            log.warning("instruction source %s failed: %s", source.value, exc)
            result.tried.append({"source": source.value, "reason": f"failed: {exc}"})
            continue
        if not text:
            result.tried.append({"source": source.value, "reason": "no text"})
            continue
        problem = usable(text)
        if problem:
            result.tried.append({"source": source.value, "text": text, "reason": problem})
            continue
        result.text, result.source = text, source.value
        return result
    return result


def _text_from(
    source: InstructionSource, study_dir: Path, config: Config, explicit: str | None, called_ae: str | None
) -> str | None:
    if source is InstructionSource.REQUEST:
        return explicit
    if source is InstructionSource.SR:
        return sr_request(study_dir)
    if source is InstructionSource.WORKLIST:
        return worklist_request(study_dir, config)
    if source is InstructionSource.TAGS:
        return tag_request(study_dir)
    return config.presets.get((called_ae or "").strip())
