"""Unit tests of the acceptor's wire code: DIMSE command sets (dicom/dimse.py) and PDU framing (dicom/pdu.py).

Every encoding is checked against an independent implementation: command sets
and PDUs made by pydicom / pynetdicom must decode with ours, and what ours
encodes must decode with theirs.
"""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from medsegagent.dicom.dimse import (
    Command,
    CommandField,
    CommandSetError,
    Status,
    decode_command,
    encode_response,
)
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

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND


def _command_set(message_class, primitive) -> bytes:
    """The Implicit VR LE command set pynetdicom sends for ``primitive``."""
    message = message_class()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def _decoded_response(raw: bytes) -> Dataset:
    return decode(BytesIO(raw), True, True)


def _pdus(stream: bytes, max_length: int = 1 << 24) -> list[tuple[int, bytes]]:
    """Split concatenated PDUs with read_pdu."""
    reader = BytesIO(stream)
    pdus = []
    while reader.tell() < len(stream):
        pdus.append(read_pdu(reader, max_length))
    return pdus


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


# -- decode_command --------------------------------------------------------------------------------


def test_decode_c_store_rq_from_pynetdicom():
    """A C-STORE-RQ command set as pynetdicom encodes it decodes to its fields (odd UID padding stripped)."""
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.45"  # odd length: padded with a NUL on the wire
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x00" * 8)
    command = decode_command(_command_set(C_STORE_RQ, primitive))
    assert command == Command(
        command_field=CommandField.C_STORE_RQ,
        message_id=7,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.3.45",
        has_data_set=True,
    )
    assert command.is_request


def test_decode_c_echo_rq_has_no_data_set():
    """A C-ECHO-RQ carries no data set (Command Data Set Type 0101H) and no instance UID."""
    primitive = C_ECHO()
    primitive.MessageID = 65535
    primitive.AffectedSOPClassUID = VERIFICATION
    command = decode_command(_command_set(C_ECHO_RQ, primitive))
    assert command.command_field == CommandField.C_ECHO_RQ
    assert command.message_id == 65535
    assert command.affected_sop_class_uid == VERIFICATION
    assert command.affected_sop_instance_uid == ""
    assert command.has_data_set is False


def test_decode_c_find_rq_and_c_cancel_rq():
    """A C-FIND-RQ (with identifier) and a C-CANCEL-RQ (no Message ID of its own) decode."""
    find = C_FIND()
    find.MessageID = 12
    find.AffectedSOPClassUID = FIND
    find.Priority = 0
    find.Identifier = BytesIO(b"\x08\x00\x52\x00\x00\x00\x00\x00")
    command = decode_command(_command_set(C_FIND_RQ, find))
    assert (command.command_field, command.message_id, command.has_data_set) == (CommandField.C_FIND_RQ, 12, True)

    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 12
    command = decode_command(_command_set(C_CANCEL_RQ, cancel))
    assert command.command_field == CommandField.C_CANCEL_RQ
    assert command.message_id == 0
    assert command.has_data_set is False


def test_decode_response_command_is_not_a_request():
    """A response command set (bit 15 of the Command Field) decodes without a Message ID and is no request."""
    ds = Dataset()
    ds.CommandGroupLength = 0
    ds.CommandField = 0x8001
    ds.MessageIDBeingRespondedTo = 3
    ds.CommandDataSetType = 0x0101
    ds.Status = 0
    command = decode_command(encode(ds, True, True))
    assert command.command_field == CommandField.C_STORE_RSP
    assert not command.is_request
    assert command.message_id == 0


GOOD_ECHO = (
    _element(0x0000, struct.pack("<L", 38))
    + _element(0x0002, b"1.2.840.10008.1.1\x00")
    + _element(0x0100, struct.pack("<H", 0x0030))
    + _element(0x0110, struct.pack("<H", 1))
    + _element(0x0800, struct.pack("<H", 0x0101))
)

BAD_COMMAND_SETS = {
    "empty": b"",
    "cut inside an element header": GOOD_ECHO[:-4],
    "cut inside a value": GOOD_ECHO[:-1],
    "trailing partial header": GOOD_ECHO + b"\x00\x00\x01",
    "value length past the end": GOOD_ECHO + _element(0x0900, b"")[:4] + struct.pack("<L", 0xFFFFFFFF),
    "element outside group 0000": GOOD_ECHO + struct.pack("<HHL", 0x0008, 0x0016, 2) + b"12",
    "no command field": _element(0x0110, struct.pack("<H", 1)) + _element(0x0800, struct.pack("<H", 0x0101)),
    "command field not a US": _element(0x0100, struct.pack("<L", 0x0030))
    + _element(0x0110, struct.pack("<H", 1))
    + _element(0x0800, struct.pack("<H", 0x0101)),
    "request without message id": _element(0x0100, struct.pack("<H", 0x0001))
    + _element(0x0800, struct.pack("<H", 0x0000)),
    "no data set type": _element(0x0100, struct.pack("<H", 0x0030)) + _element(0x0110, struct.pack("<H", 1)),
    "random bytes": bytes(range(7, 250, 3)),
}


def test_good_echo_fixture_decodes():
    """The hand-built C-ECHO-RQ the error cases are cut from is itself valid."""
    assert decode_command(GOOD_ECHO) == Command(CommandField.C_ECHO_RQ, 1, VERIFICATION, "", False)


@pytest.mark.parametrize("case", list(BAD_COMMAND_SETS))
def test_malformed_command_set_raises(case):
    """Truncated or garbage command sets raise CommandSetError (a ValueError), never anything else."""
    with pytest.raises(CommandSetError):
        decode_command(BAD_COMMAND_SETS[case])


# -- encode_response -------------------------------------------------------------------------------


def _store_request(instance: str = "1.2.3.4.5") -> Command:
    return Command(CommandField.C_STORE_RQ, 42, CT, instance, True)


def test_c_store_response_decodes_with_pydicom():
    """A C-STORE-RSP decodes with pydicom to the expected elements, group length right."""
    raw = encode_response(_store_request("1.2.3.4.5"), Status.SUCCESS)
    ds = _decoded_response(raw)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 42
    assert ds.Status == 0x0000
    assert ds.CommandDataSetType == 0x0101
    assert ds.AffectedSOPClassUID == CT
    assert ds.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert "ErrorComment" not in ds
    assert "MessageID" not in ds
    # (0000,0000) counts every byte after its own 12-byte element.
    assert ds.CommandGroupLength == len(raw) - 12
    # Elements in ascending tag order, all group 0000.
    tags = [int(element.tag) for element in ds]
    assert tags == sorted(tags)
    assert all(tag >> 16 == 0 for tag in tags)
    assert len(raw) % 2 == 0


def test_c_echo_response_and_round_trip():
    """A C-ECHO-RSP (0x8030) has no instance UID; our own decoder reads our response back."""
    request = Command(CommandField.C_ECHO_RQ, 9, VERIFICATION, "", False)
    raw = encode_response(request, Status.SUCCESS)
    ds = _decoded_response(raw)
    assert ds.CommandField == 0x8030
    assert ds.MessageIDBeingRespondedTo == 9
    assert "AffectedSOPInstanceUID" not in ds
    assert ds.CommandGroupLength == len(raw) - 12
    back = decode_command(raw)
    assert back.command_field == CommandField.C_ECHO_RSP
    assert not back.is_request
    assert back.affected_sop_class_uid == VERIFICATION


def test_error_comment_is_cut_to_64_characters():
    """A long, non-ASCII Error Comment becomes at most 64 ASCII characters; the group length stays right."""
    comment = "é" + "x" * 100 + "\\tail"
    raw = encode_response(_store_request(), Status.CANNOT_UNDERSTAND, error_comment=comment)
    ds = _decoded_response(raw)
    assert ds.Status == 0xC000
    assert len(ds.ErrorComment) <= 64
    assert ds.ErrorComment == ("?" + "x" * 100)[:64]
    assert ds.CommandGroupLength == len(raw) - 12


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65])
def test_error_comment_lengths_stay_even_and_valid(length):
    """Error Comments of any length encode as even-length LO values of at most 64 characters."""
    raw = encode_response(_store_request(), Status.PROCESSING_FAILURE, error_comment="a" * length)
    ds = _decoded_response(raw)
    assert ds.ErrorComment == "a" * min(length, 64)
    assert ds.Status == 0x0110
    assert len(raw) % 2 == 0
    assert ds.CommandGroupLength == len(raw) - 12


def test_error_comment_backslash_is_not_a_value_separator():
    """A backslash in the comment would split the LO into several values; it is replaced."""
    raw = encode_response(_store_request(), Status.CANNOT_UNDERSTAND, error_comment=r"C:\spool\x")
    ds = _decoded_response(raw)
    assert ds["ErrorComment"].VM == 1
    assert ds.ErrorComment == "C:/spool/x"


def test_response_to_odd_length_uids_is_padded_and_echoed():
    """Odd-length UIDs are NUL-padded to even length and decode back unchanged."""
    request = Command(CommandField.C_STORE_RQ, 1, "1.2.840.10008.5.1.4.1.1.4", "1.2.345", True)
    raw = encode_response(request, Status.OUT_OF_RESOURCES, error_comment="full")
    ds = _decoded_response(raw)
    assert ds.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.AffectedSOPInstanceUID == "1.2.345"
    assert ds.Status == 0xA700
    assert ds.ErrorComment == "full"


# -- read_pdu ----------------------------------------------------------------------------------------


def test_read_pdu_reads_consecutive_pdus():
    """read_pdu returns type and body and leaves the stream at the next PDU."""
    stream = BytesIO(encode_release_rp() + encode_abort(AbortReason.UNEXPECTED_PDU))
    assert read_pdu(stream, 100) == (PduType.A_RELEASE_RP, bytes(4))
    assert read_pdu(stream, 100) == (PduType.A_ABORT, bytes((0, 0, 2, 2)))
    with pytest.raises(ConnectionClosed):
        read_pdu(stream, 100)


def test_read_pdu_accepts_exactly_max_length():
    """A PDU of exactly the maximum length is read; one byte more is refused."""
    body = bytes(100)
    pdu = struct.pack(">BxL", 0x04, len(body)) + body
    assert read_pdu(BytesIO(pdu), 100) == (0x04, body)
    with pytest.raises(ProtocolError) as info:
        read_pdu(BytesIO(pdu), 99)
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER


class _CountingReader(BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size=-1):
        self.asked.append(size)
        return super().read(size)


def test_read_pdu_refuses_huge_claim_before_reading_it():
    """A 4 GB length claim is refused from the header alone, without asking the stream for the body."""
    reader = _CountingReader(struct.pack(">BxL", 0x04, 0xFFFFFFFF) + b"abc")
    with pytest.raises(ProtocolError, match="claims"):
        read_pdu(reader, 1 << 20)
    assert reader.asked == [6]


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x09, 0x10, 0xFF])
def test_read_pdu_refuses_unknown_type(pdu_type):
    """Unknown PDU types are refused with reason 'unrecognized PDU'."""
    with pytest.raises(ProtocolError) as info:
        read_pdu(BytesIO(struct.pack(">BxL", pdu_type, 4) + bytes(4)), 100)
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU


@pytest.mark.parametrize(
    "data",
    [b"", b"\x04", b"\x04\x00\x00\x00\x00", struct.pack(">BxL", 0x04, 10) + bytes(9)],
    ids=["nothing", "one header byte", "five header bytes", "body one byte short"],
)
def test_read_pdu_eof_is_connection_closed(data):
    """EOF between PDUs, inside a header or inside a body raises ConnectionClosed."""
    with pytest.raises(ConnectionClosed):
        read_pdu(BytesIO(data), 100)


# -- iter_pdvs ---------------------------------------------------------------------------------------


def test_iter_pdvs_splits_several_pdvs():
    """Several PDVs in one P-DATA-TF come out in order with their context, command and last flags."""
    body = (
        struct.pack(">LBB", 2 + 3, 1, 0x03) + b"cmd"
        + struct.pack(">LBB", 2 + 0, 3, 0x00)
        + struct.pack(">LBB", 2 + 4, 5, 0x02) + b"data"
    )  # fmt: skip
    pdvs = [(cx, cmd, last, bytes(fragment)) for cx, cmd, last, fragment in iter_pdvs(body)]
    assert pdvs == [(1, True, True, b"cmd"), (3, False, False, b""), (5, False, True, b"data")]


def test_iter_pdvs_reads_pynetdicom_p_data():
    """A C-ECHO-RQ as pynetdicom frames it (P-DATA-TF) reassembles and decodes."""
    primitive = C_ECHO()
    primitive.MessageID = 5
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    stream = b""
    for p_data in message.encode_msg(11, 32):  # tiny PDUs: the command set spans several
        stream += _p_data_tf(p_data)
    pdus = _pdus(stream)
    assert len(pdus) > 1
    fragments = [pdv for _, body in pdus for pdv in iter_pdvs(body)]
    assert all(cx == 11 and is_command for cx, is_command, _, _ in fragments)
    assert [last for _, _, last, _ in fragments] == [False] * (len(fragments) - 1) + [True]
    command = decode_command(b"".join(bytes(f) for _, _, _, f in fragments))
    assert (command.command_field, command.message_id) == (CommandField.C_ECHO_RQ, 5)


def _p_data_tf(primitive: P_DATA) -> bytes:
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


@pytest.mark.parametrize("item_length", [0, 1])
def test_iter_pdvs_refuses_item_length_below_two(item_length):
    """An item length of 0 or 1 cannot hold the context ID and control header."""
    body = struct.pack(">LBB", item_length, 1, 0x03) + b"xx"
    with pytest.raises(ProtocolError):
        list(iter_pdvs(body))


@pytest.mark.parametrize(
    "body",
    [
        struct.pack(">LBB", 2 + 10, 1, 0x03) + bytes(9),
        struct.pack(">LBB", 2 + 2, 1, 0x03) + b"ok" + struct.pack(">LBB", 0xFFFFFFFF, 1, 0x03),
        struct.pack(">LBB", 2 + 2, 1, 0x03) + b"ok" + b"\x00\x00\x00",
        b"",
    ],
    ids=["first item past the end", "second item past the end", "trailing partial header", "no pdv"],
)
def test_iter_pdvs_refuses_items_running_past_the_pdu(body):
    """Items that run past the PDU, a partial item header or an empty P-DATA-TF are refused."""
    with pytest.raises(ProtocolError):
        list(iter_pdvs(body))


# -- encode_p_data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_pdu", [7, 16, 100, 4096, 16384])
@pytest.mark.parametrize("size", [0, 1, 94, 95, 1000, 20000])
def test_encode_p_data_respects_max_pdu_and_reassembles(max_pdu, size):
    """Every PDU fits the peer's maximum length; the fragments reassemble with only the last flagged last."""
    payload = bytes(i % 251 for i in range(size))
    for is_command in (True, False):
        pdus = _pdus(encode_p_data(3, payload, is_command=is_command, max_pdu_length=max_pdu))
        assert all(pdu_type == PduType.P_DATA_TF for pdu_type, _ in pdus)
        assert all(len(body) <= max_pdu for _, body in pdus)
        pdvs = [pdv for _, body in pdus for pdv in iter_pdvs(body)]
        assert len(pdvs) == len(pdus)  # one fragment per PDU
        assert all(cx == 3 and cmd is is_command for cx, cmd, _, _ in pdvs)
        assert [last for _, _, last, _ in pdvs] == [False] * (len(pdvs) - 1) + [True]
        assert b"".join(bytes(f) for _, _, _, f in pdvs) == payload
        # The fewest PDUs that fit: each full but the last.
        assert len(pdus) == max(1, -(-size // (max_pdu - 6)))


def test_encode_p_data_without_limit_is_one_pdu():
    """A peer maximum of 0 (no limit) gives one PDU holding everything."""
    payload = bytes(70000)
    pdus = _pdus(encode_p_data(1, payload, is_command=False, max_pdu_length=0))
    assert len(pdus) == 1
    [(cx, cmd, last, fragment)] = list(iter_pdvs(pdus[0][1]))
    assert (cx, cmd, last, len(fragment)) == (1, False, True, 70000)


@pytest.mark.parametrize("max_pdu", [1, 6])
def test_encode_p_data_refuses_maximum_without_room(max_pdu):
    """A maximum that leaves no byte for data after the PDV header is refused."""
    with pytest.raises(ValueError):
        encode_p_data(1, b"abc", is_command=True, max_pdu_length=max_pdu)


def test_encode_p_data_decodes_with_pynetdicom():
    """pynetdicom reads our P-DATA-TF: context ID and message control header as PS3.8 E.2 defines."""
    [(pdu_type, body)] = _pdus(encode_p_data(7, b"abcd", is_command=True, max_pdu_length=0))
    pdu = P_DATA_TF()
    pdu.decode(struct.pack(">BxL", pdu_type, len(body)) + body)
    assert pdu.presentation_data_value_items[0].presentation_context_id == 7
    assert pdu.presentation_data_value_items[0].presentation_data_value == b"\x03abcd"


# -- short PDUs ---------------------------------------------------------------------------------------


def test_associate_rj_decodes_with_pynetdicom():
    """A-ASSOCIATE-RJ carries result, source and diagnostic where PS3.8 9.3.4 puts them."""
    raw = encode_associate_rj(0x02, 0x03, 0x02)
    assert raw[0] == PduType.A_ASSOCIATE_RJ
    pdu = A_ASSOCIATE_RJ()
    pdu.decode(raw)
    assert (pdu.result, pdu.source, pdu.reason_diagnostic) == (2, 3, 2)
    assert len(raw) == 10


def test_release_rp_and_abort_decode_with_pynetdicom():
    """A-RELEASE-RP and A-ABORT (source 2, the given reason) decode with pynetdicom."""
    release = A_RELEASE_RP()
    release.decode(encode_release_rp())
    assert release.pdu_type == 0x06
    abort = A_ABORT_RQ()
    abort.decode(encode_abort(AbortReason.UNRECOGNIZED_PDU))
    assert (abort.source, abort.reason_diagnostic) == (2, 1)
    assert encode_abort()[-1] == AbortReason.NOT_SPECIFIED
    assert len(encode_abort()) == 10
