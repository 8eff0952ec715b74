"""The ONNX backend: tiny networks the test exports with ``torch.onnx.export`` (exact outputs), and TAPS's real ONNX.

``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``) needs
the ``onnx`` package; a missing ``onnx`` fails these tests, as any missing
test dependency does.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsegagent.dicom.nifti import geometry_from_affine
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ModelLoadError, ModelSpec, Preprocessing, assemble_channels, load_model
from medsegagent.models.onnx_backend import OnnxModel, onnx_providers
from medsegagent.models.registry import Intensity, load_registry
from medsegagent.models.resample import resample


class Affine(torch.nn.Module):
    """A 1x1x1 convolution with set weights: ``channel c = weight[c] * x + bias[c]``."""

    def __init__(self, weight: list[float], bias: list[float]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, len(weight), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weight).view(-1, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ForwardDifference(torch.nn.Module):
    """One channel: ``x[i + 1] - x[i]`` along the network's first spatial axis (zero at the end)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x[:, :, 1:] - x[:, :, :-1]
        return torch.cat([diff, torch.zeros_like(x[:, :, :1])], dim=2)


def _export(
    module: torch.nn.Module, path: Path, shape: tuple[int, ...], *, dynamic: bool | tuple[int, ...] = False
) -> Path:
    """Export with every axis fixed, batch and spatial axes free (``dynamic=True``), or the listed axes free."""
    free = (0, 2, 3, 4) if dynamic is True else dynamic or ()
    names = {0: "batch", 2: "x", 3: "y", 4: "z"}
    dynamic_axes = {"image": {a: names[a] for a in free}, "logits": {a: names[a] for a in free}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no onnxscript needed
        torch.onnx.export(
            module.eval(),
            (torch.zeros(shape),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes=dynamic_axes if free else None,
        )
    return path


def _spec(path: Path, labels: dict[str, tuple[int, ...]] | None = None, **kwargs) -> ModelSpec:
    labels = {"ball": (1,)} if labels is None else labels
    return ModelSpec(name="tiny", backend="onnx", path=path, labels=labels, **kwargs)


def _volume(shape: tuple[int, int, int] = (10, 12, 14), seed: int = 0) -> Volume:
    """A small axial volume with random intensities in [0, 1]."""
    rng = np.random.default_rng(seed)
    geometry = Geometry(shape, np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]),
                        (2.0, 1.0, 1.0))  # fmt: skip
    return Volume(rng.random(shape, dtype=np.float32), geometry, "CT", "1.2.3")


def _ball(volume: Volume) -> np.ndarray:
    """Channel 1's softmax probability from ``Affine([0, 3], [0, -1])``: logits 0 and ``3 x - 1``."""
    return 1.0 / (1.0 + np.exp(-(3.0 * volume.array - 1.0)))


# --------------------------------------------------------------------------- exact outputs of tiny networks


def test_dynamic_network_runs_the_whole_grid_once(tmp_path):
    file = _export(Affine([0.0, 3.0], [0.0, -1.0]), tmp_path / "model.onnx", (1, 1, 4, 4, 4), dynamic=True)
    model = load_model(_spec(tmp_path), "cpu")  # a folder with model.onnx
    assert isinstance(model, OnnxModel) and model.file == file and model.plan.roi_size is None
    volume = _volume()
    prediction = model.predict(volume)
    assert prediction.grid.same_grid(volume.geometry)  # native orientation, no spacing: the study's own grid
    np.testing.assert_allclose(prediction.maps["ball"], _ball(volume), rtol=1e-5, atol=1e-6)
    assert model.memory_bytes == file.stat().st_size


@pytest.mark.parametrize("shape", [(10, 12, 14), (3, 5, 6)], ids=["larger than the patch", "smaller than the patch"])
def test_fixed_size_network_is_run_patch_by_patch(tmp_path, shape):
    # Fixed (x, y, z) = (8, 6, 4): the sliding window tiles a larger grid and pads a smaller one.
    _export(Affine([0.0, 3.0], [0.0, -1.0]), tmp_path / "fixed.onnx", (1, 1, 8, 6, 4))
    model = load_model(_spec(tmp_path / "fixed.onnx", options={"overlap": 0.5}), "cpu")
    assert model.plan.roi_size == (8, 6, 4)
    volume = _volume(shape)
    np.testing.assert_allclose(model.predict(volume).maps["ball"], _ball(volume), rtol=1e-5, atol=1e-5)


def test_a_network_with_some_axes_fixed_needs_a_matching_roi_size(tmp_path):
    # (x, y) fixed at (8, 6), z free: the patch must fix z too, and keep x and y.
    _export(Affine([0.0, 3.0], [0.0, -1.0]), tmp_path / "xy.onnx", (1, 1, 8, 6, 4), dynamic=(4,))
    with pytest.raises(ModelLoadError, match=r"fixed along some axes only \[8, 6, 'free'\] .*set options\.roi_size"):
        load_model(_spec(tmp_path / "xy.onnx"), "cpu")
    with pytest.raises(ModelLoadError, match=r"roi_size \[8, 5, 3\] differs from the network's fixed input size"):
        load_model(_spec(tmp_path / "xy.onnx", options={"roi_size": [8, 5, 3]}), "cpu")
    model = load_model(_spec(tmp_path / "xy.onnx", options={"roi_size": [8, 6, 3]}), "cpu")
    for shape in ((10, 12, 14), (3, 5, 6)):  # tiled; padded along x and y where the grid is smaller
        volume = _volume(shape)
        np.testing.assert_allclose(model.predict(volume).maps["ball"], _ball(volume), rtol=1e-5, atol=1e-5)


def test_network_axes_follow_the_registry(tmp_path):
    _export(ForwardDifference(), tmp_path / "diff.onnx", (1, 1, 5, 5, 5), dynamic=True)
    volume = _volume()
    a = volume.array
    for axes, numpy_axis in (("xyz", 2), ("zyx", 0)):  # the network's first spatial axis is x, or z
        options = {"axes": axes, "activation": "none", "background_channel": False}
        model = load_model(_spec(tmp_path / "diff.onnx", labels={"edge": (1,)}, options=options), "cpu")
        diff = np.diff(a, axis=numpy_axis, append=np.take(a, [-1], axis=numpy_axis))
        np.testing.assert_allclose(model.predict(volume).maps["edge"], np.clip(diff, 0, 1), atol=1e-6)


def test_sigmoid_without_background_channel_with_threshold_and_logit_blur(tmp_path):
    _export(Affine([4.0], [-2.0]), tmp_path / "one.onnx", (1, 1, 4, 4, 4), dynamic=True)
    options = {"activation": "sigmoid", "background_channel": False, "threshold": 0.7, "logit_sigma": 1.5}
    model = load_model(_spec(tmp_path / "one.onnx", options=options), "cpu")
    assert model.labels == {"ball": (0,)}
    volume = _volume()
    logits = ndimage.gaussian_filter(4.0 * volume.array - 2.0, 1.5, mode="nearest")
    expected = 1.0 / (1.0 + np.exp(-(logits - np.log(0.7 / 0.3))))
    ball = model.predict(volume).maps["ball"]
    np.testing.assert_allclose(ball, expected, rtol=1e-5, atol=1e-6)
    # The shift moves the model's own threshold to the ensemble's 0.5.
    np.testing.assert_array_equal(ball > 0.5, 1.0 / (1.0 + np.exp(-logits)) > 0.7)


def test_registry_preprocessing_builds_the_grid(tmp_path):
    _export(Affine([0.0, 1.0], [0.0, 0.0]), tmp_path / "m.onnx", (1, 1, 4, 4, 4), dynamic=True)
    pre = Preprocessing(orientation="RAS", spacing=(2.0, 2.0, 4.0), intensity=Intensity("zscore_nonzero"))
    model = load_model(_spec(tmp_path / "m.onnx", preprocessing=pre), "cpu")
    prediction = model.predict(_volume((10, 20, 20)))
    np.testing.assert_allclose(prediction.grid.row_direction, [-1, 0, 0])
    np.testing.assert_allclose(prediction.grid.column_direction, [0, -1, 0])
    assert prediction.grid.spacing == (4.0, 2.0, 2.0)  # (slice, row, column)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"model\.onnx is missing"):
        load_model(_spec(tmp_path), "cpu")
    (tmp_path / "model.onnx").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        load_model(_spec(tmp_path), "cpu")
    _export(Affine([1.0], [0.0]), tmp_path / "one.onnx", (1, 1, 4, 4, 4))
    with pytest.raises(ModelLoadError, match="name the output labels"):
        load_model(_spec(tmp_path / "one.onnx", labels={}), "cpu")
    with pytest.raises(ModelLoadError, match=r"maps to output channel\(s\) \[1\], the network has 1"):
        load_model(_spec(tmp_path / "one.onnx"), "cpu")
    with pytest.raises(ModelLoadError, match="threshold needs activation: sigmoid"):
        load_model(_spec(tmp_path / "one.onnx", options={"background_channel": False, "threshold": 0.6}), "cpu")
    with pytest.raises(ModelLoadError, match=r"roi_size \[4, 4, 8\] differs from the network's fixed input size"):
        load_model(_spec(tmp_path / "one.onnx", options={"background_channel": False, "roi_size": [4, 4, 8]}), "cpu")
    with pytest.raises(ModelLoadError, match="logit_sigma must be a number >= 0"):
        load_model(_spec(tmp_path / "one.onnx", options={"background_channel": False, "logit_sigma": -1}), "cpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match=r"onnxruntime is not installed \(pip install onnxruntime\)"):
        load_model(_spec(tmp_path / "one.onnx", options={"background_channel": False}), "cpu")


def test_cuda_falls_back_to_the_cpu_when_the_runtime_has_no_cuda_provider(caplog):
    providers, device = onnx_providers(torch.device("cuda", 1), ["CPUExecutionProvider"])
    assert providers == ["CPUExecutionProvider"] and device.type == "cpu"
    assert "no CUDA provider" in caplog.text
    providers, device = onnx_providers(torch.device("cuda", 1), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": 1}) and device == torch.device("cuda", 1)


# --------------------------------------------------------------------------- TAPS, the real model


def _pelvis_t2(n: int = 200, slices: int = 24, dx: float = 0.7, dz: float = 3.0) -> tuple[Volume, np.ndarray]:
    """A crude axial T2 of a male pelvis, and where its prostate is.

    The body fills the field of view, as in a prostate study: fat; gluteal,
    obturator and anterior thigh muscles; femoral heads and the pubic
    symphysis (dark cortex, fatty marrow); the levator sling; the rectum
    behind the gland, the bladder and seminal vesicles above it; the gland
    (45 x 32 x 34 mm) with a darker transition zone, a bright peripheral zone
    behind it and a dark capsule.  Patient axes: ``x`` left, ``y`` posterior, ``z`` superior (mm).
    TAPS's own pipeline marks no prostate on it: the phantom tests that the
    node runs TAPS as TAPS runs itself, not how well TAPS segments.
    """
    rng = np.random.default_rng(0)
    zc, xc = (np.arange(slices) - (slices - 1) / 2) * dz, (np.arange(n) - (n - 1) / 2) * dx
    z, y, x = np.meshgrid(zc, xc, xc, indexing="ij")

    def ellipse(cx: float, cy: float, rx: float, ry: float, cz: float = 0.0, rz: float = np.inf) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 < 1

    body = ellipse(0, 5, 185, 130)
    image = np.where(body, 380.0, 0.0)  # fat
    parts = [(ellipse(0, -48, 22, 9), 70), (ellipse(0, -48, 18, 6), 260)]  # pubic symphysis
    for side in (-1, 1):
        parts += [(ellipse(side * 75, 70, 55, 40), 110), (ellipse(side * 48, 5, 14, 30), 100)]  # muscles
        parts += [(ellipse(side * 95, 5, 26, 26), 60), (ellipse(side * 95, 5, 22, 22), 300)]  # femoral head
        parts += [(ellipse(side * 120, -40, 25, 18), 110)]
    parts += [(ellipse(0, 10, 34, 30) & ~ellipse(0, 10, 30, 26) & (y > 0), 100)]  # levator sling
    parts += [(ellipse(0, 32, 16, 11), 90), (ellipse(0, 32, 9, 5), 30), (ellipse(0, -10, 40, 32, 38, 26), 850)]
    parts += [(ellipse(side * 14, 14, 12, 5, 22, 8), 520) for side in (-1, 1)]  # seminal vesicles
    for mask, value in parts:
        image[mask] = value
    gland = ellipse(0, 0, 22, 16, 0, 17)
    peripheral = gland & ~ellipse(0, -4, 22 * 0.72, 16 * 0.7, 2, 17 * 0.85) & (y > -2)
    image[gland] = 170
    image[peripheral] = 330
    image[ellipse(0, 0, 23.5, 17.5, 0, 18.5) & ~gland & (image > 200)] = 150  # capsule
    image = ndimage.gaussian_filter(image + rng.normal(0, 15, image.shape) * body, (0.3, 1.0, 1.0))
    origin = np.array([xc[0], xc[0], zc[0]])
    geometry = Geometry(image.shape, origin, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]),
                        (dz, dx, dx))  # fmt: skip
    volume = Volume(np.clip(image, 0, None).astype(np.float32), geometry, "MR", "1.2.3.4",
                    meta={"SeriesDescription": "t2_tse_tra"})  # fmt: skip
    return volume, gland


def _taps_spec() -> ModelSpec:
    dataset = load_registry().datasets["Prostate_T2"]
    return ModelSpec.from_registry(dataset.models[0], dataset)


@pytest.fixture(scope="module")
def taps() -> OnnxModel:
    return load_model(_taps_spec(), "cpu")


@pytest.fixture(scope="module")
def phantom() -> tuple[Volume, np.ndarray]:
    return _pelvis_t2()


@pytest.fixture(scope="module")
def taps_own(phantom, tmp_path_factory) -> dict[str, Any]:
    """taps/inference.py's own ``segment`` on the phantom, up to its blurred logits: its input, logits, grid."""
    import nibabel as nib
    from monai.inferers import sliding_window_inference
    from taps.inference import ROI_SIZE, ONNXPredictor, build_preprocessing, gaussian_blur_logits, resolve_checkpoint

    volume, _ = phantom
    path = tmp_path_factory.mktemp("taps") / "t2.nii.gz"
    nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.geometry.nifti_affine()), path)
    image = build_preprocessing()({"image": str(path)})["image"]
    with torch.inference_mode():
        logits = sliding_window_inference(
            image[None], roi_size=ROI_SIZE, sw_batch_size=1, overlap=0.5, mode="gaussian",
            predictor=ONNXPredictor(resolve_checkpoint(None), "cpu"),
        )  # fmt: skip
    grid = geometry_from_affine(image.shape[1:], np.asarray(image.affine))
    # NIfTI (i, j, k) -> this package's (slice, row, column)
    return {
        "input": np.asarray(image[0]).transpose(2, 1, 0),
        "logits": np.asarray(gaussian_blur_logits(logits)[0, 0]).transpose(2, 1, 0),
        "grid": grid,
    }


def test_taps_runs_on_its_own_grid_and_agrees_with_taps_on_the_phantom(taps, phantom, taps_own):
    """No real prostate MRI is available: TAPS's quality is not measured here, only that it runs as TAPS runs."""
    assert taps.plan.roi_size == (128, 128, 32)  # the network's fixed input, read from the ONNX file
    volume, gland = phantom
    prediction = taps.predict(volume)
    grid = prediction.grid
    np.testing.assert_allclose(grid.row_direction, [-1, 0, 0])  # RAS, as TAPS's Orientationd
    np.testing.assert_allclose(grid.column_direction, [0, -1, 0])
    np.testing.assert_allclose(grid.spacing, (3.0, 0.8, 0.8))
    soft = prediction.maps["prostate"]
    assert soft.shape == grid.shape and np.isfinite(soft).all()
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    # TAPS's own pipeline marks nothing on this phantom (segment() would raise BlankMaskError); nor does the node.
    assert not (taps_own["logits"] > np.log(0.55 / 0.45)).any()
    assert not (prediction.probability("prostate") > 0.5).any()
    assert gland.any()


def test_taps_inference_gives_taps_own_logits(taps, taps_own):
    """TAPS's own network input through the node's inference: its sliding window, blur and threshold, exactly."""
    probability = taps._infer(np.ascontiguousarray(taps_own["input"][None], dtype=np.float32))[0].double().numpy()
    p = np.clip(probability, 1e-300, None)
    logits = np.log(p) - np.log1p(-p) + taps.logit_shift  # the node's sigmoid(logits - logit(0.55)), undone
    np.testing.assert_allclose(logits, taps_own["logits"], rtol=1e-4, atol=1e-3)


def test_taps_input_matches_taps_own_preprocessing(taps, phantom, taps_own):
    """The registry data reproduce taps/inference.py's preprocessing: orientation, spacing, z-scores.

    TAPS then crops to its positive z-scores plus 5 voxels, padding with zeros
    beyond the image; the node keeps the series' extent (its foreground crop
    would count the air it fills in around the series in the z-score).
    """
    volume, _ = phantom
    grid = taps.plan.grid(volume.geometry, volume.array)
    mine = assemble_channels(volume, taps.channels, grid, taps.plan.intensity_for)[0]
    theirs_grid = taps_own["grid"]
    np.testing.assert_allclose(theirs_grid.row_direction, grid.row_direction, atol=1e-6)
    np.testing.assert_allclose(theirs_grid.column_direction, grid.column_direction, atol=1e-6)
    np.testing.assert_allclose(theirs_grid.spacing, grid.spacing, atol=1e-6)
    theirs = resample(taps_own["input"], theirs_grid, grid, outside=np.nan)
    inside = np.isfinite(theirs)
    assert inside.mean() > 0.95
    assert np.corrcoef(theirs[inside], mine[inside])[0, 1] > 0.99
    assert abs(float(np.median(theirs[inside] - mine[inside]))) < 0.05  # z-scores of the same voxels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_taps_on_cuda_agrees_with_the_cpu(taps, phantom):
    """With a GPU the CUDA execution provider is required: a CPU-only onnxruntime is then a missing dependency."""
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    assert "CUDAExecutionProvider" in providers, (
        f"a CUDA device is present but onnxruntime has only {providers}:"
        " install onnxruntime-gpu (pip install onnxruntime-gpu) in place of onnxruntime"
    )
    on_gpu = load_model(_taps_spec(), "cuda")
    assert on_gpu.device.type == "cuda"
    volume, _ = phantom
    np.testing.assert_allclose(
        on_gpu.predict(volume).maps["prostate"], taps.predict(volume).maps["prostate"], atol=1e-3
    )
