"""Running the matched models of a plan: concurrently, cached, isolated.

An :class:`Executor` takes :class:`ModelTask` s (a :class:`~medsegagent.models.backends.ModelSpec`
plus the labels the plan needs from it) and the study's images, and returns
one :class:`TaskResult` per model: a prediction, or the reason it failed or
timed out.  A failing model fails only its own task; the caller drops it from
the ensemble of its targets and says why in the report.  (A *task* is one
model on one study; the node's *job*, :class:`medsegagent.node.jobs.Job`, is
the whole study.)

:class:`InProcessExecutor` is the default: a thread per task (at most
``workers`` at a time) sharing one :class:`ModelCache` -- loaded models are
kept, least recently used first out, within a memory budget.  Tasks and images
are plain picklable data and predictions stay on each model's small grid, so
a Ray executor implements the same ``run`` by shipping tasks to actors that
hold their own caches (``ray.init(address=...)``), with no change to callers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import ModelSpec, Prediction, SegmentationModel, StudyImages, load_model

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "Executor",
    "InProcessExecutor",
    "ModelCache",
    "ModelTask",
    "TaskResult",
    "TaskStatus",
]

#: Model memory kept loaded by default (MiB); ``MEDSEGAGENT_MODEL_CACHE_MB`` overrides it.
DEFAULT_MEMORY_BUDGET_MB = 4096.0


@dataclass(frozen=True)
class ModelTask:
    """One model to run on one study.

    Attributes
    ----------
    spec : ModelSpec
        The model.
    labels : tuple of str
        Registry labels the plan needs from it (empty: all it has).
    timeout_s : float or None
        Wall-time limit of the prediction (loading excluded); overrides the executor's.
    """

    spec: ModelSpec
    labels: tuple[str, ...] = ()
    timeout_s: float | None = None

    @property
    def name(self) -> str:
        """The model's name."""
        return self.spec.name


class TaskStatus(StrEnum):
    """How one model's task ended (the report's ``models[].status`` says ``ok`` or ``failed``)."""

    OK = "ok"
    FAILED = "failed"
    #: Over its wall-time limit; its late answer, if any, is discarded.
    TIMEOUT = "timeout"


@dataclass
class TaskResult:
    """What became of one task.

    Attributes
    ----------
    model : str
        Model name.
    status : TaskStatus
        Ok, failed or timed out.
    prediction : Prediction or None
        The output when ``ok``.
    error : str or None
        Why it did not succeed.
    seconds : dict
        ``load`` (0 when the model was cached) and ``run`` wall time.
    """

    model: str
    status: TaskStatus
    prediction: Prediction | None = None
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the model produced a prediction."""
        return self.status is TaskStatus.OK


@runtime_checkable
class Executor(Protocol):
    """Runs model tasks on a study; in-process by default, a cluster when configured."""

    def run(self, tasks: Sequence[ModelTask], images: Volume | StudyImages) -> dict[str, TaskResult]:
        """Run every task and return its result by model name (never raises for one model's failure)."""
        ...

    def close(self) -> None:
        """Release workers and loaded models."""
        ...


class ModelCache:
    """Loaded models by name, least recently used out first, within a memory budget.

    Parameters
    ----------
    device : str
        Device for models whose registry reference says ``auto``.
    memory_budget_mb : float, optional
        Memory the loaded models may hold together (their ``memory_bytes``);
        default ``$MEDSEGAGENT_MODEL_CACHE_MB`` or :data:`DEFAULT_MEMORY_BUDGET_MB`.
        A model larger than the budget is still used, just not kept.
    loader : callable
        ``(spec, device) -> model``; :func:`~medsegagent.models.backends.load_model` by default.
    """

    def __init__(
        self,
        device: str = "auto",
        memory_budget_mb: float | None = None,
        loader: Callable[[ModelSpec, str | None], SegmentationModel] = load_model,
    ) -> None:
        if memory_budget_mb is None:
            memory_budget_mb = float(os.environ.get("MEDSEGAGENT_MODEL_CACHE_MB", DEFAULT_MEMORY_BUDGET_MB))
        if memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0, got {memory_budget_mb}")
        self.device = device
        self.budget_bytes = int(memory_budget_mb * 2**20)
        self._loader = loader
        self._models: OrderedDict[str, SegmentationModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0  # how many times a model was loaded (for tests and reports)

    def _device_for(self, spec: ModelSpec) -> str:
        return spec.device if spec.device != "auto" else self.device

    def _key(self, spec: ModelSpec) -> str:
        return f"{spec.name}@{self._device_for(spec)}"

    def get(self, spec: ModelSpec) -> tuple[SegmentationModel, bool]:
        """The loaded model for ``spec`` and whether it had to be loaded now.

        Concurrent requests for one model load it once; others wait for it.
        """
        key = self._key(spec)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model, False
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                model = self._models.get(key)
                if model is not None:
                    self._models.move_to_end(key)
                    return model, False
            model = self._loader(spec, self._device_for(spec))
            with self._lock:
                self.loads += 1
                self._models[key] = model
                self._models.move_to_end(key)
                self._evict(keep=key)
                self._loading.pop(key, None)
        return model, True

    def _evict(self, keep: str) -> None:
        """Make room for ``keep``: least recently used models out first (lock held)."""
        if int(getattr(self._models[keep], "memory_bytes", 0)) > self.budget_bytes:
            # Evicting everything would not make it fit: use it for this task, keep the others.
            log.warning("model %s alone exceeds the cache budget; it will not be kept", keep)
            del self._models[keep]
            return
        while self.used_bytes > self.budget_bytes:
            oldest = next(k for k in self._models if k != keep)
            log.info("model cache: evicting %s to stay within %.0f MiB", oldest, self.budget_bytes / 2**20)
            del self._models[oldest]

    @property
    def used_bytes(self) -> int:
        """Memory held by the cached models."""
        return sum(int(getattr(m, "memory_bytes", 0)) for m in self._models.values())

    @property
    def names(self) -> list[str]:
        """Cached model names, least recently used first."""
        with self._lock:
            return [k.rsplit("@", 1)[0] for k in self._models]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self._models)

    def clear(self) -> None:
        """Forget every loaded model."""
        with self._lock:
            self._models.clear()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


class InProcessExecutor:
    """Runs model tasks in threads of this process, sharing a :class:`ModelCache`.

    Parameters
    ----------
    cache : ModelCache, optional
        Loaded models (shared across studies by the node); a new one by default.
    workers : int
        Models run at the same time.
    timeout_s : float, optional
        Default wall-time limit of a prediction (loading excluded).  A model that exceeds it is
        reported as ``timeout`` and its result discarded; its thread (a daemon)
        finishes in the background, because Python threads cannot be killed --
        use a process or Ray executor where hung models must be reclaimed.
    """

    def __init__(self, cache: ModelCache | None = None, *, workers: int = 2, timeout_s: float | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cache = cache if cache is not None else ModelCache()
        self.workers = workers
        self.timeout_s = timeout_s

    def run(self, tasks: Sequence[ModelTask], images: Volume | StudyImages) -> dict[str, TaskResult]:
        """Run ``tasks`` concurrently; results in task order, keyed by model name."""
        images = StudyImages.of(images)
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"one task per model, got {names}")
        done: queue.Queue[TaskResult] = queue.Queue()
        started: dict[str, float] = {}  # model -> when its prediction began
        lock = threading.Lock()

        def work(task: ModelTask) -> None:
            seconds: dict[str, float] = {}
            try:
                t0 = time.perf_counter()
                model, loaded = self.cache.get(task.spec)
                seconds["load"] = time.perf_counter() - t0 if loaded else 0.0
                with lock:
                    # The clock runs from the prediction: a cold first load (imports, weights) is not a hang.
                    started[task.name] = time.monotonic()
                t0 = time.perf_counter()
                prediction = model.predict(images, task.labels or None)
                seconds["run"] = time.perf_counter() - t0
                done.put(TaskResult(task.name, TaskStatus.OK, prediction, None, seconds))
            except Exception as exc:  # one model's failure must not fail the study
                log.error("model %s failed: %s", task.name, _describe(exc), exc_info=log.isEnabledFor(logging.DEBUG))
                done.put(TaskResult(task.name, TaskStatus.FAILED, None, _describe(exc), seconds))

        limits = {task.name: task.timeout_s if task.timeout_s is not None else self.timeout_s for task in tasks}
        waiting = list(tasks)
        active: set[str] = set()
        results: dict[str, TaskResult] = {}
        while len(results) < len(tasks):
            # The coordinator hands out the worker slots, so a timed-out model (whose thread cannot be
            # stopped) gives its slot back instead of blocking the tasks behind it.
            while waiting and len(active) < self.workers:
                task = waiting.pop(0)
                active.add(task.name)
                threading.Thread(target=work, args=(task,), name=f"model-{task.name}", daemon=True).start()
            try:
                result = done.get(timeout=0.05)
            except queue.Empty:
                now = time.monotonic()
                with lock:
                    overdue = [
                        name
                        for name in active
                        if name in started and limits[name] is not None and now - started[name] > limits[name]
                    ]
                for name in overdue:
                    log.error("model %s timed out after %.1f s", name, limits[name])
                    results[name] = TaskResult(name, TaskStatus.TIMEOUT, None, f"timed out after {limits[name]:g} s")
                    active.discard(name)
                continue
            if result.model not in results:  # a late answer from a timed-out model is discarded
                results[result.model] = result
                active.discard(result.model)
        return {name: results[name] for name in names}

    def close(self) -> None:
        """Drop the cached models."""
        self.cache.clear()

    def __enter__(self) -> InProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
