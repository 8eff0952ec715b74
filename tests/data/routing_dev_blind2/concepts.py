"""Concepts of the second blind development set: the first blind set's, plus the ones it lacks.

The first blind set's table (``tests/data/routing_dev_blind/concepts.py``, which
itself reuses the held-out table) is loaded by path and used as it is; the
concepts below cover what this set asks for and neither earlier set does:
lateral-ventricle horns and deep grey matter, TG-263 head-and-neck OARs
(constrictors, supraglottis, internal auditory canals, vestibule), neck and
masticatory muscles, extraocular muscles, dental CBCT structures (FDI teeth,
arches, alveolar canals, implants), shoulder and abdominal-wall muscles, thigh
compartments, pulmonary-artery and aortic-root landmarks.  Each is found from
the registry (SNOMED CT type code and laterality, or the label's own name where
the type code is shared), never from the router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND = Path(__file__).resolve().parents[1] / "routing_dev_blind" / "concepts.py"


def _load_blind() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind2_base_concepts", _BLIND)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind()
Matcher = _b.Matcher
by_name, by_type = _b.by_name, _b.by_type
_h = _b._h  # the held-out helpers, as the first blind set loaded them


def _typed(key: str, meaning: str) -> dict[str, Matcher]:
    return _h._typed(key, meaning)


def _sided(key: str, *stems: str) -> dict[str, Matcher]:
    """``<stem>_left`` / ``<stem>_right`` labels (for type codes shared by many muscles)."""
    return _h._sided_names(key, *stems)


def _sided_prefix(key: str, left: str, right: str) -> dict[str, Matcher]:
    """Labels whose names carry the side elsewhere (``IAC_L``, ``left_inferior_alveolar_canal``)."""
    return {key: by_name(left, right), f"{key}_l": by_name(left), f"{key}_r": by_name(right)}


def _tooth(fdi: int) -> Matcher:
    # the pulp labels share the tooth's type code (and end in _fdi1NN): a tooth is not its pulp
    return lambda label: label.name.endswith(f"_fdi{fdi}") and "pulp" not in label.name


_FDI = [q * 10 + n for q in (1, 2, 3, 4) for n in range(1, 9)]
_EXTRAOCULAR = [
    "lateral_rectus_muscle",
    "medial_rectus_muscle",
    "superior_rectus_muscle",
    "inferior_rectus_muscle",
    "superior_oblique_muscle",
    "inferior_oblique_muscle",
    "levator_palpebrae_superioris",
]

EXTRA: dict[str, Matcher] = {
    # brain (TotalSegmentator brain_structures and ventricle_parts, CT only)
    **_typed("frontal_horn", "Anterior Horn Lateral Ventricle"),
    **_typed("temporal_horn", "Inferior Horn of Lateral Ventricle"),
    **_typed("occipital_horn", "Posterior Horn Lateral Ventricle"),
    "putamen": by_type("Putamen"),
    "internal_capsule": by_type("internal capsule"),
    "subarachnoid": by_type("Subarachnoid space"),
    "septum_pellucidum": by_type("Cavum of septum pellucidum"),
    # head and neck OARs (SegRap's TG-263-like names, TotalSegmentator head/neck tasks)
    "supraglottis": by_type("supraglottis"),
    "constrictors": by_name(
        "PharynxConst",
        "superior_pharyngeal_constrictor",
        "middle_pharyngeal_constrictor",
        "inferior_pharyngeal_constrictor",
    ),
    **_sided_prefix("iac", "IAC_L", "IAC_R"),
    **_sided_prefix("vestibule", "VestibulSemi_L", "VestibulSemi_R"),
    **_sided("styloid", "styloid_process"),
    "hard_palate": by_name("hard_palate"),
    **_sided("pterygoid_med", "medial_pterygoid"),
    **_sided("pterygoid_lat", "lateral_pterygoid"),
    **_sided("pterygoids", "medial_pterygoid", "lateral_pterygoid"),
    **_sided("digastric", "digastric"),
    **_sided("platysma", "platysma"),
    **_sided("levator_scapulae", "levator_scapulae"),
    **_sided("scalenes", "anterior_scalene", "middle_scalene", "posterior_scalene"),
    **_sided("lateral_rectus", "lateral_rectus_muscle"),
    **_sided("medial_rectus", "medial_rectus_muscle"),
    **_sided("extraocular", *_EXTRAOCULAR),
    # dental CBCT (TotalSegmentator teeth, craniofacial structures)
    # FDI numbers the first blind set lacks (it has 11 and 36, matched the same way)
    **{f"tooth_{n}": _tooth(n) for n in _FDI if f"tooth_{n}" not in _b.CONCEPTS},
    "teeth_lower": by_type("Mandibular dental arch"),
    "teeth_upper": by_type("Maxillary dental arch"),
    **_sided_prefix("alveolar_canal", "left_inferior_alveolar_canal", "right_inferior_alveolar_canal"),
    "dental_implant": _h.in_dataset("TotalSegmentator_teeth", "implant"),
    "dental_crown": _h.in_dataset("TotalSegmentator_teeth", "crown"),
    "head": by_type("Head"),
    # upper limb, trunk wall and thigh muscles
    **_typed("serratus", "Serratus anterior muscle"),
    "triceps": by_name("triceps_brachii"),
    "coracobrachialis": by_name("coracobrachial"),
    **_sided("external_oblique", "external_oblique"),
    **_sided("internal_oblique", "internal_oblique"),
    **_sided("quadratus_lumborum", "quadratus_lumborum"),
    **_sided("adductors", "thigh_medial_compartment"),
    **_sided("hamstrings", "thigh_posterior_compartment"),
    "intermuscular_fat": by_name("intermuscular_fat"),
    # heart and great vessels
    "lpa": by_type("Left pulmonary artery"),
    "rpa": by_type("Right pulmonary artery"),
    "sinotubular_junction": by_type("Aortic Sinotubular Junction"),
    "pulmonary_annulus": by_type("Cardiac valve annulus"),
    "bronchial_wall": by_type("Bronchus"),
}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the first blind set's tooling, so
# widening its table (which ``expected`` reads) changes nothing for that set.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
