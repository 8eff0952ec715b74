"""The node's DICOM listener: connections in, one :class:`AcceptorAssociation` per connection.

Why not pynetdicom's ``AE`` for this role: pynetdicom runs each association
as two polling threads (the DUL reactor and the association reactor) that
pass every PDU and DIMSE message through queues, an event system and
pydicom-encoded command sets.  On a small image that is ~4 ms of CPU per
C-STORE, a fifth of DCMTK's ``storescp`` throughput before any storage work
(``bench/bench_ingest.py``).  The node needs a narrow slice of the protocol --
accept an association, receive C-ECHO and C-STORE, answer, release -- so it
runs that slice itself (:mod:`medsegagent.dicom.association`), one thread per
connection with blocking I/O, and keeps pynetdicom for what happens once per
association (the A-ASSOCIATE items) and for its SCU roles.

This module holds the connection side: the TCP (or TLS) listener, the count
of open connections against the association limit and the separate cap on
connections that have not associated yet, and shutting every connection
down when the listener stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import socket
import socketserver
import ssl
import threading
import time

from medsegagent.dicom.association import AcceptorAssociation, AcceptorSettings, StorageHandler

log = logging.getLogger(__name__)

#: Seconds between log lines about connections closed over the pending cap.
_LOG_INTERVAL_S = 10.0


class Acceptor:
    """Serves the connections of a listener; one call of :meth:`serve` per connection, each in its own thread.

    A connection is *pending* until its A-ASSOCIATE-RQ has arrived whole,
    then it holds one of ``settings.max_associations`` association slots.
    Pending connections are capped separately (``max_pending_connections``):
    one more closes the oldest, so that sockets that never associate -- a
    port scan, a stuck client, a flood -- cannot starve configured peers,
    whose requests follow their connection at once.

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
        self._pending: dict[_Connection, None] = {}  # insertion-ordered: the oldest first
        self._associated: set[_Connection] = set()
        self._closed_pending = 0  # closed over the cap since the last log line
        self._closed_logged_at = -math.inf

    @property
    def active_associations(self) -> int:
        """Connections being served now (associated or not yet)."""
        with self._lock:
            return len(self._pending) + len(self._associated)

    @property
    def pending_connections(self) -> int:
        """Connections that have not sent their A-ASSOCIATE-RQ yet."""
        with self._lock:
            return len(self._pending)

    def serve(self, sock: socket.socket, address: tuple[str, ...]) -> None:
        """Serve one connection until it is released, aborted or times out; never raises."""
        started = time.monotonic()
        peer = (str(address[0]), int(address[1]))
        connection = _Connection(sock)
        self._add_pending(connection, peer)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small PDUs otherwise wait for delayed ACKs
            if self.ssl_context is not None:
                # CPython bounds the whole handshake by the socket time-out (a deadline, not per read).
                sock.settimeout(self.settings.acse_timeout)
                tls = self.ssl_context.wrap_socket(sock, server_side=True)
                with self._lock:  # the TLS socket took over the descriptor (the plain one is detached)
                    connection.sock = tls
                started = time.monotonic()
            association = AcceptorAssociation(connection.sock, peer, self.handler, self.settings,
                                              claim_slot=lambda: self._claim_slot(connection))  # fmt: skip
            association.run(started)
        except (ssl.SSLError, OSError) as exc:
            log.warning("connection from %s:%d failed: %s", peer[0], peer[1], exc)
        except Exception:  # a bug must cost one connection, not the listener
            log.exception("connection from %s:%d failed", peer[0], peer[1])
        finally:
            with self._lock:
                self._pending.pop(connection, None)
                self._associated.discard(connection)
            if connection.sock is not sock:
                connection.sock.close()

    def _add_pending(self, connection: _Connection, peer: tuple[str, int]) -> None:
        """Count a new connection as pending; over the cap, close the oldest pending one."""
        now = time.monotonic()
        with self._lock:
            self._pending[connection] = None
            if len(self._pending) <= self.settings.max_pending_connections:
                return
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.shut_down()  # its thread ends on the closed socket
            # One line per 10 s at most: a flood must not flood the log too.
            self._closed_pending += 1
            if now - self._closed_logged_at < _LOG_INTERVAL_S:
                return
            closed, self._closed_pending, self._closed_logged_at = self._closed_pending, 0, now
        log.warning("closed the oldest connection without an association (%d since the last such line): more than "
                    "%d pending; newest from %s:%d", closed, self.settings.max_pending_connections, peer[0],
                    peer[1])  # fmt: skip

    def _claim_slot(self, connection: _Connection) -> bool:
        """The connection's A-ASSOCIATE-RQ arrived: take an association slot if one is free."""
        with self._lock:
            self._pending.pop(connection, None)
            if len(self._associated) >= self.settings.max_associations:
                return False
            self._associated.add(connection)
            return True

    def close_all(self) -> None:
        """Shut down every connection being served (their threads then end)."""
        with self._lock:
            connections = [*self._pending, *self._associated]
        for connection in connections:
            connection.shut_down()


class _Connection:
    """One accepted connection: its socket (the TLS one once wrapped), compared by identity."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def shut_down(self) -> None:
        """Shut the socket down from another thread, so that the thread serving it ends."""
        # socket.socket.shutdown, not SSLSocket's: the TLS object must not be used from a second thread.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class AcceptorServer(socketserver.ThreadingTCPServer):
    """A TCP listener that hands every connection to an :class:`Acceptor` in a thread of its own.

    Parameters
    ----------
    address : (str, int)
        Interface (IPv4 or IPv6 address, or a host name) and port; port 0 picks a free one.
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
        self.address_family = _address_family(address[0])
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


def _address_family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 address (or a name that resolves only to IPv6), else AF_INET."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        families = {info[0] for info in infos}
        return socket.AF_INET if socket.AF_INET in families or not families else socket.AF_INET6
