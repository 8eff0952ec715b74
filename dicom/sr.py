"""TID 1500 Measurement Report: the volume of every segment of a SEG.

The report is a Comprehensive 3D SR written with highdicom.  It holds one
*Volumetric ROI Measurements* group (TID 1411) per segment of the SEG, each
referencing its segment (SEG SOP Instance + Segment Number, and the source
series), tracked by the segment's own Tracking UID, typed with the
segment's SNOMED CT property type, and carrying one measurement: *Volume*
(SCT 118565006) in millilitres (UCUM ``ml``).  Empty segments are reported
with a volume of 0 ml so that "looked, found nothing" is explicit.

The observer is the device that made the SEG (same Device UID), and the SR's
UIDs derive from the job key and the SEG's SOP Instance UID, so a re-send of
the same result replaces the earlier report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medsegagent import __version__
from medsegagent.dicom.seg import (
    LO_MAX,
    MANUFACTURER,
    MODEL_NAME,
    AlgorithmInfo,
    label_counts,
    save_atomically,
    segment_specs_by_number,
    truncate_text,
)
from medsegagent.dicom.uids import derived_uid

#: Label Map Segmentation Storage: not referenced by reports (see write_volume_report).
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
#: Unit of every volume in the report (UCUM).
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
#: Concept name of the measurement.
VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)

#: Procedure Reported (CID 100) by source modality.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion),
    "MR": hd.sr.CodedConcept.from_code(codes.LN.MRIUnspecifiedBodyRegion),
    "PT": hd.sr.CodedConcept.from_code(codes.LN.PETUnspecifiedBodyRegion),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept.from_code(codes.SCT.ImagingProcedure)

#: Source modality by the SOP Class of the referenced images.
_MODALITY_BY_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4": "MR",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128": "PT",  # PET Image Storage
    "1.2.840.10008.5.1.4.1.1.130": "PT",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.128.1": "PT",  # Legacy Converted Enhanced PET
}


def segment_volumes_ml(masks: np.ndarray, n_segments: int, voxel_ml: float) -> dict[int, float]:
    """Volume of every segment in ml, keyed by Segment Number.

    Parameters
    ----------
    masks : numpy.ndarray
        Label map ``(slices, rows, columns)`` with values ``0..n_segments``,
        or a binary stack ``(n_segments, slices, rows, columns)``.
    n_segments : int
        Number of segments (empty ones get 0.0).
    voxel_ml : float
        Volume of one voxel (``Geometry.voxel_volume_ml``).

    Returns
    -------
    dict
        Segment Number -> volume in ml.
    """
    if voxel_ml <= 0 or not math.isfinite(voxel_ml):
        raise ValueError(f"voxel volume must be positive, got {voxel_ml}")
    masks = np.asarray(masks)
    if masks.ndim == 3:
        counts = label_counts(masks)
        if counts[n_segments + 1 :].any():
            raise ValueError(f"label map holds values above {n_segments}")
        counts = np.pad(counts, (0, max(0, n_segments + 1 - counts.size)))[1 : n_segments + 1]
    elif masks.ndim == 4 and masks.shape[0] == n_segments:
        counts = np.array([np.count_nonzero(m) for m in masks])
    else:
        raise ValueError(f"masks of shape {masks.shape} are neither a label map nor a stack of {n_segments}")
    return {number: float(count) * voxel_ml for number, count in enumerate(counts, start=1)}


def _plain_code(item: Dataset) -> hd.sr.CodedConcept:
    """The code of a code sequence item, without nested modifier sequences."""
    return hd.sr.CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _source_modality(seg: Dataset) -> str | None:
    for series in seg.get("ReferencedSeriesSequence", []):
        for instance in series.get("ReferencedInstanceSequence", []):
            return _MODALITY_BY_SOP_CLASS.get(str(instance.ReferencedSOPClassUID))
    return None


def write_volume_report(
    seg_dataset: Dataset,
    volumes_ml: Mapping[int, float],
    out_path: Path,
    uid_key: str,
    *,
    algorithm: AlgorithmInfo | None = None,
    series_number: int = 9902,
    source_modality: str | None = None,
    request_text: str = "",
) -> hd.sr.Comprehensive3DSR:
    """Write a TID 1500 Measurement Report with the volume of each segment.

    Parameters
    ----------
    seg_dataset : pydicom.dataset.Dataset
        The SEG the report is about (as returned by
        :func:`~medsegagent.dicom.seg.write_segmentation` or read back).
    volumes_ml : mapping
        Segment Number -> volume in ml (:func:`segment_volumes_ml`); every
        segment of the SEG must have one.
    out_path : Path
        Where to write (atomic rename).
    uid_key : str
        Stable job key; with the SEG's SOP Instance UID it determines the
        SR's Series and SOP Instance UIDs.
    algorithm : AlgorithmInfo, optional
        Algorithm that produced the segments (default: the ensemble).
    series_number : int
        Series Number of the SR series.
    source_modality : str, optional
        ``CT``, ``MR`` or ``PT`` for Procedure Reported; derived from the
        SEG's referenced SOP Class when omitted.
    request_text : str
        The instruction, written into the SR's Series Description.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The written report.

    Raises
    ------
    ValueError
        When ``seg_dataset`` is not a SEG or is a LABELMAP SEG, when the
        volumes do not match its segments, or a volume is negative / not
        finite.
    """
    segments = _reported_segments(seg_dataset, volumes_ml)
    algorithm = algorithm or AlgorithmInfo()
    modality = source_modality or _source_modality(seg_dataset)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    groups = [
        _volume_group(seg_dataset, number, item, volumes_ml[number], uid_key, algorithm_id)
        for number, item in sorted(segments.items())
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_observer(seg_dataset, algorithm)),
        procedure_reported=_PROCEDURES.get(modality or "", _IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    key = f"{uid_key}|{seg_dataset.SOPInstanceUID}"
    description = truncate_text(f"Volumes {request_text}" if request_text else "MedSegAgent volumes", LO_MAX)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg_dataset],
        content=report,
        series_instance_uid=derived_uid(key, "sr-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(key, "sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        series_description=description,
        is_complete=True,
        is_final=False,  # automatic, unverified results: PRELIMINARY until a reader signs them
        is_verified=False,
    )
    save_atomically(sr, out_path)
    return sr


def _reported_segments(seg_dataset: Dataset, volumes_ml: Mapping[int, float]) -> Mapping[int, Dataset]:
    """The SEG's Segment Sequence items by number, once the SEG and the volumes are known to fit a report."""
    if seg_dataset.get("Modality") != "SEG" or "SegmentSequence" not in seg_dataset:
        raise ValueError("seg_dataset is not a DICOM Segmentation")
    if str(seg_dataset.SOPClassUID) == LABEL_MAP_SEGMENTATION:
        # dciodvfy (dicom3tools 2026) still allows Referenced Segment Number only for
        # Segmentation Storage, so a reference into a Label Map SEG fails validation.
        raise ValueError(
            "the report must reference a BINARY or FRACTIONAL SEG (Segmentation Storage); write the job's "
            "BINARY SEG and report against it, even when a destination receives the LABELMAP SEG"
        )
    segments = segment_specs_by_number(seg_dataset)
    missing = sorted(set(segments) - set(volumes_ml))
    extra = sorted(set(volumes_ml) - set(segments))
    if missing or extra:
        raise ValueError(f"volumes do not match the SEG's segments: missing {missing}, not in the SEG {extra}")
    for number, value in volumes_ml.items():
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"volume of segment {number} must be finite and >= 0, got {value}")
    return segments


def _observer(seg_dataset: Dataset, algorithm: AlgorithmInfo) -> hd.sr.ObserverContext:
    """The device observer: the node that made the SEG, under the SEG's Device UID."""
    device_uid = str(seg_dataset.get("DeviceUID", "")) or derived_uid("device", MANUFACTURER, __version__)
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=truncate_text(f"{algorithm.name} {algorithm.version}"),
        ),
    )


def _volume_group(
    seg_dataset: Dataset,
    number: int,
    item: Dataset,
    volume_ml: float,
    uid_key: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The TID 1411 group of one segment: what it is, where it is in the SEG, and its volume."""
    label = str(item.SegmentLabel)
    tracking_uid = str(item.get("TrackingUID", "")) or derived_uid(uid_key, "sr-tracking", label)
    type_item = item.SegmentedPropertyTypeCodeSequence[0]
    finding_type = _plain_code(type_item)
    finding_sites = None
    if "SegmentedPropertyTypeModifierCodeSequence" in type_item:
        # TID 1411 carries laterality on the Finding Site, not on the finding type.
        laterality = _plain_code(type_item.SegmentedPropertyTypeModifierCodeSequence[0])
        finding_sites = [hd.sr.FindingSite(anatomic_location=finding_type, laterality=laterality)]
    source_series = hd.sr.SourceSeriesForSegmentation(str(seg_dataset.ReferencedSeriesSequence[0].SeriesInstanceUID))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=truncate_text(label)),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg_dataset.SOPClassUID),
            sop_instance_uid=str(seg_dataset.SOPInstanceUID),
            segment_number=number,
            source_series=source_series,
        ),
        finding_type=finding_type,
        finding_category=_plain_code(item.SegmentedPropertyCategoryCodeSequence[0]),
        finding_sites=finding_sites,
        measurements=[
            hd.sr.Measurement(name=VOLUME, value=round(float(volume_ml), 3), unit=MILLILITER, algorithm_id=algorithm_id)
        ],
    )


def read_volumes_ml(sr_path: Path | str) -> dict[int, tuple[str, float, str]]:
    """Read a report back with highdicom: Segment Number -> (label, value, unit).

    Parameters
    ----------
    sr_path : Path or str
        A report written by :func:`write_volume_report`.
    """
    sr = hd.sr.srread(sr_path)
    out: dict[int, tuple[str, float, str]] = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        number = int(segment.referenced_segment_numbers[0]) if segment is not None else 0
        for measurement in group.get_measurements(name=VOLUME):
            out[number] = (group.tracking_identifier, float(measurement.value), measurement.unit.value)
    return out
