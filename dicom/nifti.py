"""NIfTI images as :class:`~medsegagent.dicom.volume.Volume` objects, and back.

NIfTI stores ``data[i, j, k]`` with an affine to RAS millimetres; a
:class:`Volume` holds ``array[slice, row, column]`` with a geometry in LPS.
The two are the same grid when ``array = data.transpose(2, 1, 0)`` and the
LPS affine is ``diag(-1, -1, 1, 1) @ affine`` (see
:meth:`Geometry.nifti_affine`, the inverse used when the node exports NIfTI).
Real scans that are published as NIfTI (Colin27) reach the node as DICOM
series written from such a volume.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsegagent.dicom.volume import LPS_TO_RAS, Geometry, Volume

__all__ = ["NiftiError", "axial_lps", "geometry_from_affine", "volume_from_nifti"]


class NiftiError(ValueError):
    """A NIfTI image the node cannot place as a DICOM grid (sheared axes, not 3-D)."""


def geometry_from_affine(shape_ijk: tuple[int, int, int], affine_ras: np.ndarray) -> Geometry:
    """The :class:`Geometry` of a NIfTI grid.

    Parameters
    ----------
    shape_ijk : tuple of int
        The NIfTI data shape ``(i, j, k)``.
    affine_ras : numpy.ndarray
        The image's 4x4 affine from ``(i, j, k)`` to RAS mm.

    Raises
    ------
    NiftiError
        When the ``i`` and ``j`` axes are not orthogonal: a DICOM image plane
        cannot represent a sheared grid.
    """
    lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)  # (i, j, k) step lengths
    if np.any(spacing <= 0):
        raise NiftiError(f"the affine has a zero-length axis: {affine_ras.tolist()}")
    directions = lps[:3, :3] / spacing
    if abs(float(directions[:, 0] @ directions[:, 1])) > 1e-4:
        raise NiftiError("the image's in-plane axes are not orthogonal (a sheared affine)")
    i, j, k = (int(n) for n in shape_ijk)
    return Geometry(
        shape=(k, j, i),
        origin=lps[:3, 3],
        row_direction=directions[:, 0],
        column_direction=directions[:, 1],
        slice_direction=directions[:, 2],
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
    )


def volume_from_nifti(
    image: str | Path | Any,
    *,
    modality: str,
    series_instance_uid: str = "",
    meta: Mapping[str, Any] | None = None,
    dtype: type = np.float32,
) -> Volume:
    """Read a NIfTI file (or a nibabel image) as a :class:`Volume`.

    Parameters
    ----------
    image : str, Path or nibabel image
        The NIfTI image; the stored scaling (``scl_slope``) is applied.
    modality : str
        DICOM modality of the content (``MR``, ``CT``).
    series_instance_uid : str
        The series UID, where the volume stands for one.
    meta : mapping, optional
        Header facts (``SeriesDescription`` ...), as :func:`~medsegagent.dicom.series.read_series` gives them.
    dtype : type
        Array type of the result.

    Raises
    ------
    NiftiError
        For an image that is not 3-D or whose grid DICOM cannot represent.
    """
    import nibabel as nib

    img = nib.load(str(image)) if isinstance(image, str | Path) else image
    if len(img.shape) != 3:
        raise NiftiError(f"expected a 3-D image, got shape {img.shape}")
    geometry = geometry_from_affine(img.shape, img.affine)
    array = np.ascontiguousarray(np.asarray(img.dataobj, dtype=dtype).transpose(2, 1, 0))
    return Volume(array, geometry, modality, series_instance_uid, meta=dict(meta or {}))


def axial_lps(volume: Volume) -> Volume:
    """The same voxels laid out as a radiological axial stack (exact: flips and transposes only).

    Rows run anterior to posterior, columns right to left of the patient
    (``ImageOrientationPatient`` ``1\\0\\0\\0\\1\\0``) and slices feet to
    head: how a scanner writes an axial series and viewers expect it.  A
    NIfTI in RAS order would otherwise become an axial series shown upside
    down.

    Raises
    ------
    NiftiError
        When the grid is not aligned with the patient axes.
    """
    g = volume.geometry
    axes = np.stack([g.slice_direction, g.column_direction, g.row_direction])  # array axis -> direction
    which = np.abs(axes).argmax(axis=1)  # the patient axis (0 = x, 1 = y, 2 = z) of each array axis
    if sorted(which.tolist()) != [0, 1, 2] or not np.allclose(np.abs(axes).max(axis=1), 1.0, atol=1e-4):
        raise NiftiError("the grid is oblique: it cannot be laid out axially without resampling")
    # Array axes in (z, y, x) order, then flip those that run against +z, +y, +x.
    order = [int(np.where(which == patient_axis)[0][0]) for patient_axis in (2, 1, 0)]
    array = volume.array.transpose(order)
    signs = [float(np.sign(axes[a, p])) for a, p in zip(order, (2, 1, 0), strict=True)]
    flips = tuple(k for k, s in enumerate(signs) if s < 0)
    array = np.ascontiguousarray(np.flip(array, flips) if flips else array)
    spacing = tuple(g.spacing[a] for a in order)
    # The new first voxel is the old voxel at the far end of every flipped axis.
    corner = [0, 0, 0]  # (slice, row, column) index in the old array
    for new_axis, old_axis in enumerate(order):
        if new_axis in flips:
            corner[old_axis] = g.shape[old_axis] - 1
    origin = g.index_to_lps(np.array(corner[2]), np.array(corner[1]), np.array(corner[0]))
    geometry = Geometry(
        shape=array.shape,
        origin=origin,
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        spacing=spacing,
    )
    return Volume(array, geometry, volume.modality, volume.series_instance_uid, list(volume.source_instances),
                  dict(volume.meta))  # fmt: skip
