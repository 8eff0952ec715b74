"""Durable job store: SQLite in WAL mode under the node's data directory.

Three tables:

``studies``
    One row per study being received: last arrival time, instance count,
    the called/calling AE titles.  Written on every stored instance so a
    study acknowledged to a sender survives a crash before it becomes a job.
``jobs``
    One row per segmentation job.  Every state change is one transaction:
    ``received -> planned -> running -> written -> delivered`` (or
    ``failed`` / ``cancelled``).  After a crash, jobs in ``received``,
    ``planned`` or ``running`` are resumed from ``received``; results are
    idempotent because their UIDs derive from the job id.
``outbox``
    One row per (job, destination, file); ``pending`` until a C-STORE
    succeeded, with attempts, next attempt time and last error.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsegagent.dicom.uids import is_valid_uid


class JobState(enum.Enum):
    """Life cycle of a job."""

    RECEIVED = "received"
    PLANNED = "planned"
    RUNNING = "running"
    WRITTEN = "written"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States a restarted node resumes from the beginning.
UNFINISHED = (JobState.RECEIVED, JobState.PLANNED, JobState.RUNNING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,               -- open | queued
    instances INTEGER NOT NULL DEFAULT 0,
    last_instance_at REAL NOT NULL,
    called_ae TEXT, calling_ae TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    called_ae TEXT, calling_ae TEXT,
    explicit_request TEXT,
    request_text TEXT, request_source TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    plan_json TEXT, report_json TEXT,
    result_dir TEXT,
    history_json TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,               -- pending | sent | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE(job_id, destination, path)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""


@dataclass(frozen=True)
class Job:
    """A row of ``jobs``."""

    id: str
    study_uid: str
    state: JobState
    created_at: float
    updated_at: float
    called_ae: str | None
    calling_ae: str | None
    explicit_request: str | None
    request_text: str | None
    request_source: str | None
    attempts: int
    error: str | None
    plan: dict | None
    report: dict | None
    result_dir: str | None
    history: list[dict]

    def to_json(self, *, detail: bool = False) -> dict[str, Any]:
        """JSON form for the API (plan/report/history only with ``detail``)."""
        out: dict[str, Any] = {
            "id": self.id, "study_uid": self.study_uid, "state": self.state.value,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "request": {"text": self.request_text, "source": self.request_source},
            "called_ae": self.called_ae, "calling_ae": self.calling_ae,
            "attempts": self.attempts, "error": self.error,
        }  # fmt: skip
        if detail:
            out.update(plan=self.plan, report=self.report, history=self.history, result_dir=self.result_dir)
        return out


@dataclass(frozen=True)
class OutboxItem:
    """A row of ``outbox``."""

    id: int
    job_id: str
    destination: str
    path: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


class JobStore:
    """Thread-safe access to the node's SQLite database.

    Parameters
    ----------
    path : Path
        Database file (created with its tables when missing).
    synchronous : {"FULL", "NORMAL"}
        SQLite's ``synchronous`` setting for this object's connections.
        ``FULL`` (default) fsyncs every commit: a state change survives power
        loss.  ``NORMAL`` in WAL mode survives a process crash (``kill -9``)
        and fsyncs only at checkpoints; the intake records arrivals this way
        because the spool itself is durable and :meth:`reconcile_spool`
        rebuilds any arrival record a power loss took.
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.synchronous = synchronous
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript manages its own transaction; CREATE ... IF NOT EXISTS is idempotent.
        self._connect().executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed state change survives power loss, not only a process crash.
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    def close(self) -> None:
        """Close the calling thread's connection (each thread has its own; others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- studies -------------------------------------------------------------------
    def touch_study(self, study_uid: str, called_ae: str, calling_ae: str) -> int:
        """Record one more instance of ``study_uid``; returns its instance count.

        A study that was already queued as a job is reopened, so late
        instances start a new job after the quiet time.
        """
        # One statement, so one implicit transaction: this runs once per received instance.  fetchall()
        # steps the statement to its end, which commits; a half-read cursor would hold the write lock.
        (row,) = (
            self._connect()
            .execute(
                """INSERT INTO studies(study_uid, state, instances, last_instance_at, called_ae, calling_ae)
                   VALUES (?, 'open', 1, ?, ?, ?)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     state='open', instances=instances+1, last_instance_at=excluded.last_instance_at,
                     called_ae=excluded.called_ae, calling_ae=excluded.calling_ae
                   RETURNING instances""",
                (study_uid, time.time(), called_ae, calling_ae),
            )
            .fetchall()
        )
        return int(row["instances"])

    def study_instances(self, study_uid: str) -> int:
        """Instances recorded for ``study_uid`` (0 when unknown)."""
        row = self._connect().execute("SELECT instances FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return int(row["instances"]) if row else 0

    def reconcile_spool(self, spool_dir: Path) -> list[str]:
        """Record spooled instances whose arrival the database does not know (at start-up).

        Instances are durable on disk before they are acknowledged; their
        arrival records are committed without an fsync each (see
        ``synchronous``).  After a power loss the spool may therefore hold
        instances that arrived after a study's last recorded arrival: such a
        study is (re)opened -- as a late instance would reopen it -- with the
        AE titles from the newest file's File Meta Information, so it becomes a
        job after the quiet time.  Call it before any intake process listens.

        Returns
        -------
        list of str
            Study Instance UIDs that were opened.
        """
        spool_dir = Path(spool_dir)
        if not spool_dir.is_dir():
            return []
        opened = []
        with self._tx() as db:
            known = {
                r["study_uid"]: (r["instances"], r["last_instance_at"])
                for r in db.execute("SELECT study_uid, instances, last_instance_at FROM studies")
            }
            for study_dir in sorted(p for p in spool_dir.iterdir() if p.is_dir() and is_valid_uid(p.name)):
                count, last_at = known.get(study_dir.name, (0, None))
                series = [d for d in study_dir.iterdir() if d.is_dir()]
                # A file is written before it is renamed into its series directory, so no file is newer
                # than its directory: a study none of whose directories changed since its last recorded
                # arrival needs no look at its files (one stat per series, not per instance, at start).
                if last_at is not None and all(d.stat().st_mtime <= last_at for d in series):
                    continue
                files = [(f.stat().st_mtime, f) for d in series for f in d.glob("*.dcm")]
                if not files:
                    continue
                newest_at, newest = max(files)
                # A recorded instance is renamed into place before its arrival is recorded: never newer.
                if last_at is not None and newest_at <= last_at:
                    continue
                called, calling = _ae_titles(newest)
                db.execute(
                    """INSERT INTO studies(study_uid, state, instances, last_instance_at, called_ae, calling_ae)
                       VALUES (?, 'open', ?, ?, ?, ?)
                       ON CONFLICT(study_uid) DO UPDATE SET state='open', instances=excluded.instances,
                         last_instance_at=excluded.last_instance_at,
                         called_ae=COALESCE(excluded.called_ae, called_ae),
                         calling_ae=COALESCE(excluded.calling_ae, calling_ae)""",
                    (study_dir.name, max(count, len(files)), time.time(), called, calling),
                )
                opened.append(study_dir.name)
        return opened

    def restart_quiet_timers(self) -> int:
        """Give every open study a fresh quiet period (at start-up).

        A transfer cut off by a crash is retried by its sender; without this
        the half-received study would become a job before the retry arrives.
        """
        with self._tx() as db:
            return db.execute("UPDATE studies SET last_instance_at=? WHERE state='open'", (time.time(),)).rowcount

    def close_quiet_studies(self, quiet_seconds: float) -> list[Job]:
        """Turn every open study quiet for ``quiet_seconds`` into a new job."""
        cutoff = time.time() - quiet_seconds
        created = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM studies WHERE state='open' AND last_instance_at <= ?", (cutoff,)
            ).fetchall()
            for row in rows:
                db.execute("UPDATE studies SET state='queued' WHERE study_uid=?", (row["study_uid"],))
                created.append(self._insert_job(db, row["study_uid"], row["called_ae"], row["calling_ae"], None))
        return [self.get(job_id) for job_id in created]

    # -- jobs ------------------------------------------------------------------------
    def create_job(
        self, study_uid: str, *, explicit_request: str | None = None, called_ae: str | None = None,
        calling_ae: str | None = None,
    ) -> Job:  # fmt: skip
        """Create a job for a study already in the spool (e.g. from the HTTP API)."""
        with self._tx() as db:
            job_id = self._insert_job(db, study_uid, called_ae, calling_ae, explicit_request)
        return self.get(job_id)

    def _insert_job(
        self, db: sqlite3.Connection, study_uid: str, called: str | None, calling: str | None, request: str | None
    ) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        history = json.dumps([{"state": JobState.RECEIVED.value, "at": now}])
        db.execute(
            """INSERT INTO jobs(id, study_uid, state, created_at, updated_at, called_ae, calling_ae,
                                explicit_request, history_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (job_id, study_uid, JobState.RECEIVED.value, now, now, called, calling, request, history),
        )
        return job_id

    def get(self, job_id: str) -> Job:
        """The job ``job_id``; ``KeyError`` when unknown."""
        row = self._connect().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def list(self, *, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """Newest jobs first, optionally of one state."""
        db = self._connect()
        if state is None:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        else:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY created_at DESC LIMIT ?", (state.value, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def claim_next(self) -> Job | None:
        """Atomically take the oldest ``received`` job and mark it ``planned``-in-progress.

        Returns ``None`` when there is nothing to do.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state=? ORDER BY created_at LIMIT 1", (JobState.RECEIVED.value,)
            ).fetchone()
            if row is None:
                return None
            self._set_state(db, row["id"], JobState.PLANNED, attempts_inc=True)
        return self.get(row["id"])

    def transition(self, job_id: str, state: JobState, **fields: Any) -> Job:
        """Move ``job_id`` to ``state`` and store ``fields`` in one transaction.

        ``fields`` may be ``request_text``, ``request_source``, ``error``,
        ``plan`` (dict), ``report`` (dict) or ``result_dir``.
        """
        with self._tx() as db:
            self._set_state(db, job_id, state, **fields)
        return self.get(job_id)

    def _set_state(self, db: sqlite3.Connection, job_id: str, state: JobState, attempts_inc: bool = False,
                   **fields: Any) -> None:  # fmt: skip
        row = db.execute("SELECT history_json FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        now = time.time()
        history = json.loads(row["history_json"])
        history.append({"state": state.value, "at": now, **({"error": fields["error"]} if fields.get("error") else {})})
        columns = {"state": state.value, "updated_at": now, "history_json": json.dumps(history)}
        for key, value in fields.items():
            if key in ("plan", "report"):
                columns[f"{key}_json"] = json.dumps(value) if value is not None else None
            elif key in ("request_text", "request_source", "error", "result_dir"):
                columns[key] = value
            else:
                raise ValueError(f"unknown job field {key!r}")
        assignments = ", ".join(f"{k}=?" for k in columns)
        extra = ", attempts=attempts+1" if attempts_inc else ""
        db.execute(f"UPDATE jobs SET {assignments}{extra} WHERE id=?", (*columns.values(), job_id))

    def resume_unfinished(self) -> list[str]:
        """Put jobs interrupted by a crash back to ``received``; returns their ids."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(UNFINISHED))})",
                tuple(s.value for s in UNFINISHED),
            ).fetchall()
            for row in rows:
                self._set_state(db, row["id"], JobState.RECEIVED, error=None)
        return [r["id"] for r in rows]

    def retry(self, job_id: str) -> Job:
        """Re-run a failed or cancelled job (and re-queue its failed deliveries)."""
        job = self.get(job_id)
        with self._tx() as db:
            if job.state is JobState.WRITTEN or job.state is JobState.DELIVERED:
                db.execute(
                    "UPDATE outbox SET state='pending', next_attempt_at=?, attempts=0 "
                    "WHERE job_id=? AND state='failed'",
                    (time.time(), job_id),
                )
                self._set_state(db, job_id, JobState.WRITTEN, error=None)
            elif job.state in (JobState.FAILED, JobState.CANCELLED):
                self._set_state(db, job_id, JobState.RECEIVED, error=None)
            else:
                raise ValueError(f"job {job_id} is {job.state.value}; only failed, cancelled or written jobs retry")
        return self.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished yet."""
        job = self.get(job_id)
        if job.state in (JobState.DELIVERED, JobState.CANCELLED):
            raise ValueError(f"job {job_id} is already {job.state.value}")
        with self._tx() as db:
            db.execute("UPDATE outbox SET state='failed', last_error='cancelled' WHERE job_id=? AND state='pending'",
                       (job_id,))  # fmt: skip
            self._set_state(db, job_id, JobState.CANCELLED)
        return self.get(job_id)

    # -- outbox ------------------------------------------------------------------------
    def enqueue_results(self, job_id: str, deliveries: dict[str, list[str]], report: dict) -> Job:
        """Mark ``job_id`` written and queue its result files per destination (one transaction).

        ``deliveries`` maps a destination name to the files it receives.
        """
        now = time.time()
        with self._tx() as db:
            for dest, paths in deliveries.items():
                for path in paths:
                    db.execute(
                        """INSERT OR IGNORE INTO outbox(job_id, destination, path, state, next_attempt_at)
                           VALUES (?, ?, ?, 'pending', ?)""",
                        (job_id, dest, path, now),
                    )
            self._set_state(db, job_id, JobState.WRITTEN if deliveries else JobState.DELIVERED, report=report)
        return self.get(job_id)

    def due_deliveries(self, now: float | None = None) -> list[OutboxItem]:
        """Pending outbox items whose next attempt is due."""
        rows = (
            self._connect()
            .execute(
                "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at <= ? ORDER BY id",
                (now if now is not None else time.time(),),
            )
            .fetchall()
        )
        return [_outbox(r) for r in rows]

    def outbox(self, job_id: str) -> list[OutboxItem]:
        """All outbox items of a job."""
        rows = self._connect().execute("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,)).fetchall()
        return [_outbox(r) for r in rows]

    def delivery_succeeded(self, item_id: int) -> None:
        """Mark one item sent; the job becomes ``delivered`` when none is left pending."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1 WHERE id=?",
                       (time.time(), item_id))  # fmt: skip
            self._finish_job_if_done(db, item_id)

    def delivery_failed(self, item_id: int, error: str, retry_in: float | None) -> None:
        """Record a failed attempt; ``retry_in=None`` fails the item permanently."""
        with self._tx() as db:
            if retry_in is None:
                db.execute("UPDATE outbox SET state='failed', last_error=?, attempts=attempts+1 WHERE id=?",
                           (error, item_id))  # fmt: skip
                self._finish_job_if_done(db, item_id)
            else:
                db.execute(
                    "UPDATE outbox SET last_error=?, attempts=attempts+1, next_attempt_at=? WHERE id=?",
                    (error, time.time() + retry_in, item_id),
                )

    def _finish_job_if_done(self, db: sqlite3.Connection, item_id: int) -> None:
        job_id = db.execute("SELECT job_id FROM outbox WHERE id=?", (item_id,)).fetchone()["job_id"]
        states = [r["state"] for r in db.execute("SELECT state FROM outbox WHERE job_id=?", (job_id,))]
        if "pending" in states:
            return
        current = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()["state"]
        if current != JobState.WRITTEN.value:
            return
        if "failed" in states:
            self._set_state(db, job_id, JobState.FAILED, error="delivery failed permanently (see outbox)")
        else:
            self._set_state(db, job_id, JobState.DELIVERED)


def _ae_titles(path: Path) -> tuple[str | None, str | None]:
    """(called, calling) AE titles the intake wrote into a spooled file's File Meta Information."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError):
        return None, None
    called = str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip() or None
    calling = str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or None
    return called, calling


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], study_uid=row["study_uid"], state=JobState(row["state"]), created_at=row["created_at"],
        updated_at=row["updated_at"], called_ae=row["called_ae"], calling_ae=row["calling_ae"],
        explicit_request=row["explicit_request"], request_text=row["request_text"],
        request_source=row["request_source"], attempts=row["attempts"], error=row["error"],
        plan=json.loads(row["plan_json"]) if row["plan_json"] else None,
        report=json.loads(row["report_json"]) if row["report_json"] else None,
        result_dir=row["result_dir"], history=json.loads(row["history_json"]),
    )  # fmt: skip


def _outbox(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        row["id"], row["job_id"], row["destination"], row["path"], row["state"], row["attempts"],
        row["next_attempt_at"], row["last_error"],
    )  # fmt: skip
