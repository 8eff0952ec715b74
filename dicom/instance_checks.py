"""What one received instance shows about itself: the intake's refusals before anything is stored.

The intake refuses, with a DIMSE failure status and an Error Comment, every
instance whose problem the instance alone shows, so that a study never
becomes a job that can only fail later (or, worse, a SEG of garbage).  The
checks read :class:`~medsegagent.dicom.scan.InstanceFacts` -- what the byte
scanner collected on the way in -- and never decode the data set again.

Two statuses, by what is wrong:

* **C000 Cannot Understand**: the node cannot read the instance as an
  image (no or truncated pixel data, an absurd matrix, a pixel layout it
  cannot decode, a character set pydicom does not know);
* **A900 Data Set Does Not Match SOP Class**: the instance contradicts its
  IOD (a Modality missing or other than its SOP class requires, Bits Stored
  and High Bit that do not fit Bits Allocated, an image geometry that is not
  finite or not physical).

Reasons are short: the first 64 characters go back as the Error Comment
(an LO), the whole reason into the node's log.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.charset import python_encoding
from pydicom.uid import UID
from pynetdicom import sop_class as sc

from medsegagent.dicom.dimse import Status
from medsegagent.dicom.scan import InstanceFacts

#: Storage SOP classes the node accepts and the Modality (0008,0060) each IOD requires: the images its
#: registry's modalities need, plus SR documents that carry requests.
REQUIRED_MODALITY: Mapping[str, str] = {
    sc.CTImageStorage: "CT",
    sc.EnhancedCTImageStorage: "CT",
    sc.LegacyConvertedEnhancedCTImageStorage: "CT",
    sc.MRImageStorage: "MR",
    sc.EnhancedMRImageStorage: "MR",
    sc.LegacyConvertedEnhancedMRImageStorage: "MR",
    sc.PositronEmissionTomographyImageStorage: "PT",
    sc.EnhancedPETImageStorage: "PT",
    sc.LegacyConvertedEnhancedPETImageStorage: "PT",
    sc.UltrasoundImageStorage: "US",
    sc.UltrasoundMultiFrameImageStorage: "US",
    sc.BasicTextSRStorage: "SR",
    sc.EnhancedSRStorage: "SR",
    sc.ComprehensiveSRStorage: "SR",
}

#: Largest frame count / matrix the node accepts; anything above is a corrupt or hostile claim.
MAX_FRAMES = 10_000
MAX_MATRIX = 8192
#: Patient coordinates beyond a kilometre are no patient's (and make grid arithmetic overflow).
MAX_POSITION_MM = 1e6
#: Pixel spacing outside 0.1 um .. 10 cm describes no medical image the node can segment.
MIN_SPACING_MM, MAX_SPACING_MM = 1e-4, 100.0
#: How far direction cosines may stray from unit length and orthogonality (rounded values in real data).
_COSINE_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the DIMSE status and a reason an administrator understands."""

    status: Status
    reason: str


def instance_refusal(facts: InstanceFacts) -> Refusal | None:
    """The refusal an instance earns by itself, or ``None`` when it may be stored.

    Parameters
    ----------
    facts : InstanceFacts
        What the scanner read; its SOP class is one the node accepts (the
        association negotiated it and the data set agrees with the request).

    Returns
    -------
    Refusal or None
        The first problem found: Modality, pixel description, pixel bits,
        geometry, character set -- in that order.
    """
    checks = [_modality_problem]
    if REQUIRED_MODALITY.get(facts.sop_class_uid or "") != "SR":  # SR documents carry no pixels
        checks += [_pixel_problem, _bits_problem, _geometry_problem]
    checks.append(_charset_problem)
    for check in checks:
        refusal = check(facts)
        if refusal is not None:
            return refusal
    return None


def _shown(value: str, limit: int = 16) -> str:
    """A received value quoted for a reason, cut so that the reason stays readable."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _modality_problem(facts: InstanceFacts) -> Refusal | None:
    required = REQUIRED_MODALITY.get(facts.sop_class_uid or "")
    if not facts.modality:
        return Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "no Modality (0008,0060)")
    if required is not None and facts.modality != required:
        name = UID(facts.sop_class_uid or "").name
        why = f"Modality {_shown(facts.modality)}: {name} requires {required}"
        return Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, why)
    return None


def _pixel_problem(facts: InstanceFacts) -> Refusal | None:
    """Pixel data present, a sane matrix and frame claim, and native pixel data as long as they claim."""

    def refuse(why: str) -> Refusal:
        return Refusal(Status.CANNOT_UNDERSTAND, why)

    if facts.pixel_data_length is None:
        return refuse("image has no pixel data")
    missing = [name for name in ("rows", "columns", "bits_allocated") if getattr(facts, name) is None]
    if missing:
        return refuse(f"image pixel description is incomplete (no {', '.join(missing)})")
    rows, cols, bits = int(facts.rows or 0), int(facts.columns or 0), int(facts.bits_allocated or 0)
    frames, samples = facts.number_of_frames or 1, facts.samples_per_pixel or 1
    if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX and 0 < frames <= MAX_FRAMES):
        return refuse(f"implausible image size claim ({rows} x {cols} x {frames} frames)")
    if bits not in (1, 8, 16, 32, 64) or samples not in (1, 3):
        return refuse(f"unsupported pixel layout (BitsAllocated {bits}, SamplesPerPixel {samples})")
    if facts.pixel_data_length >= 0:  # native: the length is checkable (-1: encapsulated)
        expected = rows * cols * frames * samples * bits // 8
        if facts.pixel_data_length < expected:
            return refuse(f"pixel data truncated ({facts.pixel_data_length} of {expected} bytes)")
    return None


def _bits_problem(facts: InstanceFacts) -> Refusal | None:
    """Bits Stored within Bits Allocated, High Bit one less than Bits Stored (PS3.3 C.7.6.3.1)."""
    allocated, stored, high = facts.bits_allocated or 0, facts.bits_stored, facts.high_bit
    if stored is None or high is None:
        return Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "no Bits Stored or High Bit")
    if not 0 < stored <= allocated:
        return Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                       f"Bits Stored {stored} does not fit Bits Allocated {allocated}")  # fmt: skip
    if high != stored - 1:
        return Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                       f"High Bit {high} with Bits Stored {stored} (must be {stored - 1})")  # fmt: skip
    return None


def _geometry_problem(facts: InstanceFacts) -> Refusal | None:
    """Image Position, Image Orientation and Pixel Spacing, where present: counts, finite, physical."""
    refuse = Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    for name, values, count in (("Image Position (Patient)", facts.image_position, 3),
                                ("Image Orientation (Patient)", facts.image_orientation, 6),
                                ("Pixel Spacing", facts.pixel_spacing, 2)):  # fmt: skip
        if values is None:
            continue
        if len(values) != count:
            return Refusal(refuse, f"{name} has {len(values)} values, not {count}")
        if not all(math.isfinite(v) for v in values):
            return Refusal(refuse, f"{name} is not finite")
    if facts.image_position is not None and max(map(abs, facts.image_position)) > MAX_POSITION_MM:
        return Refusal(refuse, f"Image Position (Patient) beyond {MAX_POSITION_MM:g} mm")
    if facts.pixel_spacing is not None and not all(MIN_SPACING_MM <= v <= MAX_SPACING_MM
                                                   for v in facts.pixel_spacing):  # fmt: skip
        shown = ", ".join(f"{v:g}" for v in facts.pixel_spacing)
        return Refusal(refuse, f"Pixel Spacing ({shown}) mm is not physical")
    if facts.image_orientation is not None and not _orthonormal(facts.image_orientation):
        return Refusal(refuse, "Image Orientation (Patient) is not 2 orthogonal unit vectors")
    return None


def _orthonormal(cosines: tuple[float, ...]) -> bool:
    """Whether row and column direction cosines are unit vectors at a right angle (within rounding)."""
    row, column = cosines[:3], cosines[3:]
    unit = all(abs(math.hypot(*v) - 1.0) <= _COSINE_TOLERANCE for v in (row, column))
    return unit and abs(sum(a * b for a, b in zip(row, column, strict=True))) <= _COSINE_TOLERANCE


def _charset_problem(facts: InstanceFacts) -> Refusal | None:
    """Every Specific Character Set term one pydicom decodes (an empty first value is the default)."""
    for term in facts.specific_character_set or ():
        if term and pydicom_term(term) not in python_encoding:
            return Refusal(Status.CANNOT_UNDERSTAND, f"unknown Specific Character Set {_shown(term, 24)}")
    return None


def pydicom_term(term: str) -> str:
    """The defined term pydicom reads ``term`` as: it mends a wrong separator ("ISO IR 100"), with a warning."""
    if re.match(r"ISO[^_]IR", term):
        return "ISO_IR" + term[6:]
    if re.match(r"ISO.2022.IR.", term):
        return "ISO 2022 IR " + term[12:]
    return term
