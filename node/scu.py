"""What the node's SCU associations (delivery, worklist) share: the pynetdicom AE, its socket option, its log."""

from __future__ import annotations

import logging
import socket

from pynetdicom import AE, evt

from medsegagent.dicom.uids import MEDSEGAGENT_IMPLEMENTATION_UID, MEDSEGAGENT_IMPLEMENTATION_VERSION


def set_nodelay(event: evt.Event) -> None:
    """pynetdicom ``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket."""
    # Small PDUs otherwise wait for the peer's delayed ACK (~40 ms each).
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def scu_ae(ae_title: str, timeout: float) -> AE:
    """A pynetdicom AE for one SCU association of the node.

    It presents the node's Implementation Class UID and Version Name (the
    same as its listener's), and ``timeout`` seconds as ACSE, DIMSE and
    network time-out.  Associate with ``evt_handlers=[(evt.EVT_CONN_OPEN,
    set_nodelay)]``.
    """
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = MEDSEGAGENT_IMPLEMENTATION_UID
    ae.implementation_version_name = MEDSEGAGENT_IMPLEMENTATION_VERSION
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def quiet_pynetdicom(verbose: bool = False) -> None:
    """Keep pynetdicom's per-message INFO lines ("Sending Store Request") out of the node's log.

    pynetdicom serves the node's SCU roles (delivery, worklist); the node logs
    one line per association itself, and per-instance lines bury what an
    administrator looks for.  With ``verbose`` pynetdicom logs at DEBUG (PDU
    dumps), for protocol debugging.
    """
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
