"""RGB preview of a segmentation over its source slice (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Display windows per modality (low, high) in real-world units.
_WINDOWS = {"CT": (-160.0, 240.0)}


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
    image : numpy.ndarray
        ``(slices, rows, columns)`` source values.
    labels : numpy.ndarray
        Label map on the same grid, values ``1..len(colors)``.
    colors : sequence of (r, g, b)
        Colour of each label value.
    out_path : Path
        PNG to write.
    modality : str
        Chooses the display window (CT abdomen window; percentiles otherwise).

    Returns
    -------
    int
        Index of the slice shown.
    """
    areas = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
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
    picture = Image.fromarray(rgb.astype(np.uint8))
    scale = max(1, int(np.ceil(min_size / max(picture.size))))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out_path)
    return index
