"""Registry-derived anatomy concepts for the frozen held-out routing set.

Each concept names the registry labels that deliver it, found from the
registry itself (SNOMED CT type code and laterality, or the label's own
name and synonyms), never from the router.  ``build.py`` turns each request's
concepts into ``expected_datasets``.  See README.md, "Conventions".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from medsegagent.models.registry import Label, Registry

Matcher = Callable[[Label], bool]


def norm(text: str) -> str:
    """Lower-case, ``_``/``-`` to spaces, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", text.lower())).strip()


def _side(label: Label) -> str | None:
    if label.laterality is not None:
        return label.laterality.value
    if label.type_modifier is not None:
        return label.type_modifier.meaning.lower()
    return None


def by_type(*meanings: str, side: str | None = None, not_names: Iterable[str] = ()) -> Matcher:
    """Labels whose segmented property type is one of ``meanings``."""
    skip = {norm(n) for n in not_names}

    def match(label: Label) -> bool:
        if label.type.meaning not in meanings or norm(label.name) in skip:
            return False
        return side is None or _side(label) == side

    return match


def by_name(*names: str) -> Matcher:
    """Labels whose own name (normalised) is one of ``names``."""
    wanted = {norm(n) for n in names}
    return lambda label: norm(label.name) in wanted


def by_phrase(*phrases: str) -> Matcher:
    """Labels whose name or one of whose registry synonyms is one of ``phrases``."""
    wanted = {norm(p) for p in phrases}
    return lambda label: norm(label.name) in wanted or any(norm(s) in wanted for s in label.synonyms)


def in_dataset(dataset: str, *names: str) -> Matcher:
    """Named labels of one dataset (used where names differ between datasets)."""
    return lambda label: label.dataset == dataset and label.name in names


def either(*matchers: Matcher) -> Matcher:
    """Labels any of ``matchers`` accepts."""
    return lambda label: any(m(label) for m in matchers)


def _lateral(key: str, matcher_for: Callable[[str | None], Matcher]) -> dict[str, Matcher]:
    """``key`` (both sides / unsided), ``key_l`` and ``key_r``."""
    return {key: matcher_for(None), f"{key}_l": matcher_for("left"), f"{key}_r": matcher_for("right")}


def _sided_names(key: str, *stems: str) -> dict[str, Matcher]:
    """Labels named ``<stem>_left`` / ``<stem>_right`` (muscles share one broad type code)."""

    def names(side: str | None) -> Matcher:
        sides = ["left", "right"] if side is None else [side]
        return by_name(*(f"{stem}_{s}" for stem in stems for s in sides))

    return _lateral(key, names)


_COUINAUD = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII"]
_VERTEBRAE = [f"{p}{n}" for p, count in (("C", 7), ("T", 12), ("L", 5)) for n in range(1, count + 1)]


def _typed(key: str, meaning: str, **kw: object) -> dict[str, Matcher]:
    """Both sides, left and right of one segmented property type."""
    return _lateral(key, lambda side: by_type(meaning, side=side, **kw))  # type: ignore[arg-type]


CONCEPTS: dict[str, Matcher] = {
    # abdomen and pelvis
    "liver": by_type("Liver"),
    "spleen": by_type("Spleen"),
    "pancreas": by_type("Pancreas"),
    "gallbladder": by_type("Gallbladder"),
    "stomach": by_type("Stomach"),
    "esophagus": by_type("Esophagus"),
    "duodenum": by_type("Duodenum"),
    "colon": by_type("Colon"),
    "small_bowel": by_type("Small intestine"),
    "rectum": by_type("Rectum"),
    "bladder": by_type("Bladder"),
    "prostate": either(by_type("Prostate"), by_phrase("prostate")),
    "uterus": by_phrase("uterus"),
    "prostate_zones": by_type("Transition zone of the prostate", "Peripheral zone of the prostate"),
    "prostate_pz": by_type("Peripheral zone of the prostate"),
    "prostate_tz": by_type("Transition zone of the prostate"),
    **_typed("kidney", "Kidney"),
    **_typed("adrenal", "Adrenal gland"),
    "ureter": by_type("Ureter"),
    "ivc": by_type("Inferior vena cava"),
    "aorta": by_type("Aorta", not_names=["aorta_true_lumen"]),
    "portal_vein": by_type("Portal vein"),
    "renal_artery": by_type("Renal artery"),
    "renal_vein": by_type("Renal vein"),
    "sma": by_type("Superior mesenteric artery"),
    "celiac": by_type("Celiac Axis"),
    **_typed("iliac_artery", "Common iliac artery"),
    **_typed("iliac_vein", "Common iliac vein"),
    "liver_segments": by_type(*(f"Couinaud hepatic segment {r}" for r in _COUINAUD)),
    "liver_vessels": by_name("liver_vessels"),
    **{f"liver_seg{i}": by_type(f"Couinaud hepatic segment {r}") for i, r in enumerate(_COUINAUD, 1)},
    # thorax and heart
    "trachea": by_type("Trachea"),
    "airway": by_type("Airway structure", "Trachea and bronchus"),
    **_typed("lung", "Lung"),
    "lobe_rul": by_type("Upper lobe of lung", side="right"),
    "lobe_rml": by_type("Middle lobe of right lung"),
    "lobe_rll": by_type("Lower lobe of lung", side="right"),
    "lobe_lul": by_type("Structure of upper lobe of left lung (body structure)"),
    "lobe_lll": by_type("Lower lobe of lung", side="left"),
    "heart": by_type("Heart"),
    "lv": by_type("Left ventricle"),
    "rv": by_type("Right ventricle"),
    "la": by_type("Left atrium"),
    "ra": by_type("Right atrium"),
    "myocardium": by_type("Left Ventricle Myocardium"),
    "laa": by_type("Left auricular appendage"),
    "svc": by_type("Superior vena cava"),
    "pulmonary_artery": by_type("Pulmonary artery"),
    "pulmonary_vein": by_type("Pulmonary vein"),
    "ascending_aorta": by_type("Ascending aorta"),
    "coronary": by_type("Coronary artery"),
    "brachiocephalic_trunk": by_type("brachiocephalic trunk"),
    "subclavian_l": by_type("Left Subclavian Artery"),
    "subclavian_r": by_type("Right Subclavian Artery"),
    "sternum": by_type("Sternum"),
    "costal_cartilage": by_type("Costal Cartilage"),
    "pericardium": by_type("Pericardium"),
    "mediastinum": by_type("Mediastinum"),
    "thyroid": by_type("Thyroid"),
    # head and neck
    "brain": by_type("Brain"),
    "brainstem": by_type("Brain Stem"),
    "cerebellum": by_type("Cerebellum"),
    "thalamus": by_type("Thalamus"),
    "caudate": by_type("Caudate Nucleus"),
    "brain_ventricles": by_type("Brain ventricle"),
    **_typed("temporal_lobe", "Temporal lobe"),
    **_typed("hippocampus", "Hippocampus"),
    **_lateral("eye", lambda side: either(by_type("Eyeball", side=side), by_type("Eye", side=side))),
    **_typed("lens", "Lens"),
    **_typed("optic_nerve", "optic nerve"),
    "chiasm": by_type("Optic chiasm"),
    **_typed("parotid", "Parotid gland"),
    **_typed("submandibular", "Submandibular gland"),
    "pituitary": by_type("Pituitary"),
    "oral_cavity": by_type("oral cavity"),
    **_typed("mandible", "Mandible"),
    **_typed("tmj", "Temporomandibular joint"),
    **_typed("mastoid", "Mastoid bone"),
    "cochlea": either(by_name("Cochlea_L", "Cochlea_R"), in_dataset("CrossMoDA2023", "cochlea")),
    "larynx": by_type("Larynx"),
    **_typed("eustachian", "pharyngotympanic tube"),
    "glottis": by_type("glottis"),
    "spinal_cord": by_type("Spinal cord"),
    "skull": by_type("Skull"),
    "tongue": by_type("Tongue"),
    "masseter": by_name("masseter_left", "masseter_right"),
    "cca_l": by_type("Left Common Carotid Artery"),
    "cca_r": by_type("Right Common Carotid Artery"),
    **_typed("ica", "Internal carotid artery"),
    **_typed("ijv", "Internal jugular vein"),
    "hyoid": by_type("Hyoid bone"),
    "maxillary_sinus": by_type("Maxillary sinus"),
    "frontal_sinus": by_type("Frontal sinus"),
    "nasopharynx": by_type("Nasopharynx"),
    "sternocleidomastoid": by_type("Sternocleidomastoid muscle"),
    # spine, bones, muscles, tissue
    **{v.lower(): by_type(f"{v} vertebra") for v in _VERTEBRAE},
    "sacrum": by_type("Sacrum"),
    "discs": by_name("intervertebral_discs"),
    **{f"rib_{s}{n}": by_name(f"rib_{'left' if s == 'l' else 'right'}_{n}") for s in "lr" for n in range(1, 13)},
    **_typed("clavicle", "Clavicle"),
    **_typed("scapula", "Scapula"),
    **_typed("humerus", "Humerus"),
    **_lateral(
        "femur",
        lambda side: either(
            by_type("Femur", side=side),
            by_name(*(["femur left"] if side != "right" else []), *(["femur right"] if side != "left" else [])),
        ),
    ),
    **_typed("femoral_head", "Head of Femur"),
    **_typed("hip", "Pelvis"),
    "tibia": by_type("Tibia"),
    "fibula": by_type("Fibula"),
    "patella": by_type("Patella"),
    **_sided_names("gluteus_max", "gluteus_maximus", "gluteus_maximus_muscle"),
    **_sided_names("iliopsoas", "iliopsoas", "iliopsoas_muscle"),
    **_typed("erector_spinae", "Erector spinae muscle"),
    **_sided_names("quadriceps", "quadriceps_femoris"),
    "subcutaneous_fat": by_type("Subcutaneous tissue"),
    "skeletal_muscle": by_name("skeletal_muscle"),
    "bone_all": by_type("Bone"),
    # lesions and findings
    "liver_tumor": either(in_dataset("LiTS", "liver_tumour"), by_name("liver_tumor", "liver_lesions")),
    "kidney_tumor": either(in_dataset("KiTS23", "kidney tumor"), by_name("renal_neoplasm")),
    "kidney_mass": either(in_dataset("KiTS23", "kidney masses"), by_name("renal_neoplasm")),
    **_lateral("kidney_cyst", lambda s: by_type("Cyst", side=s)),
    "pancreatic_tumor": by_name("pancreatic_tumor"),
    "adrenal_tumor": by_name("Adrenocortical carcinoma"),
    "brain_tumor": by_name("whole_tumor"),
    "tumor_core": by_name("tumor_core"),
    "enhancing_tumor": by_name("enhancing_tumor"),
    "stroke": by_name("stroke lesion"),
    "ich": by_name("Intracranial Hemorrhage"),
    "cerebral_bleed": by_name("Intracranial Hemorrhage", "intracerebral_hemorrhage"),
    "aneurysm": by_name("brain_aneurysm"),
    "pe": by_name("Pulmonary Embolism"),
    "lung_nodules": by_name("lung_nodules"),
    "mediastinal_nodes": by_name("mediastinal lymph nodes"),
    "pet_lesions": in_dataset("AutoPET", "tumor"),
    "gtvp": by_name("GTVp"),
    "gtvnd": by_name("GTVnd"),
    "npc": in_dataset("SegRap2023_Task2", "GTVp"),
    "schwannoma": by_name("intra-meatal tumor", "extra-meatal tumor"),
    "schwannoma_intra": by_name("intra-meatal tumor"),
    "neuroblastoma": by_name("Pediatric Neuroblastoma"),
    "breast_tumor": by_name("breast tumor"),
    "pleural_effusion": by_name("pleural_effusion"),
    "pericardial_effusion": by_name("pericardial_effusion"),
    "false_lumen": by_name("aorta_false_lumen"),
}


def expected(registry: Registry, concepts: Iterable[str], modality: str | None) -> dict[str, list[int]]:
    """Dataset -> sorted label values serving ``concepts`` on ``modality`` (all modalities for None)."""
    out: dict[str, set[int]] = {}
    matchers = [CONCEPTS[c] for c in concepts]
    for dataset in registry:
        if modality is not None and not dataset.accepts(modality):
            continue
        for label in dataset.labels.values():
            if any(m(label) for m in matchers):
                out.setdefault(dataset.name, set()).update(label.values)
    return {name: sorted(values) for name, values in sorted(out.items())}
