"""Model backends behind one small interface.

A backend loads a model once and predicts per-label probabilities on the
source grid of a :class:`~medsegagent.dicom.volume.Volume`.  This module has
the interface and the MONAI bundle backend (what the demo models use); the
other backends of the registry schema (nnU-Net v2, TotalSegmentator,
TorchScript) plug in through :data:`BACKENDS`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from medsegagent.dicom.volume import Volume
from medsegagent.models.resample import foreground_mask, model_grid, resample

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded (missing files, bad config)."""


@dataclass
class Prediction:
    """Output of one model on one volume.

    Attributes
    ----------
    model : str
        Model name.
    probabilities : dict
        Registry label name -> float32 probability map on the source grid.
    seconds : dict
        Wall time per step (``preprocess``, ``inference``, ``postprocess``).
    """

    model: str
    probabilities: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)


class SegmentationModel(Protocol):
    """What the executor needs from a loaded model."""

    name: str
    labels: dict[str, int]

    def predict(self, volume: Volume) -> Prediction:
        """Per-label probabilities on ``volume``'s grid."""
        ...


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when asked for or available under ``auto``, else ``cpu``."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def normalise_intensity(array: np.ndarray, spec: dict) -> np.ndarray:
    """Apply a bundle's intensity normalisation.

    Parameters
    ----------
    array : numpy.ndarray
        Real-world values (HU for CT).
    spec : dict
        ``{"kind": "ct_window", "window": [low, high]}`` (scaled to 0..1),
        ``{"kind": "zscore"}`` (over voxels above the 5th percentile, so air
        does not dominate), ``{"kind": "minmax"}`` or ``{"kind": "none"}``.
    """
    kind = spec.get("kind", "none")
    if kind == "ct_window":
        low, high = spec["window"]
        return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if kind == "zscore":
        foreground = array[array > np.percentile(array, 5)]
        sample = foreground if foreground.size else array
        return ((array - sample.mean()) / max(float(sample.std()), 1e-6)).astype(np.float32)
    if kind == "minmax":
        low, high = float(array.min()), float(array.max())
        return ((array - low) / max(high - low, 1e-6)).astype(np.float32)
    if kind == "none":
        return array.astype(np.float32)
    raise ValueError(f"unknown intensity normalisation {kind!r}")


class MonaiBundleModel:
    """A MONAI bundle: ``configs/inference.json`` + ``models/model.pt``.

    The bundle's ``inference.json`` holds ``network_def`` (instantiated with
    MONAI's :class:`~monai.bundle.ConfigParser`) and a ``medsegagent``
    section with the preprocessing the weights were trained with
    (``size`` of the axis-aligned model grid, ``crop_foreground`` to cover
    only the patient, ``intensity``) and the output ``labels`` (name ->
    channel).
    """

    def __init__(self, name: str, path: Path, device: str = "auto") -> None:
        from monai.bundle import ConfigParser  # heavy import, only when a model is loaded

        self.name = name
        self.path = Path(path)
        config_file = self.path / "configs" / "inference.json"
        weights = self.path / "models" / "model.pt"
        for required in (config_file, weights):
            if not required.is_file():
                raise ModelLoadError(f"model {name}: {required} is missing")
        config = json.loads(config_file.read_text())
        try:
            self.spec = config["medsegagent"]
            self.labels = {str(k): int(v) for k, v in self.spec["labels"].items()}
            self.size = [int(v) for v in self.spec["size"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"model {name}: inference.json lacks a valid 'medsegagent' section ({exc})") from exc
        parser = ConfigParser()
        parser.read_config(str(config_file))
        self.device = select_device(device)
        network = parser.get_parsed_content("network_def")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        self.network = network.to(self.device).eval()
        # One volume at a time per loaded network: torch modules are not re-entrant on CUDA.
        self._lock = threading.Lock()

    def predict(self, volume: Volume) -> Prediction:
        """Run the network on ``volume`` and return probabilities on its grid."""
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        foreground = foreground_mask(volume.array) if self.spec.get("crop_foreground") else None
        grid = model_grid(volume.geometry, self.size, foreground)
        fill = float(volume.array.min())
        image = resample(volume.array, volume.geometry, grid, fill=fill)
        image = normalise_intensity(image, self.spec.get("intensity", {"kind": "none"}))
        seconds["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            tensor = torch.from_numpy(image)[None, None].to(self.device)
            use_amp = self.device.type == "cuda"
            with torch.autocast(device_type=self.device.type, enabled=use_amp):
                logits = self.network(tensor)
            probs = torch.softmax(logits.float(), dim=1)[0].cpu()
        seconds["inference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        channels = sorted(self.labels.items(), key=lambda kv: kv[1])
        stacked = resample(probs[[c for _, c in channels]], grid, volume.geometry)
        result = {name: stacked[i] for i, (name, _) in enumerate(channels)}
        seconds["postprocess"] = time.perf_counter() - t0
        return Prediction(model=self.name, probabilities=result, seconds=seconds)


#: backend name (registry ``backend`` field) -> loader ``(name, path, device) -> model``.
BACKENDS = {"monai_bundle": MonaiBundleModel}


def load_model(name: str, backend: str, path: Path, device: str = "auto") -> SegmentationModel:
    """Load a model reference with its backend.

    Raises
    ------
    ModelLoadError
        Unknown backend, missing files or a broken configuration.
    """
    try:
        factory = BACKENDS[backend]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ModelLoadError(f"model {name}: backend {backend!r} is not available here (known: {known})") from None
    return factory(name, path, device)
