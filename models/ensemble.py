"""Rank-aware ensemble of per-label probability maps.

For a target ``t`` with candidate members ``m_1 .. m_n`` ranked best first
(registry quality for that label, then dataset specificity), let ``K`` be the
members that survive the plausibility checks.  Member ``m_r`` in ``K`` gets
the weight

    w_r = (1 / r) / sum_{k in K} (1 / k)

(``r`` is its rank among *all* candidates, so dropping a member re-weights the
others without promoting them), and the fused score of a voxel is
``S_t(x) = sum_{r in K} w_r * p_{r,t}(x)``.  A member is dropped when its mask
(``p > 0.5``) is

* empty;
* of implausible volume: above the registry's maximum for the label, or below
  its minimum -- unless the mask touches the border of the volume, because a
  structure cut by the field of view can be arbitrarily small;
* speckled (optional, for structures that are not lesions): more than a
  given share of the mask lies in connected pieces, other than the largest,
  smaller than ``speckle_ml`` (noise, not anatomy; a structure smaller than
  that is its own largest piece);
* misplaced (optional, with the study's image): its own shape fits the
  image's edges better at another member's place than at its own, by more
  than that member's shape fits at its place (:func:`placement_evidence`);
  summed over a study's targets, the same evidence drops a model shifted as
  a whole (:func:`study_misplaced`);
* an outlier (optional): while three or more members remain, the one whose
  mean Dice with the others is lowest and below a given agreement; of two
  members that disagree that much, the lower-ranked (no majority to decide).

A voxel belongs to the target with the highest fused score when that score
exceeds ``threshold``; this resolves overlaps between targets.  Maps are
handled as :class:`~medsegagent.models.resample.BoxedMap` (support box plus
contents) so that fusing a handful of organs on a 512x512x300 CT stays in
the memory of a few organ boxes; see ``docs/ensemble.md`` for a worked
example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np
import torch

from medsegagent.models.resample import Box, BoxedMap, _support_box

__all__ = [
    "FusionRules",
    "Member",
    "OnDemand",
    "Placement",
    "StudyTarget",
    "TargetResult",
    "as_boxed",
    "fuse_study",
    "fuse_target",
    "placement_evidence",
    "rank_weights",
    "resolve_overlaps",
    "study_misplaced",
    "study_outliers",
]

#: Voxels of margin around a target's region (:func:`fuse_study`), against rounding at its edge.
REGION_MARGIN = 2


@dataclass(frozen=True)
class OnDemand:
    """A member's map, made when the ensemble needs it and only where it can matter.

    Every rule of the ensemble reads masks (``p > 0.5``), and a fused score
    above 0.5 needs a member above 0.5 (the weights sum to one), so
    :func:`fuse_study` makes a target's members only inside the union of
    their reaches: nothing outside it can become a voxel of the target.

    Attributes
    ----------
    reach : callable
        ``reach() -> box or None``: where on the study's grid the member's
        mask can be (``None``: nowhere), e.g. :meth:`Prediction.mask_box`.
    make : callable
        ``make(within=box) -> BoxedMap``: the map on the study's grid, only
        inside ``box`` (``None``: wherever it has support).
    """

    reach: Callable[[], Box | None]
    make: Callable[..., BoxedMap]


#: What a member's opinion may be: a dense map, a boxed map, or something that makes one on demand.
MapLike = np.ndarray | BoxedMap | OnDemand | Callable[[], "np.ndarray | BoxedMap"]


@dataclass(frozen=True)
class Member:
    """One model's opinion about one target.

    Attributes
    ----------
    model : str
        Model name.
    probability : array, BoxedMap or callable
        Probability map on the source grid, or a zero-argument callable that
        returns one (so the map is resampled only when the ensemble needs it).
    rank_key : tuple
        Sort key, smaller is better (e.g. ``(-quality, -specificity)``); members
        with equal keys share a rank.
    """

    model: str
    probability: MapLike
    rank_key: tuple = ()


@dataclass(frozen=True)
class FusionRules:
    """The plausibility rules :func:`fuse_target` applies to one target's members (its keyword arguments)."""

    #: Plausible volume of a mask in mL (``None``: any).
    volume_range_ml: tuple[float, float] | None = None
    #: Largest share of a mask allowed in pieces under ``speckle_ml`` (``None``: no limit; lesions).
    max_speckle_share: float | None = None
    speckle_ml: float = 0.5
    #: While three or more members remain, one whose mean Dice with the others is below this is an outlier.
    min_agreement: float | None = None


@dataclass(frozen=True)
class StudyTarget:
    """One target of a study, as :func:`fuse_study` fuses it: its members under its rules."""

    name: str
    members: Sequence[Member]
    rules: FusionRules = FusionRules()


class TargetResult:
    """Fused result for one target with the decisions that produced it.

    Parameters
    ----------
    target : str
        Target (label) name.
    score : numpy.ndarray or BoxedMap
        Fused score on the source grid.
    weights : dict, optional
        Model -> normalised weight of the kept members.
    ranks : dict, optional
        Model -> rank (1 = best) among all candidates.
    dropped : dict, optional
        Model -> why it was left out.
    agreement : float, optional
        Mean pairwise Dice of the members whose masks were plausible, before
        any was dropped for its place or for disagreeing; ``None`` with fewer
        than two such members (nothing to compare).
    """

    def __init__(
        self,
        target: str,
        score: np.ndarray | BoxedMap,
        weights: dict[str, float] | None = None,
        ranks: dict[str, int] | None = None,
        dropped: dict[str, str] | None = None,
        agreement: float | None = None,
    ) -> None:
        self.target = target
        self.score_map: BoxedMap = score if isinstance(score, BoxedMap) else BoxedMap.from_dense(score)
        self.weights: dict[str, float] = dict(weights or {})
        self.ranks: dict[str, int] = dict(ranks or {})
        self.dropped: dict[str, str] = dict(dropped or {})
        self.agreement = agreement

    @property
    def score(self) -> np.ndarray:
        """The fused score as a dense float32 array on the source grid."""
        return self.score_map.dense(np.float32)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the source grid."""
        return self.score_map.shape

    def __repr__(self) -> str:
        return f"TargetResult({self.target!r}, weights={self.weights}, dropped={self.dropped})"


def as_boxed(value: MapLike, within: Box | None = None) -> BoxedMap:
    """Materialise a member's map as a :class:`BoxedMap` (float32); an :class:`OnDemand` one only ``within``."""
    if isinstance(value, OnDemand):
        value = value.make(within=within)
    elif callable(value) and not isinstance(value, np.ndarray | BoxedMap):
        value = value()
    if isinstance(value, BoxedMap):
        if value.data.dtype != np.float32:
            return BoxedMap(value.shape, value.box, value.data.astype(np.float32))
        return value
    array = np.asarray(value)
    return BoxedMap.from_dense(array.astype(np.float32, copy=False))


def rank_weights(ranks: Sequence[int]) -> list[float]:
    """Normalised ``1 / rank`` weights of the kept members' ranks."""
    raw = [1.0 / r for r in ranks]
    total = sum(raw)
    return [v / total for v in raw]


@dataclass
class _Kept:
    rank: int
    model: str
    map: BoxedMap
    mask_voxels: int = field(default=0)


def fuse_target(
    target: str,
    members: list[Member],
    *,
    voxel_ml: float,
    volume_range_ml: tuple[float, float] | None = None,
    max_speckle_share: float | None = None,
    speckle_ml: float = 0.5,
    min_agreement: float | None = None,
    exclude: Mapping[str, str] | None = None,
    shape: tuple[int, int, int] | None = None,
    image: np.ndarray | None = None,
    min_misplacement: float | None = None,
    placements: Mapping[tuple[str, str], Placement | None] | None = None,
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
        Plausible ``(min, max)`` volume of the whole structure; members outside
        it are dropped (the minimum is waived for masks touching the border).
    max_speckle_share : float, optional
        Drop members with more than this share of their mask in connected
        pieces (6-connectivity) smaller than ``speckle_ml``, the largest piece
        excepted (not for lesions, which may be many such pieces).
    speckle_ml : float
        Size below which a piece counts as speckle.
    min_agreement : float, optional
        While three or more members are kept, drop the one with the lowest
        mean Dice with the others if that is below this (one at a time); of
        two members with a Dice below this, drop the lower-ranked.
    exclude : dict, optional
        Model -> reason: members already judged elsewhere (:func:`study_outliers`);
        they keep their rank, so the others are re-weighted, not promoted.
    shape : tuple of int, optional
        The study's grid, for a target whose members are all excluded (or none).
    image : numpy.ndarray, optional
        The study's image on the same grid, for the placement rule.
    min_misplacement : float, optional
        With ``image``: drop a member whose :func:`placement_evidence` against
        it exceeds this when compared with another kept member (and that wins
        no such comparison), before the agreement rule -- the image decides
        before the rank does.
    placements : dict, optional
        ``(model_a, model_b) -> Placement`` already computed (by :func:`fuse_study`).

    Returns
    -------
    TargetResult
        An all-zero score when every member was dropped.
    """
    # Competition ranking ("1, 1, 3"): members with equal keys share a rank, and so a weight.
    ranks = {m.model: 1 + sum(o.rank_key < m.rank_key for o in members) for m in members}
    rules = FusionRules(volume_range_ml, max_speckle_share, speckle_ml, min_agreement)
    kept, dropped, shape = _screen(members, ranks, exclude or {}, shape, voxel_ml=voxel_ml, rules=rules)
    pairs = {(a.model, b.model): _dice(a.map, b.map) for i, a in enumerate(kept) for b in kept[i + 1 :]}
    agreement = float(np.mean(list(pairs.values()))) if pairs else None
    if image is not None and min_misplacement is not None and len(kept) >= 2:
        kept, misplaced = _drop_misplaced(kept, image, min_misplacement, placements or {})
        dropped.update(misplaced)
    if min_agreement is not None and len(kept) >= 2:
        kept, outliers = _drop_outliers(kept, min_agreement, pairs)
        dropped.update(outliers)
    return _fused(target, shape, kept, ranks, dropped, agreement)


def _screen(
    members: Sequence[Member],
    ranks: Mapping[str, int],
    exclude: Mapping[str, str],
    shape: tuple[int, int, int] | None,
    *,
    voxel_ml: float,
    rules: FusionRules,
) -> tuple[list[_Kept], dict[str, str], tuple[int, int, int] | None]:
    """Members whose masks are plausible, best first; why the others were dropped; the grid they share."""
    dropped: dict[str, str] = {}
    kept: list[_Kept] = []
    for member in sorted(members, key=lambda m: (m.rank_key, m.model)):
        if member.model in exclude:
            dropped[member.model] = exclude[member.model]
            continue
        boxed = as_boxed(member.probability)
        if shape is None:
            shape = boxed.shape
        elif boxed.shape != shape:
            raise ValueError(f"member {member.model} has grid {boxed.shape}, expected {shape}")
        reason = _implausible(boxed, voxel_ml, rules.volume_range_ml, rules.max_speckle_share, rules.speckle_ml)
        if reason:
            dropped[member.model] = reason
        else:
            kept.append(_Kept(ranks[member.model], member.model, boxed, boxed.count(0.5)))
    return kept, dropped, shape


def _fused(
    target: str,
    shape: tuple[int, int, int] | None,
    kept: list[_Kept],
    ranks: dict[str, int],
    dropped: dict[str, str],
    agreement: float | None,
) -> TargetResult:
    """The rank-weighted sum of the kept members' maps; an all-zero score when none is left."""
    if shape is None:
        return TargetResult(target, BoxedMap.empty((0, 0, 0)), {}, ranks, dropped, agreement)
    if not kept:
        return TargetResult(target, BoxedMap.empty(shape), {}, ranks, dropped, agreement)
    weights = dict(zip((k.model for k in kept), rank_weights([k.rank for k in kept]), strict=True))
    score = _weighted_sum(shape, [(weights[k.model], k.map) for k in kept])
    return TargetResult(target, score, weights, ranks, dropped, agreement)


def _implausible(
    boxed: BoxedMap,
    voxel_ml: float,
    volume_range_ml: tuple[float, float] | None,
    max_speckle_share: float | None,
    speckle_ml: float,
) -> str | None:
    """Why a member's map is not a plausible mask of its target, or ``None``."""
    voxels = boxed.count(0.5)
    if voxels == 0:
        return "empty output"
    volume = voxels * voxel_ml
    if volume_range_ml is not None:
        low, high = volume_range_ml
        if volume > high:
            return f"implausible volume {volume:.1f} mL (expected {low:g}-{high:g} mL)"
        if volume < low and not boxed.touches_border(0.5):
            return f"implausible volume {volume:.1f} mL (expected {low:g}-{high:g} mL)"
    if max_speckle_share is not None:
        from scipy import ndimage  # only when the check is asked for

        pieces, n = ndimage.label(boxed.mask)
        if n > 1:
            # Counted over the mask's voxels only (bincount copies its input to intp).
            sizes = np.sort(np.bincount(pieces[boxed.mask], minlength=n + 1)[1:])[:-1]  # the largest is the structure
            share = float(sizes[sizes * voxel_ml < speckle_ml].sum()) / voxels
            if share > max_speckle_share:
                return f"speckled output ({100 * share:.0f} % of the mask in {n} pieces < {speckle_ml:g} mL)"
    return None


def _pair_placement(
    a: _Kept, b: _Kept, image: np.ndarray, known: Mapping[tuple[str, str], Placement | None]
) -> Placement | None:
    if (a.model, b.model) in known:
        return known[a.model, b.model]
    if (b.model, a.model) in known:
        p = known[b.model, a.model]
        return None if p is None else Placement(tuple(-v for v in p.offset), p.rho_b, p.rho_a)  # type: ignore[arg-type]
    return placement_evidence(a.map, b.map, image)


def _drop_misplaced(
    kept: list[_Kept], image: np.ndarray, threshold: float, known: Mapping[tuple[str, str], Placement | None]
) -> tuple[list[_Kept], dict[str, str]]:
    """Drop members the image places elsewhere: they lose a placement test and win none."""
    lost: dict[str, tuple[str, tuple[int, ...], float]] = {}  # loser -> (winner, its move onto the winner, evidence)
    won: set[str] = set()
    for a, b in combinations(kept, 2):
        p = _pair_placement(a, b, image, known)
        if p is None:
            continue
        # a is b moved by p.offset: a goes onto b by -offset, b onto a by +offset.
        for loser, winner, evidence, move in (
            (a, b, p.against_a, tuple(-v for v in p.offset)),
            (b, a, -p.against_a, tuple(p.offset)),
        ):
            if evidence > threshold:
                won.add(winner.model)
                if evidence > lost.get(loser.model, ("", (), -np.inf))[2]:  # report the strongest case
                    lost[loser.model] = (winner.model, move, evidence)
    misplaced = {
        model: (
            f"misplaced: its mask fits the image's edges better moved by {move} voxels, onto {winner}'s"
            f" (placement evidence {evidence:.2f} > {threshold:g})"
        )
        for model, (winner, move, evidence) in lost.items()
        if model not in won
    }
    return [k for k in kept if k.model not in misplaced], misplaced


def _drop_outliers(
    kept: list[_Kept], min_agreement: float, dice: Mapping[tuple[str, str], float]
) -> tuple[list[_Kept], dict[str, str]]:
    """Drop members that disagree with the others.

    While three or more remain, the member with the lowest mean Dice with
    the others goes if that is below ``min_agreement`` (unweighted: a
    high-ranked outlier must not pull the judgement its way), one at a time.
    Of two members that disagree there is no majority: the lower-ranked goes,
    because averaging two incompatible masks yields neither.  ``dice`` holds
    the Dice of each pair (either order).
    """
    kept = list(kept)
    outliers: dict[str, str] = {}
    pairs = {**dice, **{(b, a): d for (a, b), d in dice.items()}}
    while len(kept) >= 3:
        agreement = {m.model: float(np.mean([pairs[m.model, o.model] for o in kept if o is not m])) for m in kept}
        worst = min(kept, key=lambda m: (agreement[m.model], -m.rank))
        if agreement[worst.model] >= min_agreement:
            break
        outliers[worst.model] = (
            f"disagrees with the other members (mean Dice {agreement[worst.model]:.2f} < {min_agreement:g})"
        )
        kept.remove(worst)
    if len(kept) == 2:
        better, worse = sorted(kept, key=lambda m: m.rank)
        agreement = pairs[better.model, worse.model]
        if agreement < min_agreement:
            outliers[worse.model] = (
                f"disagrees with higher-ranked {better.model} (Dice {agreement:.2f} < {min_agreement:g}; no majority)"
            )
            kept.remove(worse)
    return kept, outliers


def _union_box(maps: Sequence[BoxedMap]) -> tuple[slice, slice, slice] | None:
    boxes = [m.box for m in maps if not m.is_empty]
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))  # type: ignore[return-value]


def _local(box: tuple[slice, ...], within: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, within, strict=True))


def _weighted_sum(shape: tuple[int, int, int], terms: list[tuple[float, BoxedMap]]) -> BoxedMap:
    """``sum w * map`` on the union of the maps' boxes."""
    union = _union_box([m for _, m in terms])
    if union is None:
        return BoxedMap.empty(shape)
    block = np.zeros(tuple(s.stop - s.start for s in union), np.float32)
    fused = torch.from_numpy(block)  # shares the memory: torch's in-place axpy needs no temporary
    for weight, m in terms:
        if not m.is_empty:
            fused[_local(m.box, union)].add_(torch.from_numpy(np.ascontiguousarray(m.data, np.float32)), alpha=weight)
    return BoxedMap(shape, union, block)


def _dice(a: BoxedMap, b: BoxedMap, threshold: float = 0.5) -> float:
    """Dice of two maps' masks (``> threshold``), computed on the union of their boxes."""
    union = _union_box([a, b])
    if union is None:
        return 1.0
    extent = tuple(s.stop - s.start for s in union)
    masks = []
    for m in (a, b):
        mask = np.zeros(extent, bool)
        if not m.is_empty:
            mask[_local(m.box, union)] = m.above(threshold)
        masks.append(mask)
    total = int(masks[0].sum() + masks[1].sum())
    return 2.0 * float((masks[0] & masks[1]).sum()) / total if total else 1.0


def _exclusive_contrast(a: BoxedMap, b: BoxedMap, image: np.ndarray, min_voxels: int) -> tuple[float, float] | None:
    """How unlike the voxels both masks share are the voxels only ``a`` (only ``b``) claims.

    Returns robust z-scores ``|median(image[only x]) - median(image[both])| / (1.4826 MAD(image[both]))``,
    or ``None`` when one of the three regions is too small to say.
    """
    union = _union_box([a, b])
    if union is None:
        return None
    extent = tuple(s.stop - s.start for s in union)
    masks = []
    for m in (a, b):
        mask = np.zeros(extent, bool)
        if not m.is_empty:
            mask[_local(m.box, union)] = m.mask
        masks.append(mask)
    values = image[union]
    core = values[masks[0] & masks[1]]
    only = [values[masks[0] & ~masks[1]], values[masks[1] & ~masks[0]]]
    if core.size < min_voxels or min(o.size for o in only) < min_voxels:
        return None
    centre = float(np.median(core))
    spread = max(1.4826 * float(np.median(np.abs(core - centre))), 1e-6 * max(abs(centre), 1.0))
    za, zb = (abs(float(np.median(o)) - centre) / spread for o in only)
    return za, zb


#: Per-target placement evidence (:func:`placement_evidence`) above which a member is dropped.
MIN_MISPLACEMENT = 0.8
#: Study-wide placement evidence (:func:`study_misplaced`) above which a model is dropped.
MIN_STUDY_MISPLACEMENT = 0.5
#: Largest test grid of :func:`placement_evidence` (voxels); bigger boxes are coarsened to fit.
PLACEMENT_MAX_VOXELS = 1 << 19


@dataclass(frozen=True)
class Placement:
    """What the image says about where two members put one structure.

    Attributes
    ----------
    offset : tuple of int
        ``a``'s mask is ``b``'s moved by this many voxels of the study's grid
        (``(slice, row, column)``; the peak of the masks' cross-correlation).
    rho_a : float
        ``ln E_a(-offset) - ln E_a(0)``: how much better ``a``'s own shape
        sits on the image's edges at ``b``'s place than at its own.
    rho_b : float
        ``ln E_b(+offset) - ln E_b(0)``, the same for ``b`` at ``a``'s place.
    """

    offset: tuple[int, int, int]
    rho_a: float
    rho_b: float

    @property
    def against_a(self) -> float:
        """Evidence that ``a`` is the misplaced one (``rho_a - rho_b``; negative: ``b`` is)."""
        return self.rho_a - self.rho_b


def _coarsen(values: np.ndarray, step: int) -> np.ndarray:
    """Block means (float32) of ``step``-cubes; the array is padded with its edge values to a multiple of ``step``."""
    if step == 1:
        return values.astype(np.float32, copy=False)
    pad = [(0, -n % step) for n in values.shape]
    if any(p for _, p in pad):
        values = np.pad(values, pad, mode="edge")
    n0, n1, n2 = (n // step for n in values.shape)
    return values.reshape(n0, step, n1, step, n2, step).mean(axis=(1, 3, 5), dtype=np.float32)


def _shell(mask: np.ndarray) -> np.ndarray:
    """Voxels on either side of the mask's surface (6-connected inner and outer boundary)."""
    from scipy import ndimage

    return (mask & ~ndimage.binary_erosion(mask)) | (ndimage.binary_dilation(mask) & ~mask)


def _overlap(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> int:
    """Voxels where ``a`` and ``b`` moved by ``d`` are both set (same-shape masks)."""
    sa, sb = [], []
    for k, n in zip(d, a.shape, strict=True):
        k = int(k)
        if abs(k) >= n:
            return 0
        sa.append(slice(k, n) if k >= 0 else slice(0, n + k))
        sb.append(slice(0, n - k) if k >= 0 else slice(-k, n))
    return int(np.count_nonzero(a[tuple(sa)] & b[tuple(sb)]))


_NEIGHBOURS = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if i or j or k])


def _peak_offset(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Shift of ``b`` that overlaps ``a`` most, and that overlap, by steepest ascent from no shift.

    The overlap of two convex shapes is log-concave in the shift, so the
    ascent finds its peak; starting at zero and moving only for a strict gain
    keeps the smallest of equal shifts.  Masks that do not touch start from
    their centroids' offset instead.
    """
    d = np.zeros(3, int)
    best = _overlap(a, b, d)
    if best == 0:
        d = np.rint(np.argwhere(a).mean(axis=0) - np.argwhere(b).mean(axis=0)).astype(int)
        best = _overlap(a, b, d)
    while True:
        gains = [(_overlap(a, b, d + step), tuple(step)) for step in _NEIGHBOURS]
        value, step = max(gains, key=lambda g: (g[0], -sum(abs(v) for v in g[1])))
        if value <= best:
            return d, best
        best, d = value, d + np.asarray(step)


def _mask_of(m: BoxedMap, threshold: float = 0.5) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The map's mask (``p > threshold``) cropped to its own box, with that box on the whole grid."""
    if m.is_empty:
        return None
    support = m.above(threshold)
    if not support.any():
        return None
    local = _support_box(support)
    box = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(m.box, local, strict=True))
    return box, support[local]


def placement_evidence(
    a: BoxedMap,
    b: BoxedMap,
    image: np.ndarray,
    *,
    sigma: float = 1.0,
    max_voxels: int = PLACEMENT_MAX_VOXELS,
) -> Placement | None:
    """Ask the image which of two masks of one structure is in the wrong place.

    Two members that agree on a structure's shape but not on its place (a
    shifted grid, a wrong origin) cannot both sit on its edges.  ``d``, the
    shift of ``b``'s mask that overlaps ``a``'s most, separates *place* from
    *shape*; then each member's own shape is tried at both places:

        E_m(delta) = mean of |grad (G_sigma * image)| on the shell of mask m moved by delta
        rho_a = ln E_a(-d) - ln E_a(0),   rho_b = ln E_b(+d) - ln E_b(0)

    A misplaced ``a`` fits better at ``b``'s place (``rho_a > 0``) while a
    well-placed ``b`` fits worse at ``a``'s (``rho_b < 0``), so
    ``rho_a - rho_b`` is the evidence against ``a``.  Each member is compared
    with itself, so a model that draws its masks a little larger or smaller
    than another is not penalised for it.  Deterministic and cheap: the test
    runs on the two masks' bounding box, coarsened by block means until it has
    at most ``max_voxels`` voxels.

    Parameters
    ----------
    a, b : BoxedMap
        The members' probabilities (masks are ``p > 0.5``) on the image's grid.
    image : numpy.ndarray
        The study's image.
    sigma : float
        Gaussian scale of the gradient, in voxels of the test grid.
    max_voxels : int
        Size of the test grid above which the box is coarsened.

    Returns
    -------
    Placement or None
        ``None`` when a mask is empty, the masks do not overlap at any shift,
        or they are best aligned as they are (``d = 0``: nothing to decide).
    """
    found_a, found_b = (_mask_of(m) for m in (a, b))
    if found_a is None or found_b is None:
        return None
    box, step, (mask_a, mask_b) = _test_grid((found_a, found_b), image.shape, max_voxels)
    if not mask_a.any() or not mask_b.any():
        return None
    d, overlap = _peak_offset(mask_a, mask_b)
    if not d.any() or overlap == 0:
        return None  # aligned as they are, or never overlapping: not two views of one structure
    rho_a, rho_b = _edge_fits(image[box], step, d, mask_a, mask_b, sigma)
    return Placement(tuple(int(v) * step for v in d), rho_a, rho_b)  # type: ignore[arg-type]


def _test_grid(
    found: tuple[tuple[tuple[slice, ...], np.ndarray], ...], shape: tuple[int, ...], max_voxels: int
) -> tuple[tuple[slice, ...], int, list[np.ndarray]]:
    """The box both masks lie in (with a margin), its coarsening step, and each mask on it, coarsened."""
    (box_a, _), (box_b, _) = found
    union = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(box_a, box_b, strict=True))
    margin = 3  # room for the shells and the gradient's support
    box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(union, shape, strict=True))
    extent = tuple(s.stop - s.start for s in box)
    step = max(1, int(np.ceil((np.prod(extent) / max_voxels) ** (1 / 3))))
    masks = []
    for own_box, own_mask in found:
        mask = np.zeros(extent, bool)
        mask[_local(own_box, box)] = own_mask
        masks.append(_coarsen(mask, step) > 0.5 if step > 1 else mask)
    return box, step, masks


def _edge_fits(
    image: np.ndarray, step: int, d: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray, sigma: float
) -> tuple[float, float]:
    """``rho_a`` and ``rho_b`` of :func:`placement_evidence`: each shell's edge strength moved onto the other's place.

    ``image`` is the test box of the study's image; ``d`` the shift, in test-grid voxels, of ``b`` onto ``a``.
    """
    from scipy import ndimage

    # NaNs (a corrupt or padded image) would spread through the gradient and silence the rule.
    crop = np.nan_to_num(_coarsen(image, step).astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    edges = ndimage.gaussian_gradient_magnitude(crop, sigma)
    reach = np.abs(d)
    # Pad each axis by its own shift only: a shell moved out of the box reads the box's border.
    edges = np.pad(edges, [(int(k), int(k)) for k in reach], mode="edge")

    def fit(shell: np.ndarray, delta: np.ndarray) -> float:
        points = shell + delta
        return float(edges[tuple(points.T)].mean())

    shell_a, shell_b = (np.argwhere(_shell(mask)) + reach for mask in (mask_a, mask_b))
    tiny = 1e-12  # a flat image gives no evidence either way
    rho_a = float(np.log((fit(shell_a, -d) + tiny) / (fit(shell_a, 0 * d) + tiny)))
    rho_b = float(np.log((fit(shell_b, d) + tiny) / (fit(shell_b, 0 * d) + tiny)))
    return rho_a, rho_b


def study_outliers(
    maps: Mapping[str, Mapping[str, BoxedMap]],
    image: np.ndarray,
    *,
    min_agreement: float = 0.7,
    min_contrast: float = 1.0,
    min_voxels: int = 20,
) -> dict[str, str]:
    """Models to drop from every target: they disagree with another across the study, and the image sides with it.

    A model that is wrong as a whole (a flipped axis, a wrong orientation, a
    shifted grid) gives a plausible mask for every target -- the right size and
    shape in the wrong place -- which no per-target rule can catch when only
    two models vote.  Across the study it stands out: its mean Dice with
    another model over their shared targets is low.  The image then arbitrates:
    in each shared target, the voxels both models claim show what the
    structure looks like, and the model whose *own* voxels look less like them
    (robust z-score higher by more than ``min_contrast``) gets a vote against
    it.  A model with more votes against it than the other, and at least half
    the shared targets, is dropped.  Without a clear verdict nothing is
    dropped here (the per-target rules then apply).

    Parameters
    ----------
    maps : dict
        Model -> target -> probability on the study's grid.
    image : numpy.ndarray
        The study's image on the same grid.
    min_agreement : float
        Mean Dice over the shared targets below which two models are in conflict.
    min_contrast : float
        Difference of robust z-scores that counts as a vote.
    min_voxels : int
        Smallest region (shared or exclusive) worth a vote.

    Returns
    -------
    dict
        Model -> reason.
    """
    outliers: dict[str, str] = {}
    for a, b in combinations(sorted(maps), 2):
        if a in outliers or b in outliers:
            continue
        shared = [t for t in maps[a] if t in maps[b] and maps[a][t].count() and maps[b][t].count()]
        if not shared:
            continue
        agreement = float(np.mean([_dice(maps[a][t], maps[b][t]) for t in shared]))
        if agreement >= min_agreement:
            continue
        against = {a: 0, b: 0}
        for t in shared:
            contrast = _exclusive_contrast(maps[a][t], maps[b][t], image, min_voxels)
            if contrast is None:
                continue
            za, zb = contrast
            if za - zb > min_contrast:
                against[a] += 1
            elif zb - za > min_contrast:
                against[b] += 1
        loser, winner = (a, b) if against[a] > against[b] else (b, a)
        if against[loser] > against[winner] and 2 * against[loser] >= len(shared):
            outliers[loser] = (
                f"disagrees with {winner} across the study (mean Dice {agreement:.2f} over {len(shared)} targets)"
                f" and the image sides with {winner} in {against[loser]}"
            )
    return outliers


def fuse_study(
    targets: Sequence[StudyTarget],
    *,
    voxel_ml: float,
    shape: tuple[int, int, int],
    image: np.ndarray | None = None,
    min_study_agreement: float = 0.7,
    min_misplacement: float | None = MIN_MISPLACEMENT,
    min_study_misplacement: float | None = MIN_STUDY_MISPLACEMENT,
    workers: int = 1,
) -> list[TargetResult]:
    """Fuse every target of a study: members materialised, whole-model outliers removed, then :func:`fuse_target`.

    Parameters
    ----------
    targets : sequence of StudyTarget
        Each target's members and the rules it is fused under.
    voxel_ml : float
        Volume of one voxel of the study's grid.
    shape : tuple of int
        The study's grid (for targets left without members).
    image : numpy.ndarray, optional
        The study's image; enables :func:`study_outliers` and the placement rules.
    min_study_agreement : float
        See :func:`study_outliers`.
    min_misplacement : float, optional
        Per-target placement rule of :func:`fuse_target` (with ``image``; ``None``: off).
    min_study_misplacement : float, optional
        See :func:`study_misplaced` (with ``image``; ``None``: off).
    workers : int
        Threads materialising members (resampling releases the GIL) and testing placements.

    Returns
    -------
    list of TargetResult
        In ``targets`` order.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        materialised = _materialise(pool, targets, shape)
        outliers = _study_outliers_of(targets, materialised, image, min_study_agreement) if image is not None else {}
        placements: list[dict[tuple[str, str], Placement | None]] = [{} for _ in targets]
        if image is not None and (min_misplacement is not None or min_study_misplacement is not None):
            placements = _test_placements(pool, materialised, outliers, image)
    if min_study_misplacement is not None:
        outliers.update(study_misplaced(materialised, placements, min_study_misplacement))
    results = []
    for target, members, known in zip(targets, materialised, placements, strict=True):
        options: dict = asdict(target.rules)
        if image is not None:
            options.setdefault("image", image)
            options.setdefault("min_misplacement", min_misplacement)
            options.setdefault("placements", known)
        results.append(fuse_target(target.name, members, voxel_ml=voxel_ml, exclude=outliers, shape=shape, **options))
        members.clear()  # the target's boxes are no longer needed
    return results


def _materialise(
    pool: ThreadPoolExecutor, targets: Sequence[StudyTarget], shape: tuple[int, int, int]
) -> list[list[Member]]:
    """Each target's members with their maps made, an :class:`OnDemand` one only inside the target's region."""
    regions = [_region(target.members, shape) for target in targets]
    pending = [(i, m) for i, target in enumerate(targets) for m in target.members]

    def materialise(item: tuple[int, Member]) -> BoxedMap:
        i, member = item
        if regions[i] is _NOWHERE:
            return BoxedMap.empty(shape)
        return as_boxed(member.probability, regions[i])

    boxed = pool.map(materialise, pending)
    materialised: list[list[Member]] = [[] for _ in targets]
    for (i, member), value in zip(pending, boxed, strict=True):
        materialised[i].append(Member(member.model, value, member.rank_key))
    return materialised


def _test_placements(
    pool: ThreadPoolExecutor, materialised: list[list[Member]], outliers: Mapping[str, str], image: np.ndarray
) -> list[dict[tuple[str, str], Placement | None]]:
    """Per target, ``(a, b) -> Placement`` of every pair of members (``a < b`` by name) that are not outliers."""
    pairs = [
        (i, a, b)
        for i, members in enumerate(materialised)
        for a, b in combinations(sorted(members, key=lambda m: m.model), 2)
        if a.model not in outliers and b.model not in outliers
    ]
    tested = pool.map(lambda item: placement_evidence(item[1].probability, item[2].probability, image), pairs)
    placements: list[dict[tuple[str, str], Placement | None]] = [{} for _ in materialised]
    for (i, a, b), placement in zip(pairs, tested, strict=True):
        placements[i][a.model, b.model] = placement
    return placements


#: A target none of whose members has a mask anywhere (see :func:`_region`).
_NOWHERE: Box = (slice(0, 0), slice(0, 0), slice(0, 0))


def _region(members: Sequence[Member], shape: tuple[int, int, int]) -> Box | None:
    """Where a target's :class:`OnDemand` members are worth making: the union of their reaches plus a margin.

    ``None`` (everywhere) unless every member is :class:`OnDemand`: a dense
    member's mask is not known before it is materialised.
    """
    if not members or not all(isinstance(m.probability, OnDemand) for m in members):
        return None
    reaches = [r for m in members if (r := m.probability.reach()) is not None]  # type: ignore[union-attr]
    if not reaches:
        return _NOWHERE
    return tuple(  # type: ignore[return-value]
        slice(
            max(min(b[a].start for b in reaches) - REGION_MARGIN, 0),
            min(max(b[a].stop for b in reaches) + REGION_MARGIN, n),
        )
        for a, n in enumerate(shape)
    )


def study_misplaced(
    members: Sequence[Sequence[Member]],
    placements: Sequence[Mapping[tuple[str, str], Placement | None]],
    threshold: float = MIN_STUDY_MISPLACEMENT,
) -> dict[str, str]:
    """Models the image places elsewhere across the study.

    For two models ``a`` and ``b`` with non-empty masks for ``n`` common
    targets, ``S = sum_t (rho_a - rho_b)_t / sqrt(n)`` (a target whose masks
    are best aligned as they are adds 0): a model shifted as a whole loses a
    little in every target, and the sum of ``n`` small, consistent losses
    grows like ``n`` while the noise of sound models grows like ``sqrt(n)``.
    ``a`` is dropped from every target when ``S > threshold``; a pair with
    only one common target is left to the per-target rule.

    Parameters
    ----------
    members : sequence of sequence of Member
        Per target, its members with materialised (:class:`BoxedMap`) maps.
    placements : sequence of dict
        Per target, ``(a, b) -> Placement`` (``a < b`` by name) from :func:`placement_evidence`.
    threshold : float
        Evidence above which a model is dropped.

    Returns
    -------
    dict
        Model -> reason.
    """
    totals: dict[tuple[str, str], list[float]] = {}
    for target_members, known in zip(members, placements, strict=True):
        present = sorted(
            m.model for m in target_members if isinstance(m.probability, BoxedMap) and m.probability.count()
        )
        for a, b in combinations(present, 2):
            p = known.get((a, b))
            totals.setdefault((a, b), []).append(0.0 if p is None else p.against_a)
    misplaced: dict[str, str] = {}
    for (a, b), values in sorted(totals.items()):
        if a in misplaced or b in misplaced or len(values) < 2:
            continue
        score = float(np.sum(values)) / np.sqrt(len(values))
        for loser, winner, evidence in ((a, b, score), (b, a, -score)):
            if evidence > threshold:
                misplaced[loser] = (
                    f"misplaced across the study: its masks fit the image's edges better at {winner}'s places"
                    f" (placement evidence {evidence:.2f} over {len(values)} targets > {threshold:g})"
                )
    return misplaced


def _study_outliers_of(
    targets: Sequence[StudyTarget],
    materialised: list[list[Member]],
    image: np.ndarray,
    min_agreement: float,
) -> dict[str, str]:
    maps: dict[str, dict[str, BoxedMap]] = {}
    for target, members in zip(targets, materialised, strict=True):
        for member in members:
            assert isinstance(member.probability, BoxedMap)
            maps.setdefault(member.model, {})[target.name] = member.probability
    return study_outliers(maps, image, min_agreement=min_agreement) if len(maps) >= 2 else {}


def resolve_overlaps(results: list[TargetResult], threshold: float = 0.5) -> np.ndarray:
    """Label map ``1..len(results)`` (0 = background) by highest fused score.

    A voxel is assigned to target ``i`` when ``S_i`` is the largest fused
    score at that voxel and exceeds ``threshold`` (ties go to the earlier
    target).  Only voxels above ``threshold`` can take a label, so each
    target's mask is laid down box by box, and scores are compared only
    where it meets a target laid down before: memory is the label map plus
    one mask box, whatever the number of targets.
    """
    if not results:
        raise ValueError("nothing to fuse")
    if len(results) > 255:
        raise ValueError(f"at most 255 targets fit a uint8 label map, got {len(results)}")
    shape = next((r.shape for r in results if r.shape != (0, 0, 0)), (0, 0, 0))
    best = np.zeros(shape, np.uint8)
    for number, result in enumerate(results, start=1):
        m = result.score_map
        if m.is_empty:
            continue
        if m.shape != shape:
            raise ValueError(f"target {result.target} has grid {m.shape}, expected {shape}")
        region = best[m.box]
        above = m.data > threshold
        contested = above & (region != 0)
        if contested.any():
            # Where an earlier target holds the voxel, the higher score wins (a tie keeps the earlier one).
            where = np.nonzero(contested)
            owners = region[where]
            for owner in np.unique(owners):
                theirs = results[int(owner) - 1].score_map
                mine = tuple(w[owners == owner] for w in where)
                points = tuple(i + b.start - t.start for i, b, t in zip(mine, m.box, theirs.box, strict=True))
                lost = m.data[mine] <= theirs.data[points]
                above[tuple(i[lost] for i in mine)] = False
        region[above] = number
    return best
