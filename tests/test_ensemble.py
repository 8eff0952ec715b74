"""Rank-aware fusion rules."""

from __future__ import annotations

import numpy as np
import pytest

from medsegagent.models.ensemble import (
    FusionRules,
    Member,
    OnDemand,
    StudyTarget,
    fuse_study,
    fuse_target,
    placement_evidence,
    resolve_overlaps,
    study_misplaced,
    study_outliers,
)
from medsegagent.models.resample import BoxedMap


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


def test_tied_members_share_a_rank_and_a_weight():
    members = [Member("b", _box(), (-0.9,)), Member("a", _box(), (-0.9,)), Member("c", _box(), (-0.7,))]
    result = fuse_target("liver", members, voxel_ml=0.001)
    assert result.ranks == {"a": 1, "b": 1, "c": 3}
    assert result.weights == pytest.approx({"a": 3 / 7, "b": 3 / 7, "c": 1 / 7})


def test_dropping_a_member_keeps_the_others_ranks():
    """Weights use ranks among all candidates: dropping rank 1 leaves 1/2 and 1/3, normalised."""
    members = [
        Member("best", np.zeros((10, 10, 10), np.float32), (-0.95,)),
        Member("second", _box(), (-0.9,)),
        Member("third", _box(), (-0.8,)),
    ]
    result = fuse_target("spleen", members, voxel_ml=0.001)
    assert result.weights == pytest.approx({"second": 0.6, "third": 0.4})
    assert result.ranks == {"best": 1, "second": 2, "third": 3}


def test_worked_example_of_the_docs():
    """docs/ensemble.md: three liver members, one voxel each of three kinds."""
    p1 = np.array([0.9, 0.4, 0.2], np.float32).reshape(1, 1, 3)
    p2 = np.array([0.8, 0.7, 0.1], np.float32).reshape(1, 1, 3)
    p3 = np.array([0.6, 0.9, 0.9], np.float32).reshape(1, 1, 3)
    members = [Member("A", p1, (-0.96,)), Member("B", p2, (-0.95,)), Member("C", p3, (-0.90,))]
    result = fuse_target("liver", members, voxel_ml=1.0)
    assert result.weights == pytest.approx({"A": 6 / 11, "B": 3 / 11, "C": 2 / 11})
    np.testing.assert_allclose(result.score.ravel(), [9.0 / 11, 6.3 / 11, 3.3 / 11], atol=1e-6)
    assert resolve_overlaps([result]).ravel().tolist() == [1, 1, 0]
    # B returns nothing: A and C are re-weighted over 1/1 + 1/3.
    members[1] = Member("B", np.zeros_like(p2), (-0.95,))
    without_b = fuse_target("liver", members, voxel_ml=1.0)
    assert without_b.weights == pytest.approx({"A": 0.75, "C": 0.25})
    np.testing.assert_allclose(without_b.score.ravel()[1], 0.525, atol=1e-6)


def test_minimum_volume_is_waived_for_structures_cut_by_the_field_of_view():
    inside = _box(shape=(20, 20, 20), lo=8, hi=11)  # 27 mL: below the minimum, fully in view
    cut = np.zeros((20, 20, 20), np.float32)
    cut[0:3, 8:11, 8:11] = 1.0  # same size, touching the first slice
    kept = fuse_target("liver", [Member("m", cut)], voxel_ml=1.0, volume_range_ml=(600, 4500))
    assert kept.weights == {"m": 1.0}
    dropped = fuse_target("liver", [Member("m", inside)], voxel_ml=1.0, volume_range_ml=(600, 4500))
    assert "implausible volume 27.0 mL" in dropped.dropped["m"]
    huge = np.ones((20, 20, 20), np.float32)  # touches the border too, but the maximum always applies
    assert (
        "implausible"
        in fuse_target("liver", [Member("m", huge)], voxel_ml=1.0, volume_range_ml=(600, 4500)).dropped["m"]
    )


def test_speckled_member_is_dropped_unless_speckle_is_allowed():
    rng = np.random.default_rng(0)
    noisy = np.clip(_box(shape=(30, 30, 30), lo=10, hi=16) + rng.normal(0, 0.3, (30, 30, 30)), 0, 1).astype(np.float32)
    clean = _box(shape=(30, 30, 30), lo=10, hi=16)
    members = [Member("noisy", noisy, (-0.9,)), Member("clean", clean, (-0.8,))]
    result = fuse_target("kidney", members, voxel_ml=0.01, max_speckle_share=0.25, speckle_ml=0.5)
    assert "speckled output" in result.dropped["noisy"]
    assert result.weights == {"clean": 1.0}
    lesions = fuse_target("lesion", members, voxel_ml=0.01)  # no speckle check: both kept
    assert set(lesions.weights) == {"noisy", "clean"}
    tiny = _box(shape=(30, 30, 30), lo=10, hi=13)  # 0.27 mL: smaller than a speckle, but in one piece
    kept = fuse_target("chiasm", [Member("m", tiny)], voxel_ml=0.01, max_speckle_share=0.25, speckle_ml=0.5)
    assert kept.weights == {"m": 1.0}


def test_outlier_among_three_is_dropped_and_of_two_the_rank_decides():
    a, b = _box(shape=(20, 20, 20), lo=5, hi=12), _box(shape=(20, 20, 20), lo=6, hi=13)
    shifted = np.roll(a, 8, axis=0)
    members = [Member("shifted", shifted, (-0.99,)), Member("a", a, (-0.9,)), Member("b", b, (-0.8,))]
    result = fuse_target("organ", members, voxel_ml=1.0, min_agreement=0.5)
    assert "disagrees with the other members" in result.dropped["shifted"]
    assert result.weights == pytest.approx({"a": 0.6, "b": 0.4})
    # Two that disagree: no majority, the rank decides (right or wrong, it is one clean mask, not a blend).
    two = fuse_target("organ", members[:2], voxel_ml=1.0, min_agreement=0.5)
    assert two.weights == {"shifted": 1.0} and "no majority" in two.dropped["a"]
    agreeing = fuse_target("organ", members[1:], voxel_ml=1.0, min_agreement=0.5)
    assert set(agreeing.weights) == {"a", "b"}


def test_boxed_and_lazy_members_fuse_like_dense_ones():
    rng = np.random.default_rng(1)
    dense = [np.where(_box(lo=lo, hi=lo + 4) > 0, rng.random((10, 10, 10)), 0).astype(np.float32) for lo in (1, 3, 5)]
    reference = fuse_target("t", [Member(f"m{i}", p, (i,)) for i, p in enumerate(dense)], voxel_ml=1.0)
    calls = []

    def lazy(i):
        def make():
            calls.append(i)
            return BoxedMap.from_dense(dense[i])

        return make

    fused = fuse_target("t", [Member(f"m{i}", lazy(i), (i,)) for i in range(3)], voxel_ml=1.0)
    assert sorted(calls) == [0, 1, 2]  # each map made once, on demand
    np.testing.assert_allclose(fused.score, reference.score, atol=1e-6)
    assert fused.score_map.box != (slice(0, 10),) * 3  # the score covers the members' union box only


def test_resolve_overlaps_matches_the_dense_argmax():
    rng = np.random.default_rng(2)
    shape = (12, 12, 12)
    results = []
    for lo in (0, 3, 6):
        score = np.zeros(shape, np.float32)
        score[lo : lo + 6, 2:10, lo : lo + 6] = rng.random((6, 8, 6))
        results.append(fuse_target(f"t{lo}", [Member("m", score)], voxel_ml=1.0))
    scores = np.stack([r.score for r in results])
    best = np.argmax(scores, axis=0)
    expected = np.where(np.take_along_axis(scores, best[None], 0)[0] > 0.5, best + 1, 0)
    np.testing.assert_array_equal(resolve_overlaps(results), expected)
    with pytest.raises(ValueError, match="nothing to fuse"):
        resolve_overlaps([])


def _organs(shift: int = 0) -> dict[str, np.ndarray]:
    """Two box organs on a 40^3 grid, optionally moved ``shift`` voxels along the last axis."""
    out = {}
    for name, lo in (("liver", 5), ("spleen", 22)):
        p = np.zeros((40, 40, 40), np.float32)
        p[lo : lo + 12, 10:30, lo + shift : lo + 12 + shift] = 1.0
        out[name] = p
    return out


def _image() -> np.ndarray:
    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 5.0, (40, 40, 40)).astype(np.float32)  # fat around the organs
    truth = _organs()
    image[truth["liver"] > 0] += 60.0
    image[truth["spleen"] > 0] += 45.0
    return image


def test_study_outlier_is_the_model_the_image_contradicts():
    right, shifted = _organs(), _organs(shift=7)
    maps = {
        "top": {k: BoxedMap.from_dense(v) for k, v in shifted.items()},
        "second": {k: BoxedMap.from_dense(v) for k, v in right.items()},
    }
    outliers = study_outliers(maps, _image())
    assert list(outliers) == ["top"] and "image sides with second in 2" in outliers["top"]
    assert study_outliers(maps, np.zeros((40, 40, 40), np.float32)) == {}  # no image evidence: no verdict
    close = {"top": {k: BoxedMap.from_dense(v) for k, v in _organs(shift=1).items()}, "second": maps["second"]}
    assert study_outliers(close, _image()) == {}  # ordinary disagreement is not a conflict


def test_fuse_study_drops_a_whole_model_and_keeps_the_ranks():
    right, shifted = _organs(), _organs(shift=7)
    targets = [
        StudyTarget(name, [Member("top", shifted[name], (-0.99,)), Member("second", right[name], (-0.9,))])
        for name in ("liver", "spleen")
    ]
    results = fuse_study(targets, voxel_ml=1.0, shape=(40, 40, 40), image=_image())
    for result, name in zip(results, ("liver", "spleen"), strict=True):
        assert result.weights == {"second": 1.0} and result.ranks == {"top": 1, "second": 2}
        assert "across the study" in result.dropped["top"]
        np.testing.assert_array_equal(result.score > 0.5, right[name] > 0)
    without_image = fuse_study(targets, voxel_ml=1.0, shape=(40, 40, 40))
    assert set(without_image[0].weights) == {"top", "second"}  # no image, no per-target rules: both stay
    empty = fuse_study([StudyTarget("liver", [])], voxel_ml=1.0, shape=(40, 40, 40))
    assert empty[0].shape == (40, 40, 40) and not empty[0].weights


def test_placement_evidence_points_at_the_shifted_mask():
    right, shifted = _organs()["liver"], _organs(shift=3)["liver"]
    image = _image()
    p = placement_evidence(BoxedMap.from_dense(shifted), BoxedMap.from_dense(right), image)
    assert p is not None and p.offset == (0, 0, 3)  # a is b moved 3 voxels along the last axis
    assert p.rho_a > 0 > p.rho_b  # the shifted shape fits better at the right place, the right one worse at the wrong
    assert p.against_a > 0.8
    q = placement_evidence(BoxedMap.from_dense(right), BoxedMap.from_dense(shifted), image)
    assert q is not None and q.offset == (0, 0, -3) and q.against_a == pytest.approx(-p.against_a, abs=1e-6)
    # Best aligned as they are (same place, one a voxel larger all round): nothing to decide.
    larger = np.zeros_like(right)
    larger[4:18, 9:31, 4:18] = 1.0
    assert placement_evidence(BoxedMap.from_dense(larger), BoxedMap.from_dense(right), image) is None
    # No edges, no evidence either way.
    flat = placement_evidence(BoxedMap.from_dense(shifted), BoxedMap.from_dense(right), np.zeros_like(image))
    assert flat is not None and flat.against_a == pytest.approx(0.0, abs=1e-6)


def test_placement_evidence_on_a_thin_volume_far_apart_and_with_nan():
    # One slice, the same square 320 voxels apart: the offset is found from the centroids, the edge map is
    # padded along that axis only (not 320 slices deep), and a flat image gives no evidence.
    image = np.zeros((1, 64, 400), np.int16)
    a, b = np.zeros(image.shape, np.float32), np.zeros(image.shape, np.float32)
    a[0, 10:40, 10:40] = 1.0
    b[0, 10:40, 330:360] = 1.0
    far = placement_evidence(BoxedMap.from_dense(a), BoxedMap.from_dense(b), image)
    assert far is not None and far.offset == (0, 0, -320) and far.against_a == 0.0
    # A NaN in the image does not silence the rule.
    right, shifted = _organs()["liver"], _organs(shift=3)["liver"]
    noisy = _image().astype(np.float32)
    noisy[0, 0, 0] = np.nan
    p = placement_evidence(BoxedMap.from_dense(shifted), BoxedMap.from_dense(right), noisy)
    assert p is not None and np.isfinite(p.against_a) and p.against_a > 0.8


def test_misplaced_top_member_is_dropped_when_the_image_contradicts_it():
    right, shifted = _organs()["liver"], _organs(shift=3)["liver"]
    members = [Member("top", shifted, (-0.99,)), Member("second", right, (-0.9,))]
    result = fuse_target("liver", members, voxel_ml=1.0, image=_image(), min_misplacement=0.8)
    assert result.weights == {"second": 1.0} and result.ranks == {"top": 1, "second": 2}
    reason = result.dropped["top"]
    assert reason.startswith(
        "misplaced: its mask fits the image's edges better moved by (0, 0, -3) voxels, onto second"
    )
    assert "placement evidence" in reason
    np.testing.assert_array_equal(result.score > 0.5, right > 0)
    # Without the image (or the rule) the top-ranked member decides, as before: weight 2/3 > 1/2.
    blind = fuse_target("liver", members, voxel_ml=1.0)
    assert set(blind.weights) == {"top", "second"} and not blind.dropped
    np.testing.assert_array_equal(blind.score > 0.5, shifted > 0)
    # The image decides before the rank does: shifted far enough to fail the agreement rule, still the right one stays.
    far = [Member("top", _organs(shift=8)["liver"], (-0.99,)), Member("second", right, (-0.9,))]
    decided = fuse_target("liver", far, voxel_ml=1.0, image=_image(), min_misplacement=0.8, min_agreement=0.5)
    assert decided.weights == {"second": 1.0} and "misplaced" in decided.dropped["top"]


def test_agreeing_members_are_untouched_by_the_placement_rule():
    right = _organs()["spleen"]
    larger = np.zeros_like(right)
    larger[21:35, 9:31, 21:35] = 1.0  # a model that draws the organ one voxel larger all round
    members = [Member("top", larger, (-0.99,)), Member("second", right, (-0.9,))]
    result = fuse_target("spleen", members, voxel_ml=1.0, image=_image(), min_misplacement=0.8)
    assert not result.dropped
    assert result.weights == pytest.approx({"top": 2 / 3, "second": 1 / 3})


def test_fuse_study_drops_a_model_misplaced_by_a_little_in_every_target():
    right, shifted = _organs(), _organs(shift=2)  # Dice 0.83: above the agreement gate, so only the image can tell
    targets = [
        StudyTarget(name, [Member("top", shifted[name], (-0.99,)), Member("second", right[name], (-0.9,))])
        for name in ("liver", "spleen")
    ]
    assert (
        study_outliers(
            {m: {n: BoxedMap.from_dense(v[n]) for n in v} for m, v in (("top", shifted), ("second", right))}, _image()
        )
        == {}
    )
    results = fuse_study(targets, voxel_ml=1.0, shape=(40, 40, 40), image=_image())
    for result, name in zip(results, ("liver", "spleen"), strict=True):
        assert result.weights == {"second": 1.0}
        assert result.dropped["top"].startswith("misplaced across the study")
        assert "over 2 targets" in result.dropped["top"]
        np.testing.assert_array_equal(result.score > 0.5, right[name] > 0)
    off = fuse_study(
        targets, voxel_ml=1.0, shape=(40, 40, 40), image=_image(), min_misplacement=None, min_study_misplacement=None
    )
    assert set(off[0].weights) == {"top", "second"}  # the rules can be switched off


def test_study_misplacement_sums_small_consistent_evidence():
    """S = sum(evidence) / sqrt(n): three targets at 0.35 each pass 0.5, one alone does not."""
    from medsegagent.models.ensemble import Placement

    box = BoxedMap.from_dense(_box())
    members = [[Member("a", box), Member("b", box)] for _ in range(3)]
    evidence = [{("a", "b"): Placement((0, 0, 1), 0.2, -0.15)} for _ in range(3)]
    verdict = study_misplaced(members, evidence, threshold=0.5)
    assert list(verdict) == ["a"] and "0.61 over 3 targets" in verdict["a"]
    assert study_misplaced(members[:1], evidence[:1], threshold=0.5) == {}  # one target: the per-target rule's job
    flipped = [{("a", "b"): Placement((0, 0, 1), -0.2, 0.15)} for _ in range(3)]
    assert list(study_misplaced(members, flipped, threshold=0.5)) == ["b"]


def test_on_demand_members_made_inside_the_target_region_give_the_same_labels():
    """Members made only where some member's mask can reach fuse to the labels of whole members."""
    rng = np.random.default_rng(4)
    shape = (30, 30, 30)
    maps = {}
    for model, shift in (("a", 0), ("b", 2)):
        for target, lo in (("liver", 3), ("spleen", 15)):
            p = (0.3 * rng.random(shape)).astype(np.float32)  # a faint tail everywhere
            p[lo + shift : lo + shift + 8, 5:20, lo : lo + 9] = rng.uniform(0.4, 1.0, (8, 15, 9))
            maps[model, target] = p
    made: list[tuple[str, str, tuple]] = []

    def on_demand(model, target):
        p = maps[model, target]

        def make(within=None):
            made.append((model, target, within))
            box = within or (slice(0, 30),) * 3
            out = np.zeros(shape, np.float32)
            out[box] = p[box]
            return BoxedMap.from_dense(out)

        return OnDemand(lambda: BoxedMap.from_dense(p, 0.5).box, make)

    def fuse(kind):
        targets = [
            StudyTarget(t, [Member(m, kind(m, t), (i,)) for i, m in enumerate("ab")], FusionRules((1.0, 5000.0)))
            for t in ("liver", "spleen")
        ]
        return resolve_overlaps(fuse_study(targets, voxel_ml=1.0, shape=shape))

    whole = fuse(lambda m, t: maps[m, t])
    np.testing.assert_array_equal(fuse(on_demand), whole)
    assert len(made) == 4 and all(w is not None and w != (slice(0, 30),) * 3 for _, _, w in made)
