"""DICOM Upper Layer PDUs on the wire (PS3.8 section 9.3): framing, P-DATA, short PDUs.

Every PDU starts with a 6-byte header: type, a reserved byte, and the length
of what follows (32-bit big endian).  The acceptor reads PDUs with
:func:`read_pdu`, splits P-DATA-TF into presentation data values with
:func:`iter_pdvs` and answers with :func:`encode_p_data` and the fixed-size
PDUs below.  The association PDUs (A-ASSOCIATE-RQ/AC, with their variable
items) are decoded and encoded by pynetdicom's :mod:`pynetdicom.pdu`; see
:mod:`medsegagent.dicom.acceptor`.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from enum import IntEnum
from typing import Protocol

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")

#: Bytes of a PDV item header (item length, context ID, message control header).
PDV_HEADER_LENGTH = _PDV_HEADER.size

#: Bits of a PDV's Message Control Header.
_MCH_COMMAND = 0x01
_MCH_LAST = 0x02


class PduType(IntEnum):
    """PDU types (PS3.8 Table 9-11)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortReason(IntEnum):
    """A-ABORT reasons when the service provider aborts (PS3.8 Table 9-26, source 2)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER = 0x06


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionClosed(Exception):
    """The peer closed the connection (between PDUs, or inside one)."""


class ByteSource(Protocol):
    """Where PDUs come from: ``read(n)`` returns ``n`` bytes, or fewer at the end of the stream."""

    def read(self, n: int, /) -> bytes | bytearray:
        """Up to ``n`` bytes; fewer only when the stream ends."""


class SocketReader:
    """Reads a socket to exact lengths, each PDU within a deadline.

    The deadline bounds a whole PDU, not the gap between two ``recv`` calls:
    with a plain socket time-out, a peer that sends a byte every few seconds
    would hold its connection forever.  Set :attr:`deadline` (a
    ``time.monotonic()`` value) before each PDU.

    Parameters
    ----------
    sock : socket.socket
        The connection (plain or TLS).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = float("inf")

    def read(self, n: int, /) -> bytearray:
        """``n`` bytes, or fewer when the peer closes the connection.

        Raises
        ------
        TimeoutError
            When the deadline passes first.
        """
        buffer = bytearray(n)
        view = memoryview(buffer)
        filled = 0
        while filled < n:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("PDU not complete before its deadline")
            self.sock.settimeout(remaining)
            received = self.sock.recv_into(view[filled:], n - filled)
            if not received:
                break
            filled += received
        view.release()  # a bytearray with a live view cannot be resized
        if filled < n:
            del buffer[filled:]
        return buffer


def encode_pdu(pdu_type: int, body: bytes | bytearray) -> bytes:
    """A PDU: header and ``body``."""
    return _HEADER.pack(pdu_type, len(body)) + body


def read_pdu(stream: ByteSource, max_length: int) -> tuple[int, bytes | bytearray]:
    """Read one PDU.

    Parameters
    ----------
    stream : ByteSource
        The association's byte stream (a :class:`SocketReader`, or any binary
        file).
    max_length : int
        Largest PDU length (after the header) this state accepts; a larger
        claim is refused before anything is allocated for it.

    Returns
    -------
    (int, bytes-like)
        The PDU type and the bytes after the header.

    Raises
    ------
    ConnectionClosed
        When the peer closed the connection.
    ProtocolError
        For an unknown PDU type or a length above ``max_length``.
    """
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise ConnectionClosed("peer closed the connection" + (" inside a PDU header" if header else ""))
    pdu_type, length = _HEADER.unpack(header)
    if pdu_type not in PduType._value2member_map_:
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU)
    if length > max_length:
        raise ProtocolError(f"{PduType(pdu_type).name} claims {length} bytes, at most {max_length} accepted")
    body = stream.read(length)
    if len(body) < length:
        raise ConnectionClosed(f"peer closed the connection inside a {PduType(pdu_type).name} PDU")
    return pdu_type, body


def iter_pdvs(body: bytes | bytearray) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """Split the body of a P-DATA-TF into its presentation data values.

    Yields
    ------
    (int, bool, bool, memoryview)
        Presentation context ID, is-command, is-last-fragment, and the
        fragment (a view into ``body``, no copy).

    Raises
    ------
    ProtocolError
        When a PDV item is shorter than its header or runs past the PDU, or
        the PDU holds no PDV at all.
    """
    view = memoryview(body)
    offset, end = 0, len(view)
    if end == 0:
        raise ProtocolError("P-DATA-TF without a presentation data value")
    while offset < end:
        if end - offset < _PDV_HEADER.size:
            raise ProtocolError("P-DATA-TF ends inside a presentation data value header")
        item_length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if item_length < 2 or item_length - 2 > end - offset - _PDV_HEADER.size:
            raise ProtocolError(f"presentation data value claims an item length of {item_length}")
        start = offset + _PDV_HEADER.size
        offset = start + item_length - 2
        yield context_id, bool(control & _MCH_COMMAND), bool(control & _MCH_LAST), view[start:offset]


def encode_p_data(context_id: int, payload: bytes, *, is_command: bool, max_pdu_length: int) -> bytes:
    """Encode a command or data set as P-DATA-TF PDUs, one fragment per PDU.

    Parameters
    ----------
    context_id : int
        The presentation context.
    payload : bytes
        The whole command set (or data set).
    is_command : bool
        Command or data set fragments.
    max_pdu_length : int
        The peer's Maximum Length Received (0: no limit); each PDU's length
        stays within it.

    Returns
    -------
    bytes
        The PDUs, ready to send.
    """
    room = max_pdu_length - _PDV_HEADER.size if max_pdu_length else len(payload) or 1
    if room < 1:
        raise ValueError(f"a maximum PDU length of {max_pdu_length} leaves no room for data")
    pdus = []
    control = _MCH_COMMAND if is_command else 0
    for start in range(0, max(len(payload), 1), room):
        fragment = payload[start : start + room]
        last = start + room >= len(payload)
        header = _PDV_HEADER.pack(len(fragment) + 2, context_id, control | (_MCH_LAST if last else 0))
        pdus.append(_HEADER.pack(PduType.P_DATA_TF, len(header) + len(fragment)) + header + fragment)
    return b"".join(pdus)


def encode_associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source, reason/diagnostic."""
    return _HEADER.pack(PduType.A_ASSOCIATE_RJ, 4) + bytes((0, result, source, diagnostic))


def encode_release_rp() -> bytes:
    """A-RELEASE-RP (PS3.8 9.3.7)."""
    return _HEADER.pack(PduType.A_RELEASE_RP, 4) + bytes(4)


def encode_abort(reason: AbortReason = AbortReason.NOT_SPECIFIED) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return _HEADER.pack(PduType.A_ABORT, 4) + bytes((0, 0, 0x02, reason))
