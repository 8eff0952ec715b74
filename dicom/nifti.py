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

__all__ = ["NiftiError", "axial_lps", "geometry_from_affine", "reorient", "volume_from_nifti"]


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


def reorient(volume: Volume, axcodes: str) -> Volume:
    """The same voxels with the array's axes permuted and flipped to run closest to ``axcodes`` (exact).

    What ``fslreorient2std`` (``"LAS"``) and nibabel's ``as_closest_canonical``
    (``"RAS"``) do to a NIfTI image: every voxel keeps its value and its place
    in the patient; an oblique series stays oblique, with its axes renamed.

    Parameters
    ----------
    volume : Volume
        Any series: axial, sagittal, coronal, oblique, left- or right-handed.
    axcodes : str
        nibabel axis codes of the NIfTI ``(i, j, k)`` axes of the result, that
        is of the array's ``(column, row, slice)`` axes: ``"RAS"`` has columns
        running to the patient's right, rows anterior, slices superior.
    """
    import nibabel.orientations as nio

    g = volume.geometry
    # Per NIfTI input axis n (array axis 2 - n): (NIfTI output axis, flip).
    transform = nio.ornt_transform(nio.io_orientation(g.nifti_affine()), nio.axcodes2ornt(axcodes))
    order: list[int] = []  # the old array axis of each new one
    flips: list[int] = []  # new array axes that run against the old one
    for axis in range(3):
        nifti_in = int(np.flatnonzero(transform[:, 0] == 2 - axis)[0])
        order.append(2 - nifti_in)
        if transform[nifti_in, 1] < 0:
            flips.append(axis)
    array = volume.array.transpose(order)
    array = np.ascontiguousarray(np.flip(array, tuple(flips)) if flips else array)
    directions = (g.slice_direction, g.column_direction, g.row_direction)  # per old array axis
    new = [directions[order[a]] * (-1.0 if a in flips else 1.0) for a in range(3)]
    corner = [0, 0, 0]  # old (slice, row, column) index of the new first voxel
    for axis in flips:
        corner[order[axis]] = g.shape[order[axis]] - 1
    geometry = Geometry(
        shape=array.shape,
        origin=g.index_to_lps(np.array(corner[2]), np.array(corner[1]), np.array(corner[0])),
        row_direction=new[2],
        column_direction=new[1],
        slice_direction=new[0],
        spacing=tuple(g.spacing[a] for a in order),
    )
    return Volume(array, geometry, volume.modality, volume.series_instance_uid, list(volume.source_instances),
                  dict(volume.meta))  # fmt: skip


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
    axes = np.abs(np.stack([g.row_direction, g.column_direction, g.slice_direction]))
    if not np.allclose(axes.max(axis=1), 1.0, atol=1e-4):
        raise NiftiError("the grid is oblique: it cannot be laid out axially without resampling")
    return reorient(volume, "LPS")
