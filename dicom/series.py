"""Read DICOM image series into :class:`~medsegagent.dicom.volume.Volume` objects.

A folder (or a list of files) is scanned once; instances are grouped by
Series Instance UID; every image series is checked for a consistent,
regular geometry and stacked in spatial order, whatever order the files or
Instance Numbers are in.  Single-frame images and multi-frame (Enhanced /
Legacy Converted Enhanced) images are both supported.

Anything that cannot be turned into a trustworthy voxel grid is refused with
a :class:`SeriesError` that says what is wrong: a missing slice, a gantry
tilt, mixed orientations or sizes, no pixel data.  Guessing there would put
a segmentation on the wrong voxels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_deferred_data_element
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options

from medsegagent.dicom.instance_checks import MAX_SPACING_MM, MIN_SPACING_MM, pydicom_term
from medsegagent.dicom.volume import Geometry, Volume

log = logging.getLogger(__name__)

#: Relative tolerance on slice spacing before a gap counts as a missing slice.
SPACING_TOLERANCE = 0.1
#: Tolerance (cosine) for "parallel" / "perpendicular" direction checks.
ANGLE_TOLERANCE = 1e-3
#: Elements larger than this stay on disk when a header is parsed (the pixel data above all).
DEFER_SIZE = "4 KB"
#: Threads decoding compressed frames.
READ_WORKERS = min(4, os.cpu_count() or 1)
#: Voxel spacing (mm) outside this range is a header error, not an image (the intake's limits on Pixel Spacing).
SPACING_RANGE_MM = (MIN_SPACING_MM, MAX_SPACING_MM)
#: Largest plausible extent (mm) of a grid along any axis: nothing scanned is longer than 5 m.
MAX_EXTENT_MM = 5000.0


class SeriesProblem(StrEnum):
    """What kind of problem a :class:`SeriesError` reports (a job's failure reason names it)."""

    #: The study has no series with pixel data and geometry.
    NO_IMAGE_SERIES = "no_image_series"
    #: Instances of one series disagree: orientation, size, spacing, missing or duplicate slices, tilt.
    INCONSISTENT_SERIES = "inconsistent_series"
    #: Instances of one series name different Frames of Reference.
    INCONSISTENT_FRAME_OF_REFERENCE = "inconsistent_frame_of_reference"
    #: A position, orientation or spacing that is NaN or infinite.
    NON_FINITE_GEOMETRY = "non_finite_geometry"
    #: Spacing or extent no scanner produces (zero, negative, 1e300 mm, beyond 5 m).
    IMPLAUSIBLE_GEOMETRY = "implausible_geometry"
    #: Pixel data that cannot be decoded as described (e.g. Bits Stored above Bits Allocated).
    UNREADABLE_PIXELS = "unreadable_pixels"
    #: A Specific Character Set pydicom does not know: text in the header cannot be decoded.
    UNKNOWN_CHARACTER_SET = "unknown_character_set"


class SeriesError(ValueError):
    """A folder or series that cannot be read as a voxel grid.

    Parameters
    ----------
    message : str
        What is wrong, for the person who sent the study.
    problem : SeriesProblem
        Its kind (default :attr:`SeriesProblem.INCONSISTENT_SERIES`).
    """

    def __init__(self, message: str, problem: SeriesProblem = SeriesProblem.INCONSISTENT_SERIES) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass
class SeriesInfo:
    """Header facts of one series, read without pixel data."""

    series_instance_uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)
    sop_class_uids: set[str] = field(default_factory=set)
    study_instance_uid: str = ""
    is_image: bool = True
    number_of_frames: int = 0
    #: Series Number (IS) of the series, ``None`` when absent or not a number.
    series_number: int | None = None
    #: Headers :func:`scan_folder` parsed (pixel data left on disk), reused by :func:`read_series`.
    headers: dict[Path, Dataset] = field(default_factory=dict, repr=False, compare=False)
    #: The routing attributes (Modality, SeriesDescription ...) when known without a parse (the node's manifest).
    routing: dict[str, object] | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """Short human name: ``CT 'CT ABDOMEN' (64 images)``."""
        return f"{self.modality} '{self.description}' ({self.number_of_frames} images)"


#: SOP classes that hold pixel data but are not volumes we segment.
_NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
}


def holds_volume(sop_class_uid: str, has_pixels: bool, has_geometry: bool) -> bool:
    """Whether an instance can be part of an image volume: pixel data, plane geometry, not a SEG or SC."""
    return has_pixels and has_geometry and sop_class_uid not in _NON_VOLUME_SOP_CLASSES


def scan_folder(paths: Path | Iterable[Path]) -> dict[str, SeriesInfo]:
    """Group the DICOM files under ``paths`` by series, reading headers only.

    Parameters
    ----------
    paths : Path or iterable of Path
        A folder (searched recursively) or explicit files.

    Returns
    -------
    dict
        Series Instance UID -> :class:`SeriesInfo`.  Non-DICOM files are
        skipped with a debug log line.

    Raises
    ------
    SeriesError
        When the folder does not exist or holds no DICOM file at all.
    """
    if isinstance(paths, Path):
        if not paths.exists():
            raise SeriesError(f"{paths} does not exist")
        files = sorted(p for p in paths.rglob("*") if p.is_file()) if paths.is_dir() else [paths]
    else:
        files = sorted(Path(p) for p in paths)
    series: dict[str, SeriesInfo] = {}
    for path in files:
        try:
            # defer_size keeps pixel data on disk while still telling us it exists.
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            log.debug("skipping %s: not DICOM (%s)", path, exc)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            log.debug("skipping %s: no SeriesInstanceUID", path)
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        info = series.setdefault(
            uid,
            SeriesInfo(
                series_instance_uid=uid,
                modality=str(ds.get("Modality", "")),
                description=str(ds.get("SeriesDescription", "")),
                study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                series_number=_series_number(ds),
            ),
        )
        info.files.append(path)
        info.headers[path] = ds
        info.sop_class_uids.add(sop_class)
        has_pixels = "PixelData" in ds or "FloatPixelData" in ds
        has_geometry = "ImageOrientationPatient" in ds or "SharedFunctionalGroupsSequence" in ds
        if not holds_volume(sop_class, has_pixels, has_geometry):
            info.is_image = False
        info.number_of_frames += int(ds.get("NumberOfFrames", 1) or 1)
    if not series:
        where = paths if isinstance(paths, Path) else "the given files"
        raise SeriesError(f"no DICOM instances found in {where}")
    return series


def _series_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):  # an IS that is not a number: as if absent
        return None


def free_series_numbers(series: dict[str, SeriesInfo], count: int) -> list[int]:
    """``count`` Series Numbers for a study's new result series: the next ones above the study's highest.

    A study that comes back with earlier results (a re-sent study, a second
    request) has their numbers among its series, so every result series
    gets a number of its own.
    """
    # Numbers near the IS limit (2^31 - 1) are a header's mistake, not a series to stay above.
    usable = [s.series_number for s in series.values() if s.series_number is not None and s.series_number < 2**30]
    start = max([0, *usable]) + 1
    return list(range(start, start + count))


def image_series(series: dict[str, SeriesInfo]) -> list[SeriesInfo]:
    """The series of ``series`` that are image volumes, largest first."""
    return sorted((s for s in series.values() if s.is_image), key=lambda s: -s.number_of_frames)


def read_series(info: SeriesInfo | list[Path]) -> Volume:
    """Read one image series into a :class:`Volume` in spatial order.

    Parameters
    ----------
    info : SeriesInfo or list of Path
        The series (from :func:`scan_folder`) or its files.

    Returns
    -------
    Volume
        Real-world values (rescale applied) as float32, stacked along the
        slice normal; ``source_instances`` lists the referenced instance
        (and frame) of each slice.

    Raises
    ------
    SeriesError
        Mixed series, inconsistent orientation/size/spacing, gantry tilt,
        missing slices, or no pixel data.
    """
    files = info.files if isinstance(info, SeriesInfo) else list(info)
    known = info.headers if isinstance(info, SeriesInfo) else {}
    # One header parse per file: the scan's, or here with the pixel data left on disk.
    datasets = [known.get(p) or pydicom.dcmread(p, defer_size=DEFER_SIZE) for p in files]
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) != 1:
        raise SeriesError(f"files belong to {len(uids)} series; read one series at a time")
    _check_character_sets(datasets)
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        volume = _read_multiframe(datasets[0])
    else:
        volume = _read_single_frames(datasets)
    volume.source_headers = tuple(datasets)
    return volume


# -- single-frame series ------------------------------------------------------
def _read_single_frames(datasets: list[Dataset]) -> Volume:
    first = datasets[0]
    for ds in datasets:
        if "PixelData" not in ds:
            raise SeriesError(
                f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data", SeriesProblem.UNREADABLE_PIXELS
            )
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SeriesError("series mixes multi-frame and single-frame instances")
        for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if key not in ds:
                raise SeriesError(f"instance {ds.get('SOPInstanceUID', '?')} lacks {key}: no geometry")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > ANGLE_TOLERANCE:
        raise SeriesError("slices of the series have different orientations")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise SeriesError(f"slices of the series have different sizes: {sorted(shapes)}")
    spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in datasets}
    if len(spacings) != 1:
        raise SeriesError("slices of the series have different pixel spacings")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets}
    if len(frames_of_reference) > 1:
        raise SeriesError(
            f"the instances of the series name {len(frames_of_reference)} different Frames of Reference; "
            "their positions cannot be put on one grid",
            SeriesProblem.INCONSISTENT_FRAME_OF_REFERENCE,
        )
    frames = _decode_frames(datasets)
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID), None) for ds in datasets]
    return _stack(first, orientations[0], [float(v) for v in first.PixelSpacing], positions, frames, refs)


def _pixels(ds: Dataset) -> np.ndarray:
    """The decoded pixel data, or a :class:`SeriesError` saying why it cannot be decoded.

    Decoded from the element's bytes rather than ``ds.pixel_array``, which
    would load the bytes into the header and cache the array there: the
    header is shared with the scan and kept for the SEG, and stays small.
    """
    try:
        element = ds.get_item("PixelData", keep_deferred=True)
        if element.value is None:  # left on disk by the parse: read it now, not into the header
            element = read_deferred_data_element(ds.fileobj_type, ds.filename, ds.timestamp, element)
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
        pixels, _ = decoder.as_array(element.value, pixel_keyword="PixelData", **as_pixel_options(ds))
        return pixels
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError, OSError) as exc:
        # pydicom raises all of these for a pixel description that contradicts itself or lacks a decoder
        # (OSError: a file that went away or changed after the scan).
        raise SeriesError(
            f"the pixel data of instance {ds.get('SOPInstanceUID', '?')} cannot be decoded: {exc}",
            SeriesProblem.UNREADABLE_PIXELS,
        ) from exc


def _check_character_sets(datasets: list[Dataset]) -> None:
    """Refuse a Specific Character Set pydicom cannot decode (it would only warn and guess)."""
    for ds in datasets:
        values = ds.get("SpecificCharacterSet", "") or ""
        for value in [values] if isinstance(values, str) else values:
            # As the intake: pydicom mends a misspelt term ("ISO IR 100"); one it cannot mend is refused.
            if value and pydicom_term(str(value).strip()) not in python_encoding:
                raise SeriesError(
                    f"instance {ds.get('SOPInstanceUID', '?')} declares the unknown Specific Character Set "
                    f"{str(value)!r}: its names and descriptions cannot be decoded",
                    SeriesProblem.UNKNOWN_CHARACTER_SET,
                )


def _check_geometry(orientation: np.ndarray, pixel_spacing: list[float], positions: np.ndarray) -> None:
    """Refuse a header geometry no scanner writes: NaN or infinite values, absurd spacing."""
    if not (np.isfinite(orientation).all() and np.isfinite(pixel_spacing).all() and np.isfinite(positions).all()):
        raise SeriesError(
            "Image Position, Image Orientation or Pixel Spacing holds a non-finite value (NaN or infinity)",
            SeriesProblem.NON_FINITE_GEOMETRY,
        )
    if np.linalg.norm(orientation[:3]) < ANGLE_TOLERANCE or np.linalg.norm(orientation[3:]) < ANGLE_TOLERANCE:
        raise SeriesError("Image Orientation (Patient) has a zero direction vector", SeriesProblem.NON_FINITE_GEOMETRY)
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in pixel_spacing):
        raise SeriesError(
            f"Pixel Spacing {[float(s) for s in pixel_spacing]} mm is outside {low:g}-{high:g} mm",
            SeriesProblem.IMPLAUSIBLE_GEOMETRY,
        )


def _decode_frames(datasets: list[Dataset]) -> np.ndarray:
    """Every instance's frame in real-world values, ``(instances, rows, columns)`` float32, in file order.

    Compressed frames are decoded by a thread pool (the codecs work outside
    the GIL); native ones are a copy each, where threads only add contention.
    """
    first = datasets[0]
    out = np.empty((len(datasets), int(first.Rows), int(first.Columns)), np.float32)

    def decode(index: int) -> None:
        _frame_values(datasets[index], _pixels(datasets[index]), out=out[index])

    compressed = first.file_meta.TransferSyntaxUID.is_compressed if "TransferSyntaxUID" in first.file_meta else False
    if compressed and len(datasets) > 1:
        with ThreadPoolExecutor(READ_WORKERS) as pool:
            list(pool.map(decode, range(len(datasets))))
    else:
        for index in range(len(datasets)):
            decode(index)
    return out


def _frame_values(
    ds: Dataset,
    pixels: np.ndarray,
    slope: float | None = None,
    intercept: float | None = None,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1.0)) if slope is None else slope
    intercept = float(ds.get("RescaleIntercept", 0.0)) if intercept is None else intercept
    if pixels.ndim != 2:
        raise SeriesError(f"expected a greyscale frame, got pixel array of shape {pixels.shape}")
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    elif out.shape != pixels.shape:
        raise SeriesError(f"slices of the series have different sizes: {out.shape} and {pixels.shape}")
    # In place: no float64 or second float32 temporary per slice.
    np.multiply(pixels, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)
    return out


# -- multi-frame (enhanced) --------------------------------------------------
def _read_multiframe(ds: Dataset) -> Volume:
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise SeriesError("multi-frame instance without per-frame functional groups: no per-frame geometry")
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    per_frame = ds.PerFrameFunctionalGroupsSequence

    def group(frame: Dataset, name: str) -> Dataset | None:
        for source in (frame, shared):
            if name in source and len(source[name].value):
                return source[name].value[0]
        return None

    orientations, positions, spacings, rescales = [], [], [], []
    for i, frame in enumerate(per_frame):
        orient = group(frame, "PlaneOrientationSequence")
        pos = group(frame, "PlanePositionSequence")
        meas = group(frame, "PixelMeasuresSequence")
        if orient is None or pos is None or meas is None:
            raise SeriesError(f"frame {i + 1} lacks plane orientation, position or pixel measures")
        orientations.append([float(v) for v in orient.ImageOrientationPatient])
        positions.append([float(v) for v in pos.ImagePositionPatient])
        spacings.append(tuple(round(float(v), 4) for v in meas.PixelSpacing))
        trans = group(frame, "PixelValueTransformationSequence")
        rescales.append(
            (float(trans.get("RescaleSlope", 1.0)), float(trans.get("RescaleIntercept", 0.0)))
            if trans is not None
            else (float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0)))
        )
    orientations_arr = np.array(orientations)
    if np.abs(orientations_arr - orientations_arr[0]).max() > ANGLE_TOLERANCE:
        raise SeriesError("frames of the multi-frame image have different orientations")
    if len(set(spacings)) != 1:
        raise SeriesError("frames of the multi-frame image have different pixel spacings")
    pixels = _pixels(ds)
    if pixels.ndim != 3:
        raise SeriesError(f"expected greyscale frames, got pixel array of shape {pixels.shape}")
    frames = np.empty(pixels.shape, np.float32)
    for i in range(pixels.shape[0]):
        _frame_values(ds, pixels[i], *rescales[i], out=frames[i])
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID), i + 1) for i in range(pixels.shape[0])]
    return _stack(ds, orientations_arr[0], list(spacings[0]), np.array(positions), frames, refs)


# -- common stacking -----------------------------------------------------------
def _stack(
    header: Dataset,
    orientation: np.ndarray,
    pixel_spacing: list[float],
    positions: np.ndarray,
    frames: np.ndarray,
    refs: list[tuple[str, str, int | None]],
) -> Volume:
    _check_geometry(orientation, pixel_spacing, positions)
    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    distances = distances[order]
    positions = positions[order]
    if len(frames) == 1:
        thickness = float(header.get("SliceThickness", 0) or 0) or 1.0
        slice_dir, spacing = normal, thickness
    else:
        gaps = np.diff(distances)
        if np.any(gaps < 1e-3):
            raise SeriesError("two slices share one position (duplicate or mixed acquisitions in one series)")
        spacing = float(np.median(gaps))
        if np.any(np.abs(gaps - spacing) > SPACING_TOLERANCE * spacing):
            worst = int(np.argmax(np.abs(gaps - spacing)))
            raise SeriesError(
                f"irregular slice spacing: gap of {gaps[worst]:.2f} mm after slice {worst + 1} where "
                f"{spacing:.2f} mm is usual; a slice is probably missing"
            )
        step = (positions[-1] - positions[0]) / (len(frames) - 1)
        slice_dir = step / np.linalg.norm(step)
        tilt = float(np.degrees(np.arccos(np.clip(abs(slice_dir @ normal), -1.0, 1.0))))
        if tilt > 0.5:
            raise SeriesError(
                f"slices are not stacked along their normal (gantry tilt or shear of {tilt:.1f} degrees); "
                "resample the series to an orthogonal grid before segmenting"
            )
        # Store the normal itself so tiny rounding in positions does not skew the grid.
        slice_dir = normal
    # Files usually come in spatial order already: then the decoded array is the volume, no copy.
    array = frames if np.array_equal(order, np.arange(len(order))) else frames[order]
    _check_extent(array.shape, (spacing, float(pixel_spacing[0]), float(pixel_spacing[1])))
    geometry = Geometry(
        shape=array.shape,
        origin=positions[0],
        row_direction=row_dir,
        column_direction=col_dir,
        slice_direction=slice_dir,
        spacing=(spacing, float(pixel_spacing[0]), float(pixel_spacing[1])),
    )
    return Volume(
        array=array,
        geometry=geometry,
        modality=str(header.get("Modality", "")),
        series_instance_uid=str(header.SeriesInstanceUID),
        source_instances=[refs[i] for i in order],
        meta=_series_meta(header),
    )


def _check_extent(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> None:
    """Refuse a slice spacing out of range or a grid longer than :data:`MAX_EXTENT_MM` on any axis."""
    low, high = SPACING_RANGE_MM
    if not low <= spacing[0] <= high:
        raise SeriesError(f"slice spacing {spacing[0]:g} mm is outside {low:g}-{high:g} mm",
                          SeriesProblem.IMPLAUSIBLE_GEOMETRY)  # fmt: skip
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    if max(extent) > MAX_EXTENT_MM:
        shown = " x ".join(f"{e:.0f}" for e in extent)
        raise SeriesError(f"the series spans {shown} mm, beyond the {MAX_EXTENT_MM / 1000:g} m anything scanned spans",
                          SeriesProblem.IMPLAUSIBLE_GEOMETRY)  # fmt: skip


def _series_meta(ds: Dataset) -> dict:
    """Header facts the router, writers and reports use."""
    keys = (
        "StudyInstanceUID",
        "SeriesDescription",
        "StudyDescription",
        "PatientID",
        "PatientName",
        "AccessionNumber",
        "SeriesNumber",
        "FrameOfReferenceUID",
        "BodyPartExamined",
        "RequestedProcedureDescription",
        "ScanningSequence",
        "SequenceName",
        "ContrastBolusAgent",
        "Manufacturer",
        "StudyDate",
    )
    meta = {k: str(ds.get(k, "")) for k in keys}
    meta["ImageType"] = [str(v) for v in ds.get("ImageType", [])]
    return meta


def group_problem(series: dict[str, SeriesInfo]) -> str | None:
    """Explain why a folder has no readable image series, or ``None``."""
    if image_series(series):
        return None
    kinds = ", ".join(sorted({s.modality or "?" for s in series.values()}))
    return f"no image series among the {len(series)} series found (modalities: {kinds})"


def choose_series(series: dict[str, SeriesInfo], modality: str | None = None) -> SeriesInfo:
    """Pick the image series to segment.

    Parameters
    ----------
    series : dict
        Output of :func:`scan_folder`.
    modality : str, optional
        Wanted DICOM modality (``CT``, ``MR``, ``PT``); when omitted the
        largest image series wins.

    Raises
    ------
    SeriesError
        When no image series (of that modality) exists.
    """
    problem = group_problem(series)
    if problem:
        raise SeriesError(problem, SeriesProblem.NO_IMAGE_SERIES)
    candidates = [s for s in image_series(series) if modality is None or s.modality == modality]
    if not candidates:
        have = ", ".join(s.label for s in image_series(series))
        raise SeriesError(f"no {modality} image series in the folder (found: {have})")
    return candidates[0]
