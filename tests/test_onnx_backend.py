"""The ONNX backend: tiny networks the test exports with ``torch.onnx.export`` (exact outputs), and TAPS's real ONNX.

``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``) needs
the ``onnx`` package; a missing ``onnx`` fails these tests, as any missing
test dependency does.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

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


def _export(module: torch.nn.Module, path: Path, shape: tuple[int, ...], *, dynamic: bool = False) -> Path:
    dynamic_axes = {"image": {0: "batch", 2: "x", 3: "y", 4: "z"}, "logits": {0: "batch", 2: "x", 3: "y", 4: "z"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no onnxscript needed
        torch.onnx.export(
            module.eval(),
            (torch.zeros(shape),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes=dynamic_axes if dynamic else None,
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


def _softmax_channel1(z0: np.ndarray, z1: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(z0 - z1))


# --------------------------------------------------------------------------- exact outputs of tiny networks


def test_dynamic_network_runs_the_whole_grid_once(tmp_path):
    file = _export(Affine([0.0, 3.0], [0.0, -1.0]), tmp_path / "model.onnx", (1, 1, 4, 4, 4), dynamic=True)
    model = load_model(_spec(tmp_path), "cpu")  # a folder with model.onnx
    assert isinstance(model, OnnxModel) and model.file == file and model.plan.roi_size is None
    volume = _volume()
    prediction = model.predict(volume)
    assert prediction.grid.same_grid(volume.geometry)  # native orientation, no spacing: the study's own grid
    expected = _softmax_channel1(np.zeros_like(volume.array), 3.0 * volume.array - 1.0)
    np.testing.assert_allclose(prediction.maps["ball"], expected, rtol=1e-5, atol=1e-6)
    assert model.memory_bytes == file.stat().st_size


@pytest.mark.parametrize("shape", [(10, 12, 14), (3, 5, 6)], ids=["larger than the patch", "smaller than the patch"])
def test_fixed_size_network_is_run_patch_by_patch(tmp_path, shape):
    # Fixed (x, y, z) = (8, 6, 4): the sliding window tiles a larger grid and pads a smaller one.
    _export(Affine([0.0, 3.0], [0.0, -1.0]), tmp_path / "fixed.onnx", (1, 1, 8, 6, 4))
    model = load_model(_spec(tmp_path / "fixed.onnx", options={"overlap": 0.5}), "cpu")
    assert model.plan.roi_size == (8, 6, 4)
    volume = _volume(shape)
    expected = _softmax_channel1(np.zeros_like(volume.array), 3.0 * volume.array - 1.0)
    np.testing.assert_allclose(model.predict(volume).maps["ball"], expected, rtol=1e-5, atol=1e-5)


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
    np.testing.assert_allclose(model.predict(volume).maps["ball"], expected, rtol=1e-5, atol=1e-6)
    # The shift moves the model's own threshold to the ensemble's 0.5.
    np.testing.assert_array_equal(model.predict(volume).maps["ball"] > 0.5, 1.0 / (1.0 + np.exp(-logits)) > 0.7)


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


def _pelvis_t2(n: int = 160, slices: int = 24, dx: float = 0.625, dz: float = 3.6) -> Volume:
    """A crude axial T2 pelvis: fat, muscles, bone, a gland with a bright peripheral zone, rectum, bladder."""
    rng = np.random.default_rng(0)
    centred = (np.arange(slices) - slices / 2) * dz, (np.arange(n) - n / 2) * dx, (np.arange(n) - n / 2) * dx
    z, y, x = np.meshgrid(*centred, indexing="ij")

    def ellipsoid(cx: float, cy: float, cz: float, rx: float, ry: float, rz: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 < 1

    body = (x / 48) ** 2 + (y / 45) ** 2 < 1
    image = np.where(body, 420.0, 0.0)
    for cx, value, radius in ((-32, 120, 14), (32, 120, 14), (-44, 60, 9), (44, 60, 9)):  # muscles, bone
        image[ellipsoid(cx, 0, 0, radius, 22 if value == 120 else 9, 80)] = value
    gland = ellipsoid(0, 0, 0, 20, 16, 18)
    image[gland] = 190
    image[gland & (y > 4)] = 360
    image[ellipsoid(0, 26, 0, 11, 9, 80)] = 90
    image[ellipsoid(0, -8, 30, 28, 24, 22)] = 900
    image = np.clip(image + rng.normal(0, 12, image.shape) * body, 0, None).astype(np.float32)
    origin = np.array([centred[2][0], centred[1][0], centred[0][0]])
    geometry = Geometry(image.shape, origin, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]),
                        (dz, dx, dx))  # fmt: skip
    return Volume(image, geometry, "MR", "1.2.3.4", meta={"SeriesDescription": "t2_tse_tra"})


@pytest.fixture(scope="module")
def taps() -> OnnxModel:
    registry = load_registry()
    dataset = registry.datasets["Prostate_T2"]
    return load_model(ModelSpec.from_registry(dataset.models[0], dataset), "cpu")


def test_taps_runs_on_a_synthetic_t2_on_its_own_grid(taps):
    assert taps.plan.roi_size == (128, 128, 32)  # the network's fixed input, read from the ONNX file
    volume = _pelvis_t2()
    prediction = taps.predict(volume)
    grid = prediction.grid
    np.testing.assert_allclose(grid.row_direction, [-1, 0, 0])  # RAS, as TAPS's Orientationd
    np.testing.assert_allclose(grid.column_direction, [0, -1, 0])
    np.testing.assert_allclose(grid.spacing, (3.0, 0.8, 0.8))
    # The grid covers the body (100 x 90 mm) plus the margin, not the whole 100 x 100 mm field of view.
    assert grid.shape[2] * 0.8 <= 100 + 2 * 4 + 0.8 and grid.shape[1] * 0.8 <= 90 + 2 * 4 + 0.8
    soft = prediction.maps["prostate"]
    assert soft.shape == grid.shape and np.isfinite(soft).all()
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    assert prediction.probability("prostate").shape == volume.geometry.shape


def test_taps_input_matches_taps_own_preprocessing(taps, tmp_path):
    """The registry data reproduce taps/inference.py's preprocessing: same orientation, spacing and intensities."""
    import nibabel as nib
    from taps.inference import build_preprocessing

    volume = _pelvis_t2()
    grid = taps.plan.grid(volume.geometry, volume.array)
    mine = assemble_channels(volume, taps.channels, grid, taps.plan.intensity_for)[0]
    path = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.geometry.nifti_affine()), path)
    data = build_preprocessing()({"image": str(path)})
    theirs_array = np.asarray(data["image"][0])
    theirs_grid = geometry_from_affine(theirs_array.shape, np.asarray(data["image"].affine))
    np.testing.assert_allclose(theirs_grid.row_direction, grid.row_direction, atol=1e-6)
    np.testing.assert_allclose(theirs_grid.spacing, grid.spacing, atol=1e-6)
    theirs = resample(theirs_array.transpose(2, 1, 0), theirs_grid, grid, outside=np.nan)
    inside = np.isfinite(theirs)
    assert inside.mean() > 0.95
    assert np.corrcoef(theirs[inside], mine[inside])[0, 1] > 0.9
    # z-scores of slightly different voxel sets (the two grids' partial-volume voxels at the body's edge)
    assert abs(float(np.median(theirs[inside] - mine[inside]))) < 0.1


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers() or not torch.cuda.is_available(),
    reason="needs a CUDA device and onnxruntime-gpu",
)
def test_taps_on_cuda_agrees_with_the_cpu(taps):
    registry = load_registry()
    dataset = registry.datasets["Prostate_T2"]
    on_gpu = load_model(ModelSpec.from_registry(dataset.models[0], dataset), "cuda")
    assert on_gpu.device.type == "cuda"
    volume = _pelvis_t2()
    np.testing.assert_allclose(
        on_gpu.predict(volume).maps["prostate"], taps.predict(volume).maps["prostate"], atol=1e-3
    )
