"""Rank-aware ensemble of per-label probability maps.

For a target ``t`` with members ``m_1 .. m_n`` ranked best first (registry
quality for that label, then dataset specificity), member ``m_r`` gets the
weight

    w_r = (1 / r) / sum_{k in kept} (1 / k)

and the fused score of a voxel is ``S_t(x) = sum_r w_r * p_{r,t}(x)``.  A
member whose mask (``p > 0.5``) is empty, or whose volume lies outside the
registry's plausible range for the label, is dropped before the weights are
normalised, so the others are re-weighted.  A voxel belongs to the target
with the highest fused score when that score exceeds ``threshold``; this
resolves overlaps between targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Member:
    """One model's opinion about one target.

    Attributes
    ----------
    model : str
        Model name.
    probability : numpy.ndarray
        Probability map on the source grid.
    rank_key : tuple
        Sort key, smaller is better (e.g. ``(-quality, -specificity, name)``).
    """

    model: str
    probability: np.ndarray
    rank_key: tuple = ()


@dataclass
class TargetResult:
    """Fused result for one target with the decisions that produced it."""

    target: str
    score: np.ndarray
    weights: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def fuse_target(
    target: str,
    members: list[Member],
    *,
    voxel_ml: float,
    volume_range_ml: tuple[float, float] | None = None,
) -> TargetResult:
    """Fuse the members of one target with rank-decaying weights.

    Parameters
    ----------
    target : str
        Target (label) name.
    members : list of Member
        Candidates for the target, any order.
    voxel_ml : float
        Volume of one voxel, for the plausibility check.
    volume_range_ml : tuple of float, optional
        Plausible ``(min, max)`` volume; members outside it are dropped.

    Returns
    -------
    TargetResult
        An all-zero score when every member was dropped.
    """
    ranked = sorted(members, key=lambda m: m.rank_key)
    ranks = {m.model: r for r, m in enumerate(ranked, start=1)}
    kept: list[tuple[int, Member]] = []
    dropped: dict[str, str] = {}
    for rank, member in enumerate(ranked, start=1):
        volume = float(np.count_nonzero(member.probability > 0.5)) * voxel_ml
        if volume == 0.0:
            dropped[member.model] = "empty output"
        elif volume_range_ml and not (volume_range_ml[0] <= volume <= volume_range_ml[1]):
            low, high = volume_range_ml
            dropped[member.model] = f"implausible volume {volume:.1f} mL (expected {low:g}-{high:g} mL)"
        else:
            kept.append((rank, member))
    if not kept:
        shape = members[0].probability.shape if members else (0,)
        return TargetResult(target, np.zeros(shape, np.float32), {}, ranks, dropped)
    raw = {member.model: 1.0 / rank for rank, member in kept}
    total = sum(raw.values())
    weights = {name: value / total for name, value in raw.items()}
    score = np.zeros(kept[0][1].probability.shape, dtype=np.float32)
    for _, member in kept:
        score += np.float32(weights[member.model]) * member.probability.astype(np.float32, copy=False)
    return TargetResult(target, score, weights, ranks, dropped)


def resolve_overlaps(results: list[TargetResult], threshold: float = 0.5) -> np.ndarray:
    """Label map ``1..len(results)`` (0 = background) by highest fused score.

    A voxel is assigned to target ``i`` when ``S_i`` is the largest fused
    score at that voxel and exceeds ``threshold``.
    """
    if not results:
        raise ValueError("nothing to fuse")
    scores = np.stack([r.score for r in results])
    best = np.argmax(scores, axis=0)
    peak = np.take_along_axis(scores, best[None], axis=0)[0]
    return np.where(peak > threshold, best + 1, 0).astype(np.uint8)
