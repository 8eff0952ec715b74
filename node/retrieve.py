"""Pull a study the node does not have from a configured source into its spool.

Three ways, one destination -- the spool, through the intake's own checks:

A DICOM source is first asked (C-FIND, where it lets the node query)
whether it holds the study and how many instances it has, so that "not
held" and "not all arrived" are told apart from a refusal.

* **C-MOVE** (pynetdicom SCU) to the node's own AE title: the source sends
  the instances to the node's listener over C-STORE, so they take the
  normal intake path.  The source must know the node (AE title, address
  and port) as a move destination.
* **C-GET** (pynetdicom SCU, SCP role for the storage SOP classes): the
  instances come back on the node's association, and each is handed to
  :meth:`StorageSCP.begin_store <medsegagent.node.intake.StorageSCP.begin_store>`
  exactly as the listener hands over a C-STORE.
* **WADO-RS** (``dicomweb-client``): each instance of the study is encoded
  in its transfer syntax and handed over the same way.

A study that cannot be pulled raises :class:`RetrieveError`, whose
:class:`~medsegagent.node.jobs.FailureReason` and message the job keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import requests
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from medsegagent.dicom.association import AcceptedContext, AssociationInfo, StoreResult
from medsegagent.dicom.dimse import Command, CommandField, Status
from medsegagent.node.config import RemoteKind, RetrieveMethod, Source
from medsegagent.node.intake import STORAGE_SOP_CLASSES, StorageSCP, supported_transfer_syntaxes
from medsegagent.node.jobs import FailureReason
from medsegagent.node.scu import scu_ae, set_nodelay

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)


class RetrieveError(RuntimeError):
    """A study that could not be pulled; ``reason`` and the message are the job's failure."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SpoolWriter:
    """Hands instances to the intake (checks, durable spool, study record) as a C-STORE would.

    Parameters
    ----------
    scp : StorageSCP
        The node's listener, whose checks and spool the instances go through.
    calling_ae, called_ae : str
        Recorded in each file's File Meta Information as Source and Receiving
        AE Title (an empty ``calling_ae``, for a DICOMweb source, records none).
    """

    scp: StorageSCP
    calling_ae: str
    called_ae: str
    stored: int = 0
    refused: list[str] = field(default_factory=list)

    def store(self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> StoreResult:
        """Spool one encoded data set (no File Meta Information); the intake's status for it."""
        association = AssociationInfo(calling_ae=self.calling_ae, called_ae=self.called_ae, address="", port=0)
        command = Command(CommandField.C_STORE_RQ, 1, sop_class, sop_instance, has_data_set=True)
        incoming = self.scp.begin_store(association, AcceptedContext(1, sop_class, transfer_syntax), command)
        if not isinstance(incoming, StoreResult):
            incoming.write(memoryview(data))
            incoming = incoming.finish()
        if incoming.status == Status.SUCCESS:
            self.stored += 1
        else:
            self.refused.append(f"{sop_instance}: {incoming.comment or f'status 0x{incoming.status:04X}'}")
        return incoming

    def on_c_store(self, event: evt.Event) -> Dataset:
        """pynetdicom ``EVT_C_STORE`` handler of a C-GET: the instance goes to the spool."""
        request = event.request
        result = self.store(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                            str(event.context.transfer_syntax), request.DataSet.getvalue())  # fmt: skip
        response = Dataset()
        response.Status = int(result.status)
        if result.comment:
            response.ErrorComment = result.comment[:64]  # LO
        return response

    def store_dataset(self, ds: Dataset) -> StoreResult:
        """Spool a decoded instance (WADO-RS), encoded again in the transfer syntax it came in."""
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
        write_dataset(buffer, ds)
        return self.store(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax), buffer.getvalue())

    def check(self, source: Source, study_uid: str) -> int:
        """The number of instances stored; :class:`RetrieveError` when some or all were refused or none came."""
        if self.refused:
            raise RetrieveError(
                FailureReason.RETRIEVE_INCOMPLETE,
                f"{len(self.refused)} of {len(self.refused) + self.stored} instance(s) of study {study_uid} from "
                f"{source.name} were refused by the node's checks (first: {self.refused[0]})",
            )
        if self.stored == 0:
            where = f"source {source.name} ({source.describe()})"
            raise RetrieveError(FailureReason.STUDY_NOT_AT_SOURCE, f"{where} sent no instance of study {study_uid}")
        return self.stored


def retrieve_study(source: Source, study_uid: str, scp: StorageSCP, *, node_ae: str) -> int:
    """Pull every instance of ``study_uid`` from ``source`` into the spool of ``scp``.

    Parameters
    ----------
    source : Source
        A configured source.
    study_uid : str
        A validated Study Instance UID.
    scp : StorageSCP
        The node's listener (its checks and spool).
    node_ae : str
        The node's AE title: the calling AE and, for C-MOVE, the move destination.

    Returns
    -------
    int
        Instances of the study in the spool.

    Raises
    ------
    RetrieveError
        The source is down or refuses the node, does not hold the study, or
        not every instance arrived.
    """
    if source.kind is RemoteKind.DICOMWEB:
        writer = SpoolWriter(scp, "", node_ae)
        _wado_rs(source, study_uid, writer)
        return writer.check(source, study_uid)
    return _dimse_retrieve(source, study_uid, scp, node_ae)


@dataclass(frozen=True)
class _Holding:
    """What a source's C-FIND says of a study: held or not, and its Number of Study Related Instances."""

    held: bool
    instances: int | None


_FIND = StudyRootQueryRetrieveInformationModelFind


def _dimse_retrieve(source: Source, study_uid: str, scp: StorageSCP, node_ae: str) -> int:
    """C-FIND the study (where the source lets the node query), then C-MOVE or C-GET it; the instances spooled."""
    get = source.retrieve is RetrieveMethod.GET
    model = StudyRootQueryRetrieveInformationModelGet if get else StudyRootQueryRetrieveInformationModelMove
    writer = SpoolWriter(scp, source.ae_title, node_ae) if get else None
    contexts: list[tuple[str, list[str] | None]] = [(_FIND, None), (model, None)]
    if get:
        syntaxes = supported_transfer_syntaxes()
        contexts += [(sop, syntaxes) for sop in STORAGE_SOP_CLASSES]
    where = f"source {source.name} ({source.describe()})"
    assoc = _associate(source, node_ae, contexts, writer)
    try:
        holding = _holding(assoc, study_uid)
        if holding is not None and not holding.held:
            raise RetrieveError(FailureReason.STUDY_NOT_AT_SOURCE, f"{where} holds no study {study_uid}")
        query = _study_query(study_uid)
        final = _final_status(assoc.send_c_get(query, model) if get else assoc.send_c_move(query, node_ae, model),
                              where)  # fmt: skip
    finally:
        assoc.release()
    if writer is not None and writer.refused:
        writer.check(source, study_uid)  # raises: the intake refused some of the study
    arrived = sum(1 for _ in (scp.spool_dir / study_uid).rglob("*.dcm"))
    return _check_final(final, where, study_uid, node_ae, arrived, holding.instances if holding else None)


def _holding(assoc: Association, study_uid: str) -> _Holding | None:
    """Whether the source holds the study (C-FIND); ``None`` when it does not let the node ask."""
    if not any(c.abstract_syntax == _FIND for c in assoc.accepted_contexts):
        return None
    query = _study_query(study_uid)
    query.NumberOfStudyRelatedInstances = None
    matches = []
    for status, identifier in assoc.send_c_find(query, _FIND):
        if not status or int(status.Status) not in (*_PENDING, 0x0000):
            return None  # time-out, or not allowed to query: retrieve without knowing
        if identifier is not None:
            matches.append(identifier)
    if not matches:
        return _Holding(False, None)
    count = matches[0].get("NumberOfStudyRelatedInstances")
    return _Holding(True, int(count) if count not in (None, "") else None)


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _associate(source: Source, node_ae: str, contexts: list[tuple[str, list[str] | None]],
               writer: SpoolWriter | None = None) -> Association:  # fmt: skip
    """An association with a DICOM source; :class:`RetrieveError` when it is not established."""
    ae = scu_ae(node_ae, source.timeout_s)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes) if syntaxes else ae.add_requested_context(abstract)
    handlers = [(evt.EVT_CONN_OPEN, set_nodelay)]
    roles = []
    if writer is not None:  # C-GET: the node takes the SCP role for the storage classes
        handlers.append((evt.EVT_C_STORE, writer.on_c_store))
        roles = [build_role(sop, scp_role=True) for sop in STORAGE_SOP_CLASSES]
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, ext_neg=roles or None,
                         evt_handlers=handlers)  # fmt: skip
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        why = f"rejected the association from {node_ae} (is the node known to it?)"
    else:
        why = "did not answer (down, or a wrong host or port?)"
    raise RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"source {source.name} ({source.describe()}) {why}")


def _final_status(responses: Iterator[tuple[Dataset, Dataset | None]], where: str) -> Dataset:
    """The last (non-pending) response of a C-MOVE or C-GET."""
    final = None
    for status, _ in responses:
        if not status:  # pynetdicom: time-out, abort or an invalid response
            raise RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"{where} stopped answering the retrieve")
        if int(status.Status) not in _PENDING:
            final = status
    if final is None:
        raise RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"{where} sent no final retrieve status")
    return final


def _check_final(final: Dataset, where: str, study_uid: str, node_ae: str, arrived: int, expected: int | None) -> int:
    """``arrived`` when the retrieve is complete; :class:`RetrieveError` for a failure, a partial or an empty one."""
    code = int(final.Status)
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if code == 0xA801:
        why = f"does not know {node_ae} as a move destination (add the node to its modalities)"
        raise RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"{where} {why}")
    short = expected is not None and arrived < expected
    if failed or code == 0xB000 or short or (code != 0x0000 and arrived):
        total = expected if expected is not None else completed + failed
        raise RetrieveError(FailureReason.RETRIEVE_INCOMPLETE,
                            f"{arrived} of {total or 'the'} instance(s) of study {study_uid} arrived from {where} "
                            f"(status 0x{code:04X}; the node's log names any it refused)")  # fmt: skip
    if code != 0x0000:
        why = f"refused the retrieve of study {study_uid}: status 0x{code:04X} {final.get('ErrorComment', '')}"
        raise RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"{where} {why}".strip())
    if arrived == 0:
        raise RetrieveError(FailureReason.STUDY_NOT_AT_SOURCE, f"{where} holds no instance of study {study_uid}")
    return arrived


def _wado_rs(source: Source, study_uid: str, writer: SpoolWriter) -> None:
    from medsegagent.node.dicomweb import CredentialsError, web_client  # dicomweb-client only where it is used

    where = f"source {source.name} ({source.describe()})"
    try:
        for instance in web_client(source.web).iter_study(study_uid):
            writer.store_dataset(instance)
    except CredentialsError as exc:
        raise RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"{where}: {exc}") from None
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code == 404 and writer.stored == 0:
            raise RetrieveError(FailureReason.STUDY_NOT_AT_SOURCE, f"{where} holds no study {study_uid}") from None
        raise _interrupted(where, writer, f"HTTP {code}") from None
    except requests.RequestException as exc:
        raise _interrupted(where, writer, type(exc).__name__) from None


def _interrupted(where: str, writer: SpoolWriter, what: str) -> RetrieveError:
    if writer.stored:
        return RetrieveError(FailureReason.RETRIEVE_INCOMPLETE,
                             f"WADO-RS from {where} ended after {writer.stored} instance(s): {what}")  # fmt: skip
    return RetrieveError(FailureReason.SOURCE_UNREACHABLE, f"{where} did not answer WADO-RS: {what}")
