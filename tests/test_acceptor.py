"""The node's own association acceptor (dicom/acceptor.py) against real peers.

DCMTK's storescu/echoscu and pynetdicom SCUs exercise negotiation and the
P-DATA loop; a raw socket client (A-ASSOCIATE-RQ encoded by pynetdicom,
messages framed by pynetdicom) drives the protocol errors and time-outs that
well-behaved peers never produce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from medsegagent.dicom.acceptor import Acceptor, AcceptorServer
from medsegagent.dicom.association import AcceptorSettings, StoreResult
from medsegagent.dicom.image_writer import write_phantom
from medsegagent.dicom.pdu import ConnectionClosed, iter_pdvs, read_pdu
from medsegagent.dicom.phantom import make_phantom
from medsegagent.dicom.uids import MEDSEGAGENT_IMPLEMENTATION_UID, MEDSEGAGENT_IMPLEMENTATION_VERSION
from medsegagent.node.intake import StorageSCP
from tests.conftest import echo_ok, wait_until

#: Debian's DCMTK; the venv's pynetdicom apps shadow the names on PATH.
DCMTK = "/usr/bin"
ENV = {**os.environ, "TCP_NODELAY": "1"}
CALLING = "PACS"
CALLED = "MEDSEG"


def dcmtk(name: str, *args: str) -> subprocess.CompletedProcess:
    path = os.path.join(DCMTK, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"DCMTK {name} missing at {path}; run scripts/bootstrap.sh test")
    return subprocess.run([path, *args], env=ENV, capture_output=True, text=True, timeout=30)


# -- fixtures ----------------------------------------------------------------------------------------


def _start(tmp_path: Path, **settings) -> StorageSCP:
    """A StorageSCP on a free loopback port, its acceptor settings changed by ``settings``."""
    node = StorageSCP(tmp_path / "spool", ae_title=CALLED, host="127.0.0.1", port=0,
                      max_associations=settings.pop("max_associations", 8))  # fmt: skip
    if settings:
        node._settings = dataclasses.replace(node._settings, **settings)
    node.start()
    return node


@pytest.fixture
def node(tmp_path):
    scp = _start(tmp_path)
    yield scp
    scp.stop()


@pytest.fixture
def make_node(tmp_path):
    """``make_node(**settings)``: a StorageSCP with changed settings, stopped after the test."""
    started = []

    def make(**settings) -> StorageSCP:
        scp = _start(tmp_path / f"node{len(started)}", **settings)
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> list[Path]:
    """Three 64 x 64 CT instances (~10 kB each: several PDUs at a 4 kB maximum)."""
    files = write_phantom(make_phantom("CT", seed=21, slices=3, size=64), tmp_path_factory.mktemp("small"))
    return list(files.series["CT"])


@pytest.fixture(scope="module")
def big_ct(tmp_path_factory) -> list[Path]:
    """Two 256 x 256 CT instances (~130 kB each: more than one 128 kB PDU)."""
    files = write_phantom(make_phantom("CT", seed=22, slices=2, size=256), tmp_path_factory.mktemp("big"))
    return list(files.series["CT"])


# -- helpers -----------------------------------------------------------------------------------------


def _data_set_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information (which must start with its group length)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    tag, vr, length = struct.unpack_from("<L2sH", raw, 132)
    assert (tag, vr, length) == (0x00000002, b"UL", 4), "file meta must start with (0002,0000)"
    (group_length,) = struct.unpack_from("<L", raw, 140)
    return raw[144 + group_length :]


def _spooled(node: StorageSCP, source: Path) -> Path:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return node.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _scu(calling: str = CALLING) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _associate(port: int, *sop_classes: str, **kwargs):
    ae = _scu()
    return ae.associate("127.0.0.1", port, contexts=[build_context(s) for s in sop_classes], ae_title=CALLED,
                        **kwargs)  # fmt: skip


def _echo_ok(port: int) -> bool:
    return echo_ok(port, CALLING, CALLED)


@contextlib.contextmanager
def _reactor_paused(assoc):
    """Pause pynetdicom's reactor, as its own send_c_*() do, so that it leaves the responses to us."""
    assoc._reactor_checkpoint.clear()
    try:
        assert wait_until(lambda: assoc._is_paused, timeout=2.0)
        yield
    finally:
        assoc._reactor_checkpoint.set()


def _send_and_wait(assoc, primitive, context_id: int):
    """Send a DIMSE request on ``context_id`` through pynetdicom's DIMSE provider; return the response primitive."""
    with _reactor_paused(assoc):
        assoc.dimse.send_msg(primitive, context_id)
        _, response = assoc.dimse.get_msg(block=True)
        return response


def _context_id(assoc, sop_class: str) -> int:
    [context] = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    return context.context_id


def associate_rq(contexts: dict[int, str], *, max_pdu: int = 16384, calling: str = CALLING,
                 called: str = CALLED) -> bytes:  # fmt: skip
    """An A-ASSOCIATE-RQ encoded by pynetdicom: context ID -> abstract syntax (all uncompressed syntaxes)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    proposed = []
    for context_id, sop_class in contexts.items():
        context = build_context(sop_class)
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.0"
    primitive.user_information = [max_length, class_uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


class RawPeer:
    """A hand-driven association requestor over a plain (or TLS) socket."""

    def __init__(self, port: int, contexts: dict[int, str] | None = None, *, max_pdu: int = 16384,
                 wrap=None) -> None:  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = wrap(sock) if wrap is not None else sock
        self.reader = self.sock.makefile("rb")
        self.request = associate_rq(contexts or {1: Verification}, max_pdu=max_pdu)
        self.sock.sendall(self.request)
        pdu_type, body = read_pdu(self.reader, 1 << 20)
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type:#04x}"
        ac = A_ASSOCIATE_AC()
        ac.decode(_pdu(pdu_type, body))
        self.accepted = {cx.context_id: cx for cx in ac.to_primitive().presentation_context_definition_results_list
                         if cx.result == 0}  # fmt: skip

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_message(self, message_class, primitive, context_id: int, max_pdu: int = 0) -> None:
        """Frame a DIMSE message with pynetdicom (its command set encoded by pydicom)."""
        message = message_class()
        message.primitive_to_message(primitive)
        for p_data in message.encode_msg(context_id, max_pdu):
            pdu = P_DATA_TF()
            pdu.from_primitive(p_data)
            self.send(pdu.encode())

    def next_pdu(self, timeout: float = 5.0) -> tuple[int, bytes]:
        self.sock.settimeout(timeout)
        return read_pdu(self.reader, 1 << 24)

    def receive_command(self) -> tuple[Dataset, list[int]]:
        """Read one response command set; returns it and the lengths of the PDUs that carried it."""
        fragments, lengths = [], []
        while True:
            pdu_type, body = self.next_pdu()
            assert pdu_type == 0x04, f"expected P-DATA-TF, got PDU type {pdu_type:#04x}"
            lengths.append(len(body))
            for _, is_command, is_last, fragment in iter_pdvs(body):
                assert is_command
                fragments.append(bytes(fragment))
                if is_last:
                    return decode(BytesIO(b"".join(fragments)), True, True), lengths

    def expect_abort(self, timeout: float = 5.0) -> int:
        """The next PDU must be an A-ABORT from the service provider; returns its reason."""
        pdu_type, body = self.next_pdu(timeout)
        assert pdu_type == 0x07, f"expected A-ABORT, got PDU type {pdu_type:#04x}"
        assert body[2] == 0x02, "source must be the service provider"
        return body[3]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _echo_primitive(message_id: int = 1, sop_class: str = Verification) -> C_ECHO:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    return primitive


def _closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the server ends the connection within ``within`` s; also returns what it sent first."""
    sock.settimeout(within)
    received = b""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return True, received
            received += chunk
    except TimeoutError:
        return False, received
    except (ConnectionError, ssl.SSLError, OSError):
        return True, received
    return False, received


# -- DCMTK peers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_pdu, files", [(4096, "small_ct"), (131072, "big_ct")])
def test_storescu_stores_byte_identical_data_sets(node, request, max_pdu, files):
    """storescu with a small and a large maximum PDU: every instance is spooled with its data set byte for byte."""
    sources = request.getfixturevalue(files)
    echo = dcmtk("echoscu", "-aet", CALLING, "-aec", CALLED, "--max-pdu", str(max_pdu), "127.0.0.1", str(node.port))
    assert echo.returncode == 0, echo.stderr
    sent = dcmtk("storescu", "-aet", CALLING, "-aec", CALLED, "--max-pdu", str(max_pdu), "127.0.0.1",
                 str(node.port), *map(str, sources))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert node.stats.stored == len(sources)
    for source in sources:
        spooled = _spooled(node, source)
        # Negotiated Explicit VR Little Endian, the files' own syntax: the data set bytes must be unchanged.
        assert pydicom.dcmread(spooled, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )
        assert _data_set_bytes(spooled) == _data_set_bytes(source)
        original, stored = pydicom.dcmread(source), pydicom.dcmread(spooled)
        assert [e.tag for e in stored] == [e.tag for e in original]
        assert all(stored[e.tag].value == e.value for e in original)


def test_storescu_sends_big_instances_in_small_pdus(node, big_ct):
    """A 130 kB instance in 4 kB PDUs (dozens of fragments) is reassembled exactly."""
    sent = dcmtk("storescu", "-aet", CALLING, "-aec", CALLED, "--max-pdu", "4096", "127.0.0.1", str(node.port),
                 str(big_ct[0]))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert _data_set_bytes(_spooled(node, big_ct[0])) == _data_set_bytes(big_ct[0])


def test_associate_ac_announces_max_pdu_and_implementation(node):
    """The A-ASSOCIATE-AC carries Maximum Length 131072 and the node's Implementation Class UID."""
    assoc = _associate(node.port, Verification, CTImageStorage)
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 131072
        assert assoc.acceptor.implementation_class_uid == MEDSEGAGENT_IMPLEMENTATION_UID
        assert assoc.acceptor.implementation_version_name == MEDSEGAGENT_IMPLEMENTATION_VERSION
        assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {Verification, CTImageStorage}
    finally:
        assoc.release()
    assert assoc.is_released


# -- pynetdicom peers ---------------------------------------------------------------------------------


def test_several_messages_on_one_association(node, small_ct):
    """C-ECHO, then three C-STOREs, then another C-ECHO on one association: all succeed, all instances stored."""
    assoc = _associate(node.port, Verification, CTImageStorage)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        for path in small_ct:
            status = assoc.send_c_store(path)
            assert status.Status == 0
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert all(_spooled(node, path).is_file() for path in small_ct)
    assert node.stats.stored == len(small_ct)


def test_store_with_tiny_peer_max_pdu(node, small_ct):
    """A requestor that receives at most 1 kB per PDU still gets its C-STORE responses (and sends in 1 kB PDUs)."""
    assoc = _associate(node.port, CTImageStorage, max_pdu=1024)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(small_ct[0]).Status == 0
    finally:
        assoc.release()
    assert _data_set_bytes(_spooled(node, small_ct[0])) == _data_set_bytes(small_ct[0])


def test_echo_with_verification_uid_on_a_ct_context(node, small_ct):
    """A C-ECHO naming Verification sent on a CT context gets 0x0122; the association stays usable."""
    assoc = _associate(node.port, CTImageStorage)
    assert assoc.is_established
    try:
        response = _send_and_wait(assoc, _echo_primitive(3), _context_id(assoc, CTImageStorage))
        assert response is not None, "no response"
        assert response.MessageIDBeingRespondedTo == 3
        assert response.Status == 0x0122
        assert assoc.send_c_store(small_ct[0]).Status == 0
    finally:
        assoc.release()


def test_c_find_on_a_storage_context_is_unrecognized(node, small_ct):
    """A C-FIND-RQ (with its identifier) on a CT context gets 0x0211 and the association keeps serving."""
    assoc = _associate(node.port, CTImageStorage)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    find = C_FIND()
    find.MessageID = 4
    find.AffectedSOPClassUID = CTImageStorage
    find.Priority = 2
    find.Identifier = BytesIO(encode(identifier, False, True))
    try:
        response = _send_and_wait(assoc, find, _context_id(assoc, CTImageStorage))
        assert response is not None, "no response"
        assert isinstance(response, C_FIND)
        assert response.MessageIDBeingRespondedTo == 4
        assert response.Status == 0x0211
        assert assoc.send_c_store(small_ct[0]).Status == 0
    finally:
        assoc.release()


def test_c_cancel_gets_no_response_and_association_goes_on(node):
    """A C-CANCEL-RQ is answered with nothing; the next C-ECHO's response is the next message."""
    assoc = _associate(node.port, Verification)
    assert assoc.is_established
    try:
        cancel = C_CANCEL()
        cancel.MessageIDBeingRespondedTo = 1
        with _reactor_paused(assoc):
            assoc.dimse.send_msg(cancel, _context_id(assoc, Verification))
            assoc.dimse.send_msg(_echo_primitive(9), _context_id(assoc, Verification))
            _, response = assoc.dimse.get_msg(block=True)
        assert isinstance(response, C_ECHO)
        assert response.MessageIDBeingRespondedTo == 9
        assert response.Status == 0
    finally:
        assoc.release()


def test_find_context_is_not_accepted(node):
    """A Query/Retrieve context is refused (abstract syntax not supported) while Verification is accepted."""
    assoc = _associate(node.port, Verification, StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        [rejected] = assoc.rejected_contexts
        assert rejected.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
        assert rejected.result == 0x03  # abstract syntax not supported
    finally:
        assoc.release()


@pytest.mark.parametrize("scu_role, scp_role", [(True, True), (True, False), (False, True)])
def test_role_selection_does_not_break_negotiation(node, small_ct, scu_role, scp_role):
    """SCP/SCU Role Selection items (even for an unproposed SOP class) leave the requestor an SCU that can store."""
    roles = [build_role(CTImageStorage, scu_role=scu_role, scp_role=scp_role),
             build_role(MRImageStorage, scu_role=True, scp_role=True)]  # fmt: skip
    assoc = _associate(node.port, CTImageStorage, ext_neg=roles)
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        assert context.abstract_syntax == CTImageStorage
        assert context.as_scu
        assert assoc.send_c_store(small_ct[0]).Status == 0
    finally:
        assoc.release()


def test_unsupported_extended_negotiation_items_are_ignored(node, small_ct):
    """Asynchronous Operations Window, User Identity and SOP Class Extended items get no answer, yet negotiate."""
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"user"
    identity.secondary_field = b"secret"
    identity.positive_response_requested = False
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = CTImageStorage
    extended.service_class_application_information = b"\x02\x00\x00\x00\x01\x00"
    assoc = _associate(node.port, CTImageStorage, ext_neg=[window, identity, extended])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(small_ct[0]).Status == 0
    finally:
        assoc.release()


def test_concurrent_associations_store_in_parallel(node, small_ct):
    """Four associations storing at the same time are each served in full."""
    results: list[list[int]] = []

    def send() -> None:
        assoc = _associate(node.port, CTImageStorage)
        statuses = [int(assoc.send_c_store(path).Status) for path in small_ct] if assoc.is_established else [-1]
        if assoc.is_established:
            assoc.release()
        results.append(statuses)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == [[0] * len(small_ct)] * 4
    assert node.stats.stored == 4 * len(small_ct)
    assert sorted(p.name for p in node.spool_dir.rglob("*.dcm")) == sorted(
        f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in small_ct
    )


def test_max_associations(make_node):
    """With 2 allowed, a third request is rejected transient / provider (presentation) / local limit exceeded."""
    scp = make_node(max_associations=2)
    held = [_associate(scp.port, Verification) for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    received = []
    third = _associate(
        scp.port, Verification, evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: received.append(e.primitive))]
    )
    assert third.is_rejected
    assert [(p.result, p.result_source, p.diagnostic) for p in received] == [(0x02, 0x03, 0x02)]
    # The held associations are unharmed.
    assert held[0].send_c_echo().Status == 0
    held[0].release()
    # The slot frees once the server's thread for that association has ended.
    assert wait_until(lambda: scp._server.acceptor.active_associations <= 1)
    again = _associate(scp.port, Verification)
    assert again.is_established
    assert again.send_c_echo().Status == 0
    again.release()
    held[1].release()


# -- time-outs ----------------------------------------------------------------------------------------


def test_silent_connection_is_dropped_after_acse_timeout(make_node):
    """A connection that sends no A-ASSOCIATE-RQ is closed (A-ABORT or plain close) once acse_timeout passes."""
    scp = make_node(acse_timeout=0.5, network_timeout=0.5)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as sock:
        start = time.monotonic()
        closed, received = _closed_by_server(sock, within=3.0)
        elapsed = time.monotonic() - start
    assert closed, "the server kept a silent connection open"
    assert received in (b"", bytes.fromhex("07000000000400000200"))
    assert 0.3 < elapsed < 3.0
    assert _echo_ok(scp.port)


def test_silent_association_is_aborted_after_network_timeout(make_node):
    """An established association that goes silent receives an A-ABORT once network_timeout passes."""
    scp = make_node(acse_timeout=0.5, network_timeout=0.5)
    peer = RawPeer(scp.port)
    try:
        start = time.monotonic()
        assert peer.expect_abort(timeout=3.0) == 0x00
        assert 0.3 < time.monotonic() - start < 3.0
        with pytest.raises((ConnectionClosed, ConnectionError)):
            peer.next_pdu(timeout=2.0)
    finally:
        peer.close()
    assert wait_until(lambda: scp._server.acceptor.active_associations == 0)


def test_dripping_associate_rq_is_dropped_after_acse_timeout(make_node):
    """The ARTIM timer bounds the whole wait for the A-ASSOCIATE-RQ, not the gap between bytes (PS3.8 9.1.5)."""
    scp = make_node(acse_timeout=0.5, network_timeout=0.5)
    request = associate_rq({1: Verification})
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as sock:
        deadline = time.monotonic() + 2.5  # five times the ACSE time-out
        closed = False
        for byte in request:
            if time.monotonic() > deadline:
                break
            try:
                sock.sendall(bytes((byte,)))
            except OSError:
                closed = True
                break
            closed, _ = _closed_by_server(sock, within=0.2)
            if closed:
                break
    assert closed, "a peer sending one byte per 0.2 s held the connection past 5 x acse_timeout"


# -- protocol errors ----------------------------------------------------------------------------------


def test_p_data_on_unaccepted_context_is_aborted(node):
    """A P-DATA-TF on a context ID the node did not accept is aborted; the listener keeps serving."""
    peer = RawPeer(node.port, {1: Verification})
    try:
        assert list(peer.accepted) == [1]
        peer.send_message(C_ECHO_RQ, _echo_primitive(), context_id=3)
        assert peer.expect_abort() == 0x06  # invalid PDU parameter
    finally:
        peer.close()
    assert _echo_ok(node.port)


def test_raw_echo_round_trip(node):
    """The raw peer's C-ECHO on an accepted context is answered (the baseline the error cases differ from)."""
    peer = RawPeer(node.port, {1: Verification})
    try:
        peer.send_message(C_ECHO_RQ, _echo_primitive(77), context_id=1)
        response, _ = peer.receive_command()
        assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8030, 77, 0)
        peer.send(_pdu(0x05, bytes(4)))  # A-RELEASE-RQ
        assert peer.next_pdu() == (0x06, bytes(4))
    finally:
        peer.close()


def test_response_respects_peer_max_pdu(node):
    """With a peer Maximum Length of 20, the C-ECHO-RSP comes in PDUs of at most 20 bytes and reassembles."""
    peer = RawPeer(node.port, {1: Verification}, max_pdu=20)
    try:
        peer.send_message(C_ECHO_RQ, _echo_primitive(5), context_id=1, max_pdu=20)
        response, lengths = peer.receive_command()
        assert response.Status == 0
        assert response.MessageIDBeingRespondedTo == 5
        assert len(lengths) > 1
        assert max(lengths) <= 20
    finally:
        peer.close()


def test_associate_rq_inside_association_is_aborted(node):
    """A second A-ASSOCIATE-RQ on an established association is aborted as an unexpected PDU."""
    peer = RawPeer(node.port)
    try:
        peer.send(peer.request)
        assert peer.expect_abort() == 0x02  # unexpected PDU
    finally:
        peer.close()
    assert _echo_ok(node.port)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (_pdu(0x09, bytes(4)), 0x01),  # unknown PDU type: unrecognized PDU
        (_pdu(0x02, bytes(4)), 0x02),  # A-ASSOCIATE-AC from the requestor: unexpected PDU
        (_pdu(0x04, struct.pack(">LBB", 2 + 4, 1, 0x02) + b"data"), 0x05),  # data set without a command
        (_pdu(0x04, struct.pack(">LBB", 2 + 8, 1, 0x03) + bytes(8)), 0x06),  # undecodable command set
        (_pdu(0x04, struct.pack(">LBB", 1, 1, 0x03)), 0x06),  # PDV item length below 2
    ],
    ids=["unknown pdu", "associate-ac", "data without command", "bad command set", "short pdv"],
)
def test_bad_pdus_in_association_are_aborted(node, payload, reason):
    """Malformed or unexpected PDUs in an established association are aborted with the matching reason."""
    peer = RawPeer(node.port)
    try:
        peer.send(payload)
        assert peer.expect_abort() == reason
    finally:
        peer.close()
    assert _echo_ok(node.port)


def test_endless_command_set_is_aborted(node):
    """Command fragments never flagged last are aborted once they pass 64 KiB, not buffered without bound."""
    peer = RawPeer(node.port)
    try:
        fragment = _pdu(0x04, struct.pack(">LBB", 2 + 16384, 1, 0x01) + bytes(16384))
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(6):
                peer.send(fragment)
        assert peer.expect_abort() == 0x06
    finally:
        peer.close()
    assert _echo_ok(node.port)


def test_command_while_data_set_expected_is_aborted(node, small_ct):
    """A new command in the middle of a C-STORE's data set is aborted (unexpected PDU parameter)."""
    ds = pydicom.dcmread(small_ct[0])
    peer = RawPeer(node.port, {1: CTImageStorage})
    try:
        store = C_STORE_RQ()
        primitive = _store_primitive(ds)
        store.primitive_to_message(primitive)
        command = encode(store.command_set, True, True)
        peer.send(_pdu(0x04, struct.pack(">LBB", 2 + len(command), 1, 0x03) + command))
        peer.send(_pdu(0x04, struct.pack(">LBB", 2 + 4, 1, 0x00) + b"\x08\x00\x05\x00"))  # not the last fragment
        peer.send(_pdu(0x04, struct.pack(">LBB", 2 + len(command), 1, 0x03) + command))
        assert peer.expect_abort() == 0x05
    finally:
        peer.close()
    assert node.stats.stored == 0
    assert _echo_ok(node.port)


def _store_primitive(ds: Dataset):
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = BytesIO(encode(ds, False, True))
    return primitive


def test_raw_store_in_one_pdu_with_command(node, small_ct):
    """Command and data set PDVs in one P-DATA-TF (as some peers send them) are stored."""
    ds = pydicom.dcmread(small_ct[0])
    peer = RawPeer(node.port, {1: CTImageStorage})
    try:
        store = C_STORE_RQ()
        store.primitive_to_message(_store_primitive(ds))
        command = encode(store.command_set, True, True)
        data = _data_set_bytes(small_ct[0])
        body = struct.pack(">LBB", 2 + len(command), 1, 0x03) + command
        body += struct.pack(">LBB", 2 + len(data), 1, 0x02) + data
        peer.send(_pdu(0x04, body))
        response, _ = peer.receive_command()
        assert response.CommandField == 0x8001
        assert response.Status == 0
        assert response.AffectedSOPInstanceUID == ds.SOPInstanceUID
    finally:
        peer.close()
    assert _data_set_bytes(_spooled(node, small_ct[0])) == _data_set_bytes(small_ct[0])


# -- limits and handlers ------------------------------------------------------------------------------


def test_oversized_data_set_is_refused_and_association_stays_usable(make_node, small_ct):
    """Above max_data_set_bytes a C-STORE gets 0xA700, nothing is spooled, and a C-ECHO on the association works."""
    scp = make_node(max_data_set_bytes=1000)
    assoc = _associate(scp.port, CTImageStorage, Verification)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(small_ct[0])
        assert status.Status == 0xA700
        assert "1000" in str(status.get("ErrorComment", ""))
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert not list(scp.spool_dir.rglob("*.dcm"))


class _Recorder:
    """A minimal StorageHandler: records what it is given; fails where told to ("begin", "write" or "finish")."""

    def __init__(self) -> None:
        self.associations = []
        self.stored = []
        self.discarded = 0
        self.fragment_sizes: list[int] = []
        self.fail: str | None = None

    def screen(self, request):
        self.associations.append(request)
        return None

    def begin_store(self, association, context, command):
        if self.fail == "begin":
            raise RuntimeError("handler bug")
        return _RecordedDataSet(self, (association, context, command))


class _RecordedDataSet:
    def __init__(self, recorder: _Recorder, request: tuple) -> None:
        self.recorder, self.request, self.data = recorder, request, bytearray()

    def write(self, fragment):
        if self.recorder.fail == "write":
            raise RuntimeError("handler bug")
        self.recorder.fragment_sizes.append(len(fragment))
        self.data += fragment

    def finish(self):
        if self.recorder.fail == "finish":
            raise RuntimeError("handler bug")
        self.recorder.stored.append((*self.request, bytes(self.data)))
        return StoreResult(0x0000)

    def discard(self):
        self.recorder.discarded += 1


@pytest.fixture
def recorder_server():
    handler = _Recorder()
    # CT in Explicit VR Little Endian only: the file's own syntax, so the data set travels unchanged.
    contexts = [build_context(Verification), build_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)]
    settings = AcceptorSettings(supported_contexts=contexts, acse_timeout=5, network_timeout=5)
    server = AcceptorServer(("127.0.0.1", 0), Acceptor(handler, settings))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, server.server_address[1]
    server.shutdown()
    thread.join(5)


def test_handler_sees_association_and_data_set(recorder_server, small_ct):
    """The handler gets AE titles, peer maximum, accepted contexts, the command and the exact data set bytes."""
    handler, port = recorder_server
    assoc = _associate(port, CTImageStorage, max_pdu=8192)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(small_ct[0]).Status == 0
    finally:
        assoc.release()
    [screened] = handler.associations
    assert (screened.calling_ae, screened.called_ae, screened.peer_max_pdu_length) == (CALLING, CALLED, 8192)
    [(association, context, command, data_set)] = handler.stored
    assert [cx.abstract_syntax for cx in association.contexts.values()] == [CTImageStorage]
    assert context.abstract_syntax == CTImageStorage
    ds = pydicom.dcmread(small_ct[0])
    assert command.affected_sop_instance_uid == ds.SOPInstanceUID
    assert context.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    assert data_set == _data_set_bytes(small_ct[0])


@pytest.mark.parametrize("where", ["begin", "write", "finish"])
def test_handler_exception_fails_one_instance(recorder_server, small_ct, where):
    """A handler that raises costs the instance (0x0110) and its partial data, not the association."""
    handler, port = recorder_server
    assoc = _associate(port, CTImageStorage, Verification)
    assert assoc.is_established
    try:
        handler.fail = where
        assert assoc.send_c_store(small_ct[0]).Status == 0x0110
        handler.fail = None
        assert assoc.send_c_store(small_ct[1]).Status == 0
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert len(handler.stored) == 1
    assert handler.discarded == (0 if where == "begin" else 1)


# -- stop() ------------------------------------------------------------------------------------------


def test_stop_ends_open_associations(tmp_path):
    """stop() closes an association held open by a peer; the peer sees it end within seconds."""
    scp = _start(tmp_path)
    assoc = _associate(scp.port, Verification)
    assert assoc.is_established
    try:
        start = time.monotonic()
        scp.stop()
        assert wait_until(lambda: not assoc.is_established, timeout=3.0)
        assert assoc.is_aborted or assoc.is_released
        assert time.monotonic() - start < 3.0
    finally:
        scp.stop()
        if assoc.is_established:
            assoc.abort()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", scp.port), timeout=1).close()


def _self_signed(folder: Path) -> tuple[str, str]:
    key, cert = folder / "node.key", folder / "node.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=node"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return str(key), str(cert)


def test_stop_ends_open_tls_associations(tmp_path):
    """stop() also ends an association that runs over TLS."""
    key, cert = _self_signed(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    scp = StorageSCP(tmp_path / "spool", ae_title=CALLED, host="127.0.0.1", port=0, ssl_context=server_context)
    scp._settings = dataclasses.replace(scp._settings, network_timeout=30)
    scp.start()
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cert)
    client_context.check_hostname = False
    peer = None
    try:
        peer = RawPeer(scp.port, wrap=lambda s: client_context.wrap_socket(s))
        peer.send_message(C_ECHO_RQ, _echo_primitive(), context_id=1)
        assert peer.receive_command()[0].Status == 0  # the TLS association works
        scp.stop()
        closed, _ = _closed_by_server(peer.sock, within=3.0)
        assert closed, "the TLS association outlived stop()"
    finally:
        scp.stop()
        if peer is not None:
            peer.close()


def test_listener_survives_abrupt_disconnect_mid_data_set(node, small_ct):
    """A peer that disconnects in the middle of a data set costs nothing: no file, no slot, echo works."""
    ds = pydicom.dcmread(small_ct[0])
    peer = RawPeer(node.port, {1: CTImageStorage})
    store = C_STORE_RQ()
    store.primitive_to_message(_store_primitive(ds))
    command = encode(store.command_set, True, True)
    peer.send(_pdu(0x04, struct.pack(">LBB", 2 + len(command), 1, 0x03) + command))
    peer.send(_pdu(0x04, struct.pack(">LBB", 2 + 100, 1, 0x00) + _data_set_bytes(small_ct[0])[:100]))
    peer.close()
    assert wait_until(lambda: node._server.acceptor.active_associations == 0)
    assert not list(node.spool_dir.rglob("*.dcm"))
    assert _echo_ok(node.port)


def test_peer_max_pdu_too_small_for_any_fragment_is_aborted(node):
    """A Maximum Length Received of 6 leaves no room for a byte of data: aborted at negotiation, listener unharmed."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(associate_rq({1: Verification}, max_pdu=6))
        closed, received = _closed_by_server(sock, within=5)
    assert closed
    assert received[:1] == b"\x07" and received[8:9] == b"\x02"  # A-ABORT, source: service provider
    assert _echo_ok(node.port)


def test_echo_with_a_storage_sop_class_on_its_storage_context_is_unrecognized(node):
    """C-ECHO belongs to the Verification context: on a CT context it is not performed (0x0211)."""
    peer = RawPeer(node.port, {1: Verification, 3: CTImageStorage})
    try:
        assert 3 in peer.accepted
        peer.send_message(C_ECHO_RQ, _echo_primitive(9, sop_class=CTImageStorage), context_id=3)
        response, _ = peer.receive_command()
        assert (response.MessageIDBeingRespondedTo, response.Status) == (9, 0x0211)
        peer.send_message(C_ECHO_RQ, _echo_primitive(10), context_id=1)  # the association goes on
        response, _ = peer.receive_command()
        assert (response.MessageIDBeingRespondedTo, response.Status) == (10, 0)
    finally:
        peer.close()


def test_abort_before_association_is_answered_by_closing(node):
    """An A-ABORT instead of an A-ASSOCIATE-RQ is answered by closing the connection, not with another A-ABORT."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(_pdu(0x07, bytes(4)))
        closed, received = _closed_by_server(sock, within=5)
    assert closed and received == b""
    assert _echo_ok(node.port)


# -- review fixes: limits on what a peer can make the acceptor hold --------------------------------------


def test_empty_fragments_that_are_not_the_last_are_aborted(node):
    """Empty non-last PDVs carry nothing and would cost memory and CPU each: aborted (invalid PDU parameter)."""
    for control in (0x01, 0x00):  # command, then data (after a command that announces a data set)
        peer = RawPeer(node.port, {1: Verification, 3: CTImageStorage})
        try:
            if control == 0x00:
                store = C_STORE_RQ()
                store.primitive_to_message(_store_primitive(_tiny_ct()))
                command = encode(store.command_set, True, True)
                peer.send(_pdu(0x04, struct.pack(">LBB", 2 + len(command), 3, 0x03) + command))
            peer.send(_pdu(0x04, struct.pack(">LBB", 2, 3, control) * 1000))
            assert peer.expect_abort() == 0x06
        finally:
            peer.close()
    assert _echo_ok(node.port)


def _tiny_ct() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    return ds


def test_a_pdu_dripped_slower_than_network_timeout_is_aborted(make_node):
    """Each PDU must arrive whole within network_timeout: one byte every 0.2 s cannot hold the association."""
    scp = make_node(acse_timeout=5, network_timeout=0.6)
    peer = RawPeer(scp.port, {1: Verification})
    try:
        message = C_ECHO_RQ()
        message.primitive_to_message(_echo_primitive(3))
        command = encode(message.command_set, True, True)
        pdu = _pdu(0x04, struct.pack(">LBB", 2 + len(command), 1, 0x03) + command)
        start = time.monotonic()
        aborted = False
        for byte in pdu:
            try:
                peer.send(bytes((byte,)))
            except OSError:
                aborted = True
                break
            aborted, _ = _closed_by_server(peer.sock, within=0.2)
            if aborted or time.monotonic() - start > 5:
                break
        assert aborted, "a PDU dripped over 5 s outlived a 0.6 s network time-out"
        assert time.monotonic() - start < 3
    finally:
        peer.close()
    assert _echo_ok(scp.port)


@pytest.mark.parametrize("case", ["duplicate context IDs", "even context ID", "context without transfer syntax"])
def test_malformed_presentation_contexts_are_aborted(node, case):
    """Context IDs must be odd and distinct and every context needs a transfer syntax: else A-ABORT, no traceback."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = CALLING, CALLED
    contexts = [build_context(Verification), build_context(CTImageStorage)]
    ids = {"duplicate context IDs": (1, 1), "even context ID": (1, 2), "context without transfer syntax": (1, 3)}
    for context, context_id in zip(contexts, ids[case], strict=True):
        context._context_id = context_id  # private: the public setter refuses an even ID
    if case == "context without transfer syntax":
        contexts[1]._transfer_syntax = []
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(pdu.encode())
        closed, received = _closed_by_server(sock, within=5)
    assert closed
    assert received[:1] == b"\x07" and received[9:10] == b"\x06"  # A-ABORT, invalid PDU parameter
    assert _echo_ok(node.port)


def test_release_in_the_middle_of_a_data_set_is_logged(node, caplog):
    """A release while a data set is arriving is answered, and the dropped message is named in a warning."""
    peer = RawPeer(node.port, {1: Verification, 3: CTImageStorage})
    try:
        store = C_STORE_RQ()
        store.primitive_to_message(_store_primitive(_tiny_ct()))
        command = encode(store.command_set, True, True)
        peer.send(_pdu(0x04, struct.pack(">LBB", 2 + len(command), 3, 0x03) + command))
        peer.send(_pdu(0x04, struct.pack(">LBB", 2 + 10, 3, 0x00) + bytes(10)))
        with caplog.at_level(logging.WARNING, logger="medsegagent.dicom.association"):
            peer.send(_pdu(0x05, bytes(4)))
            assert peer.next_pdu() == (0x06, bytes(4))
            assert wait_until(lambda: "middle of a message" in caplog.text)
    finally:
        peer.close()
    assert "10 bytes of its data set" in caplog.text


def test_listener_on_ipv6_loopback(tmp_path):
    """An IPv6 interface address binds an IPv6 listener (pynetdicom's server did; a plain AF_INET one cannot)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    scp = StorageSCP(tmp_path / "spool", ae_title=CALLED, host="::1", port=0)
    scp.start()
    try:
        ae = _scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("::1", scp.port, ae_title=CALLED)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        scp.stop()


def test_data_set_of_another_sop_class_than_the_request_is_refused(node, small_ct):
    """A CT request whose data set says MR gets A900 and is not spooled (its File Meta would say CT)."""
    ds = pydicom.dcmread(small_ct[0])
    primitive = _store_primitive(ds)  # the request: CT Image Storage
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # the data set: MR Image Storage
    primitive.DataSet = BytesIO(encode(ds, False, True))
    peer = RawPeer(node.port, {1: CTImageStorage})
    try:
        peer.send_message(C_STORE_RQ, primitive, context_id=1)
        response, _ = peer.receive_command()
        assert response.Status == 0xA900
        assert "SOP Class" in str(response.get("ErrorComment", ""))
    finally:
        peer.close()
    assert not list(node.spool_dir.rglob("*.dcm"))


def test_deflate_bomb_is_refused_at_the_nodes_limit(node, small_ct, monkeypatch):
    """The intake inflates at most MAX_INFLATED_BYTES: beyond, C000, nothing spooled, association usable."""
    import zlib

    from medsegagent.node import intake

    ds = pydicom.dcmread(small_ct[0])
    raw = encode(ds, False, True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(raw) + deflater.flush()
    limit = (len(deflated) + len(raw)) // 2  # over the limit only once inflated
    assert len(deflated) < limit < len(raw)
    monkeypatch.setattr(intake, "MAX_INFLATED_BYTES", limit)
    assoc = _scu().associate("127.0.0.1", node.port, ae_title=CALLED,
                             contexts=[build_context(CTImageStorage, pydicom.uid.DeflatedExplicitVRLittleEndian),
                                       build_context(Verification)])  # fmt: skip
    assert assoc.is_established
    try:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        status = assoc.send_c_store(ds)
        assert status.Status == 0xC000
        assert str(limit) in str(status.get("ErrorComment", ""))
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert not list(node.spool_dir.rglob("*.dcm"))


def test_data_set_reaches_the_handler_fragment_by_fragment(recorder_server, big_ct):
    """The acceptor holds one PDU, not an instance: a 130 kB data set arrives in writes of at most a PDU each."""
    handler, port = recorder_server
    assoc = _associate(port, CTImageStorage)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(big_ct[0]).Status == 0
    finally:
        assoc.release()
    data = _data_set_bytes(big_ct[0])
    assert sum(handler.fragment_sizes) == len(data) > 100_000
    assert len(handler.fragment_sizes) > 1
    # The sender fragments to the node's Maximum Length Received (less the PDV header): one PDU at a time.
    assert max(handler.fragment_sizes) <= AcceptorSettings(supported_contexts=[]).max_pdu_length - 6
