"""Voxel grids in patient space.

A :class:`Geometry` describes where every voxel of a 3-D array lies in the
DICOM patient coordinate system (LPS, millimetres).  Arrays are indexed
``(slice, row, column)`` — the order in which DICOM stores frames — and the
geometry's affine maps the index triplet ``(column, row, slice)`` to LPS, the
same convention as the Image Plane module (``ImageOrientationPatient`` gives
the direction of increasing column index first, then of increasing row
index).

Everything in the node that touches geometry (series reading, phantoms,
resampling, SEG writing, NIfTI export) goes through this one class so that
there is exactly one definition of "which voxel is where".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

#: Flips LPS to RAS (NIfTI's world space) and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Position of a ``(slices, rows, columns)`` voxel grid in LPS space.

    Parameters
    ----------
    shape : tuple of int
        ``(slices, rows, columns)``.
    origin : numpy.ndarray
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``, i.e. the
        ``ImagePositionPatient`` of the first slice.
    row_direction : numpy.ndarray
        Unit vector along which the column index grows (first triplet of
        ``ImageOrientationPatient``).
    column_direction : numpy.ndarray
        Unit vector along which the row index grows (second triplet).
    slice_direction : numpy.ndarray
        Unit vector along which the slice index grows.  For a series sorted
        by position this is the slice normal; it is kept separately so a
        left-handed stack is represented faithfully.
    spacing : tuple of float
        ``(slice, row, column)`` spacing in mm; row spacing is the distance
        between rows (first value of ``PixelSpacing``).
    """

    shape: tuple[int, int, int]
    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    spacing: tuple[float, float, float]
    _affine: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive floats, got {self.spacing}")
        vectors = {}
        for name in ("origin", "row_direction", "column_direction", "slice_direction"):
            value = np.asarray(getattr(self, name), dtype=np.float64).reshape(3)
            object.__setattr__(self, name, value)
            vectors[name] = value
        for name in ("row_direction", "column_direction", "slice_direction"):
            norm = np.linalg.norm(vectors[name])
            if not np.isclose(norm, 1.0, atol=1e-4):
                raise ValueError(f"{name} must be a unit vector, got norm {norm:.6f}")
        if abs(float(vectors["row_direction"] @ vectors["column_direction"])) > 1e-4:
            raise ValueError("row and column directions are not orthogonal")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        affine = np.eye(4)
        affine[:3, 0] = self.row_direction * self.spacing[2]
        affine[:3, 1] = self.column_direction * self.spacing[1]
        affine[:3, 2] = self.slice_direction * self.spacing[0]
        affine[:3, 3] = self.origin
        object.__setattr__(self, "_affine", affine)

    # -- derived quantities -------------------------------------------------
    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping ``(column, row, slice, 1)`` to LPS mm."""
        return self._affine.copy()

    @property
    def normal(self) -> np.ndarray:
        """Right-handed plane normal ``row_direction x column_direction``."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def image_orientation(self) -> list[float]:
        """``ImageOrientationPatient`` value shared by all slices."""
        return [float(v) for v in (*self.row_direction, *self.column_direction)]

    @property
    def pixel_spacing(self) -> list[float]:
        """``PixelSpacing`` value: row spacing, then column spacing."""
        return [self.spacing[1], self.spacing[2]]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def slice_position(self, index: int) -> np.ndarray:
        """``ImagePositionPatient`` of slice ``index``."""
        return self.origin + self.slice_direction * self.spacing[0] * index

    def index_to_lps(self, column: np.ndarray, row: np.ndarray, slice_: np.ndarray) -> np.ndarray:
        """Map (possibly fractional) voxel indices to LPS points, shape ``(..., 3)``."""
        idx = np.stack([np.asarray(column, float), np.asarray(row, float), np.asarray(slice_, float)], axis=-1)
        return idx @ self._affine[:3, :3].T + self._affine[:3, 3]

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map LPS points ``(..., 3)`` to fractional ``(column, row, slice)`` indices."""
        inv = np.linalg.inv(self._affine)
        pts = np.asarray(points, float)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def voxel_centres(self) -> np.ndarray:
        """LPS centre of every voxel, shape ``(slices, rows, columns, 3)``."""
        k, j, i = np.meshgrid(
            np.arange(self.shape[0]), np.arange(self.shape[1]), np.arange(self.shape[2]), indexing="ij"
        )
        return self.index_to_lps(i, j, k)

    def nifti_affine(self) -> np.ndarray:
        """RAS affine for a NIfTI image whose data is ``array.transpose(2, 1, 0)``."""
        return LPS_TO_RAS @ self._affine

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when ``other`` places every voxel at the same point."""
        return self.shape == other.shape and np.allclose(self._affine, other._affine, atol=tol)


@dataclass
class Volume:
    """A scalar image on a :class:`Geometry`.

    Parameters
    ----------
    array : numpy.ndarray
        Voxel values, shape ``geometry.shape``; real-world values (HU for CT)
        after the rescale of the source.
    geometry : Geometry
        Where the voxels are.
    modality : str
        DICOM ``Modality`` of the source (``CT``, ``MR``, ``PT``, ``US``).
    series_instance_uid : str
        The source series.
    source_instances : list
        ``(sop_class_uid, sop_instance_uid, frame_number)`` of every slice
        in array order; ``frame_number`` is ``None`` for single-frame
        sources.  SEG and SR writers reference these.
    meta : dict
        Other header facts the router and writers use (series description,
        MR sequence, study UID, patient, ...).
    source_headers : sequence of Dataset
        The source instances' headers as read (pixel data left on disk),
        for the writers that reference them (SEG, SR): read once, not again.
    """

    array: np.ndarray
    geometry: Geometry
    modality: str
    series_instance_uid: str
    source_instances: list[tuple[str, str, int | None]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    source_headers: Sequence[Dataset] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} does not match geometry {self.geometry.shape}")
