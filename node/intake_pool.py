"""Several intake processes on one DICOM port.

The listener (:mod:`medsegagent.dicom.acceptor`) serves each association in
a thread of one Python process, so all associations share one core (the GIL).  With ``node.intake_processes: N`` the
node runs its own listener plus ``N - 1`` worker processes, all bound to the
same port with ``SO_REUSEPORT``; the kernel spreads new associations over
them.  Every process spools to the same directory and records arrivals in the
same SQLite job store (WAL mode allows concurrent writers), so the assembler,
processor and dispatcher of the main process see every study whichever
process received it.

A worker is started as ``python -m medsegagent.node.intake_pool`` with its
:class:`IntakeSpec` as JSON on stdin, answers ``ready <port>`` on stdout once
it listens, and dies with its parent (``PR_SET_PDEATHSIG``, and a parent
check as fallback): a ``kill -9`` of the node never leaves an orphan holding
the port.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medsegagent.node.config import TlsSettings
from medsegagent.node.intake import StorageSCP, server_ssl_context
from medsegagent.node.jobs import JobStore
from medsegagent.node.scu import quiet_pynetdicom

log = logging.getLogger(__name__)

#: Seconds a worker may take to import, bind and report ready.
START_TIMEOUT_S = 60.0


class StudyRecorder:
    """Admission checks and arrival records of the intake, shared by all intake processes.

    Parameters
    ----------
    data_dir : Path
        The node's data directory (disk watermark is measured there).
    db_path : Path
        The job store.
    min_free_disk_mb : int
        Refuse instances (Out of Resources) below this much free disk.
    max_study_instances : int
        Refuse instances of a study beyond this count.
    """

    def __init__(self, data_dir: Path, db_path: Path, *, min_free_disk_mb: int, max_study_instances: int) -> None:
        self.data_dir = Path(data_dir)
        self.min_free_disk_mb = min_free_disk_mb
        self.max_study_instances = max_study_instances
        # Arrival records need no fsync of their own: the spool is durable and is reconciled at start.
        self.store = JobStore(db_path, synchronous="NORMAL")

    def admit(self, study: str | None) -> str | None:
        """Why an instance of ``study`` must be refused with Out of Resources, or ``None``.

        With ``study`` ``None`` (before the data set is received) the disk is
        checked; with a study (the data set is already written, the rename
        needs no space) its instance count.
        """
        if study is None:
            free_mb = shutil.disk_usage(self.data_dir).free / 2**20
            if free_mb < self.min_free_disk_mb:
                return f"only {free_mb:.0f} MB free on the spool disk (watermark {self.min_free_disk_mb} MB)"
            return None
        if self.store.study_instances(study) >= self.max_study_instances:
            return f"study exceeds {self.max_study_instances} instances"
        return None

    def on_instance(self, study: str, series: str, path: Path, called_ae: str, calling_ae: str) -> None:
        """Record one stored instance (reopens a study that was already queued)."""
        self.store.touch_study(study, called_ae, calling_ae)


@dataclass(frozen=True)
class IntakeSpec:
    """Everything an intake process needs to serve the node's port (JSON-serialisable)."""

    spool_dir: str
    data_dir: str
    db_path: str
    ae_title: str
    host: str
    port: int
    allowed_callers: list[str] | None
    allowed_hosts: list[str] | None
    max_associations: int
    min_free_disk_mb: int
    max_study_instances: int
    tls: dict | None = None
    max_pending_connections: int = 32
    association_request_seconds: float = 5.0
    parent_pid: int = 0
    log_level: int = logging.INFO
    reuse_port: bool = True

    def build(self) -> StorageSCP:
        """The listener this spec describes, recording into the job store."""
        recorder = StudyRecorder(Path(self.data_dir), Path(self.db_path), min_free_disk_mb=self.min_free_disk_mb,
                                 max_study_instances=self.max_study_instances)  # fmt: skip
        tls = tls_from_json(self.tls)
        return StorageSCP(
            Path(self.spool_dir), ae_title=self.ae_title, host=self.host, port=self.port,
            allowed_callers=self.allowed_callers, allowed_hosts=self.allowed_hosts,
            on_instance=recorder.on_instance, admit=recorder.admit, max_associations=self.max_associations,
            max_pending_connections=self.max_pending_connections,
            association_request_seconds=self.association_request_seconds,
            ssl_context=server_ssl_context(tls) if tls is not None else None, reuse_port=self.reuse_port,
        )  # fmt: skip


def tls_to_json(tls: TlsSettings | None) -> dict | None:
    """TLS settings as a JSON mapping (paths as strings); :func:`tls_from_json` reverses it."""
    if tls is None:
        return None
    return tls.model_dump(mode="json")


def tls_from_json(data: dict | None) -> TlsSettings | None:
    """The TLS settings :func:`tls_to_json` wrote."""
    if data is None:
        return None
    # Validated again: every field goes through (a new one cannot be lost), and the files are still there.
    return TlsSettings.model_validate(data)


class IntakePool:
    """The extra intake processes of one node, started and watched by one supervisor thread.

    The kernel's ``PR_SET_PDEATHSIG`` fires when the *thread* that started a
    process ends, so every worker is started by the pool's own thread, which
    lives until :meth:`stop`.  A worker that dies is restarted, with a back-off
    from 1 s doubling to 60 s while restarts keep failing.

    Parameters
    ----------
    spec : IntakeSpec
        The main listener's spec, with the port it actually bound.
    processes : int
        Extra processes to start (the main process serves too).
    check_seconds : float
        How often the supervisor looks for dead workers.
    """

    def __init__(self, spec: IntakeSpec, processes: int, *, check_seconds: float = 1.0) -> None:
        self.spec = spec
        self.processes = processes
        self.check_seconds = check_seconds
        self._workers: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._retry_at: dict[int, tuple[float, float]] = {}  # slot -> (next attempt, delay)

    def start(self) -> None:
        """Start the workers and wait until each one listens.

        Raises
        ------
        RuntimeError
            When a worker cannot start (its error, e.g. the port is taken); no worker is left running.
        """
        self._thread = threading.Thread(target=self._run, name="medseg-intake-supervisor", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        with self._lock:
            return [w.pid for w in self._workers if w.poll() is None]

    def _run(self) -> None:
        try:
            for _ in range(self.processes):
                proc = self._spawn()
                with self._lock:
                    self._workers.append(proc)
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            self._error = exc
            self._terminate()
            self._started.set()
            return
        self._started.set()
        while not self._stop.wait(self.check_seconds):
            self.supervise()
        self._terminate()

    def _spawn(self) -> subprocess.Popen:
        payload = json.dumps(asdict(self.spec)).encode()
        proc = subprocess.Popen([sys.executable, "-m", "medsegagent.node.intake_pool"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None)  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(payload)
        proc.stdin.close()
        # The worker writes one line once it listens (or exits with its error on stderr).
        line = _readline(proc, START_TIMEOUT_S)
        proc.stdout.close()  # the worker sends nothing more on it
        if not line.startswith("ready"):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"intake process did not start (exit status {proc.returncode}): {line or 'no answer'}")
        log.info("intake process %d serves port %d", proc.pid, self.spec.port)
        return proc

    def supervise(self) -> None:
        """Restart workers that died (the supervisor thread calls this)."""
        for slot in range(len(self._workers)):
            with self._lock:
                proc = self._workers[slot]
            if proc.poll() is None or self._stop.is_set():
                continue
            now = time.monotonic()
            next_at, delay = self._retry_at.get(slot, (0.0, 1.0))
            if now < next_at:
                continue
            log.error("intake process %d exited with status %s; starting a new one", proc.pid, proc.returncode)
            try:
                fresh = self._spawn()
            except (OSError, RuntimeError) as exc:
                self._retry_at[slot] = (now + delay, min(delay * 2, 60.0))
                log.error("cannot restart intake process (next try in %.0f s): %s", delay, exc)
                continue
            self._retry_at.pop(slot, None)
            with self._lock:
                self._workers[slot] = fresh

    def _terminate(self, timeout: float = 10.0) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after 10 s) and the supervisor."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, or ``""`` after ``timeout`` seconds or at EOF."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0].decode(errors="replace").strip() if result else ""


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    # The parent may have died before prctl took effect.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def main() -> int:
    """Entry point of one worker: read the spec from stdin, listen, serve until told to stop."""
    spec = IntakeSpec(**json.loads(sys.stdin.read()))
    _die_with_parent(spec.parent_pid)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s intake[{os.getpid()}] %(levelname)s %(message)s")
    quiet_pynetdicom(verbose=spec.log_level <= logging.DEBUG)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        scp = spec.build()
        scp.start()
    except Exception as exc:  # reported to the parent, which refuses to start half a pool
        print(f"error {exc}", flush=True)
        return 1
    print(f"ready {scp.port}", flush=True)
    # Nobody reads stdout any more: anything printed later goes to stderr instead of filling the pipe.
    os.dup2(2, 1)
    while not stop.wait(1.0):
        if spec.parent_pid and os.getppid() != spec.parent_pid:
            break  # fallback where PR_SET_PDEATHSIG is unavailable
    scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
