"""DIMSE command sets: decoding requests and encoding responses (PS3.7 section 9 and E).

A command set is a short group-0000 data set, always Implicit VR Little
Endian.  The node's acceptor reads one per message and answers with one, so
this module does exactly that, with plain ``struct`` work and no pydicom
data set: on a small image, building and parsing command sets through pydicom
costs as much CPU as the rest of a C-STORE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

#: Command Data Set Type (0000,0800) value meaning "no data set follows".
NO_DATA_SET = 0x0101

# Command set element numbers (group 0000).
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000

#: An Error Comment is an LO: at most 64 characters.
_MAX_ERROR_COMMENT = 64


class CommandField(IntEnum):
    """Command Field (0000,0100) values the node meets (PS3.7 Annex E)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_FIND_RQ = 0x0020
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    C_CANCEL_RQ = 0x0FFF


class Status(IntEnum):
    """DIMSE status codes the node sends (PS3.7 Annex C, PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    UNRECOGNIZED_OPERATION = 0x0211
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class CommandSetError(ValueError):
    """A command set that does not decode, or lacks an element its command needs."""


@dataclass(frozen=True)
class Command:
    """The parts of a received DIMSE request command set that the node acts on.

    Attributes
    ----------
    command_field : int
        (0000,0100); see :class:`CommandField`.
    message_id : int
        (0000,0110), echoed as Message ID Being Responded To (0 for a
        C-CANCEL, which carries none).
    affected_sop_class_uid : str
        (0000,0002), ``""`` when absent.
    affected_sop_instance_uid : str
        (0000,1000), ``""`` when absent.
    has_data_set : bool
        Whether a data set follows the command (0000,0800) != 0101H.
    """

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_data_set: bool

    @property
    def is_request(self) -> bool:
        """True for a request (responses have bit 15 of the Command Field set)."""
        return not self.command_field & 0x8000


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode an Implicit VR Little Endian command set.

    Parameters
    ----------
    data : bytes-like
        The command set as reassembled from its command fragments.

    Returns
    -------
    Command

    Raises
    ------
    CommandSetError
        When an element runs past the end, an element is not in group 0000,
        or the Command Field, Command Data Set Type or (for a request other
        than C-CANCEL) the Message ID is missing.
    """
    view = memoryview(data)
    values: dict[int, bytes] = {}
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            raise CommandSetError(f"command set ends inside an element header at byte {offset}")
        group, element, length = struct.unpack_from("<HHL", view, offset)
        offset += 8
        if group != 0x0000:
            raise CommandSetError(f"element ({group:04X},{element:04X}) is not a command element")
        if length > end - offset:
            raise CommandSetError(f"element (0000,{element:04X}) claims {length} bytes, {end - offset} are left")
        values[element] = bytes(view[offset : offset + length])
        offset += length

    def us(element: int) -> int:
        raw = values.get(element)
        if raw is None or len(raw) != 2:
            raise CommandSetError(f"command set lacks (0000,{element:04X}) or it is not a US value")
        return int.from_bytes(raw, "little")

    def ui(element: int) -> str:
        return values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    command_field = us(_COMMAND_FIELD)
    # Every request but C-CANCEL carries a Message ID; responses and C-CANCEL refer to another one.
    needs_id = not command_field & 0x8000 and command_field != CommandField.C_CANCEL_RQ
    message_id = us(_MESSAGE_ID) if needs_id or _MESSAGE_ID in values else 0
    return Command(
        command_field=command_field,
        message_id=message_id,
        affected_sop_class_uid=ui(_AFFECTED_SOP_CLASS),
        affected_sop_instance_uid=ui(_AFFECTED_SOP_INSTANCE),
        has_data_set=us(_DATA_SET_TYPE) != NO_DATA_SET,
    )


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_response(
    request: Command,
    status: int,
    *,
    error_comment: str | None = None,
) -> bytes:
    """Encode the response command set to ``request``.

    Parameters
    ----------
    request : Command
        The request being answered; its Command Field with bit 15 set becomes
        the response's, and its SOP class / instance UIDs are echoed.
    status : int
        (0000,0900) Status.
    error_comment : str, optional
        (0000,0902) Error Comment, for failure statuses; cut to 64 characters
        (an LO value) and to ASCII.

    Returns
    -------
    bytes
        The command set, group length first, elements in ascending order.
    """
    elements: list[bytes] = []
    if request.affected_sop_class_uid:
        elements.append(_element(_AFFECTED_SOP_CLASS, _padded(request.affected_sop_class_uid, b"\x00")))
    elements.append(_element(_COMMAND_FIELD, struct.pack("<H", request.command_field | 0x8000)))
    elements.append(_element(_MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id)))
    elements.append(_element(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)))
    elements.append(_element(_STATUS, struct.pack("<H", status)))
    if error_comment:
        text = error_comment.encode("ascii", "replace").decode("ascii")[:_MAX_ERROR_COMMENT]
        elements.append(_element(_ERROR_COMMENT, _padded(text.replace("\\", "/"), b" ")))
    if request.affected_sop_instance_uid:
        elements.append(_element(_AFFECTED_SOP_INSTANCE, _padded(request.affected_sop_instance_uid, b"\x00")))
    body = b"".join(elements)
    return _element(_GROUP_LENGTH, struct.pack("<L", len(body))) + body
