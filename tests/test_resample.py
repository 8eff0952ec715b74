"""Geometry and resampling: masks must land on the voxels they came from."""

from __future__ import annotations

import numpy as np
import pytest

from medsegagent.dicom.volume import Geometry
from medsegagent.models.resample import model_grid, resample


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
