"""DICOM intake: a Verification and Storage SCP that spools studies durably.

Every received instance is written to
``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` —
temporary file, ``fsync``, atomic rename — *before* the success status is
returned, so a study acknowledged to the sender is on disk.  UIDs are
validated before they form a path; a malformed instance is refused with a
DICOM failure status and a log line, and the listener keeps serving.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom import sop_class as sc
from pynetdicom.transport import ThreadedAssociationServer

from medsegagent.dicom.part10 import file_meta_header
from medsegagent.dicom.uids import InvalidUIDError, checked_uid, is_valid_ae_title
from medsegagent.node.config import TlsSettings

log = logging.getLogger(__name__)

#: Storage SOP classes the node accepts: the images its registry's modalities
#: need, plus SR documents that carry requests.
STORAGE_SOP_CLASSES = (
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.LegacyConvertedEnhancedPETImageStorage,
    sc.UltrasoundImageStorage,
    sc.UltrasoundMultiFrameImageStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
)

#: Compressed transfer syntaxes accepted when pydicom has a decoder for them
#: (pylibjpeg-openjpeg: JPEG 2000; pyjpegls: JPEG-LS; RLE is native; JPEG
#: lossless needs pylibjpeg-libjpeg or python-gdcm, installed by the user).
_COMPRESSED_SYNTAXES = (
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
)


def supported_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes the node accepts: uncompressed, deflate, and every decodable lossless one."""
    syntaxes = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
                uid.ExplicitVRBigEndian]  # fmt: skip
    for syntax in _COMPRESSED_SYNTAXES:
        try:
            if get_decoder(syntax).is_available:
                syntaxes.append(syntax)
        except NotImplementedError:
            continue
    return [str(s) for s in syntaxes]


#: Largest frame count / matrix the node accepts; anything above is a corrupt or hostile claim.
_MAX_FRAMES = 10_000
_MAX_MATRIX = 8192


def image_problem(ds: Dataset) -> str | None:
    """Why an image data set cannot be a usable image, or ``None``.

    Checks only what is cheap and decisive before the instance is stored:
    pixel data present, sane matrix and frame claims, and, for native
    (uncompressed) pixel data, a length that matches those claims (a
    truncated transfer otherwise lands on disk as a "valid" instance).
    """
    if str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.88"):
        return None  # SR documents carry no pixels
    if "PixelData" not in ds:
        return "image has no pixel data"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"image pixel description is incomplete ({exc})"
    if not (0 < rows <= _MAX_MATRIX and 0 < cols <= _MAX_MATRIX and 0 < frames <= _MAX_FRAMES):
        return f"implausible image size claim ({rows} x {cols} x {frames} frames)"
    if bits not in (1, 8, 16, 32, 64) or samples not in (1, 3):
        return f"unsupported pixel layout (BitsAllocated {bits}, SamplesPerPixel {samples})"
    element = ds["PixelData"]
    if not getattr(element, "is_undefined_length", False):  # native: the length is checkable
        expected = rows * cols * frames * samples * bits // 8
        if len(element.value) < expected:
            return f"pixel data truncated ({len(element.value)} of {expected} bytes)"
    return None


# C-STORE status codes (PS3.4 Annex B.2.3 / PS3.7 C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass
class IntakeStats:
    """Counters of one listener, for logs and the API."""

    stored: int = 0
    refused: int = 0
    last_instance_at: dict[str, float] = field(default_factory=dict)
    instances_per_study: dict[str, int] = field(default_factory=dict)


def quiet_pynetdicom(verbose: bool = False) -> None:
    """Keep pynetdicom's per-message INFO lines ("Received Store Request") out of the node's log.

    The node logs one line per association itself; per-instance lines cost
    time on every C-STORE and bury what an administrator looks for.  With
    ``verbose`` pynetdicom logs at DEBUG (PDU dumps), for protocol debugging.
    """
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)


def set_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket."""
    # Small PDUs otherwise wait for the peer's delayed ACK (~40 ms each).
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (new files, renames, new sub-directories) durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_durable_dirs(path: Path, root: Path) -> None:
    """Create ``path`` and its missing parents below ``root``, each entry durable.

    A new directory survives a power loss only once its parent directory is
    fsynced.  The parent is fsynced for every level, existing or not: another
    thread or process may have just created it without having fsynced yet.
    """
    levels = []
    current = path
    while current != root and current != current.parent:
        levels.append(current)
        current = current.parent
    for directory in reversed(levels):
        directory.mkdir(exist_ok=True)
        fsync_directory(directory.parent)


def write_atomically(path: Path, chunks: Iterable[bytes], *, make_parents: bool = True) -> None:
    """Write ``chunks`` to ``path`` via a temporary file, fsync and rename.

    Parameters
    ----------
    path : Path
        Final file name; it appears complete or not at all.
    chunks : iterable of bytes
        The content.
    make_parents : bool
        Create the parent directory if needed (callers that keep track of the
        directories they made durable pass ``False``).
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is.
    fsync_directory(path.parent)


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """Server-side TLS context (TLS 1.2+, as BCP 195 asks) from the node's TLS settings."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


class NodeAssociationServer(ThreadedAssociationServer):
    """The threaded association server the node starts with :meth:`AE.make_server`.

    ``AE.start_server`` registers its servers with the AE and pynetdicom's
    ``shutdown`` unregisters them; a server made with ``make_server`` was never
    registered, so shutting it down only stops the loop and closes the socket.
    """

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class ReusePortAssociationServer(NodeAssociationServer):
    """A threaded association server whose socket joins an ``SO_REUSEPORT`` group.

    Several intake processes bind the same port; the kernel spreads incoming
    associations over them, so parallel associations use several cores
    (pynetdicom handles one association in one thread under the GIL).
    """

    def server_bind(self) -> None:
        """Join the port's ``SO_REUSEPORT`` group, then bind as pynetdicom does."""
        # pynetdicom's server_bind sets only SO_REUSEADDR; the option must be set before bind().
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StorageSCP:
    """The node's DICOM listener.

    Parameters
    ----------
    spool_dir : Path
        Root of the study spool.
    ae_title : str
        The node's AE title.
    host, port : str, int
        Interface and port to bind (loopback by default; port 0 picks a free one).
    allowed_callers : iterable of str, optional
        Calling AE titles allowed to associate; ``None`` allows any.
    allowed_hosts : iterable of str, optional
        Peer IP addresses allowed to associate; ``None`` allows any.
    on_instance : callable, optional
        ``(study_uid, series_uid, path, called_ae, calling_ae)`` called after
        each stored instance (before the success status goes back).
    admit : callable, optional
        ``study_uid -> reason or None``; a reason refuses the instance with
        *Out of Resources* (disk watermark, study size limit) before anything
        is written.
    max_associations : int
        Concurrent associations; more are rejected (transient).
    ssl_context : ssl.SSLContext, optional
        Serve DICOM over TLS with this server context.
    reuse_port : bool
        Bind with ``SO_REUSEPORT`` so that other intake processes can serve
        the same port (see :mod:`medsegagent.node.intake_pool`).
    """

    def __init__(
        self,
        spool_dir: Path,
        *,
        ae_title: str = "MEDSEG",
        host: str = "127.0.0.1",
        port: int = 11112,
        allowed_callers: Iterable[str] | None = None,
        allowed_hosts: Iterable[str] | None = None,
        on_instance: Callable[[str, str, Path, str, str], None] | None = None,
        admit: Callable[[str], str | None] | None = None,
        max_associations: int = 8,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allowed_callers = {a.strip() for a in allowed_callers} if allowed_callers is not None else None
        self.allowed_hosts = set(allowed_hosts) if allowed_hosts is not None else None
        self.on_instance = on_instance
        self.admit = admit
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port
        self.stats = IntakeStats()
        self._lock = threading.Lock()
        # Series directories already created and made durable: one mkdir + fsync per series, not per instance.
        self._durable_dirs: set[Path] = set()
        self._server: ThreadedAssociationServer | None = None
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        # Accepted sockets otherwise never time out: a stalled peer would hold a slot forever.
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.require_called_aet = False  # presets bind extra called AE titles to requests
        if self.allowed_callers is not None:
            # pynetdicom rejects others with "calling AE title not recognised".
            ae.require_calling_aet = sorted(self.allowed_callers)
        ae.add_supported_context(sc.Verification)
        syntaxes = supported_transfer_syntaxes()
        for sop in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop, syntaxes)
        self._ae = ae

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound address."""
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self.spool_dir.parent.mkdir(parents=True, exist_ok=True)
        make_durable_dirs(self.spool_dir, self.spool_dir.parent)
        server_class = ReusePortAssociationServer if self.reuse_port else NodeAssociationServer
        server = self._ae.make_server(
            (self.host, self.port), evt_handlers=handlers, ssl_context=self.ssl_context, server_class=server_class
        )
        thread = threading.Thread(target=server.serve_forever, name=f"medseg-scp-{self.ae_title}", daemon=True)
        thread.start()
        self._server = server
        self.port = server.server_address[1]
        log.info("listening as %s on %s:%d (pid %d), spool %s", self.ae_title, self.host, self.port, os.getpid(),
                 self.spool_dir)  # fmt: skip
        return self.host, self.port

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers --------------------------------------------------------------
    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        address = assoc.requestor.address
        if self.allowed_hosts is not None and address not in self.allowed_hosts:
            log.warning("rejecting association from %s: peer address not allowed", address)
            # rejected-permanent, service user, calling AE title not recognised (no better reason exists).
            assoc.acse.send_reject(0x01, 0x01, 0x03)

    def _on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.info("association from %s (%s) accepted by pid %d", requestor.ae_title.strip(), requestor.address,
                 os.getpid())  # fmt: skip

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) rejected", requestor.ae_title.strip(), requestor.address)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        calling = event.assoc.requestor.ae_title.strip()
        # The title the peer asked for (presets bind extra titles to requests), not our own.
        primitive = getattr(event.assoc.requestor, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", "") or event.assoc.acceptor.ae_title).strip()
        try:
            ds = event.dataset
            study = checked_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop = checked_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        except InvalidUIDError as exc:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"from {calling}: {exc}")
        except Exception as exc:  # a dataset that does not even decode
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"from {calling}: undecodable dataset ({exc})")
        if sop != str(event.request.AffectedSOPInstanceUID):
            return self._refuse(STATUS_DATASET_MISMATCH, f"from {calling}: SOP Instance UID differs from the request")
        problem = image_problem(ds)
        if problem:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"from {calling}: {sop}: {problem}")
        if self.admit is not None:
            reason = self.admit(study)
            if reason:
                return self._refuse(STATUS_OUT_OF_RESOURCES, f"from {calling}: {reason}")
        path = self.spool_dir / study / series / f"{sop}.dcm"
        try:
            header = self._file_header(event, sop, calling, called)
        except (InvalidUIDError, ValueError) as exc:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"from {calling}: {sop}: {exc}")
        existed = path.exists()  # a re-send replaces an instance that is already recorded
        try:
            # The data set is stored byte for byte as received, behind its File Meta Information.
            self._store_file(path, header, event.encoded_dataset(include_meta=False))
        except OSError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"cannot store {sop}: {exc}")
        with self._lock:
            self.stats.stored += 1
            self.stats.last_instance_at[study] = time.monotonic()
            self.stats.instances_per_study[study] = self.stats.instances_per_study.get(study, 0) + 1
        if self.on_instance is not None:
            try:
                self.on_instance(study, series, path, called, calling)
            except Exception as exc:  # the instance is on disk but not recorded: let the sender retry
                log.exception("recording %s failed", sop)
                if not existed:
                    # Unacknowledged and unrecorded: the spool must not hold it (see JobStore.reconcile_spool).
                    path.unlink(missing_ok=True)
                return self._refuse(STATUS_OUT_OF_RESOURCES, f"cannot record {sop}: {exc}")
        return STATUS_SUCCESS

    @staticmethod
    def _file_header(event: evt.Event, sop: str, calling: str, called: str) -> bytes:
        """Part 10 preamble and File Meta Information for a received data set.

        The calling and called AE titles go into (0002,0016) and (0002,0018), so
        that the spool alone tells who sent a study to which title.
        """
        return file_meta_header(
            sop_class_uid=str(event.request.AffectedSOPClassUID), sop_instance_uid=sop,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
            implementation_version_name=PYNETDICOM_IMPLEMENTATION_VERSION,
            source_ae_title=calling if is_valid_ae_title(calling) else None,
            receiving_ae_title=called if is_valid_ae_title(called) else None,
        )  # fmt: skip

    def _store_file(self, path: Path, *chunks: bytes) -> None:
        """Write one instance durably; its series directory is created (durably) once."""
        directory = path.parent
        if directory not in self._durable_dirs:
            make_durable_dirs(directory, self.spool_dir)
            with self._lock:
                if len(self._durable_dirs) >= 10_000:  # a long-running node: forget old series
                    self._durable_dirs.clear()
                self._durable_dirs.add(directory)
        try:
            write_atomically(path, chunks, make_parents=False)
        except FileNotFoundError:
            # The directory went away (spool clean-up): forget it and create it again.
            with self._lock:
                self._durable_dirs.discard(directory)
            make_durable_dirs(directory, self.spool_dir)
            write_atomically(path, chunks, make_parents=False)

    def _refuse(self, status: int, message: str) -> int:
        with self._lock:
            self.stats.refused += 1
        log.warning("C-STORE refused (0x%04X): %s", status, message)
        return status

    # -- study assembly ----------------------------------------------------------
    def wait_for_study(
        self, study_uid: str, *, quiet_seconds: float, timeout: float, expected: int | None = None
    ) -> Path:
        """Block until ``study_uid`` has been quiet for ``quiet_seconds``.

        Parameters
        ----------
        study_uid : str
            The study to wait for.
        quiet_seconds : float
            A study is complete when no instance arrived for this long.
        timeout : float
            Give up after this many seconds.
        expected : int, optional
            Return as soon as this many instances arrived (explicit trigger).

        Raises
        ------
        TimeoutError
            When the study did not arrive or settle in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                last = self.stats.last_instance_at.get(study_uid)
                count = self.stats.instances_per_study.get(study_uid, 0)
            if expected is not None and count >= expected:
                return self.spool_dir / study_uid
            if last is not None and time.monotonic() - last >= quiet_seconds:
                return self.spool_dir / study_uid
            time.sleep(0.05)
        raise TimeoutError(f"study {study_uid} not complete after {timeout:.0f} s")
