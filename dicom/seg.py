"""Write DICOM Segmentation objects with highdicom.

The writer takes masks on the source grid (the :class:`Volume` returned by
:mod:`medsegagent.dicom.series`, i.e. slices in spatial order) and maps them
back onto the source instances' own frame order, so a SEG frame always
references the image it was computed on.

What every SEG carries (see ``docs/seg.md`` for a tag-by-tag example):

* one segment per requested target, described even when the ensemble found
  nothing (its Segment Description then says so);
* SNOMED CT category / type (+ laterality modifier) and a display colour;
* Segment Algorithm Type ``AUTOMATIC`` and an Algorithm Identification
  (name, family *Artificial Intelligence*, version) whose parameters list
  the models that voted on that segment with their ranks and weights;
* the IHE AI Results (AIR) Contributing Equipment item for the AI model
  (Purpose of Reference ``(Newcode1, 99IHE, "Processing Algorithm")``,
  Manufacturer, Model Name, Software Versions, Device UID), the Device UID
  being derived from the contributing models' names and versions / weight
  digests so that it changes whenever a model does;
* Series and Content Description with the request text and its source;
* ``ReferencedSeriesSequence`` to the source series.

SOP Instance and Series UIDs are derived from a stable key (job, source
series, output kind): writing the same result twice yields the same UIDs, so
a re-send to a PACS replaces rather than duplicates.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from medsegagent import __version__
from medsegagent.dicom.streamwrite import write_multiframe
from medsegagent.dicom.uids import derived_uid
from medsegagent.dicom.volume import Volume

log = logging.getLogger(__name__)

#: Manufacturer written into every object the node creates.
MANUFACTURER = "MedSegAgent"
#: Manufacturer's Model Name of the node (General Equipment module).
MODEL_NAME = "MedSegAgent node"

#: VR length limits (PS3.5 table 6.2-1) of the text attributes we fill.
LO_MAX = 64
ST_MAX = 1024
LT_MAX = 10240

#: IHE Radiology AI Results (AIR) profile: purpose of reference of the
#: Contributing Equipment item describing the AI model.  DICOM has not yet
#: assigned a DCM code for it, so IHE's placeholder code is used verbatim.
IHE_PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
#: Identification of the private ``99IHE`` coding scheme (PS3.3 C.12.1.1.4).
IHE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator="99IHE",
    name="IHE placeholder codes",
    responsible_organization="IHE International",
)

#: Segment Description (ST) written on segments the ensemble left empty.
EMPTY_SEGMENT_NOTE = "Empty: requested, but no voxel was assigned to this structure."


class SegType(enum.Enum):
    """Segmentation encodings the writer supports.

    ``BINARY`` (1 bit per pixel and segment, uncompressed) is the default:
    every SEG-capable viewer reads it.  ``LABELMAP`` (Label Map
    Segmentation Storage, RLE) is an order of magnitude smaller but newer;
    ``FRACTIONAL`` (8 bit probabilities) keeps the ensemble's soft scores.
    """

    BINARY = "BINARY"
    LABELMAP = "LABELMAP"
    FRACTIONAL = "FRACTIONAL"


def _check_text(what: str, value: str, limit: int, *, empty: bool = False, multi_value: bool = False) -> str:
    """Validate a text value for a DICOM string VR; return it unchanged."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{what} is {len(value)} characters; the DICOM limit is {limit}: {value[:40]!r}...")
    if not multi_value and "\\" in value:
        raise ValueError(f"{what} must not contain a backslash (the DICOM value delimiter): {value!r}")
    if any(ord(c) < 32 and c not in "\r\n\t" for c in value):
        raise ValueError(f"{what} contains control characters: {value!r}")
    return value


def _coded(value: hd.sr.CodedConcept | Code, what: str) -> hd.sr.CodedConcept:
    if isinstance(value, hd.sr.CodedConcept):
        return value
    if isinstance(value, Code):
        return hd.sr.CodedConcept.from_code(value)
    raise TypeError(f"{what} must be a highdicom CodedConcept or pydicom Code, got {type(value).__name__}")


@dataclass(frozen=True)
class ContributingModel:
    """A model that contributed to the result (provenance).

    Parameters
    ----------
    name : str
        Model name as in the registry (``demo_ct_abdomen``).
    version : str
        Its version, or a digest of its weights (:func:`model_fingerprint`),
        so that retrained weights under the same name count as a new model.

    Raises
    ------
    ValueError
        When either value is empty or is not a valid DICOM LO value.
    """

    name: str
    version: str

    def __post_init__(self) -> None:
        _check_text("ContributingModel.name", self.name, LO_MAX)
        _check_text("ContributingModel.version", self.version, LO_MAX)

    @classmethod
    def coerce(cls, value: ContributingModel | tuple[str, str]) -> ContributingModel:
        """Accept a :class:`ContributingModel` or a ``(name, version)`` pair."""
        if isinstance(value, ContributingModel):
            return value
        if isinstance(value, tuple | list) and len(value) == 2:
            return cls(str(value[0]), str(value[1]))
        raise TypeError(f"a contributing model is (name, version_or_hash), got {value!r}")

    @property
    def software_version(self) -> str:
        """``name version`` as one Software Versions value (LO, truncated)."""
        return truncate_text(f"{self.name} {self.version}")


@dataclass(frozen=True)
class SegmentMember:
    """One model's vote on one segment, for the segment's algorithm parameters.

    Parameters
    ----------
    model : str
        Model name.
    rank : int
        Rank of the model for this segment (1 = best; drives its weight).
    weight : float, optional
        Fusion weight the ensemble gave it (``None`` when dropped).
    """

    model: str
    rank: int
    weight: float | None = None

    def __post_init__(self) -> None:
        _check_text("SegmentMember.model", self.model, LO_MAX)
        if not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ValueError(f"SegmentMember.rank must be a positive int, got {self.rank!r}")
        if self.weight is not None and not (0.0 <= float(self.weight) <= 1.0):
            raise ValueError(f"SegmentMember.weight must be in [0, 1], got {self.weight!r}")

    def encode(self) -> str:
        """``model:rank1:w0.62`` (``:dropped`` when it had no weight)."""
        tail = f"w{float(self.weight):.2f}" if self.weight is not None else "dropped"
        return f"{self.model}:rank{int(self.rank)}:{tail}"


def members_from_ranks(ranks: Mapping[str, int], weights: Mapping[str, float]) -> tuple[SegmentMember, ...]:
    """The voters of one segment from the ensemble's decisions, best rank first.

    Parameters
    ----------
    ranks : mapping
        Model -> rank (1 = best) among all candidates of the target.
    weights : mapping
        Model -> normalised fusion weight of the members that were kept; a
        ranked model without a weight was dropped (empty or implausible).

    Returns
    -------
    tuple of SegmentMember
    """
    order = sorted(ranks, key=lambda name: (ranks[name], name))
    return tuple(SegmentMember(name, int(ranks[name]), weights.get(name)) for name in order)


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment is, independent of how it was computed.

    Parameters
    ----------
    label : str
        Segment Label (human name, e.g. ``liver``); truncated to 64 characters.
    category, type : highdicom.sr.CodedConcept or pydicom Code
        Segmented Property Category (CID 7150) and Type (SNOMED CT).
    type_modifier : highdicom.sr.CodedConcept, optional
        Laterality modifier when ``type`` is not lateral itself.
    color : tuple of int, optional
        Recommended display colour, sRGB 0-255.
    members : tuple of SegmentMember
        Models that voted on this segment (written into its Algorithm
        Identification parameters).
    note : str, optional
        A caution for readers (``models disagree (Dice 0.23)``), written as
        the Segment Description (cut to 64 characters, as a PACS shows it).

    Raises
    ------
    ValueError, TypeError
        On an empty label, a colour outside 0-255 or codes of the wrong type.
    """

    label: str
    category: hd.sr.CodedConcept
    type: hd.sr.CodedConcept
    type_modifier: hd.sr.CodedConcept | None = None
    color: tuple[int, int, int] | None = None
    members: tuple[SegmentMember, ...] = ()
    note: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label.strip():
            raise ValueError("SegmentSpec.label must be a non-empty str")
        object.__setattr__(self, "category", _coded(self.category, "SegmentSpec.category"))
        object.__setattr__(self, "type", _coded(self.type, "SegmentSpec.type"))
        if self.type_modifier is not None:
            object.__setattr__(self, "type_modifier", _coded(self.type_modifier, "SegmentSpec.type_modifier"))
        if self.color is not None:
            color = tuple(int(c) for c in self.color)
            if len(color) != 3 or not all(0 <= c <= 255 for c in color):
                raise ValueError(f"SegmentSpec.color must be three ints in 0..255, got {self.color!r}")
            object.__setattr__(self, "color", color)
        members = tuple(self.members)
        if not all(isinstance(m, SegmentMember) for m in members):
            raise TypeError("SegmentSpec.members must be SegmentMember objects")
        object.__setattr__(self, "members", members)


@dataclass(frozen=True)
class AlgorithmInfo:
    """Provenance written into every segment (Algorithm Identification).

    Parameters
    ----------
    name : str
        Algorithm Name (LO).
    version : str
        Algorithm Version (LO).
    parameters : dict
        Extra Algorithm Parameters (``key=value``, comma-joined into one LT
        value together with each segment's members).
    """

    name: str = "MedSegAgent rank-aware ensemble"
    version: str = __version__
    parameters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_text("AlgorithmInfo.name", self.name, LO_MAX)
        _check_text("AlgorithmInfo.version", self.version, LO_MAX)
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"algorithm parameters must map str to str, got {key!r}: {value!r}")


#: Laterality words of registry label names, and the one-letter forms some datasets use (``Eye_L``).
_SIDES = {"left": "left", "right": "right", "l": "left", "r": "right"}


def segment_label(name: str) -> str:
    """A registry label name as a radiologist writes it: ``kidney_right`` -> ``Kidney, right``.

    Underscores become spaces, the first letter is capitalised (other
    capitals, as in ``L1`` or ``GTVp``, are kept), a trailing side moves
    behind a comma (``rib_left_3`` -> ``Rib 3, left``) and ``vertebrae_L1``
    reads ``Vertebra L1``.  Names already written as phrases keep their
    words.  The codes, not this label, say what the segment is.
    """
    words = name.replace("_", " ").split()
    if not words:
        return name
    if words[0].lower() == "vertebrae" and len(words) > 1:
        words[0] = "vertebra"
    side = None
    # The side is the last word, or the last but one before a number (rib_left_3).
    for position in (-1, -2):
        trailing = position == -1 or words[-1].isdigit()
        if trailing and len(words) > -position and words[position].lower() in _SIDES:
            side = _SIDES[words.pop(position).lower()]
            break
    first = words[0]
    words[0] = first[:1].upper() + first[1:]
    return " ".join(words) + (f", {side}" if side else "")


def device_uid(models: Sequence[ContributingModel], algorithm: AlgorithmInfo | None = None) -> str:
    """Device UID of "this node running these models".

    Derived from the node's version, the algorithm name/version and every
    contributing model's name and version (order-independent): the UID is
    stable across jobs with the same models and changes when any model,
    its weights, or the node changes.
    """
    algorithm = algorithm or AlgorithmInfo()
    items = sorted(f"{m.name}={m.version}" for m in models)
    return derived_uid("device", MANUFACTURER, __version__, algorithm.name, algorithm.version, *items)


@lru_cache(maxsize=256)
def _fingerprint_cached(path: str, signature: tuple) -> str:
    # ``signature`` (every file's size and mtime) is only part of the cache key:
    # a rewritten weights file misses the cache and is hashed again.
    del signature
    digest = hashlib.sha256()
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def model_fingerprint(path: Path | str) -> str:
    """Digest of a model's weights (a file, or every file under a folder).

    The digest is cached per path and (size, mtime) of its files, so a node
    hashes each weights file once, not once per job.

    Parameters
    ----------
    path : Path or str
        Weights file or model folder.

    Returns
    -------
    str
        ``sha256:`` and the first 16 hex digits (fits a DICOM LO value).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    """
    root = Path(path).resolve()
    if not root.exists():
        raise FileNotFoundError(f"model weights not found: {root}")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    signature = tuple((str(p), *_stat(p)) for p in files)
    return _fingerprint_cached(str(root), signature)


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def truncate_text(text: str, limit: int = LO_MAX) -> str:
    """``text`` as one DICOM text value: whitespace collapsed, ``\\`` -> ``/``, cut to ``limit`` with ``...``."""
    text = " ".join(text.split()).replace("\\", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_source_datasets(volume: Volume, files: Sequence[Path]) -> list[Dataset]:
    """Headers of the source instances of ``volume`` (pixel data left on disk).

    Parameters
    ----------
    volume : Volume
        The volume the masks are on; its :attr:`~Volume.source_headers`
        are used when it has them (no file is parsed again).
    files : sequence of Path
        The files of its series, any order (read only without those headers).

    Returns
    -------
    list of Dataset
        In the order of ``volume.source_instances`` for single-frame sources,
        or the one multi-frame dataset.
    """
    headers = volume.source_headers or [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in headers}
    wanted = list(dict.fromkeys(uid for _, uid, _ in volume.source_instances))
    missing = [uid for uid in wanted if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instances of the volume are not among the files")
    return [by_uid[uid] for uid in wanted]


def segment_description(
    number: int,
    spec: SegmentSpec,
    algorithm: AlgorithmInfo,
    uid_key: str,
    *,
    empty: bool = False,
) -> hd.seg.SegmentDescription:
    """The Segment Sequence item of one segment.

    Parameters
    ----------
    number : int
        Segment Number (1-based).
    spec : SegmentSpec
        What the segment is.
    algorithm : AlgorithmInfo
        Ensemble identification; the segment's members are appended to its
        parameters as ``models=a:rank1:w0.62;b:rank2:w0.38``.
    uid_key : str
        Key from which the segment's Tracking UID is derived.
    empty : bool
        Whether the mask is empty (recorded in Segment Description).

    Returns
    -------
    highdicom.seg.SegmentDescription
    """
    parameters = dict(algorithm.parameters)
    if spec.members:
        parameters["models"] = ";".join(m.encode() for m in spec.members)
    encoded = ",".join(f"{k}={v}" for k, v in parameters.items())
    if len(encoded) > LT_MAX:
        # Algorithm Parameters is LT (10240 chars); keep the first (highest ranked) entries.
        log.warning("algorithm parameters of segment %s truncated from %d characters", spec.label, len(encoded))
        parameters = {"parameters": encoded[: LT_MAX - len("parameters=...")] + "..."}
    algo_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source=MANUFACTURER,
        parameters=parameters or None,
    )
    color = hd.color.CIELabColor.from_rgb(*spec.color) if spec.color else None
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=truncate_text(spec.label),
        segmented_property_category=spec.category,
        segmented_property_type=spec.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo_id,
        tracking_uid=derived_uid(uid_key, "segment", spec.label),
        tracking_id=truncate_text(spec.label),
        display_color=color,
    )
    if spec.type_modifier is not None:
        type_item = desc.SegmentedPropertyTypeCodeSequence[0]
        modifier = Dataset()
        modifier.CodeValue = spec.type_modifier.value
        modifier.CodingSchemeDesignator = spec.type_modifier.scheme_designator
        modifier.CodeMeaning = spec.type_modifier.meaning
        type_item.SegmentedPropertyTypeModifierCodeSequence = [modifier]
    if empty:
        desc.SegmentDescription = truncate_text(f"Empty: {spec.note}") if spec.note else EMPTY_SEGMENT_NOTE
    elif spec.note:
        desc.SegmentDescription = truncate_text(spec.note)
    return desc


def ai_model_equipment(
    models: Sequence[ContributingModel],
    algorithm: AlgorithmInfo,
    when: datetime | None = None,
) -> hd.ContributingEquipment:
    """The IHE AIR Contributing Equipment item describing the AI model.

    highdicom only accepts DCM purpose codes in its API, so the item is
    built as a "Processing Equipment" item and its Purpose of Reference is
    replaced by IHE's ``(Newcode1, 99IHE, "Processing Algorithm")``.  The
    Device UID in the item is what IHE AIR asks for; the SOP Common macro
    does not list it, so dciodvfy reports a Standard Extended SOP Class
    (a warning, see ``docs/seg.md``).

    Parameters
    ----------
    models : sequence of ContributingModel
        The models of this run (may be empty: the ensemble itself is still
        described).
    algorithm : AlgorithmInfo
        The ensemble's name and version (Manufacturer's Model Name).
    when : datetime, optional
        Contribution DateTime (default: now).

    Returns
    -------
    highdicom.ContributingEquipment
    """
    versions = [truncate_text(f"{MANUFACTURER} {__version__}")] + [m.software_version for m in models]
    names = ", ".join(f"{m.name} ({m.version})" for m in models) or "no model"
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=truncate_text(f"{algorithm.name} {algorithm.version}"),
        software_versions=versions,
        contribution_datetime=when or datetime.now(),
        contribution_description=truncate_text(f"AI segmentation by {algorithm.name}: {names}", ST_MAX),
    )
    item.PurposeOfReferenceCodeSequence = [IHE_PROCESSING_ALGORITHM]
    item.DeviceUID = device_uid(models, algorithm)
    return item


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
    models: Sequence[ContributingModel | tuple[str, str]] = (),
    caution: str | None = None,
) -> Dataset:
    """Encode ``masks`` as a DICOM SEG referencing the source series, and write it.

    Parameters
    ----------
    volume : Volume
        Source volume; masks are on its grid, slices in its order.
    source_datasets : sequence of Dataset
        The volume's source headers (:func:`load_source_datasets`): one SEG per source series.
    masks : numpy.ndarray
        The ensemble's label map ``(slices, rows, columns)``, values ``0..len(segments)``, or a stack
        ``(segments, slices, rows, columns)`` of binary masks (or, ``FRACTIONAL`` only, probabilities).
    segments : sequence of SegmentSpec
        One per segment, in segment-number order; an empty segment is still described.
    out_path : Path
        Where to write (through a temporary name).
    uid_key : str
        Stable key of the job; with the source series and ``seg_type`` it makes the UIDs.
    request_text, request_source : str
        The instruction and where it came from (Series / Content Description).
    algorithm : AlgorithmInfo, optional
        Ensemble identification; defaults to the ensemble's name and version.
    seg_type : SegType
        ``BINARY`` (default), ``LABELMAP`` (RLE) or ``FRACTIONAL``.
    series_number : int
        Series Number of the SEG series.
    models : sequence of ContributingModel or (name, version_or_hash)
        Models of the run: the IHE AIR Contributing Equipment item and the Device UID.
    caution : str, optional
        A warning (``MODELS DISAGREE``) that leads the Series Description in brackets.

    Returns
    -------
    pydicom.dataset.Dataset
        The SEG as written.

    Raises
    ------
    ValueError
        On masks off the volume or the segments, sources of another series, values the type cannot carry.
    """
    _check_arguments(segments, seg_type, uid_key, series_number)
    _check_sources(volume, source_datasets)
    algorithm = algorithm or AlgorithmInfo()
    pixel_array, present = _pixel_array(masks, len(segments), volume.geometry.shape, seg_type)
    pixel_array, sources = _to_source_frame_order(volume, source_datasets, pixel_array)
    key = f"{uid_key}|{volume.series_instance_uid}"
    descriptions = [
        segment_description(n, s, algorithm, key, empty=not present[n - 1]) for n, s in enumerate(segments, 1)
    ]
    now = datetime.now()
    equipment = ai_model_equipment([ContributingModel.coerce(m) for m in models], algorithm, now)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=seg_type.value,
        segment_descriptions=descriptions,
        omit_empty_frames=True,
        contributing_equipment=[equipment],
        **_seg_texts(request_text, request_source, caution),
        **_seg_header(key, seg_type, series_number, now),
    )
    _complete_header(seg, equipment)
    save_atomically(seg, out_path, write=write_multiframe)
    return seg


#: Transfer syntax per SEG type.  RLE keeps a label map small and stays readable
#: by dcmqi (JPEG-LS does not); BINARY stays uncompressed because a PACS that
#: transcodes 1-bit JPEG 2000 breaks it.
_TRANSFER_SYNTAX = {
    SegType.BINARY: ExplicitVRLittleEndian,
    SegType.LABELMAP: RLELossless,
    SegType.FRACTIONAL: ExplicitVRLittleEndian,
}


def _seg_header(key: str, seg_type: SegType, series_number: int, now: datetime) -> dict[str, Any]:
    """highdicom's keyword arguments for the SEG's identity, equipment, encoding and content time."""
    return {
        "series_instance_uid": derived_uid(key, "seg-series", seg_type.value),
        "series_number": series_number,
        "sop_instance_uid": derived_uid(key, "seg-instance", seg_type.value),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": __version__,
        "device_serial_number": "0",
        "transfer_syntax_uid": _TRANSFER_SYNTAX[seg_type],
        "coding_schemes": [IHE_CODING_SCHEME],
        "content_date": now.date(),
        "content_time": now.time(),
    }


def _check_arguments(segments: Sequence[SegmentSpec], seg_type: SegType, uid_key: str, series_number: int) -> None:
    """Refuse arguments of :func:`write_segmentation` that no SEG can carry."""
    if not segments:
        raise ValueError("a SEG needs at least one segment")
    if not all(isinstance(s, SegmentSpec) for s in segments):
        raise TypeError("segments must be SegmentSpec objects")
    if not isinstance(seg_type, SegType):
        raise TypeError(f"seg_type must be a SegType, got {seg_type!r}")
    _check_text("uid_key", uid_key, 10_000, multi_value=True)
    if not isinstance(series_number, int) or not 1 <= series_number < 2**31:
        raise ValueError(f"series_number must be a positive int (IS), got {series_number!r}")


def _seg_texts(request_text: str, request_source: str, caution: str | None) -> dict[str, str]:
    """Series Description, Content Description and Content Label of a SEG (highdicom's keywords)."""
    description = f"SEG {request_text}" if request_text else "MedSegAgent SEG"
    # The caution leads, in brackets: a PACS series list shows it before the text is cut at 64 characters.
    description = truncate_text(f"[{caution}] {description}" if caution else description)
    content = truncate_text(f"{request_source}: {request_text}" if request_source else request_text or "segmentation")
    return {"series_description": description, "content_description": content, "content_label": "SEGMENTATION"}


def _complete_header(seg: Dataset, equipment: hd.ContributingEquipment) -> None:
    """Attributes highdicom's constructor does not take."""
    # Content Creator's Name is type 2 in the Content Identification macro: an
    # automatic result has no human creator, so it is present and empty.
    seg.ContentCreatorName = ""
    # General Equipment: the device that made this SEG is "the node running these
    # models", so it gets the same Device UID as the IHE AIR item.
    seg.DeviceUID = equipment.DeviceUID
    # Series Date/Time are optional (type 3) but PACS browsers (Orthanc Explorer)
    # sort and label series by them; the series is created now, with its content.
    seg.SeriesDate = seg.ContentDate
    seg.SeriesTime = seg.ContentTime


def save_as_file(dataset: Dataset, path: Path) -> None:
    """pydicom's ``save_as`` in the DICOM File Format (preamble, File Meta Information)."""
    dataset.save_as(path, enforce_file_format=True)


def save_atomically(dataset: Dataset, out_path: Path, *, write: Callable[[Dataset, Path], None] = save_as_file) -> None:
    """Write ``dataset`` as a DICOM file under a temporary name, then rename it to ``out_path``.

    A reader (the dispatcher, a PACS poller) never sees a half-written file.

    Parameters
    ----------
    dataset : pydicom.dataset.Dataset
        The object to write, with its file meta information.
    out_path : Path
        Final name; its folder is created when missing.
    write : callable, optional
        ``write(dataset, path)``: :func:`save_as_file` (pydicom) by default,
        :func:`~medsegagent.dicom.streamwrite.write_multiframe` for a SEG.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: two writers of one path (a job re-run while its first run ends) never share it.
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        write(dataset, tmp)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_sources(volume: Volume, source_datasets: Sequence[Dataset]) -> None:
    if not source_datasets:
        raise ValueError("no source datasets: a SEG must reference the images it was computed on")
    series = {str(ds.SeriesInstanceUID) for ds in source_datasets}
    if series != {volume.series_instance_uid}:
        raise ValueError(
            f"source datasets belong to series {sorted(series)}, the volume to {volume.series_instance_uid}: "
            "write one SEG per source series"
        )
    have = {str(ds.SOPInstanceUID) for ds in source_datasets}
    missing = {uid for _, uid, _ in volume.source_instances} - have
    if missing:
        raise ValueError(f"{len(missing)} instances of the volume are missing from source_datasets")


def _pixel_array(
    masks: np.ndarray, n_segments: int, shape: tuple[int, int, int], seg_type: SegType
) -> tuple[np.ndarray, list[bool]]:
    """Validate ``masks``; return highdicom's input (in volume slice order) and which segments are non-empty.

    A label map stays a label map (highdicom's label-map style: one byte per
    voxel instead of one per voxel and segment), a stack becomes
    ``(slices, rows, columns, segments)``.
    """
    masks = np.asarray(masks)
    if masks.ndim == 3:
        if masks.shape != shape:
            raise ValueError(f"label map shape {masks.shape} does not match the volume {shape}")
        if not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == bool):
            raise ValueError(f"a label map must hold integers, got {masks.dtype}")
        low = int(masks.min()) if masks.dtype.kind == "i" else 0
        counts = label_counts(masks) if low >= 0 else np.zeros(0, np.int64)
        if low < 0 or len(counts) > n_segments + 1:
            high = int(masks.max())
            raise ValueError(f"label map values must be 0..{n_segments} (one per segment), got {low}..{high}")
        present = [bool(c) for c in np.pad(counts, (0, n_segments + 1 - len(counts)))[1:]]
        dtype = np.uint8 if n_segments < 256 else np.uint16
        return masks.astype(dtype, copy=False), present
    if masks.ndim != 4 or masks.shape[0] != n_segments or masks.shape[1:] != shape:
        raise ValueError(f"mask stack shape {masks.shape} does not match {n_segments} segments on {shape}")
    if np.issubdtype(masks.dtype, np.floating):
        if seg_type is not SegType.FRACTIONAL:
            raise ValueError(f"{seg_type.value} SEGs need binary masks; threshold the probabilities first")
        if not np.isfinite(masks).all() or masks.min() < 0.0 or masks.max() > 1.0:
            raise ValueError("probabilities must be finite and within [0, 1]")
        present = [bool(np.any(m > 0)) for m in masks]
        return np.moveaxis(masks.astype(np.float32, copy=False), 0, -1), present
    if masks.dtype != bool:
        if not np.issubdtype(masks.dtype, np.integer) or masks.min() < 0 or masks.max() > 1:
            raise ValueError("a mask stack must be binary (bool, or integers 0/1)")
        masks = masks.astype(bool)
    present = [bool(m.any()) for m in masks]
    if seg_type is SegType.LABELMAP:
        if (masks.sum(axis=0, dtype=np.uint16) > 1).any():
            raise ValueError("segments overlap: a LABELMAP SEG needs mutually exclusive masks")
        labels = np.zeros(shape, np.uint8 if n_segments < 256 else np.uint16)
        for number, mask in enumerate(masks, start=1):
            labels[mask] = number
        return labels, present
    return np.moveaxis(masks, 0, -1).view(np.uint8), present


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label value of a non-negative label map (index 0 is left at 0).

    Counted over the labelled voxels only: ``np.bincount`` casts its input to
    ``intp``, which for a whole 512 x 512 x 300 map would be a 600 MB copy
    and most of a second, while organs fill a few percent of a CT.  Slab by
    slab, so the mask of labelled voxels is a few MB, not one byte per voxel
    of the map (78 MB for that CT).
    """
    labels = np.asarray(labels)
    if labels.ndim == 0 or not labels.size:
        return np.zeros(1, np.int64)
    step = max(1, _SLAB_VOXELS // max(1, labels[0].size))
    counts = np.zeros(1, np.int64)
    for start in range(0, labels.shape[0], step):
        slab = labels[start : start + step]
        found = np.bincount(slab[slab > 0])
        counts = np.pad(counts, (0, max(0, found.size - counts.size)))
        counts[: found.size] += found
    counts[:1] = 0
    return counts


#: Voxels per slab of :func:`label_counts` (4 MB of mask).
_SLAB_VOXELS = 1 << 22


def _to_source_frame_order(
    volume: Volume, source_datasets: Sequence[Dataset], pixel_array: np.ndarray
) -> tuple[np.ndarray, list[Dataset]]:
    """Reorder slices (axis 0) so frames follow the sources' own order."""
    refs = volume.source_instances
    if refs and refs[0][2] is not None:
        # Multi-frame source: highdicom pairs frame i with frame i+1 of the source.
        order = np.argsort([frame for _, _, frame in refs])
        return pixel_array[order], list(source_datasets)
    # Single-frame: highdicom pairs frame i with source_images[i]; keep spatial order.
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    return pixel_array, [by_uid[uid] for _, uid, _ in refs]


def segment_specs_by_number(seg: Dataset) -> Mapping[int, Dataset]:
    """Segment Sequence items of ``seg`` by Segment Number (background 0 excluded)."""
    return {int(item.SegmentNumber): item for item in seg.SegmentSequence if int(item.SegmentNumber) > 0}
