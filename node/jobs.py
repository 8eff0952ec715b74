"""Durable job store: SQLite in WAL mode under the node's data directory.

Three tables:

``studies``
    One row per study being received: last arrival time, instance count,
    the called/calling AE titles.  Written on every stored instance so a
    study acknowledged to a sender survives a crash before it becomes a job.
``jobs``
    One row per segmentation job.  Every state change is one transaction
    and must be in :data:`TRANSITIONS`: ``received -> planned -> running ->
    written -> delivered`` (or ``failed`` / ``cancelled``); any other raises
    :class:`IllegalTransition` and changes nothing.  A failed job carries a
    :class:`FailureReason` and a sentence for the administrator.  After a
    crash, jobs in ``planned`` or ``running`` are resumed from ``received``;
    results are idempotent because their UIDs derive from the job id.
``outbox``
    One row per (job, destination, file); ``pending`` until a C-STORE
    succeeded, with attempts, next attempt time and last error.
"""

from __future__ import annotations

import enum
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsegagent.dicom.series import SeriesProblem
from medsegagent.dicom.uids import is_valid_uid

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    """Life cycle of a job (the allowed moves are :data:`TRANSITIONS`)."""

    #: Being pulled from a configured source (``POST /jobs`` with ``source``); then ``received``.
    RETRIEVING = "retrieving"
    #: Waiting for the processor (new, resumed after a crash, or retried).
    RECEIVED = "received"
    #: Claimed by the processor: finding the request and planning.
    PLANNED = "planned"
    #: Models running, SEG being written.
    RUNNING = "running"
    #: Results written and queued in the outbox.
    WRITTEN = "written"
    #: Every destination stored every result.
    DELIVERED = "delivered"
    #: Ended with a :class:`FailureReason`.
    FAILED = "failed"
    #: Cancelled by an administrator.
    CANCELLED = "cancelled"


_S = JobState
#: Every state change a job may make, as ``(from, to)``.  Anything else raises :class:`IllegalTransition`.
TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (_S.RECEIVED, _S.PLANNED),  # the processor claims the job
        (_S.PLANNED, _S.RUNNING),  # request found, plan stored
        (_S.RUNNING, _S.WRITTEN),  # results in the outbox
        (_S.RUNNING, _S.DELIVERED),  # results written, no destination configured
        (_S.WRITTEN, _S.DELIVERED),  # the last outbox item was stored
        (_S.PLANNED, _S.FAILED),
        (_S.RUNNING, _S.FAILED),
        (_S.WRITTEN, _S.FAILED),  # a delivery failed for good
        (_S.PLANNED, _S.RECEIVED),  # resumed after a crash
        (_S.RUNNING, _S.RECEIVED),  # resumed after a crash, or the executor's cluster was away
        (_S.RECEIVED, _S.CANCELLED),
        (_S.PLANNED, _S.CANCELLED),
        (_S.RUNNING, _S.CANCELLED),  # the processor discards the result when it finishes
        (_S.WRITTEN, _S.CANCELLED),  # pending deliveries are dropped
        (_S.FAILED, _S.RECEIVED),  # retry: run again
        (_S.CANCELLED, _S.RECEIVED),  # retry: run again
        (_S.FAILED, _S.WRITTEN),  # retry of a failed delivery: the same files again
        (_S.DELIVERED, _S.WRITTEN),  # redeliver: the same files (same SOP Instance UIDs) again
        (_S.RETRIEVING, _S.RECEIVED),  # the study was pulled from its source
        (_S.RETRIEVING, _S.FAILED),  # ... or could not be
        (_S.RETRIEVING, _S.CANCELLED),
        (_S.FAILED, _S.RETRIEVING),  # retry of a failed pull: pull again
        (_S.CANCELLED, _S.RETRIEVING),
    }
)
del _S

#: States a restarted node resumes from the beginning.
UNFINISHED = (JobState.PLANNED, JobState.RUNNING)


class FailureReason(enum.StrEnum):
    """Why a job failed: stored with the job, shown by the API, the logs and Orthanc.

    The study problems share their values with
    :class:`~medsegagent.dicom.series.SeriesProblem`, so ``FailureReason(problem.value)`` maps one to the other.
    """

    NO_IMAGE_SERIES = SeriesProblem.NO_IMAGE_SERIES.value
    UNSUPPORTED_MODALITY = "unsupported_modality"
    INCONSISTENT_SERIES = SeriesProblem.INCONSISTENT_SERIES.value
    INCONSISTENT_FRAME_OF_REFERENCE = SeriesProblem.INCONSISTENT_FRAME_OF_REFERENCE.value
    NON_FINITE_GEOMETRY = SeriesProblem.NON_FINITE_GEOMETRY.value
    IMPLAUSIBLE_GEOMETRY = SeriesProblem.IMPLAUSIBLE_GEOMETRY.value
    UNREADABLE_PIXELS = SeriesProblem.UNREADABLE_PIXELS.value
    UNKNOWN_CHARACTER_SET = SeriesProblem.UNKNOWN_CHARACTER_SET.value
    #: No instruction source gave a request.
    NO_REQUEST = "no_request"
    #: A request is present but breaks a limit (length, number of targets) or is empty.
    REQUEST_UNUSABLE = "request_unusable"
    #: The request names nothing the registry knows for this modality.
    NOTHING_MATCHED = "nothing_matched"
    #: The request selects datasets none of whose models is installed.
    NO_MODEL_INSTALLED = "no_model_installed"
    #: Every model of the plan failed.
    MODEL_FAILED = "model_failed"
    #: The executor's cluster stayed unreachable.
    EXECUTOR_UNAVAILABLE = "executor_unavailable"
    #: A destination refused a result, or stayed down past the give-up time.
    DELIVERY_FAILED = "delivery_failed"
    #: The source to pull the study from did not answer or refused the node.
    SOURCE_UNREACHABLE = "source_unreachable"
    #: The source does not hold the study.
    STUDY_NOT_AT_SOURCE = "study_not_at_source"
    #: Some instances of the study did not arrive from the source.
    RETRIEVE_INCOMPLETE = "retrieve_incomplete"
    #: A bug or an unforeseen condition (the traceback is in the node's log).
    INTERNAL_ERROR = "internal_error"

    @classmethod
    def of(cls, problem: SeriesProblem) -> FailureReason:
        """The failure reason of a study problem."""
        return cls(problem.value)


#: Failures of a job's pull from its source (a retry pulls again).
RETRIEVE_FAILURES = frozenset(
    {FailureReason.SOURCE_UNREACHABLE, FailureReason.STUDY_NOT_AT_SOURCE, FailureReason.RETRIEVE_INCOMPLETE}
)


class IllegalTransition(Exception):
    """A state change :data:`TRANSITIONS` does not allow (nothing was changed).

    Attributes
    ----------
    job_id : str
    current, wanted : JobState
    """

    def __init__(self, job_id: str, current: JobState, wanted: JobState, why: str | None = None) -> None:
        self.job_id, self.current, self.wanted = job_id, current, wanted
        super().__init__(why or f"job {job_id} is {current.value}; it cannot become {wanted.value}")


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
    reason TEXT,                       -- FailureReason of a failed job
    plan_json TEXT, report_json TEXT,
    result_dir TEXT,
    history_json TEXT NOT NULL DEFAULT '[]',
    retrieve_from TEXT                 -- the configured source the study is pulled from, if any
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
    reason: FailureReason | None
    plan: dict | None
    report: dict | None
    result_dir: str | None
    history: list[dict]
    #: Name of the configured source the study is pulled from (``None``: the study was sent to the node).
    retrieve_from: str | None = None

    def to_json(self, *, detail: bool = False) -> dict[str, Any]:
        """JSON form for the API (plan/report/history only with ``detail``)."""
        out: dict[str, Any] = {
            "id": self.id, "study_uid": self.study_uid, "state": self.state.value,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "request": {"text": self.request_text, "source": self.request_source},
            "called_ae": self.called_ae, "calling_ae": self.calling_ae,
            "attempts": self.attempts, "error": self.error,
            "reason": self.reason.value if self.reason is not None else None,
            "retrieve_from": self.retrieve_from,
        }  # fmt: skip
        if detail:
            out.update(plan=self.plan, report=self.report, history=self.history, result_dir=self.result_dir)
        return out


class DeliveryState(enum.StrEnum):
    """Where one outbox item (a file for a destination) stands."""

    #: Waiting for its next attempt.
    PENDING = "pending"
    #: The destination stored it.
    SENT = "sent"
    #: Refused for good, or given up on.
    FAILED = "failed"


@dataclass(frozen=True)
class OutboxItem:
    """A row of ``outbox``."""

    id: int
    job_id: str
    destination: str
    path: str
    state: DeliveryState
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
        db = self._connect()
        db.executescript(_SCHEMA)
        if "reason" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN reason TEXT")  # a database made before failure reasons
        if "retrieve_from" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN retrieve_from TEXT")  # a database made before retrieves

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
        instances start a new job after the quiet time -- unless a job is
        pulling the study from a source: its instances belong to that job.
        """
        # One statement, so one implicit transaction: this runs once per received instance.  fetchall()
        # steps the statement to its end, which commits; a half-read cursor would hold the write lock.
        (row,) = (
            self._connect()
            .execute(
                """INSERT INTO studies(study_uid, state, instances, last_instance_at, called_ae, calling_ae)
                   VALUES (?1, CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE state=?5 AND study_uid=?1)
                                    THEN 'queued' ELSE 'open' END, 1, ?2, ?3, ?4)
                   ON CONFLICT(study_uid) DO UPDATE SET
                     state=excluded.state, instances=instances+1, last_instance_at=excluded.last_instance_at,
                     called_ae=excluded.called_ae, calling_ae=excluded.calling_ae
                   RETURNING instances""",
                (study_uid, time.time(), called_ae, calling_ae, JobState.RETRIEVING.value),
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
        calling_ae: str | None = None, retrieve_from: str | None = None,
    ) -> Job:  # fmt: skip
        """Create a job for a study already in the spool (e.g. from the HTTP API).

        With ``retrieve_from`` (a configured source's name) the job starts
        ``retrieving``: the study is pulled from that source first.
        """
        with self._tx() as db:
            job_id = self._insert_job(db, study_uid, called_ae, calling_ae, explicit_request, retrieve_from)
        return self.get(job_id)

    def _insert_job(
        self, db: sqlite3.Connection, study_uid: str, called: str | None, calling: str | None, request: str | None,
        retrieve_from: str | None = None,
    ) -> str:  # fmt: skip
        job_id = uuid.uuid4().hex
        now = time.time()
        state = JobState.RETRIEVING if retrieve_from else JobState.RECEIVED
        history = json.dumps([{"state": state.value, "at": now}])
        db.execute(
            """INSERT INTO jobs(id, study_uid, state, created_at, updated_at, called_ae, calling_ae,
                                explicit_request, history_json, retrieve_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (job_id, study_uid, state.value, now, now, called, calling, request, history, retrieve_from),
        )
        return job_id

    def next_retrieving(self) -> Job | None:
        """The oldest job waiting for its study to be pulled from a source, if any."""
        row = self._connect().execute("SELECT * FROM jobs WHERE state=? ORDER BY created_at LIMIT 1",
                                      (JobState.RETRIEVING.value,)).fetchone()  # fmt: skip
        return _job(row) if row is not None else None

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

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state, zero included), counted by the database."""
        counts = dict.fromkeys(JobState, 0)
        for state, count in self._connect().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[JobState(state)] = count
        return counts

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

        Raises
        ------
        IllegalTransition
            The move is not in :data:`TRANSITIONS`; nothing changed.
        """
        with self._tx() as db:
            self._set_state(db, job_id, state, **fields)
        return self.get(job_id)

    def fail(self, job_id: str, reason: FailureReason, message: str) -> Job:
        """End ``job_id`` as failed with ``reason`` and the administrator's ``message`` (one transaction)."""
        with self._tx() as db:
            self._set_state(db, job_id, JobState.FAILED, error=message, reason=reason)
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> Job:
        """Store ``fields`` (as for :meth:`transition`) without changing the state."""
        with self._tx() as db:
            if db.execute("UPDATE jobs SET updated_at=? WHERE id=?", (time.time(), job_id)).rowcount == 0:
                raise KeyError(job_id)
            self._store_fields(db, job_id, fields)
        return self.get(job_id)

    def _set_state(self, db: sqlite3.Connection, job_id: str, state: JobState, attempts_inc: bool = False,
                   reason: FailureReason | None = None, **fields: Any) -> None:  # fmt: skip
        row = db.execute("SELECT state, history_json FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        current = JobState(row["state"])
        if (current, state) not in TRANSITIONS:
            raise IllegalTransition(job_id, current, state)
        if (state is JobState.FAILED) != (reason is not None):
            raise ValueError(f"job {job_id}: a failed job, and only a failed job, has a FailureReason")
        now = time.time()
        entry: dict[str, Any] = {"state": state.value, "at": now}
        if reason is not None:
            entry["reason"] = FailureReason(reason).value
        if fields.get("error"):
            entry["error"] = fields["error"]
        history = [*json.loads(row["history_json"]), entry]
        columns = {"state": state.value, "updated_at": now, "history_json": json.dumps(history),
                   "reason": entry.get("reason")}  # fmt: skip
        extra = ", attempts=attempts+1" if attempts_inc else ""
        db.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in columns)}{extra} WHERE id=?",
                   (*columns.values(), job_id))  # fmt: skip
        self._store_fields(db, job_id, fields)

    @staticmethod
    def _store_fields(db: sqlite3.Connection, job_id: str, fields: dict[str, Any]) -> None:
        columns: dict[str, Any] = {}
        for key, value in fields.items():
            if key in ("plan", "report"):
                columns[f"{key}_json"] = json.dumps(value) if value is not None else None
            elif key in ("explicit_request", "request_text", "request_source", "error", "result_dir"):
                columns[key] = value
            else:
                raise ValueError(f"unknown job field {key!r}")
        if columns:
            db.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in columns)} WHERE id=?",
                       (*columns.values(), job_id))  # fmt: skip

    def resume_unfinished(self) -> list[str]:
        """Put jobs a crash interrupted (``planned``, ``running``) back to ``received``; returns their ids."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(UNFINISHED))})",
                tuple(s.value for s in UNFINISHED),
            ).fetchall()
            for row in rows:
                self._set_state(db, row["id"], JobState.RECEIVED, error=None)
        return [r["id"] for r in rows]

    def retry(self, job_id: str, request: str | None = None) -> Job:
        """Try a job again: the failed deliveries of its results, else the whole job.

        * ``failed`` because a delivery failed: the failed outbox items are
          queued again (the same files) and the job is ``written``;
        * ``failed`` otherwise, or ``cancelled``: the job runs again from ``received``, planned afresh;
        * ``written`` with failed items beside pending ones: those items are queued again.

        Parameters
        ----------
        job_id : str
            The job.
        request : str, optional
            A new request: the failed or cancelled job runs again from ``received``, planned from this text
            (also when only its delivery had failed).

        Raises
        ------
        IllegalTransition
            For a job that is queued, running or delivered (see :meth:`redeliver`), and for a new
            request on a ``written`` job.
        """
        with self._tx() as db:
            job = _job(self._row(db, job_id))
            if request is None and job.state is JobState.WRITTEN and self._requeue_failed(db, job_id):
                pass
            elif request is None and job.state is JobState.FAILED and job.reason is FailureReason.DELIVERY_FAILED:
                self._requeue_failed(db, job_id)
                self._set_state(db, job_id, JobState.WRITTEN, error=None)
            elif job.state in (JobState.FAILED, JobState.CANCELLED):
                # A study never (fully) pulled from its source is pulled again.
                pull = job.retrieve_from and (job.state is JobState.CANCELLED or job.reason in RETRIEVE_FAILURES)
                # Planned again, against the models installed now: the stored plan is dropped.
                fields: dict[str, Any] = {"error": None, "plan": None}
                if request is not None:
                    fields["explicit_request"] = request
                self._set_state(db, job_id, JobState.RETRIEVING if pull else JobState.RECEIVED, **fields)
            else:
                why = f"job {job_id} is {job.state.value}: only failed or cancelled jobs, or failed deliveries, retry"
                if job.state is JobState.DELIVERED:
                    why += f"; POST /jobs/{job_id}/redeliver sends its results again"
                raise IllegalTransition(job_id, job.state, JobState.RECEIVED, why)
        return self.get(job_id)

    @staticmethod
    def _requeue_failed(db: sqlite3.Connection, job_id: str) -> int:
        """Queue the job's failed outbox items again; returns how many."""
        return db.execute(
            "UPDATE outbox SET state='pending', next_attempt_at=?, attempts=0 WHERE job_id=? AND state='failed'",
            (time.time(), job_id),
        ).rowcount

    def redeliver(self, job_id: str) -> Job:
        """Send every result of a delivered job to its destinations again (same files, same SOP Instance UIDs).

        Raises
        ------
        IllegalTransition
            The job is not delivered, or has nothing to deliver.
        FileNotFoundError
            A result file is gone from the data directory.
        """
        with self._tx() as db:
            job = _job(self._row(db, job_id))
            paths = [r["path"] for r in db.execute("SELECT DISTINCT path FROM outbox WHERE job_id=?", (job_id,))]
            if job.state is not JobState.DELIVERED:
                why = f"job {job_id} is {job.state.value}; only a delivered job is redelivered"
                raise IllegalTransition(job_id, job.state, JobState.WRITTEN, why)
            if not paths:
                why = f"job {job_id} has no results queued for any destination"
                raise IllegalTransition(job_id, job.state, JobState.WRITTEN, why)
            missing = [Path(p).name for p in paths if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"job {job_id}: result file(s) {', '.join(missing)} no longer exist")
            db.execute(
                "UPDATE outbox SET state='pending', next_attempt_at=?, attempts=0, last_error=NULL, sent_at=NULL "
                "WHERE job_id=?",
                (time.time(), job_id),
            )
            self._set_state(db, job_id, JobState.WRITTEN)
        return self.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished yet (its pending deliveries are dropped).

        Raises
        ------
        IllegalTransition
            The job is delivered, failed or cancelled already.
        """
        with self._tx() as db:
            state = JobState(self._row(db, job_id)["state"])
            if (state, JobState.CANCELLED) not in TRANSITIONS:
                why = f"job {job_id} is {state.value}; only an unfinished job is cancelled"
                raise IllegalTransition(job_id, state, JobState.CANCELLED, why)
            db.execute("UPDATE outbox SET state='failed', last_error='cancelled' WHERE job_id=? AND state='pending'",
                       (job_id,))  # fmt: skip
            self._set_state(db, job_id, JobState.CANCELLED)
        return self.get(job_id)

    @staticmethod
    def _row(db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return row

    # -- outbox ------------------------------------------------------------------------
    def enqueue_results(self, job_id: str, deliveries: dict[str, list[str]], report: dict) -> Job:
        """Mark ``job_id`` written and queue its result files per destination (one transaction).

        ``deliveries`` maps a destination name to the files it receives.
        """
        now = time.time()
        with self._tx() as db:
            for dest, paths in deliveries.items():
                for path in paths:
                    # A job run again (retry) writes the same files: their old items are queued afresh.
                    db.execute(
                        """INSERT INTO outbox(job_id, destination, path, state, next_attempt_at)
                           VALUES (?, ?, ?, 'pending', ?)
                           ON CONFLICT(job_id, destination, path) DO UPDATE SET state='pending', attempts=0,
                             next_attempt_at=excluded.next_attempt_at, last_error=NULL, sent_at=NULL""",
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
            query = "SELECT last_error FROM outbox WHERE job_id=? AND state='failed' ORDER BY id"
            errors = [r["last_error"] for r in db.execute(query, (job_id,))]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            error = f"delivery failed for good: {errors[0]}{more}"
            self._set_state(db, job_id, JobState.FAILED, error=error, reason=FailureReason.DELIVERY_FAILED)
            log.warning("job %s: %s", job_id, error)
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
        reason=FailureReason(row["reason"]) if row["reason"] else None,
        plan=json.loads(row["plan_json"]) if row["plan_json"] else None,
        report=json.loads(row["report_json"]) if row["report_json"] else None,
        result_dir=row["result_dir"], history=json.loads(row["history_json"]), retrieve_from=row["retrieve_from"],
    )  # fmt: skip


def _outbox(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        row["id"], row["job_id"], row["destination"], row["path"], DeliveryState(row["state"]), row["attempts"],
        row["next_attempt_at"], row["last_error"],
    )  # fmt: skip
