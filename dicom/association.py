"""One association on the acceptor side: negotiation, DIMSE messages, release (PS3.8 9.2, PS3.7).

:class:`AcceptorAssociation` runs the acceptor states of the Upper Layer
state machine for Verification and Storage over one connection:

* **Awaiting the A-ASSOCIATE-RQ** (Sta2) under the ARTIM time-out, which
  bounds the whole request, not each read.  An A-ABORT is answered by
  closing; any other PDU is aborted (*unexpected PDU*).
* **Negotiation.** pynetdicom's :mod:`pynetdicom.pdu` decodes the request
  and encodes the A-ASSOCIATE-AC, and
  :func:`pynetdicom.presentation.negotiate_as_acceptor` negotiates the
  presentation contexts: the many variable items of an association request
  are worth a tested implementation, and they happen once per association.
  User Identity, Asynchronous Operations Window and SOP Class (Common)
  Extended Negotiation items are not supported and get no response item, as
  PS3.7 D.3.3 allows (operations are then synchronous); roles stay the
  default ones (requestor SCU, acceptor SCP).
* **Established** (Sta6): P-DATA-TF fragments are reassembled into command
  sets, and a C-STORE's data set goes to the handler fragment by fragment
  as it arrives (:class:`IncomingDataSet`), so no instance is held in memory
  whole; each request is answered.  A-RELEASE-RQ is answered with
  A-RELEASE-RP; A-ABORT ends the connection; any other PDU, or a malformed
  one, is aborted.  Each PDU must arrive whole within the network time-out.

The per-message path -- PDVs, command sets (:mod:`medsegagent.dicom.dimse`),
the response -- is plain ``struct`` work on one thread, no queues or polling.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext as NegotiatedContext
from pynetdicom.presentation import negotiate_as_acceptor

from medsegagent.dicom.dimse import Command, CommandField, CommandSetError, Status, decode_command, encode_response
from medsegagent.dicom.pdu import (
    PDV_HEADER_LENGTH,
    AbortReason,
    ConnectionClosed,
    PduType,
    ProtocolError,
    SocketReader,
    encode_abort,
    encode_associate_rj,
    encode_p_data,
    encode_pdu,
    encode_release_rp,
    iter_pdvs,
    read_pdu,
)
from medsegagent.dicom.uids import MEDSEGAGENT_IMPLEMENTATION_UID, MEDSEGAGENT_IMPLEMENTATION_VERSION

log = logging.getLogger(__name__)

#: The DICOM Application Context Name (PS3.7 A.2.1).
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
#: Verification SOP Class.
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: Largest A-ASSOCIATE-RQ accepted: a request with hundreds of presentation contexts fits.
_MAX_ASSOCIATE_RQ_LENGTH = 1 << 20
#: Largest P-DATA-TF accepted.  Peers must stay within the Maximum Length the
#: node announced, but some send more; tolerate that up to a bound on memory.
_MAX_P_DATA_LENGTH = 16 << 20
#: Largest command set (a C-STORE-RQ is ~200 bytes).
_MAX_COMMAND_LENGTH = 64 << 10


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: result, source and reason/diagnostic (PS3.8 Table 9-21), and why, for the log."""

    result: int
    source: int
    diagnostic: int
    why: str


def calling_ae_not_recognised(why: str) -> Rejection:
    """Rejected-permanent, service-user, calling AE title not recognised (also used for peer addresses)."""
    return Rejection(0x01, 0x01, 0x03, why)


def application_context_not_supported(why: str) -> Rejection:
    """Rejected-permanent, service-user, application context name not supported."""
    return Rejection(0x01, 0x01, 0x02, why)


def protocol_version_not_supported(why: str) -> Rejection:
    """Rejected-permanent, service-provider (ACSE), protocol version not supported."""
    return Rejection(0x01, 0x02, 0x02, why)


def local_limit_exceeded(why: str) -> Rejection:
    """Rejected-transient, service-provider (presentation), local limit exceeded."""
    return Rejection(0x02, 0x03, 0x02, why)


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context the node accepted: its ID, abstract syntax and the one transfer syntax."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class AssociationInfo:
    """One association as negotiated.

    Attributes
    ----------
    calling_ae, called_ae : str
        AE titles from the A-ASSOCIATE-RQ, without padding.  The called title
        is the one the peer asked for, which need not be the node's own
        (presets bind extra titles to requests).
    address : str
        The peer's IP address.
    port : int
        The peer's TCP port.
    peer_max_pdu_length : int
        The peer's Maximum Length Received (0: no limit).
    contexts : Mapping[int, AcceptedContext]
        Accepted presentation contexts by ID (empty until negotiated).
    """

    calling_ae: str
    called_ae: str
    address: str
    port: int
    peer_max_pdu_length: int = 0
    contexts: Mapping[int, AcceptedContext] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreResult:
    """What a store handler answers: a DIMSE status and, for failures, an Error Comment."""

    status: int
    comment: str | None = None


class IncomingDataSet(Protocol):
    """A data set being received, fragment by fragment, for one C-STORE.

    The acceptor calls :meth:`write` for each fragment as it arrives, then
    :meth:`finish` (the data set is complete) or :meth:`discard` (it is
    refused, too large, or the association ended) -- and :meth:`discard`
    also after a :meth:`finish` that raised, so it must be idempotent.
    """

    def write(self, fragment: memoryview) -> None:
        """Take the next fragment (valid only during the call)."""

    def finish(self) -> StoreResult:
        """The data set is complete: store it and say how it went."""

    def discard(self) -> None:
        """Drop what was written (must not raise)."""


class StorageHandler(Protocol):
    """What an association asks of the service behind it."""

    def screen(self, request: AssociationInfo) -> Rejection | None:
        """Decide on an association request before contexts are negotiated: ``None`` accepts."""

    def begin_store(
        self, association: AssociationInfo, context: AcceptedContext, command: Command
    ) -> IncomingDataSet | StoreResult:
        """Start receiving the data set of a C-STORE-RQ (encoded in ``context.transfer_syntax``).

        A :class:`StoreResult` refuses it at once: the data set is then read
        to its end and dropped.  An exception here, or in the returned
        object's ``write`` or ``finish``, fails the instance with 0110.
        """


@dataclass(frozen=True)
class AcceptorSettings:
    """Contexts, limits and time-outs of the acceptor.

    Attributes
    ----------
    supported_contexts : sequence of pynetdicom PresentationContext
        Abstract syntaxes and, for each, the transfer syntaxes accepted.
    max_pdu_length : int
        Maximum Length Received announced to peers.
    max_associations : int
        Concurrent associations; a request beyond them is rejected
        (transient).  Connections that have not sent their A-ASSOCIATE-RQ
        yet do not count: they are capped by ``max_pending_connections``.
    max_pending_connections : int
        Connections still awaiting their A-ASSOCIATE-RQ; when one more
        arrives, the oldest of them is closed, so that idle sockets cannot
        lock a configured peer out (they would take the slots otherwise).
    acse_timeout : float
        Seconds from the connection to a complete A-ASSOCIATE-RQ (ARTIM);
        with TLS, the handshake has as long again.  Short: a real peer sends
        its request at once, and a silent connection holds a thread until then.
    network_timeout : float
        Seconds within which each PDU of an association must arrive whole,
        counted from the end of the previous one.
    max_data_set_bytes : int
        Largest data set accepted; a larger one is read to its end, dropped
        and answered with *Out of Resources*.
    """

    supported_contexts: Sequence[NegotiatedContext]
    max_pdu_length: int = 131_072
    max_associations: int = 8
    max_pending_connections: int = 32
    acse_timeout: float = 5.0
    network_timeout: float = 60.0
    max_data_set_bytes: int = 2 << 30


class AcceptorAssociation:
    """The acceptor side of one association over a connected socket.

    Parameters
    ----------
    sock : socket.socket
        The connection (plain or TLS); the caller closes it.
    address : (str, int)
        The peer's address.
    handler : StorageHandler
        Screens the request and stores data sets.
    settings : AcceptorSettings
        Contexts, limits and time-outs.
    claim_slot : callable, optional
        Called once the A-ASSOCIATE-RQ has arrived whole: ``True`` when an
        association slot is free and now taken, ``False`` when
        ``settings.max_associations`` are established (the request is then
        rejected, transient).  Default: always a slot.
    """

    def __init__(self, sock: socket.socket, address: tuple[str, int], handler: StorageHandler,
                 settings: AcceptorSettings, *, claim_slot: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.sock = sock
        self.address = address
        self.handler = handler
        self.settings = settings
        self.claim_slot = claim_slot
        self.reader = SocketReader(sock)
        self.info = AssociationInfo(calling_ae="", called_ae="", address=address[0], port=address[1])
        self.established = False
        self.messages = 0

    @property
    def peer(self) -> str:
        """The peer for log lines: calling AE title (once known) and address."""
        return f"{self.info.calling_ae or '?'} ({self.address[0]}:{self.address[1]})"

    def run(self, started: float | None = None) -> None:
        """Serve the association to its end; protocol errors and time-outs end it, they do not raise.

        Parameters
        ----------
        started : float, optional
            ``time.monotonic()`` when the connection was accepted: the ARTIM
            time-out counts from there (default: now).
        """
        self.reader.deadline = (time.monotonic() if started is None else started) + self.settings.acse_timeout
        try:
            if self._associate():
                self._serve_messages()
        except ConnectionClosed as exc:
            if self.established:
                log.warning("association from %s ended without release: %s", self.peer, exc)
            else:
                log.debug("connection from %s closed: %s", self.peer, exc)
        except ProtocolError as exc:
            log.warning("aborting association from %s: %s", self.peer, exc)
            self._send(encode_abort(exc.reason))
        except TimeoutError:
            if self.established:
                log.warning("aborting association from %s: no complete PDU within %.0f s", self.peer,
                            self.settings.network_timeout)  # fmt: skip
                self._send(encode_abort())
            else:  # ARTIM expired in Sta2: close (PS3.8 AA-2)
                log.warning("closing connection from %s: no A-ASSOCIATE-RQ within %.0f s", self.peer,
                            self.settings.acse_timeout)  # fmt: skip

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            log.debug("could not send to %s: %s", self.peer, exc)

    # -- association establishment ----------------------------------------------------------
    def _associate(self) -> bool:
        """Await and answer the A-ASSOCIATE-RQ; True when the association is established."""
        pdu_type, body = read_pdu(self.reader, _MAX_ASSOCIATE_RQ_LENGTH)
        if pdu_type == PduType.A_ABORT:
            raise ConnectionClosed("peer aborted before any association")  # PS3.8 Sta2: just close
        if pdu_type != PduType.A_ASSOCIATE_RQ:
            raise ProtocolError(f"{PduType(pdu_type).name} before any A-ASSOCIATE-RQ", AbortReason.UNEXPECTED_PDU)
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(encode_pdu(pdu_type, body))
            primitive = request.to_primitive()
            calling = str(primitive.calling_ae_title or "").strip()
            called = str(primitive.called_ae_title or "").strip()
            proposed = primitive.presentation_context_definition_list
        except Exception as exc:  # pynetdicom raises many kinds on malformed items
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__}: {exc})") from exc
        peer_max = primitive.maximum_length_received or 0
        if 0 < peer_max <= PDV_HEADER_LENGTH:
            raise ProtocolError(f"Maximum Length Received {peer_max} leaves no room for a fragment")
        ids = [cx.context_id for cx in proposed]
        if len(set(ids)) != len(ids) or any(cx_id is None or cx_id % 2 == 0 for cx_id in ids):
            raise ProtocolError(f"presentation context IDs must be odd and distinct, not {ids}")
        self.info = AssociationInfo(calling, called, self.address[0], self.address[1], peer_max_pdu_length=peer_max)
        rejection = self._screen(request, primitive)
        if rejection is not None:
            log.warning("rejecting association from %s to %s: %s", self.peer, called or "?", rejection.why)
            self._send(encode_associate_rj(rejection.result, rejection.source, rejection.diagnostic))
            return False

        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in primitive.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        try:
            results, role_items = negotiate_as_acceptor(proposed, list(self.settings.supported_contexts), roles)
        except Exception as exc:  # e.g. a proposed context without a transfer syntax
            raise ProtocolError(f"presentation contexts cannot be negotiated ({type(exc).__name__}: {exc})") from exc
        accepted = {
            int(cx.context_id): AcceptedContext(int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in results
            if cx.result == 0x00
        }
        self.info = AssociationInfo(calling, called, self.address[0], self.address[1], peer_max_pdu_length=peer_max,
                                    contexts=accepted)  # fmt: skip
        self._send_accept(primitive, results, role_items)
        self.established = True
        # The pid tells which intake process took it when several share the port.
        log.info("association from %s to %s accepted by pid %d (%d of %d presentation contexts)", self.peer, called,
                 os.getpid(), len(accepted), len(results))  # fmt: skip
        return True

    def _screen(self, request: A_ASSOCIATE_RQ, primitive: A_ASSOCIATE) -> Rejection | None:
        if not request.protocol_version & 0x0001:
            return protocol_version_not_supported(f"protocol version 0x{request.protocol_version:04X}")
        if str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            return application_context_not_supported(f"application context {primitive.application_context_name}")
        if self.claim_slot is not None and not self.claim_slot():
            return local_limit_exceeded(f"{self.settings.max_associations} associations are open already")
        return self.handler.screen(self.info)

    def _send_accept(self, request: A_ASSOCIATE, results: list[NegotiatedContext],
                     role_items: list[SCP_SCU_RoleSelectionNegotiation]) -> None:  # fmt: skip
        answer = A_ASSOCIATE()
        answer.application_context_name = APPLICATION_CONTEXT_NAME
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = request.called_ae_title
        answer.result = 0x00
        answer.result_source = 0x01
        answer.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu_length
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = MEDSEGAGENT_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = MEDSEGAGENT_IMPLEMENTATION_VERSION
        answer.user_information = [max_length, class_uid, version, *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        self.sock.sendall(pdu.encode())

    # -- established association ------------------------------------------------------------
    def _serve_messages(self) -> None:
        """Receive DIMSE messages and answer them until the peer releases or aborts."""
        message = _MessageAssembly(self)
        try:
            while True:
                self.reader.deadline = time.monotonic() + self.settings.network_timeout
                pdu_type, body = read_pdu(self.reader, _MAX_P_DATA_LENGTH)
                if pdu_type == PduType.A_RELEASE_RQ:
                    if message.in_progress:
                        log.warning("association from %s released in the middle of a message (%s); it is dropped",
                                    self.peer, message.describe())  # fmt: skip
                    self._send(encode_release_rp())
                    log.info("association from %s released after %d messages", self.peer, self.messages)
                    return
                if pdu_type == PduType.A_ABORT:
                    log.warning("association from %s aborted by the peer after %d messages", self.peer,
                                self.messages)  # fmt: skip
                    return
                if pdu_type != PduType.P_DATA_TF:
                    raise ProtocolError(f"unexpected {PduType(pdu_type).name} in an association",
                                        AbortReason.UNEXPECTED_PDU)  # fmt: skip
                for context_id, is_command, is_last, fragment in iter_pdvs(body):
                    if context_id not in self.info.contexts:
                        raise ProtocolError(f"presentation context {context_id} was not accepted")
                    message.add(context_id, is_command, is_last, fragment)
        finally:
            message.drop()  # a data set left half-way is discarded, whatever ended the association

    def respond(self, context_id: int, command: Command, result: StoreResult) -> None:
        """Send the response to ``command`` (nothing for responses and C-CANCEL, which have none)."""
        self.messages += 1
        if not command.is_request:
            log.warning("ignoring a DIMSE response (0x%04X) from %s", command.command_field, self.peer)
            return
        if command.command_field == CommandField.C_CANCEL_RQ:
            return  # nothing of ours can be cancelled; C-CANCEL has no response
        if result.status != Status.SUCCESS:
            log.debug("answering 0x%04X to %s: %s", result.status, self.peer, result.comment)
        response = encode_response(command, result.status, error_comment=result.comment)
        self.sock.sendall(encode_p_data(context_id, response, is_command=True,
                                        max_pdu_length=self.info.peer_max_pdu_length))  # fmt: skip

    def perform(self, context_id: int, command: Command) -> StoreResult | IncomingDataSet:
        """What a complete command gets: a result now, or (a C-STORE to store) where its data set goes."""
        context = self.info.contexts[context_id]
        # Responses and C-CANCEL fall through to a result that respond() does not send.
        if command.affected_sop_class_uid != context.abstract_syntax:
            why = f"SOP class {command.affected_sop_class_uid} on a {context.abstract_syntax} context"
            return StoreResult(Status.SOP_CLASS_NOT_SUPPORTED, why)
        is_verification = context.abstract_syntax == VERIFICATION_SOP_CLASS
        if command.command_field == CommandField.C_ECHO_RQ and is_verification:
            return StoreResult(Status.SUCCESS)
        if command.command_field != CommandField.C_STORE_RQ or is_verification:
            return StoreResult(Status.UNRECOGNIZED_OPERATION, f"command 0x{command.command_field:04X} not served")
        if not command.has_data_set:
            return StoreResult(Status.CANNOT_UNDERSTAND, "C-STORE without a data set")
        try:
            return self.handler.begin_store(self.info, context, command)
        except Exception:  # a handler bug fails one instance, not the association
            log.exception("receiving %s from %s failed", command.affected_sop_instance_uid, self.peer)
            return StoreResult(Status.PROCESSING_FAILURE, "processing failure")


class _MessageAssembly:
    """Reassembles one DIMSE message at a time (PS3.8 Annex E) and routes its data set as it arrives.

    The command set is collected (64 KiB at most); a C-STORE's data set goes
    fragment by fragment to the handler's :class:`IncomingDataSet`, so an
    association holds one PDU in memory, not a whole instance.
    """

    def __init__(self, association: AcceptorAssociation) -> None:
        self.association = association
        self.max_data_set_bytes = association.settings.max_data_set_bytes
        self.command_bytes = bytearray()
        self.context_id = 0
        self.command: Command | None = None  # a command whose data set is being received
        self.sink: IncomingDataSet | None = None  # where that data set goes, if anywhere
        self.result: StoreResult | None = None  # the answer decided before the data set ends, if any
        self.data_length = 0

    @property
    def in_progress(self) -> bool:
        """Whether part of a message has arrived."""
        return bool(self.command_bytes) or self.command is not None

    def describe(self) -> str:
        """The message in progress, for a log line."""
        if self.command is None:
            return f"{len(self.command_bytes)} bytes of a command set"
        return f"command 0x{self.command.command_field:04X} and {self.data_length} bytes of its data set"

    def add(self, context_id: int, is_command: bool, is_last: bool, fragment: memoryview) -> None:
        """Take one PDV; answer the message it completes.

        Raises
        ------
        ProtocolError
            For fragments out of order, an empty fragment that is not the last
            (it would cost time and carry nothing), a command set over 64 KiB
            or one that does not decode.
        """
        if not fragment and not is_last:
            raise ProtocolError("an empty fragment that is not the last")
        if is_command:
            self._add_command(context_id, is_last, fragment)
        else:
            self._add_data(context_id, is_last, fragment)

    def _add_command(self, context_id: int, is_last: bool, fragment: memoryview) -> None:
        if self.command is not None:
            raise ProtocolError("a command fragment arrived while a data set was expected",
                                AbortReason.UNEXPECTED_PDU_PARAMETER)  # fmt: skip
        if self.command_bytes and context_id != self.context_id:
            raise ProtocolError(f"command fragments on contexts {self.context_id} and {context_id}")
        self.context_id = context_id
        self.command_bytes += fragment
        if len(self.command_bytes) > _MAX_COMMAND_LENGTH:
            raise ProtocolError(f"command set longer than {_MAX_COMMAND_LENGTH} bytes")
        if not is_last:
            return
        try:
            command = decode_command(self.command_bytes)
        except CommandSetError as exc:
            raise ProtocolError(f"undecodable command set: {exc}") from exc
        self.command_bytes = bytearray()
        outcome = self.association.perform(context_id, command)
        if not command.has_data_set:  # perform() opens a sink only for a data set
            assert isinstance(outcome, StoreResult)
            self.association.respond(context_id, command, outcome)
            return
        self.command, self.data_length = command, 0
        self.sink, self.result = (None, outcome) if isinstance(outcome, StoreResult) else (outcome, None)

    def _add_data(self, context_id: int, is_last: bool, fragment: memoryview) -> None:
        if self.command is None:
            raise ProtocolError("a data set fragment arrived without a command", AbortReason.UNEXPECTED_PDU_PARAMETER)
        if context_id != self.context_id:
            raise ProtocolError(f"data set on context {context_id}, its command on {self.context_id}")
        self.data_length += len(fragment)
        if self.sink is not None and self.data_length > self.max_data_set_bytes:
            self.drop()  # too large: read on to the end, then refuse
            self.result = StoreResult(Status.OUT_OF_RESOURCES, f"instance larger than {self.max_data_set_bytes} bytes")
        if self.sink is not None:
            try:
                self.sink.write(fragment)
            except Exception:
                self._fail("receiving")
        if not is_last:
            return
        if self.sink is not None:
            try:
                self.result, self.sink = self.sink.finish(), None
            except Exception:
                self._fail("storing")
        command, result = self.command, self.result
        assert result is not None  # decided at the command, or by the sink
        self.command, self.result = None, None
        self.association.respond(context_id, command, result)

    def _fail(self, what: str) -> None:
        assert self.command is not None
        log.exception("%s %s from %s failed", what, self.command.affected_sop_instance_uid, self.association.peer)
        self.drop()
        self.result = StoreResult(Status.PROCESSING_FAILURE, "processing failure")

    def drop(self) -> None:
        """Discard the data set being received, if any."""
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.discard()
