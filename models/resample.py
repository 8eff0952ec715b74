"""Resampling between voxel grids in patient space.

Models are trained on a fixed, axis-aligned grid; sources come in any
orientation and size.  :func:`model_grid` builds the axis-aligned LPS grid
that covers a source volume, and :func:`resample` moves data between any two
:class:`~medsegagent.dicom.volume.Geometry` grids by sampling at voxel
centres (trilinear for images and probabilities, nearest for labels).  Going
there and back is the same operation twice, so masks land on the source
voxels they were computed for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medsegagent.dicom.volume import Geometry

#: Destination slices resampled per chunk; bounds the sampling grid's memory.
_CHUNK_VOXELS = 8_000_000


def model_grid(
    source: Geometry, size: Sequence[int], foreground: np.ndarray | None = None, margin_mm: float = 10.0
) -> Geometry:
    """Axis-aligned LPS grid of ``size`` voxels covering ``source`` (or its foreground).

    Parameters
    ----------
    source : Geometry
        The grid to cover (any orientation).
    size : sequence of int
        ``(x, y, z)`` voxel counts of the model's input grid.
    foreground : numpy.ndarray, optional
        Boolean mask on ``source``; when given (and not empty) the grid covers
        only its bounding box plus ``margin_mm``, so the model's voxels are
        spent on the patient rather than on air.
    margin_mm : float
        Margin around the foreground box.

    Returns
    -------
    Geometry
        A grid whose columns run along +x (patient left), rows along +y
        (posterior), slices along +z (superior), spanning the bounding box
        of ``source``'s voxel centres.
    """
    lo_idx, hi_idx = np.zeros(3), np.array(source.shape, dtype=float) - 1  # (slice, row, column)
    margin = 0.0
    if foreground is not None and foreground.any():
        hits = [np.flatnonzero(foreground.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        lo_idx = np.array([h[0] for h in hits], dtype=float)
        hi_idx = np.array([h[-1] for h in hits], dtype=float)
        margin = margin_mm
    corners = np.array(
        [[c, r, s] for c in (lo_idx[2], hi_idx[2]) for r in (lo_idx[1], hi_idx[1]) for s in (lo_idx[0], hi_idx[0])],
        dtype=float,
    )
    points = source.index_to_lps(corners[:, 0], corners[:, 1], corners[:, 2])
    low, high = points.min(axis=0) - margin, points.max(axis=0) + margin
    nx, ny, nz = (int(v) for v in size)
    spacing_xyz = np.maximum((high - low) / np.maximum(np.array([nx, ny, nz]) - 1, 1), 1e-3)
    return Geometry(
        shape=(nz, ny, nx),
        origin=low,
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        slice_direction=(0.0, 0.0, 1.0),
        spacing=(float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])),
    )


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Voxels clearly above the background (air) level of an image.

    The threshold is 10 % of the way from the 1st to the 99th percentile,
    which separates air from any tissue in CT (HU) and in MR/PET alike.
    """
    low, high = np.percentile(array[:: max(1, array.shape[0] // 16)], [1, 99])
    return array > low + 0.1 * (high - low)


def resample(
    data: np.ndarray | torch.Tensor,
    source: Geometry,
    target: Geometry,
    *,
    mode: str = "linear",
    fill: float | None = None,
    dtype: torch.dtype = torch.float32,
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
        Value outside the source; by default the nearest border value.
    dtype : torch.dtype
        Working precision.

    Returns
    -------
    numpy.ndarray
        ``target.shape`` (with the channel axis first if the input had one).
    """
    tensor = torch.as_tensor(data)
    squeeze = tensor.ndim == 3
    if squeeze:
        tensor = tensor[None]
    if tuple(tensor.shape[1:]) != source.shape:
        raise ValueError(f"data shape {tuple(tensor.shape)} does not match source grid {source.shape}")
    if source.same_grid(target):
        out = tensor.to(dtype).numpy()
        return out[0] if squeeze else out
    tensor = tensor.to(dtype)[None]  # (1, C, D, H, W)
    # Affine from target indices straight to source indices: one matmul per voxel.
    index_map = np.linalg.inv(source.affine) @ target.affine
    depth, rows, cols = source.shape
    scale = np.array([2.0 / max(cols - 1, 1), 2.0 / max(rows - 1, 1), 2.0 / max(depth - 1, 1)])
    out = np.empty((tensor.shape[1], *target.shape), dtype=np.float32)
    per_slice = target.shape[1] * target.shape[2]
    step = max(1, _CHUNK_VOXELS // per_slice)
    jj, ii = np.meshgrid(np.arange(target.shape[1]), np.arange(target.shape[2]), indexing="ij")
    grid_mode = "nearest" if mode == "nearest" else "bilinear"
    padding = "border" if fill is None else "zeros"
    for start in range(0, target.shape[0], step):
        ks = np.arange(start, min(start + step, target.shape[0]))
        idx = np.stack(
            [
                np.broadcast_to(ii, (len(ks), *ii.shape)),
                np.broadcast_to(jj, (len(ks), *jj.shape)),
                np.broadcast_to(ks[:, None, None], (len(ks), *ii.shape)),
            ],
            axis=-1,
        ).astype(np.float64)
        src_idx = idx @ index_map[:3, :3].T + index_map[:3, 3]
        grid = torch.from_numpy((src_idx * scale - 1.0).astype(np.float32))[None]
        if fill is not None:
            sampled = F.grid_sample(
                tensor - fill, grid.to(dtype), mode=grid_mode, padding_mode=padding, align_corners=True
            )
            sampled = sampled + fill
        else:
            sampled = F.grid_sample(tensor, grid.to(dtype), mode=grid_mode, padding_mode=padding, align_corners=True)
        out[:, ks] = sampled[0].float().numpy()
    return out[0] if squeeze else out
