"""``registry.d/totalsegmentator.yaml``, generated from the installed TotalSegmentator package.

Each TotalSegmentator task of :func:`~medsegagent.models.totalseg.catalogue`
becomes a registry dataset ``TotalSegmentator_<task>`` with one model
reference ``totalseg_<task>``; ``total`` and ``total_mr`` instead serve the
paper's datasets ``TotalSegmentator_v2`` and ``TotalSegmentator_MRI`` in
``registry.yaml`` (the registry schema keeps a dataset's model references
with the dataset, so those two references are written there by hand and
:func:`check` compares them with the generated ones).

Every class becomes a label with SNOMED CT codes from pydicom's DICOM code
tables, looked up in this order:

1. :data:`CONCEPTS`, a reviewed table for the classes the steps below get
   wrong or cannot place (each entry names a code value; its meaning is
   pydicom's);
2. permanent teeth by FDI number (``..._fdi11`` .. ``_fdi48``) -> the tooth's
   code of DICOM CID 4018;
3. a label of the hand-written ``registry.yaml`` with the class's name (so
   that ``total_v3`` codes a structure as ``TotalSegmentator_v2`` does, and
   the ensemble sees one structure);
4. TotalSegmentator's own ``resources/totalsegmentator_snomed_mapping.csv``,
   where its code is in pydicom's tables (its category "Anatomical Structure"
   is ``123037004``, which DICOM's segmentation categories, CID 7150, spell
   ``91723000``);
5. a DICOM concept whose meaning is the class's name.

``left``/``right`` as a word of a class name gives the label's laterality
and the type modifier Left/Right (the lookups above use the name without
it), except where the code names the side ("Left atrium"; heart chambers are
not lateral, as in ``registry.yaml``).  A class none of them places stops
the generation with its name, to be added to :data:`CONCEPTS`.  Kinds,
synonyms, volumes and colours come from the ``registry.yaml`` label of the
same name and TotalSegmentator's colours where there are some, else from the
table and the code's meaning.
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from medsegagent.models.registry import LabelKind, Laterality, _category_codes
from medsegagent.models.totalseg import LICENCE_ENV, LICENCE_NAME, LICENCE_URL, Task, catalogue, package_version

__all__ = [
    "ATTACHED",
    "CONCEPTS",
    "ClassCoding",
    "attached_refs",
    "check",
    "code_class",
    "default_registry_file",
    "generated_file",
    "render",
]

#: Tasks that serve datasets of ``registry.yaml`` instead of getting their own.
ATTACHED: Mapping[str, str] = {"total": "TotalSegmentator_v2", "total_mr": "TotalSegmentator_MRI"}
#: Registry location of every task: TotalSegmentator's home in the node's models folder.
LOCATION = "${MEDSEG_MODELS}/totalsegmentator"
HOMEPAGE = "https://github.com/wasserth/TotalSegmentator"
OPEN_LICENCE = {"name": "Apache-2.0", "url": f"{HOMEPAGE}/blob/master/LICENSE"}
COLLECTION = "totalsegmentator"

_ANATOMY = ("SCT", "91723000")
_ABNORMAL = ("SCT", "49755003")
_LEFT, _RIGHT = ("SCT", "7771000"), ("SCT", "24028007")


@dataclass(frozen=True)
class Concept:
    """A reviewed code for a class.

    Attributes
    ----------
    code : str
        SNOMED CT code value (its meaning comes from pydicom's tables).
    kind : LabelKind or None
        The label's kind where the meaning does not say it.
    closest : bool
        DICOM has no code for the structure itself; ``code`` is the nearest broader one.
    category : str or None
        Segmentation property category (CID 7150) when not the kind's (devices: Physical object).
    """

    code: str
    kind: LabelKind | None = None
    closest: bool = False
    category: str | None = None


_ORGAN, _LESION, _VESSEL, _BONE, _MUSCLE, _CAVITY, _OTHER = (
    LabelKind.ORGAN,
    LabelKind.LESION,
    LabelKind.VESSEL,
    LabelKind.BONE,
    LabelKind.MUSCLE,
    LabelKind.CAVITY,
    LabelKind.OTHER,
)
_HEAD_MUSCLE, _NECK_MUSCLE, _ARM_MUSCLE = "22688005", "81727001", "30608006"
_LEG_MUSCLE, _WALL_MUSCLE, _SKELETAL_MUSCLE = "102292000", "1142228004", "127954009"
_DEVICE, _TISSUE = "260787004", "85756007"  # Physical object, Tissue
#: Couinaud hepatic segments I..VIII.
_COUINAUD = ("71133005", "277956007", "277957003", "277958008", "277959000", "277960005", "277961009", "277962002")

#: Reviewed codes for the classes the other sources miss or get wrong, by class name (full, else without its
#: side word).  ``closest`` entries use the nearest broader concept DICOM has: labels of one request that share
#: a code and side are fused as one structure by the pipeline.
CONCEPTS: Mapping[str, Concept] = {
    # cavities and spaces
    "abdominal_cavity": Concept("52731004", _CAVITY),
    "thoracic_cavity": Concept("43799004", _CAVITY),
    "larynx_air": Concept("4596009", _CAVITY, closest=True),
    "auditory_canal": Concept("84301002", _CAVITY),
    "sinus_frontal": Concept("55060009", _CAVITY),
    "sinus_maxillary": Concept("15924003", _CAVITY),
    "ventricle": Concept("35764002", _CAVITY),  # brain_structures: the brain's ventricles, not the heart's
    "ventricle_frontal_horn": Concept("30399003", _CAVITY),
    "ventricle_occipital_horn": Concept("52943005", _CAVITY),
    "ventricle_temporal_horn": Concept("53118009", _CAVITY),
    "ventricle_body": Concept("66720007", _CAVITY, closest=True),
    "ventricle_trigone": Concept("66720007", _CAVITY, closest=True),
    "septum_pellucidum": Concept("74968005", _OTHER, closest=True),
    # brain
    "brainstem": Concept("119238007"),
    "insular_cortex": Concept("36169008"),
    "lentiform_nucleus": Concept("89278009", closest=True),
    "central_sulcus": Concept("40146001", _OTHER, closest=True),
    "venous_sinuses": Concept("34340008", _VESSEL, closest=True),
    # heart and great vessels
    "heart_myocardium": Concept("49848007", _MUSCLE),
    "left_ventricular_outflow_tract": Concept("13418002", _CAVITY),
    "left_coronary_cusp": Concept("36371001", _OTHER, closest=True),
    "right_coronary_cusp": Concept("89093001", _OTHER, closest=True),
    "non_coronary_cusp": Concept("24865005", _OTHER, closest=True),
    "annulus": Concept("77583004", _OTHER),  # pulmonary_artery_landmarks: the aortic annulus
    "annulus_proper": Concept("77583004", _OTHER),
    "sinotubular_junction": Concept("443167003", _OTHER),
    "pul_annulus": Concept("305437000", _OTHER, closest=True),
    "pul_sinotubular_junction": Concept("45341000", _VESSEL, closest=True),
    "pul_bifurcation": Concept("371894001", _OTHER, closest=True),
    "pul_left_start": Concept("50408007", _VESSEL),
    "pul_right_start": Concept("78480002", _VESSEL),
    "aorta_true_lumen": Concept("15825003", _VESSEL, closest=True),
    "aorta_false_lumen": Concept("308546005", _LESION, closest=True),
    "celiac_trunk": Concept("57850000", _VESSEL),
    # lungs and airways
    "lung_airways": Concept("89187006", _CAVITY),
    "lung_airways_wall": Concept("955009", _OTHER, closest=True),
    "lung_arteries": Concept("81040000", _VESSEL),
    "lung_veins": Concept("122972007", _VESSEL),
    "lung_nodules": Concept("27925004", _LESION),
    # abdomen
    "liver_lesions": Concept("52988006", _LESION),
    **{f"liver_segment_{n}": Concept(code) for n, code in enumerate(_COUINAUD, 1)},
    # head and neck
    "eye_lens": Concept("78076003"),
    "hard_palate": Concept("70925003", _BONE, closest=True),
    "cricoid_cartilage": Concept("309312004", _OTHER, closest=True),
    "thyroid_cartilage": Concept("309312004", _OTHER, closest=True),
    "styloid_process": Concept("60911003", _BONE, closest=True),
    "zygomatic_arch": Concept("13881006", _BONE, closest=True),
    # jaws and teeth (teeth by FDI number are looked up in CID 4018)
    "lower_jawbone": Concept("91609006", _BONE),
    "upper_jawbone": Concept("70925003", _BONE),
    "teeth_lower": Concept("88176008", _OTHER),
    "teeth_upper": Concept("39481002", _OTHER),
    "inferior_alveolar_canal": Concept("38754007", _CAVITY, closest=True),
    "mandibular_incisive_canal": Concept("38754007", _CAVITY, closest=True),
    "lingual_canal": Concept("38754007", _CAVITY, closest=True),
    "bridge": Concept("27606000", _OTHER, closest=True, category=_DEVICE),
    "crown": Concept("27606000", _OTHER, closest=True, category=_DEVICE),
    "implant": Concept("40388003", _OTHER, category=_DEVICE),
    "mandible": Concept("91609006", _BONE),
    "head": Concept("69536005", _OTHER),
    # bones and tissues
    "carpal": Concept("8205005", _BONE),
    "metatarsal": Concept("280711000", _BONE),
    "phalanges_feet": Concept("29707007", _BONE, closest=True),
    "phalanges_hand": Concept("7569003", _BONE, closest=True),
    "vertebrae_body": Concept("51282000", _BONE, closest=True),
    "vertebrae_L6": Concept("122496007", _BONE, closest=True),  # a lumbosacral transitional vertebra
    "subcutaneous_fat": Concept("71966008", _OTHER, category=_TISSUE),
    "intermuscular_fat": Concept("55603005", _OTHER, closest=True, category=_TISSUE),
    "brain_aneurysm": Concept("85659009", _LESION),
    # muscles DICOM has no code for: the muscles of their region
    **dict.fromkeys(
        (
            "masseter",
            "temporalis",
            "lateral_pterygoid",
            "medial_pterygoid",
            "levator_palpebrae_superioris",
            "superior_rectus_muscle",
            "inferior_rectus_muscle",
            "medial_rectus_muscle",
            "lateral_rectus_muscle",
            "superior_oblique_muscle",
            "inferior_oblique_muscle",
        ),
        Concept(_HEAD_MUSCLE, _MUSCLE, closest=True),
    ),
    **dict.fromkeys(
        (
            "digastric",
            "anterior_scalene",
            "middle_scalene",
            "posterior_scalene",
            "levator_scapulae",
            "platysma",
            "prevertebral",
            "sterno_thyroid",
            "thyrohyoid",
            "superior_pharyngeal_constrictor",
            "middle_pharyngeal_constrictor",
            "inferior_pharyngeal_constrictor",
        ),
        Concept(_NECK_MUSCLE, _MUSCLE, closest=True),
    ),
    **dict.fromkeys(("coracobrachial", "triceps_brachii"), Concept(_ARM_MUSCLE, _MUSCLE, closest=True)),
    **dict.fromkeys(
        ("external_oblique", "internal_oblique", "rectus_abdominis", "quadratus_lumborum"),
        Concept(_WALL_MUSCLE, _MUSCLE, closest=True),
    ),
    "psoas_major": Concept(_LEG_MUSCLE, _MUSCLE, closest=True),
    "transversospinalis": Concept(_SKELETAL_MUSCLE, _MUSCLE, closest=True),
}

# --------------------------------------------------------------------------- sources


@lru_cache(maxsize=1)
def _dicom() -> tuple[dict[str, dict[str, frozenset[int]]], dict[str, list[str]]]:
    """pydicom's SCT table: value -> {meaning: CIDs}, and lower-case meaning -> values."""
    from pydicom.sr._concepts_dict import concepts

    by_value: dict[str, dict[str, frozenset[int]]] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, cids) in entries.items():
            by_value.setdefault(str(value), {})[meaning] = frozenset(cids)
    by_meaning: dict[str, list[str]] = {}
    for value, meanings in sorted(by_value.items()):
        for meaning in meanings:
            by_meaning.setdefault(meaning.lower(), []).append(value)
    return by_value, by_meaning


def _meaning(value: str, preferred: str | None = None) -> str:
    """The DICOM meaning of an SCT code: ``preferred`` if the tables have it, else the plainest one."""
    meanings = _dicom()[0][value]
    if preferred in meanings:
        return preferred
    # "Small intestine" before "Small intestinal structure (body structure)".
    return sorted(meanings, key=lambda m: (m.endswith(")"), len(m), m))[0]


def _code(value: str, preferred: str | None = None) -> list[str]:
    return ["SCT", value, _meaning(value, preferred)]


@lru_cache(maxsize=1)
def _csv() -> dict[str, dict[str, str]]:
    """TotalSegmentator's SNOMED CT mapping, by structure name."""
    path = files("totalsegmentator") / "resources" / "totalsegmentator_snomed_mapping.csv"
    with path.open(newline="") as handle:
        return {row["Structure"]: row for row in csv.DictReader(handle)}


def default_registry_file() -> Path:
    """The hand-written ``registry.yaml`` (the real file behind the packaged link)."""
    from medsegagent import registry_path

    return Path(registry_path()).resolve()


def generated_file(registry_file: Path) -> Path:
    """Where the generated file lives beside ``registry_file``."""
    return Path(registry_file).resolve().parent / "registry.d" / "totalsegmentator.yaml"


def _curated_labels(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The labels of the hand-written ``registry.yaml`` (parsed; demo datasets aside), by name: first one wins."""
    out: dict[str, dict[str, Any]] = {}
    for dataset in (doc.get("datasets") or {}).values():
        if "demo" not in dataset.get("collections", []):
            for name, label in (dataset.get("labels") or {}).items():
                out.setdefault(name, label)
    return out


# --------------------------------------------------------------------------- one class


@dataclass(frozen=True)
class ClassCoding:
    """A TotalSegmentator class as a registry label (the fields of a label entry, plus where they came from).

    Attributes
    ----------
    name : str
        The class name (the label's name).
    category, type : list of str
        ``[scheme, value, meaning]``.
    modifier : list of str or None
        Left/Right.
    laterality : Laterality or None
        From the name.
    kind : LabelKind
        Organ, lesion, ...
    source : str
        Which lookup placed the code (``table``, ``fdi``, ``csv``, ``registry``, ``meaning``).
    closest : bool
        The type is a broader concept than the class.
    synonyms : tuple of str
        Lower-case words for the router.
    color : tuple of int or None
        TotalSegmentator's colour, or the same structure's in ``registry.yaml``.
    volume_ml : list of float or None
        From ``registry.yaml``'s label of the same structure and side.
    """

    name: str
    category: list[str]
    type: list[str]
    modifier: list[str] | None
    laterality: Laterality | None
    kind: LabelKind
    source: str
    closest: bool = False
    synonyms: tuple[str, ...] = ()
    color: tuple[int, int, int] | None = None
    volume_ml: list[float] | None = field(default=None)


_SIDE_RE = re.compile(r"(?:^|_)(left|right)(?=_|$)")
_SIDE_WORD_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
#: Atria, ventricles and their outflow tracts: named left and right, not a side of the body.
_HEART_CHAMBERS = frozenset({"82471001", "73829009", "87878005", "53085002", "13418002", "44627009"})
_FDI_RE = re.compile(r"_fdi(1?)([1-4])([1-8])$")  # fdi11..48 a tooth; fdi111..148 its pulp
_FDI_JAW = {
    "1": ("maxillary", "right"),
    "2": ("maxillary", "left"),
    "3": ("mandibular", "left"),
    "4": ("mandibular", "right"),
}
_FDI_TOOTH = {
    "1": "central incisor",
    "2": "lateral",  # CID 4018 spells one lateral incisor "Mandibular left lateral tooth"
    "3": "canine",
    "4": "first premolar",
    "5": "second premolar",
    "6": "first molar",
    "7": "second molar",
    "8": "third molar",
}


def _split_side(name: str) -> tuple[str, Laterality | None]:
    """``kidney_cyst_left`` -> (``kidney_cyst``, left); names without a side word are returned as they are."""
    match = _SIDE_RE.search(name)
    if match is None:
        return name, None
    base = "_".join(p for p in (name[: match.start()], name[match.end() :]) if p.strip("_"))
    return base.replace("__", "_").strip("_"), Laterality(match.group(1))


def _tooth(name: str) -> tuple[str, bool] | None:
    """(code, is the pulp) of ``..._fdiQN`` (a permanent tooth of DICOM CID 4018) or ``..._fdi1QN`` (its pulp)."""
    match = _FDI_RE.search(name)
    if match is None:
        return None
    jaw, side = _FDI_JAW[match.group(2)]
    words = (jaw, side, _FDI_TOOTH[match.group(3)])
    found = [
        value
        for value, meanings in _dicom()[0].items()
        for meaning, cids in meanings.items()
        if 4018 in cids and all(w in meaning.lower() for w in words)
    ]
    return (found[0], bool(match.group(1))) if len(found) == 1 else None


def _from_csv(name: str) -> tuple[list[str], list[str], list[str] | None, tuple[int, ...] | None] | None:
    """(category, type, modifier, colour) from TotalSegmentator's CSV, where its type code is a DICOM code."""
    row = _csv().get(name)
    if row is None:
        return None
    value = row["SegmentedPropertyTypeCodeSequence.CodeValue"]
    if value not in _dicom()[0]:
        return None
    category = _category_of_csv(row["SegmentedPropertyCategoryCodeSequence.CodeValue"])
    modifier_value = row["SegmentedPropertyTypeModifierCodeSequence.CodeValue"]
    modifier = _code(modifier_value) if modifier_value in (_LEFT[1], _RIGHT[1]) else None
    rgb = tuple(int(c) for c in row["DicomRGBColor"].split(",")) if row["DicomRGBColor"] else None
    type_meaning = row["SegmentedPropertyTypeCodeSequence.CodeMeaning"]
    return _code(category), _code(value, type_meaning), modifier, rgb


def _category_of_csv(value: str) -> str:
    """A CSV category as a DICOM segmentation category (CID 7150); else Anatomical Structure (its ``123037004``)."""
    return value if ("SCT", value) in _category_codes() else _ANATOMY[1]


def _by_meaning(base: str) -> str | None:
    """A DICOM code whose meaning is the class name (``deltoid`` -> "Deltoid muscle", ``renal_arteries`` -> ...)."""
    words = base.replace("_", " ").lower()
    singular = re.sub(r"ies$", "y", words) if words.endswith("ies") else words.removesuffix("s")
    for text in dict.fromkeys((words, singular, f"{words} muscle", f"{words} bone")):
        values = _dicom()[1].get(text)
        if values:
            return values[0]
    return None


@dataclass(frozen=True)
class _Placed:
    """Where one lookup placed a class: source, type code, and what else that source knows."""

    source: str
    type: list[str]
    side: Laterality | None
    modifier: list[str] | None
    category: list[str] | None = None
    rgb: tuple[int, ...] | None = None
    concept: Concept | None = None


def _place(name: str, curated: Mapping[str, Mapping[str, Any]]) -> _Placed:
    """The first source (see the module docstring) that has a code for ``name``."""
    base, side = _split_side(name)
    side_code = _code((_LEFT if side is Laterality.LEFT else _RIGHT)[1]) if side else None
    stem = re.sub(r"_fdi\d+$", "", base)
    label = curated.get(name)
    concept = CONCEPTS.get(name) or CONCEPTS.get(base) or CONCEPTS.get(stem)
    tooth = _tooth(name)
    from_csv = _from_csv(name) or _from_csv(base)
    if concept is not None:
        category = _code(concept.category) if concept.category else None
        placed = _Placed("table", _code(concept.code), side, side_code, category, concept=concept)
    elif tooth is not None:
        placed = _Placed("fdi", _code(tooth[0]), side, side_code, concept=Concept(tooth[0], _OTHER, closest=tooth[1]))
    elif label is not None:  # as written by hand, side included: datasets that share a structure share its code
        modifier = [str(x) for x in label["type_modifier"]] if label.get("type_modifier") else None
        side = Laterality(label["laterality"]) if label.get("laterality") else None
        return _Placed("registry", [str(x) for x in label["type"]], side, modifier, [str(x) for x in label["category"]])
    elif from_csv is not None:
        category, type_, modifier, rgb = from_csv
        placed = _Placed("csv", type_, side, modifier or side_code, category, rgb)
    else:
        value = _by_meaning(base)
        if value is None:
            raise LookupError(f"no SNOMED CT code for TotalSegmentator class {name!r}: add it to CONCEPTS")
        placed = _Placed("meaning", _code(value), side, side_code)
    if side is not None and _SIDE_WORD_RE.search(placed.type[2]):
        # The code is the side ("Left atrium", "Mandibular left canine tooth"): no modifier, as registry.yaml
        # writes them; heart chambers are not lateral at all.
        side = None if placed.type[1] in _HEART_CHAMBERS else side
        placed = dataclasses.replace(placed, side=side, modifier=None)
    return placed


def code_class(name: str, curated: Mapping[str, Mapping[str, Any]]) -> ClassCoding:
    """One TotalSegmentator class as a registry label.

    Parameters
    ----------
    name : str
        The class name.
    curated : dict
        The labels of ``registry.yaml`` by name (:func:`_curated_labels`).

    Raises
    ------
    LookupError
        When no source has a code for it.
    """
    placed = _place(name, curated)
    same = curated.get(name, {})  # the same structure, hand-written: its kind, synonyms, colour, volume
    kind = _kind(name, placed, same)
    category = placed.category
    if category is None or kind is LabelKind.LESION:
        category = _code((_ABNORMAL if kind is LabelKind.LESION else _ANATOMY)[1])
    words = name.replace("_", " ")
    # General synonyms live in the lexicon (models/lexicon.yaml, by the label's SNOMED CT type); a curated
    # label of the same name may add its dataset's own reading.
    synonyms = list(same.get("synonyms", ()))
    return ClassCoding(
        name=name,
        category=category,
        type=placed.type,
        modifier=placed.modifier,
        laterality=placed.side,
        kind=kind,
        source=placed.source,
        closest=bool(placed.concept and placed.concept.closest),
        synonyms=tuple(s for s in dict.fromkeys(synonyms) if s != words),
        color=placed.rgb or (tuple(same["color"]) if "color" in same else None),  # type: ignore[arg-type]
        volume_ml=same.get("volume_ml"),
    )


_KIND_WORDS: tuple[tuple[LabelKind, tuple[str, ...]], ...] = (
    (LabelKind.MUSCLE, ("muscle",)),
    (LabelKind.VESSEL, ("artery", "arteries", "vein", "aorta", "vena cava", "vessel", "venous sinus", "trunk")),
    (LabelKind.BONE, ("bone", "vertebra", "rib", "skull", "sacrum", "femur", "humerus", "scapula", "clavicle")),
    (LabelKind.CAVITY, ("cavity", "sinus", "ventricle", "canal", "space")),
)


def _kind(name: str, placed: _Placed, same: Mapping[str, Any]) -> LabelKind:
    """The label's kind: reviewed, else TotalSegmentator's category, else ``registry.yaml``'s, else the words."""
    if placed.concept is not None and placed.concept.kind is not None:
        return placed.concept.kind
    if placed.category is not None and placed.category[1] == _ABNORMAL[1]:
        return LabelKind.LESION
    if same.get("kind"):
        return LabelKind(same["kind"])
    text = f"{name.replace('_', ' ')} {placed.type[2]}".lower()
    for kind, words in _KIND_WORDS:
        if any(w in text for w in words):
            return kind
    return LabelKind.ORGAN


# --------------------------------------------------------------------------- datasets and model references

#: Body regions of each task (the package does not say; reviewed by hand, a new task stops the generation).
REGIONS: Mapping[str, tuple[str, ...]] = {
    "total_v3": ("head", "neck", "thorax", "heart", "abdomen", "pelvis", "spine", "upper_limb", "lower_limb"),
    "body": ("whole_body",),
    "body_mr": ("whole_body",),
    "vertebrae_mr": ("spine",),
    "lung_vessels": ("thorax",),
    "lung_vessels_LEGACY": ("thorax",),
    "cerebral_bleed": ("head",),
    "hip_implant": ("pelvis",),
    "coronary_arteries": ("heart",),
    "coronary_arteries_LEGACY": ("heart",),
    "pleural_pericard_effusion": ("thorax", "heart"),
    "appendicular_bones": ("upper_limb", "lower_limb"),
    "appendicular_bones_mr": ("upper_limb", "lower_limb"),
    "tissue_types": ("whole_body",),
    "heartchambers_highres": ("heart",),
    "face": ("head",),
    "vertebrae_body": ("spine",),
    "vertebrae_pp": ("spine",),
    "vertebrae_pp_refined": ("spine",),
    "tissue_types_mr": ("whole_body",),
    "tissue_4_types": ("whole_body",),
    "face_mr": ("head",),
    "head_glands_cavities": ("head",),
    "head_muscles": ("head",),
    "headneck_bones_vessels": ("head", "neck"),
    "headneck_muscles": ("head", "neck"),
    "brain_structures": ("head",),
    "liver_vessels": ("abdomen",),
    "liver_lesions": ("abdomen",),
    "liver_lesions_mr": ("abdomen",),
    "oculomotor_muscles": ("head",),
    "thigh_shoulder_muscles": ("upper_limb", "lower_limb"),
    "thigh_shoulder_muscles_mr": ("upper_limb", "lower_limb"),
    "lung_nodules": ("thorax",),
    "kidney_cysts": ("abdomen",),
    "breasts": ("breast",),
    "ventricle_parts": ("head",),
    "aortic_sinuses": ("heart",),
    "liver_segments": ("abdomen",),
    "liver_segments_mr": ("abdomen",),
    "craniofacial_structures": ("head",),
    "abdominal_muscles": ("thorax", "abdomen"),
    "teeth": ("head",),
    "trunk_cavities": ("thorax", "abdomen"),
    "brain_aneurysm": ("head",),
    "renal_arteries": ("abdomen",),
    "aorta_annulus": ("heart",),
    "aortic_dissection": ("thorax", "abdomen"),
    "pulmonary_artery_landmarks": ("heart", "thorax"),
}


def dataset_name(task: str) -> str:
    """The registry dataset a task serves."""
    return ATTACHED.get(task, f"TotalSegmentator_{task}")


def model_name(task: str) -> str:
    """The registry model reference of a task."""
    return f"totalseg_{task}"


def model_ref(task: Task, *, class_names: Mapping[str, str] | None = None, serves: list[str] | None = None) -> dict:
    """A task's model reference, as the registry writes it."""
    options: dict[str, Any] = {"task": task.name, "weights": list(task.weights)}
    if class_names:
        options["class_names"] = dict(class_names)
    licence = {"name": LICENCE_NAME, "url": LICENCE_URL, "gated": True} if task.gated else dict(OPEN_LICENCE)
    ref: dict[str, Any] = {"name": model_name(task.name), "backend": "totalsegmentator", "location": LOCATION}
    if serves is not None:
        ref["serves"] = serves
    ref |= {"options": options, "source": {"kind": "totalsegmentator", "homepage": HOMEPAGE}, "licence": licence}
    return ref


def install_hint(task: Task) -> str:
    """How an operator gets the task's weights."""
    install = f"`medsegagent models install {model_name(task.name)}` (TotalSegmentator's downloader)"
    if task.gated:
        return f"licence-gated: get a licence number at {LICENCE_URL}, set {LICENCE_ENV}, then {install}"
    return install


def _colours(codings: list[ClassCoding]) -> list[list[int]]:
    """One distinct colour per label: TotalSegmentator's (or the registry's), else one made from the name."""
    used: set[tuple[int, int, int]] = set()
    out = []
    for coding in codings:
        colour = coding.color
        step = 0
        while colour is None or colour in used:
            digest = hashlib.sha256(f"{coding.name}:{step}".encode()).digest()
            r, g, b = colorsys.hsv_to_rgb(digest[0] / 255, 0.45 + digest[1] / 1020, 0.6 + digest[2] / 1020)
            colour, step = (round(r * 255), round(g * 255), round(b * 255)), step + 1
        used.add(colour)
        out.append(list(colour))
    return out


def _label(coding: ClassCoding, value: int, colour: list[int]) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": value, "kind": coding.kind.value}
    if coding.laterality is not None:
        entry["laterality"] = coding.laterality.value
    if coding.synonyms:
        entry["synonyms"] = list(coding.synonyms)
    entry["category"], entry["type"] = coding.category, coding.type
    if coding.modifier is not None:
        entry["type_modifier"] = coding.modifier
    entry["color"] = colour
    if coding.volume_ml is not None:
        entry["volume_ml"] = coding.volume_ml
    return entry


def dataset_entry(task: Task, curated: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The registry dataset of a task that has none in ``registry.yaml``."""
    if task.name not in REGIONS:
        raise LookupError(f"TotalSegmentator task {task.name!r} is new: add its body regions to REGIONS")
    codings = [code_class(name, curated) for name in task.classes.values()]
    labels = {
        coding.name: _label(coding, value, colour)
        for (value, coding), colour in zip(zip(task.classes, codings, strict=True), _colours(codings), strict=True)
    }
    kind = "licence-gated " if task.gated else ""
    return {
        "description": f"TotalSegmentator {kind}task {task.name}: {len(labels)} classes on {task.modality}",
        "collections": [COLLECTION],
        "modalities": [task.modality],
        "inputs": [{"channel": 0, "modality": task.modality}],
        "regions": list(REGIONS[task.name]),
        "labels": labels,
        "models": [model_ref(task)],
        "install_hint": install_hint(task),
    }


def _words(name: str) -> frozenset[str]:
    return frozenset(name.lower().split("_")) - {"muscle"}


def attached_refs(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The model references of ``total`` and ``total_mr``, by the dataset of ``registry.yaml`` (parsed) they serve.

    A registry label is served by the class of the same name, else by the one
    class with its SNOMED CT type and side (several: the one whose name has
    the same words, "muscle" aside); labels no class serves are left out of
    ``serves``, and differing names go to ``options.class_names``.
    """
    curated = _curated_labels(doc)
    tasks = catalogue()
    out = {}
    for task_name, dataset in ATTACHED.items():
        task = tasks[task_name]
        by_concept: dict[tuple[str, str | None], list[str]] = {}
        for name in task.classes.values():
            coding = code_class(name, curated)
            by_concept.setdefault((coding.type[1], coding.modifier[1] if coding.modifier else None), []).append(name)
        class_names: dict[str, str] = {}
        serves: list[str] = []
        for label_name, label in doc["datasets"][dataset]["labels"].items():
            if label_name in task.classes.values():
                serves.append(label_name)
                continue
            modifier = label.get("type_modifier")
            found = by_concept.get((str(label["type"][1]), str(modifier[1]) if modifier else None), [])
            if len(found) > 1:
                found = [n for n in found if _words(n) == _words(label_name)]
            if len(found) == 1:
                serves.append(label_name)
                class_names[label_name] = found[0]
        every = len(serves) == len(doc["datasets"][dataset]["labels"])
        out[dataset] = model_ref(task, class_names=class_names, serves=None if every else serves)
    return out


HEADER = """\
# GENERATED FILE: DO NOT EDIT. Regenerate with `python -m medsegagent.models.totalseg generate`.
#
# TotalSegmentator {version} tasks as registry datasets (collection `{collection}`), one model reference
# each, read from the installed package: task list, classes, modality and licence flag
# (totalsegmentator.registry), the nnU-Net models each task runs (totalsegmentator.map_tasks_config).
# Codes: medsegagent.models.totalseg_registry (TotalSegmentator's SNOMED CT mapping where pydicom's
# DICOM tables have the code, else a reviewed table). `total` and `total_mr` serve TotalSegmentator_v2
# and TotalSegmentator_MRI in registry.yaml (their references are written there and checked against
# this generator by tests/test_totalsegmentator.py).
"""


def render(doc: Mapping[str, Any]) -> str:
    """The text of ``registry.d/totalsegmentator.yaml``, from ``registry.yaml`` (parsed)."""
    curated = _curated_labels(doc)
    datasets = {
        dataset_name(task.name): dataset_entry(task, curated)
        for task in catalogue().values()
        if task.name not in ATTACHED
    }
    body = yaml.safe_dump(
        {"schema_version": 1, "datasets": datasets}, sort_keys=False, default_flow_style=None, width=120
    )
    return HEADER.format(version=package_version(), collection=COLLECTION) + body


def check(registry_file: Path, *, write: bool = False) -> list[str]:
    """Compare the registry with a fresh generation (and write the generated file first when ``write``).

    Returns
    -------
    list of str
        One line per difference, empty when the registry is in sync: the
        generated file, and each attached reference of ``registry.yaml``
        (printed in full, to paste).
    """
    registry_file = Path(registry_file)
    doc = yaml.safe_load(registry_file.read_text())
    target = generated_file(registry_file)
    text = render(doc)
    if write:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    problems = []
    if not target.is_file() or target.read_text() != text:
        problems.append(f"{target} differs from a fresh generation: `python -m medsegagent.models.totalseg generate`")
    for dataset, expected in attached_refs(doc).items():
        refs = doc["datasets"][dataset].get("models") or []
        found = next((r for r in refs if r.get("name") == expected["name"]), None)
        if found != expected:
            block = yaml.safe_dump([expected], sort_keys=False, default_flow_style=None, width=120)
            problems.append(f"{registry_file}: datasets.{dataset}.models needs this reference:\n{block}")
    return problems
