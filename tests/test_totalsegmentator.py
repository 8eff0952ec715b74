"""TotalSegmentator as a backend, with the real package (issue 13, part 2).

TotalSegmentator's weights cannot be downloaded here, so the test builds the
two nnU-Net v2 result folders that ``totalsegmentator(task="total",
fast=True, roi_subset=...)`` opens, under their real names: the 3 mm model
(Dataset297, the task itself) and the 6 mm model (Dataset298, the rough
segmentation ``roi_subset`` crops with).  Their plans describe a tiny
PlainConvUNet (1x1x1 convolutions, no normalisation layers) whose weights,
made here, pass the CT intensity through and let the final layer's biases
decide: soft tissue (-250..250 HU) is "liver", bone (> 250 HU) is
"rib_left_1", air is background.  TotalSegmentator's own code does the rest
(reorientation, resampling, cropping, nnU-Net's preprocessing and sliding
window, resampling back), so the node's backend is exercised against the real
package end to end, with the network blocked.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from medsegagent.dicom.series import choose_series, read_series, scan_folder
from medsegagent.models.backends import ModelLoadError, ModelSpec, load_model
from medsegagent.models.registry import Backend, load_registry
from medsegagent.models.totalseg import (
    LICENCE_ENV,
    LICENCE_URL,
    RELEASES_URL,
    LicenceRequiredError,
    TotalSegmentatorModel,
    catalogue,
    download_task,
    prepare_home,
    task_weights,
)
from medsegagent.models.totalseg_registry import ATTACHED, check, default_registry_file, generated_file
from medsegagent.node.pipeline import weights_fingerprint

SOFT_TISSUE, BONE = "liver", "rib_left_1"  # the catalogue numbers rib_left_1 94, TotalSegmentator 92
ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 1, 1], [1, 1, 1]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": None,
        "norm_op_kwargs": None,
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
#: CTNormalization with these statistics maps HU to HU / 100, clipped to -10..10.
INTENSITIES = {"mean": 0.0, "std": 100.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}


def _threshold_network(classes: dict[int, str]) -> torch.nn.Module:
    """nnU-Net's own PlainConvUNet of ARCH whose output class follows the intensity (see the module docstring)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = ARCH["arch_kwargs"]
    network = get_network_from_plans(ARCH["network_class_name"], arch, ARCH["_kw_requires_import"], 1, len(classes) + 1)
    by_name = {name: value for value, name in classes.items()}
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
        first = network.encoder.stages[0][0].convs[0].conv
        first.weight[0, 0] = 1.0
        first.bias[0] = 10.0  # f = HU / 100 + 10 >= 0: the LeakyReLUs pass it unchanged
        skip = network.decoder.stages[0].convs[0].conv
        skip.weight[0, arch["features_per_stage"][0]] = 1.0  # the skip connection follows the upsampled channels
        seg = network.decoder.seg_layers[0]
        seg.bias[:] = -100.0
        seg.bias[0] = 0.0  # background
        seg.weight[by_name[SOFT_TISSUE], 0], seg.bias[by_name[SOFT_TISSUE]] = 1.0, -7.5  # above -250 HU
        seg.weight[by_name[BONE], 0], seg.bias[by_name[BONE]] = 2.0, -20.0  # above 250 HU
    return network


def _write_result_folder(results: Path, folder: str, trainer: str, spacing: float, classes: dict[int, str]) -> None:
    """A result folder as TotalSegmentator opens it: ``<folder>/<trainer>__nnUNetPlans__3d_fullres``."""
    out = results / folder / f"{trainer}__nnUNetPlans__3d_fullres"
    (out / "fold_0").mkdir(parents=True)
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": folder,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {**INTENSITIES, "median": 0.0, "min": -1000.0, "max": 1000.0}
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [64, 64, 64],
                "median_image_size_in_voxels": [64, 64, 64],
                "spacing": [spacing] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resampling,
                "architecture": ARCH,
                "batch_dice": False,
            }
        },
    }
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: value for value, name in classes.items()}},
        "numTraining": 1559,
        "file_ending": ".nii.gz",
    }
    (out / "plans.json").write_text(json.dumps(plans))
    (out / "dataset.json").write_text(json.dumps(dataset))
    checkpoint = {
        "network_weights": _threshold_network(classes).state_dict(),
        "trainer_name": trainer,
        "init_args": {"configuration": "3d_fullres"},
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, out / "fold_0" / "checkpoint_final.pth")


def _install_total_fast(home: Path) -> None:
    """The two result folders of ``total --fast`` with roi_subset, named and configured as TotalSegmentator's."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    classes = catalogue()["total"].classes
    fast, rough = TASK_CONFIGS["total"]["sub_modes"]["fast"], TASK_CONFIGS["total"]["sub_modes"]["fastest"]
    for config, folder in zip((fast, rough), task_weights("total", fast=True), strict=True):
        _write_result_folder(home / "nnunet" / "results", folder, config["trainer"], config["resample"], classes)


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    """An empty node models folder (``$MEDSEG_MODELS``), and no licence number in the environment."""
    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path / "models"))
    monkeypatch.delenv(LICENCE_ENV, raising=False)
    return tmp_path / "models"


@pytest.fixture
def offline(monkeypatch) -> list[str]:
    """Every attempt to reach another host fails (and is recorded): requests, urllib and raw sockets."""
    import requests

    attempts: list[str] = []

    def refuse(what: str, error: type[Exception] = OSError):
        def stop(*args, **kwargs):
            attempts.append(f"{what} {args[1:2]}")
            raise error(f"network blocked by the test ({what})")

        return stop

    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse("socket.connect")(sock, address)
        return real_connect(sock, address)  # local sockets (multiprocessing) stay allowed

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(requests.Session, "request", refuse("requests", requests.ConnectionError))
    monkeypatch.setattr("urllib.request.urlopen", refuse("urllib"))
    return attempts


def _spec(name: str, **options) -> ModelSpec:
    registry = load_registry()
    ref = registry.model(name)
    spec = ModelSpec.from_registry(ref, registry.datasets[ref.dataset])
    return dataclasses.replace(spec, options={**spec.options, **options})


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# --------------------------------------------------------------------------- the real package, end to end


@pytest.mark.slow
def test_total_fast_runs_end_to_end_on_a_phantom(models_dir, offline, phantom_factory):
    _install_total_fast(models_dir / "totalsegmentator")
    _, files = phantom_factory("CT")
    volume = read_series(choose_series(scan_folder(files.dicom_dir)))
    model = load_model(_spec("totalseg_total", fast=True), "cpu")
    assert isinstance(model, TotalSegmentatorModel)
    # By name, not by value: the catalogue numbers the ribs differently.
    assert model.labels[BONE] == (92,) and load_registry()["TotalSegmentator_v2"].label_values(BONE) == [94]

    prediction = model.predict(volume, [SOFT_TISSUE, BONE])

    assert prediction.grid.same_grid(volume.geometry) and prediction.interpolation == "nearest"
    soft = (volume.array > -250) & (volume.array <= 250)
    bone = volume.array > 250
    assert _dice(prediction.maps[SOFT_TISSUE] > 0, soft) > 0.95
    assert _dice(prediction.maps[BONE] > 0, bone) > 0.95
    assert not (prediction.maps[SOFT_TISSUE] > 0)[volume.array < -500].any()  # air stays background
    config = json.loads((models_dir / "totalsegmentator" / "config.json").read_text())
    assert config["send_usage_stats"] is False and config["prediction_counter"] == 1
    assert offline == []  # nothing tried to leave the machine


# --------------------------------------------------------------------------- refusals an operator can act on


def test_gated_task_is_refused_with_its_licence(models_dir, offline):
    assert catalogue()["heartchambers_highres"].gated
    (models_dir / "totalsegmentator").mkdir(parents=True)  # a home with other tasks
    with pytest.raises(LicenceRequiredError, match=LICENCE_URL) as refused:
        load_model(_spec("totalseg_heartchambers_highres"), "cpu")
    assert LICENCE_ENV in str(refused.value)
    with pytest.raises(LicenceRequiredError, match=LICENCE_URL):
        download_task(models_dir / "totalsegmentator", "heartchambers_highres")
    assert offline == []


def test_licence_number_unlocks_a_gated_task_up_to_its_weights(models_dir, monkeypatch):
    monkeypatch.setenv(LICENCE_ENV, "aca_0123456789ABCD")
    (models_dir / "totalsegmentator").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="medsegagent models install totalseg_heartchambers_highres") as refused:
        load_model(_spec("totalseg_heartchambers_highres"), "cpu")
    assert not isinstance(refused.value, LicenceRequiredError)


def test_missing_weights_say_how_to_install(models_dir):
    (models_dir / "totalsegmentator").mkdir(parents=True)
    with pytest.raises(
        ModelLoadError, match=r"Dataset913_lung_nodules.*medsegagent models install totalseg_lung_nodules"
    ):
        load_model(_spec("totalseg_lung_nodules"), "cpu")


def test_download_without_network_says_what_to_fetch(models_dir, offline):
    with pytest.raises(ConnectionError, match=rf"{RELEASES_URL}/.*/Dataset913_lung_nodules\.zip"):
        download_task(models_dir / "totalsegmentator", "lung_nodules")
    assert offline  # the downloader did try, and was stopped
    config = json.loads((models_dir / "totalsegmentator" / "config.json").read_text())
    assert config["send_usage_stats"] is False


def test_home_config_turns_statistics_off_and_keeps_the_rest(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(
        json.dumps({"totalseg_id": "totalseg_X", "send_usage_stats": True, "prediction_counter": 7})
    )
    prepare_home(home, "aca_0123456789ABCD")
    config = json.loads((home / "config.json").read_text())
    assert config == {
        "totalseg_id": "totalseg_X",
        "send_usage_stats": False,
        "prediction_counter": 7,
        "statistics_disclaimer_shown": True,
        "license_number": "aca_0123456789ABCD",
    }
    (home / "config.json").write_text("{torn")  # a concurrent writer's half file
    prepare_home(home)
    assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False


# --------------------------------------------------------------------------- the registry, from the package


def test_generated_registry_is_in_sync_with_the_package():
    registry_file = default_registry_file()
    assert check(registry_file) == [], "run `python -m medsegagent.models.totalseg generate`"
    assert "DO NOT EDIT" in generated_file(registry_file).read_text().splitlines()[0]


def test_every_task_is_a_reference_with_its_licence():
    from totalsegmentator.registry import TASKS, requires_license

    registry = load_registry()
    refs = {r.options["task"]: r for r in registry.models() if r.backend is Backend.TOTALSEGMENTATOR}
    open_tasks = {t for t in TASKS if not requires_license(t)} - {"test", "total_highres_test"}
    assert len(open_tasks) >= 30 and open_tasks <= set(refs)
    assert {t for t in TASKS if requires_license(t)} <= set(refs)
    for task, ref in refs.items():
        assert ref.licence is not None and ref.licence.gated == requires_license(task), task
        assert ref.location == "${MEDSEG_MODELS}/totalsegmentator" and ref.source is not None
        assert tuple(ref.options["weights"]) == task_weights(task), task
    assert {refs[t].dataset for t in ATTACHED} == set(ATTACHED.values())


def test_task_weights_follow_the_package():
    from totalsegmentator.libs import download_pretrained_weights

    assert task_weights("total", fast=True) == (
        "Dataset297_TotalSegmentator_total_3mm_1559subj",
        "Dataset298_TotalSegmentator_total_6mm_1559subj",
    )
    assert task_weights("lung_nodules") == ("Dataset913_lung_nodules", "Dataset298_TotalSegmentator_total_6mm_1559subj")
    assert task_weights("teeth")[0] == "Dataset113_ToothFairy3"  # then craniofacial_structures, which it crops with
    assert "Dataset115_mandible" in task_weights("teeth")
    with pytest.raises(ValueError, match="no fast mode"):
        task_weights("lung_nodules", fast=True)
    assert RELEASES_URL in inspect.getsource(download_pretrained_weights)


def test_catalogue_labels_map_onto_total_mr_classes():
    registry = load_registry()
    ref = registry.model("totalseg_total_mr")
    spec = ModelSpec.from_registry(ref, registry.datasets[ref.dataset])
    assert "fibula" not in spec.labels and len(spec.labels) == 46  # total_mr has no leg bones or thigh muscles

    def never_called(**kwargs):  # pragma: no cover - only the mapping is under test
        raise AssertionError(kwargs)

    model = TotalSegmentatorModel(spec, "cpu", runner=never_called, class_map=catalogue()["total_mr"].classes)
    assert model.class_names["suprarenal_gland_left"] == "adrenal_gland_left"
    assert model.class_names["gluteus_medius_muscle_right"] == "gluteus_medius_right"


def test_fingerprint_covers_only_the_task(models_dir):
    registry = load_registry()
    nodules, cysts = registry.model("totalseg_lung_nodules"), registry.model("totalseg_kidney_cysts")
    for ref in (nodules, cysts):
        for path in ref.weights_paths:
            path.mkdir(parents=True, exist_ok=True)
            (path / "checkpoint_final.pth").write_bytes(path.name.encode())
    assert nodules.installed and cysts.installed and nodules.path == cysts.path
    before = weights_fingerprint(nodules)
    (cysts.weights_paths[0] / "checkpoint_final.pth").write_bytes(b"retrained")
    prepare_home(nodules.path)  # config.json changes with every prediction
    assert weights_fingerprint(nodules) == before
    (nodules.weights_paths[0] / "checkpoint_final.pth").write_bytes(b"retrained")
    assert weights_fingerprint(nodules) != before


@pytest.fixture(scope="module")
def router():
    from medsegagent.models.routing import Router

    return Router(load_registry())


@pytest.mark.parametrize(
    ("text", "dataset", "values"),
    [
        ("segment the lung nodules", "TotalSegmentator_lung_nodules", [2]),
        ("liver segment 4", "TotalSegmentator_liver_segments", [4]),
        ("masseter muscles", "TotalSegmentator_head_muscles", [1, 2]),
        ("pleural effusion", "TotalSegmentator_pleural_pericard_effusion", [2]),
    ],
)
def test_router_selects_the_specialised_task(router, text, dataset, values):
    assert router.plan(text, "CT").selection.get(dataset) == values
