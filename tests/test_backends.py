"""Backends with models the tests make themselves: MONAI bundle, TorchScript, nnU-Net v2, TotalSegmentator.

Every model here is a thresholding network with hand-set weights (a 1x1x1
convolution), so the right answer is known: the bright ball of the test
volume.  A backend that misplaces its grid, transposes an axis or maps a
label to the wrong channel loses the ball, whatever the source orientation.
TotalSegmentator's weights cannot be downloaded here, so its test replaces
the predictor with a stand-in and checks what the backend owns: the NIfTI
hand-over and the mapping of TotalSegmentator's class names to registry labels.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import (
    ChannelError,
    InputPlan,
    ModelLoadError,
    ModelSpec,
    MonaiBundleModel,
    Prediction,
    StudyImages,
    TorchScriptModel,
    assemble_channels,
    load_model,
    nnunet_label_channels,
    nnunet_model_folder,
    select_device,
)
from medsegagent.models.registry import Backend, InputChannel, Intensity, ModelRef, Preprocessing, load_registry
from medsegagent.models.resample import resample, target_grid
from medsegagent.models.totalseg import TotalSegmentatorModel
from tests.conftest import dice

BALL_CENTRE = np.array([20.0, -15.0, 10.0])  # off-centre: a flipped axis would miss it
BALL_RADIUS = 22.0


def _geometry(orientation: str = "axial", shape=(24, 40, 40), spacing=(3.0, 2.5, 2.5)) -> Geometry:
    if orientation == "axial":
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    elif orientation == "sagittal":
        row, col = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    else:  # oblique
        a, b = np.radians(20), np.radians(12)
        row = np.array([np.cos(a), np.sin(a), 0.0])
        col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    normal = np.cross(row, col)
    half = (np.array(shape) - 1) / 2 * np.array(spacing)
    origin = -(normal * half[0] + col * half[1] + row * half[2])
    return Geometry(shape, origin, row, col, normal, spacing)


def _ball_volume(orientation: str = "axial", outside: float = -50.0, **kwargs) -> tuple[Volume, np.ndarray]:
    """A CT-like volume: a 200 HU ball in -50 HU tissue; returns the volume and the ball's truth mask."""
    geo = _geometry(orientation, **kwargs)
    truth = np.linalg.norm(geo.voxel_centres() - BALL_CENTRE, axis=-1) <= BALL_RADIUS
    array = np.where(truth, 200.0, outside).astype(np.float32)
    return Volume(array, geo, "CT", "1.2.826.0.1.3680043.8.498.1", meta={"SeriesDescription": "test ball"}), truth


class ThresholdConv(torch.nn.Module):
    """Two-class 1x1x1 convolution: class 1 where the (normalised) intensity exceeds ``threshold``."""

    def __init__(self, threshold: float = 0.5, gain: float = 20.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = gain
            self.conv.bias[1] = -gain * threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ThresholdNet(ThresholdConv):
    """The same network built the way nnU-Net builds architectures from plans.json."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **kwargs) -> None:
        super().__init__(threshold=0.0, gain=10.0)


CT_WINDOW = {"kind": "ct_window", "window": [-100, 300]}


def _spec(backend: str, path: Path, **kwargs) -> ModelSpec:
    return ModelSpec(name=kwargs.pop("name", "m"), backend=backend, path=path, **kwargs)


# --------------------------------------------------------------------------- MONAI bundle


def _bundle(tmp_path: Path, section: dict | None, *, metadata: dict | None = None) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config: dict = {
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    }
    if section is not None:
        config["medsegagent"] = section
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    if metadata is not None:
        (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save(ThresholdConv().conv.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.mark.parametrize("orientation", ["axial", "oblique", "sagittal"])
def test_monai_bundle_with_its_own_section_finds_the_ball(tmp_path, orientation):
    section = {"labels": {"ball": 1}, "size": [40, 40, 32], "crop_foreground": True, "intensity": CT_WINDOW}
    bundle = _bundle(tmp_path, section, metadata={"validation_dice": {"ball": 0.97}})
    model = load_model(_spec("monai_bundle", bundle, labels={"ball": (1,)}), "cpu")
    assert isinstance(model, MonaiBundleModel)
    assert model.plan.orientation == "LPS" and model.plan.axes == "zyx"
    volume, truth = _ball_volume(orientation)
    prediction = model.predict(volume)
    assert prediction.grid.shape == (32, 40, 40)  # the model grid, not the source
    assert prediction.quality == {"ball": 0.97}
    assert set(prediction.seconds) >= {"preprocess", "inference", "postprocess"}
    assert dice(prediction.probability("ball") > 0.5, truth) >= 0.9


def test_monai_bundle_without_section_uses_the_registry_preprocessing(tmp_path):
    """A plain MONAI bundle: registry orientation/spacing/intensity, MONAI's (x, y, z) axes."""
    bundle = _bundle(tmp_path, None)
    pre = Preprocessing(orientation="RAS", spacing=(2.0, 2.5, 3.5), intensity=Intensity("ct_window", (-100.0, 300.0)))
    model = load_model(_spec("monai_bundle", bundle, labels={"ball": (1,)}, preprocessing=pre), "cpu")
    assert model.plan.axes == "xyz" and model.plan.orientation == "RAS"
    volume, truth = _ball_volume("sagittal")
    prediction = model.predict(volume)
    np.testing.assert_allclose(prediction.grid.row_direction, [-1, 0, 0])
    np.testing.assert_allclose(prediction.grid.spacing, (3.5, 2.5, 2.0))
    assert dice(prediction.probability("ball") > 0.5, truth) >= 0.9


def test_monai_bundle_label_names_win_unless_the_registry_overrides(tmp_path):
    section = {"labels": {"ball": 1, "rest": 0}, "size": [16, 16, 16], "intensity": CT_WINDOW}
    bundle = _bundle(tmp_path, section)
    # Registry values (from the dataset) differ from the bundle's channels: the bundle knows its channels.
    model = load_model(_spec("monai_bundle", bundle, labels={"ball": (7,), "other": (0,)}), "cpu")
    assert model.labels == {"ball": (1,), "other": (0,)}
    # An explicit registry override (ModelRef.labels) wins over the bundle.
    spec = _spec("monai_bundle", bundle, labels={"ball": (0,)}, explicit_labels={"ball"})
    assert load_model(spec, "cpu").labels == {"ball": (0,)}


def test_monai_bundle_errors_name_the_problem(tmp_path):
    bundle = _bundle(tmp_path, {"labels": {"ball": 1}, "size": [8, 8, 8]})
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(_spec("monai_bundle", bundle, labels={"ball": (1,)}), "cpu")
    (bundle / "configs" / "inference.json").unlink()
    with pytest.raises(ModelLoadError, match=r"inference\.json is missing"):
        load_model(_spec("monai_bundle", bundle), "cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(_spec("monai_bundle", tmp_path / "nowhere"), "cpu")
    bad = _bundle(tmp_path / "b", {"size": [8, 8, 8]})
    with pytest.raises(ModelLoadError, match="needs 'labels'"):
        load_model(_spec("monai_bundle", bad), "cpu")


def test_prediction_asks_only_for_wanted_labels(tmp_path):
    bundle = _bundle(tmp_path, {"labels": {"ball": 1, "rest": 0}, "size": [16, 16, 16], "intensity": CT_WINDOW})
    model = load_model(_spec("monai_bundle", bundle, labels={"ball": (1,), "rest": (0,)}), "cpu")
    volume, _ = _ball_volume()
    assert model.predict(volume, ["ball"]).labels == ["ball"]
    with pytest.raises(ValueError, match="no output for"):
        model.predict(volume, ["liver"])


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("roi", [None, (12, 12, 12)])
def test_torchscript_with_registry_preprocessing_and_sliding_window(tmp_path, roi):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, TorchScript files are not
        scripted = torch.jit.script(ThresholdConv())
    scripted.save(str(tmp_path / "model.ts"))
    pre = Preprocessing(orientation="LPS", spacing=(3.0, 3.0, 3.0), intensity=Intensity("ct_window", (-100.0, 300.0)))
    options = {"roi_size": list(roi)} if roi else {}
    spec = _spec("torchscript", tmp_path, labels={"ball": (1,)}, preprocessing=pre, options=options)
    model = load_model(spec, "cpu")
    assert isinstance(model, TorchScriptModel)
    volume, truth = _ball_volume("oblique")
    prediction = model.predict(volume)
    assert dice(prediction.probability("ball") > 0.5, truth) >= 0.9
    if roi:  # patches of a 1x1x1 convolution stitch back to the whole-volume answer
        whole = load_model(_spec("torchscript", tmp_path, labels={"ball": (1,)}, preprocessing=pre), "cpu")
        np.testing.assert_allclose(prediction.maps["ball"], whole.predict(volume).maps["ball"], atol=1e-4)


def test_exported_program_with_a_fixed_grid(tmp_path):
    example = torch.zeros(1, 1, 24, 24, 16)  # (x, y, z): the registry size below
    torch.export.save(torch.export.export(ThresholdConv(), (example,)), str(tmp_path / "model.pt2"))
    pre = Preprocessing(orientation="LPS", size=(24, 24, 16), intensity=Intensity("ct_window", (-100.0, 300.0)))
    spec = _spec("torchscript", tmp_path, labels={"ball": (1,)}, preprocessing=pre)
    volume, truth = _ball_volume("axial")
    assert dice(load_model(spec, "cpu").predict(volume).probability("ball") > 0.5, truth) >= 0.85


def test_torchscript_needs_labels_and_a_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model\.ts is missing"):
        load_model(_spec("torchscript", tmp_path, labels={"ball": (1,)}), "cpu")
    (tmp_path / "model.ts").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="name the output labels"):
        load_model(_spec("torchscript", tmp_path), "cpu")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(_spec("torchscript", tmp_path, labels={"ball": (1,)}), "cpu")


# --------------------------------------------------------------------------- nnU-Net v2


def _nnunet_folder(
    root: Path,
    *,
    labels: dict,
    arch: dict,
    network: torch.nn.Module,
    spacing=(3.0, 3.0, 3.0),
    transpose=(0, 1, 2),
    regions_class_order=None,
    normalization: str = "CTNormalization",
    trainer: str = "nnUNetTrainer",
) -> Path:
    """An nnU-Net v2 training output folder: dataset.json, plans.json, fold_0/checkpoint_final.pth."""
    folder = root / "Dataset999_Ball" / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    if regions_class_order is not None:
        dataset["regions_class_order"] = regions_class_order
    backward = [int(i) for i in np.argsort(transpose)]
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset999_Ball",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": backward,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 300.0,
                "mean": 75.0,
                "median": 75.0,
                "min": -100.0,
                "percentile_00_5": -100.0,
                "percentile_99_5": 300.0,
                "std": 125.0,
            }
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 16, 16],
                "median_image_size_in_voxels": [32, 32, 32],
                "spacing": list(spacing),
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resampling,
                "architecture": arch,
                "batch_dice": False,
            }
        },
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "plans.json").write_text(json.dumps(plans))
    checkpoint = {
        "network_weights": network.state_dict(),
        "trainer_name": trainer,
        "init_args": {"configuration": "3d_fullres"},
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder.parent


def test_nnunet_folder_validation(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        nnunet_model_folder(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no plans\.json"):
        nnunet_model_folder(tmp_path)
    for config in ("3d_fullres", "2d"):
        model = tmp_path / f"nnUNetTrainer__nnUNetPlans__{config}"
        model.mkdir()
        (model / "plans.json").write_text(json.dumps({"configurations": {config: {}}}))
        (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "channel_names": {}}))
    with pytest.raises(ModelLoadError, match="no fold_"):
        nnunet_model_folder(tmp_path)  # 3d_fullres is preferred, and it has no checkpoint yet
    (tmp_path / "nnUNetTrainer__nnUNetPlans__2d" / "fold_1").mkdir()
    (tmp_path / "nnUNetTrainer__nnUNetPlans__2d" / "fold_1" / "checkpoint_final.pth").write_bytes(b"")
    folder, folds = nnunet_model_folder(tmp_path, configuration="2d")
    assert folder.name.endswith("__2d") and folds == ["1"]
    with pytest.raises(ModelLoadError, match="matching"):
        nnunet_model_folder(tmp_path, trainer="nnUNetTrainerNoDA")


def test_nnunet_label_channels_for_labels_and_regions():
    dataset = {"labels": {"background": 0, "liver": 1, "tumour": 2}}
    channels, activation = nnunet_label_channels(dataset, {"liver": (1,), "liver_and_tumour": (1, 2)})
    assert activation == "softmax" and channels == {"liver": (1,), "liver_and_tumour": (1, 2)}
    with pytest.raises(ModelLoadError, match=r"value\(s\) \[3\]"):
        nnunet_label_channels(dataset, {"cyst": (3,)})
    brats = {
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
        "regions_class_order": [1, 2, 3],
    }
    channels, activation = nnunet_label_channels(brats, {"WT": (3, 2, 1), "TC": (2, 3), "ET": (3,)})
    assert activation == "sigmoid" and channels == {"WT": (0,), "TC": (1,), "ET": (2,)}
    with pytest.raises(ModelLoadError, match="not a region"):
        nnunet_label_channels(brats, {"edema": (1, 2)})


@pytest.mark.parametrize("transpose", [(0, 1, 2), (1, 2, 0)])
def test_nnunet_output_grid_places_nnunets_own_resampling_exactly(tmp_path, transpose):
    """A linear ramp survives nnU-Net's crop + linear resize exactly: its values name the voxels' positions."""
    import nnunetv2  # noqa: F401  (the test extra installs it: missing is a failure)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medsegagent.models.backends import nnunet_output_grid

    arch = {"network_class_name": "tests.test_backends.ThresholdNet", "arch_kwargs": {}, "_kw_requires_import": []}
    spacing = tuple(float(v) for v in np.array([4.5, 3.5, 4.0])[list(transpose)])
    root = _nnunet_folder(
        tmp_path,
        labels={"background": 0, "ball": 1},
        arch=arch,
        network=ThresholdNet(1, 2),
        spacing=spacing,
        transpose=transpose,
        normalization="NoNormalization",
    )
    folder = next(root.iterdir())
    plans = PlansManager(str(folder / "plans.json"))
    config = plans.get_configuration("3d_fullres")
    geo = _geometry("oblique")
    coeffs = np.array([1.0, -2.0, 3.0])
    ramp = (geo.voxel_centres() @ coeffs + 1000.0).astype(np.float32)
    ramp[:3] = 0.0  # nnU-Net crops these slices away (non-zero box)
    data, _, props = config.preprocessor_class(verbose=False).run_case_npy(
        ramp[None],
        None,
        {"spacing": list(geo.spacing)},
        plans,
        config,
        json.loads((folder / "dataset.json").read_text()),
    )
    assert props["bbox_used_for_cropping"][transpose.index(0)][0] == 3
    grid = nnunet_output_grid(geo, (0, 1, 2), plans.transpose_forward, props, data.shape[1:])
    np.testing.assert_allclose(data[0], grid.voxel_centres() @ coeffs + 1000.0, atol=0.01)


@pytest.mark.parametrize(("orientation", "transpose"), [("sagittal", (0, 1, 2)), ("oblique", (2, 0, 1))])
def test_nnunet_v2_folder_made_by_the_test(tmp_path, orientation, transpose):
    """nnU-Net's own preprocessing (transpose, crop to non-zero, resample) is placed back exactly in patient space."""
    import nnunetv2  # noqa: F401  (the test extra installs it: missing is a failure)

    arch = {"network_class_name": "tests.test_backends.ThresholdNet", "arch_kwargs": {}, "_kw_requires_import": []}
    spacing = tuple(float(v) for v in np.array([3.5, 2.5, 3.0])[list(transpose)])
    root = _nnunet_folder(
        tmp_path,
        labels={"background": 0, "ball": 1},
        arch=arch,
        network=ThresholdNet(1, 2),
        spacing=spacing,
        transpose=transpose,
    )
    # Air outside a tissue box is 0 here, so nnU-Net crops to the box (its nonzero mask).
    volume, truth = _ball_volume(orientation)
    box = np.abs(volume.geometry.voxel_centres()).max(axis=-1) < 45
    volume.array[~box] = 0.0
    spec = _spec("nnunetv2", root, labels={"ball": (1,)}, options={"folds": [0], "mirroring": False})
    model = load_model(spec, "cpu")
    prediction = model.predict(volume)
    assert prediction.grid.shape != volume.geometry.shape
    assert dice(prediction.probability("ball") > 0.5, truth) >= 0.97


def test_nnunet_v2_model_of_a_variant_trainer_loads_beside_the_cpu_torch(tmp_path):
    """Most published nnU-Net models name a trainer in ``variants``; nnU-Net's own lookup trips over the
    Primus trainers (timm -> torchvision, which cannot load beside the CPU torch) before it gets there."""
    arch = {"network_class_name": "tests.test_backends.ThresholdNet", "arch_kwargs": {}, "_kw_requires_import": []}
    trainer = "nnUNetTrainer_4000epochs_NoMirroring"
    root = _nnunet_folder(
        tmp_path, labels={"background": 0, "ball": 1}, arch=arch, network=ThresholdNet(1, 2), trainer=trainer
    )
    volume, truth = _ball_volume("axial")
    spec = _spec("nnunetv2", root, labels={"ball": (1,)}, options={"folds": [0], "mirroring": False})
    model = load_model(spec, "cpu")
    assert type(model.predictor.network).__name__ == "ThresholdNet"
    assert dice(model.predict(volume).probability("ball") > 0.5, truth) >= 0.9


def test_nnunet_v2_plain_unet_with_regions(tmp_path):
    """A real (tiny, untrained) nnU-Net architecture through nnUNetPredictor; region labels map to sigmoid heads."""
    import nnunetv2  # noqa: F401  (the test extra installs it: missing is a failure)
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kwargs = {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    needs_import = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": kwargs,
        "_kw_requires_import": needs_import,
    }
    built = {k: v for k, v in kwargs.items() if k not in needs_import}
    built.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    network = PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=False, **built)
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    root = _nnunet_folder(tmp_path, labels=labels, arch=arch, network=network, regions_class_order=[1, 2])
    spec = _spec("nnunetv2", root, labels={"whole": (1, 2), "core": (2,)}, options={"mirroring": False})
    model = load_model(spec, "cpu")
    assert model.labels == {"whole": (0,), "core": (1,)} and model.activation == "sigmoid"
    assert model.memory_bytes > 0
    volume, _ = _ball_volume("axial")
    prediction = model.predict(volume, ["core"])
    assert prediction.labels == ["core"]
    core = prediction.probability("core")
    assert core.shape == volume.geometry.shape and core.min() >= 0.0 and core.max() <= 1.0


def test_nnunet_channel_count_must_match_the_registry(tmp_path):
    import nnunetv2  # noqa: F401  (the test extra installs it: missing is a failure)

    arch = {"network_class_name": "tests.test_backends.ThresholdNet", "arch_kwargs": {}, "_kw_requires_import": []}
    root = _nnunet_folder(tmp_path, labels={"background": 0, "ball": 1}, arch=arch, network=ThresholdNet(1, 2))
    channels = (InputChannel(0, ("PT",)), InputChannel(1, ("CT",)))
    with pytest.raises(ModelLoadError, match="2 input channel"):
        load_model(_spec("nnunetv2", root, labels={"ball": (1,)}, channels=channels), "cpu")


# --------------------------------------------------------------------------- TotalSegmentator


def test_totalsegmentator_class_names_map_to_registry_labels(tmp_path):
    """The predictor is a stand-in (no weights here): it labels the ball 'liver' and the rest 'spleen'."""
    import nibabel as nib

    calls: list[dict] = []

    def fake_totalsegmentator(input, output, **kwargs):
        calls.append({"output": output, **kwargs})
        data = np.asarray(input.dataobj)
        return nib.Nifti1Image(np.where(data > 100, 5, 1).astype(np.uint8), input.affine)

    class_map = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
    spec = _spec(
        "totalsegmentator",
        tmp_path,
        # registry label -> TotalSegmentator class: by name or by explicit class name (never by value)
        labels={"liver": (99,), "right kidney": (42,), "renal_left": (3,), "spleen": (1,)},
        options={"task": "total", "class_names": {"right kidney": "kidney_right", "renal_left": "kidney_left"}},
    )
    model = TotalSegmentatorModel(spec, "cpu", runner=fake_totalsegmentator, class_map=class_map)
    assert model.labels == {"liver": (5,), "right kidney": (2,), "renal_left": (3,), "spleen": (1,)}
    volume, truth = _ball_volume("oblique")
    prediction = model.predict(volume, ["liver", "spleen"])
    assert calls[0]["roi_subset"] == ["liver", "spleen"] and calls[0]["ml"] and calls[0]["output"] is None
    assert prediction.interpolation == "nearest"
    np.testing.assert_array_equal(prediction.probability("liver") > 0.5, truth)
    np.testing.assert_array_equal(prediction.probability("spleen") > 0.5, ~truth)
    with pytest.raises(ModelLoadError, match="not a class"):
        TotalSegmentatorModel(_spec("totalsegmentator", tmp_path, labels={"brain": (77,)}), "cpu",
                              runner=fake_totalsegmentator, class_map=class_map)  # fmt: skip


# --------------------------------------------------------------------------- inputs and specs


def _series(array: np.ndarray, geo: Geometry, modality: str, description: str, **meta) -> Volume:
    return Volume(array.astype(np.float32), geo, modality, f"1.2.3.{abs(hash(description)) % 1000}",
                  meta={"SeriesDescription": description, **meta})  # fmt: skip


def test_brats_channels_are_found_by_their_headers():
    geo = _geometry("axial", shape=(8, 12, 12))
    ones = np.ones(geo.shape)
    primary = _series(3 * ones, geo, "MR", "T1 post", ContrastBolusAgent="Gadovist")
    others = (
        _series(4 * ones, geo, "MR", "t2_tse_tra"),
        _series(1 * ones, geo, "MR", "AX FLAIR"),
        _series(2 * ones, geo, "MR", "T1 pre"),
    )
    channels = tuple(InputChannel(i, (m,)) for i, m in enumerate(("MR:FLAIR", "MR:T1", "MR:T1C", "MR:T2")))
    grid = target_grid(geo, spacing=(4.0, 4.0, 4.0))
    stack = assemble_channels(StudyImages(primary, others), channels, grid)
    assert stack.shape == (4, *grid.shape)
    np.testing.assert_allclose(stack.mean(axis=(1, 2, 3)), [1, 2, 3, 4])
    with pytest.raises(ChannelError, match="MR:T2 series"):
        assemble_channels(StudyImages(primary, others[1:]), channels, grid)


def test_pet_ct_channels_on_one_grid_with_their_own_intensities():
    from medsegagent.dicom.phantom import make_phantom

    phantom = make_phantom("PT+CT", seed=2, slices=12, size=32)
    (pt, geo), (ct, _) = phantom.images["PT"], phantom.images["CT"]
    images = StudyImages(_series(ct, geo, "CT", "CT"), (_series(pt, geo, "PT", "PET AC"),))
    plan = InputPlan(spacing=(20.0, 20.0, 20.0), orientation="LPS", channel_intensity={"CT": CT_WINDOW})
    grid = plan.grid(geo)
    stack = assemble_channels(images, (InputChannel(0, ("PT",)), InputChannel(1, ("CT",))), grid, plan.intensity_for)
    np.testing.assert_allclose(stack[0], resample(pt, geo, grid, fill=float(pt.min())), rtol=1e-5)
    assert stack[1].min() >= 0.0 and stack[1].max() <= 1.0  # the CT is windowed, the PET is not
    assert stack[0].max() > 1000.0


def test_model_spec_from_the_registry_and_its_validation():
    registry = load_registry()
    brats = registry.datasets["BraTS21"]
    ref = ModelRef(name="brats_nnunet", backend=Backend.NNUNETV2, location="/opt/w/BraTS21", dataset="BraTS21")
    spec = ModelSpec.from_registry(ref, brats)
    assert spec.backend == "nnunetv2" and len(spec.channels) == 4
    assert spec.labels["whole_tumor"] == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown backend"):
        ModelSpec(name="x", backend="tflite", path=Path("/x"))
    with pytest.raises(ValueError, match=r"numbered 0\.\.n-1"):
        ModelSpec(name="x", backend="torchscript", path=Path("/x"), channels=(InputChannel(1, ("CT",)),))
    with pytest.raises(ValueError, match="device"):
        ModelSpec(name="x", backend="torchscript", path=Path("/x"), device="tpu")


def test_input_plan_and_device_validation():
    with pytest.raises(ValueError, match="orientation"):
        InputPlan(orientation="RAI")
    with pytest.raises(ValueError, match="spacing"):
        InputPlan(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="ct_window needs window"):
        InputPlan(intensity={"kind": "ct_window"})
    assert InputPlan(channel_intensity={"MR": {"kind": "zscore"}}).intensity_for("MR:T1") == {"kind": "zscore"}
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert select_device("cuda:0").type == "cpu"  # a GPU registry still runs on a CPU node
    with pytest.raises(ValueError):
        select_device("gpu")


def test_prediction_checks_its_maps():
    geo = _geometry("axial", shape=(4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        Prediction("m", geo, geo, {"a": np.zeros((3, 4, 4), np.float32)})


# --------------------------------------------------------------------------- sliding window, devices


class SmoothConv(torch.nn.Module):
    """A two-class 3x3x3 convolution: unlike a 1x1x1 one, its patches see (zero-padded) context."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 20.0 / 27.0  # a local mean, thresholded at 0.5
            self.conv.bias[1] = -10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_forced_sliding_window_on_cpu_matches_whole_volume_inference(tmp_path):
    """``options.roi_size`` / ``overlap`` force MONAI's sliding window on any device; patches need context."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(SmoothConv()).save(str(tmp_path / "model.ts"))
    pre = Preprocessing(orientation="LPS", spacing=(2.5, 2.5, 3.0), intensity=Intensity("ct_window", (-100.0, 300.0)))
    volume, truth = _ball_volume("axial")
    whole = load_model(_spec("torchscript", tmp_path, labels={"ball": (1,)}, preprocessing=pre), "cpu")
    assert whole.plan.roi_size is None  # default: one pass over the whole grid
    options = {"roi_size": [16, 16, 12], "overlap": 0.5}
    windowed = load_model(
        _spec("torchscript", tmp_path, labels={"ball": (1,)}, preprocessing=pre, options=options), "cpu"
    )
    assert windowed.plan.roi_size == (16, 16, 12) and windowed.plan.overlap == 0.5
    reference = whole.predict(volume).maps["ball"]
    patched = windowed.predict(volume).maps["ball"]
    assert patched.shape == reference.shape and reference.shape[1] > 16  # the grid is larger than a patch
    # Patch borders see zero padding instead of their neighbours: close, not equal, and the same masks.
    difference = np.abs(patched - reference)
    assert 0.0 < float(difference.max()) < 0.5 and float(difference.mean()) < 0.01
    assert dice(patched > 0.5, reference > 0.5) >= 0.99
    assert dice(patched > 0.5, truth) >= 0.9


def _demo_ct() -> ModelSpec:
    registry = load_registry(None)
    dataset = registry.datasets["Demo_CT_Abdomen"]
    ref = next(r for r in dataset.models if r.name == "demo_ct_unet")
    if not ref.installed:
        pytest.skip("demo CT bundle not installed")
    return ModelSpec.from_registry(ref, dataset)


def _demo_phantom() -> Volume:
    from medsegagent.dicom.phantom import make_phantom

    phantom = make_phantom("CT", seed=11, slices=48, size=96)
    image, geometry = phantom.images["CT"]
    return Volume(image, geometry, "CT", "2.25.11")


def _windowed(spec: ModelSpec) -> ModelSpec:
    from dataclasses import replace

    # The bundle's grid is (x, y, z) = (96, 80, 48); patches of (48, 48, 32) with half overlap, divisible by 8.
    return replace(spec, options={**spec.options, "roi_size": [48, 48, 32], "overlap": 0.5})


def test_registry_options_force_the_sliding_window_on_a_bundle_with_its_own_section():
    """The demo bundles run on their whole grid; ``options.roi_size`` switches them to patches (not the default)."""
    spec = _demo_ct()
    assert load_model(spec, "cpu").plan.roi_size is None
    model = load_model(_windowed(spec), "cpu")
    assert model.plan.roi_size == (48, 48, 32) and model.plan.overlap == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_bundle_on_cuda_with_amp_and_sliding_window_matches_cpu():
    spec = _demo_ct()
    volume = _demo_phantom()
    # Whole grid, then forced sliding window (patches on the GPU, the same patches on the CPU: the demo
    # networks use instance norm over their whole grid, so patches change their answer on any device).
    for make in (lambda s: s, _windowed):
        cpu = load_model(make(spec), "cpu").predict(volume)
        cuda = load_model(make(spec), "cuda").predict(volume)  # float16 autocast on CUDA
        assert cuda.device.startswith("cuda") and cpu.device == "cpu"
        for label in cpu.maps:
            a, b = cuda.maps[label] > 0.5, cpu.maps[label] > 0.5
            if a.sum() + b.sum() > 100:  # labels the model finds on this phantom
                assert dice(a, b) >= 0.99, label
