"""Geometry and resampling: masks must land on the voxels they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsegagent.dicom.volume import Geometry
from medsegagent.models import resample as resample_module
from medsegagent.models.resample import (
    BoxedMap,
    derived_grid,
    intersect_boxes,
    mask_reach,
    model_grid,
    resample,
    resample_boxed,
    target_grid,
)


def _oblique_geometry(shape=(20, 40, 48)) -> Geometry:
    angle = np.radians(17)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    col = np.array([-np.sin(angle) * np.cos(0.2), np.cos(angle) * np.cos(0.2), np.sin(0.2)])
    col /= np.linalg.norm(col)
    return Geometry(shape, (-100.0, -80.0, 20.0), row, col, np.cross(row, col), (3.0, 2.0, 1.5))


def _ball(geometry: Geometry, centre, radius) -> np.ndarray:
    points = geometry.voxel_centres()
    return np.linalg.norm(points - np.asarray(centre), axis=-1) <= radius


def test_affine_round_trip():
    geo = _oblique_geometry()
    idx = np.array([[3.0, 5.0, 7.0], [0.0, 0.0, 0.0], [47.0, 39.0, 19.0]])
    lps = geo.index_to_lps(idx[:, 0], idx[:, 1], idx[:, 2])
    np.testing.assert_allclose(geo.lps_to_index(lps), idx, atol=1e-9)
    np.testing.assert_allclose(geo.slice_position(2), geo.origin + 2 * 3.0 * geo.normal)


def test_geometry_rejects_bad_directions():
    with pytest.raises(ValueError, match="unit vector"):
        Geometry((2, 2, 2), (0, 0, 0), (2, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="orthogonal"):
        Geometry((2, 2, 2), (0, 0, 0), (1, 0, 0), (1, 0, 0), (0, 0, 1), (1, 1, 1))


def test_model_grid_covers_source():
    geo = _oblique_geometry()
    grid = model_grid(geo, (32, 32, 16))
    assert grid.shape == (16, 32, 32)
    corners = geo.index_to_lps(np.array([0, 47]), np.array([0, 39]), np.array([0, 19]))
    inside = grid.lps_to_index(corners)
    assert (inside >= -1e-6).all()
    assert (inside <= np.array([31, 31, 15]) + 1e-6).all()


def test_mask_round_trip_keeps_dice():
    """A mask sent to a model grid and back keeps >= 0.99 Dice (linear probabilities)."""
    geo = _oblique_geometry((40, 96, 96))
    mask = _ball(geo, geo.index_to_lps(48, 48, 20), 35.0)
    grid = model_grid(geo, (160, 160, 120))
    there = resample(mask.astype(np.float32), geo, grid)
    back = resample(there, grid, geo) > 0.5
    dice = 2 * (mask & back).sum() / (mask.sum() + back.sum())
    assert dice >= 0.99, dice


def test_nearest_resample_identity_on_same_grid():
    geo = _oblique_geometry()
    labels = np.random.default_rng(0).integers(0, 4, geo.shape).astype(np.float32)
    np.testing.assert_array_equal(resample(labels, geo, geo, mode="nearest"), labels)


def test_axis_permutation_is_exact():
    """A sagittal grid resampled onto an axial grid of the same voxels is a pure permutation."""
    axial = Geometry((6, 7, 8), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1))
    sagittal = Geometry((8, 7, 6), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1))
    data = np.random.default_rng(1).random(axial.shape).astype(np.float32)
    moved = resample(data, axial, sagittal, mode="nearest")
    np.testing.assert_allclose(moved, data.transpose(2, 1, 0))


# --------------------------------------------------------------------------- model grids


def _old_model_grid(source: Geometry, size, foreground=None, margin_mm=10.0) -> Geometry:
    """The demo models were trained on this grid: it must not move."""
    lo_idx, hi_idx = np.zeros(3), np.array(source.shape, dtype=float) - 1
    margin = 0.0
    if foreground is not None and foreground.any():
        hits = [np.flatnonzero(foreground.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        lo_idx = np.array([h[0] for h in hits], dtype=float)
        hi_idx = np.array([h[-1] for h in hits], dtype=float)
        margin = margin_mm
    corners = np.array(
        [[c, r, s] for c in (lo_idx[2], hi_idx[2]) for r in (lo_idx[1], hi_idx[1]) for s in (lo_idx[0], hi_idx[0])]
    )
    points = source.index_to_lps(corners[:, 0], corners[:, 1], corners[:, 2])
    low, high = points.min(axis=0) - margin, points.max(axis=0) + margin
    n = np.array(size)
    spacing = np.maximum((high - low) / np.maximum(n - 1, 1), 1e-3)
    return Geometry((n[2], n[1], n[0]), low, (1, 0, 0), (0, 1, 0), (0, 0, 1), tuple(spacing[::-1]))


@pytest.mark.parametrize("crop", [False, True])
def test_fixed_size_grid_is_the_demo_models_grid(crop):
    geo = _oblique_geometry()
    foreground = _ball(geo, geo.index_to_lps(20, 20, 10), 25.0) if crop else None
    assert model_grid(geo, (32, 24, 16), foreground).same_grid(_old_model_grid(geo, (32, 24, 16), foreground), 1e-9)
    assert target_grid(geo, size=(32, 24, 16), foreground=foreground).same_grid(
        model_grid(geo, (32, 24, 16), foreground)
    )


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_reorientation_without_resampling_is_exact(orientation):
    """A sagittal series on a canonical grid at its own spacing: every voxel centre is kept, labels survive exactly."""
    sagittal = Geometry((8, 7, 6), (10.0, -5.0, 30.0), (0, 1, 0), (0, 0, -1), (-1, 0, 0), (2.0, 1.5, 3.0))
    grid = target_grid(sagittal, orientation=orientation)
    assert grid.shape == (7, 6, 8)  # z from the rows, y from the columns, x from the slices
    np.testing.assert_allclose(grid.spacing, (1.5, 3.0, 2.0))
    sign = 1.0 if orientation == "LPS" else -1.0
    np.testing.assert_allclose(grid.row_direction, [sign, 0, 0])
    labels = np.random.default_rng(2).integers(0, 5, sagittal.shape).astype(np.float32)
    there = resample(labels, sagittal, grid, mode="nearest")
    np.testing.assert_array_equal(np.sort(there.ravel()), np.sort(labels.ravel()))
    np.testing.assert_array_equal(resample(there, grid, sagittal, mode="nearest"), labels)


def test_native_grid_and_spacing_grid():
    geo = _oblique_geometry()
    assert target_grid(geo, orientation="native") is geo
    same = target_grid(geo, orientation="native", spacing=(1.5, 2.0, 3.0))
    assert same.same_grid(geo)  # whole voxels of the source spacing: the source grid itself
    coarse = target_grid(geo, spacing=(4.0, 4.0, 4.0), foreground=np.ones(geo.shape, bool), margin_mm=8.0)
    np.testing.assert_allclose(coarse.spacing, (4.0, 4.0, 4.0))
    corners = geo.index_to_lps(np.array([0, 47]), np.array([0, 39]), np.array([0, 19]))
    inside = coarse.lps_to_index(corners)
    assert (inside >= 2 - 1e-6).all()  # two voxels (8 mm) of margin on every side
    assert (inside <= np.array(coarse.shape[::-1]) - 3 + 1e-6).all()
    with pytest.raises(ValueError, match="orientation"):
        target_grid(geo, orientation="RAI")


def test_derived_grid_describes_transpose_crop_and_stride():
    geo = _oblique_geometry((10, 12, 14))
    data = np.random.default_rng(3).random(geo.shape).astype(np.float32)
    # An array that library code made: transposed to (columns, slices, rows), cropped, every 2nd slice.
    made = data.transpose(2, 0, 1)[3:11, 1:9:2, 2:10]
    grid = derived_grid(geo, (2, 0, 1), made.shape, start=(3, 1, 2), step=(1, 2, 1))
    np.testing.assert_allclose(resample(made, grid, geo, mode="nearest")[1:9:2, 2:10, 3:11], data[1:9:2, 2:10, 3:11])
    flipped = derived_grid(geo, (0, 1, 2), geo.shape, start=(9, 0, 0), step=(-1, 1, 1))
    np.testing.assert_allclose(resample(data[::-1], flipped, geo, mode="nearest"), data)


def test_outside_value_beyond_the_source_extent():
    small = Geometry((4, 4, 4), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1))
    big = Geometry((8, 8, 8), (-2, -2, -2), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1))
    out = resample(np.ones(small.shape, np.float32), small, big, outside=0.0)
    assert out[2:6, 2:6, 2:6].min() == 1.0  # the border value inside the extent
    assert out.sum() == 64.0  # and nothing beyond it
    assert resample(np.ones(small.shape, np.float32), small, big).min() == 1.0  # default: border extended


def test_boxed_resample_equals_the_dense_one_and_round_trips():
    geo = _oblique_geometry((40, 96, 96))
    mask = _ball(geo, geo.index_to_lps(60, 40, 18), 22.0)
    grid = target_grid(geo, spacing=(3.0, 3.0, 3.0))
    prob = resample(mask.astype(np.float32), geo, grid)
    boxed = resample_boxed(prob, grid, geo, support=1e-3)
    assert np.prod(boxed.data.shape) < 0.2 * mask.size  # only the ball's box was computed
    dense = resample(prob, grid, geo, outside=0.0)
    dense[dense <= 1e-3] = 0.0
    np.testing.assert_allclose(boxed.dense(), dense, atol=1e-3)
    # A faint softmax tail far away does not stretch the box (default support 0.05)...
    tail = prob.copy()
    tail[0, 0, 0] = 0.02
    assert resample_boxed(tail, grid, geo).box == resample_boxed(prob, grid, geo).box
    # ...a real second blob does.
    tail[0, 0, 0] = 0.9
    assert resample_boxed(tail, grid, geo).box != resample_boxed(prob, grid, geo).box
    back = boxed.dense() > 0.5
    assert 2 * (mask & back).sum() / (mask.sum() + back.sum()) >= 0.97
    assert resample_boxed(np.zeros(grid.shape, np.float32), grid, geo).is_empty


def test_boxed_map_rules():
    shape = (5, 6, 7)
    data = np.zeros(shape, np.float32)
    data[0, 2:4, 2:4] = 1.0
    boxed = BoxedMap.from_dense(data)
    assert boxed.box == (slice(0, 1), slice(2, 4), slice(2, 4))
    assert boxed.touches_border() and boxed.count() == 4
    np.testing.assert_array_equal(boxed.dense(), data)
    inner = np.zeros(shape, np.float32)
    inner[2, 2:4, 2:4] = 1.0
    assert not BoxedMap.from_dense(inner).touches_border()
    with pytest.raises(ValueError, match="does not fit"):
        BoxedMap(shape, (slice(0, 6), slice(0, 1), slice(0, 1)), np.zeros((6, 1, 1)))
    with pytest.raises(ValueError, match="does not match"):
        BoxedMap(shape, (slice(0, 2), slice(0, 1), slice(0, 1)), np.zeros((1, 1, 1)))


def _aligned_geometry(rng: np.random.Generator, perm, signs, shape) -> Geometry:
    axes = np.eye(3)[list(perm)] * np.asarray(signs)[:, None]
    return Geometry(shape, rng.uniform(-30, 30, 3), axes[0], axes[1], axes[2], tuple(rng.uniform(0.4, 5.0, 3)))


@pytest.mark.parametrize("seed", range(8))
def test_separable_path_equals_grid_sample_on_grids_sharing_axes(seed):
    """Grids whose axes are parallel (permuted, flipped, rescaled) are sampled axis by axis: same values."""
    rng = np.random.default_rng(seed)
    source = _aligned_geometry(rng, (0, 1, 2), (1, 1, 1), tuple(int(n) for n in rng.integers(2, 24, 3)))
    target = _aligned_geometry(
        rng, rng.permutation(3), rng.choice([-1, 1], 3), tuple(int(n) for n in rng.integers(2, 32, 3))
    )
    data = rng.random(source.shape).astype(np.float32)
    index_map = np.linalg.inv(source.affine) @ target.affine
    axes = resample_module._aligned_axes(index_map, target.shape)
    assert axes is not None
    tensor = torch.from_numpy(data)[None]
    for mode, fill, outside in [
        ("linear", None, None),
        ("linear", -5.0, 0.0),
        ("nearest", None, 0.0),
        ("linear", None, 0.0),
    ]:
        fast = resample_module._resample_separable(tensor, axes, target.shape, mode, fill, outside)
        slow = resample_module._resample_grid(tensor[None], index_map, source.shape, target.shape, mode, fill, outside)
        np.testing.assert_allclose(fast, slow, atol=1e-4, err_msg=f"{mode} fill={fill} outside={outside}")
    # An oblique target is not separable: it goes through grid_sample.
    assert (
        resample_module._aligned_axes(np.linalg.inv(source.affine) @ _oblique_geometry().affine, (20, 40, 48)) is None
    )


def test_mask_reach_and_within_bound_the_boxed_resample():
    geo = _oblique_geometry((40, 96, 96))
    grid = target_grid(geo, spacing=(3.0, 3.0, 3.0))
    prob = resample(_ball(geo, geo.index_to_lps(60, 40, 18), 22.0).astype(np.float32), geo, grid)
    prob[prob < 0.2] *= 0.5  # a faint tail beyond the mask
    whole = resample_boxed(prob, grid, geo)
    reach = mask_reach(prob, grid, geo)
    assert reach is not None
    inside = np.zeros(geo.shape, bool)
    inside[reach] = True
    assert not (whole.dense() > 0.5)[~inside].any()  # nothing above 0.5 escapes the reach
    part = resample_boxed(prob, grid, geo, within=reach)
    assert part.box == intersect_boxes(whole.box, reach)
    np.testing.assert_allclose(part.data, whole.dense()[part.box], atol=1e-5)  # float32 sampling positions
    assert mask_reach(np.zeros(grid.shape, np.float32), grid, geo) is None
    far = (slice(0, 1), slice(0, 1), slice(0, 1))
    assert resample_boxed(prob, grid, geo, within=far).is_empty


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resampling_runs_on_cuda_when_present_and_matches_the_cpu():
    """The ensemble resamples model outputs on the GPU when there is one (map_device); same values as the CPU."""
    assert resample_module.map_device().type == "cuda"
    rng = np.random.default_rng(5)
    aligned = _aligned_geometry(rng, (1, 0, 2), (1, -1, 1), (12, 20, 16))
    source = _aligned_geometry(rng, (0, 1, 2), (1, 1, 1), (10, 14, 18))
    data = rng.random(source.shape).astype(np.float32)
    for target in (aligned, _oblique_geometry()):  # the separable path and grid_sample
        for mode in ("linear", "nearest"):
            on_gpu = resample(data, source, target, mode=mode, outside=0.0, device="cuda")
            on_cpu = resample(data, source, target, mode=mode, outside=0.0)
            np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)
    geo = _oblique_geometry((40, 96, 96))
    grid = target_grid(geo, spacing=(3.0, 3.0, 3.0))
    prob = resample(_ball(geo, geo.index_to_lps(60, 40, 18), 22.0).astype(np.float32), geo, grid)
    boxed = resample_boxed(prob, grid, geo)
    np.testing.assert_allclose(boxed.dense(), resample(prob, grid, geo, outside=0.0) * (boxed.dense() > 0), atol=1e-4)
