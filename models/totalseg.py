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
  :func:`download_task` installs a task's weights (what ``medsegagent models
  install`` calls): each result folder is fetched and unpacked in a staging
  folder and moved into place whole (:func:`result_folder_complete`);
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
refuses to run a task whose weights are missing; :func:`download_task` calls
it for licence-gated weights only, and fetches open ones itself);
``dicom_io`` fetches ``dcm2niix`` for DICOM input (the backend hands over
NIfTI images only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path, PurePosixPath
from types import MappingProxyType
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
    quiet_stdout,
    select_device,
)
from medsegagent.models.catalogue import _fsync_dir, _fsync_tree
from medsegagent.models.registry import nnunet_result_complete

log = logging.getLogger(__name__)

__all__ = [
    "LICENCE_ENV",
    "LICENCE_NAME",
    "LICENCE_URL",
    "RELEASES_URL",
    "DownloadError",
    "LicenceRequiredError",
    "Task",
    "TotalSegmentatorModel",
    "WeightsSource",
    "catalogue",
    "crop_classes",
    "download_task",
    "licence_number",
    "main",
    "missing_weights",
    "package_version",
    "prepare_home",
    "result_folder_complete",
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
#: Seconds to connect to the weights server, and to wait for each piece of a zip, before giving up.
_DOWNLOAD_TIMEOUT = (30.0, 120.0)
#: A staging folder this old was left by an install that was killed: the next install removes it.
_STALE_STAGING_S = 24 * 3600.0


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


def _sources(task: str, fast: bool) -> list[tuple[int | str, WeightsSource]]:
    """Each nnU-Net task id of :func:`_task_ids` with where its result folder is published."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    out = []
    for task_id in _task_ids(task, fast):
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        version = info.get("version")
        url = f"{RELEASES_URL}/{version}/{info['foldername']}.zip" if version and version != "TODO" else None
        out.append((task_id, WeightsSource(_folder(task_id), url)))
    return out


def weights_sources(task: str, fast: bool = False) -> tuple[WeightsSource, ...]:
    """Where each of :func:`task_weights` is published (offline installs fetch these zips by hand)."""
    return tuple(source for _, source in _sources(task, fast))


@lru_cache(maxsize=1)
def catalogue() -> Mapping[str, Task]:
    """Every TotalSegmentator task the node can list, by name, in the package's order (read once, read-only).

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
        sources = weights_sources(name)
        # Open weights come from a GitHub release; gated ones from the licence server (no URL, by design).
        if not gated and any(s.url is None for s in sources):
            continue
        has_fast = "fast" in TASK_CONFIGS[name].get("sub_modes", {})
        out[name] = Task(
            name=name,
            modality=task_modality(name),
            gated=gated,
            classes={int(k): str(v) for k, v in get_task_classes(name).items()},
            weights=tuple(s.folder for s in sources),
            fast_weights=task_weights(name, True) if has_fast else None,
            subsets=name.startswith(_SUBSET_PREFIX),
        )
    return MappingProxyType(out)


@cache
def crop_classes(task: str) -> frozenset[str]:
    """The class names ``roi_subset`` may hold for a ``total`` task: those of the rough model python_api crops with.

    python_api segments the image with a rough model first and crops to the
    ``roi_subset`` classes in that model's class map: ``total_mr``'s for MR
    tasks, else ``total``'s -- also for ``total_v3``, whose ``vertebrae_L6``
    ``total`` lacks (python_api then fails with a ``KeyError``).
    """
    from totalsegmentator.map_to_binary import class_map

    config = _config(task, False)
    crop_task = config.get("crop_model") or (
        "total_mr" if task.endswith("_mr") or config.get("modality") == "mr" else "total"
    )
    return frozenset(class_map[crop_task].values())


def package_version() -> str:
    """The installed TotalSegmentator version."""
    from totalsegmentator.registry import package_version as version

    return str(version() or "unknown")


# --------------------------------------------------------------------------- the home folder


def results_dir(home: Path) -> Path:
    """Where TotalSegmentator keeps nnU-Net result folders under its home (``nnunet/results``)."""
    return Path(home) / "nnunet" / "results"


#: Whether a result folder is whole (one test for the registry's ``installed`` and this module).
result_folder_complete = nnunet_result_complete


def missing_weights(home: Path, task: str, fast: bool = False) -> list[str]:
    """The result folders of ``task`` not complete under ``home`` (:func:`result_folder_complete`)."""
    return [w for w in task_weights(task, fast) if not result_folder_complete(results_dir(home) / w)]


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


#: TotalSegmentator reads its home from the environment and rewrites ``config.json`` in place (not atomically)
#: after each prediction: runs, gated downloads and :func:`prepare_home` take turns per process.
_HOME_LOCK = threading.RLock()


def prepare_home(home: Path, licence: str | None = None) -> Path:
    """Create TotalSegmentator's home with usage statistics off; store a licence number if given.

    TotalSegmentator reads ``config.json`` in its home before every run:
    ``send_usage_stats`` false stops the report it posts after each
    prediction, ``statistics_disclaimer_shown`` true silences its notice,
    and a ``license_number`` there unlocks gated tasks (checked offline).
    The file is rewritten atomically with the keys TotalSegmentator expects
    (its id, prediction counter and licence number are kept), under the lock
    that TotalSegmentator's runs hold, so that a run's own rewrite of the file
    is never read half written.

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
    with _HOME_LOCK:
        return _write_config(path, licence)


def _write_config(path: Path, licence: str | None) -> Path:
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
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump({**config, **wanted}, handle, indent=4)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _home(home: Path, weights: Path | None = None) -> Iterator[None]:
    """Point TotalSegmentator at ``home`` for the duration (its weights under the home, else under ``weights``)."""
    saved = {k: os.environ.get(k) for k in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH")}
    with _HOME_LOCK:
        os.environ["TOTALSEG_HOME_DIR"] = str(home)
        if weights is None:
            os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
        else:
            os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def download_task(home: Path, task: str, *, fast: bool = False, licence_number: str | None = None) -> None:
    """Install a task's weights into ``home``, each result folder whole or not at all.

    Statistics are turned off first (:func:`prepare_home`).  Result folders
    already complete are kept; each other one is fetched into a staging
    folder in ``home`` -- open weights by a download with timeouts, gated
    ones by TotalSegmentator's licence-server downloader --, unpacked there,
    checked with :func:`result_folder_complete`, synced to disk and moved
    into ``nnunet/results`` with one rename.  The staging folder goes on any
    error, so a failed or interrupted install leaves no folder that counts as
    installed (the staging folder of a killed install is removed by the
    next install a day later).  TotalSegmentator publishes no hashes of its
    zips, so nothing is compared with one.

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
        The server cannot be reached or stalls (the message names the zips for an offline install).
    DownloadError
        The server answered but the weights did not come (HTTP error, broken or incomplete zip, licence refused).
    OSError
        Writing into ``home`` failed (disk full, permissions), as raised.
    """
    tasks = catalogue()
    if task not in tasks:
        raise ValueError(f"unknown TotalSegmentator task {task!r} (known: {', '.join(tasks)})")
    home = Path(home)
    number = _resolve_licence(home, task, tasks[task].gated, licence_number)
    prepare_home(home, number)
    results_dir(home).mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(home)
    for task_id, source in _sources(task, fast):
        if not result_folder_complete(results_dir(home) / source.folder):
            _install_folder(home, task_id, source)
    missing = missing_weights(home, task, fast)
    if missing:
        raise DownloadError(f"TotalSegmentator task {task!r}: {', '.join(missing)} still missing after the download")


def _install_folder(home: Path, task_id: int | str, source: WeightsSource) -> None:
    """Fetch one result folder into a staging folder in ``home``, then move it into ``nnunet/results`` whole."""
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=home))
    try:
        unpacked = staging / "unpacked"
        unpacked.mkdir()
        _fetch(home, task_id, source, staging, unpacked)
        fetched = unpacked / source.folder
        if not result_folder_complete(fetched):
            raise DownloadError(
                f"TotalSegmentator weights {source.folder} from {source.url or LICENCE_URL} are not a complete"
                " nnU-Net result folder (plans.json, dataset.json, fold_*/checkpoint_final.pth)"
            )
        _fsync_tree(fetched)
        target = results_dir(home) / source.folder
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # incomplete (an interrupted unzip): set aside, removed with the staging folder
            os.replace(target, staging / "incomplete")
        os.replace(fetched, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(home: Path) -> None:
    """Remove staging folders of installs killed mid-way (untouched for :data:`_STALE_STAGING_S`)."""
    for staging in home.glob(".download-*"):
        with contextlib.suppress(OSError):
            if time.time() - staging.stat().st_mtime > _STALE_STAGING_S:
                log.info("removing %s, left by an interrupted TotalSegmentator download", staging)
                shutil.rmtree(staging)


def _fetch(home: Path, task_id: int | str, source: WeightsSource, staging: Path, unpacked: Path) -> None:
    """Download and unpack one result folder under ``unpacked``; failures as :func:`download_task` raises them."""
    import requests

    where = f"{source.url or LICENCE_URL} (unpacked into {results_dir(home)})"
    try:
        if source.url:
            archive = staging / "weights.zip"
            _stream(source.url, archive)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(unpacked / PurePosixPath(source.folder).parent)
        else:  # licence-gated: TotalSegmentator's licence-server protocol, unpacked into the staging folder
            from totalsegmentator.libs import download_pretrained_weights

            with _home(home, weights=unpacked), quiet_stdout():
                download_pretrained_weights(task_id)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ConnectionError(
            f"cannot reach TotalSegmentator's download server for {source.folder} ({exc}); offline, fetch {where}"
        ) from exc
    except (requests.RequestException, zipfile.BadZipFile) as exc:
        raise DownloadError(
            f"TotalSegmentator weights {source.folder} did not download ({exc}); fetch {where}"
        ) from exc
    except SystemExit as exc:  # its licence server refused the number
        raise DownloadError(
            f"TotalSegmentator refused the download of {source.folder}: check the licence number"
        ) from exc


def _stream(url: str, target: Path) -> None:
    """Download ``url`` into ``target`` (timeouts: :data:`_DOWNLOAD_TIMEOUT`)."""
    import requests

    with requests.get(url, stream=True, timeout=_DOWNLOAD_TIMEOUT) as response, target.open("wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(chunk_size=1 << 20):
            out.write(chunk)


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
    name), else the same name (never the registry's value: TotalSegmentator
    numbers its classes differently from the catalogue).

    Options: ``task`` (``total``), ``fast`` (the 3 mm models), ``weights``
    (the task's result folders, :func:`task_weights` of ``task`` and
    ``fast``), ``roi_subset`` (``total`` tasks; default: the classes asked
    for, when the rough model python_api crops with has them all, see
    :func:`crop_classes`), ``licence_number`` (gated tasks; else
    ``$TOTALSEG_LICENSE_NUMBER`` or the home's ``config.json``),
    ``memory_mb`` (for the model cache).

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
        TotalSegmentator is not installed, the task is unknown, ``options``
        do not fit it (fast mode, weights, roi_subset, class names), gated
        without a licence number, its weights are not installed, or nnU-Net
        has no trainer they name.
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
        self.roi_subset = self._roi_subset(spec.options.get("roi_subset"))

    def _load_package(self, class_map: Mapping[int, str] | None) -> tuple[Callable[..., Any], Mapping[int, str]]:
        """TotalSegmentator's runner and the task's classes, after the checks that need no network."""
        spec = self.spec
        try:
            from totalsegmentator.python_api import totalsegmentator
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec.name}: TotalSegmentator is not installed (pip install 'medsegagent[totalseg]'): {exc}"
            ) from exc
        task = self._check_task()
        number = _resolve_licence(self.home, self.task, task.gated, spec.options.get("licence_number"))
        missing = missing_weights(self.home, self.task, self.fast)
        if missing:
            raise ModelLoadError(
                f"model {spec.name}: the weights of TotalSegmentator task {self.task!r} are not installed"
                f" (missing or incomplete in {results_dir(self.home)}: {', '.join(missing)});"
                f" run `medsegagent models install {spec.name}`"
            )
        prepare_home(self.home, number)
        for trainer in _installed_trainers(self.home, task_weights(self.task, self.fast)):
            try:
                _register_trainer(trainer)
            except ModelLoadError as exc:
                raise ModelLoadError(f"model {spec.name}: TotalSegmentator task {self.task!r}: {exc}") from exc
        return totalsegmentator, class_map or task.classes

    def _check_task(self) -> Task:
        """The task of ``options.task``, with ``options.fast`` and ``options.weights`` checked against it."""
        spec = self.spec
        task = catalogue().get(self.task)
        if task is None:
            raise ModelLoadError(f"model {spec.name}: unknown TotalSegmentator task {self.task!r}")
        expected = task.fast_weights if self.fast else task.weights
        if expected is None:
            raise ModelLoadError(f"model {spec.name}: TotalSegmentator task {self.task!r} has no fast mode")
        configured = spec.options.get("weights")
        if configured is not None and tuple(configured) != expected:
            mode = " with fast: true" if self.fast else ""
            raise ModelLoadError(
                f"model {spec.name}: options.weights {list(configured)} are not the result folders TotalSegmentator"
                f" task {self.task!r}{mode} opens; set options.weights to {list(expected)}"
            )
        return task

    def _map_labels(self, spec: ModelSpec) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
        """Registry label -> class name and -> output value: by ``options.class_names``, else by the same name."""
        by_name = {name: value for value, name in self.class_map.items()}
        explicit = dict(spec.options.get("class_names") or {})
        names: dict[str, str] = {}
        for label in spec.labels:
            name = str(explicit.get(label, label))
            if name in by_name:
                names[label] = name
            elif label in explicit:
                raise ModelLoadError(
                    f"model {spec.name}: options.class_names maps {label!r} to {name!r},"
                    f" which TotalSegmentator task {self.task!r} does not have"
                )
            else:
                raise ModelLoadError(
                    f"model {spec.name}: registry label {label!r} is not a class of TotalSegmentator task"
                    f" {self.task!r}; map it with options.class_names"
                )
        return names, {label: (by_name[name],) for label, name in names.items()}

    def _roi_subset(self, configured: Any) -> list[str] | None:
        """``options.roi_subset``, checked: python_api crops to these classes with its rough model."""
        if configured is None:
            return None
        if not self.task.startswith(_SUBSET_PREFIX) or not isinstance(configured, list):
            raise ModelLoadError(
                f"model {self.name}: options.roi_subset is a list of class names, for `total` tasks only"
            )
        unknown = sorted(set(map(str, configured)) - crop_classes(self.task))
        if unknown:
            raise ModelLoadError(
                f"model {self.name}: options.roi_subset {unknown} are not classes of the model TotalSegmentator"
                f" crops task {self.task!r} with; leave them out (or drop roi_subset to run the whole task)"
            )
        return [str(name) for name in configured]

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
        subset = self.roi_subset
        if subset is None and self.task.startswith(_SUBSET_PREFIX):
            subset = sorted({self.class_names[label] for label in wanted})
            if not set(subset) <= crop_classes(self.task):
                subset = None  # the rough model lacks one (total_v3's vertebrae_L6): run the whole task
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
        self._check_grid(label_map.shape, result.affine, volume.geometry.shape, image.affine)
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

    def _check_grid(self, shape: Sequence[int], affine: Any, expected_shape: Sequence[int], expected: Any) -> None:
        """TotalSegmentator's label map must lie on the input grid: same shape, same affine (to 1e-3 mm)."""
        if tuple(shape) != tuple(expected_shape):
            raise ValueError(f"model {self.name}: TotalSegmentator returned {tuple(shape)}, expected the input grid")
        if affine is None or not np.allclose(np.asarray(affine), np.asarray(expected), atol=1e-3):
            raise ValueError(
                f"model {self.name}: TotalSegmentator returned its label map with affine\n{affine}\n"
                f"not the input's\n{expected}"
            )

    def _run(self, image: Any, kwargs: dict[str, Any]) -> Any:
        """One call of the runner with the home set and statistics off; its prints go to the debug log."""
        with _home(self.home), quiet_stdout():
            prepare_home(self.home)  # again: an operator may have run the CLI on this home meanwhile
            try:
                return self.runner(input=image, output=None, **kwargs)
            except SystemExit as exc:  # TotalSegmentator exits on licence problems
                raise ModelLoadError(
                    f"model {self.name}: TotalSegmentator stopped (exit {exc.code!r}): it refuses the licence number"
                    f" in {self.home / 'config.json'} (it wants 18 characters; check {LICENCE_ENV} or"
                    " options.licence_number); its messages are in the debug log"
                ) from exc


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
    trainers.  The table is the cache: a trainer is looked up once per process.

    Raises
    ------
    ModelLoadError
        No importable module of nnU-Net (or TotalSegmentator) has the trainer; the message names it.
    """
    from totalsegmentator import nnunet as ts_nnunet

    if name not in ts_nnunet.custom_trainers:
        found = find_nnunet_trainer(name)
        if not isinstance(found, type):  # nnU-Net's own lookup answers None in some versions
            raise ModelLoadError(f"nnU-Net trainer {name!r} is not in any importable module of nnunetv2")
        ts_nnunet.custom_trainers[name] = found


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
