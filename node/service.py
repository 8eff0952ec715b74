"""The running node: receiver, assembler, processor and dispatcher threads.

:class:`Node` wires the parts of ``medsegagent serve`` together:

* **receiver** — :class:`~medsegagent.node.intake.StorageSCP` spools each
  instance durably and records it in the job store before acknowledging;
* **assembler** — turns a study into a job once no instance arrived for
  ``quiet_seconds``;
* **processor** — finds the request (instruction sources in order), plans it
  once and stores the plan with the job, then runs the models and writes the
  SEG (:func:`~medsegagent.node.pipeline.segment_study` executes the stored plan);
* **dispatcher** — delivers results from the durable outbox with retries and
  back-off.

Each loop catches and logs its own errors: one study's data never stops the
node.  On start, jobs a crash interrupted are resumed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import IO

from medsegagent.dicom.seg import SegType
from medsegagent.dicom.series import SeriesError, choose_series
from medsegagent.dicom.uids import is_valid_uid
from medsegagent.models.executor import Executor, InProcessExecutor
from medsegagent.models.ray_executor import ClusterUnavailable
from medsegagent.models.registry import MODELS_ENV, Registry, load_registry
from medsegagent.models.routing import Plan, Router
from medsegagent.node.config import Config, ExecutorKind
from medsegagent.node.dispatch import DeliveryOutcome, Outcome, deliver
from medsegagent.node.instructions import Problem, resolve_instruction
from medsegagent.node.intake import StorageSCP, server_ssl_context
from medsegagent.node.intake_pool import IntakePool, IntakeSpec, StudyRecorder, tls_to_json
from medsegagent.node.jobs import FailureReason, IllegalTransition, Job, JobState, JobStore, OutboxItem
from medsegagent.node.manifest import StudyManifest, load_manifest
from medsegagent.node.memory import retain_freed_memory
from medsegagent.node.pipeline import (
    ModelCache,
    OutputOptions,
    PipelineError,
    Provenance,
    RunContext,
    read_study,
    segment_study,
    study_modality,
)
from medsegagent.node.retrieve import RetrieveError, retrieve_study

log = logging.getLogger(__name__)


class DataDirInUseError(RuntimeError):
    """Another node process holds the data directory."""


class Node:
    """One node process.

    Parameters
    ----------
    config : Config
        Validated configuration.
    registry : Registry, optional
        Model library (default: the installed ``registry.yaml``).
    poll_seconds : float
        Period of the assembler, processor and dispatcher loops.
    """

    def __init__(self, config: Config, registry: Registry | None = None, *, poll_seconds: float = 0.2) -> None:
        self.config = config
        self.data_dir = Path(config.node.data_dir)
        self.spool_dir = self.data_dir / "spool"
        self.results_dir = self.data_dir / "results"
        self.store = JobStore(self.data_dir / "jobs.sqlite")
        if config.node.models_dir is not None:
            # Registry locations ${MEDSEG_MODELS}/... resolve through the environment (worker processes inherit it).
            os.environ[MODELS_ENV] = str(config.node.models_dir)
        self.registry = registry or load_registry()
        self.router = Router(self.registry)
        self.cache = ModelCache()
        self.executor = build_executor(config, self.cache)
        destinations = config.destinations
        outputs = OutputOptions(
            seg_type=self._seg_type(), volume_report=any(d.volume_report for d in destinations),
            preview_sc=any(d.preview_sc for d in destinations),
            labelmap_copy=any(d.seg_type is SegType.LABELMAP for d in destinations),
        )  # fmt: skip
        self._outputs = outputs
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_processor = threading.Event()
        peers = config.peers
        settings = config.node
        self.recorder = StudyRecorder(self.data_dir, self.store.path, min_free_disk_mb=settings.min_free_disk_mb,
                                      max_study_instances=settings.max_study_instances)  # fmt: skip
        self.scp = StorageSCP(
            self.spool_dir,
            ae_title=settings.ae_title,
            host=settings.host,
            port=settings.port,
            allowed_callers={p.ae_title for p in peers} if peers else None,
            allowed_hosts=_allowed_hosts(config),
            on_instance=self.recorder.on_instance,
            admit=self.recorder.admit,
            max_associations=settings.max_associations,
            max_pending_connections=settings.max_pending_connections,
            association_request_seconds=settings.association_request_seconds,
            ssl_context=server_ssl_context(settings.tls) if settings.tls else None,
            reuse_port=settings.intake_processes > 1,
        )
        self.intake_pool: IntakePool | None = None
        self._lock_file: IO[str] | None = None
        self.http_server = None
        self.http_port: int | None = None

    def wake(self) -> None:
        """Tell the processor there may be work (new or retried job)."""
        self._wake_processor.set()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Resume unfinished jobs, start listening and start the worker loops.

        Raises
        ------
        DataDirInUseError
            Another node runs on the same data directory.
        """
        self._lock_data_dir()
        if self.config.node.retain_memory:
            retain_freed_memory()
        # Partial writes of a crashed process were never acknowledged: the sender retries them.
        for stale in self.spool_dir.rglob(".*.tmp") if self.spool_dir.exists() else ():
            stale.unlink(missing_ok=True)
        reopened = self.store.reconcile_spool(self.spool_dir)
        if reopened:
            log.warning("spool holds instances the job store had not recorded; reopened %d study(ies)", len(reopened))
        resumed = self.store.resume_unfinished()
        if resumed:
            log.info("resuming %d unfinished job(s): %s", len(resumed), ", ".join(resumed))
        try:
            self.scp.start()
        except OSError as exc:  # the bare "Address already in use" does not say which port
            where = f"{self.config.node.host}:{self.config.node.port}"
            raise OSError(exc.errno, f"cannot listen for DICOM on {where} (node.port): {exc.strerror}") from exc
        if self.config.node.intake_processes > 1:
            self.intake_pool = IntakePool(self._intake_spec(), self.config.node.intake_processes - 1)
            try:
                self.intake_pool.start()
            except Exception:
                self.intake_pool.stop()
                self.scp.stop()
                raise
        # Senders can retry only once every intake process listens: the quiet period starts now.
        self.store.restart_quiet_timers()
        for name, loop in (("assembler", self._assemble_loop), ("processor", self._process_loop),
                           ("dispatcher", self._dispatch_loop), ("retriever", self._retrieve_loop)):  # fmt: skip
            thread = threading.Thread(target=self._run_loop, args=(name, loop), name=f"medseg-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.http.enabled:
            from medsegagent.node.api import start_http

            self.http_server = start_http(self)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and let the loops finish their current step."""
        self._stop.set()
        self._wake_processor.set()
        self.scp.stop()
        if self.intake_pool is not None:
            self.intake_pool.stop()
        if self.http_server is not None:
            self.http_server.should_exit = True
        for thread in self._threads:
            thread.join(timeout)
        self.executor.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _lock_data_dir(self) -> None:
        """Hold an exclusive lock on the data directory while this node runs.

        Two nodes on one data directory would resume each other's jobs; with
        ``SO_REUSEPORT`` they could even share the port silently.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "node.lock"
        handle = open(path, "a")  # noqa: SIM115 -- held open for the node's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DataDirInUseError(f"another node is running on {self.data_dir} (it holds {path})") from None
        self._lock_file = handle

    def _run_loop(self, name: str, step) -> None:
        while not self._stop.is_set():
            try:
                busy = step()
            except Exception:  # a loop must survive anything one study throws at it
                log.exception("%s step failed", name)
                busy = False
            if not busy:
                if name == "processor":
                    self._wake_processor.wait(self.poll_seconds)
                    self._wake_processor.clear()
                else:
                    self._stop.wait(self.poll_seconds)

    # -- receiver ----------------------------------------------------------------------------
    def _intake_spec(self) -> IntakeSpec:
        """What an extra intake process needs to serve the port the main listener bound."""
        settings = self.config.node
        return IntakeSpec(
            spool_dir=str(self.spool_dir), data_dir=str(self.data_dir), db_path=str(self.store.path),
            ae_title=settings.ae_title, host=settings.host, port=self.scp.port,
            allowed_callers=sorted(self.scp.allowed_callers) if self.scp.allowed_callers is not None else None,
            allowed_hosts=sorted(self.scp.allowed_hosts) if self.scp.allowed_hosts is not None else None,
            max_associations=settings.max_associations, min_free_disk_mb=settings.min_free_disk_mb,
            max_study_instances=settings.max_study_instances, tls=tls_to_json(settings.tls), parent_pid=os.getpid(),
            max_pending_connections=settings.max_pending_connections,
            association_request_seconds=settings.association_request_seconds,
            log_level=logging.getLogger().getEffectiveLevel(),
        )  # fmt: skip

    # -- assembler --------------------------------------------------------------------------------
    def _assemble_loop(self) -> bool:
        jobs = self.store.close_quiet_studies(self.config.node.quiet_seconds)
        for job in jobs:
            log.info("study %s complete: job %s", job.study_uid, job.id)
        if jobs:
            self.wake()
        return bool(jobs)

    # -- processor ----------------------------------------------------------------------------------
    def submit(self, study_uid: str, request: str | None, source: str | None = None) -> Job:
        """Queue a job for a study in the spool (HTTP API, Orthanc button), or one to pull from ``source`` first.

        Raises
        ------
        ValueError
            Not a valid Study Instance UID, or no source of that name is configured.
        FileNotFoundError
            Without ``source``: the node has not received the study.
        """
        if not is_valid_uid(study_uid):
            raise ValueError(f"{study_uid!r} is not a valid Study Instance UID")
        if source is not None:
            known = [s.name for s in self.config.sources]
            if source not in known:
                raise ValueError(f"no source named {source!r} is configured (sources: {', '.join(known) or 'none'})")
            return self.store.create_job(study_uid, explicit_request=request, retrieve_from=source)
        if not (self.spool_dir / study_uid).is_dir():
            raise FileNotFoundError(f"study {study_uid} has not been received by this node")
        job = self.store.create_job(study_uid, explicit_request=request)
        self.wake()
        return job

    # -- retriever ---------------------------------------------------------------------------------
    def _retrieve_loop(self) -> bool:
        job = self.store.next_retrieving()
        if job is None:
            return False
        self.retrieve(job)
        return True

    def retrieve(self, job: Job) -> Job:
        """Pull a ``retrieving`` job's study from its source, then queue the job (or fail it); never raises."""
        source = next((s for s in self.config.sources if s.name == job.retrieve_from), None)
        try:
            if source is None:
                raise RetrieveError(FailureReason.SOURCE_UNREACHABLE,
                                    f"source {job.retrieve_from!r} is no longer configured")  # fmt: skip
            log.info("job %s: retrieving study %s from %s (%s)", job.id, job.study_uid, source.name,
                     source.describe())  # fmt: skip
            count = retrieve_study(source, job.study_uid, self.scp, node_ae=self.config.node.ae_title)
            log.info("job %s: %d instance(s) of study %s retrieved from %s", job.id, count, job.study_uid, source.name)
            job = self.store.transition(job.id, JobState.RECEIVED)
        except RetrieveError as exc:
            log.warning("job %s: study %s not retrieved: %s", job.id, job.study_uid, exc)
            return self._fail_retrieve(job, exc.reason, str(exc))
        except IllegalTransition:  # cancelled while the study was on its way
            log.info("job %s: cancelled while retrieving study %s", job.id, job.study_uid)
            return self.store.get(job.id)
        except Exception as exc:
            log.exception("job %s: retrieving study %s failed unexpectedly", job.id, job.study_uid)
            return self._fail_retrieve(job, FailureReason.INTERNAL_ERROR, f"internal error while retrieving: {exc}")
        self.wake()
        return job

    def _fail_retrieve(self, job: Job, reason: FailureReason, message: str) -> Job:
        try:
            return self.store.fail(job.id, reason, message)
        except IllegalTransition:  # cancelled meanwhile: the cancellation stands
            return self.store.get(job.id)

    def _process_loop(self) -> bool:
        job = self.store.claim_next()
        if job is None:
            return False
        self.process(job)
        return True

    def process(self, job: Job) -> Job:
        """Run one claimed job to ``written`` (or ``failed`` with a :class:`FailureReason`); never raises."""
        log.info("job %s: study %s", job.id, job.study_uid)
        try:
            return self._run(job)
        except ClusterUnavailable as exc:
            return self._cluster_unavailable(job, exc)
        except PipelineError as exc:
            return self._fail(job, exc.reason, str(exc))
        except SeriesError as exc:
            return self._fail(job, FailureReason.of(exc.problem), str(exc))
        except IllegalTransition as exc:  # cancelled while it ran: what it made is dropped
            log.info("job %s (study %s): %s; its result is discarded", job.id, job.study_uid, exc)
            return self.store.get(job.id)
        except Exception as exc:
            log.exception("job %s (study %s) failed unexpectedly", job.id, job.study_uid)
            # The job's error is for an administrator: the exception's kind, not its traceback (that is in the log).
            return self._fail(job, FailureReason.INTERNAL_ERROR,
                              f"internal error ({type(exc).__name__}); the node's log has the details")  # fmt: skip

    def _run(self, job: Job) -> Job:
        """Request, plan (once), segment and queue the results of one job (failures raise)."""
        study_dir = self.spool_dir / job.study_uid
        # What the intake scanned: the series choice and the request sources parse no header.
        manifest = load_manifest(study_dir)
        series = manifest.series_infos(study_dir)
        modality = study_modality(series)
        if modality is None:
            choose_series(series)  # raises with the reason
        plan, provenance = self._stored_plan(job) or self._plan(job, study_dir, modality, manifest)
        # The plan is stored with the job: a job resumed after a crash runs it without planning again.
        self.store.transition(job.id, JobState.RUNNING, request_text=plan.text,
                              request_source=provenance.request_source, plan=plan.to_json())  # fmt: skip
        out_dir = self.results_dir / job.id
        study = read_study(study_dir, series)
        # The context is built per job: the executor may be replaced while the node runs (a cluster back online).
        context = RunContext(self.registry, self.executor, self._outputs)
        result = segment_study(study, plan, out_dir, context, provenance)
        self.store.update(job.id, result_dir=str(out_dir))
        job = self.store.enqueue_results(job.id, self._deliveries(out_dir, result.report), result.report)
        log.info("job %s: SEG written (%s), %d destination(s)", job.id, result.seg_path, len(self.config.destinations))
        return job

    def _plan(self, job: Job, study_dir: Path, modality: str | None,
              manifest: StudyManifest) -> tuple[Plan, Provenance]:  # fmt: skip
        """Find the job's request (sources in order) and plan it: each candidate text is planned once.

        Raises
        ------
        PipelineError
            No source gives a usable request.
        """
        collection = self.config.node.collection
        plans: dict[str, Plan] = {}

        def unusable(text: str) -> Problem | None:
            plans[text] = self.router.plan(text, modality=modality, collection=collection)
            return self._unusable(plans[text])

        instruction = resolve_instruction(study_dir, self.config, explicit=job.explicit_request,
                                          called_ae=job.called_ae, usable=unusable, job_id=job.id,
                                          manifest=manifest)  # fmt: skip
        if instruction.text is None or instruction.source is None:
            problem = instruction.failure()
            raise PipelineError(problem.detail, problem.reason)
        passed_over = instruction.fallback
        if passed_over is not None:
            log.warning("job %s: the %s request is used instead of the unusable %s request (%s)", job.id,
                        instruction.source.value, passed_over.source.value, passed_over.detail)  # fmt: skip
        fallback = passed_over.to_json() if passed_over else None
        return plans[instruction.text], Provenance(instruction.source.value, fallback, uid_key=job.id)

    def _stored_plan(self, job: Job) -> tuple[Plan, Provenance] | None:
        """The plan a job stored before a crash interrupted it, when it still names known datasets.

        A retried job has none (:meth:`JobStore.retry` clears it): it is planned again,
        against the models installed now.
        """
        if job.plan is None or job.request_source is None:
            return None
        try:
            plan = Plan.from_json(job.plan)
        except (KeyError, ValueError, TypeError) as exc:  # written by another version of the node
            log.warning("job %s: the stored plan is unreadable (%s); planning again", job.id, exc)
            return None
        if not set(plan.selection) <= set(self.registry.datasets):
            log.warning("job %s: the stored plan names datasets no longer in the registry; planning again", job.id)
            return None
        log.info("job %s: running the plan stored with the job", job.id)
        return plan, Provenance(job.request_source, uid_key=job.id)

    def _fail(self, job: Job, reason: FailureReason, message: str) -> Job:
        """Fail ``job`` with ``reason`` and log it with the job, the study and the reason."""
        log.warning("job %s (study %s) failed: %s: %s", job.id, job.study_uid, reason.value, message)
        try:
            return self.store.fail(job.id, reason, message)
        except IllegalTransition as exc:  # cancelled meanwhile: the cancellation stands
            log.info("job %s: %s; the failure is not recorded", job.id, exc)
            return self.store.get(job.id)

    def _cluster_unavailable(self, job: Job, exc: ClusterUnavailable) -> Job:
        """The executor's cluster is gone: the study goes back to the queue (the job store keeps it), or fails."""
        settings = self.config.executor
        if job.attempts >= settings.max_job_attempts:
            error = f"cluster unavailable after {job.attempts} attempt(s): {exc}; retry with POST /jobs/{job.id}/retry"
            return self._fail(job, FailureReason.EXECUTOR_UNAVAILABLE, error)
        log.warning("job %s: cluster unavailable (%s); re-queued in %.0f s", job.id, exc, settings.retry_delay_s)
        # Wait before re-queueing, so the processor does not spin against a dead cluster.
        self._stop.wait(settings.retry_delay_s)
        return self.store.transition(job.id, JobState.RECEIVED, error=f"cluster unavailable (will retry): {exc}")

    def _seg_type(self) -> SegType:
        """The encoding of ``seg.dcm``: LABELMAP only when every destination takes one (else a copy is written)."""
        wanted = {d.seg_type for d in self.config.destinations}
        return SegType.LABELMAP if wanted == {SegType.LABELMAP} else SegType.BINARY

    def _deliveries(self, out_dir: Path, report: dict) -> dict[str, list[str]]:
        """Files each destination receives: the SEG in its encoding, plus the SR / SC where it asked for them."""
        written = set(report.get("outputs", ["seg.dcm"]))
        deliveries = {}
        for dest in self.config.destinations:
            labelmap = dest.seg_type is SegType.LABELMAP and "seg-labelmap.dcm" in written
            names = ["seg-labelmap.dcm" if labelmap else "seg.dcm"]
            if dest.volume_report and "sr.dcm" in written:
                # The SR references the BINARY SEG: seg-binary.dcm, or seg.dcm beside a LABELMAP copy.
                referenced = "seg-binary.dcm" if "seg-binary.dcm" in written else "seg.dcm"
                names += [n for n in (referenced, "sr.dcm") if n not in names]
            if dest.preview_sc and "preview-sc.dcm" in written:
                names.append("preview-sc.dcm")
            deliveries[dest.name] = [str(out_dir / n) for n in names]
        return deliveries

    def _unusable(self, plan: Plan) -> Problem | None:
        """Why ``plan`` cannot be run (it selects nothing, or no installed model), or ``None``."""
        if not plan.selection:
            reasons = "; ".join(u.reason for u in plan.unmatched) or "no target recognised"
            return Problem(FailureReason.NOTHING_MATCHED, f"selects nothing ({reasons})")
        if not any(self.registry.datasets[name].installed_models for name in plan.selection):
            selected = ", ".join(sorted(plan.selection))
            return Problem(FailureReason.NO_MODEL_INSTALLED, f"no installed model for the datasets {selected}")
        return None

    # -- dispatcher -----------------------------------------------------------------------------------
    def _dispatch_loop(self) -> bool:
        due = self.store.due_deliveries()
        if not due:
            return False
        by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in due:
            by_destination[item.destination].append(item)
        destinations = {d.name: d for d in self.config.destinations}
        for name, items in by_destination.items():
            files = [Path(i.path) for i in items]
            dest = destinations.get(name)
            if dest is None:
                gone = DeliveryOutcome(Outcome.GIVE_UP, f"destination {name!r} is no longer configured")
                outcomes = dict.fromkeys(files, gone)
            else:
                outcomes = deliver(dest, files, calling_ae=self.config.node.ae_title)
            for item, path in zip(items, files, strict=True):
                self._record_delivery(item, outcomes[path])
        return True

    def _record_delivery(self, item: OutboxItem, outcome: DeliveryOutcome) -> None:
        """Store one attempt's outcome in the outbox: sent, retried after the back-off, or failed for good."""
        job = self.store.get(item.job_id)
        what = f"{Path(item.path).name} of job {job.id} (study {job.study_uid}) to {item.destination}"
        policy = self.config.delivery
        if outcome.outcome is Outcome.DELIVERED:
            self.store.delivery_succeeded(item.id)
            log.info("delivered %s", what)
            return
        reason = outcome.reason or "unknown error"
        if outcome.outcome is Outcome.RETRY and time.time() - job.updated_at > policy.give_up_after_hours * 3600:
            reason = f"{reason} (giving up after {policy.give_up_after_hours:g} h)"
        elif outcome.outcome is Outcome.RETRY:
            delay = min(policy.retry_initial_seconds * 2 ** min(item.attempts, 16), policy.retry_max_seconds)
            log.warning("delivery of %s failed (%s); retry in %.0f s", what, reason, delay)
            self.store.delivery_failed(item.id, reason, delay)
            return
        log.error("delivery of %s failed for good: %s", what, reason)
        self.store.delivery_failed(item.id, reason, None)


def build_executor(config: Config, cache: ModelCache | None = None) -> Executor:
    """The executor the configuration asks for: in-process threads, or Ray actors (connected on first use)."""
    settings = config.executor
    if settings.kind is ExecutorKind.RAY:
        from medsegagent.models.ray_executor import RayExecutor

        return RayExecutor(
            settings.address, num_cpus_per_model=settings.num_cpus_per_model,
            num_gpus_per_model=settings.num_gpus_per_model, placement=settings.models, replicas=settings.replicas,
            spread=settings.spread, timeout_s=settings.timeout_s, max_restarts=settings.max_restarts,
            max_task_retries=settings.max_task_retries, retries=settings.retries, head_grace_s=settings.head_grace_s,
            local=settings.local,
        )  # fmt: skip
    return InProcessExecutor(cache, workers=settings.workers, timeout_s=settings.timeout_s)


def _allowed_hosts(config: Config) -> set[str] | None:
    hosts = {p.host for p in config.peers if p.host}
    # Only enforce addresses when every peer names one; otherwise AE titles decide.
    return hosts if config.peers and all(p.host for p in config.peers) else None
