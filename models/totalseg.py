"""TotalSegmentator as a backend: its tasks, its weights, its Python API.

Everything about a task is read from the installed ``totalsegmentator``
package, never retyped: the selectable tasks, their modality and licence
flag (``totalsegmentator.registry``), their classes (``map_to_binary``), the
nnU-Net models each task runs and where their weights are published
(``map_tasks_config``).  This module holds

* the task catalogue (:func:`catalogue`, :func:`task_weights`,
  :func:`weights_sources`) that ``registry.d/totalsegmentator.yaml`` is
  generated from (``python -m medsegagent.models.totalseg generate``, see
  :mod:`medsegagent.models.totalseg_registry`);
* the home folder (``TOTALSEG_HOME_DIR``): :func:`prepare_home` turns
  TotalSegmentator's usage statistics off before any call, and
  :func:`download_task` installs a task's weights with TotalSegmentator's own
  downloader (what ``medsegagent models install`` calls);
* :class:`TotalSegmentatorModel`, the backend: the study's series goes to
  ``totalsegmentator.python_api.totalsegmentator`` as an in-memory NIfTI
  image and the label map comes back as registry labels.

What talks to the network (TotalSegmentator 2.18, read from its source):
``config.send_usage_stats`` after every prediction unless ``send_usage_stats``
is false in the home's ``config.json`` (:func:`prepare_home` sets it false);
``config.set_license_number`` validates a licence number online when one is
passed to ``totalsegmentator()`` (this backend never passes one: it writes
the number into ``config.json``, which TotalSegmentator checks offline);
``libs.download_pretrained_weights`` downloads missing weights (the backend
refuses to run a task whose weights are missing, so only :func:`download_task`
downloads); ``dicom_io`` fetches ``dcm2niix`` for DICOM input (the backend
hands over NIfTI images only).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsegagent.dicom.volume import Volume
from medsegagent.models.backends import (
    ModelLoadError,
    ModelSpec,
    Prediction,
    StudyImages,
    _wanted,
    find_nnunet_trainer,
    select_device,
)

log = logging.getLogger(__name__)

__all__ = [
    "LICENCE_ENV",
    "LICENCE_URL",
    "RELEASES_URL",
    "DownloadError",
    "LicenceRequiredError",
    "Task",
    "TotalSegmentatorModel",
    "WeightsSource",
    "catalogue",
    "download_task",
    "licence_number",
    "main",
    "missing_weights",
    "prepare_home",
    "results_dir",
    "task_weights",
    "weights_sources",
]

#: Where a licence for TotalSegmentator's licence-gated tasks is obtained (free for non-commercial use).
LICENCE_URL = "https://backend.totalsegmentator.com/license-academic/"
#: Name of that licence in the registry.
LICENCE_NAME = "TotalSegmentator licence (free for non-commercial use)"
#: Environment variable with a TotalSegmentator licence number (else ``options.licence_number``
#: or the ``license_number`` already in the home's ``config.json``).
LICENCE_ENV = "TOTALSEG_LICENSE_NUMBER"
#: Where ``libs.download_pretrained_weights`` fetches open weights from (a test checks it still does).
RELEASES_URL = "https://github.com/wasserth/TotalSegmentator/releases/download"
#: TotalSegmentator's internal test task: no released weights, never listed.
_INTERNAL_TASKS = frozenset({"test"})
#: The tasks whose classes can be asked for one by one (``roi_subset``); python_api accepts it for ``total*`` only.
_SUBSET_PREFIX = "total"
#: python_api also runs the vertebral body model (305) to refine this task.
_EXTRA_IDS: Mapping[str, tuple[int, ...]] = {"vertebrae_pp_refined": (305,)}


class DownloadError(RuntimeError):
    """TotalSegmentator's server answered, but a task's weights did not arrive whole."""


class LicenceRequiredError(ModelLoadError):
    """A licence-gated TotalSegmentator task without a licence number.

    Attributes
    ----------
    task : str
        The task.
    licence : str
        The licence's name.
    url : str
        Where the licence is obtained.
    """

    def __init__(self, task: str) -> None:
        self.task, self.licence, self.url = task, LICENCE_NAME, LICENCE_URL
        super().__init__(
            f"TotalSegmentator task {task!r} needs a licence ({LICENCE_NAME}): get a licence number at {LICENCE_URL},"
            f" then set {LICENCE_ENV} (or options.licence_number in the registry) before installing or running it"
        )


# --------------------------------------------------------------------------- the task catalogue


@dataclass(frozen=True)
class Task:
    """One selectable TotalSegmentator task, as the installed package describes it.

    Attributes
    ----------
    name : str
        Task name (``--task``).
    modality : str
        ``CT`` or ``MR``.
    gated : bool
        Weights only for licensees (``requires_license``).
    classes : dict
        Output value -> class name.
    weights : tuple of str
        nnU-Net result folders the task needs (:func:`task_weights`).
    fast_weights : tuple of str or None
        The same for ``fast=True``; ``None`` when the task has no fast mode.
    subsets : bool
        Classes can be asked for one by one (``roi_subset``).
    """

    name: str
    modality: str
    gated: bool
    classes: Mapping[int, str]
    weights: tuple[str, ...]
    fast_weights: tuple[str, ...] | None
    subsets: bool


@dataclass(frozen=True)
class WeightsSource:
    """Where one nnU-Net result folder of a task is published.

    Attributes
    ----------
    folder : str
        The folder under ``<home>/nnunet/results``.
    url : str or None
        The zip TotalSegmentator downloads (it unpacks into ``nnunet/results``);
        ``None`` for weights served to licensees only.
    """

    folder: str
    url: str | None


def _config(task: str, fast: bool) -> dict[str, Any]:
    """A task's configuration as ``python_api.get_task_config`` builds it (without its prints and licence exit)."""
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS

    if task not in TASK_CONFIGS:
        raise ValueError(f"unknown TotalSegmentator task {task!r}")
    raw = TASK_CONFIGS[task]
    config = dict(DEFAULT_CONFIG)
    if "sub_modes" in raw:
        config.update(raw["sub_modes"]["fast" if fast else "default"])
    else:
        if fast and raw.get("disallow_fast"):
            raise ValueError(f"TotalSegmentator task {task!r} has no fast mode")
        config.update({k: v for k, v in raw.items() if k not in ("disallow_fast", "commercial", "info_msg")})
    return config


def _task_ids(task: str, fast: bool) -> list[int | str]:
    """The nnU-Net task ids ``totalsegmentator(task=..., roi_subset=...)`` downloads, in order."""
    config = _config(task, fast)
    ids: list[int | str] = list(config["task_id"]) if isinstance(config["task_id"], list) else [config["task_id"]]
    ids += _EXTRA_IDS.get(task, ())
    crop = config.get("crop")
    # The rough segmentation python_api crops with (and that an roi_subset of a total task needs).
    if crop is not None or config.get("cascade") or task.startswith(_SUBSET_PREFIX):
        if config.get("crop_model"):
            ids += _task_ids(config["crop_model"], False)
        elif crop is not None and ({"body_trunc", "body_extremities"} & set(crop)):
            ids.append(300)
        elif task.endswith("_mr"):
            ids.append(852)
        else:
            ids.append(297 if config.get("robust_crop") else 298)
    return list(dict.fromkeys(ids))


def _folder(task_id: int | str) -> str:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    info = TASK_ID_WEIGHTS_CONFIGS[task_id]
    rel = info.get("rel_path")
    return f"{rel}/{info['foldername']}" if rel else str(info["foldername"])


def task_weights(task: str, fast: bool = False) -> tuple[str, ...]:
    """The nnU-Net result folders a task needs under ``<home>/nnunet/results``.

    Parameters
    ----------
    task : str
        A TotalSegmentator task.
    fast : bool
        The task's fast (3 mm) mode.

    Returns
    -------
    tuple of str
        The task's own models, then the models python_api runs first to crop
        the image (for ``total`` tasks: the one that ``roi_subset`` crops with).

    Raises
    ------
    ValueError
        Unknown task, or ``fast`` for a task without a fast mode.
    """
    return tuple(_folder(i) for i in _task_ids(task, fast))


def weights_sources(task: str, fast: bool = False) -> tuple[WeightsSource, ...]:
    """Where each of :func:`task_weights` is published (offline installs fetch these zips by hand)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    out = []
    for task_id in _task_ids(task, fast):
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        version = info.get("version")
        url = f"{RELEASES_URL}/{version}/{info['foldername']}.zip" if version and version != "TODO" else None
        out.append(WeightsSource(_folder(task_id), url))
    return tuple(out)


def catalogue() -> dict[str, Task]:
    """Every TotalSegmentator task the node can list, by name, in the package's order.

    The package's selectable tasks (``totalsegmentator.registry.TASKS``)
    except its internal test task and tasks whose weights were never
    released (no download location: ``total_highres_test`` in 2.18).
    """
    from totalsegmentator.map_tasks_config import TASK_CONFIGS
    from totalsegmentator.registry import TASKS, get_task_classes, requires_license, task_modality

    out: dict[str, Task] = {}
    for name in TASKS:
        if name in _INTERNAL_TASKS or name not in TASK_CONFIGS:
            continue
        gated = bool(requires_license(name))
        # Open weights come from a GitHub release; gated ones from the licence server (no URL, by design).
        if not gated and any(s.url is None for s in weights_sources(name)):
            continue
        has_fast = "fast" in TASK_CONFIGS[name].get("sub_modes", {})
        out[name] = Task(
            name=name,
            modality=task_modality(name),
            gated=gated,
            classes={int(k): str(v) for k, v in get_task_classes(name).items()},
            weights=task_weights(name),
            fast_weights=task_weights(name, True) if has_fast else None,
            subsets=name.startswith(_SUBSET_PREFIX),
        )
    return out


def package_version() -> str:
    """The installed TotalSegmentator version."""
    from totalsegmentator.registry import package_version as version

    return str(version() or "unknown")


# --------------------------------------------------------------------------- the home folder


def results_dir(home: Path) -> Path:
    """Where TotalSegmentator keeps nnU-Net result folders under its home (``nnunet/results``)."""
    return Path(home) / "nnunet" / "results"


def missing_weights(home: Path, task: str, fast: bool = False) -> list[str]:
    """The result folders of ``task`` not present under ``home`` (TotalSegmentator's own test: the folder exists)."""
    return [w for w in task_weights(task, fast) if not (results_dir(home) / w).exists()]


def licence_number(home: Path, configured: str | None = None) -> str | None:
    """The licence number to use: ``configured``, else ``$TOTALSEG_LICENSE_NUMBER``, else the home's ``config.json``."""
    if configured:
        return str(configured)
    if os.environ.get(LICENCE_ENV):
        return os.environ[LICENCE_ENV]
    return _read_config(Path(home) / "config.json").get("license_number") or None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent, or torn by a concurrent writer: rewritten whole by prepare_home
    return data if isinstance(data, dict) else {}


def prepare_home(home: Path, licence: str | None = None) -> Path:
    """Create TotalSegmentator's home with usage statistics off; store a licence number if given.

    TotalSegmentator reads ``config.json`` in its home before every run:
    ``send_usage_stats`` false stops the report it posts after each
    prediction, ``statistics_disclaimer_shown`` true silences its notice,
    and a ``license_number`` there unlocks gated tasks (checked offline).
    The file is rewritten atomically with the keys TotalSegmentator expects
    (its id and prediction counter are kept).

    Parameters
    ----------
    home : Path
        The home folder (``TOTALSEG_HOME_DIR``).
    licence : str, optional
        A licence number to store.

    Returns
    -------
    Path
        The ``config.json`` written.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = _read_config(path)
    wanted = {
        "totalseg_id": config.get("totalseg_id") or "totalseg_medsegagent",
        "prediction_counter": int(config.get("prediction_counter") or 0),
        "send_usage_stats": False,
        "statistics_disclaimer_shown": True,
    }
    if licence:
        wanted["license_number"] = str(licence)
    if all(config.get(k) == v for k, v in wanted.items()):
        return path
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=home)
    with os.fdopen(fd, "w") as handle:
        json.dump({**config, **wanted}, handle, indent=4)
    os.replace(tmp, path)
    return path


#: TotalSegmentator reads its home from the environment: one call (or download) at a time per process.
_HOME_LOCK = threading.RLock()


@contextlib.contextmanager
def _home(home: Path) -> Iterator[None]:
    """Point TotalSegmentator at ``home`` for the duration (and nothing else: its weights path follows the home)."""
    saved = {k: os.environ.get(k) for k in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH")}
    with _HOME_LOCK:
        os.environ["TOTALSEG_HOME_DIR"] = str(home)
        os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def download_task(home: Path, task: str, *, fast: bool = False, licence_number: str | None = None) -> None:
    """Install a task's weights into ``home`` with TotalSegmentator's own downloader.

    Statistics are turned off first (:func:`prepare_home`).  Folders already
    present are kept (TotalSegmentator downloads only what is missing).

    Parameters
    ----------
    home : Path
        The home folder (the registry location ``${MEDSEG_MODELS}/totalsegmentator``).
    task : str
        A task of :func:`catalogue`.
    fast : bool
        Install the fast mode's weights instead.
    licence_number : str, optional
        For a licence-gated task (else ``$TOTALSEG_LICENSE_NUMBER`` or the home's ``config.json``).

    Raises
    ------
    ValueError
        Unknown task, or no fast mode.
    LicenceRequiredError
        A gated task without a licence number.
    ConnectionError
        The server cannot be reached (the message names the zips for an offline install).
    DownloadError
        The server answered but the weights did not come (HTTP error, broken zip, licence refused).
    OSError
        Writing into ``home`` failed (disk full, permissions), as raised.
    """
    import requests
    from totalsegmentator.libs import download_pretrained_weights

    tasks = catalogue()
    if task not in tasks:
        raise ValueError(f"unknown TotalSegmentator task {task!r} (known: {', '.join(tasks)})")
    home = Path(home)
    number = _resolve_licence(home, task, tasks[task].gated, licence_number)
    prepare_home(home, number)
    with _home(home):
        for task_id, source in zip(_task_ids(task, fast), weights_sources(task, fast), strict=True):
            where = f"{source.url or LICENCE_URL} (unpacked into {results_dir(home)})"
            try:
                download_pretrained_weights(task_id)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise ConnectionError(
                    f"cannot reach TotalSegmentator's download server for {source.folder} ({exc});"
                    f" offline, fetch {where}"
                ) from exc
            except (requests.RequestException, zipfile.BadZipFile) as exc:
                raise DownloadError(
                    f"TotalSegmentator weights {source.folder} did not download ({exc}); fetch {where}"
                ) from exc
            except SystemExit as exc:  # its licence server refused the number
                raise DownloadError(
                    f"TotalSegmentator refused the download of {source.folder}: check the licence number"
                ) from exc
    missing = missing_weights(home, task, fast)
    if missing:
        raise DownloadError(f"TotalSegmentator task {task!r}: {', '.join(missing)} still missing after the download")


def _resolve_licence(home: Path, task: str, gated: bool, configured: str | None) -> str | None:
    number = licence_number(home, configured)
    if gated and not number:
        raise LicenceRequiredError(task)
    return number


# --------------------------------------------------------------------------- the backend


class TotalSegmentatorModel:
    """A TotalSegmentator task run through its Python API.

    ``location`` is TotalSegmentator's home (``TOTALSEG_HOME_DIR``, the
    registry's ``${MEDSEG_MODELS}/totalsegmentator``), shared by every task;
    the task's weights must be installed there (``medsegagent models install``).
    The primary series goes to ``totalsegmentator.python_api.totalsegmentator``
    as an in-memory NIfTI image (``ml=True``); TotalSegmentator reorients,
    resamples and crops by itself and returns a label map on the input grid,
    which is split into the registry's labels.  Registry label ->
    TotalSegmentator class: ``options.class_names`` (registry name -> class
    name), else the same name, else the registry's value.

    Options: ``task`` (``total``), ``fast`` (the 3 mm models), ``roi_subset``
    (``total`` tasks; default: the classes asked for), ``licence_number``
    (gated tasks; else ``$TOTALSEG_LICENSE_NUMBER`` or the home's
    ``config.json``), ``memory_mb`` (for the model cache).

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    runner : callable, optional
        Replaces ``totalsegmentator()`` (unit tests of the label mapping); the
        package's checks (task, licence, weights) are then skipped.
    class_map : dict, optional
        Class value -> name; replaces the task's classes (with ``runner``).

    Raises
    ------
    ModelLoadError
        TotalSegmentator is not installed, the task is unknown, gated without
        a licence number, or its weights are not installed.
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: str | None = None,
        *,
        runner: Callable[..., Any] | None = None,
        class_map: Mapping[int, str] | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.device = select_device(device or spec.device)
        self.task = str(spec.options.get("task", "total"))
        self.fast = bool(spec.options.get("fast", False))
        self.home = spec.path
        if runner is None:
            runner, class_map = self._load_package(class_map)
        if class_map is None:
            raise ModelLoadError(f"model {spec.name}: a stand-in runner needs its class_map")
        self.runner = runner
        self.class_map = {int(k): str(v) for k, v in class_map.items()}
        self.class_names, self.labels = self._map_labels(spec)

    def _load_package(self, class_map: Mapping[int, str] | None) -> tuple[Callable[..., Any], Mapping[int, str]]:
        """TotalSegmentator's runner and the task's classes, after the checks that need no network."""
        spec = self.spec
        try:
            from totalsegmentator.python_api import totalsegmentator
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec.name}: TotalSegmentator is not installed (pip install 'medsegagent[totalseg]'): {exc}"
            ) from exc
        tasks = catalogue()
        task = tasks.get(self.task)
        if task is None:
            raise ModelLoadError(f"model {spec.name}: unknown TotalSegmentator task {self.task!r}")
        if self.fast and task.fast_weights is None:
            raise ModelLoadError(f"model {spec.name}: TotalSegmentator task {self.task!r} has no fast mode")
        number = _resolve_licence(self.home, self.task, task.gated, spec.options.get("licence_number"))
        missing = missing_weights(self.home, self.task, self.fast)
        if missing:
            raise ModelLoadError(
                f"model {spec.name}: the weights of TotalSegmentator task {self.task!r} are not installed"
                f" (missing in {results_dir(self.home)}: {', '.join(missing)});"
                f" run `medsegagent models install {spec.name}`"
            )
        prepare_home(self.home, number)
        for trainer in _installed_trainers(self.home, task_weights(self.task, self.fast)):
            _register_trainer(trainer)
        return totalsegmentator, class_map or task.classes

    def _map_labels(self, spec: ModelSpec) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
        by_name = {name: value for value, name in self.class_map.items()}
        explicit = dict(spec.options.get("class_names") or {})
        names: dict[str, str] = {}
        values: dict[str, tuple[int, ...]] = {}
        for label, registry_values in spec.labels.items():
            if label in explicit:
                if explicit[label] not in by_name:
                    raise ModelLoadError(
                        f"model {spec.name}: options.class_names maps {label!r} to {explicit[label]!r},"
                        f" which task {self.task!r} does not have"
                    )
                names[label], values[label] = explicit[label], (by_name[explicit[label]],)
            elif label in by_name:
                names[label], values[label] = label, (by_name[label],)
            elif all(v in self.class_map for v in registry_values):
                names[label] = "+".join(self.class_map[v] for v in registry_values)
                values[label] = registry_values
            else:
                raise ModelLoadError(
                    f"model {spec.name}: registry label {label!r} is not a class of TotalSegmentator task"
                    f" {self.task!r}; map it with options.class_names"
                )
        return names, values

    @property
    def memory_bytes(self) -> int:
        """TotalSegmentator loads its networks per call; ``options.memory_mb`` if the registry says."""
        return int(float(self.spec.options.get("memory_mb", 0)) * 2**20)

    def _arguments(self, wanted: Sequence[str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "task": self.task,
            "ml": True,
            "quiet": True,
            "fast": self.fast,
            "device": _ts_device(self.device),
            # One process each for resampling and export: the node runs models side by side.
            "nr_thr_resamp": 1,
            "nr_thr_saving": 1,
        }
        subset = self.spec.options.get("roi_subset")
        if subset is None and self.task.startswith(_SUBSET_PREFIX):
            subset = sorted({n for label in wanted for n in self.class_names[label].split("+")})
        if subset:
            kwargs["roi_subset"] = list(subset)
        return kwargs

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """Run the task on the primary series; masks come back on its grid."""
        import nibabel as nib

        images = StudyImages.of(images)
        wanted = _wanted(self.name, self.labels, labels)
        volume = images.primary
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        image = nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.geometry.nifti_affine())
        kwargs = self._arguments(wanted)
        seconds["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = self._run(image, kwargs)
        seconds["inference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        label_map = np.asarray(result.dataobj).transpose(2, 1, 0)
        if label_map.shape != volume.geometry.shape:
            raise ValueError(f"model {self.name}: TotalSegmentator returned {label_map.shape}, expected the input grid")
        maps = {label: np.isin(label_map, self.labels[label]).astype(np.uint8) for label in wanted}
        seconds["postprocess"] = time.perf_counter() - t0
        return Prediction(
            self.name,
            volume.geometry,
            volume.geometry,
            maps,
            interpolation="nearest",
            seconds=seconds,
            device=str(self.device),
        )

    def _run(self, image: Any, kwargs: dict[str, Any]) -> Any:
        """One call of the runner with the home set and statistics off; its prints go to the log."""
        chatter = io.StringIO()
        with _home(self.home), contextlib.redirect_stdout(chatter):
            prepare_home(self.home)  # again: an operator may have run the CLI on this home meanwhile
            try:
                return self.runner(input=image, output=None, **kwargs)
            except SystemExit as exc:  # TotalSegmentator exits on licence problems
                raise ModelLoadError(
                    f"model {self.name}: TotalSegmentator stopped: {chatter.getvalue().strip()}"
                ) from exc
            finally:
                if chatter.getvalue().strip():
                    log.debug("TotalSegmentator (%s): %s", self.name, chatter.getvalue().strip())


def _installed_trainers(home: Path, weights: Sequence[str]) -> list[str]:
    """The nnU-Net trainers of installed result folders (``<trainer>__<plans>__<configuration>``)."""
    found = {
        sub.name.split("__")[0]
        for folder in weights
        if (results_dir(home) / folder).is_dir()
        for sub in (results_dir(home) / folder).iterdir()
        if sub.is_dir() and sub.name.count("__") == 2
    }
    return sorted(found)


def _register_trainer(name: str) -> None:
    """Make sure TotalSegmentator finds nnU-Net trainer ``name`` (its own table, see :func:`find_nnunet_trainer`).

    TotalSegmentator looks in ``totalsegmentator.nnunet.custom_trainers``
    before nnU-Net's own walk, which fails beside a CPU torch for most of its
    trainers.
    """
    from totalsegmentator import nnunet as ts_nnunet

    if name not in ts_nnunet.custom_trainers:
        ts_nnunet.custom_trainers[name] = find_nnunet_trainer(name)


def _ts_device(device: Any) -> str:
    """python_api's device string for a torch device (``gpu``, ``gpu:N``, ``cpu``, ``mps``)."""
    if device.type == "cuda":
        return "gpu" if device.index is None else f"gpu:{device.index}"
    return str(device.type)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medsegagent.models.totalseg generate|check``: the registry file from the installed package."""
    import argparse

    from medsegagent.models import totalseg_registry

    parser = argparse.ArgumentParser(prog="python -m medsegagent.models.totalseg", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write registry.d/totalsegmentator.yaml from the installed package")
    chk = sub.add_parser("check", help="exit 1 when the committed registry differs from a fresh generation")
    for p in (gen, chk):
        p.add_argument("--registry", type=Path, help="registry.yaml (default: the packaged one)")
    args = parser.parse_args(argv)
    registry = args.registry or totalseg_registry.default_registry_file()
    problems = totalseg_registry.check(registry, write=args.command == "generate")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
