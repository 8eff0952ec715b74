"""Write image volumes as standards-conformant DICOM series.

:func:`write_series` turns a ``(slices, rows, columns)`` array on a
:class:`~medsegagent.dicom.volume.Geometry` into

* single-frame CT Image, MR Image or PET Image Storage objects (one file per
  slice), or
* one multi-frame object: **Enhanced CT Image Storage**
  (1.2.840.10008.5.1.4.1.1.2.1, built here with full shared/per-frame
  functional groups and a StackID/InStackPositionNumber dimension
  organisation), or for MR and PET the **Legacy Converted Enhanced** MR/PET
  Image Storage objects that :mod:`highdicom.legacy` derives from the
  single-frame datasets.

Every object validates against ``dciodvfy`` without errors.  All UIDs are
derived deterministically (:func:`deterministic_uid`) from the study UID and
the series parameters, so writing
the same phantom twice yields byte-identical headers — which also makes
re-sends idempotent.  Only uncompressed Explicit VR Little Endian is written.

:func:`write_phantom` writes a whole :class:`~medsegagent.dicom.phantom.Phantom`
study plus its ground truth (NIfTI) and a JSON description.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from .uids import derived_uid as deterministic_uid  # the node's one UID scheme, under this module's old name
from .volume import Geometry

if TYPE_CHECKING:
    from .phantom import Phantom

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
SOP_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "PT": PET_IMAGE_STORAGE}

#: What the multi-frame option produces per modality.
MULTIFRAME_IODS = {
    "CT": "Enhanced CT Image Storage (1.2.840.10008.5.1.4.1.1.2.1)",
    "MR": "Legacy Converted Enhanced MR Image Storage (1.2.840.10008.5.1.4.1.1.4.4)",
    "PT": "Legacy Converted Enhanced PET Image Storage (1.2.840.10008.5.1.4.1.1.128.1)",
}

_IMPLEMENTATION_VERSION = "MEDSEGAGENT_01"
_MANUFACTURER = "MedSegAgent"
_SOFTWARE = "medsegagent phantom 0.1"


@dataclass(frozen=True)
class StudyInfo:
    """Patient- and study-level attributes shared by all series of a study.

    Parameters
    ----------
    study_instance_uid : str
        Study Instance UID; every other UID is derived from it.
    patient_name, patient_id, patient_sex, patient_birth_date : str
        Patient module (``patient_sex`` is ``M``, ``F`` or ``O``; birth date
        ``YYYYMMDD``).
    accession_number, study_id, study_description : str
        General Study module identifiers.
    study_date, study_time : str
        ``YYYYMMDD`` and ``HHMMSS``.
    referring_physician : str
        Referring Physician's Name (PN), may be empty.
    patient_weight_kg, patient_size_m : float
        Patient Study module; the weight is what PET SUVs are computed with.
    institution_name, station_name : str
        General Equipment module.
    """

    study_instance_uid: str
    patient_name: str = "PHANTOM^ABDOMEN"
    patient_id: str = "PHANTOM0000"
    patient_sex: str = "O"
    patient_birth_date: str = "19700101"
    accession_number: str = ""
    study_id: str = "1"
    study_description: str = "ABDOMEN"
    study_date: str = "20240315"
    study_time: str = "101500"
    referring_physician: str = ""
    patient_weight_kg: float = 75.0
    patient_size_m: float = 1.75
    institution_name: str = "MedSegAgent Phantom Hospital"
    station_name: str = "PHANTOM01"

    @property
    def patient_age(self) -> str:
        """Age string (``nnnY``) at the study date."""
        born = _dt.datetime.strptime(self.patient_birth_date, "%Y%m%d").date()
        on = _dt.datetime.strptime(self.study_date, "%Y%m%d").date()
        years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
        return f"{max(years, 0):03d}Y"


@dataclass(frozen=True)
class PetInfo:
    """Radiopharmaceutical administration of a PET series (F-18 FDG by default).

    Parameters
    ----------
    injected_dose_bq : float
        Radionuclide Total Dose at ``injection_time``.
    injection_time : str
        ``HHMMSS`` on the study date.
    half_life_s : float
        Radionuclide half-life (F-18: 6586.2 s).
    positron_fraction : float
        Radionuclide positron fraction (F-18: 0.9673).
    """

    injected_dose_bq: float = 300e6
    injection_time: str = "100000"
    half_life_s: float = 6586.2
    positron_fraction: float = 0.9673


def _ds(value: float) -> str:
    """Format a float as a valid (<= 16 character) DS string."""
    v = float(value)
    if v == 0.0:
        return "0"
    if v == round(v) and abs(v) < 1e15:
        return str(round(v))
    return format_number_as_ds(v)


def _ds_list(values: Sequence[float]) -> list[str]:
    return [_ds(v) for v in values]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _add_seconds(hhmmss: str, seconds: float) -> str:
    t = _dt.datetime.strptime(hhmmss[:6], "%H%M%S") + _dt.timedelta(seconds=seconds)
    return t.strftime("%H%M%S")


# -- modules ---------------------------------------------------------------------


def _patient_study_modules(ds: Dataset, study: StudyInfo) -> None:
    # Patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientIdentityRemoved = "NO"
    # General Study
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description
    # Patient Study
    ds.PatientAge = study.patient_age
    ds.PatientSize = _ds(study.patient_size_m)
    ds.PatientWeight = _ds(study.patient_weight_kg)


def _equipment_module(ds: Dataset, study: StudyInfo, model: str) -> None:
    # General Equipment; also satisfies Enhanced General Equipment (all type 1 there).
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = study.institution_name
    ds.StationName = study.station_name
    ds.ManufacturerModelName = model
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = _SOFTWARE


def _image_pixel(ds: Dataset, rows: int, cols: int, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def _encode(image: np.ndarray, modality: str) -> tuple[np.ndarray, list[float], float, int, bool]:
    """Stored values, per-slice rescale slopes, intercept, bits stored, signed.

    CT: HU + 1024 in 12 unsigned bits (intercept -1024).  MR: rounded signal
    in 12 unsigned bits, no rescale.  PT: signed 16 bits with a per-slice
    slope so each slice uses the full range (as PET scanners do).
    """
    if modality == "CT":
        stored = np.clip(np.rint(image) + 1024.0, 0, 4095).astype(np.uint16)
        return stored, [1.0] * image.shape[0], -1024.0, 12, False
    if modality == "MR":
        stored = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
        return stored, [1.0] * image.shape[0], 0.0, 12, False
    if modality == "PT":
        peak = np.maximum(image.reshape(image.shape[0], -1).max(axis=1), 0.0)
        slopes = [float(p) / 32767.0 if p > 0 else 1.0 for p in peak]
        # Round the slope to what DS can carry so readers decode exactly what we meant.
        slopes = [float(_ds(s)) for s in slopes]
        stored = np.empty(image.shape, np.int16)
        for k, s in enumerate(slopes):
            stored[k] = np.clip(np.rint(image[k] / s), 0, 32767).astype(np.int16)
        return stored, slopes, 0.0, 16, True
    raise ValueError(f"unsupported modality {modality!r}")


@dataclass(frozen=True)
class MrProtocol:
    """The acquisition attributes an MR series is written with.

    The defaults are the phantoms' fat-saturated 3-D spoiled gradient echo
    (Siemens VIBE, T1-weighted) at 3 T.

    Parameters
    ----------
    scanning_sequence, sequence_variant, scan_options : str or list of str
        MR Image module values (``GR``; ``SP``, ``OSP``; ``FS``).
    sequence_name : str
        The vendor's sequence name.
    repetition_time_ms, echo_time_ms, flip_angle_deg : float
        Timing and flip angle.
    field_strength_t : float
        Magnetic Field Strength.
    averages : int
        Number of Averages.
    """

    scanning_sequence: str = "GR"
    sequence_variant: tuple[str, ...] = ("SP", "OSP")
    scan_options: tuple[str, ...] = ("FS",)
    sequence_name: str = "*fl3d1"
    repetition_time_ms: float = 4.1
    echo_time_ms: float = 1.9
    flip_angle_deg: float = 10.0
    field_strength_t: float = 3.0
    averages: int = 1


@dataclass(frozen=True)
class _SeriesContext:
    modality: str
    study: StudyInfo
    geometry: Geometry
    series_uid: str
    series_number: int
    series_description: str
    frame_of_reference_uid: str
    series_time: str
    pet: PetInfo
    window: tuple[float, float]
    body_part: str = "ABDOMEN"
    mr: MrProtocol = field(default_factory=MrProtocol)


def _common(ctx: _SeriesContext, sop_class: str, sop_uid: str) -> Dataset:
    """Modules every single-frame IOD here shares (Patient ... SOP Common)."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ctx.study.study_date
    ds.InstanceCreationTime = ctx.series_time
    _patient_study_modules(ds, ctx.study)
    # General Series
    ds.Modality = ctx.modality
    ds.SeriesInstanceUID = ctx.series_uid
    ds.SeriesNumber = ctx.series_number
    ds.SeriesDate = ctx.study.study_date
    ds.SeriesTime = ctx.series_time
    ds.SeriesDescription = ctx.series_description
    ds.ProtocolName = ctx.series_description
    ds.BodyPartExamined = ctx.body_part
    if ctx.modality != "PT":  # PET states it with Patient Orientation/Gantry Relationship codes
        ds.PatientPosition = "HFS"
    ds.OperatorsName = ""
    # Frame of Reference
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    _equipment_module(ds, ctx.study, {"CT": "Phantom CT", "MR": "Phantom MR 3T", "PT": "Phantom PET"}[ctx.modality])
    return ds


def _single_frame(
    ctx: _SeriesContext,
    k: int,
    instance: int,
    pixels: np.ndarray,
    slope: float,
    intercept: float,
    bits: int,
    signed: bool,
) -> Dataset:
    """One slice as a CT/MR/PET Image Storage dataset."""
    g = ctx.geometry
    sop_class = SOP_CLASSES[ctx.modality]
    sop_uid = deterministic_uid(ctx.series_uid, "instance", k)
    ds = _common(ctx, sop_class, sop_uid)
    acq_time = ctx.series_time
    # General Image / General Acquisition
    ds.InstanceNumber = instance
    ds.ContentDate = ctx.study.study_date
    ds.ContentTime = acq_time
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ctx.study.study_date
    ds.AcquisitionTime = acq_time
    ds.ImagesInAcquisition = g.shape[0]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Plane
    ds.PixelSpacing = _ds_list(g.pixel_spacing)
    ds.ImageOrientationPatient = _ds_list(g.image_orientation)
    ds.ImagePositionPatient = _ds_list(g.slice_position(k))
    ds.SliceThickness = _ds(g.spacing[0])
    ds.SliceLocation = _ds(float(g.slice_position(k) @ g.normal))
    # Image Pixel
    _image_pixel(ds, g.shape[1], g.shape[2], bits, signed)
    # VOI LUT
    ds.WindowCenter = _ds(ctx.window[0])
    ds.WindowWidth = _ds(ctx.window[1])
    if ctx.modality == "CT":
        _ct_image(ds, ctx)
    elif ctx.modality == "MR":
        _mr_image(ds, ctx)
    else:
        _pet_image(ds, ctx, k, instance, slope)
    if ctx.modality != "MR" or intercept or slope != 1.0:
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
    ds.PixelData = pixels.tobytes()
    return ds


def _ct_image(ds: Dataset, ctx: _SeriesContext) -> None:
    # Synthesised directly on its grid, so ORIGINAL whatever the orientation;
    # AXIAL here means "cross-sectional" (as opposed to LOCALIZER).
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(ctx.geometry.spacing[2] * ctx.geometry.shape[2])
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.FilterType = "BODY"
    ds.GeneratorPower = 24
    ds.FocalSpots = ["1.2"]
    ds.ConvolutionKernel = "B30f"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.TableSpeed = 80.0
    ds.TableFeedPerRotation = 40.0
    ds.SpiralPitchFactor = 1.0
    ds.CTDIvol = 10.0
    ds.CTDIPhantomTypeCodeSequence = DicomSequence([_code("113691", "DCM", "IEC Body Dosimetry Phantom")])
    # Contrast/Bolus: a portal-venous phase study.
    ds.ContrastBolusAgent = "Iohexol 350 mg/ml"
    ds.ContrastBolusAgentSequence = DicomSequence([_code("109218004", "SCT", "Iohexol")])
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = "100"
    ds.ContrastBolusStartTime = _add_seconds(ctx.series_time, -70)
    ds.ContrastBolusTotalDose = "100"
    ds.ContrastBolusIngredient = "IODINE"
    ds.ContrastBolusIngredientConcentration = "350"


def _mr_image(ds: Dataset, ctx: _SeriesContext) -> None:
    mr = ctx.mr
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = mr.scanning_sequence
    ds.SequenceVariant = list(mr.sequence_variant) or "NONE"
    ds.ScanOptions = list(mr.scan_options) or ""
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = mr.sequence_name
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds(mr.repetition_time_ms)
    ds.EchoTime = _ds(mr.echo_time_ms)
    ds.EchoTrainLength = "1"
    ds.NumberOfAverages = _ds(mr.averages)
    ds.ImagingFrequency = _ds(42.577478 * mr.field_strength_t)  # proton Larmor frequency, MHz
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(mr.field_strength_t)
    ds.SpacingBetweenSlices = _ds(ctx.geometry.spacing[0])
    ds.FlipAngle = _ds(mr.flip_angle_deg)
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "450"
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.AcquisitionMatrix = [0, ctx.geometry.shape[2], ctx.geometry.shape[1], 0]
    ds.SAR = "0.1"
    ds.dBdt = "0"
    ds.VariableFlipAngleFlag = "N"
    ds.ReceiveCoilName = "Body18"
    ds.TransmitCoilName = "Body"


def _pet_image(ds: Dataset, ctx: _SeriesContext, k: int, instance: int, slope: float) -> None:
    pet, study, g = ctx.pet, ctx.study, ctx.geometry
    # PET Series
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.NumberOfSlices = g.shape[0]
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.DecayCorrection = "START"
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT"
    ds.ScatterCorrectionMethod = "MODEL"
    ds.ReconstructionMethod = "OSEM 3i21s"
    ds.ReconstructionDiameter = _ds(g.spacing[2] * g.shape[2])
    ds.ConvolutionKernel = "GAUSSIAN 6MM"
    ds.CollimatorType = "NONE"
    ds.AxialAcceptance = "0"
    ds.DetectorLinesOfResponseUsed = "NONE"
    ds.GantryDetectorTilt = "0"
    # PET Isotope
    info = Dataset()
    info.Radiopharmaceutical = "Fluorodeoxyglucose"
    info.RadiopharmaceuticalRoute = "IV"
    info.RadiopharmaceuticalStartTime = pet.injection_time
    info.RadiopharmaceuticalStartDateTime = study.study_date + pet.injection_time
    info.RadionuclideTotalDose = _ds(pet.injected_dose_bq)
    info.RadionuclideHalfLife = _ds(pet.half_life_s)
    info.RadionuclidePositronFraction = _ds(pet.positron_fraction)
    info.RadionuclideCodeSequence = DicomSequence([_code("77004003", "SCT", "^18^Fluorine")])
    info.RadiopharmaceuticalCodeSequence = DicomSequence([_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    info.AdministrationRouteCodeSequence = DicomSequence([_code("47625008", "SCT", "Intravenous route")])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([info])
    # NM/PET Patient Orientation
    orient = _code("102538003", "SCT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = DicomSequence([_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = DicomSequence([orient])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([_code("102540008", "SCT", "headfirst")])
    # PET Image
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.FrameReferenceTime = "0"
    ds.ImageIndex = instance
    ds.ActualFrameDuration = 120000  # ms per bed position
    ds.DecayFactor = "1"
    ds.DoseCalibrationFactor = "1"
    ds.ScatterFractionFactor = "0.3"
    ds.DeadTimeFactor = "1.02"
    ds.SliceSensitivityFactor = "1"
    ds.PrimaryPromptsCountsAccumulated = 1000000


# -- Enhanced CT -----------------------------------------------------------------


def _sequence_of(**elements: object) -> DicomSequence:
    """A one-item sequence whose item holds ``elements`` (keyword -> value)."""
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


#: Frame Type of every frame, and Image Type of the whole object.
_ENHANCED_CT_FRAME_TYPE = ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")


def _enhanced_ct(ctx: _SeriesContext, order: list[int], stored: np.ndarray) -> Dataset:
    """One Enhanced CT Image object holding every slice as a frame (frame i = slice ``order[i]``)."""
    g = ctx.geometry
    sop_uid = deterministic_uid(ctx.series_uid, "enhanced-ct")
    ds = _common(ctx, ENHANCED_CT_IMAGE_STORAGE, sop_uid)
    acq_dt = ctx.study.study_date + ctx.series_time
    # Enhanced CT Image
    ds.ImageType = list(_ENHANCED_CT_FRAME_TYPE)
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = acq_dt
    ds.AcquisitionDuration = 10.0
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    _image_pixel(ds, g.shape[1], g.shape[2], 12, False)
    # Multi-frame Functional Groups
    ds.InstanceNumber = 1
    ds.ContentDate = ctx.study.study_date
    ds.ContentTime = ctx.series_time
    ds.NumberOfFrames = len(order)
    # Multi-frame Dimension: one stack, frames indexed by in-stack position.
    _dimension_organization(ds, ctx.series_uid)
    # Acquisition Context (type 2, empty)
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.ContrastBolusAgentSequence = DicomSequence([_enhanced_contrast_agent()])
    shared = Dataset()
    _shared_image_groups(shared, ctx)
    _shared_ct_acquisition_groups(shared, ctx)
    _shared_ct_reconstruction_groups(shared, g)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([_ct_frame_groups(g, k, acq_dt) for k in order])
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    return ds


def _enhanced_contrast_agent() -> Dataset:
    """The Enhanced Contrast/Bolus agent item: the portal-venous phase's iohexol."""
    agent = _code("109218004", "SCT", "Iohexol")
    agent.ContrastBolusAgentNumber = 1
    agent.ContrastBolusAdministrationRouteSequence = DicomSequence([_code("47625008", "SCT", "Intravenous route")])
    agent.ContrastBolusIngredientCodeSequence = DicomSequence([_code("44588005", "SCT", "Iodine")])
    agent.ContrastBolusVolume = 100.0
    agent.ContrastBolusIngredientConcentration = 350.0
    agent.ContrastBolusIngredientOpaque = "YES"
    return agent


def _shared_image_groups(shared: Dataset, ctx: _SeriesContext) -> None:
    """Shared functional groups of the image: plane, anatomy, pixel values, frame type."""
    g = ctx.geometry
    shared.PixelMeasuresSequence = _sequence_of(
        PixelSpacing=_ds_list(g.pixel_spacing), SliceThickness=_ds(g.spacing[0]), SpacingBetweenSlices=_ds(g.spacing[0])
    )
    shared.PlaneOrientationSequence = _sequence_of(ImageOrientationPatient=_ds_list(g.image_orientation))
    shared.FrameAnatomySequence = _sequence_of(
        AnatomicRegionSequence=DicomSequence([_code("818981001", "SCT", "Abdomen")]), FrameLaterality="U"
    )
    shared.PixelValueTransformationSequence = _sequence_of(RescaleIntercept="-1024", RescaleSlope="1", RescaleType="HU")
    shared.FrameVOILUTSequence = _sequence_of(WindowCenter=_ds(ctx.window[0]), WindowWidth=_ds(ctx.window[1]))
    shared.CTImageFrameTypeSequence = _sequence_of(
        FrameType=list(_ENHANCED_CT_FRAME_TYPE),
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )


def _shared_ct_acquisition_groups(shared: Dataset, ctx: _SeriesContext) -> None:
    """Shared functional groups of the helical acquisition (the same scanner settings as the single-frame CT)."""
    shared.IrradiationEventIdentificationSequence = _sequence_of(
        IrradiationEventUID=deterministic_uid(ctx.series_uid, "irradiation-event")
    )
    shared.CTAcquisitionTypeSequence = _sequence_of(
        AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
    )
    shared.CTAcquisitionDetailsSequence = _sequence_of(
        DataCollectionDiameter="500",
        RotationDirection="CW",
        RevolutionTime=0.5,
        SingleCollimationWidth=0.625,
        TotalCollimationWidth=40.0,
        TableHeight="150",
        GantryDetectorTilt="0",
    )
    shared.CTTableDynamicsSequence = _sequence_of(TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0)
    shared.CTGeometrySequence = _sequence_of(
        DistanceSourceToDetector="1085.6", DistanceSourceToDataCollectionCenter=595.0
    )
    shared.CTExposureSequence = _sequence_of(
        ExposureTimeInms=500.0,
        XRayTubeCurrentInmA=200.0,
        ExposureInmAs=100.0,
        ExposureModulationType="NONE",
        CTDIvol=10.0,
        CTDIPhantomTypeCodeSequence=DicomSequence([_code("113691", "DCM", "IEC Body Dosimetry Phantom")]),
    )
    shared.CTXRayDetailsSequence = _sequence_of(
        KVP="120", FocalSpots=["1.2"], FilterType="BODY", FilterMaterial=["ALUMINUM"]
    )
    shared.ContrastBolusUsageSequence = _sequence_of(
        ContrastBolusAgentNumber=1,
        ContrastBolusAgentAdministered="YES",
        ContrastBolusAgentDetected="YES",
        ContrastBolusAgentPhase="PORTAL_VENOUS",
    )


def _shared_ct_reconstruction_groups(shared: Dataset, g: Geometry) -> None:
    """Shared CT Reconstruction functional group: a soft-tissue filtered back projection over the field of view."""
    shared.CTReconstructionSequence = _sequence_of(
        ConvolutionKernel="B30f",
        ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionDiameter=_ds(g.spacing[2] * g.shape[2]),
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ReconstructionAngle=360.0,
        ReconstructionPixelSpacing=[g.spacing[1], g.spacing[2]],
        ImageFilter="NONE",
    )


def _ct_frame_groups(g: Geometry, k: int, acq_dt: str) -> Dataset:
    """Per-frame functional groups of slice ``k``: frame content, plane position, CT position."""
    item = Dataset()
    item.FrameContentSequence = _sequence_of(
        FrameAcquisitionNumber=1,
        FrameReferenceDateTime=acq_dt,
        FrameAcquisitionDateTime=acq_dt,
        FrameAcquisitionDuration=500.0,
        StackID="1",
        InStackPositionNumber=k + 1,
        DimensionIndexValues=[1, k + 1],
    )
    pos = g.slice_position(k)
    item.PlanePositionSequence = _sequence_of(ImagePositionPatient=_ds_list(pos))
    # The reconstruction target is the middle of the slice; the table moves along z.
    half_plane = (
        g.row_direction * g.spacing[2] * (g.shape[2] - 1) / 2 + g.column_direction * g.spacing[1] * (g.shape[1] - 1) / 2
    )
    centre = pos + half_plane
    item.CTPositionSequence = _sequence_of(
        TablePosition=float(-centre[2]),
        ReconstructionTargetCenterPatient=[float(v) for v in centre],
        DataCollectionCenterPatient=[0.0, 0.0, float(centre[2])],
    )
    return item


# -- public API ------------------------------------------------------------------


def write_series(
    image: np.ndarray,
    geometry: Geometry,
    modality: str,
    out_dir: Path,
    *,
    study: StudyInfo,
    series_number: int,
    series_description: str,
    reverse_order: bool = False,
    multiframe: bool = False,
    frame_of_reference_uid: str,
    series_instance_uid: str | None = None,
    series_time: str | None = None,
    pet: PetInfo | None = None,
    window: tuple[float, float] | None = None,
    body_part: str = "ABDOMEN",
    mr_protocol: MrProtocol | None = None,
) -> list[Path]:
    """Write ``image`` as one DICOM series.

    Parameters
    ----------
    image : numpy.ndarray
        ``(slices, rows, columns)`` real-world values: HU (CT), signal (MR) or Bq/ml (PT).
    geometry : Geometry
        Where the voxels are; slice ``k`` gets ``geometry.slice_position(k)``.
    modality : str
        ``CT``, ``MR`` or ``PT``.
    out_dir : pathlib.Path
        Folder for the files (created); names are ``<modality>_<InstanceNumber:04d>.dcm`` (multi-frame: ``_0001``).
    study : StudyInfo
        Patient/study attributes.
    series_number : int
        Series Number.
    series_description : str
        Series Description (and Protocol Name).
    reverse_order : bool
        Number instances (or order frames) against spatial order: instance 1 is the last slice of ``geometry``.
    multiframe : bool
        Write one multi-frame object (:data:`MULTIFRAME_IODS`) instead.
    frame_of_reference_uid : str
        Frame of Reference UID (shared by series on the same grid).
    series_instance_uid : str, optional
        Defaults to a UID derived from the study UID and the arguments.
    series_time : str, optional
        ``HHMMSS``; defaults to the study time.
    pet : PetInfo, optional
        PET administration details (PT only; defaults to 300 MBq FDG).
    window : (float, float), optional
        Default VOI window centre/width.
    body_part : str
        Body Part Examined (``ABDOMEN``, ``HEAD``).
    mr_protocol : MrProtocol, optional
        MR acquisition attributes (MR only; the phantoms' VIBE by default).

    Returns
    -------
    list of pathlib.Path
        Written files in instance-number order.
    """
    image = _checked_image(image, geometry, modality)
    ctx = _SeriesContext(
        modality=modality,
        study=study,
        geometry=geometry,
        series_uid=series_instance_uid or _series_uid(study, modality, series_number, multiframe, reverse_order),
        series_number=series_number,
        series_description=series_description,
        frame_of_reference_uid=frame_of_reference_uid,
        series_time=series_time or study.study_time,
        pet=pet or PetInfo(),
        window=window or _DEFAULT_WINDOWS[modality],
        body_part=body_part,
        mr=mr_protocol or MrProtocol(),
    )
    return _write_context(ctx, image, Path(out_dir), reverse_order=reverse_order, multiframe=multiframe)


#: Default VOI window (centre, width) per modality: abdominal soft tissue, the phantoms' MR and PET ranges.
_DEFAULT_WINDOWS = {"CT": (40.0, 400.0), "MR": (400.0, 900.0), "PT": (15000.0, 30000.0)}


def _checked_image(image: np.ndarray, geometry: Geometry, modality: str) -> np.ndarray:
    """``image`` as an array, once the modality is one this writer knows and the shape matches ``geometry``."""
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be CT, MR or PT, got {modality!r}")
    image = np.asarray(image)
    if tuple(image.shape) != geometry.shape:
        raise ValueError(f"image shape {image.shape} does not match geometry {geometry.shape}")
    return image


def _series_uid(study: StudyInfo, modality: str, series_number: int, multiframe: bool, reverse_order: bool) -> str:
    """The Series Instance UID a series gets when none is given: the same arguments give the same UID."""
    return deterministic_uid(study.study_instance_uid, "series", modality, series_number, multiframe, reverse_order)


def _write_context(
    ctx: _SeriesContext, image: np.ndarray, out_dir: Path, *, reverse_order: bool, multiframe: bool
) -> list[Path]:
    """Encode ``image`` and write it as the series ``ctx`` describes; the files in instance order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    modality = ctx.modality
    stored, slopes, intercept, bits, signed = _encode(image, modality)
    n = ctx.geometry.shape[0]
    order = list(range(n))[::-1] if reverse_order else list(range(n))  # order[i]: slice of instance/frame i+1
    if multiframe and modality == "CT":
        return [_save(_enhanced_ct(ctx, order, stored), out_dir / f"{modality}_0001.dcm")]
    singles = [_single_frame(ctx, k, i + 1, stored[k], slopes[k], intercept, bits, signed) for i, k in enumerate(order)]
    if multiframe:
        if modality == "MR":  # Enhanced MR "image flavor" terms differ from the single-frame ones
            for ds in singles:
                ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        return [_write_legacy_converted(singles, ctx, order, out_dir)]
    return [_save(ds, out_dir / f"{modality}_{i + 1:04d}.dcm") for i, ds in enumerate(singles)]


def _save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (with its File Meta Information) at ``path``."""
    ds.save_as(path, enforce_file_format=True)
    return path


def _dimension_organization(ds: Dataset, series_uid: str) -> str:
    """Add a one-stack StackID / InStackPositionNumber dimension organisation; return its UID."""
    dim_uid = deterministic_uid(series_uid, "dimension-organization")
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    ds.DimensionOrganizationType = "3D"
    dims = []
    for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number")):
        d = Dataset()
        d.DimensionOrganizationUID = dim_uid
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
        d.DimensionDescriptionLabel = label
        dims.append(d)
    ds.DimensionIndexSequence = DicomSequence(dims)
    return dim_uid


def _write_legacy_converted(singles: list[Dataset], ctx: _SeriesContext, order: list[int], out_dir: Path) -> Path:
    """Legacy Converted Enhanced MR/PET object from the single-frame datasets.

    Frames stay in ``singles`` order (so ``reverse_order`` is honoured); the
    dimension organisation is replaced by a deterministic StackID /
    InStackPositionNumber one (highdicom would sort frames and draw a random
    Dimension Organization UID).
    """
    from highdicom.legacy import LegacyConvertedEnhancedMRImage, LegacyConvertedEnhancedPETImage

    cls = LegacyConvertedEnhancedMRImage if ctx.modality == "MR" else LegacyConvertedEnhancedPETImage
    obj = cls(
        legacy_datasets=singles,
        series_instance_uid=ctx.series_uid,
        series_number=ctx.series_number,
        sop_instance_uid=deterministic_uid(ctx.series_uid, "legacy-converted"),
        instance_number=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        include_dimension_index=False,
    )
    _dimension_organization(obj, ctx.series_uid)
    for item, k in zip(obj.PerFrameFunctionalGroupsSequence, order, strict=True):
        fc = item.FrameContentSequence[0]
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [1, k + 1]
    # highdicom stamps "now" and lists sources from a set: pin both for determinism.
    obj.InstanceCreationDate = ctx.study.study_date
    obj.InstanceCreationTime = ctx.series_time
    rank = {ds.SOPInstanceUID: i for i, ds in enumerate(singles)}
    for series in obj.get("ReferencedSeriesSequence", []):
        refs = sorted(series.ReferencedInstanceSequence, key=lambda r: rank.get(r.ReferencedSOPInstanceUID, -1))
        series.ReferencedInstanceSequence = DicomSequence(refs)
    for item in obj.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = ctx.study.study_date + ctx.series_time
    return _save(obj, out_dir / f"{ctx.modality}_0001.dcm")


@dataclass
class PhantomFiles:
    """What :func:`write_phantom` wrote.

    Attributes
    ----------
    root : pathlib.Path
        The output folder.
    dicom_dir : pathlib.Path
        ``root/dicom``: every series of the study.
    series : dict
        Modality -> files of that series.
    truth : pathlib.Path
        ``root/truth.nii.gz``: uint8 label map.
    labels_json : pathlib.Path
        ``root/labels.json``: labels, geometry, volumes, UIDs.
    uids : dict
        ``study``, ``frame_of_reference`` and ``series_<modality>`` UIDs.
    """

    root: Path
    dicom_dir: Path
    series: dict[str, list[Path]] = field(default_factory=dict)
    truth: Path | None = None
    labels_json: Path | None = None
    uids: dict[str, str] = field(default_factory=dict)


#: Per modality: series number, description, time offset (s) from the study time.
_SERIES_PLAN = {
    "CT": (2, "CT ABDOMEN PORTAL VENOUS", 0),
    "MR": (3, "T1 VIBE AX", 0),
    "PT": (3, "PET WB AC", 300),
}
_STUDY_DESCRIPTIONS = {"CT": "CT ABDOMEN WITH CONTRAST", "MR": "MR ABDOMEN", "PT+CT": "PET-CT FDG ABDOMEN"}


def phantom_study_info(phantom: Phantom) -> StudyInfo:
    """Deterministic patient/study attributes for ``phantom`` (patient by seed, study by phantom)."""
    seed = phantom.seed
    digest = hashlib.sha256(phantom.uid_key.encode()).hexdigest()
    rng = np.random.default_rng([seed, 424242])
    birth = _dt.date(1940, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    return StudyInfo(
        study_instance_uid=deterministic_uid(phantom.uid_key, "study"),
        patient_name=f"PHANTOM^SEED{seed}",
        patient_id=f"PHANTOM{seed:06d}",
        patient_sex="F" if seed % 2 else "M",
        patient_birth_date=birth.strftime("%Y%m%d"),
        accession_number=f"A{int(digest[:12], 16) % 10**9:09d}",
        study_id=str(int(digest[12:18], 16) % 100000),
        study_description=_STUDY_DESCRIPTIONS[phantom.modality],
        study_date="20240315",
        study_time="101500",
        referring_physician="REFERRER^PHANTOM",
        patient_weight_kg=75.0,
        patient_size_m=1.75,
    )


def write_phantom(
    phantom: Phantom, out_dir: Path, *, reverse_order: bool = False, multiframe: bool = False
) -> PhantomFiles:
    """Write a phantom study (DICOM), its truth (NIfTI) and ``labels.json``.

    Parameters
    ----------
    phantom : Phantom
        From :func:`medsegagent.dicom.phantom.make_phantom`.
    out_dir : pathlib.Path
        Output folder; DICOM goes to ``out_dir/dicom``.
    reverse_order : bool
        Instance numbers against spatial order (reader test).
    multiframe : bool
        One multi-frame object per series (:data:`MULTIFRAME_IODS`).

    Returns
    -------
    PhantomFiles
        Paths and UIDs written.
    """
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    study = phantom_study_info(phantom)
    frame_uid = deterministic_uid(phantom.uid_key, "frame-of-reference")
    files = PhantomFiles(out_dir, dicom_dir)
    files.uids = {"study": study.study_instance_uid, "frame_of_reference": frame_uid}
    pet, pet_window = _phantom_pet(study)
    for modality, (image, geometry) in sorted(phantom.images.items()):
        number, description, offset = _SERIES_PLAN[modality]
        series_uid = _series_uid(study, modality, number, multiframe, reverse_order)
        files.series[modality] = write_series(
            image,
            geometry,
            modality,
            dicom_dir,
            study=study,
            series_number=number,
            series_description=description,
            reverse_order=reverse_order,
            multiframe=multiframe,
            frame_of_reference_uid=frame_uid,
            series_instance_uid=series_uid,
            series_time=_add_seconds(study.study_time, offset),
            pet=pet if modality == "PT" else None,
            window=pet_window if modality == "PT" else None,
        )
        files.uids[f"series_{modality}"] = series_uid
    files.truth = _write_truth(phantom, out_dir / "truth.nii.gz")
    files.labels_json = out_dir / "labels.json"
    meta = _phantom_description(phantom, study, files, reverse_order=reverse_order, multiframe=multiframe)
    files.labels_json.write_text(json.dumps(meta, indent=2) + "\n")
    return files


def _phantom_pet(study: StudyInfo) -> tuple[PetInfo, tuple[float, float]]:
    """The phantoms' PET administration (FDG) and VOI window (SUV 0-8)."""
    from .phantom import PET_INJECTED_DOSE_BQ, PET_UPTAKE_S, SUV_BQML

    # Decay correction is to the PET series start, which is PET_UPTAKE_S after injection.
    injection = _add_seconds(study.study_time, _SERIES_PLAN["PT"][2] - PET_UPTAKE_S)
    return PetInfo(injected_dose_bq=PET_INJECTED_DOSE_BQ, injection_time=injection), (4.0 * SUV_BQML, 8.0 * SUV_BQML)


def _write_truth(phantom: Phantom, path: Path) -> Path:
    """Write the phantom's label map as a uint8 NIfTI image in RAS at ``path``."""
    import nibabel as nib

    g = phantom.geometry
    truth = nib.Nifti1Image(np.ascontiguousarray(phantom.labels.transpose(2, 1, 0)), g.nifti_affine())
    truth.header.set_data_dtype(np.uint8)
    # Both forms, "scanner" code: ITK-based tools read the qform, nibabel the sform.
    truth.set_qform(g.nifti_affine(), code=1)
    truth.set_sform(g.nifti_affine(), code=1)
    truth.header.set_xyzt_units("mm")
    nib.save(truth, path)
    return path


def _phantom_description(
    phantom: Phantom, study: StudyInfo, files: PhantomFiles, *, reverse_order: bool, multiframe: bool
) -> dict[str, object]:
    """The content of ``labels.json``: labels, how the study was written, its geometry, volumes and UIDs."""
    from .phantom import PET_INJECTED_DOSE_BQ, SUV_BQML

    g = phantom.geometry
    meta: dict[str, object] = {
        "labels": {str(k): v for k, v in phantom.label_names.items()},
        "modality": phantom.modality,
        "seed": phantom.seed,
        "orientation": phantom.orientation,
        "reverse_order": reverse_order,
        "multiframe": multiframe,
        "geometry": {
            "shape_slice_row_column": list(g.shape),
            "spacing_slice_row_column_mm": list(g.spacing),
            "origin_lps_mm": g.origin.tolist(),
            "row_direction": g.row_direction.tolist(),
            "column_direction": g.column_direction.tolist(),
            "slice_direction": g.slice_direction.tolist(),
            "affine_lps": g.affine.tolist(),
            "affine_nifti_ras": g.nifti_affine().tolist(),
            "nifti_data": "labels.transpose(2, 1, 0)",
        },
        "volumes_ml": {k: round(v, 3) for k, v in phantom.volumes_ml().items()},
        "uids": files.uids,
        "series": {m: [p.name for p in ps] for m, ps in files.series.items()},
    }
    if "PT" in phantom.images:
        meta["pet"] = {
            "units": "BQML",
            "suv_bw_scale_bqml": SUV_BQML,
            "injected_dose_bq": PET_INJECTED_DOSE_BQ,
            "patient_weight_kg": study.patient_weight_kg,
        }
    return meta
