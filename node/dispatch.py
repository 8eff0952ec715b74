"""DICOM delivery: send files to a peer with C-STORE."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import build_context, evt
from pynetdicom.sop_class import Verification

from medsegagent.node.scu import scu_ae, set_nodelay

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """A peer that could not be reached or refused instances."""


@dataclass
class SendResult:
    """Outcome of one :func:`send_files` call."""

    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)


def send_files(
    files: Sequence[Path],
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "MEDSEG",
    timeout: float = 30.0,
) -> SendResult:
    """C-STORE ``files`` to a peer over one association.

    Presentation contexts are proposed per SOP class and transfer syntax of
    the files, so the instances are sent as they are stored (no transcoding).

    Raises
    ------
    DeliveryError
        When the association is not accepted.
    """
    datasets = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in files]
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets})
    if len(pairs) > 127:
        raise DeliveryError(f"{len(pairs)} SOP class/transfer syntax pairs exceed one association's 128 contexts")
    ae = scu_ae(calling_ae, timeout)
    contexts = [build_context(sop, ts) for sop, ts in pairs] + [build_context(Verification)]
    assoc = ae.associate(
        host, port, contexts=contexts, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        raise DeliveryError(f"association to {called_ae}@{host}:{port} was not accepted")
    result = SendResult()
    try:
        for path, _ in datasets:
            try:
                status = assoc.send_c_store(path)
            except RuntimeError as exc:  # pynetdicom: the association was aborted part way through
                if assoc.is_established:
                    raise
                raise DeliveryError(
                    f"association to {called_ae}@{host}:{port} ended after {result.sent} of {len(datasets)} instances"
                ) from exc
            code = int(status.Status) if status and "Status" in status else -1
            if code in (0x0000, 0xB000, 0xB007, 0xB006):
                result.sent += 1
            else:
                result.failed[str(path)] = code
                log.warning("C-STORE of %s to %s failed with status 0x%04X", path.name, called_ae, code & 0xFFFF)
    finally:
        assoc.release()
    return result
