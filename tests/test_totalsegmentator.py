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
import io
import json
import os
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medsegagent.dicom.series import choose_series, read_series, scan_folder
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ModelLoadError, ModelSpec, load_model
from medsegagent.models.registry import Backend, load_registry
from medsegagent.models.totalseg import (
    LICENCE_ENV,
    LICENCE_URL,
    RELEASES_URL,
    DownloadError,
    LicenceRequiredError,
    TotalSegmentatorModel,
    catalogue,
    crop_classes,
    download_task,
    missing_weights,
    prepare_home,
    result_folder_complete,
    results_dir,
    task_weights,
    weights_sources,
)
from medsegagent.models.totalseg_registry import ATTACHED, check, default_registry_file, generated_file
from medsegagent.node.pipeline import weights_fingerprint
from tests.conftest import dice

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


def _stub_folder(results: Path, folder: str, trainer: str = "nnUNetTrainer") -> Path:
    """A complete result folder with placeholder files (what :func:`result_folder_complete` looks for)."""
    run = results / folder / f"{trainer}__nnUNetPlans__3d_fullres"
    (run / "fold_0").mkdir(parents=True)
    (run / "plans.json").write_text("{}")
    (run / "dataset.json").write_text("{}")
    (run / "fold_0" / "checkpoint_final.pth").write_bytes(folder.encode())
    return results / folder


def _zip_of(folder: str, *, checkpoint: bool = True) -> bytes:
    """A weights zip as TotalSegmentator publishes it: ``<folder>/<trainer>__<plans>__<configuration>/...``."""
    run = f"{folder}/nnUNetTrainer__nnUNetPlans__3d_fullres"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr(f"{run}/plans.json", "{}")
        zipped.writestr(f"{run}/dataset.json", "{}")
        if checkpoint:
            zipped.writestr(f"{run}/fold_0/checkpoint_final.pth", b"weights")
    return buffer.getvalue()


def _nothing_half_installed(home: Path) -> None:
    """Every result folder under the home is complete, and no staging folder is left."""
    results = results_dir(home)
    folders = list(results.iterdir()) if results.is_dir() else []
    assert all(result_folder_complete(p) for p in folders), folders
    assert not [p.name for p in home.iterdir() if p.name.startswith(".download-")]


@pytest.fixture
def weights_server(monkeypatch, offline) -> dict[str, bytes]:
    """A stand-in for the GitHub release server: URL -> zip bytes (anything else: 404); sockets stay blocked."""
    import requests

    served: dict[str, bytes] = {}

    def request(session, method, url, **kwargs):
        assert kwargs.get("timeout"), "a download without a timeout can hang for ever"
        response = requests.Response()
        response.url, response.status_code = url, 200 if url in served else 404
        response.raw = io.BytesIO(served.get(url, b"not found"))
        return response

    monkeypatch.setattr(requests.Session, "request", request)
    return served


def _small_ct() -> Volume:
    grid = Geometry((4, 5, 6), np.zeros(3), np.eye(3)[0], np.eye(3)[1], np.eye(3)[2], (2.0, 1.0, 1.0))
    return Volume(np.zeros(grid.shape, np.float32), grid, "CT", "2.25.1")


class _Runner:
    """A stand-in for ``totalsegmentator()``: records its arguments, returns an empty label map on the input grid."""

    def __init__(self, affine_shift: float = 0.0) -> None:
        self.calls: list[dict] = []
        self.affine_shift = affine_shift

    def __call__(self, **kwargs):
        import nibabel as nib

        self.calls.append(kwargs)
        image = kwargs["input"]
        affine = image.affine.copy()
        affine[0, 3] += self.affine_shift
        return nib.Nifti1Image(np.zeros(image.shape, np.uint8), affine)


def _stand_in(name: str, runner=None, **options) -> TotalSegmentatorModel:
    spec = _spec(name, **options)
    return TotalSegmentatorModel(
        spec, "cpu", runner=runner or _Runner(), class_map=catalogue()[spec.options["task"]].classes
    )


# --------------------------------------------------------------------------- the real package, end to end


@pytest.mark.slow
def test_total_fast_runs_end_to_end_on_a_phantom(models_dir, offline, phantom_factory):
    _install_total_fast(models_dir / "totalsegmentator")
    _, files = phantom_factory("CT")
    volume = read_series(choose_series(scan_folder(files.dicom_dir)))
    model = load_model(_spec("totalseg_total", fast=True, weights=list(task_weights("total", fast=True))), "cpu")
    assert isinstance(model, TotalSegmentatorModel)
    # By name, not by value: the catalogue numbers the ribs differently.
    assert model.labels[BONE] == (92,) and load_registry()["TotalSegmentator_v2"].label_values(BONE) == [94]

    prediction = model.predict(volume, [SOFT_TISSUE, BONE])

    assert prediction.grid.same_grid(volume.geometry) and prediction.interpolation == "nearest"
    soft = (volume.array > -250) & (volume.array <= 250)
    bone = volume.array > 250
    assert dice(prediction.maps[SOFT_TISSUE] > 0, soft) > 0.95
    assert dice(prediction.maps[BONE] > 0, bone) > 0.95
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
    how = r"Dataset913_lung_nodules.*medsegagent models install totalseg_lung_nodules"
    # No home yet (nothing installed on this node): the backend's own messages, not "does not exist".
    with pytest.raises(ModelLoadError, match=how):
        TotalSegmentatorModel(_spec("totalseg_lung_nodules"), "cpu")
    with pytest.raises(LicenceRequiredError, match=LICENCE_URL):
        TotalSegmentatorModel(_spec("totalseg_heartchambers_highres"), "cpu")
    assert not (models_dir / "totalsegmentator").exists()
    (models_dir / "totalsegmentator").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=how):
        load_model(_spec("totalseg_lung_nodules"), "cpu")


def test_download_without_network_says_what_to_fetch(models_dir, offline):
    home = models_dir / "totalsegmentator"
    with pytest.raises(ConnectionError, match=rf"{RELEASES_URL}/.*/Dataset913_lung_nodules\.zip"):
        download_task(home, "lung_nodules")
    assert offline  # the downloader did try, and was stopped
    config = json.loads((home / "config.json").read_text())
    assert config["send_usage_stats"] is False
    assert list(results_dir(home).iterdir()) == []  # nothing half-installed, no staging folder left
    _nothing_half_installed(home)


def test_download_installs_each_result_folder_whole(models_dir, weights_server):
    home = models_dir / "totalsegmentator"
    nodules, rough = weights_sources("lung_nodules")
    weights_server[nodules.url] = _zip_of(nodules.folder)
    weights_server[rough.url] = _zip_of(rough.folder, checkpoint=False)  # a zip that lacks the checkpoint

    with pytest.raises(DownloadError, match=rf"{rough.folder} .* not a complete nnU-Net result folder"):
        download_task(home, "lung_nodules")
    assert result_folder_complete(results_dir(home) / nodules.folder)  # the whole one is kept
    assert not (results_dir(home) / rough.folder).exists()
    _nothing_half_installed(home)

    weights_server[rough.url] = _zip_of(rough.folder)[:-200]  # cut short: no central directory
    with pytest.raises(DownloadError, match=f"{rough.folder} did not download"):
        download_task(home, "lung_nodules")
    _nothing_half_installed(home)

    # An older interrupted unzip left the folder without its checkpoint: it does not count, and is replaced.
    (results_dir(home) / rough.folder / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0").mkdir(parents=True)
    assert missing_weights(home, "lung_nodules") == [rough.folder]
    weights_server[rough.url] = _zip_of(rough.folder)
    download_task(home, "lung_nodules")
    assert missing_weights(home, "lung_nodules") == []
    _nothing_half_installed(home)

    del weights_server[nodules.url]  # complete folders are not fetched again
    killed = home / ".download-killed"  # the staging folder of an install killed two days ago
    (killed / "unpacked").mkdir(parents=True)
    os.utime(killed, (time.time() - 2 * 86400,) * 2)
    download_task(home, "lung_nodules")
    _nothing_half_installed(home)


def test_incomplete_weights_are_refused_at_load(models_dir):
    results = results_dir(models_dir / "totalsegmentator")
    nodules, rough = task_weights("lung_nodules")
    _stub_folder(results, rough)
    (_stub_folder(results, nodules) / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "plans.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"missing or incomplete .*{nodules}.*models install"):
        load_model(_spec("totalseg_lung_nodules"), "cpu")


def test_a_trainer_nnunet_lacks_is_a_load_error_naming_it(models_dir):
    results = results_dir(models_dir / "totalsegmentator")
    nodules, rough = task_weights("lung_nodules")
    _stub_folder(results, rough, trainer="nnUNetTrainer")
    _stub_folder(results, nodules, trainer="nnUNetTrainerNoSuchVariant")
    with pytest.raises(ModelLoadError, match=r"totalseg_lung_nodules.*'nnUNetTrainerNoSuchVariant'"):
        load_model(_spec("totalseg_lung_nodules"), "cpu")


def test_weights_that_are_not_the_task_s_are_refused(models_dir):
    fast = list(task_weights("total", fast=True))
    (models_dir / "totalsegmentator").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=re.escape(f"set options.weights to {fast}")):
        load_model(_spec("totalseg_total", fast=True), "cpu")  # fast mode with the default mode's folders


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


# --------------------------------------------------------------------------- the backend around the package's call


def test_total_v3_asks_for_a_subset_only_when_the_crop_model_has_it(models_dir):
    assert "vertebrae_L6" in catalogue()["total_v3"].classes.values()
    assert "vertebrae_L6" not in crop_classes("total_v3")  # python_api crops total_v3 with total's rough model
    runner = _Runner()
    model = _stand_in("totalseg_total_v3", runner)
    model.predict(_small_ct(), ["liver", "vertebrae_L5"])
    model.predict(_small_ct(), ["liver", "vertebrae_L6"])
    assert runner.calls[0]["roi_subset"] == ["liver", "vertebrae_L5"]
    assert "roi_subset" not in runner.calls[1]  # the whole task, instead of python_api's KeyError
    with pytest.raises(ModelLoadError, match=r"roi_subset \['vertebrae_L6'\]"):
        _stand_in("totalseg_total_v3", roi_subset=["liver", "vertebrae_L6"])


def test_a_label_map_off_the_input_grid_is_refused(models_dir):
    model = _stand_in("totalseg_lung_nodules", _Runner(affine_shift=0.01))
    with pytest.raises(ValueError, match=r"totalseg_lung_nodules.*affine"):
        model.predict(_small_ct())
    assert _stand_in("totalseg_lung_nodules", _Runner(affine_shift=0.0005)).predict(_small_ct()).maps


def test_every_served_label_maps_onto_a_class_by_name():
    registry = load_registry()
    for ref in (r for r in registry.models() if r.backend is Backend.TOTALSEGMENTATOR):
        spec = ModelSpec.from_registry(ref, registry.datasets[ref.dataset])
        model = TotalSegmentatorModel(spec, "cpu", runner=_Runner(), class_map=catalogue()[ref.options["task"]].classes)
        assert set(model.labels) == set(spec.labels), ref.name
        for label, name in model.class_names.items():
            assert name == ref.options.get("class_names", {}).get(label, label), (ref.name, label)
    spec = _spec("totalseg_total")
    unmapped = dataclasses.replace(spec, labels={**spec.labels, "rib_left_13": (92,)})  # 92 is TS's rib_left_1
    with pytest.raises(ModelLoadError, match=r"'rib_left_13' is not a class .* options.class_names"):
        TotalSegmentatorModel(unmapped, "cpu", runner=_Runner(), class_map=catalogue()["total"].classes)


def test_prepare_home_waits_for_a_run_that_rewrites_config_json(models_dir):
    home = models_dir / "totalsegmentator"
    path = prepare_home(home, "aca_0123456789ABCD")
    started = threading.Event()

    def counting_runner(**kwargs):  # config.increase_prediction_counter: rewrites the file in place
        config = json.loads(path.read_text())
        with path.open("w") as handle:  # truncated: a reader now sees an empty file
            started.set()
            time.sleep(0.3)
            json.dump({**config, "prediction_counter": config["prediction_counter"] + 1}, handle)
        return _Runner()(**kwargs)

    model = _stand_in("totalseg_lung_nodules", counting_runner)
    run = threading.Thread(target=model.predict, args=(_small_ct(),))
    run.start()
    assert started.wait(10)
    prepare_home(home)  # a model loading meanwhile
    run.join()
    config = json.loads(path.read_text())
    assert config["license_number"] == "aca_0123456789ABCD" and config["totalseg_id"] == "totalseg_medsegagent"
    assert config["prediction_counter"] == 1


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
            if not path.exists():  # the rough model is shared
                _stub_folder(path.parent, path.name)
    assert nodules.installed and cysts.installed and nodules.path == cysts.path
    checkpoint = Path("nnUNetTrainer__nnUNetPlans__3d_fullres", "fold_0", "checkpoint_final.pth")
    before = weights_fingerprint(nodules)
    (cysts.weights_paths[0] / checkpoint).write_bytes(b"retrained")
    prepare_home(nodules.path)  # config.json changes with every prediction
    assert weights_fingerprint(nodules) == before
    (nodules.weights_paths[0] / checkpoint).write_bytes(b"retrained")
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
