"""A DICOM association acceptor for Verification and Storage (PS3.8 Upper Layer, PS3.7 DIMSE).

Why not pynetdicom's ``AE`` for this role: pynetdicom runs each association
as two polling threads (the DUL reactor and the association reactor) that
pass every PDU and DIMSE message through queues, an event system and
pydicom-encoded command sets.  On a small image that is ~4 ms of CPU per
C-STORE, a fifth of DCMTK's ``storescp`` throughput before any storage work
(``bench/bench_ingest.py``).  The node's listener needs a narrow slice of the
protocol -- accept an association, receive C-ECHO and C-STORE, answer,
release -- so it runs that slice here: one thread per association reading
PDUs with blocking I/O, command sets coded by :mod:`medsegagent.dicom.dimse`.

Association negotiation, which happens once per association and has many
variable items, stays with pynetdicom: its :mod:`pynetdicom.pdu` decodes the
A-ASSOCIATE-RQ and encodes the A-ASSOCIATE-AC, and
:func:`pynetdicom.presentation.negotiate_as_acceptor` negotiates presentation
contexts and SCP/SCU roles.

The acceptor implements the acceptor side of the Upper Layer state machine
(PS3.8 9.2) for these services: A-ASSOCIATE-RQ is awaited under the ARTIM
time-out, anything else before it is aborted; in the established state
P-DATA-TF, A-RELEASE-RQ and A-ABORT are served and any other PDU is aborted
(*unexpected PDU*); an undecodable PDU is aborted (*invalid PDU parameter*).
User Identity, asynchronous operations window and SOP Class Extended
Negotiation items are not supported and get no response item, as PS3.7 D.3.3
allows (operations are then performed synchronously).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

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
    AbortReason,
    ConnectionClosed,
    PduType,
    ProtocolError,
    encode_abort,
    encode_associate_rj,
    encode_p_data,
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
#: Bytes of a P-DATA-TF's PDV header: a peer maximum length this small leaves no room for data.
_PDV_OVERHEAD = 6
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


class StorageHandler(Protocol):
    """What the acceptor asks of the service behind it."""

    def screen(self, request: AssociationInfo) -> Rejection | None:
        """Decide on an association request before contexts are negotiated: ``None`` accepts."""

    def store(
        self, association: AssociationInfo, context: AcceptedContext, command: Command, data_set: bytes
    ) -> StoreResult:
        """Store one received data set (encoded in ``context.transfer_syntax``); must not raise."""


@dataclass(frozen=True)
class AcceptorSettings:
    """Settings of an :class:`Acceptor`.

    Attributes
    ----------
    supported_contexts : sequence of pynetdicom PresentationContext
        Abstract syntaxes and, for each, the transfer syntaxes accepted.
    max_pdu_length : int
        Maximum Length Received announced to peers.
    max_associations : int
        Concurrent associations; more are rejected (transient).
    acse_timeout : float
        Seconds to wait for the A-ASSOCIATE-RQ (and a TLS handshake).
    network_timeout : float
        Seconds an established association may stay silent before it is aborted.
    max_data_set_bytes : int
        Largest data set accepted; a larger one is read to its end, dropped
        and answered with *Out of Resources*.
    """

    supported_contexts: Sequence[NegotiatedContext]
    max_pdu_length: int = 131_072
    max_associations: int = 8
    acse_timeout: float = 30.0
    network_timeout: float = 60.0
    max_data_set_bytes: int = 2 << 30


class Acceptor:
    """Serves associations accepted on a listening socket; one call of :meth:`serve` per connection.

    Parameters
    ----------
    handler : StorageHandler
        Screens association requests and stores data sets.
    settings : AcceptorSettings
        Contexts, limits and time-outs.
    ssl_context : ssl.SSLContext, optional
        Wrap every connection in TLS (server side) before the association.
    """

    def __init__(self, handler: StorageHandler, settings: AcceptorSettings,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.handler = handler
        self.settings = settings
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()

    @property
    def active_associations(self) -> int:
        """Connections being served now."""
        with self._lock:
            return len(self._active)

    def serve(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Serve one connection until it is released, aborted or times out; never raises."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small PDUs otherwise wait for delayed ACKs
        sock.settimeout(self.settings.acse_timeout)
        with self._lock:
            self._active.add(sock)
            too_many = len(self._active) > self.settings.max_associations
        artim = _ArtimTimer(sock, self.settings.acse_timeout)
        connection = sock
        try:
            if self.ssl_context is not None:
                # The TLS socket takes over the descriptor (the plain one is detached): track and close it instead.
                connection = self.ssl_context.wrap_socket(sock, server_side=True)
                artim.connection = connection
                with self._lock:
                    self._active.discard(sock)
                    self._active.add(connection)
            _Association(self, connection, address, too_many, artim).run()
        except (ssl.SSLError, OSError) as exc:
            if artim.expired:
                log.warning("connection from %s:%d: no TLS handshake and A-ASSOCIATE-RQ within %.0f s", address[0],
                            address[1], self.settings.acse_timeout)  # fmt: skip
            else:
                log.warning("connection from %s:%d failed: %s", address[0], address[1], exc)
        except Exception:  # a bug must cost one connection, not the listener
            log.exception("connection from %s:%d failed", address[0], address[1])
        finally:
            artim.cancel()
            with self._lock:
                self._active.discard(sock)
                self._active.discard(connection)
            if connection is not sock:
                connection.close()

    def close_all(self) -> None:
        """Shut down every connection being served (their threads then end)."""
        with self._lock:
            active = list(self._active)
        for sock in active:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    """Shut a connection down from another thread: its reader sees end of file."""
    # socket.socket.shutdown, not SSLSocket's: the TLS object must not be touched from a second thread.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _ArtimTimer:
    """The ARTIM timer (PS3.8 9.1.5) while the acceptor awaits the A-ASSOCIATE-RQ.

    The socket time-out bounds each read; a peer that drips its request a
    byte at a time would reset it forever.  This bounds the whole wait (TLS
    handshake included) by shutting the connection down when it expires.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.connection = sock
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        _shutdown(self.connection)

    def cancel(self) -> None:
        """Stop the timer (the A-ASSOCIATE-RQ has arrived, or the connection is over)."""
        self._timer.cancel()


class _Association:
    """The acceptor side of one association (PS3.8 state machine, acceptor states)."""

    def __init__(self, acceptor: Acceptor, sock: socket.socket, address: tuple[str, int], too_many: bool,
                 artim: _ArtimTimer) -> None:  # fmt: skip
        self.acceptor = acceptor
        self.artim = artim
        self.settings = acceptor.settings
        self.sock = sock
        self.address = address
        self.too_many = too_many
        self.reader: BinaryIO = sock.makefile("rb", buffering=1 << 16)
        self.info = AssociationInfo(calling_ae="", called_ae="", address=address[0], port=address[1])
        self.messages = 0

    @property
    def peer(self) -> str:
        return f"{self.info.calling_ae or '?'} ({self.address[0]}:{self.address[1]})"

    def run(self) -> None:
        try:
            if self._associate():
                self.sock.settimeout(self.settings.network_timeout)
                self._serve_messages()
        except ConnectionClosed as exc:
            if self.info.contexts:
                log.warning("association from %s ended without release: %s", self.peer, exc)
            elif self.artim.expired:
                log.warning("closing connection from %s: no A-ASSOCIATE-RQ within %.0f s", self.peer,
                            self.settings.acse_timeout)  # fmt: skip
            else:
                log.debug("connection from %s closed: %s", self.peer, exc)
        except ProtocolError as exc:
            log.warning("aborting association from %s: %s", self.peer, exc)
            self._send(encode_abort(exc.reason))
        except TimeoutError:
            limit = self.settings.network_timeout if self.info.contexts else self.settings.acse_timeout
            log.warning("aborting association from %s: no PDU for %.0f s", self.peer, limit)
            self._send(encode_abort())
        finally:
            self.reader.close()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            log.debug("could not send to %s: %s", self.peer, exc)

    # -- association establishment ----------------------------------------------------------
    def _associate(self) -> bool:
        """Await and answer the A-ASSOCIATE-RQ; True when the association is established."""
        pdu_type, body = read_pdu(self.reader, _MAX_ASSOCIATE_RQ_LENGTH)
        self.artim.cancel()
        if pdu_type == PduType.A_ABORT:
            raise ConnectionClosed("peer aborted before any association")  # PS3.8 Sta2: just close
        if pdu_type != PduType.A_ASSOCIATE_RQ:
            raise ProtocolError(f"{PduType(pdu_type).name} before any A-ASSOCIATE-RQ", AbortReason.UNEXPECTED_PDU)
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(struct.pack(">BxL", pdu_type, len(body)) + body)
            primitive = request.to_primitive()
            calling = str(primitive.calling_ae_title or "").strip()
            called = str(primitive.called_ae_title or "").strip()
        except Exception as exc:  # pynetdicom raises many kinds on malformed items
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__}: {exc})") from exc
        peer_max = primitive.maximum_length_received or 0
        if 0 < peer_max <= _PDV_OVERHEAD:
            raise ProtocolError(f"Maximum Length Received {peer_max} leaves no room for a fragment")
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
        results, role_items = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, list(self.settings.supported_contexts), roles
        )
        accepted = {
            int(cx.context_id): AcceptedContext(int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in results
            if cx.result == 0x00
        }
        self.info = AssociationInfo(calling_ae=calling, called_ae=called, address=self.address[0],
                                    port=self.address[1], peer_max_pdu_length=self.info.peer_max_pdu_length,
                                    contexts=accepted)  # fmt: skip
        self._send_accept(primitive, results, role_items)
        # The pid tells which intake process took it when several share the port.
        log.info("association from %s to %s accepted by pid %d (%d of %d presentation contexts)", self.peer, called,
                 os.getpid(), len(accepted), len(results))  # fmt: skip
        return True

    def _screen(self, request: A_ASSOCIATE_RQ, primitive: A_ASSOCIATE) -> Rejection | None:
        if not request.protocol_version & 0x0001:
            return Rejection(0x01, 0x02, 0x02, f"protocol version 0x{request.protocol_version:04X} not supported")
        if str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            return Rejection(0x01, 0x01, 0x02, f"application context {primitive.application_context_name}")
        if self.too_many:
            return local_limit_exceeded(f"more than {self.settings.max_associations} associations at once")
        return self.acceptor.handler.screen(self.info)

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
        command_fragments: list[bytes] = []
        command: Command | None = None  # a command whose data set is being received
        context_id = 0
        data_fragments: list[memoryview] = []
        data_length = 0
        while True:
            pdu_type, body = read_pdu(self.reader, _MAX_P_DATA_LENGTH)
            if pdu_type == PduType.A_RELEASE_RQ:
                self._send(encode_release_rp())
                log.info("association from %s released after %d messages", self.peer, self.messages)
                return
            if pdu_type == PduType.A_ABORT:
                log.warning("association from %s aborted by the peer after %d messages", self.peer, self.messages)
                return
            if pdu_type != PduType.P_DATA_TF:
                raise ProtocolError(f"unexpected {PduType(pdu_type).name} in an association",
                                    AbortReason.UNEXPECTED_PDU)  # fmt: skip
            for pdv_context, is_command, is_last, fragment in iter_pdvs(body):
                if pdv_context not in self.info.contexts:
                    raise ProtocolError(f"presentation context {pdv_context} was not accepted")
                if is_command:
                    if command is not None:
                        raise ProtocolError("a command fragment arrived while a data set was expected",
                                            AbortReason.UNEXPECTED_PDU_PARAMETER)  # fmt: skip
                    command_fragments.append(bytes(fragment))
                    if sum(map(len, command_fragments)) > _MAX_COMMAND_LENGTH:
                        raise ProtocolError(f"command set longer than {_MAX_COMMAND_LENGTH} bytes")
                    if not is_last:
                        continue
                    try:
                        received = decode_command(b"".join(command_fragments))
                    except CommandSetError as exc:
                        raise ProtocolError(f"undecodable command set: {exc}") from exc
                    command_fragments = []
                    if received.has_data_set:
                        command, context_id, data_fragments, data_length = received, pdv_context, [], 0
                    else:
                        self._answer(pdv_context, received, None)
                    continue
                if command is None:
                    raise ProtocolError("a data set fragment arrived without a command",
                                        AbortReason.UNEXPECTED_PDU_PARAMETER)  # fmt: skip
                if pdv_context != context_id:
                    raise ProtocolError(f"data set on context {pdv_context}, its command on {context_id}")
                data_length += len(fragment)
                if data_length <= self.settings.max_data_set_bytes:
                    data_fragments.append(fragment)
                elif data_fragments:
                    data_fragments = []  # too large: read on to the end, then refuse
                if is_last:
                    self._answer(context_id, command, b"".join(data_fragments) if data_fragments else None,
                                 oversized=data_length > self.settings.max_data_set_bytes)  # fmt: skip
                    command, data_fragments, data_length = None, [], 0

    def _answer(self, context_id: int, command: Command, data_set: bytes | None, *, oversized: bool = False) -> None:
        """Perform one request and send its response."""
        self.messages += 1
        if not command.is_request:
            log.warning("ignoring a DIMSE response (0x%04X) from %s", command.command_field, self.peer)
            return
        if command.command_field == CommandField.C_CANCEL_RQ:
            return  # nothing of ours can be cancelled; C-CANCEL has no response
        context = self.info.contexts[context_id]
        result = self._perform(context, command, data_set, oversized)
        if result.status != Status.SUCCESS:
            log.debug("answering 0x%04X to %s: %s", result.status, self.peer, result.comment)
        response = encode_response(command, result.status, error_comment=result.comment)
        self.sock.sendall(encode_p_data(context_id, response, is_command=True,
                                        max_pdu_length=self.info.peer_max_pdu_length))  # fmt: skip

    def _perform(self, context: AcceptedContext, command: Command, data_set: bytes | None,
                 oversized: bool) -> StoreResult:  # fmt: skip
        if command.affected_sop_class_uid != context.abstract_syntax:
            why = f"SOP class {command.affected_sop_class_uid} on a {context.abstract_syntax} context"
            return StoreResult(Status.SOP_CLASS_NOT_SUPPORTED, why)
        is_verification = context.abstract_syntax == VERIFICATION_SOP_CLASS
        if command.command_field == CommandField.C_ECHO_RQ and is_verification:
            return StoreResult(Status.SUCCESS)
        if command.command_field != CommandField.C_STORE_RQ or is_verification:
            return StoreResult(Status.UNRECOGNIZED_OPERATION, f"command 0x{command.command_field:04X} not served")
        if oversized:
            return StoreResult(Status.OUT_OF_RESOURCES,
                               f"instance larger than {self.settings.max_data_set_bytes} bytes")  # fmt: skip
        if data_set is None:
            return StoreResult(Status.CANNOT_UNDERSTAND, "C-STORE without a data set")
        try:
            return self.acceptor.handler.store(self.info, context, command, data_set)
        except Exception:  # a handler bug fails one instance, not the association
            log.exception("storing %s from %s failed", command.affected_sop_instance_uid, self.peer)
            return StoreResult(Status.PROCESSING_FAILURE, "processing failure")


class AcceptorServer(socketserver.ThreadingTCPServer):
    """A TCP listener that hands every connection to an :class:`Acceptor` in a thread of its own.

    Parameters
    ----------
    address : (str, int)
        Interface and port; port 0 picks a free one.
    acceptor : Acceptor
        Serves the connections.
    reuse_port : bool
        Join the port's ``SO_REUSEPORT`` group, so that several processes
        share the port and the kernel spreads connections over them.
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64  # connections the kernel queues while the loop hands earlier ones to threads

    def __init__(self, address: tuple[str, int], acceptor: Acceptor, *, reuse_port: bool = False) -> None:
        self.acceptor = acceptor
        self.reuse_port = reuse_port
        super().__init__(address, socketserver.BaseRequestHandler)

    def server_bind(self) -> None:
        """Bind, first joining the ``SO_REUSEPORT`` group when asked (the option must precede bind())."""
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def finish_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Serve one connection (called in its own thread)."""
        self.acceptor.serve(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        """Log instead of printing a traceback to stderr."""
        log.exception("unexpected error serving %s", client_address)

    def shutdown(self) -> None:
        """Stop accepting, close the listening socket and every open association."""
        super().shutdown()
        self.server_close()
        self.acceptor.close_all()
