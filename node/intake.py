"""DICOM intake: a Verification and Storage SCP that spools studies durably.

Every received instance is written, as its fragments arrive, to a new file
in ``<spool>/.incoming`` (File Meta Information first, then the data set
byte for byte), checked, and moved to
``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` --
fsync, rename, fsync of the directory -- *before* the success status is
returned, so a study acknowledged to the sender is on disk
(:mod:`medsegagent.node.spool`).  UIDs are validated before they form a
path; a malformed instance is refused with a DICOM failure status and a log
line, and the listener keeps serving.  What the check's byte scan read of a
stored instance is appended to its study's manifest journal
(:mod:`medsegagent.node.manifest`), so that no later step parses the header
for it.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import uid
from pydicom.pixels import get_decoder
from pynetdicom import sop_class as sc
from pynetdicom.presentation import build_context

from medsegagent.dicom.acceptor import Acceptor, AcceptorServer
from medsegagent.dicom.association import (
    AcceptedContext,
    AcceptorSettings,
    AssociationInfo,
    IncomingDataSet,
    Rejection,
    StoreResult,
    calling_ae_not_recognised,
)
from medsegagent.dicom.dimse import Command, Status
from medsegagent.dicom.instance_checks import REQUIRED_MODALITY, instance_refusal
from medsegagent.dicom.part10 import file_meta_header
from medsegagent.dicom.scan import DataSetScanError, inflate, scan_instance
from medsegagent.dicom.uids import (
    MEDSEGAGENT_IMPLEMENTATION_UID,
    MEDSEGAGENT_IMPLEMENTATION_VERSION,
    InvalidUIDError,
    checked_uid,
    is_valid_ae_title,
)
from medsegagent.node.config import NodeSettings, TlsSettings
from medsegagent.node.manifest import record_instance
from medsegagent.node.spool import INCOMING, IncomingFile, make_durable_dirs

log = logging.getLogger(__name__)

#: The listener's defaults are the configuration's (``node:``), kept in one place.
_DEFAULTS = NodeSettings()

#: Storage SOP classes the node accepts (with the Modality each requires, see dicom/instance_checks.py).
STORAGE_SOP_CLASSES = tuple(REQUIRED_MODALITY)

#: Compressed transfer syntaxes PACS send, accepted where a decoder is installed: pydicom (RLE),
#: python-gdcm (JPEG baseline and lossless; also JPEG-LS and JPEG 2000), pyjpegls (JPEG-LS),
#: pylibjpeg-openjpeg (JPEG 2000, HTJ2K).  Lossy ones too: ultrasound is JPEG baseline, and an archive
#: that compressed a study lossy sends nothing better.  Not JPEG Extended (4.51): pydicom's gdcm and
#: pillow plugins refuse its 12-bit samples (only the GPL pylibjpeg-libjpeg decodes them), so a sender
#: falls back to a syntax the node reads rather than the node accepting what it cannot decode.
_COMPRESSED_SYNTAXES = (
    uid.RLELossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
)


def supported_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes the node accepts: uncompressed, deflate, and every compressed one that decodes here."""
    syntaxes = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
                uid.ExplicitVRBigEndian]  # fmt: skip
    for syntax in _COMPRESSED_SYNTAXES:
        try:
            if get_decoder(syntax).is_available:
                syntaxes.append(syntax)
        except NotImplementedError:
            continue
    return [str(s) for s in syntaxes]


#: Largest inflated size of a Deflated data set: a deflate bomb (1000:1) stops here, not at the 2 GiB instance limit.
MAX_INFLATED_BYTES = 256 << 20


@dataclass
class IntakeStats:
    """Counters of one listener, for logs and the API (studies are tracked by the job store)."""

    stored: int = 0
    refused: int = 0


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """Server-side TLS context (TLS 1.2+, as BCP 195 asks) from the node's TLS settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


class StorageSCP:
    """The node's DICOM listener.

    Parameters
    ----------
    spool_dir : Path
        Root of the study spool.
    ae_title : str
        The node's AE title.
    host, port : str, int
        Interface and port to bind (loopback by default; port 0 picks a free one).
    allowed_callers : iterable of str, optional
        Calling AE titles allowed to associate; ``None`` allows any.
    allowed_hosts : iterable of str, optional
        Peer IP addresses allowed to associate; ``None`` allows any.
    on_instance : callable, optional
        ``(study_uid, series_uid, path, called_ae, calling_ae)`` called after
        each stored instance (before the success status goes back).
    admit : callable, optional
        ``study_uid or None -> reason or None``; a reason refuses the instance
        with *Out of Resources* (disk watermark, study size limit).  It is
        asked with ``None`` before the data set is received (checks that need
        no study: the disk) and with the study UID before the instance is put
        in place.
    max_associations : int
        Concurrent associations; more are rejected (transient).
    max_pending_connections : int
        Connections that have not sent their A-ASSOCIATE-RQ yet; one more
        closes the oldest of them (idle sockets cannot lock peers out).
    association_request_seconds : float
        An A-ASSOCIATE-RQ must arrive whole within this many seconds of the
        connection (ARTIM); silent connections are closed then.
    ssl_context : ssl.SSLContext, optional
        Serve DICOM over TLS with this server context.
    reuse_port : bool
        Bind with ``SO_REUSEPORT`` so that other intake processes can serve
        the same port (see :mod:`medsegagent.node.intake_pool`).
    """

    def __init__(
        self,
        spool_dir: Path,
        *,
        ae_title: str = _DEFAULTS.ae_title,
        host: str = _DEFAULTS.host,
        port: int = _DEFAULTS.port,
        allowed_callers: Iterable[str] | None = None,
        allowed_hosts: Iterable[str] | None = None,
        on_instance: Callable[[str, str, Path, str, str], None] | None = None,
        admit: Callable[[str | None], str | None] | None = None,
        max_associations: int = _DEFAULTS.max_associations,
        max_pending_connections: int = _DEFAULTS.max_pending_connections,
        association_request_seconds: float = _DEFAULTS.association_request_seconds,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allowed_callers = {a.strip() for a in allowed_callers} if allowed_callers is not None else None
        self.allowed_hosts = set(allowed_hosts) if allowed_hosts is not None else None
        self.on_instance = on_instance
        self.admit = admit
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port
        self.stats = IntakeStats()
        self._lock = threading.Lock()
        # Series directories already created and made durable: one mkdir + fsync per series, not per instance.
        self._durable_dirs: set[Path] = set()
        self._server: AcceptorServer | None = None
        contexts = [build_context(sc.Verification)]
        syntaxes = supported_transfer_syntaxes()
        contexts += [build_context(sop, syntaxes) for sop in STORAGE_SOP_CLASSES]
        # A stalled peer is aborted after the time-outs, so it cannot hold a slot forever.
        self._settings = AcceptorSettings(supported_contexts=contexts, max_associations=max_associations,
                                          max_pending_connections=max_pending_connections,
                                          acse_timeout=association_request_seconds, network_timeout=60.0)  # fmt: skip

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound address."""
        self.spool_dir.parent.mkdir(parents=True, exist_ok=True)
        make_durable_dirs(self.spool_dir / INCOMING, self.spool_dir.parent)
        acceptor = Acceptor(self, self._settings, self.ssl_context)
        server = AcceptorServer((self.host, self.port), acceptor, reuse_port=self.reuse_port)
        thread = threading.Thread(target=server.serve_forever, name=f"medseg-scp-{self.ae_title}", daemon=True)
        thread.start()
        self._server = server
        self.port = server.server_address[1]
        log.info("listening as %s on %s:%d (pid %d), spool %s", self.ae_title, self.host, self.port, os.getpid(),
                 self.spool_dir)  # fmt: skip
        return self.host, self.port

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- the acceptor's handler ------------------------------------------------
    def screen(self, request: AssociationInfo) -> Rejection | None:
        """Accept an association request only from an allowed peer address and calling AE title."""
        if self.allowed_hosts is not None and request.address not in self.allowed_hosts:
            return calling_ae_not_recognised(f"peer address {request.address} not allowed")
        if self.allowed_callers is not None and request.calling_ae not in self.allowed_callers:
            return calling_ae_not_recognised(f"calling AE title {request.calling_ae!r} not allowed")
        return None

    def begin_store(self, association: AssociationInfo, context: AcceptedContext,
                    command: Command) -> IncomingDataSet | StoreResult:  # fmt: skip
        """Start receiving one instance into the spool's ``.incoming`` directory.

        The File Meta Information (transfer syntax, SOP class and instance
        from the request, calling AE as Source AE Title (0002,0016), called AE
        as Receiving AE Title (0002,0018): the spool alone tells who sent a
        study to which title) is written first; the data set follows byte for
        byte as it arrives.

        Returns
        -------
        IncomingDataSet or StoreResult
            Where the data set goes (checked, stored and recorded when it is
            complete, see :meth:`_finish`), or a refusal now.
        """
        calling, called = association.calling_ae, association.called_ae
        try:
            header = file_meta_header(
                sop_class_uid=command.affected_sop_class_uid,
                sop_instance_uid=checked_uid(command.affected_sop_instance_uid, "Affected SOP Instance UID"),
                transfer_syntax_uid=context.transfer_syntax,
                implementation_class_uid=MEDSEGAGENT_IMPLEMENTATION_UID,
                implementation_version_name=MEDSEGAGENT_IMPLEMENTATION_VERSION,
                source_ae_title=calling if is_valid_ae_title(calling) else None,
                receiving_ae_title=called if is_valid_ae_title(called) else None,
            )  # fmt: skip
        except (InvalidUIDError, ValueError) as exc:
            return self._refuse(Status.CANNOT_UNDERSTAND, str(exc), calling)
        if self.admit is not None:
            reason = self.admit(None)  # what can be checked before the study is known: the disk
            if reason:
                return self._refuse(Status.OUT_OF_RESOURCES, reason, calling)
        try:
            try:
                incoming = IncomingFile(self.spool_dir / INCOMING)
            except FileNotFoundError:  # the directory went away (spool clean-up): create it again
                make_durable_dirs(self.spool_dir / INCOMING, self.spool_dir.parent)
                incoming = IncomingFile(self.spool_dir / INCOMING)
        except OSError as exc:
            return self._refuse(Status.OUT_OF_RESOURCES, f"cannot store: {exc}", calling)
        try:
            incoming.write(header)
        except OSError as exc:
            incoming.discard()
            return self._refuse(Status.OUT_OF_RESOURCES, f"cannot store: {exc}", calling)
        return _SpooledInstance(self, incoming, len(header), association, context, command)

    def _finish(self, received: _SpooledInstance) -> StoreResult:
        """Check a complete instance, move it durably to its place and record it; the status for the sender."""
        calling, called = received.association.calling_ae, received.association.called_ae
        command, syntax, incoming = received.command, received.context.transfer_syntax, received.incoming
        try:
            with incoming.contents(received.header_length) as data_set:
                deflated = syntax == uid.DeflatedExplicitVRLittleEndian
                facts = scan_instance(inflate(data_set, MAX_INFLATED_BYTES) if deflated else data_set, syntax)
            study = checked_uid(facts.study_instance_uid, "StudyInstanceUID")
            series = checked_uid(facts.series_instance_uid, "SeriesInstanceUID")
            sop = checked_uid(facts.sop_instance_uid, "SOPInstanceUID")
        except InvalidUIDError as exc:  # the log names the instance by the request's (checked) UID
            return self._refuse(Status.CANNOT_UNDERSTAND, str(exc), calling, command.affected_sop_instance_uid)
        except DataSetScanError as exc:
            return self._refuse(Status.CANNOT_UNDERSTAND, f"bad data set: {exc}", calling,
                                command.affected_sop_instance_uid)  # fmt: skip
        except OSError as exc:  # the received file cannot be mapped to be read
            return self._refuse(Status.OUT_OF_RESOURCES, f"cannot read back: {exc}", calling,
                                command.affected_sop_instance_uid)  # fmt: skip
        if sop != command.affected_sop_instance_uid:
            return self._refuse(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from the request's",
                                calling, sop)  # fmt: skip
        if facts.sop_class_uid != command.affected_sop_class_uid:
            # The File Meta and the pixel checks follow the request's class: the data set must agree.
            why = f"SOP Class UID {facts.sop_class_uid!r} differs from the request's"
            return self._refuse(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, why, calling, sop)
        refusal = instance_refusal(facts)
        if refusal is not None:
            return self._refuse(refusal.status, refusal.reason, calling, sop)
        if self.admit is not None:
            reason = self.admit(study)
            if reason:
                return self._refuse(Status.OUT_OF_RESOURCES, reason, calling, sop)
        path = self.spool_dir / study / series / f"{sop}.dcm"
        existed = path.exists()  # a re-send replaces an instance that is already recorded
        try:
            self._place(incoming, path)
        except OSError as exc:
            if not existed:
                path.unlink(missing_ok=True)  # renamed but not durable: not acknowledged, so not kept
            return self._refuse(Status.OUT_OF_RESOURCES, f"cannot store: {exc}", calling, sop)
        try:
            # What the scan learnt goes into the study's manifest journal: no later step parses it again.
            record_instance(self.spool_dir / study, path, facts)
        except OSError as exc:  # the instance is stored; the manifest scans its file again when it is folded
            log.warning("instance %s: not journaled for the study manifest: %s", sop, exc)
        with self._lock:
            self.stats.stored += 1
        if self.on_instance is not None:
            try:
                self.on_instance(study, series, path, called, calling)
            except Exception as exc:  # the instance is on disk but not recorded: let the sender retry
                log.exception("recording %s failed", sop)
                if not existed:
                    # Unacknowledged and unrecorded: the spool must not hold it (see JobStore.reconcile_spool).
                    path.unlink(missing_ok=True)
                return self._refuse(Status.OUT_OF_RESOURCES, f"cannot record: {exc}", calling, sop)
        return StoreResult(Status.SUCCESS)

    def _place(self, incoming: IncomingFile, path: Path) -> None:
        """Commit ``incoming`` to ``path``; its series directory is created (durably) once per series."""
        directory = path.parent
        if directory not in self._durable_dirs:
            make_durable_dirs(directory, self.spool_dir)
            with self._lock:
                if len(self._durable_dirs) >= 10_000:  # a long-running node: forget old series
                    self._durable_dirs.clear()
                self._durable_dirs.add(directory)
        incoming.sync()
        try:
            incoming.move(path)
        except FileNotFoundError:
            # The series directory went away (spool clean-up): forget it, create it again, move again.
            with self._lock:
                self._durable_dirs.discard(directory)
            make_durable_dirs(directory, self.spool_dir)
            incoming.move(path)

    def _refuse(self, status: Status, reason: str, calling: str, sop: str | None = None) -> StoreResult:
        """Count and log a refusal; ``reason`` also goes back to the sender as the Error Comment."""
        with self._lock:
            self.stats.refused += 1
        log.warning("C-STORE from %s refused (0x%04X)%s: %s", calling, status, f" for {sop}" if sop else "", reason)
        return StoreResult(status, reason)


class _SpooledInstance:
    """The data set of one C-STORE on its way into the spool (the acceptor's :class:`IncomingDataSet`)."""

    def __init__(self, scp: StorageSCP, incoming: IncomingFile, header_length: int, association: AssociationInfo,
                 context: AcceptedContext, command: Command) -> None:  # fmt: skip
        self.scp = scp
        self.incoming = incoming
        self.header_length = header_length
        self.association = association
        self.context = context
        self.command = command
        self.error: OSError | None = None

    def write(self, fragment: memoryview) -> None:
        """Append a fragment; a write error is kept and answered at the end (the data is still read)."""
        if self.error is None:
            try:
                self.incoming.write(fragment)
            except OSError as exc:
                self.error = exc
                self.incoming.discard()

    def finish(self) -> StoreResult:
        """Check, store and record the complete instance."""
        try:
            if self.error is not None:
                return self.scp._refuse(Status.OUT_OF_RESOURCES, f"cannot store: {self.error}",
                                        self.association.calling_ae)  # fmt: skip
            return self.scp._finish(self)
        finally:
            self.incoming.discard()  # a refused or failed instance; nothing after a move

    def discard(self) -> None:
        """Drop the partial instance."""
        self.incoming.discard()
