"""Resampling between voxel grids in patient space.

Models are trained on a grid of their own (fixed size, fixed spacing, a
canonical orientation); sources come in any orientation and size.
:func:`target_grid` builds the grid a model wants over a source volume,
:func:`resample` moves data between any two
:class:`~medsegagent.dicom.volume.Geometry` grids by sampling at voxel
centres (trilinear for images and probabilities, nearest for labels), and
:func:`resample_boxed` does the way back only where a map has support, so a
probability map of a kidney on a 512x512x300 CT costs the kidney's box, not
the whole volume.  Going there and back is the same operation twice, so masks
land on the source voxels they were computed for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from medsegagent.dicom.volume import Geometry

__all__ = [
    "ORIENTATIONS",
    "Box",
    "BoxedMap",
    "derived_grid",
    "foreground_mask",
    "intersect_boxes",
    "map_device",
    "mask_reach",
    "model_grid",
    "resample",
    "resample_boxed",
    "sub_geometry",
    "target_grid",
]

#: Destination voxels resampled per chunk; bounds the sampling grid's memory.
_CHUNK_VOXELS = 4_000_000

#: Axis directions (column, row, slice) of the canonical orientations, in LPS.
_AXES = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
}
#: Orientations :func:`target_grid` understands (``native``: the source's own axes).
ORIENTATIONS = ("LPS", "RAS", "native")


# --------------------------------------------------------------------------- grids


def _axes_of(source: Geometry, orientation: str) -> np.ndarray:
    """Rows: unit vectors of the target grid's column, row and slice axes."""
    if orientation == "native":
        slice_dir = source.slice_direction
        # A tilted (gantry) stack has a slice direction off the normal; a model
        # grid must be orthogonal, so it uses the normal then.
        if abs(slice_dir @ source.row_direction) > 1e-4 or abs(slice_dir @ source.column_direction) > 1e-4:
            slice_dir = source.normal
        return np.stack([source.row_direction, source.column_direction, slice_dir])
    try:
        return _AXES[orientation]
    except KeyError:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}") from None


def _index_box(shape: Sequence[int], foreground: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(slice, row, column) index bounds of the whole grid or of the foreground."""
    lo, hi = np.zeros(3), np.array(shape, dtype=float) - 1
    if foreground is not None and foreground.any():
        hits = [np.flatnonzero(foreground.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        return np.array([h[0] for h in hits], float), np.array([h[-1] for h in hits], float), True
    return lo, hi, False


def target_grid(
    source: Geometry,
    *,
    orientation: str = "LPS",
    spacing: Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    foreground: np.ndarray | None = None,
    margin_mm: float = 10.0,
) -> Geometry:
    """The grid a model wants over ``source``.

    Parameters
    ----------
    source : Geometry
        The grid to cover (any orientation).
    orientation : {"LPS", "RAS", "native"}
        Axis directions of the result: ``LPS`` has columns along +x (patient
        left), rows along +y (posterior), slices along +z (superior); ``RAS``
        flips x and y; ``native`` keeps the source's own axes.
    spacing : sequence of float, optional
        ``(x, y, z)`` voxel size in mm along the result's column, row and
        slice axes.  The grid is as large as needed to cover the box.
    size : sequence of int, optional
        ``(x, y, z)`` voxel counts; the spacing is then whatever covers the
        box (the demo models' fixed grids).  ``size`` wins over ``spacing``.
    foreground : numpy.ndarray, optional
        Boolean mask on ``source``; when given (and not empty) the grid covers
        only its bounding box plus ``margin_mm``, so the model's voxels are
        spent on the patient rather than on air.
    margin_mm : float
        Margin around the foreground box (whole voxels when ``spacing`` is set).

    Returns
    -------
    Geometry
        With neither ``spacing`` nor ``size`` the spacing along each axis is
        the source spacing of the source axis closest to it, so a source whose
        axes are a permutation or flip of the requested ones is reproduced
        voxel for voxel (a pure re-orientation, exact with ``mode="nearest"``).
        ``native`` with neither and no foreground is ``source`` itself.
    """
    axes = _axes_of(source, orientation)
    if size is None and spacing is None and orientation == "native" and foreground is None:
        return source
    lo_idx, hi_idx, cropped = _index_box(source.shape, foreground)
    margin = margin_mm if cropped else 0.0
    low, high = _extent_along(source, axes, lo_idx, hi_idx)
    if size is not None:
        n, step, start = _sized_axes(size, low, high, margin)
    else:
        n, step, start = _spaced_axes(source, axes, spacing, low, high, margin)
    origin = axes.T @ start
    return Geometry(
        shape=(int(n[2]), int(n[1]), int(n[0])),
        origin=origin,
        row_direction=axes[0],
        column_direction=axes[1],
        slice_direction=axes[2],
        spacing=(float(step[2]), float(step[1]), float(step[0])),
    )


def _extent_along(
    source: Geometry, axes: np.ndarray, lo_idx: np.ndarray, hi_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest position along each of ``axes`` of the index box's corner voxel centres."""
    corners = np.array(
        [[c, r, s] for c in (lo_idx[2], hi_idx[2]) for r in (lo_idx[1], hi_idx[1]) for s in (lo_idx[0], hi_idx[0])],
        dtype=float,
    )
    points = source.index_to_lps(corners[:, 0], corners[:, 1], corners[:, 2])
    coords = points @ axes.T  # position along each target axis
    return coords.min(axis=0), coords.max(axis=0)


def _sized_axes(
    size: Sequence[int], low: np.ndarray, high: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts, spacing and first voxel centre of a fixed-size grid whose end voxels sit on the box's faces."""
    n = np.array([int(v) for v in size])
    if n.shape != (3,) or (n < 1).any():
        raise ValueError(f"size must be three positive ints (x, y, z), got {size!r}")
    low, high = low - margin, high + margin
    step = np.maximum((high - low) / np.maximum(n - 1, 1), 1e-3)
    return n, step, low


def _spaced_axes(
    source: Geometry,
    axes: np.ndarray,
    spacing: Sequence[float] | None,
    low: np.ndarray,
    high: np.ndarray,
    margin: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts, spacing and first voxel centre of a grid of given (or the source's) spacing, centred on the box."""
    if spacing is None:
        # The source axis (column, row, slice) closest to each target axis lends its spacing.
        source_axes = np.stack([source.row_direction, source.column_direction, source.slice_direction])
        source_spacing = np.array([source.spacing[2], source.spacing[1], source.spacing[0]])
        step = source_spacing[np.argmax(np.abs(axes @ source_axes.T), axis=1)]
    else:
        step = np.array([float(v) for v in spacing])
        if step.shape != (3,) or (step <= 0).any():
            raise ValueError(f"spacing must be three positive numbers (x, y, z), got {spacing!r}")
    extent = (high - low) / step
    # Whole voxels, so an aligned source keeps its voxel centres (no interpolation).
    whole = np.where(np.isclose(extent, np.round(extent), atol=1e-3), np.round(extent), np.ceil(extent))
    pad = np.ceil(margin / step - 1e-9)
    n = (whole + 1 + 2 * pad).astype(int)
    return n, step, (low + high) / 2 - (n - 1) * step / 2


def model_grid(
    source: Geometry, size: Sequence[int], foreground: np.ndarray | None = None, margin_mm: float = 10.0
) -> Geometry:
    """Axis-aligned LPS grid of ``size`` voxels covering ``source`` (or its foreground).

    The fixed grid of the demo models; ``target_grid(source, size=size, ...)``
    with ``orientation="LPS"``.

    Parameters
    ----------
    source : Geometry
        The grid to cover (any orientation).
    size : sequence of int
        ``(x, y, z)`` voxel counts of the model's input grid.
    foreground : numpy.ndarray, optional
        Boolean mask on ``source``; the grid covers its bounding box plus ``margin_mm``.
    margin_mm : float
        Margin around the foreground box.
    """
    return target_grid(source, orientation="LPS", size=size, foreground=foreground, margin_mm=margin_mm)


def derived_grid(
    base: Geometry,
    axes: Sequence[int],
    shape: Sequence[int],
    start: Sequence[float] = (0.0, 0.0, 0.0),
    step: Sequence[float] = (1.0, 1.0, 1.0),
) -> Geometry:
    """A grid laid along the axes of ``base`` (permuted, cropped, rescaled).

    Array axis ``k`` of the result runs along array axis ``axes[k]`` of
    ``base`` (0 = slice, 1 = row, 2 = column); its voxel ``i`` sits at base
    index ``start[k] + step[k] * i`` along that axis.  This describes what
    libraries such as nnU-Net do to an array (transpose, crop, resize) in
    patient space.

    Parameters
    ----------
    base : Geometry
        The grid the array came from.
    axes : sequence of int
        A permutation of ``(0, 1, 2)``.
    shape : sequence of int
        Shape of the derived array.
    start, step : sequence of float
        Per derived axis, in base index units (``step`` may be fractional or negative).
    """
    if sorted(int(a) for a in axes) != [0, 1, 2]:
        raise ValueError(f"axes must be a permutation of (0, 1, 2), got {axes!r}")
    directions = [base.slice_direction, base.column_direction, base.row_direction]
    position = np.zeros(3)  # base (slice, row, column) index of the new origin
    new_dirs, new_spacing = [], []
    for k, a in enumerate(axes):
        position[a] = start[k]
        new_dirs.append(directions[a] * (1.0 if step[k] >= 0 else -1.0))
        new_spacing.append(abs(float(step[k])) * base.spacing[a])
    origin = base.index_to_lps(position[2], position[1], position[0])
    return Geometry(
        shape=tuple(int(s) for s in shape),
        origin=origin,
        row_direction=new_dirs[2],
        column_direction=new_dirs[1],
        slice_direction=new_dirs[0],
        spacing=(new_spacing[0], new_spacing[1], new_spacing[2]),
    )


def sub_geometry(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """The part of ``geometry`` covered by ``box`` (slices with integer start/stop, step 1)."""
    starts = [int(s.start) for s in box]
    shape = [int(s.stop) - int(s.start) for s in box]
    return derived_grid(geometry, (0, 1, 2), shape, starts, (1.0, 1.0, 1.0))


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Voxels clearly above the background (air) level of an image.

    The threshold is 10 % of the way from the 1st to the 99th percentile,
    which separates air from any tissue in CT (HU) and in MR/PET alike.
    """
    low, high = np.percentile(array[:: max(1, array.shape[0] // 16)], [1, 99])
    return array > low + 0.1 * (high - low)


# --------------------------------------------------------------------------- sampling


def map_device() -> torch.device:
    """Where model outputs are resampled to the study's grid: the GPU when CUDA is present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resample(
    data: np.ndarray | torch.Tensor,
    source: Geometry,
    target: Geometry,
    *,
    mode: str = "linear",
    fill: float | None = None,
    outside: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Sample ``data`` (on ``source``) at every voxel centre of ``target``.

    Parameters
    ----------
    data : array or tensor
        ``(slices, rows, columns)`` or ``(channels, slices, rows, columns)``.
    source, target : Geometry
        Grids of the input and of the result.
    mode : {"linear", "nearest"}
        Trilinear for intensities and probabilities, nearest for labels.
    fill : float, optional
        Value the source fades to beyond its outermost voxel centres (images:
        the air value); by default the border value is extended.
    outside : float, optional
        Value of target voxels that lie outside the source's extent (its voxel
        centres plus half a voxel); by default they follow ``fill``.  Model
        outputs use ``0``: beyond the box the model saw, it said nothing.
    dtype : torch.dtype
        Working precision.
    device : torch.device or str, optional
        Where to sample (``cuda``: on the GPU); the data's own device by default.

    Returns
    -------
    numpy.ndarray
        float32, ``target.shape`` (with the channel axis first if the input had one).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    # Views with negative strides (flipped arrays) are fine here, not in torch.
    tensor = torch.as_tensor(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
    squeeze = tensor.ndim == 3
    if squeeze:
        tensor = tensor[None]
    if tuple(tensor.shape[1:]) != source.shape:
        raise ValueError(f"data shape {tuple(tensor.shape)} does not match source grid {source.shape}")
    if source.same_grid(target):
        out = tensor.to(torch.float32).numpy()
        return out[0] if squeeze else out
    # Affine from target indices straight to source indices (column, row, slice).
    index_map = np.linalg.inv(source.affine) @ target.affine
    axes = _aligned_axes(index_map, target.shape)
    # grid_sample treats a one-voxel axis as a point everywhere; keep its behaviour there.
    if axes is not None and min(source.shape) > 1:
        out = _resample_separable(tensor.to(device=device, dtype=dtype), axes, target.shape, mode, fill, outside)
    else:
        out = _resample_grid(
            tensor.to(device=device, dtype=dtype)[None], index_map, source.shape, target.shape, mode, fill, outside
        )
    return out[0] if squeeze else out


def _aligned_axes(index_map: np.ndarray, target_shape: tuple[int, int, int]) -> list[tuple[int, float, float]] | None:
    """Per source array axis: (target array axis, step, start) when the grids share their axes.

    Grids whose axes are parallel (up to order and sign) make trilinear
    sampling separable: one 1-D interpolation per axis.  An off-axis term
    counts as zero when it moves no sample by more than 1e-4 voxel across the
    whole target; anything more oblique returns ``None``.
    """
    linear = index_map[:3, :3]  # source (column, row, slice) per target (column, row, slice)
    extent = np.array([target_shape[2], target_shape[1], target_shape[0]], float)
    mapped = np.abs(linear) * extent > 1e-4
    if not ((mapped.sum(axis=0) == 1).all() and (mapped.sum(axis=1) == 1).all()):
        return None
    axes = []
    for source_axis in range(3):  # array order: slice, row, column = affine index 2, 1, 0
        row = 2 - source_axis
        column = int(np.argmax(mapped[row]))
        axes.append((2 - column, float(linear[row, column]), float(index_map[row, 3])))
    return axes


def _axis_weights(
    positions: torch.Tensor, size: int, mode: str, zero_padding: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two source indices and their weights per position, as ``grid_sample(align_corners=True)`` takes them."""
    if not zero_padding:  # border padding samples the clamped position
        positions = positions.clamp(0.0, size - 1.0)
    if mode == "nearest":
        index = torch.round(positions)  # half to even, as grid_sample
        weight = ((index >= 0) & (index <= size - 1)).to(positions.dtype)
        index = index.clamp(0, size - 1).long()
        return index, index, weight, torch.zeros_like(weight)
    low = torch.floor(positions)
    frac = positions - low
    w_low = (1.0 - frac) * ((low >= 0) & (low <= size - 1))
    w_high = frac * ((low >= -1) & (low <= size - 2))
    return low.clamp(0, size - 1).long(), (low + 1).clamp(0, size - 1).long(), w_low, w_high


def _resample_separable(
    tensor: torch.Tensor,
    axes: list[tuple[int, float, float]],
    target_shape: tuple[int, int, int],
    mode: str,
    fill: float | None,
    outside: float | None,
) -> np.ndarray:
    """Sample a ``(C, D, H, W)`` tensor axis by axis (grids with shared axes; see :func:`_aligned_axes`).

    Gives what :func:`_resample_grid` gives (to float rounding) at a fraction
    of the cost: two gathers and a blend per axis instead of eight per voxel.
    """
    sizes = tuple(tensor.shape[1:])
    plans = []
    for source_axis, (target_axis, step, start) in enumerate(axes):
        count = target_shape[target_axis]
        positions = start + step * torch.arange(count, dtype=torch.float64, device=tensor.device)
        n = sizes[source_axis]
        weights = _axis_weights(positions, n, mode, fill is not None)
        beyond = (positions < -0.5 - 1e-6) | (positions > n - 0.5 + 1e-6)
        plans.append((source_axis, target_axis, weights, beyond, count / n))
    out = tensor
    inside = []
    # Shrinking axes first keeps the intermediates small.
    for source_axis, _, (low, high, w_low, w_high), _, _ in sorted(plans, key=lambda p: p[4]):
        dim = source_axis + 1
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        blend = out.index_select(dim, low) * w_low.to(out.dtype).view(shape)
        if mode == "linear":
            blend += out.index_select(dim, high) * w_high.to(out.dtype).view(shape)
        out = blend
        inside.append((source_axis, (w_low + w_high).to(out.dtype)))
    # Axis k of ``out`` is the target axis that source axis k became.
    order = [0] + [1 + [p[1] for p in plans].index(t) for t in range(3)]
    out = out.permute(order).to(torch.float32)
    if fill is not None:
        # Zero padding fades towards 0; add fill * (1 - weight inside) to fade towards ``fill``.
        weight = torch.ones(target_shape, dtype=torch.float32, device=out.device)
        for source_axis, share in inside:
            shape = [1, 1, 1]
            shape[plans[source_axis][1]] = -1
            weight = weight * share.to(torch.float32).view(shape)
        out = out + fill * (1.0 - weight)
    if outside is not None:
        for _, target_axis, _, beyond, _ in plans:
            index = [slice(None)] * 4
            index[1 + target_axis] = beyond
            out[tuple(index)] = outside
    return np.ascontiguousarray(out.cpu().numpy())


def _resample_grid(
    tensor: torch.Tensor,
    index_map: np.ndarray,
    source_shape: tuple[int, int, int],
    target_shape: tuple[int, int, int],
    mode: str,
    fill: float | None,
    outside: float | None,
) -> np.ndarray:
    """``grid_sample`` at every target voxel centre, slab by slab (any orientation)."""
    dtype = tensor.dtype
    device = tensor.device
    index = torch.from_numpy(index_map).to(device=device, dtype=torch.float32)
    depth, rows, cols = source_shape
    sizes = torch.tensor([cols, rows, depth], dtype=torch.float32, device=device)
    scale = 2.0 / torch.clamp(sizes - 1, min=1)
    out = np.empty((tensor.shape[1], *target_shape), dtype=np.float32)
    per_slice = target_shape[1] * target_shape[2]
    step = max(1, _CHUNK_VOXELS // per_slice)
    jj, ii = torch.meshgrid(
        torch.arange(target_shape[1], dtype=torch.float32, device=device),
        torch.arange(target_shape[2], dtype=torch.float32, device=device),
        indexing="ij",
    )
    # The in-plane part of the map is the same for every slice: compute it once, normalised.
    plane = (ii[..., None] * index[:3, 0] + jj[..., None] * index[:3, 1] + index[:3, 3]) * scale - 1.0
    slice_step = index[:3, 2] * scale
    grid_mode = "nearest" if mode == "nearest" else "bilinear"
    padding = "border" if fill is None else "zeros"
    for first in range(0, target_shape[0], step):
        ks = torch.arange(first, min(first + step, target_shape[0]), dtype=torch.float32, device=device)
        grid = plane[None] + ks[:, None, None, None] * slice_step  # (k, rows, cols, 3), normalised
        sampled = F.grid_sample(tensor, grid[None].to(dtype), mode=grid_mode, padding_mode=padding, align_corners=True)
        block = sampled[0].float()
        if fill is not None:
            # Zero padding fades towards 0; adding fill * (1 - weight inside) makes it fade towards
            # ``fill`` without a shifted copy of the (possibly 300 MB) source.
            block += fill * (1.0 - _inside_weight(grid, sizes, mode))
        if outside is not None:
            # Beyond the voxel centres plus half a voxel, in normalised units.
            bound = 1.0 + scale / 2.0 + 1e-6
            block[:, (grid.abs() > bound).any(dim=-1)] = outside
        out[:, first : first + len(ks)] = block.cpu().numpy()
    return out


def _inside_weight(grid: torch.Tensor, sizes: torch.Tensor, mode: str) -> torch.Tensor:
    """Share of ``grid_sample``'s interpolation weight that falls inside the source (zero padding)."""
    x = (grid + 1.0) / 2.0 * (sizes - 1)  # the positions grid_sample unnormalises to (align_corners=True)
    if mode == "nearest":
        nearest = torch.round(x)  # half to even, as grid_sample
        return ((nearest >= 0) & (nearest <= sizes - 1)).all(dim=-1).to(torch.float32)
    low = torch.floor(x)
    frac = x - low
    weight = (1.0 - frac) * ((low >= 0) & (low <= sizes - 1)) + frac * ((low >= -1) & (low <= sizes - 2))
    return weight.prod(dim=-1)


@dataclass(frozen=True)
class BoxedMap:
    """A map on a grid that is zero outside one box.

    Model outputs are local (an organ fills a few percent of a CT), so they are
    kept and fused as the box where they have support plus its contents; the
    dense array is built only on request.

    Attributes
    ----------
    shape : tuple of int
        ``(slices, rows, columns)`` of the whole grid.
    box : tuple of slice
        Where ``data`` lies in the grid (integer bounds, step 1).
    data : numpy.ndarray
        The values inside ``box``.
    """

    shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    data: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3:
            raise ValueError(f"shape must have three axes, got {self.shape}")
        box = tuple(slice(int(s.start), int(s.stop)) for s in self.box)
        for s, n in zip(box, shape, strict=True):
            if not 0 <= s.start <= s.stop <= n:
                raise ValueError(f"box {self.box} does not fit in grid {shape}")
        extent = tuple(s.stop - s.start for s in box)
        if tuple(self.data.shape) != extent:
            raise ValueError(f"data shape {self.data.shape} does not match box extent {extent}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "box", box)

    @classmethod
    def empty(cls, shape: Sequence[int], dtype: np.dtype | type = np.float32) -> BoxedMap:
        """A map that is zero everywhere."""
        return cls(tuple(shape), (slice(0, 0),) * 3, np.zeros((0, 0, 0), dtype))

    @classmethod
    def from_dense(cls, array: np.ndarray, threshold: float = 0.0) -> BoxedMap:
        """Crop ``array`` to the box of its values above ``threshold``."""
        support = array > threshold
        if not support.any():
            return cls.empty(array.shape, array.dtype)
        box = _support_box(support)
        return cls(array.shape, box, array[box])

    @property
    def is_empty(self) -> bool:
        """True when the box holds no voxel."""
        return self.data.size == 0

    def dense(self, dtype: np.dtype | type | None = None) -> np.ndarray:
        """The whole map as one array."""
        out = np.zeros(self.shape, dtype or self.data.dtype)
        out[self.box] = self.data
        return out

    @cached_property
    def mask(self) -> np.ndarray:
        """``data > 0.5`` (the mask every ensemble rule reads), computed once."""
        return self.data > 0.5

    def above(self, threshold: float = 0.5) -> np.ndarray:
        """``data > threshold`` inside the box (the cached :attr:`mask` for 0.5)."""
        return self.mask if threshold == 0.5 else self.data > threshold

    def count(self, threshold: float = 0.5) -> int:
        """Voxels above ``threshold``."""
        return int(np.count_nonzero(self.above(threshold)))

    def touches_border(self, threshold: float = 0.5) -> bool:
        """Whether the map is above ``threshold`` on a face of the whole grid.

        A structure cut by the field of view touches it; its volume may then
        be anything below the whole organ's.
        """
        if self.is_empty:
            return False
        mask = self.above(threshold)
        for axis, (s, n) in enumerate(zip(self.box, self.shape, strict=True)):
            if s.start == 0 and np.take(mask, 0, axis=axis).any():
                return True
            if s.stop == n and np.take(mask, -1, axis=axis).any():
                return True
        return False


def _support_box(support: np.ndarray, pad: int = 0) -> tuple[slice, slice, slice]:
    """Bounding box of a non-empty boolean array, grown by ``pad`` voxels and clipped."""
    box = []
    for axis, axes in enumerate(((1, 2), (0, 2), (0, 1))):
        hits = np.flatnonzero(support.any(axis=axes))
        box.append(slice(max(int(hits[0]) - pad, 0), min(int(hits[-1]) + 1 + pad, support.shape[axis])))
    return box[0], box[1], box[2]


#: A box on a grid: ``(slice, row, column)`` slices with integer bounds and step 1.
Box = tuple[slice, slice, slice]


def _reach(box: Box, source: Geometry, target: Geometry) -> Box | None:
    """The target voxels whose centres fall within ``box`` of the source grid (plus half a voxel)."""
    lo = np.array([s.start for s in box], float) - 0.5  # (slice, row, column) edges
    hi = np.array([s.stop for s in box], float) - 0.5
    corners = np.array([[c, r, s] for c in (lo[2], hi[2]) for r in (lo[1], hi[1]) for s in (lo[0], hi[0])])
    index_map = np.linalg.inv(target.affine) @ source.affine
    reach = corners @ index_map[:3, :3].T + index_map[:3, 3]  # target (column, row, slice)
    first = np.floor(reach.min(axis=0)).astype(int)
    last = np.ceil(reach.max(axis=0)).astype(int)
    upper = np.array([target.shape[2], target.shape[1], target.shape[0]])
    first, last = np.clip(first, 0, upper), np.clip(last + 1, 0, upper)
    if (last <= first).any():
        return None
    return slice(first[2], last[2]), slice(first[1], last[1]), slice(first[0], last[0])


def intersect_boxes(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or ``None`` when they do not overlap."""
    box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True))
    return None if any(s.stop <= s.start for s in box) else box  # type: ignore[return-value]


def mask_reach(data: np.ndarray, source: Geometry, target: Geometry, *, threshold: float = 0.5) -> Box | None:
    """Where on ``target`` the resampled ``data`` can exceed ``threshold``, or ``None`` if nowhere.

    Linear interpolation is a convex combination of neighbours, so a target
    voxel above ``threshold`` has a source neighbour above it: the box is
    the source voxels above ``threshold``, grown by one voxel, carried to
    ``target``.  The ensemble resamples a target's members only inside the
    union of their reaches (:func:`~medsegagent.models.ensemble.fuse_study`).
    """
    above = data > threshold
    if not above.any():
        return None
    if source.same_grid(target):
        return _support_box(above)
    return _reach(_support_box(above, pad=1), source, target)


def resample_boxed(
    data: np.ndarray,
    source: Geometry,
    target: Geometry,
    *,
    mode: str = "linear",
    support: float = 0.05,
    eps: float = 1e-3,
    within: Box | None = None,
) -> BoxedMap:
    """Resample a model output to ``target`` only where it has support.

    Parameters
    ----------
    data : numpy.ndarray
        ``(slices, rows, columns)`` probability (``linear``) or mask
        (``nearest``) on ``source``.
    source, target : Geometry
        The model's grid and the grid of the result (the study's series).
    mode : {"linear", "nearest"}
        Interpolation.
    support : float
        The box covers the source voxels above ``support`` (masks: above 0).
        Softmax outputs have faint tails everywhere (p ~ 0.01); boxing them
        would mean resampling the whole volume for every label, while they
        change no fused score by more than ``support`` times a weight.
    eps : float
        Values at or below ``eps`` inside the box are set to zero.
    within : tuple of slice, optional
        A box of ``target``: resample only there (the ensemble passes the
        region where any member of the target can exceed 0.5).

    Returns
    -------
    BoxedMap
        On ``target``: the target voxels whose centres fall within one source
        voxel of the support box (and inside ``within``), resampled; zero
        elsewhere (and outside the source's extent).
    """
    threshold = support if mode == "linear" else 0.0
    inside = data > threshold
    if not inside.any():
        return BoxedMap.empty(target.shape)
    if source.same_grid(target):  # a backend that answers on the study's grid: just crop
        box = _support_box(inside)
        box = box if within is None else intersect_boxes(box, within)
        if box is None:
            return BoxedMap.empty(target.shape)
        block = data[box].astype(np.float32)
        block[block <= (eps if mode == "linear" else 0.0)] = 0.0
        return BoxedMap(target.shape, box, block)
    # One voxel of slack: linear interpolation reaches one voxel beyond the support.
    box = _support_box(inside, pad=1)
    out_box = _reach(box, source, target)
    if out_box is not None and within is not None:
        out_box = intersect_boxes(out_box, within)
    if out_box is None:
        return BoxedMap.empty(target.shape)
    # Only the source's box is sampled from: outside it the map counts as zero.
    cropped = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
    cropped[...] = data[box]
    block = resample(
        cropped, sub_geometry(source, box), sub_geometry(target, out_box), mode=mode, outside=0.0, device=map_device()
    )
    if mode == "linear":
        block[block <= eps] = 0.0
    return BoxedMap(target.shape, out_box, block)
