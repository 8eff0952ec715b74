"""Concepts of the blind development set: the held-out set's, plus the ones it lacks.

The held-out tooling (``tests/data/heldout/concepts.py``) is reused as it is;
the concepts below cover structures this set asks for and the held-out set
does not (shoulder and abdominal-wall muscles, forearm and foot bones, brain
lobes, head cavities, aortic root landmarks, ...).  Each is found from the
registry (SNOMED CT type code and laterality, or the label's own name where
the type code is shared), never from the router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_HELDOUT = Path(__file__).resolve().parents[1] / "heldout" / "concepts.py"


def _load_heldout() -> ModuleType:
    # loaded by path: tests/data is not a package, and the held-out folder must stay untouched
    spec = importlib.util.spec_from_file_location("heldout_concepts", _HELDOUT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_h = _load_heldout()
Matcher = _h.Matcher
by_name, by_type = _h.by_name, _h.by_type


def _typed(key: str, meaning: str) -> dict[str, Matcher]:
    return _h._typed(key, meaning)


def _sided(key: str, *stems: str) -> dict[str, Matcher]:
    return _h._sided_names(key, *stems)


EXTRA: dict[str, Matcher] = {
    # brain (TotalSegmentator brain_structures, CT only)
    "frontal_lobe": by_type("Frontal lobe"),
    "parietal_lobe": by_type("Parietal lobe"),
    "occipital_lobe": by_type("Occipital lobe"),
    "insula": by_type("Insula"),
    "third_ventricle": by_type("Third ventricle"),
    "fourth_ventricle": by_type("Fourth Ventricle"),
    "venous_sinuses": by_type("Venous network"),
    # head and neck cavities, glands, bones
    "oropharynx": by_type("oropharynx"),
    "hypopharynx": by_type("Hypopharynx"),
    "soft_palate": by_type("Soft palate"),
    **_typed("nasal_cavity", "nasal cavity"),
    **_typed("auditory_canal", "External auditory canal"),
    **_typed("inner_ear", "Inner ear"),
    # one cochlea: the held-out "cochlea" has no sides, and CrossMoDA's cochlea label has none either
    "cochlea_l": by_name("Cochlea_L"),
    "cochlea_r": by_name("Cochlea_R"),
    **_typed("middle_ear", "Middle ear"),
    **_typed("zygomatic_arch", "Zygoma"),
    "thyroid_cartilage": by_name("thyroid_cartilage"),
    "cricoid": by_name("cricoid_cartilage"),
    "face": by_type("Face"),
    **_sided("temporalis", "temporalis"),
    # FDI tooth numbers; the pulp labels share the tooth's type code but are not the tooth
    "tooth_36": by_name("lower_left_first_molar_fdi36"),
    "tooth_11": by_name("upper_right_central_incisor_fdi11"),
    # thorax, heart, vessels
    "pleura": by_type("Pleura"),
    "breast": by_type("Breast"),
    "thoracic_cavity": by_type("Chest cavity"),
    "abdominal_cavity": by_type("Abdominal cavity structure (body structure)"),
    **_typed("brachiocephalic_vein", "Brachiocephalic vein"),
    "aortic_annulus": by_type("Aortic Valve Ring"),
    "aortic_sinuses": by_type("Left Sinus of Valsalva", "Right Sinus of Valsalva", "Non-coronary Sinus"),
    "lvot": by_type("Left ventricle outflow tract"),
    # upper and lower limb bones
    "radius": by_type("Radius"),
    "ulna": by_type("Ulna"),
    "carpal": by_type("Carpus"),
    "metacarpal": by_type("Metacarpal"),
    "tarsal": by_type("Tarsus"),
    "metatarsal": by_type("Metatarsus"),
    "phalanges_hand": by_type("Finger"),
    "phalanges_foot": by_type("Toe"),
    # muscles (several share one broad type code, hence names)
    "deltoid": by_type("Deltoid muscle"),
    "supraspinatus": by_type("Supraspinatus muscle"),
    "infraspinatus": by_type("Infraspinatus muscle"),
    "subscapularis": by_type("Subscapularis muscle"),
    "teres_major": by_type("Teres major muscle"),
    **_typed("pectoralis_major", "Pectoralis major muscle"),
    "pectoralis_minor": by_type("Pectoralis minor muscle"),
    **_typed("latissimus", "Latissimus dorsi muscle"),
    **_typed("trapezius", "Trapezius muscle"),
    **_sided("gluteus_med", "gluteus_medius", "gluteus_medius_muscle"),
    **_sided("gluteus_min", "gluteus_minimus", "gluteus_minimus_muscle"),
    **_sided("sartorius", "sartorius"),
    **_sided("psoas_major", "psoas_major"),
    **_sided("rectus_abdominis", "rectus_abdominis"),
    # devices
    "hip_implant": by_name("hip_implant"),
}

_clash = set(EXTRA) & set(_h.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_h`` is this module's private copy of the held-out tooling, so widening its
# table (which its ``expected`` reads) changes nothing for the held-out set.
CONCEPTS: dict[str, Matcher] = _h.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _h.expected
