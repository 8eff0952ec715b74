"""Synthetic abdominal phantom patients (pure numpy).

A phantom is an analytic anatomy in DICOM patient space (LPS, millimetres):
a body of elliptical cross-section with subcutaneous fat and an abdominal
wall, a spine, psoas and paraspinal muscles, lung bases, the inferior vena
cava, and seven labelled structures (:data:`PHANTOM_LABELS`) — liver, spleen,
both kidneys, pancreas, aorta and one hypodense liver tumour.  Organs are
ellipsoids whose radius is modulated by smooth low-order terms of the
direction (a cheap stand-in for spherical harmonics), optionally bent and
rotated; every random choice comes from ``numpy.random.default_rng(seed)``,
so a seed always gives the same patient.

Because the anatomy is analytic, the ground truth is exact on any grid: the
label map is the anatomy sampled at the voxel centres of the acquisition
grid (:func:`phantom_geometry`), whatever its orientation.  Images are the
tissue classes mapped to modality-specific values (CT in HU, MR as arbitrary
T1-weighted signal, PET as activity concentration in Bq/ml), blurred for
partial volume / scanner resolution and made noisy.

Coordinates: LPS means +x towards the patient's left, +y posterior, +z
superior (head).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter

from .volume import Geometry

if TYPE_CHECKING:
    from pathlib import Path

    from .image_writer import PhantomFiles

#: Label value -> structure name of the phantom's ground truth.
PHANTOM_LABELS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "pancreas",
    6: "aorta",
    7: "liver_tumour",
}

MODALITIES = ("CT", "MR", "PT+CT")
ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")

#: Region the acquisition grid must cover (LPS mm): the whole body
#: cross-section and the organs with their random shifts.
ABDOMEN_BOX = (np.array([-170.0, -125.0, -100.0]), np.array([170.0, 125.0, 110.0]))
#: Minimum in-plane field of view (mm), a typical abdominal reconstruction.
MIN_FOV_MM = 400.0
#: Tilt of the oblique grid: rotations (degrees) about x, then y.
OBLIQUE_ANGLES_DEG = (18.0, 15.0)

#: PET scaling: Bq/ml of one SUV(bw) for the default 75 kg patient given
#: 300 MBq F-18 FDG 60 min before the scan (decay-corrected to scan start).
PET_PATIENT_WEIGHT_KG = 75.0
PET_INJECTED_DOSE_BQ = 300e6
PET_UPTAKE_S = 3600.0
F18_HALF_LIFE_S = 6586.2
SUV_BQML = PET_INJECTED_DOSE_BQ * 2.0 ** (-PET_UPTAKE_S / F18_HALF_LIFE_S) / (PET_PATIENT_WEIGHT_KG * 1000.0)

# Tissue classes of the intensity model (not the labels).
AIR, FAT, MUSCLE, VISCERA, BONE, DISC, CANAL, LUNG, IVC = range(9)
LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, PANCREAS, AORTA, TUMOUR, MEDULLA = 11, 12, 13, 14, 15, 16, 17, 18

#: Per tissue: (CT HU, MR T1 VIBE signal, PET SUV).  VISCERA is a mix of two
#: rows (fatty mesentery / bowel) driven by a smooth random field.
#:
#: MR is a non-contrast fat-saturated 3-D spoiled GRE (VIBE: TR 4.1 ms, TE
#: 1.9 ms, flip 10 degrees, as written in the headers).  The organ ordering
#: follows the steady-state signal PD * sin(a)(1 - E1) / (1 - cos(a) E1) with
#: literature 1.5 T T1s (liver ~590 ms, renal cortex ~970 ms, spleen
#: ~1060 ms, muscle ~1010 ms, CSF ~4000 ms) scaled to liver = 460: pancreas
#: brightest (its protein-rich acinar tissue shortens T1), liver > renal cortex
#: > spleen > renal medulla, muscle and suppressed fat darker.  Flowing blood is
#: not the stationary-blood value: the aorta's fast pulsatile flow dephases
#: within the voxel and its long-T1 blood stays saturated across the thick 3-D
#: slab, so it is a dark flow void, well below fat-suppressed retroperitoneal
#: fat; the IVC's slow, steady flow keeps an intermediate signal.  CSF in the
#: spinal canal is dark from its long T1 but well above the void.
_TISSUE_VALUES: dict[int, tuple[float, float, float]] = {
    AIR: (-1000.0, 0.0, 0.0),
    FAT: (-100.0, 120.0, 0.4),  # fat-saturated T1 VIBE: fat is dark
    MUSCLE: (50.0, 260.0, 0.8),
    BONE: (700.0, 80.0, 1.5),  # cortex is void, fat-suppressed marrow low
    DISC: (90.0, 300.0, 0.8),
    CANAL: (15.0, 130.0, 0.6),  # CSF: long T1, low signal
    LUNG: (-850.0, 20.0, 0.4),
    IVC: (150.0, 170.0, 1.7),  # slow venous flow: intermediate, no void
    LIVER: (110.0, 460.0, 2.3),
    SPLEEN: (125.0, 330.0, 1.9),  # hypointense to liver and renal cortex
    KIDNEY_R: (175.0, 390.0, 4.0),  # cortex: above spleen, below liver
    KIDNEY_L: (175.0, 390.0, 4.0),
    MEDULLA: (140.0, 300.0, 5.0),  # excreted tracer collects centrally; corticomedullary contrast on T1
    PANCREAS: (85.0, 680.0, 1.5),  # pancreas is the brightest organ on T1 FS
    AORTA: (185.0, 30.0, 1.7),  # MR: arterial flow void (see above)
    TUMOUR: (45.0, 230.0, 8.0),
}
#: Fatty mesentery is suppressed on MR; bowel loops (intermediate wall, long-T1
#: fluid contents) stay below muscle and spleen on non-contrast T1.
_VISCERA_FATTY = (-95.0, 150.0, 0.6)
_VISCERA_BOWEL = (30.0, 240.0, 1.6)

#: Nominal organ volumes (mL) before the +-10 % random scaling.
NOMINAL_VOLUMES_ML = {"liver": 1500.0, "spleen": 200.0, "kidney_right": 155.0, "kidney_left": 155.0, "pancreas": 75.0}

#: Beyond any grid (mm): the extent of a region that is unbounded along an axis.
_FAR = 1e4


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (degrees) about x, y, z."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` roughly uniform unit vectors, shape ``(n, 3)``."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = math.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=-1)


_SPHERE = _fibonacci_sphere(4096)
_N_MODES = 12


def _radius_modulation(d: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """``1 + sum_k c_k m_k(d)`` for the 12 low-order monomials ``m_k`` of a unit direction."""
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    modes = (
        dx,
        dy,
        dz,
        dx * dy,
        dx * dz,
        dy * dz,
        dx * dx - dy * dy,
        3 * dz * dz - 1,
        dx * dy * dz,
        dx * (dx * dx - 3 * dy * dy),
        dy * (3 * dx * dx - dy * dy),
        dz * (5 * dz * dz - 3),
    )
    r = np.ones(dx.shape, dtype=d.dtype)
    for c, m in zip(coeffs, modes, strict=True):
        if c:
            r += np.asarray(c, dtype=d.dtype) * m
    return np.maximum(r, 0.4)


@dataclass(frozen=True)
class Blob:
    """A perturbed, optionally bent, rotated ellipsoid.

    The implicit function is ``|u| / r(u/|u|)`` where ``u`` are the point's
    coordinates in the blob's frame divided by the semi-axes (after a
    volume-preserving bend ``u_y -= bend * u_x**2``) and ``r`` the radius
    modulation; it is below 1 inside.
    """

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    coeffs: np.ndarray
    bend: float = 0.0

    def level(self, points: np.ndarray) -> np.ndarray:
        """Implicit function at LPS ``points`` (..., 3): < 1 inside, 1 on the surface."""
        points = np.asarray(points)
        dt = points.dtype if points.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        u = (points - self.centre.astype(dt)) @ self.rotation.astype(dt)
        u /= self.axes.astype(dt)
        if self.bend:
            u[..., 1] -= dt.type(self.bend) * u[..., 0] ** 2
        n = np.sqrt(np.einsum("...i,...i->...", u, u))
        d = u / np.maximum(n, dt.type(1e-6))[..., None]
        return n / _radius_modulation(d, self.coeffs)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of ``points`` (..., 3) inside the blob."""
        return self.level(points) < 1.0

    def volume_ml(self) -> float:
        """Analytic volume (mL): ``abc/3 * integral of r^3 over the sphere``."""
        r3 = np.mean(_radius_modulation(_SPHERE, self.coeffs) ** 3) * 4.0 * math.pi
        return float(np.prod(self.axes) * r3 / 3.0 / 1000.0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Conservative axis-aligned LPS bounding box ``(low, high)``."""
        rmax = float(_radius_modulation(_SPHERE, self.coeffs).max()) * 1.05
        half = self.axes * rmax
        half = half + np.array([0.0, abs(self.bend) * rmax**2 * self.axes[1], 0.0])
        ext = np.abs(self.rotation) @ half
        return self.centre - ext, self.centre + ext


@dataclass(frozen=True)
class Tube:
    """Elliptical tube along z whose centre moves linearly with z."""

    centre: np.ndarray  # (x, y) at z = 0
    slope: np.ndarray  # d(x, y)/dz
    axes: np.ndarray  # semi-axes (x, y) mm

    def level(self, points: np.ndarray) -> np.ndarray:
        """Implicit function: < 1 inside."""
        cx, cy = (float(v) for v in self.centre)
        sx, sy = (float(v) for v in self.slope)
        ax, ay = (float(v) for v in self.axes)
        z = points[..., 2]
        dx = (points[..., 0] - (cx + sx * z)) / ax
        dy = (points[..., 1] - (cy + sy * z)) / ay
        return np.sqrt(dx * dx + dy * dy)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of ``points`` inside the tube."""
        return self.level(points) < 1.0

    def bounds(self, z_range: tuple[float, float] = (-500.0, 500.0)) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS box of the tube over ``z_range``."""
        z = np.array(z_range)
        ends = self.centre[None, :] + self.slope[None, :] * z[:, None]
        lo = np.r_[ends.min(axis=0) - self.axes, z[0]]
        hi = np.r_[ends.max(axis=0) + self.axes, z[1]]
        return lo, hi


@dataclass(frozen=True)
class Sphere:
    """A ball (the liver tumour)."""

    centre: np.ndarray
    radius: float

    def level(self, points: np.ndarray) -> np.ndarray:
        """Implicit function: < 1 inside."""
        points = np.asarray(points)
        d = points - self.centre.astype(points.dtype if points.dtype == np.float32 else np.float64)
        return np.sqrt(np.einsum("...i,...i->...", d, d)) / self.radius

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of ``points`` inside the ball."""
        return self.level(points) < 1.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box."""
        return self.centre - self.radius, self.centre + self.radius


@dataclass(frozen=True)
class Anatomy:
    """The seeded analytic patient; evaluate it at any LPS points.

    Attributes
    ----------
    organs : dict
        Labelled blobs by name (``liver``, ``spleen``, ``kidney_right``,
        ``kidney_left``, ``pancreas``), plus ``aorta`` (:class:`Tube`) and
        ``liver_tumour`` (:class:`Sphere`).  Each has ``contains(points)``.
    """

    organs: dict[str, Blob | Tube | Sphere]
    ivc: Tube
    body_axes: np.ndarray  # outer skin ellipse semi-axes (x, y)
    fat_thickness: float
    wall_thickness: float
    spine_centre: np.ndarray  # vertebral body centre (x, y)
    spine_radius: float
    disc_phase: float
    lungs: tuple[Blob, Blob]
    viscera_waves: np.ndarray  # (n, 4): wave vector (3) and phase
    bias_waves: np.ndarray  # MR coil sensitivity, same layout

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, points: np.ndarray, grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, tissue classes and viscera mix at LPS ``points``.

        Parameters
        ----------
        points : numpy.ndarray
            ``(..., 3)`` LPS positions in mm (float32 is fastest).
        grid : numpy.ndarray, optional
            When ``points`` is a regular ``(slices, rows, columns, 3)`` block,
            the 4x4 matrix mapping LPS to its ``(column, row, slice)``
            indices; each structure is then evaluated only on the sub-block
            its bounding box covers (much faster, same result).

        Returns
        -------
        labels : numpy.ndarray
            uint8 label values (:data:`PHANTOM_LABELS`), 0 elsewhere.
        tissue : numpy.ndarray
            uint8 tissue class of the intensity model.
        mix : numpy.ndarray
            float32 in [0, 1]: bowel fraction of ``VISCERA`` voxels.
        """
        pts = np.asarray(points)
        if pts.dtype not in (np.float32, np.float64):
            pts = pts.astype(np.float64)
        sel = _Selector(pts, grid)
        labels = np.zeros(pts.shape[:-1], np.uint8)
        tissue = np.full(pts.shape[:-1], AIR, np.uint8)
        # Painted back to front: each layer overwrites the tissue of those before it.
        self._paint_body_wall(sel, tissue, pts)
        self._paint_back_muscles(sel, tissue, pts)
        for lung in self.lungs:
            _paint(sel, tissue, lung, pts, LUNG)
        self._paint_spine(sel, tissue, pts)
        self._paint_organs(sel, tissue, labels, pts)
        # Nothing outside the skin.
        labels[tissue == AIR] = 0

        mix = np.zeros(pts.shape[:-1], np.float32)
        vis = tissue == VISCERA
        if vis.any():
            mix[vis] = _wave_field(pts[vis], self.viscera_waves, sharpness=2.0)
        return labels, tissue, mix

    def _paint_body_wall(self, sel: _Selector, tissue: np.ndarray, pts: np.ndarray) -> None:
        """Skin ellipse, subcutaneous fat, then a muscle layer around the viscera."""
        a, b = (float(v) for v in self.body_axes)
        fa, fb = a - self.fat_thickness, b - self.fat_thickness
        ca, cb = fa - self.wall_thickness, fb - self.wall_thickness
        region = sel.box((-a, -b, -_FAR), (a, b, _FAR))
        if region is None:
            return
        p = pts[region]
        x2, y2 = p[..., 0] ** 2, p[..., 1] ** 2
        t = np.full(x2.shape, AIR, np.uint8)
        t[x2 / (a * a) + y2 / (b * b) < 1] = FAT
        t[x2 / (fa * fa) + y2 / (fb * fb) < 1] = MUSCLE
        t[x2 / (ca * ca) + y2 / (cb * cb) < 1] = VISCERA
        sel.put(tissue, region, None, t)

    def _paint_back_muscles(self, sel: _Selector, tissue: np.ndarray, pts: np.ndarray) -> None:
        """Paraspinal muscles either side of the spine, and the psoas, thickening towards the pelvis."""
        sx, sy = (float(v) for v in self.spine_centre)
        for side in (-1.0, 1.0):
            cx = sx + side * 42.0
            region = sel.box((cx - 30, sy + 18, -_FAR), (cx + 30, sy + 66, _FAR))
            if region is not None:
                p = pts[region]
                inside = ((p[..., 0] - cx) / 30) ** 2 + ((p[..., 1] - (sy + 42)) / 24) ** 2 < 1
                sel.put(tissue, region, inside, MUSCLE)
            region = sel.box((min(0.0, side * 80), sy - 28, -_FAR), (max(0.0, side * 80), sy + 24, _FAR))
            if region is not None:
                p = pts[region]
                z = p[..., 2]
                r = np.clip(6.0 + 0.08 * (110.0 - z), 6.0, 26.0)
                px = side * (22.0 + 0.06 * (110.0 - z))
                inside = (p[..., 0] - px) ** 2 + (p[..., 1] - (sy - 2)) ** 2 < r * r
                sel.put(tissue, region, inside, MUSCLE)

    def _paint_spine(self, sel: _Selector, tissue: np.ndarray, pts: np.ndarray) -> None:
        """Vertebral bodies with discs, posterior elements, canal."""
        sx, sy = (float(v) for v in self.spine_centre)
        sr = self.spine_radius
        canal_y = sy + sr + 9.0
        region = sel.box((sx - 20, sy - sr - 1, -_FAR), (sx + 20, canal_y + 31, _FAR))
        if region is None:
            return
        p = pts[region]
        dx, dy, z = p[..., 0] - sx, p[..., 1], p[..., 2]
        t = np.full(dx.shape, 255, np.uint8)  # 255: leave as is
        body = dx**2 + (dy - sy) ** 2 < sr * sr
        t[body] = BONE
        t[body & (np.mod(z - self.disc_phase, 32.0) < 7.0)] = DISC
        t[(dx / 16) ** 2 + ((dy - canal_y - 8) / 22) ** 2 < 1] = BONE  # lamina + spinous process
        t[dx**2 + (dy - canal_y) ** 2 < 81.0] = CANAL
        sel.put(tissue, region, t != 255, t)

    def _paint_organs(self, sel: _Selector, tissue: np.ndarray, labels: np.ndarray, pts: np.ndarray) -> None:
        """The labelled organs, the vessels and the tumour; later ones win where shapes touch."""
        values = {v: k for k, v in PHANTOM_LABELS.items()}
        order = (
            ("liver", LIVER),
            ("spleen", SPLEEN),
            ("pancreas", PANCREAS),
            ("kidney_right", KIDNEY_R),
            ("kidney_left", KIDNEY_L),
        )
        for name, cls in order:
            hit = _paint(sel, tissue, self.organs[name], pts, cls)
            if hit is None:
                continue
            region, inside, level = hit
            sel.put(labels, region, inside, values[name])
            if name.startswith("kidney"):  # medulla: the inner 60 % of the radius
                sel.put(tissue, region, inside & (level < 0.6), MEDULLA)
        hit = _paint(sel, tissue, self.ivc, pts, IVC)
        if hit is not None:
            sel.put(labels, hit[0], hit[1], 0)
        hit = _paint(sel, tissue, self.organs["aorta"], pts, AORTA)
        if hit is not None:
            sel.put(labels, hit[0], hit[1], values["aorta"])
        hit = _paint(sel, tissue, self.organs["liver_tumour"], pts, None)
        if hit is not None:
            region, inside, _ = hit
            inside = inside & (sel.get(labels, region) == values["liver"])
            sel.put(tissue, region, inside, TUMOUR)
            sel.put(labels, region, inside, values["liver_tumour"])

    def labels_at(self, points: np.ndarray) -> np.ndarray:
        """Ground-truth label values at LPS ``points`` (..., 3)."""
        return self.evaluate(points)[0]


class _Selector:
    """Finds the points of an LPS box: index slices of a grid block, else a boolean mask.

    Slices give views (no gather/scatter), which is what makes evaluating a
    512 x 512 x 300 grid affordable.
    """

    def __init__(self, pts: np.ndarray, grid: np.ndarray | None) -> None:
        self.pts = pts
        self.grid = grid
        if grid is not None:
            flat = pts.reshape(-1, 3)
            corners = pts[np.ix_(*[[0, n - 1] for n in pts.shape[:-1]])].reshape(-1, 3) if flat.size else flat
            self.lo, self.hi = corners.min(axis=0), corners.max(axis=0)

    def box(self, lo: tuple | np.ndarray, hi: tuple | np.ndarray) -> tuple[slice, ...] | np.ndarray | None:
        """Selection covering every point inside ``[lo, hi]`` (``None`` when empty)."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        if self.grid is None:
            box = np.ones(self.pts.shape[:-1], bool)
            for axis in range(3):
                c = self.pts[..., axis]
                box &= (c >= lo[axis]) & (c <= hi[axis])
            return box if box.any() else None
        lo, hi = np.maximum(lo, self.lo), np.minimum(hi, self.hi)
        if np.any(lo > hi):
            return None
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = corners @ self.grid[:3, :3].T + self.grid[:3, 3]  # (column, row, slice)
        shape = self.pts.shape[:-1]  # (slices, rows, columns)
        out = []
        for axis, n in zip((2, 1, 0), shape, strict=True):
            first = max(int(np.floor(idx[:, axis].min() - 1e-3)), 0)
            last = min(int(np.ceil(idx[:, axis].max() + 1e-3)), n - 1)
            if first > last:
                return None
            out.append(slice(first, last + 1))
        return tuple(out)

    @staticmethod
    def get(arr: np.ndarray, region: tuple[slice, ...] | np.ndarray) -> np.ndarray:
        """Values of ``arr`` in ``region`` (a view for slices)."""
        return arr[region]

    @staticmethod
    def put(
        arr: np.ndarray, region: tuple[slice, ...] | np.ndarray, where: np.ndarray | None, value: int | np.ndarray
    ) -> None:
        """``arr[region][where] = value`` (``value`` may be an array shaped like the region)."""
        sub = arr[region]
        if where is None:
            sub[...] = value
        elif isinstance(value, np.ndarray):
            sub[where] = value[where]
        else:
            sub[where] = value
        if not isinstance(region, tuple):  # boolean indexing made a copy
            arr[region] = sub


def _paint(
    sel: _Selector, tissue: np.ndarray, shape: Blob | Sphere | Tube, pts: np.ndarray, cls: int | None
) -> tuple[tuple[slice, ...] | np.ndarray, np.ndarray, np.ndarray] | None:
    """Evaluate ``shape`` only inside its bounding box; paint ``cls``; return (region, inside, level)."""
    lo, hi = shape.bounds()
    region = sel.box(lo, hi)
    if region is None:
        return None
    level = shape.level(pts[region])
    inside = level < 1.0
    if cls is not None:
        sel.put(tissue, region, inside, cls)
    return region, inside, level


def _wave_field(points: np.ndarray, waves: np.ndarray, sharpness: float) -> np.ndarray:
    """Smooth random field in [0, 1] from a sum of plane waves."""
    dt = points.dtype
    acc = np.zeros(points.shape[:-1], dt)
    for w in waves.astype(dt):
        acc += np.cos(points @ w[:3] + w[3])
    acc *= dt.type(sharpness / math.sqrt(len(waves)))
    return (0.5 + 0.5 * np.tanh(acc)).astype(np.float32)


def _random_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    """``n`` random plane waves (direction * 2pi/wavelength, phase)."""
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    k = 2 * math.pi / rng.uniform(*wavelength, size=(n, 1))
    return np.concatenate([d * k, rng.uniform(0, 2 * math.pi, size=(n, 1))], axis=1)


def _make_blob(
    rng: np.random.Generator,
    centre: tuple[float, float, float],
    ratios: tuple[float, float, float],
    angles: tuple[float, float, float],
    volume_ml: float,
    base: dict[int, float] | None = None,
    bend: float = 0.0,
    roughness: float = 0.035,
) -> Blob:
    """Randomise and build a blob whose analytic volume is ``volume_ml`` (+-10 %)."""
    c = np.asarray(centre, float) + rng.uniform(-10.0, 10.0, 3)  # position +-10 mm
    jitter = np.exp(rng.uniform(-0.05, 0.05, 3))  # aspect +-5 %, volume-neutral
    ratios_j = np.asarray(ratios, float) * jitter / np.prod(jitter) ** (1 / 3)
    ang = tuple(a + rng.uniform(-6.0, 6.0) for a in angles)
    coeffs = np.clip(rng.normal(0.0, roughness, _N_MODES), -2.5 * roughness, 2.5 * roughness)
    for k, v in (base or {}).items():
        coeffs[k] += v
    blob = Blob(c, ratios_j, _rotation(ang), coeffs, bend)
    target = volume_ml * rng.uniform(0.9, 1.1)  # size +-10 % in volume
    scale = (target / blob.volume_ml()) ** (1 / 3)
    return Blob(c, ratios_j * scale, blob.rotation, coeffs, bend)


def make_anatomy(seed: int = 0) -> Anatomy:
    """Draw the analytic anatomy of phantom patient ``seed``.

    Parameters
    ----------
    seed : int
        Seed of ``numpy.random.default_rng``; equal seeds give equal anatomy.

    Returns
    -------
    Anatomy
        The analytic patient.
    """
    # One generator, drawn from in a fixed order: changing the order changes every patient.
    rng = np.random.default_rng(seed)
    body_axes = np.array([165.0, 120.0]) * rng.uniform(0.95, 1.05, 2)
    spine = np.array([rng.uniform(-3, 3), 55.0 + rng.uniform(-4, 4)])
    sy = spine[1]
    blobs = _draw_organ_blobs(rng, sy)
    aorta = Tube(
        np.array([12.0 + rng.uniform(-4, 4), sy - 33.0]), np.array([0.0, 0.05]), np.full(2, rng.uniform(9.5, 11.5))
    )
    ivc = Tube(np.array([-22.0 + rng.uniform(-3, 3), sy - 30.0]), np.array([0.0, 0.03]), np.array([13.0, 9.0]))
    lungs = (
        Blob(np.array([-85.0, 15.0, 175.0]), np.array([70.0, 85.0, 75.0]), np.eye(3), np.zeros(_N_MODES)),
        Blob(np.array([85.0, 15.0, 165.0]), np.array([70.0, 85.0, 75.0]), np.eye(3), np.zeros(_N_MODES)),
    )
    neighbours = (blobs["kidney_right"], blobs["pancreas"], blobs["spleen"], ivc, aorta)
    tumour = _place_tumour(rng, blobs["liver"], neighbours)
    return Anatomy(
        organs={**blobs, "aorta": aorta, "liver_tumour": tumour},
        ivc=ivc,
        body_axes=body_axes,
        fat_thickness=float(rng.uniform(14, 22)),
        wall_thickness=10.0,
        spine_centre=spine,
        spine_radius=float(rng.uniform(16, 19)),
        disc_phase=float(rng.uniform(0, 32)),
        lungs=lungs,
        viscera_waves=_random_waves(rng, 8, (35.0, 80.0)),
        bias_waves=_random_waves(rng, 3, (400.0, 700.0)),
    )


def _draw_organ_blobs(rng: np.random.Generator, sy: float) -> dict[str, Blob]:
    """Liver, spleen, both kidneys and pancreas, placed relative to the spine at ``y = sy``."""
    # Liver: right upper quadrant, tapering medially (left lobe) and inferiorly.
    liver = _make_blob(
        rng,
        (-70.0, -5.0, 28.0),
        (80.0, 80.0, 60.0),
        (0.0, 0.0, 0.0),
        NOMINAL_VOLUMES_ML["liver"],
        base={0: -0.12, 2: 0.08, 4: -0.06},
    )
    # Spleen: left posterior-superior, long axis along the ribs, concave medially.
    spleen = _make_blob(
        rng, (88.0, sy - 12.0, 52.0), (24.0, 52.0, 38.0), (0.0, 0.0, -35.0), NOMINAL_VOLUMES_ML["spleen"], bend=0.6
    )
    # Kidneys: either side of the spine, upper poles medial, right lower.
    kidney_r = _make_blob(
        rng,
        (-70.0, sy + 3.0, -35.0),
        (27.0, 25.0, 50.0),
        (0.0, -12.0, 20.0),
        NOMINAL_VOLUMES_ML["kidney_right"],
        roughness=0.025,
    )
    kidney_l = _make_blob(
        rng,
        (72.0, sy, -25.0),
        (27.0, 25.0, 50.0),
        (0.0, 12.0, -20.0),
        NOMINAL_VOLUMES_ML["kidney_left"],
        roughness=0.025,
    )
    # Pancreas: transverse in front of the aorta, draped over the spine (both
    # ends posterior), tail rising towards the splenic hilum.  The low
    # roughness and ~17 mm semi-axes keep it >= 20 mm thick everywhere.
    pancreas = _make_blob(
        rng,
        (15.0, -14.0, 0.0),
        (58.0, 17.0, 18.0),
        (0.0, -12.0, 0.0),
        NOMINAL_VOLUMES_ML["pancreas"],
        bend=1.0,
        roughness=0.02,
    )
    return {"liver": liver, "spleen": spleen, "kidney_right": kidney_r, "kidney_left": kidney_l, "pancreas": pancreas}


def _place_tumour(rng: np.random.Generator, liver: Blob, others: tuple) -> Sphere:
    """A 2-4 cm ball well inside the liver and clear of neighbouring organs."""
    surface = _fibonacci_sphere(256)
    radius = float(rng.uniform(10.0, 18.0))
    for _ in range(500):
        v = rng.uniform([-0.5, -0.5, -0.2], [0.2, 0.2, 0.5])
        centre = liver.centre + liver.rotation @ (liver.axes * v)
        shell = centre + surface * (radius + 6.0)  # 6 mm of liver all round
        if np.all(liver.level(shell) < 1.0) and not any(o.contains(shell).any() for o in others):
            return Sphere(centre, radius)
        radius = max(10.0, radius * 0.98)
    raise RuntimeError("could not place the liver tumour")  # pragma: no cover - geometry guarantees room


# -- acquisition grid ------------------------------------------------------------


def phantom_geometry(orientation: str = "axial", slices: int = 64, size: int = 128) -> Geometry:
    """Acquisition grid covering :data:`ABDOMEN_BOX`.

    Parameters
    ----------
    orientation : str
        ``axial`` (rows along +x, columns along +y), ``coronal`` (+x, -z;
        slices along +y), ``sagittal`` (+y, -z; slices along -x, the plane
        normal), or ``oblique`` (axial tilted by :data:`OBLIQUE_ANGLES_DEG`).
    slices, size : int
        Number of slices and pixels per row/column (square images).

    Returns
    -------
    Geometry
        Right-handed grid (slice direction = plane normal) with square
        pixels over a square in-plane field of view of at least 400 mm and
        slice spacing = covered extent / ``slices``.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if slices < 1 or size < 2:
        raise ValueError("need slices >= 1 and size >= 2")
    if orientation == "axial":
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    elif orientation == "coronal":
        row, col = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    elif orientation == "sagittal":
        row, col = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    else:
        rot = _rotation((OBLIQUE_ANGLES_DEG[0], OBLIQUE_ANGLES_DEG[1], 0.0))
        row, col = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    normal = np.cross(row, col)
    lo, hi = ABDOMEN_BOX
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    centre = (lo + hi) / 2.0
    extent = {name: float(np.ptp(corners @ v)) for name, v in (("row", row), ("col", col), ("normal", normal))}
    fov = max(MIN_FOV_MM, math.ceil(max(extent["row"], extent["col"]) / 10.0) * 10.0)
    pixel = fov / size
    ds = extent["normal"] / slices
    origin = centre - row * pixel * (size - 1) / 2 - col * pixel * (size - 1) / 2 - normal * ds * (slices - 1) / 2
    return Geometry((slices, size, size), origin, row, col, normal, (ds, pixel, pixel))


# -- phantom ----------------------------------------------------------------------


@dataclass
class Phantom:
    """A synthetic patient: images, exact labels and the analytic model behind them.

    Attributes
    ----------
    images : dict
        Modality (``CT``, ``MR``, ``PT``) -> ``(array float32, Geometry)``;
        CT in HU, MR in arbitrary signal units, PT in Bq/ml.  All share
        ``geometry`` (and, when written, one frame of reference).
    labels : numpy.ndarray
        uint8 ground truth (values of ``label_names``) on ``geometry``.
    geometry : Geometry
        The acquisition grid.
    label_names : dict
        Label value -> name (:data:`PHANTOM_LABELS`).
    seed : int
        Seed that generated the patient.
    modality : str
        ``CT``, ``MR`` or ``PT+CT``.
    orientation : str
        Grid orientation it was sampled on.
    anatomy : Anatomy
        The analytic model (``anatomy.organs[name].contains(points)``).
    """

    images: dict[str, tuple[np.ndarray, Geometry]]
    labels: np.ndarray
    geometry: Geometry
    label_names: dict[int, str]
    seed: int
    modality: str = "CT"
    orientation: str = "axial"
    anatomy: Anatomy | None = field(default=None, repr=False)

    def volumes_ml(self) -> dict[str, float]:
        """Labelled volume per structure name (mL), from the label map."""
        counts = np.bincount(self.labels.ravel(), minlength=max(self.label_names) + 1)
        return {name: float(counts[v]) * self.geometry.voxel_volume_ml for v, name in self.label_names.items()}

    @property
    def uid_key(self) -> str:
        """String from which all DICOM UIDs of this phantom are derived."""
        s, r, c = self.geometry.shape
        return f"medsegagent-phantom|{self.modality}|{self.seed}|{self.orientation}|{s}x{r}x{c}"


def _slab_points(geometry: Geometry, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 LPS voxel centres of slices ``k0..k1-1`` and the LPS -> slab index matrix.

    Returns
    -------
    points : numpy.ndarray
        ``(k1-k0, rows, cols, 3)``.
    grid : numpy.ndarray
        4x4 matrix mapping LPS to ``(column, row, slice - k0)``.
    """
    _, rows, cols = geometry.shape
    ds, dr, dc = geometry.spacing
    f32 = np.float32
    start = (geometry.origin + geometry.slice_direction * ds * k0).astype(f32)
    col_step = (geometry.row_direction * dc).astype(f32)
    row_step = (geometry.column_direction * dr).astype(f32)
    slice_step = (geometry.slice_direction * ds).astype(f32)
    pts = np.empty((k1 - k0, rows, cols, 3), f32)
    pts[...] = start
    pts += np.arange(k1 - k0, dtype=f32)[:, None, None, None] * slice_step
    pts += np.arange(rows, dtype=f32)[None, :, None, None] * row_step
    pts += np.arange(cols, dtype=f32)[None, None, :, None] * col_step
    shift = np.eye(4)
    shift[2, 3] = -k0
    return pts, shift @ np.linalg.inv(geometry.affine)


def make_phantom(
    modality: str, seed: int = 0, slices: int = 64, size: int = 128, orientation: str = "axial"
) -> Phantom:
    """Synthesise a phantom patient.

    Parameters
    ----------
    modality : str
        ``CT``, ``MR`` (T1-weighted fat-saturated 3-D GRE) or ``PT+CT``
        (FDG PET and CT on the same grid).
    seed : int
        Patient seed (anatomy and noise); the result is deterministic.
    slices, size : int
        Grid size: ``slices`` images of ``size x size`` pixels.
    orientation : str
        ``axial``, ``sagittal``, ``coronal`` or ``oblique``.

    Returns
    -------
    Phantom
        Images, labels and geometry.

    Notes
    -----
    The grid is evaluated in slabs so memory stays at a few float32 copies of
    the volume (512 x 512 x 300 works in ~1-2 GB).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    geometry = phantom_geometry(orientation, slices, size)
    anatomy = make_anatomy(seed)
    wanted = ("PT", "CT") if modality == "PT+CT" else (modality,)
    labels, images = _sample_anatomy(anatomy, geometry, wanted)
    spacing = np.asarray(geometry.spacing)
    out: dict[str, tuple[np.ndarray, Geometry]] = {}
    for i, m in enumerate(wanted):
        img = images.pop(m)
        rng = np.random.default_rng([seed, 7919, _VALUE_COLUMN[m], i])
        _SCANNERS[m](img, spacing, rng)
        out[m] = (img, geometry)
    return Phantom(out, labels, geometry, dict(PHANTOM_LABELS), seed, modality, orientation, anatomy)


#: Column of :data:`_TISSUE_VALUES` (and of the viscera rows) that holds each modality's values.
_VALUE_COLUMN = {"CT": 0, "MR": 1, "PT": 2}


def _sample_anatomy(
    anatomy: Anatomy, geometry: Geometry, modalities: tuple[str, ...]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The label map and each modality's noise-free image (float32) at the voxel centres of ``geometry``.

    The grid is evaluated in slabs of about 2 M points, so memory stays at a
    few float32 copies of the volume.
    """
    luts: dict[str, np.ndarray] = {}
    for m in modalities:
        lut = np.zeros(256, np.float32)
        for cls, vals in _TISSUE_VALUES.items():
            lut[cls] = vals[_VALUE_COLUMN[m]]
        luts[m] = lut
    slices, size, _ = geometry.shape
    labels = np.zeros(geometry.shape, np.uint8)
    images = {m: np.empty(geometry.shape, np.float32) for m in modalities}
    slab = max(1, 2_000_000 // (size * size))  # ~2 M points per slab
    for k0 in range(0, slices, slab):
        k1 = min(slices, k0 + slab)
        pts, grid = _slab_points(geometry, k0, k1)
        lab, tissue, mix = anatomy.evaluate(pts, grid)
        labels[k0:k1] = lab
        vis = tissue == VISCERA
        for m in modalities:
            img = luts[m][tissue]
            c = _VALUE_COLUMN[m]
            img[vis] = _VISCERA_FATTY[c] + (_VISCERA_BOWEL[c] - _VISCERA_FATTY[c]) * mix[vis]
            if m == "MR":  # receive-coil shading: smooth +-20 % multiplicative field
                img *= 0.8 + 0.4 * _wave_field(pts, anatomy.bias_waves, sharpness=1.0)
            images[m][k0:k1] = img
        del pts, lab, tissue, mix
    return labels, images


def _ct_scanner(img: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """Partial volume (~0.8 mm blur) and quantum noise (sigma 15 HU), in place."""
    gaussian_filter(img, np.maximum(0.8 / spacing, 0.5), output=img)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(15.0)


def _mr_scanner(img: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """~1 mm blur and Rician magnitude noise (sigma 15), in place."""
    gaussian_filter(img, np.maximum(1.0 / spacing, 0.5), output=img)
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(15.0)
    img += n1
    del n1
    np.square(img, out=img)
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(15.0)
    np.square(n2, out=n2)
    img += n2
    del n2
    np.sqrt(img, out=img)


def _pet_scanner(img: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """SUV -> Bq/ml, 6 mm FWHM resolution and correlated count noise ~ sqrt(mean), in place."""
    img *= np.float32(SUV_BQML)
    gaussian_filter(img, 6.0 / 2.355 / spacing, output=img)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    gaussian_filter(noise, np.maximum(2.0 / spacing, 0.5), output=noise)
    noise /= max(float(noise.std()), 1e-6)
    noise *= np.sqrt(np.maximum(img, 0.0) * np.float32(0.02 * SUV_BQML))  # ~10 % at SUV 2
    img += noise
    del noise
    np.maximum(img, 0.0, out=img)


#: What each scanner does to the noise-free image (in place).
_SCANNERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], None]] = {
    "CT": _ct_scanner,
    "MR": _mr_scanner,
    "PT": _pet_scanner,
}


def write_phantom(
    phantom: Phantom, out_dir: str | Path, *, reverse_order: bool = False, multiframe: bool = False
) -> PhantomFiles:
    """Write ``phantom`` as DICOM + truth; see :func:`medsegagent.dicom.image_writer.write_phantom`.

    The writer is imported lazily so this module stays pure numpy.
    """
    from .image_writer import write_phantom as _write

    return _write(phantom, out_dir, reverse_order=reverse_order, multiframe=multiframe)
