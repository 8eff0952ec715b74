"""Write DICOM Segmentation objects with highdicom.

The writer takes masks on the source grid (the :class:`Volume` returned by
:mod:`medsegagent.dicom.series`, i.e. slices in spatial order) and maps them
back onto the source instances' own frame order, so a SEG frame always
references the image it was computed on.

SOP Instance and Series UIDs are derived from a stable key (job, source
series, output kind): writing the same result twice yields the same UIDs, so
a re-send to a PACS replaces rather than duplicates.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from medsegagent import __version__
from medsegagent.dicom.volume import Volume

#: Manufacturer written into every object the node creates.
MANUFACTURER = "MedSegAgent"
MODEL_NAME = "MedSegAgent node"

#: DICOM LO value limit: Series Description and Content Description are LO (64).
_LO_MAX = 64


class SegType(enum.Enum):
    """Segmentation encodings the writer supports."""

    BINARY = "BINARY"
    LABELMAP = "LABELMAP"
    FRACTIONAL = "FRACTIONAL"


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment is, independent of how it was computed.

    Parameters
    ----------
    label : str
        Segment Label (human name, e.g. ``liver``).
    category, type : highdicom.sr.CodedConcept
        Segmented Property Category and Type (SNOMED CT).
    type_modifier : highdicom.sr.CodedConcept, optional
        Laterality modifier when ``type`` is not lateral itself.
    color : tuple of int, optional
        Recommended display colour, sRGB 0-255.
    """

    label: str
    category: hd.sr.CodedConcept
    type: hd.sr.CodedConcept
    type_modifier: hd.sr.CodedConcept | None = None
    color: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class AlgorithmInfo:
    """Provenance written into every segment (Algorithm Identification)."""

    name: str = "MedSegAgent rank-aware ensemble"
    version: str = __version__
    parameters: dict[str, str] = field(default_factory=dict)


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts`` (idempotent re-sends)."""
    return generate_uid(entropy_srcs=["medsegagent", *parts])


def _truncate(text: str, limit: int = _LO_MAX) -> str:
    text = " ".join(text.split()).replace("\\", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_source_datasets(volume: Volume, files: Sequence[Path]) -> list[Dataset]:
    """Headers of the source instances of ``volume`` (pixel data left on disk).

    Parameters
    ----------
    volume : Volume
        The volume the masks are on.
    files : sequence of Path
        The files of its series, any order.

    Returns
    -------
    list of Dataset
        In the order of ``volume.source_instances`` for single-frame sources,
        or the one multi-frame dataset.
    """
    by_uid = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_uid[str(ds.SOPInstanceUID)] = ds
    wanted = list(dict.fromkeys(uid for _, uid, _ in volume.source_instances))
    missing = [uid for uid in wanted if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instances of the volume are not among the files")
    return [by_uid[uid] for uid in wanted]


def write_segmentation(
    volume: Volume,
    source_datasets: Sequence[Dataset],
    masks: np.ndarray,
    segments: Sequence[SegmentSpec],
    out_path: Path,
    *,
    uid_key: str,
    request_text: str = "",
    request_source: str = "",
    algorithm: AlgorithmInfo | None = None,
    seg_type: SegType = SegType.BINARY,
    series_number: int = 9901,
) -> Dataset:
    """Encode ``masks`` as a DICOM SEG referencing the source series.

    Parameters
    ----------
    volume : Volume
        Source volume; masks are on its grid, slices in its order.
    source_datasets : sequence of Dataset
        Source instance headers from :func:`load_source_datasets`.
    masks : numpy.ndarray
        ``(segments, slices, rows, columns)`` bool array, or a label map
        ``(slices, rows, columns)`` with values ``1..len(segments)``.
    segments : sequence of SegmentSpec
        One per segment, in segment-number order.  Segments whose mask is
        empty are still described (viewers then show them as empty).
    out_path : Path
        Where to write; the file is written to a temporary name and renamed.
    uid_key : str
        Stable key (e.g. ``job-id/source-series``) from which the SEG's
        Series and SOP Instance UIDs are derived.
    request_text, request_source : str
        The instruction and where it came from (Series / Content
        Description, truncated to the VR limit).
    algorithm : AlgorithmInfo, optional
        Provenance; defaults to the ensemble's name and version.
    seg_type : SegType
        ``BINARY`` (widest viewer support, default), ``LABELMAP`` (RLE
        compressed) or ``FRACTIONAL``.
    series_number : int
        Series Number of the SEG series.

    Returns
    -------
    pydicom.dataset.Dataset
        The written SEG.
    """
    if not segments:
        raise ValueError("a SEG needs at least one segment")
    stack = _as_stack(masks, len(segments), volume.geometry.shape)
    frames, sources = _to_source_frame_order(volume, source_datasets, stack)
    algorithm = algorithm or AlgorithmInfo()
    algo_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters=algorithm.parameters or None,
    )
    descriptions = [_description(number, spec, algo_id, uid_key) for number, spec in enumerate(segments, start=1)]
    description = _truncate(f"SEG {request_text}" if request_text else "MedSegAgent SEG")
    content = _truncate(f"{request_source}: {request_text}" if request_source else request_text or "segmentation")
    kwargs: dict = {}
    if seg_type is SegType.LABELMAP:
        # RLE keeps a label map small and stays readable by dcmqi (JPEG-LS does not).
        kwargs["transfer_syntax_uid"] = RLELossless
        pixel = np.zeros(frames.shape[1:], dtype=np.uint8)
        for index in range(frames.shape[0]):
            pixel[frames[index]] = index + 1
        pixel_array = pixel
    else:
        kwargs["transfer_syntax_uid"] = ExplicitVRLittleEndian
        pixel_array = np.moveaxis(frames, 0, -1).astype(np.uint8)
    if seg_type is SegType.FRACTIONAL:
        pixel_array = pixel_array.astype(np.float32)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=seg_type.value,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(uid_key, "seg-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(uid_key, "seg-instance", seg_type.value),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number="0",
        content_description=content,
        content_label="SEGMENTATION",
        series_description=description,
        omit_empty_frames=True,
        **kwargs,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    seg.save_as(tmp, enforce_file_format=True)
    tmp.replace(out_path)
    return seg


def _as_stack(masks: np.ndarray, n_segments: int, shape: tuple[int, int, int]) -> np.ndarray:
    if masks.ndim == 3:
        if masks.shape != shape:
            raise ValueError(f"label map shape {masks.shape} does not match the volume {shape}")
        return np.stack([masks == number for number in range(1, n_segments + 1)])
    if masks.ndim != 4 or masks.shape[0] != n_segments or masks.shape[1:] != shape:
        raise ValueError(f"mask stack shape {masks.shape} does not match {n_segments} segments on {shape}")
    return masks.astype(bool)


def _to_source_frame_order(
    volume: Volume, source_datasets: Sequence[Dataset], stack: np.ndarray
) -> tuple[np.ndarray, list[Dataset]]:
    """Reorder ``(segments, slices, ...)`` so frames follow the sources' own order."""
    refs = volume.source_instances
    if refs and refs[0][2] is not None:
        # Multi-frame source: highdicom expects frames in the source's frame order.
        order = np.argsort([frame for _, _, frame in refs])
        return stack[:, order], list(source_datasets)
    # Single-frame: highdicom pairs frame i with source_images[i]; keep spatial order.
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    return stack, [by_uid[uid] for _, uid, _ in refs]


def _description(
    number: int, spec: SegmentSpec, algo_id: hd.AlgorithmIdentificationSequence, uid_key: str
) -> hd.seg.SegmentDescription:
    color = hd.color.CIELabColor(*_rgb_to_cielab(spec.color)) if spec.color else None
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_truncate(spec.label),
        segmented_property_category=spec.category,
        segmented_property_type=spec.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo_id,
        tracking_uid=derived_uid(uid_key, "segment", spec.label),
        tracking_id=_truncate(spec.label),
        display_color=color,
    )
    if spec.type_modifier is not None:
        type_item = desc.SegmentedPropertyTypeCodeSequence[0]
        modifier = Dataset()
        modifier.CodeValue = spec.type_modifier.value
        modifier.CodingSchemeDesignator = spec.type_modifier.scheme_designator
        modifier.CodeMeaning = spec.type_modifier.meaning
        type_item.SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return desc


def _rgb_to_cielab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (0-255) to CIELab (L 0-100, a/b -128..127) with a D65 white point."""
    c = np.asarray(rgb, dtype=float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127))
