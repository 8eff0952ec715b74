"""Rank-aware fusion rules."""

from __future__ import annotations

import numpy as np
import pytest

from medsegagent.models.ensemble import Member, fuse_target, resolve_overlaps


def _box(shape=(10, 10, 10), lo=2, hi=7) -> np.ndarray:
    p = np.zeros(shape, np.float32)
    p[lo:hi, lo:hi, lo:hi] = 1.0
    return p


def test_weights_fall_with_rank_and_sum_to_one():
    members = [Member("b", _box(), (-0.8,)), Member("a", _box(), (-0.9,)), Member("c", _box(), (-0.7,))]
    result = fuse_target("liver", members, voxel_ml=0.001)
    assert result.ranks == {"a": 1, "b": 2, "c": 3}
    assert result.weights["a"] > result.weights["b"] > result.weights["c"]
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert result.weights["a"] == pytest.approx(1 / (1 + 1 / 2 + 1 / 3))


def test_empty_member_is_dropped_and_rest_reweighted():
    members = [Member("best", np.zeros((10, 10, 10), np.float32), (-0.95,)), Member("second", _box(), (-0.9,))]
    result = fuse_target("spleen", members, voxel_ml=0.001)
    assert result.dropped == {"best": "empty output"}
    assert result.weights == {"second": 1.0}
    np.testing.assert_array_equal(result.score, _box())


def test_implausible_volume_is_dropped():
    huge = np.ones((10, 10, 10), np.float32)
    members = [Member("huge", huge, (-0.99,)), Member("ok", _box(), (-0.5,))]
    result = fuse_target("kidney", members, voxel_ml=1.0, volume_range_ml=(50, 500))
    assert "implausible volume 1000.0 mL" in result.dropped["huge"]
    assert list(result.weights) == ["ok"]


def test_all_dropped_gives_empty_score():
    result = fuse_target("x", [Member("m", np.zeros((4, 4, 4), np.float32))], voxel_ml=1.0)
    assert not result.score.any()
    assert result.weights == {}


def test_overlaps_go_to_higher_fused_score():
    a = fuse_target("a", [Member("m", np.full((2, 2, 2), 0.7, np.float32))], voxel_ml=1.0)
    b = fuse_target("b", [Member("m", np.full((2, 2, 2), 0.9, np.float32))], voxel_ml=1.0)
    c = fuse_target("c", [Member("m", np.full((2, 2, 2), 0.3, np.float32))], voxel_ml=1.0)
    labels = resolve_overlaps([a, b, c])
    assert (labels == 2).all()
    assert (resolve_overlaps([c]) == 0).all()
