"""Delivery of results to a destination: C-STORE to an AE, or STOW-RS to a DICOMweb service.

:func:`deliver` gives each file a typed :class:`DeliveryOutcome` for the
outbox: delivered, retry later (the peer is down or short of resources), or
give up with a reason (the peer refused the object, or the request, for good).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import Verification

from medsegagent.node.config import Destination, RemoteKind
from medsegagent.node.scu import scu_ae, set_nodelay

log = logging.getLogger(__name__)

#: C-STORE statuses worth retrying (out of resources); others refuse the object for good.
_TRANSIENT_STATUSES = frozenset({0xA700, 0xA701, 0xA702})
_STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB007, 0xB006})
#: HTTP statuses below 500 that say "later", not "never".
_TRANSIENT_HTTP = frozenset({408, 425, 429})


class Outcome(enum.Enum):
    """What the outbox does with one file after an attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"  # the destination is down or busy: try again after the back-off
    GIVE_UP = "give_up"  # the destination refused it for good: the item fails with the reason


@dataclass(frozen=True)
class DeliveryOutcome:
    """The outcome of one file's delivery attempt, with the reason when it was not delivered."""

    outcome: Outcome
    reason: str | None = None


DELIVERED = DeliveryOutcome(Outcome.DELIVERED)


def deliver(destination: Destination, files: Sequence[Path], *, calling_ae: str) -> dict[Path, DeliveryOutcome]:
    """Send ``files`` to ``destination`` in one association or one STOW-RS request.

    Parameters
    ----------
    destination : Destination
        A DICOM (C-STORE) or DICOMweb (STOW-RS) destination.
    files : sequence of Path
        Part 10 files.
    calling_ae : str
        The node's AE title (C-STORE only).

    Returns
    -------
    dict
        One :class:`DeliveryOutcome` per file; this function does not raise
        for anything the destination or the network does.
    """
    if destination.kind is RemoteKind.DICOMWEB:
        return _stow(destination, files)
    try:
        result = send_files(files, host=destination.host, port=destination.port, called_ae=destination.ae_title,
                            calling_ae=calling_ae)  # fmt: skip
    except (DeliveryError, OSError, RuntimeError) as exc:
        return dict.fromkeys(files, DeliveryOutcome(Outcome.RETRY, f"{destination.describe()}: {exc}"))
    outcomes = {}
    for path in files:
        status = result.failed.get(str(path))
        if str(path) in result.unsent:
            outcomes[path] = DeliveryOutcome(Outcome.GIVE_UP, f"{destination.name}: {result.unsent[str(path)]}")
        elif status is None:
            outcomes[path] = DELIVERED
        elif status in _TRANSIENT_STATUSES or status < 0:
            outcomes[path] = DeliveryOutcome(Outcome.RETRY, f"C-STORE status 0x{status & 0xFFFF:04X}")
        else:
            outcomes[path] = DeliveryOutcome(Outcome.GIVE_UP, f"refused by {destination.name}: C-STORE status "
                                                              f"0x{status:04X}")  # fmt: skip
    return outcomes


def _stow(destination: Destination, files: Sequence[Path]) -> dict[Path, DeliveryOutcome]:
    """STOW-RS ``files`` in one request; 4xx gives up (but 408/425/429), 5xx and the network retry."""
    from medsegagent.node.dicomweb import CredentialsError, web_client  # dicomweb-client only where it is used

    where = destination.describe()
    try:
        datasets = [pydicom.dcmread(path) for path in files]
        response = web_client(destination.web).store_instances(datasets)
    except CredentialsError as exc:  # the administrator fixes the secret; the results wait
        return dict.fromkeys(files, DeliveryOutcome(Outcome.RETRY, f"{where}: {exc}"))
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        retry = code >= 500 or code in _TRANSIENT_HTTP
        reason = f"{where}: STOW-RS answered HTTP {code}{_failure_detail(exc.response)}"
        return dict.fromkeys(files, DeliveryOutcome(Outcome.RETRY if retry else Outcome.GIVE_UP, reason))
    except requests.ConnectionError:
        return dict.fromkeys(files, DeliveryOutcome(Outcome.RETRY, f"{where}: ConnectionError (nothing answers)"))
    except requests.Timeout:
        timeout = destination.web.timeout_s
        return dict.fromkeys(files, DeliveryOutcome(Outcome.RETRY, f"{where}: Timeout (no answer in {timeout:g} s)"))
    except (requests.RequestException, OSError) as exc:
        return dict.fromkeys(files, DeliveryOutcome(Outcome.RETRY, f"{where}: {type(exc).__name__}: {exc}"))
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0x0110))
              for item in response.get("FailedSOPSequence", [])}  # fmt: skip
    outcomes = {}
    for path, ds in zip(files, datasets, strict=True):
        code = failed.get(str(ds.SOPInstanceUID))
        if code is None:
            outcomes[path] = DELIVERED
        elif code in _TRANSIENT_STATUSES:
            outcomes[path] = DeliveryOutcome(Outcome.RETRY, f"{where}: STOW-RS failure reason 0x{code:04X}")
        else:
            outcomes[path] = DeliveryOutcome(Outcome.GIVE_UP, f"refused by {destination.name}: STOW-RS failure "
                                                              f"reason 0x{code:04X}")  # fmt: skip
    return outcomes


def _failure_detail(response: requests.Response | None) -> str:
    """`` (reason)``: the HTTP reason phrase and the first failure reason a STOW-RS body gives, if any."""
    if response is None:
        return ""
    detail = response.reason or ""
    try:
        body = response.json()
        failed = body.get("00081198", {}).get("Value", []) if isinstance(body, dict) else []
        code = failed[0].get("00081197", {}).get("Value", [None])[0] if failed else None
        if code is not None:
            detail += f", failure reason 0x{int(code):04X}"
    except ValueError:
        pass
    return f" ({detail})" if detail else ""


class DeliveryError(RuntimeError):
    """A peer that could not be reached or refused instances."""


@dataclass
class SendResult:
    """Outcome of one :func:`send_files` call."""

    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    #: Files not sent because the peer accepted no presentation context for them, with the reason.
    unsent: dict[str, str] = field(default_factory=dict)


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
    the files, so the instances are sent as they are stored. A compressed
    file (a LABELMAP SEG in RLE) also offers Explicit VR Little Endian, and
    is decompressed for a peer that accepts only that.

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
    contexts = [build_context(sop, _offered(ts)) for sop, ts in pairs] + [build_context(Verification)]
    assoc = ae.associate(
        host, port, contexts=contexts, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        raise DeliveryError(f"association to {called_ae}@{host}:{port} was not accepted")
    result = SendResult()
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    try:
        for path, header in datasets:
            payload = _as_accepted(path, header, accepted)
            if isinstance(payload, str):
                result.unsent[str(path)] = payload
                log.warning("C-STORE of %s to %s not attempted: %s", path.name, called_ae, payload)
                continue
            try:
                status = assoc.send_c_store(payload)
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


def _offered(syntax: str) -> list[str]:
    """Transfer syntaxes proposed for a file stored in ``syntax``: itself, and uncompressed when it is compressed."""
    return [syntax, ExplicitVRLittleEndian] if UID(syntax).is_compressed else [syntax]


def _as_accepted(path: Path, header: Dataset, accepted: set[tuple[str, str]]) -> Path | Dataset | str:
    """What to send for ``path``: the file as stored, its decompressed data set, or why neither was accepted."""
    sop, syntax = str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)
    if (sop, syntax) in accepted:
        return path
    if (sop, ExplicitVRLittleEndian) in accepted and UID(syntax).is_compressed:
        dataset = pydicom.dcmread(path)
        dataset.decompress()  # the peer takes this SOP class uncompressed only
        return dataset
    return f"the peer accepted no presentation context for SOP class {sop} ({UID(sop).name})"
