"""Secondary Capture of the segmentation preview, for PACS and viewers that cannot show a SEG.

The picture is the same as the PNG preview (:func:`~medsegagent.dicom.preview.preview_rgb`):
the source slice with the largest segmented area, the segments blended in
their recommended colours.  It is written as an RGB Secondary Capture Image
in the source study, in its own series, referencing the slice it shows
(Source Image Sequence), with Patient Orientation so a viewer can label the
sides.  It is a picture for orientation only, not a measurement object: the
SEG remains the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from medsegagent.dicom.preview import preview_rgb
from medsegagent.dicom.seg import MANUFACTURER, MODEL_NAME, save_atomically, truncate_text
from medsegagent.dicom.uids import derived_uid
from medsegagent.dicom.volume import Volume

#: Derivation Description (ST) of every preview.
PREVIEW_NOTE = "Preview of an automatic segmentation (colour overlay); not for diagnosis. See the SEG for the result."

#: Patient-direction letters of the +x, +y, +z LPS axes (and their opposites).
_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
#: Smallest direction cosine that still contributes a letter to an oblique direction.
_OBLIQUE_COSINE = 0.2


def patient_direction(vector: np.ndarray) -> str:
    """Patient Orientation letters of a direction, most significant first.

    Parameters
    ----------
    vector : numpy.ndarray
        Unit vector in LPS.

    Returns
    -------
    str
        e.g. ``"L"`` (along +x), ``"F"`` (along -z), ``"LP"`` (oblique).
    """
    vector = np.asarray(vector, dtype=float)
    order = np.argsort(-np.abs(vector))
    letters = [_LETTERS[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) >= _OBLIQUE_COSINE]
    return "".join(letters[:3]) or _LETTERS[order[0]][0 if vector[order[0]] > 0 else 1]


def write_preview_sc(
    volume: Volume,
    source_datasets: Sequence[Dataset],
    labels: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
    out_path: Path,
    *,
    uid_key: str,
    request_text: str = "",
    series_number: int = 9903,
) -> Dataset:
    """Write the preview as an RGB Secondary Capture in the source study.

    Parameters
    ----------
    volume : Volume
        The source volume (its array is the background picture).
    source_datasets : sequence of Dataset
        Source headers (:func:`~medsegagent.dicom.seg.load_source_datasets`):
        they provide patient and study and the referenced slice.
    labels : numpy.ndarray
        Label map on the volume grid, values ``0..len(colors)``.
    colors : sequence of (r, g, b)
        Colour of each segment.
    out_path : Path
        Where to write (atomic rename).
    uid_key : str
        Stable job key; with the source series it determines the SC's UIDs.
    request_text : str
        The instruction, written into the Series Description.
    series_number : int
        Series Number of the SC series.

    Returns
    -------
    pydicom.dataset.Dataset
        The written Secondary Capture.

    Raises
    ------
    ValueError
        On labels off the volume grid or sources of another series.
    """
    if labels.shape != volume.geometry.shape:
        raise ValueError(f"labels {labels.shape} are not on the volume grid {volume.geometry.shape}")
    if {str(ds.SeriesInstanceUID) for ds in source_datasets} != {volume.series_instance_uid}:
        raise ValueError("source datasets must be the volume's own series")
    preview = preview_rgb(volume.array, labels, colors, modality=volume.modality)
    source, reference = _shown_source(volume, source_datasets, preview.slice_index)
    geometry = volume.geometry
    key = f"{uid_key}|{volume.series_instance_uid}"
    orientation = [patient_direction(geometry.row_direction), patient_direction(geometry.column_direction)]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=preview.rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derived_uid(key, "sc-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(key, "sc-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom accepts single letters only; the oblique letters are set below.
        patient_orientation=(orientation[0][0], orientation[1][0]),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=truncate_text(f"Preview {request_text}" if request_text else "MedSegAgent preview"),
        manufacturer_model_name=MODEL_NAME,
    )
    sc.PatientOrientation = orientation
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = PREVIEW_NOTE
    sc.BurnedInAnnotation = "NO"  # colours only; no text or identifiers are drawn
    _copy_body_part(sc, source)
    save_atomically(sc, out_path)
    return sc


def _shown_source(volume: Volume, source_datasets: Sequence[Dataset], slice_index: int) -> tuple[Dataset, Dataset]:
    """The source header of the slice shown, and the Source Image Sequence item that references it."""
    sop_class, sop_uid, frame = volume.source_instances[slice_index]
    source = next((ds for ds in source_datasets if str(ds.SOPInstanceUID) == sop_uid), None)
    if source is None:
        raise ValueError(f"source instance {sop_uid} of the shown slice is not among source_datasets")
    reference = Dataset()
    reference.ReferencedSOPClassUID = sop_class
    reference.ReferencedSOPInstanceUID = sop_uid
    if frame is not None:
        reference.ReferencedFrameNumber = frame
    return source, reference


def _copy_body_part(sc: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality as the source says them.

    General Series Laterality is 2C (required for paired body parts): copying
    what the source says about the body part lets a validator tell; when the
    source says nothing, Laterality is present and empty ("unknown") rather
    than guessed.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    if not source.get("BodyPartExamined") and not source.get("Laterality"):
        sc.Laterality = ""
