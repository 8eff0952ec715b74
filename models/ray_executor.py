"""Running the matched models on a Ray cluster, behind the :class:`~medsegagent.models.executor.Executor` interface.

:class:`RayExecutor` has the same ``run(tasks, images) -> {model: TaskResult}``
as :class:`~medsegagent.models.executor.InProcessExecutor`, so the pipeline
and the node use either without change.  What differs is where models run:

* **Where Ray is.**  ``address=None`` starts a private local Ray (bound to
  the loopback interface); ``"auto"`` or ``"HOST:PORT"`` joins a running
  cluster as a driver; ``"ray://HOST:PORT"`` connects through Ray Client.
  The connection is made on first use, so a node starts while its cluster
  is down.
* **Model workers.**  Each model gets a Ray actor (:class:`ModelWorker`) that
  keeps it loaded in its own :class:`~medsegagent.models.executor.ModelCache`
  across studies -- ``replicas`` of them when several studies run at once.
  Actors declare CPUs, GPUs (fractions allowed: two models may share a GPU)
  and custom resources, so Ray's scheduler places them; a model may *prefer*
  the nodes that offer a custom resource (soft node affinity: it moves
  elsewhere when that node is gone).
* **Data.**  The study's images go to the object store once per study
  (``ray.put``) and every actor reads them from there; predictions come back
  the same way.  No shared filesystem is needed for data (models must be
  installed on every node at the registry's paths).
* **Faults.**  The node's SQLite job store stays the source of truth; Ray
  only runs parts of a job.  A worker lost mid-job (process or whole node)
  costs only its part: Ray restarts the actor (``max_restarts``) and retries
  the call (``max_task_retries``); past those the executor creates a fresh
  actor and resubmits (``retries``).  A lost head is different: a driver whose
  GCS is gone for 60 s is terminated by Ray, so a watchdog probes the head
  and, after ``head_grace_s`` without it, disconnects cleanly and makes
  :meth:`RayExecutor.run` raise :class:`ClusterUnavailable`.  The node then
  puts the job back in its queue (or marks it failed once its attempts are
  spent) and the next run reconnects -- or starts a fresh local Ray.
* **Hung models.**  A prediction over its time limit is reported as
  ``timeout`` like in-process, and its actor is killed, which reclaims the
  process (threads of the in-process executor cannot be killed).

Ray is an optional dependency (``pip install 'medsegagent[ray]'``); this
module imports it only when an executor connects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from medsegagent import is_loopback
from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import ModelSpec, SegmentationModel, StudyImages, load_model
from medsegagent.models.executor import ModelCache, ModelTask, TaskResult, TaskStatus

log = logging.getLogger(__name__)

__all__ = ["ClusterUnavailable", "ModelPlacement", "ModelWorker", "RayExecutor"]

Loader = Callable[[ModelSpec, str | None], SegmentationModel]

#: ``local`` keys of a private local Ray and the ``ray.init`` argument each sets.
_LOCAL_KEYS = {
    "num_cpus": "num_cpus",
    "num_gpus": "num_gpus",
    "object_store_mb": "object_store_memory",
    "resources": "resources",
    "temp_dir": "_temp_dir",
}


class ClusterUnavailable(RuntimeError):
    """The Ray cluster (its head) cannot be reached; the study should be retried later, not failed."""


@dataclass(frozen=True)
class ModelPlacement:
    """Resources and placement of one model's actors (unset fields take the executor's defaults).

    Attributes
    ----------
    num_cpus, num_gpus : float or None
        Reserved per actor; fractions allowed (``num_gpus: 0.5`` lets two models share a GPU).
    resources : dict
        Custom resources every actor needs (hard: it waits for a node that offers them).
    prefer : str or None
        A custom resource; the actor goes to a node that offers it when one
        is alive, elsewhere otherwise, and moves when that node is lost.
    replicas : int or None
        Actors of this model, for studies running at the same time.
    """

    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    prefer: str | None = None
    replicas: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or float(value) < 0):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.replicas is not None and int(self.replicas) < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas!r}")
        resources = {str(k): float(v) for k, v in dict(self.resources).items()}
        if any(v <= 0 for v in resources.values()):
            raise ValueError(f"custom resources must be positive amounts, got {resources}")
        object.__setattr__(self, "resources", resources)

    @classmethod
    def of(cls, value: ModelPlacement | Mapping[str, Any]) -> ModelPlacement:
        """A placement from a mapping (the node configuration's ``executor.models.NAME``)."""
        if isinstance(value, ModelPlacement):
            return value
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown placement key(s) {unknown} (known: {', '.join(sorted(known))})")
        return cls(**dict(value))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


class ModelWorker:
    """The body of a model actor: a model cache and the two calls the executor makes.

    Parameters
    ----------
    device : str
        Device for models whose registry reference says ``auto`` (inside a GPU
        actor Ray sets ``CUDA_VISIBLE_DEVICES``, so ``auto`` finds its GPU).
    memory_budget_mb : float, optional
        Budget of this actor's cache.
    loader : callable, optional
        ``(spec, device) -> model``; :func:`~medsegagent.models.backends.load_model` by default.
    """

    def __init__(self, device: str = "auto", memory_budget_mb: float | None = None, loader: Loader | None = None):
        self.cache = ModelCache(device, memory_budget_mb, loader or load_model)

    def where(self) -> dict[str, Any]:
        """Node id, process id and GPU ids of this actor."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def load(self, spec: ModelSpec) -> tuple[float, str | None]:
        """Load ``spec`` into the cache: seconds spent (0 when cached) and the error, if any."""
        t0 = time.perf_counter()
        try:
            _, loaded = self.cache.get(spec)
        except Exception as exc:  # reported by run(), which meets the same error
            return 0.0, _describe(exc)
        return (time.perf_counter() - t0 if loaded else 0.0), None

    def run(self, task: ModelTask, images: StudyImages) -> tuple[TaskResult, dict[str, Any]]:
        """Predict; a model's own failure comes back as a ``failed`` result, never as an exception."""
        seconds: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            model, loaded = self.cache.get(task.spec)  # after an actor restart the model loads again here
            seconds["load"] = time.perf_counter() - t0 if loaded else 0.0
            t0 = time.perf_counter()
            prediction = model.predict(images, task.labels or None)
            seconds["run"] = time.perf_counter() - t0
            result = TaskResult(task.name, TaskStatus.OK, prediction, None, seconds)
        except Exception as exc:  # one model's failure must not fail the study
            result = TaskResult(task.name, TaskStatus.FAILED, None, _describe(exc), seconds)
        return result, self.where()


@dataclass(eq=False)
class _Replica:
    """One actor of a model and the calls it has in flight."""

    model: str
    handle: Any
    outstanding: int = 0


@dataclass(eq=False)
class _Task:
    """One model task of a running study, through its (re)submissions."""

    model_task: ModelTask
    limit: float | None
    replica: _Replica | None = None
    load_ref: Any = None
    run_ref: Any = None
    loaded: bool = False
    load_s: float = 0.0
    submitted: float = 0.0
    started: float | None = None
    attempts: int = 0
    lost_since: float | None = None
    retry_at: float | None = None
    backoff: float = 0.25
    holding: bool = False  # counted in its replica's ``outstanding``


def _address_host(address: str | None) -> tuple[str, int] | None:
    """``(host, port)`` of a cluster address, ``None`` for local Ray and ``auto``."""
    if address is None or address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"ray-gcs://{address}")
    if parsed.hostname is None:
        raise ValueError(f"cannot read a host from Ray address {address!r}")
    default = 10001 if parsed.scheme == "ray" else 6379
    return parsed.hostname, parsed.port or default


def _prepare_environment(address: str | None) -> None:
    """Environment for Ray set before it is imported (or patched where it already was)."""
    # A hospital node phones nowhere: Ray's usage statistics are off unless asked for.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = _address_host(address)
    if address is None or (target is not None and is_loopback(target[0])):
        # Ray otherwise advertises, and binds to, the machine's outward address even for a
        # one-machine cluster; this flag makes it resolve "localhost" to 127.0.0.1 and bind there.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("0", "false"):
            constants.ENABLE_RAY_CLUSTER = False


def _reachable(addr: tuple[str, int], timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(addr, timeout=timeout).close()
    except OSError:
        return False
    return True


class RayExecutor:
    """Runs model tasks on Ray actors that keep their models loaded.

    Parameters
    ----------
    address : str, optional
        ``None``: a private local Ray (see ``local``); ``"auto"``: the cluster
        this machine belongs to; ``"HOST:PORT"``: a cluster's head (GCS);
        ``"ray://HOST:PORT"``: Ray Client.
    num_cpus_per_model, num_gpus_per_model : float
        Default resources per model actor (fractions allowed).
    placement : dict, optional
        Model name -> :class:`ModelPlacement` (or a mapping of its fields).
    replicas : int
        Default actors per model (studies processed at once).
    spread : bool
        Spread actors over nodes (Ray's ``SPREAD``) where no ``prefer`` applies.
    timeout_s : float, optional
        Default wall-time limit of a prediction (loading excluded); the actor of a
        prediction over it is killed.
    placement_timeout_s : float
        Limit for an actor to be placed and to load its model (a request the
        cluster cannot satisfy fails the model instead of waiting forever).
    max_restarts, max_task_retries : int
        Ray's own restarts of a lost actor and retries of its calls.
    retries : int
        Fresh actors the executor tries for a task once Ray gave up on one.
    worker_lost_timeout_s : float
        How long a task waits for its unreachable actor to come back before replacing it.
    head_grace_s : float
        How long the head may be unreachable before :class:`ClusterUnavailable`
        (Ray terminates a driver whose head is gone for 60 s; keep it below that).
    probe_interval_s : float
        Period of the head watchdog.
    max_actors : int
        Actors kept alive at once; least recently used idle models are released first.
    device : str
        Device for models whose reference says ``auto``.
    memory_budget_mb : float, optional
        Model cache budget of each actor.
    local : dict, optional
        Private local Ray: ``num_cpus``, ``num_gpus``, ``object_store_mb``,
        ``resources``, ``temp_dir`` (by default Ray's own choices).
    namespace : str
        Ray namespace of the actors.
    runtime_env : dict, optional
        Ray runtime environment of the job (e.g. ``{"env_vars": {...}}``).
    loader : callable, optional
        ``(spec, device) -> model`` used inside the actors (tests); must be importable or picklable.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus_per_model: float = 1.0,
        num_gpus_per_model: float = 0.0,
        placement: Mapping[str, ModelPlacement | Mapping[str, Any]] | None = None,
        replicas: int = 1,
        spread: bool = False,
        timeout_s: float | None = None,
        placement_timeout_s: float = 600.0,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        retries: int = 2,
        worker_lost_timeout_s: float = 120.0,
        head_grace_s: float = 15.0,
        probe_interval_s: float = 2.0,
        max_actors: int = 16,
        device: str = "auto",
        memory_budget_mb: float | None = None,
        local: Mapping[str, Any] | None = None,
        namespace: str = "medsegagent",
        runtime_env: Mapping[str, Any] | None = None,
        loader: Loader | None = None,
    ) -> None:
        if address is not None and address != "auto":
            _address_host(address)  # fails early on an unreadable address
        if num_cpus_per_model < 0 or num_gpus_per_model < 0:
            raise ValueError("num_cpus_per_model and num_gpus_per_model must be >= 0")
        if replicas < 1 or max_actors < 1:
            raise ValueError("replicas and max_actors must be >= 1")
        unknown = sorted(set(local or {}) - set(_LOCAL_KEYS))
        if unknown:
            raise ValueError(f"unknown local Ray option(s) {unknown} (known: {', '.join(_LOCAL_KEYS)})")
        self.address = address
        self.num_cpus_per_model = float(num_cpus_per_model)
        self.num_gpus_per_model = float(num_gpus_per_model)
        self.placement = {name: ModelPlacement.of(p) for name, p in (placement or {}).items()}
        self.replicas = int(replicas)
        self.spread = spread
        self.timeout_s = timeout_s
        self.placement_timeout_s = float(placement_timeout_s)
        self.max_restarts = int(max_restarts)
        self.max_task_retries = int(max_task_retries)
        self.retries = int(retries)
        self.worker_lost_timeout_s = float(worker_lost_timeout_s)
        self.head_grace_s = float(head_grace_s)
        self.probe_interval_s = float(probe_interval_s)
        self.max_actors = int(max_actors)
        self.device = device
        self.memory_budget_mb = memory_budget_mb
        self.local = dict(local or {})
        self.namespace = namespace
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.loader = loader
        #: Model name -> node id of the actor that produced its last result.
        self.placements: dict[str, str] = {}
        self._pool: OrderedDict[str, list[_Replica]] = OrderedDict()  # least recently used model first
        self._lock = threading.Lock()  # pool and active-run count
        self._conn_lock = threading.RLock()  # connect / disconnect
        self._active = 0
        self._connected = False
        self._owns_ray = False
        self._actor_cls: Any = None
        self._probe: tuple[str, int] | None = None
        self._head_lost = threading.Event()
        self._stop_watch = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._owner_release = threading.Event()  # ends the thread that started a private local Ray

    # -- connection ----------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect now (the first :meth:`run` does otherwise).

        Raises
        ------
        ClusterUnavailable
            When the cluster cannot be reached or Ray cannot start.
        """
        self._connect()

    def _connect(self) -> Any:
        with self._conn_lock:
            if self._connected and self._head_lost.is_set():
                with self._lock:
                    busy = self._active > 0
                if busy:
                    raise ClusterUnavailable(f"the Ray head {self._where()} is unreachable")
                self._disconnect()
            if self._connected:
                import ray

                return ray
            _prepare_environment(self.address)
            target = _address_host(self.address)
            if target is not None and not _reachable(target):
                raise ClusterUnavailable(f"cannot reach the Ray cluster at {self.address}")
            import ray

            try:
                if ray.is_initialized():
                    self._owns_ray = False  # someone else in this process connected; share it
                elif self.address is None:
                    options = {_LOCAL_KEYS[k]: v for k, v in self.local.items()}
                    if "object_store_memory" in options:
                        options["object_store_memory"] = int(float(options["object_store_memory"]) * 2**20)
                    self._init_local(
                        ray,
                        address="local",  # never RAY_ADDRESS: local means a private instance
                        include_dashboard=False,
                        log_to_driver=False,
                        namespace=self.namespace,
                        runtime_env=self.runtime_env,
                        **options,
                    )
                    self._owns_ray = True
                else:
                    ray.init(
                        address=self.address,
                        log_to_driver=False,
                        namespace=self.namespace,
                        runtime_env=self.runtime_env,
                    )
                    self._owns_ray = True
            except Exception as exc:
                raise ClusterUnavailable(f"cannot connect to Ray ({self.address or 'local'}): {exc}") from exc
            self._probe = target if self.address and self.address.startswith("ray://") else self._gcs_address(ray)
            self._actor_cls = ray.remote(ModelWorker)
            self._head_lost.clear()
            self._stop_watch.clear()
            self._connected = True
            if self._probe is not None:
                self._watchdog = threading.Thread(target=self._watch, name="ray-head-watchdog", daemon=True)
                self._watchdog.start()
            log.info("Ray executor connected (%s, head %s)", self.address or "local", self._where())
            return ray

    def _init_local(self, ray: Any, **options: Any) -> None:
        """``ray.init`` for a private local Ray, from a thread that lives as long as the connection.

        Ray starts its local processes with ``PR_SET_PDEATHSIG``, which fires when the *thread* that
        started them ends: started from a node's short-lived worker thread, the whole local Ray would
        die with it.
        """
        started = threading.Event()
        failure: list[BaseException] = []
        self._owner_release.clear()

        def owner() -> None:
            try:
                ray.init(**options)
            except BaseException as exc:
                failure.append(exc)
            finally:
                started.set()
            if not failure:
                self._owner_release.wait()

        threading.Thread(target=owner, name="ray-local-owner", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]

    @staticmethod
    def _gcs_address(ray: Any) -> tuple[str, int] | None:
        try:
            host, port = str(ray.get_runtime_context().gcs_address).rsplit(":", 1)
            return host, int(port)
        except Exception:  # Ray Client and older versions: no probe, Ray's own errors decide
            return None

    def _where(self) -> str:
        return f"{self._probe[0]}:{self._probe[1]}" if self._probe else (self.address or "local")

    def _watch(self) -> None:
        """Probe the head; after ``head_grace_s`` without it, give up the connection before Ray kills us."""
        down_since: float | None = None
        while not self._stop_watch.wait(self.probe_interval_s):
            assert self._probe is not None
            if _reachable(self._probe) or self._stop_watch.is_set():  # stopped: a disconnect closed the head
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            log.warning("Ray head %s unreachable for %.0f s", self._where(), now - down_since)
            if now - down_since >= self.head_grace_s:
                log.error("Ray head %s lost; disconnecting (jobs will be retried)", self._where())
                self._head_lost.set()
                with self._lock:
                    idle = self._active == 0
                if idle:
                    self._disconnect()
                return

    def _disconnect(self) -> None:
        with self._conn_lock:
            if not self._connected:
                return
            self._stop_watch.set()
            with self._lock:
                self._pool.clear()  # the actors went with the cluster (or go with this driver)
            if self._owns_ray:
                import ray

                with contextlib.suppress(Exception):
                    ray.shutdown()
            self._owner_release.set()
            self._connected = False
            self._actor_cls = None

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                last = self._active == 0
            if last and self._head_lost.is_set():
                self._disconnect()

    # -- actors ----------------------------------------------------------------------------------
    def _placement(self, name: str) -> ModelPlacement:
        return self.placement.get(name, ModelPlacement())

    def _actor_options(self, ray: Any, name: str, existing: int) -> dict[str, Any]:
        placement = self._placement(name)
        options: dict[str, Any] = {
            "num_cpus": placement.num_cpus if placement.num_cpus is not None else self.num_cpus_per_model,
            "num_gpus": placement.num_gpus if placement.num_gpus is not None else self.num_gpus_per_model,
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_task_retries,
        }
        if placement.resources:
            options["resources"] = dict(placement.resources)
        if placement.prefer:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            nodes = sorted(
                n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(placement.prefer)
            )
            if nodes:
                # soft: when that node is lost, Ray restarts the actor on another one.
                node = nodes[existing % len(nodes)]
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
            else:
                log.warning("model %s prefers resource %r, which no live node offers", name, placement.prefer)
        if "scheduling_strategy" not in options and self.spread:
            options["scheduling_strategy"] = "SPREAD"
        return options

    def _replica_for(self, ray: Any, spec: ModelSpec) -> _Replica:
        """The least busy actor of ``spec``'s model, created when none is idle and replicas are left."""
        name = spec.name
        wanted = self._placement(name).replicas or self.replicas
        with self._lock:
            replicas = self._pool.setdefault(name, [])
            self._pool.move_to_end(name)
            best = min(replicas, key=lambda r: r.outstanding) if replicas else None
            if best is not None and (best.outstanding == 0 or len(replicas) >= wanted):
                best.outstanding += 1
                return best
            self._make_room(ray, keep=name)
            options = self._actor_options(ray, name, len(replicas))
            handle = self._actor_cls.options(**options).remote(self.device, self.memory_budget_mb, self.loader)
            replica = _Replica(name, handle, outstanding=1)
            replicas.append(replica)
            log.info("model %s: actor %d started (%s)", name, len(replicas), options)
            return replica

    def _make_room(self, ray: Any, keep: str) -> None:
        """Release idle actors of the least recently used models beyond ``max_actors`` (lock held)."""
        total = sum(len(v) for v in self._pool.values())
        for name in list(self._pool):
            if total < self.max_actors:
                return
            if name == keep:
                continue
            idle = [r for r in self._pool[name] if r.outstanding == 0]
            for replica in idle:
                self._kill(ray, replica)
                self._pool[name].remove(replica)
                total -= 1
            if not self._pool[name]:
                del self._pool[name]

    @staticmethod
    def _kill(ray: Any, replica: _Replica) -> None:
        with contextlib.suppress(Exception):
            ray.kill(replica.handle, no_restart=True)

    def _drop(self, ray: Any, replica: _Replica | None) -> None:
        """Forget (and kill) an actor: lost for good, or holding a hung model."""
        if replica is None:
            return
        with self._lock:
            replicas = self._pool.get(replica.model, [])
            if replica in replicas:
                replicas.remove(replica)
            if not replicas:
                self._pool.pop(replica.model, None)
        self._kill(ray, replica)

    def _release(self, task: _Task) -> None:
        if task.replica is not None and task.holding:
            with self._lock:
                task.replica.outstanding = max(0, task.replica.outstanding - 1)
        task.holding = False

    def actor_nodes(self, timeout: float = 60.0) -> dict[str, list[str]]:
        """Model name -> node id of each of its live actors (asks the actors)."""
        ray = self._connect()
        with self._lock:
            pool = {name: list(replicas) for name, replicas in self._pool.items()}
        out: dict[str, list[str]] = {}
        for name, replicas in pool.items():
            places = ray.get([r.handle.where.remote() for r in replicas], timeout=timeout)
            out[name] = [p["node_id"] for p in places]
        return out

    # -- running ---------------------------------------------------------------------------------
    def _submit(self, ray: Any, task: _Task, images_ref: Any) -> None:
        if task.replica is None:
            task.replica = self._replica_for(ray, task.model_task.spec)  # counts the call
        elif not task.holding:
            with self._lock:
                task.replica.outstanding += 1
        task.holding = True
        if not task.loaded:
            task.load_ref = task.replica.handle.load.remote(task.model_task.spec)
            task.submitted = time.monotonic()
        task.run_ref = task.replica.handle.run.remote(task.model_task, images_ref)
        if task.loaded:
            task.started = time.monotonic()  # a resubmitted prediction gets its full time again
        task.retry_at = None

    def run(self, model_tasks: Sequence[ModelTask], images: Volume | StudyImages) -> dict[str, TaskResult]:
        """Run ``model_tasks`` on their actors; results in task order, keyed by model name.

        Raises
        ------
        ClusterUnavailable
            When the head cannot be reached (before or during the study); no
            result is returned, so the caller retries the whole study later.
        """
        images = StudyImages.of(images)
        names = [t.name for t in model_tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"one task per model, got {names}")
        if not model_tasks:
            return {}
        ray = self._connect()
        with self._running():
            tasks = [_Task(t, t.timeout_s if t.timeout_s is not None else self.timeout_s) for t in model_tasks]
            results: dict[str, TaskResult] = {}
            try:
                images_ref = ray.put(images)  # once per study; every actor reads this copy
                for task in tasks:
                    self._submit(ray, task, images_ref)
                self._drive(ray, tasks, images_ref, results)
            except ClusterUnavailable:
                raise
            except Exception as exc:
                if self._head_lost.is_set() or (self._probe is not None and not _reachable(self._probe)):
                    raise ClusterUnavailable(f"the Ray head {self._where()} is unreachable: {exc}") from exc
                raise
            finally:
                for task in tasks:
                    self._release(task)
        return {name: results[name] for name in names}

    def _drive(self, ray: Any, tasks: list[_Task], images_ref: Any, results: dict[str, TaskResult]) -> None:
        """Wait for results, resubmit lost parts, enforce time limits."""
        while len(results) < len(tasks):
            if self._head_lost.is_set():
                raise ClusterUnavailable(f"the Ray head {self._where()} was lost during the study")
            now = time.monotonic()
            pending = [t for t in tasks if t.model_task.name not in results]
            for task in pending:
                if task.retry_at is not None and now >= task.retry_at:
                    self._submit(ray, task, images_ref)
            # By value, not identity: Ray Client hands back new reference objects from wait().
            waiting = {}
            for task in pending:
                if task.retry_at is None:
                    waiting[task.run_ref if task.loaded else task.load_ref] = (task, task.loaded)
            if waiting:
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=0.1)
                for ref in ready:
                    task, is_run = waiting[ref]
                    self._collect(ray, task, ref, is_run, results)
            else:
                time.sleep(0.05)
            self._enforce_limits(ray, pending, results)

    def _collect(self, ray: Any, task: _Task, ref: Any, is_run: bool, results: dict[str, TaskResult]) -> None:
        from ray.exceptions import (
            ActorUnavailableError,
            ObjectLostError,
            RayActorError,
            RayTaskError,
            WorkerCrashedError,
        )

        name = task.model_task.name
        try:
            value = ray.get(ref)
        except ActorUnavailableError as exc:  # restarting, or its node is going: wait for it
            self._lost(ray, task, exc, results, permanent=False)
            return
        except (RayActorError, ObjectLostError, WorkerCrashedError) as exc:  # gone for good
            self._lost(ray, task, exc, results, permanent=True)
            return
        except RayTaskError as exc:  # the actor could not even run the call (e.g. a package missing there)
            self._release(task)
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            results[name] = TaskResult(name, TaskStatus.FAILED, None, f"Ray worker error: {_describe(cause)}")
            return
        task.lost_since, task.backoff = None, 0.25
        if not is_run:
            task.loaded = True
            task.load_s = float(value[0])
            task.started = time.monotonic()  # like in-process: the clock runs from the prediction
            return
        result, where = value
        self._release(task)
        result.seconds["load"] = task.load_s + result.seconds.get("load", 0.0)
        self.placements[name] = where["node_id"]
        results[name] = result

    def _lost(
        self, ray: Any, task: _Task, exc: BaseException, results: dict[str, TaskResult], *, permanent: bool
    ) -> None:
        """A task's actor is unreachable or dead: retry on it later, or on a fresh one."""
        name = task.model_task.name
        now = time.monotonic()
        self._release(task)
        if not permanent:
            task.lost_since = task.lost_since or now
            if now - task.lost_since <= self.worker_lost_timeout_s:
                log.warning("model %s: actor unavailable (%s); retrying", name, type(exc).__name__)
                task.retry_at = now + task.backoff
                task.backoff = min(task.backoff * 2, 5.0)
                return
        log.warning("model %s: actor lost (%s)", name, _describe(exc).splitlines()[0][:200])
        self._drop(ray, task.replica)
        task.replica, task.lost_since, task.loaded = None, None, False
        task.attempts += 1
        if task.attempts > self.retries:
            lost = _describe(exc).splitlines()[0]
            results[name] = TaskResult(name, TaskStatus.FAILED, None, f"Ray worker lost: {lost}")
            return
        task.retry_at = now + 0.5

    def _enforce_limits(self, ray: Any, pending: list[_Task], results: dict[str, TaskResult]) -> None:
        now = time.monotonic()
        for task in pending:
            name = task.model_task.name
            if name in results or task.retry_at is not None:
                continue
            if task.loaded and task.limit is not None and task.started is not None and now - task.started > task.limit:
                log.error("model %s timed out after %.1f s; killing its actor", name, task.limit)
                results[name] = TaskResult(name, TaskStatus.TIMEOUT, None, f"timed out after {task.limit:g} s")
                self._release(task)
                self._drop(ray, task.replica)  # reclaims the hung process
            elif not task.loaded and now - task.submitted > self.placement_timeout_s:
                log.error("model %s: not placed and loaded within %.0f s", name, self.placement_timeout_s)
                results[name] = TaskResult(
                    name,
                    TaskStatus.FAILED,
                    None,
                    f"not placed and loaded within {self.placement_timeout_s:g} s"
                    " (does the cluster offer the resources it asks for?)",
                )
                self._release(task)
                self._drop(ray, task.replica)

    def close(self) -> None:
        """Release the actors and disconnect (a private local Ray stops)."""
        with self._conn_lock:
            if self._connected and not self._head_lost.is_set():
                import ray

                with self._lock:
                    replicas = [r for rs in self._pool.values() for r in rs]
                for replica in replicas:
                    self._kill(ray, replica)
            self._disconnect()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
