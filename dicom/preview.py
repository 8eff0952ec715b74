"""RGB preview of a segmentation over its source slice (PNG, or pixels for a Secondary Capture)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Display windows per modality (low, high) in real-world units; others use percentiles.
_WINDOWS = {"CT": (-160.0, 240.0)}


@dataclass(frozen=True)
class Preview:
    """An overlay picture of one source slice.

    Attributes
    ----------
    rgb : numpy.ndarray
        ``(rows, columns, 3)`` uint8 picture (upscaled by ``scale``).
    slice_index : int
        Index (in volume order) of the slice shown.
    scale : int
        Integer nearest-neighbour upscaling applied to the slice.
    """

    rgb: np.ndarray
    slice_index: int
    scale: int


def preview_rgb(
    image: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
    *,
    modality: str = "CT",
    alpha: float = 0.45,
    min_size: int = 512,
) -> Preview:
    """Blend the label colours over the slice with the largest segmented area.

    Parameters
    ----------
    image : numpy.ndarray
        ``(slices, rows, columns)`` source values.
    labels : numpy.ndarray
        Label map on the same grid, values ``0..len(colors)``.
    colors : sequence of (r, g, b)
        Colour of each label value.
    modality : str
        Chooses the display window (CT abdomen window; 1-99 percentiles otherwise).
    alpha : float
        Opacity of the overlay, in ``[0, 1]``.
    min_size : int
        The picture is upscaled by an integer factor until its larger side
        reaches at least this many pixels.

    Returns
    -------
    Preview

    Raises
    ------
    ValueError
        On mismatched shapes, label values without a colour, or ``alpha``
        outside ``[0, 1]``.
    """
    if image.ndim != 3 or labels.shape != image.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be the same 3-D grid")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels.size and int(labels.max()) > len(colors):
        raise ValueError(f"label value {int(labels.max())} has no colour ({len(colors)} given)")
    # Slice by slice: count_nonzero's fast path, not a bool copy of the volume summed in int64.
    areas = np.array([np.count_nonzero(plane) for plane in labels])
    index = int(np.argmax(areas)) if areas.any() else labels.shape[0] // 2
    plane = image[index].astype(np.float32)
    low, high = _WINDOWS.get(modality) or tuple(np.percentile(plane, [1, 99]))
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    lut = np.zeros((max(len(colors), 1) + 1, 3), np.float32)
    for value, color in enumerate(colors, start=1):
        lut[value] = color
    mask = labels[index] > 0
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * lut[labels[index][mask]]
    scale = max(1, int(np.ceil(min_size / max(rgb.shape[:2]))))
    pixels = np.rint(rgb).astype(np.uint8)
    if scale > 1:
        pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    return Preview(np.ascontiguousarray(pixels), index, scale)


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
    out_path: Path,
    *,
    modality: str = "CT",
    alpha: float = 0.45,
    min_size: int = 512,
) -> int:
    """Write a PNG of the slice with the largest segmented area.

    Parameters
    ----------
    image, labels, colors, modality, alpha, min_size
        As for :func:`preview_rgb`.
    out_path : Path
        PNG to write.

    Returns
    -------
    int
        Index of the slice shown.
    """
    preview = preview_rgb(image, labels, colors, modality=modality, alpha=alpha, min_size=min_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(preview.rgb).save(out_path)
    return preview.slice_index
