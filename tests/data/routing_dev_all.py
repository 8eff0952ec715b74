"""Build ``routing_dev_all.jsonl``: development requests scored over the whole default registry.

Expectations come from the registry, never from the router: each request names
the concepts it asks for (SNOMED CT type codes, with a label-name pattern where
the registry gives several structures one "closest concept" code: ribs,
muscles, lesions) and the study modality; every dataset that admits the
modality and has a label of a requested concept gets exactly those label values
(region labels flattened).  The rules are those of
``tests/data/heldout/README.md`` ("Conventions the expectations follow"):

* a request for both sides (or none) takes left, right, bilateral and unsided
  labels; one side takes only labels of that side;
* a whole is not delivered by its parts (no requests for "lungs" or "heart"
  here: the public benchmark and the held-out conventions disagree on them;
  the larynx comes with its subdivisions as in the public benchmark, :data:`WITH_PARTS`);
* an organ is not its lesion; one SNOMED CT type is one concept;
* modality: ``Dataset.accepts``; a ``CT`` named only in the text also admits
  PET/CT datasets (docs/routing.md, "Modality").

A composite label that the registry calls by its organ's name ("kidney and
masses", synonym "kidneys") delivers the organ whole, as every blind set
expects; the public benchmark expects KiTS23's value 1 alone.

Run ``python tests/data/routing_dev_all.py`` after changing a request or the
registry, and read the diff.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medsegagent.models.registry import Dataset, Label, load_registry

OUT = Path(__file__).with_name("routing_dev_all.jsonl")

#: A whole that comes with its named parts in the public benchmark ("larynx" -> glottis, supraglottis).
WITH_PARTS = {("SegRap2023_Task1", "Larynx"): (48, 49, 50, 51)}


@dataclass(frozen=True)
class C:
    """A requested concept: type codes, an optional label-name pattern, a side."""

    codes: tuple[str, ...]
    name: str | None = None
    side: str | None = None

    def __call__(self, label: Label) -> bool:
        if label.type.value not in self.codes:
            return False
        if self.name and not re.search(self.name, label.name, re.I):
            return False
        lat = label.laterality.value if label.laterality is not None else None
        return self.side is None or lat == self.side

    def on(self, side: str) -> C:
        """The same concept on one side."""
        return C(self.codes, self.name, side)


def c(*codes: str, name: str | None = None) -> C:
    return C(codes, name)


LIVER, SPLEEN, KIDNEY, PANCREAS = c("10200004"), c("78961009"), c("64033007"), c("15776009")
GALLBLADDER, STOMACH, IVC = c("28231008"), c("69695003"), c("64131007")
AORTA = c("15825003", name=r"^(?!.*lumen)")  # a dissection's true lumen is not "the aorta"
ESOPHAGUS, DUODENUM, BLADDER, ADRENAL = c("32849002"), c("38848004"), c("89837001"), c("23451007")
COLON, SMALL_BOWEL, RECTUM, PROSTATE = c("71854001"), c("30315005"), c("34402009"), c("41216001")
BRAIN, TRACHEA, THYROID, SPINAL_CORD = c("12738006"), c("44567001"), c("69748006"), c("2748008")
SACRUM, FEMUR, HUMERUS, CLAVICLE = c("54735007"), c("71341001"), c("85050009"), c("51299004")
SCAPULA, STERNUM, SKULL, PORTAL = c("79601000"), c("56873002"), c("89546000"), c("32764006")
LV, RV, LA, RA = c("87878005"), c("53085002"), c("82471001"), c("73829009")
MYOCARDIUM, PULM_ARTERY, PULM_VEIN, SVC = c("49848007"), c("81040000"), c("122972007"), c("48345005")
CORONARY, PAROTID, SUBMANDIBULAR, OPTIC_NERVE = c("41801008"), c("45289007"), c("54019009"), c("18234004")
CHIASM, LENS, BRAINSTEM, PITUITARY = c("244453006"), c("78076003"), c("119238007"), c("56329008")
LARYNX, MANDIBLE, HIPPOCAMPUS, TEMPORAL_LOBE = c("4596009"), c("91609006"), c("5366008"), c("78277001")
AUTOCHTHON, HIP, PELVIC_BONE_SACRUM = c("44947003"), c("118645006"), c("54735007")
COMMON_ILIAC_A, COMMON_ILIAC_V = c("73634005"), c("46027005")
TIBIA, FIBULA, PATELLA, ULNA, RADIUS = c("12611008"), c("87342007"), c("64234005"), c("23416004"), c("62413002")
CEREBELLUM, THALAMUS, CAUDATE, FRONTAL = c("113305005"), c("119406000"), c("11000004"), c("83251001")
LAA, BRACHIOCEPHALIC_TRUNK, SMA, CELIAC = c("33626005"), c("12691009"), c("42258001"), c("57850000")
TONGUE, HYOID, PHARYNX, NASOPHARYNX = c("21974007"), c("21387005"), c("54066008"), c("360955006")
OROPHARYNX, ORAL_CAVITY, SOFT_PALATE, TMJ = c("31389004"), c("74262004"), c("49460000"), c("53620006")
MASTOID, MIDDLE_EAR, EUSTACHIAN = c("59066005"), c("25342003"), c("91207004")
STERNOCLEIDO, TRAPEZIUS, DELTOID = c("22823000"), c("31764008"), c("35259002")
SUPRASPINATUS, INFRASPINATUS, SUBSCAPULARIS = c("6423006"), c("72573008"), c("90588001")
PECTORALIS_MAJOR, LATISSIMUS, SERRATUS = c("60005003"), c("15665001"), c("18346003")
PLEURA, PERICARDIUM, MEDIASTINUM = c("3120008"), c("76848001"), c("72410000")
SUBCUT_FAT, BREAST = c("71966008"), c("76752008")
SKELETAL_MUSCLE = c("127954009", name=r"skeletal")  # the code is also a closest concept (transversospinalis)
RENAL_ARTERY, RENAL_VEIN, URETER = c("2841007"), c("56400007"), c("87953007")
UPPER_LOBE_L, UPPER_LOBE_R = c("44714003"), c("45653009")
LOWER_LOBE, MIDDLE_LOBE = c("90572001"), c("72481006")
FRONTAL_SINUS, MAXILLARY_SINUS, NASAL_CAVITY = c("55060009"), c("15924003"), c("279549004")
CARPUS, TARSUS, METACARPAL, METATARSUS = c("8205005"), c("108371006"), c("36455000"), c("280711000")
EYEBALL = c("79652003")
GLUTEUS_MAX = c("102292000", name=r"gluteus_maximus")
GLUTEUS_MED = c("102292000", name=r"gluteus_medius")
ILIOPSOAS = c("102292000", name=r"iliopsoas")
# Lesions
LIVER_TUMOUR = C(("108369006", "52988006"), name=r"liver")
KIDNEY_TUMOUR = C(("108369006",), name=r"kidney|renal")
KIDNEY_MASSES = c("4147007")
KIDNEY_CYST = c("367643001")
LUNG_NODULE = c("27925004")
EMBOLISM = c("55584005")
HEMORRHAGE = c("50960005")
ANEURYSM = c("85659009")
STROKE = c("301766008", name=r"stroke")
WHOLE_TUMOUR = c("301766008", name=r"whole_tumor")
ENHANCING_TUMOUR = c("108369006", name=r"enhancing")
TUMOUR_CORE = c("372087000", name=r"tumor_core")
GTVP = c("372087000", name=r"gtvp")
GTVN = c("14799000")
ADRENAL_CARCINOMA = c("1187425009")
PLEURAL_EFFUSION = c("41699000", name=r"pleural")
PERICARDIAL_EFFUSION = c("41699000", name=r"pericard")
VESTIBULAR_SCHWANNOMA = c("108369006", name=r"meatal")
NEUROBLASTOMA = c("108369006", name=r"neuroblastoma")
BREAST_TUMOUR = c("108369006", name=r"breast")
MEDIASTINAL_NODES = c("62683002")
AORTIC_DISSECTION = c("308546005")


def vertebrae(*levels: str) -> C:
    names = "|".join(f"vertebrae_{lv}$" for lv in levels)
    codes = tuple({lb.type.value for d in REGISTRY.datasets.values() for lb in d.labels.values()})
    return C(codes, name=names)


def ribs(side: str | None, *numbers: int) -> C:
    sides = side or "(?:left|right)"
    return C(("113197003",), name=rf"^rib_{sides}_(?:{'|'.join(map(str, numbers))})$")


REGISTRY = load_registry()
ALL_RIBS = range(1, 13)

#: (request, modality in the record or None, modality the text names or None, concepts)
Request = tuple[str, str | None, str | None, list[C]]
REQUESTS: list[Request] = []

#: Requests that exclude a lesion from an organ: a region label holding both ("kidney and
#: masses") loses the lesion's values.
WITHOUT: dict[str, C] = {}


def add(query: str, modality: str | None, text_modality: str | None, *concepts: C) -> None:
    REQUESTS.append((query, modality, text_modality, list(concepts)))


# -- worklist procedure names and headers --------------------------------------------------
add("CT ABDOMEN PELVIS W CONTRAST - LIVER SPLEEN VOLUMES", None, "CT", LIVER, SPLEEN)
add("CT A/P WITHOUT CONTRAST: PANCREAS", None, "CT", PANCREAS)
add("MRI ABDOMEN W/WO - LIVER", None, "MR", LIVER)
add("CT CHEST HIGH RESOLUTION - TRACHEA", None, "CT", TRACHEA)
add("CTA CORONARY - CORONARY TREE", None, "CT", CORONARY)
add("CT NECK SOFT TISSUE - THYROID", None, "CT", THYROID)
add("MR PELVIS PROSTATE MPMRI - WHOLE GLAND", None, "MR", PROSTATE)
add("CT RENAL MASS PROTOCOL - KIDNEY TUMOR", None, "CT", KIDNEY_TUMOUR)
add("CT HEAD WO - ICH", None, "CT", HEMORRHAGE)
add("CTPA - PULMONARY EMBOLI", None, "CT", EMBOLISM)
add("MRI BRAIN W/WO GAD - ENHANCING TUMOUR", None, "MR", ENHANCING_TUMOUR)
add("CT CAP - ADRENALS L/R", None, "CT", ADRENAL)
add("Liver volumetry pre-hepatectomy", "CT", None, LIVER)
add("Splenic volume for ITP workup", "CT", None, SPLEEN)
add("Renal volumetry, ADPKD", "MR", None, KIDNEY)
add("CT AORTA ANGIO - AORTIC DISSECTION FALSE LUMEN", None, "CT", AORTIC_DISSECTION)
add("MR LIVER - SEGMENT LESIONS", None, "MR", LIVER_TUMOUR)
add("CT CHEST W CON - LUNG NODULES", None, "CT", LUNG_NODULE)
add("CT HEAD NECK RT PLANNING - PAROTIDS", None, "CT", PAROTID)
add("RT planning OARs: spinal cord, brainstem, optic chiasm", "CT", None, SPINAL_CORD, BRAINSTEM, CHIASM)
add("RT contouring list: parotid L, parotid R, submandibular L/R", "CT", None, PAROTID, SUBMANDIBULAR)
add("Bladder and rectum for prostate RT", "CT", None, BLADDER, RECTUM)
add("CT ABD - GALLBLADDER", None, "CT", GALLBLADDER)
add("MR CARDIAC CINE - LV RV MYO", None, "MR", LV, RV, MYOCARDIUM)
add("CT CARDIAC - LAA", None, "CT", LAA)
add("CT SPINE LUMBAR - L1-L5", None, "CT", vertebrae("L1", "L2", "L3", "L4", "L5"))
add("MR L-SPINE - L4 L5", None, "MR", vertebrae("L4", "L5"))
add("CT CHEST - PLEURAL EFFUSION", None, "CT", PLEURAL_EFFUSION)
add("CT NECK - LARYNX", None, "CT", LARYNX)
add("Body composition at L3: skeletal muscle and subcutaneous fat", "CT", None, SKELETAL_MUSCLE, SUBCUT_FAT)

# -- synonyms, abbreviations, eponyms, Latin ------------------------------------------------
add("hepar", "CT", None, LIVER)
add("lien", "CT", None, SPLEEN)
add("ren dexter", "CT", None, KIDNEY.on("right"))
add("suprarenal glands", "CT", None, ADRENAL)
add("gall bladder", "MR", None, GALLBLADDER)
add("oesophagus", "CT", None, ESOPHAGUS)
add("gullet", "CT", None, ESOPHAGUS)
add("windpipe", "CT", None, TRACHEA)
add("voice box", "CT", None, LARYNX)
add("IVC", "CT", None, IVC)
add("SVC", "CT", None, SVC)
add("SMA", "CT", None, SMA)
add("celiac trunk", "CT", None, CELIAC)
add("coeliac axis", "CT", None, CELIAC)
add("innominate artery", "CT", None, BRACHIOCEPHALIC_TRUNK)
add("LA appendage", "CT", None, LAA)
add("left atrial appendage", "CT", None, LAA)
add("main pulmonary artery", "CT", None, PULM_ARTERY)
add("pulmonary veins", "CT", None, PULM_VEIN)
add("portal vein", "CT", None, PORTAL)
add("SCM muscles", "CT", None, STERNOCLEIDO)
add("sternocleidomastoid, right", "CT", None, STERNOCLEIDO.on("right"))
add("paraspinal muscles", "CT", None, AUTOCHTHON)
add("erector spinae", "MR", None, AUTOCHTHON)
add("os sacrum", "CT", None, SACRUM)
add("shoulder blades", "CT", None, SCAPULA)
add("collarbones", "CT", None, CLAVICLE)
add("breastbone", "CT", None, STERNUM)
add("thigh bone, left", "CT", None, FEMUR.on("left"))
add("upper arm bones", "CT", None, HUMERUS)
add("kneecap", "CT", None, PATELLA)
add("shin bone", "MR", None, TIBIA)
add("calf bone", "CT", None, FIBULA)
add("wrist bones", "CT", None, CARPUS)
add("ankle bones", "CT", None, TARSUS)
add("cerebellum", "CT", None, CEREBELLUM)
add("thalamus", "CT", None, THALAMUS)
add("caudate nucleus", "CT", None, CAUDATE)
add("frontal lobe", "CT", None, FRONTAL)
add("Eustachian tubes", "CT", None, EUSTACHIAN)
add("tympanic cavity and middle ear", "CT", None, MIDDLE_EAR)
add("mastoids", "CT", None, MASTOID)
add("TMJs", "CT", None, TMJ)
add("pituitary gland", "CT", None, PITUITARY)
add("hypophysis", "CT", None, PITUITARY)
add("optic chiasma", "CT", None, CHIASM)
add("optic nerves", "CT", None, OPTIC_NERVE)
add("eye lenses", "CT", None, LENS)
add("hippocampi", "CT", None, HIPPOCAMPUS)
add("ammon's horn, left", "CT", None, HIPPOCAMPUS.on("left"))
add("temporal lobes", "CT", None, TEMPORAL_LOBE)
add("nasopharynx", "CT", None, NASOPHARYNX)
add("oropharynx", "CT", None, OROPHARYNX)
add("tongue", "CT", None, TONGUE)
add("hyoid bone", "CT", None, HYOID)
add("soft palate", "CT", None, SOFT_PALATE)
add("frontal sinus", "CT", None, FRONTAL_SINUS)
add("maxillary sinuses", "CT", None, MAXILLARY_SINUS)
add("nasal cavities", "CT", None, NASAL_CAVITY)
add("pericardium", "CT", None, PERICARDIUM)
add("mediastinum", "CT", None, MEDIASTINUM)
add("pleura", "CT", None, PLEURA)
add("renal arteries", "CT", None, RENAL_ARTERY)
add("renal vein", "CT", None, RENAL_VEIN)
add("ureter", "CT", None, URETER)
add("HCC", "CT", None, LIVER_TUMOUR)
add("hepatic metastases", "CT", None, LIVER_TUMOUR)
add("liver mets", "MR", None, LIVER_TUMOUR)
add("renal cell carcinoma", "CT", None, KIDNEY_TUMOUR)
add("renal cysts", "CT", None, KIDNEY_CYST)
add("PE", "CT", None, EMBOLISM)
add("intracranial bleed", "CT", None, HEMORRHAGE)
add("cerebral aneurysm", "MR", None, ANEURYSM)
add("acoustic neuroma", "MR:T1C", None, VESTIBULAR_SCHWANNOMA)
add("vestibular schwannoma", "MR:T2", None, VESTIBULAR_SCHWANNOMA)
add("neuroblastoma", "MR", None, NEUROBLASTOMA)
add("adrenocortical carcinoma", "CT", None, ADRENAL_CARCINOMA)
add("mediastinal lymph nodes", "CT", None, MEDIASTINAL_NODES)
add("pericardial effusion", "CT", None, PERICARDIAL_EFFUSION)
add("GTVp", "PT+CT", None, GTVP)
add("GTVn", "PT+CT", None, GTVN)
add("primary tumour and nodal GTV", "PT+CT", None, GTVP, GTVN)

# -- lay terms -----------------------------------------------------------------------------
add("my liver please", "CT", None, LIVER)
add("the spleen thing on the left side of the belly", "CT", None, SPLEEN)
add("the bladder where pee is stored", "CT", None, BLADDER)
add("food pipe", "CT", None, ESOPHAGUS)
add("belly fat under the skin", "CT", None, SUBCUT_FAT)
add("backbone at the small of the back, L1 to L3", "CT", None, vertebrae("L1", "L2", "L3"))
add("the tailbone area sacrum", "CT", None, SACRUM)
add("hip bones", "CT", None, HIP)
add("jaw bone", "CT", None, MANDIBLE)
add("the big heart pumping chamber on the left", "MR", None, LV)

# -- typos ---------------------------------------------------------------------------------
add("segment the livr", "CT", None, LIVER)
add("spleeen", "CT", None, SPLEEN)
add("pancraes", "CT", None, PANCREAS)
add("gallbladdr", "CT", None, GALLBLADDER)
add("left kidnye", "CT", None, KIDNEY.on("left"))
add("stomache", "CT", None, STOMACH)
add("esophogus", "CT", None, ESOPHAGUS)
add("duodenom", "CT", None, DUODENUM)
add("trachae", "CT", None, TRACHEA)
add("thyriod", "CT", None, THYROID)
add("prostrate", "MR", None, PROSTATE)
add("urinary bladdder", "CT", None, BLADDER)
add("adrenal glnds", "CT", None, ADRENAL)
add("spinal chord", "CT", None, SPINAL_CORD)
add("brian stem", "CT", None, BRAINSTEM)
add("sternum bone, sternun", "CT", None, STERNUM)

# -- several structures --------------------------------------------------------------------
add("liver, spleen, pancreas and gallbladder", "CT", None, LIVER, SPLEEN, PANCREAS, GALLBLADDER)
add("stomach + duodenum", "MR", None, STOMACH, DUODENUM)
add("aorta and IVC", "CT", None, AORTA, IVC)
add("colon, small bowel and rectum", "CT", None, COLON, SMALL_BOWEL, RECTUM)
add("esophagus; trachea; thyroid", "CT", None, ESOPHAGUS, TRACHEA, THYROID)
add("bladder / prostate", "MR", None, BLADDER, PROSTATE)
add("liver and liver lesions", "CT", None, LIVER, LIVER_TUMOUR)
add("kidneys and renal cysts", "CT", None, KIDNEY, KIDNEY_CYST)
add("scapulae and clavicles", "CT", None, SCAPULA, CLAVICLE)
add("femurs, hips and sacrum", "MR", None, FEMUR, HIP, SACRUM)
add("parotids, submandibular glands and thyroid", "CT", None, PAROTID, SUBMANDIBULAR, THYROID)
add(
    "deltoid, supraspinatus, infraspinatus, subscapularis",
    "CT",
    None,
    DELTOID,
    SUPRASPINATUS,
    INFRASPINATUS,
    SUBSCAPULARIS,
)
add("pectoralis major and latissimus dorsi", "CT", None, PECTORALIS_MAJOR, LATISSIMUS)
add("LV, RV, LA, RA", "CT", None, LV, RV, LA, RA)
add("common iliac arteries and veins", "CT", None, COMMON_ILIAC_A, COMMON_ILIAC_V)

# -- laterality ----------------------------------------------------------------------------
add("right kidney", "MR", None, KIDNEY.on("right"))
add("kidney, left", "CT", None, KIDNEY.on("left"))
add("both kidneys", "CT", None, KIDNEY)
add("bilateral adrenal glands", "MR", None, ADRENAL)
add("lt adrenal", "CT", None, ADRENAL.on("left"))
add("rt femur", "CT", None, FEMUR.on("right"))
add("left and right humerus", "CT", None, HUMERUS)
add("R parotid", "CT", None, PAROTID.on("right"))
add("left optic nerve", "CT", None, OPTIC_NERVE.on("left"))
add("right lens", "CT", None, LENS.on("right"))
add("left gluteus maximus", "CT", None, GLUTEUS_MAX.on("left"))
add("gluteus medius bilaterally", "MR", None, GLUTEUS_MED)
add("right iliopsoas", "MR", None, ILIOPSOAS.on("right"))
add("left upper lobe", "CT", None, UPPER_LOBE_L)
add("RUL", "CT", None, UPPER_LOBE_R)
add("right middle lobe", "CT", None, MIDDLE_LOBE)
add("lower lobes L/R", "CT", None, LOWER_LOBE)
add("left lower lobe", "CT", None, LOWER_LOBE.on("left"))
add("trapezius left", "CT", None, TRAPEZIUS.on("left"))
add("left scapula", "CT", None, SCAPULA.on("left"))
add("right common iliac artery", "CT", None, COMMON_ILIAC_A.on("right"))
add("left kidney cyst", "CT", None, KIDNEY_CYST.on("left"))
add("left hippocampus", "CT", None, HIPPOCAMPUS.on("left"))

# -- vertebrae and ribs --------------------------------------------------------------------
add("T12 vertebra", "CT", None, vertebrae("T12"))
add("L1 vertebral body", "MR", None, vertebrae("L1"))
add("C2", "CT", None, vertebrae("C2"))
add("vertebrae T10 through L2", "CT", None, vertebrae("T10", "T11", "T12", "L1", "L2"))
add("C5-C7", "CT", None, vertebrae("C5", "C6", "C7"))
add("cervical vertebrae", "MR", None, vertebrae(*(f"C{i}" for i in range(1, 8))))
add("thoracic spine T1 to T4", "CT", None, vertebrae("T1", "T2", "T3", "T4"))
add("lumbar vertebrae L3-L5", "CT", None, vertebrae("L3", "L4", "L5"))
add("left 5th rib", "CT", None, ribs("left", 5))
add("right ribs 1-3", "CT", None, ribs("right", 1, 2, 3))
add("ribs 11 and 12 on both sides", "CT", None, ribs(None, 11, 12))
add("the floating ribs", "CT", None, ribs(None, 11, 12))
add("left ribs 8 to 10", "CT", None, ribs("left", 8, 9, 10))
add("right seventh rib", "CT", None, ribs("right", 7))
add("all left ribs", "CT", None, ribs("left", *ALL_RIBS))

# -- exclusions ----------------------------------------------------------------------------
add("liver, spleen and kidneys but not the pancreas", "CT", None, LIVER, SPLEEN, KIDNEY)
add("liver but not the tumour", "CT", None, LIVER)
add("abdominal aorta and IVC, excluding the portal vein", "CT", None, AORTA, IVC)

# -- MR sequences --------------------------------------------------------------------------
add("prostate on T2", "MR:T2", None, PROSTATE)
add("brain mask on the T1", "MR:T1", None, BRAIN)
add("skull stripping, FLAIR", "MR:FLAIR", None, BRAIN)
add("stroke lesion on DWI", "MR:DWI", None, STROKE)
add("infarct core ADC", "MR:ADC", None, STROKE)
add("stroke lesion, T1 weighted", "MR:T1", None, STROKE)
add("enhancing tumour on T1 post gad", "MR:T1C", None, ENHANCING_TUMOUR)
add("whole tumour on FLAIR", "MR:FLAIR", None, WHOLE_TUMOUR)
add("tumour core, T1C", "MR:T1C", None, TUMOUR_CORE)
add("liver on T2 HASTE", "MR:T2", None, LIVER)
add("spleen, T1 weighted MR", "MR:T1", None, SPLEEN)
add("LV myocardium on cine MR", "MR", None, MYOCARDIUM)

# -- PET/CT --------------------------------------------------------------------------------
add("FDG-avid lesions", "PT+CT", None, c("108369006", name=r"^tumor$"))
add("PET/CT whole-body tumour burden", None, "PT+CT", c("108369006", name=r"^tumor$"))
add("PSMA PET - lesions", "PT", None, c("108369006", name=r"^tumor$"))
add("head and neck primary GTV and involved nodes on PET/CT", None, "PT+CT", GTVP, GTVN)

# -- ultrasound ----------------------------------------------------------------------------
add("breast lesion on ABUS", "US", None, BREAST_TUMOUR)
add("breast tumour, automated breast ultrasound", None, "US", BREAST_TUMOUR)

# -- no modality at all --------------------------------------------------------------------
add("spleen", None, None, SPLEEN)
add("left atrial appendage and pulmonary veins", None, None, LAA, PULM_VEIN)
add("pancreas", None, None, PANCREAS)

# -- negatives: structures no dataset covers -----------------------------------------------
add("appendix", "CT", None)
add("the thymus", "CT", None)
add("retina", "MR", None)
add("ovaries", "MR", None)
add("testicles", "MR", None)
add("anterior cruciate ligament", "MR", None)
add("medial meniscus", "MR", None)
add("rotator cuff tendon tear", "MR", None)
add("carpal tunnel median nerve", "MR", None)
add("pineal gland", "CT", None)
add("tonsils", "CT", None)
add("achilles tendon", "MR", None)
add("uterine fibroids", "MR", None)
add("gallstones", "CT", None)
add("vocal cord polyp", "CT", None)
add("lymphocele", "CT", None)
add("placenta", "MR", None)
add("umbilical hernia", "CT", None)
add("peripheral zone of the prostate", "CT", None)
add("thyroid nodule", "CT", None)
add("displaced fractures of the right ribs 5 to 8", "CT", None)

# -- negatives: covered structures on a modality no dataset accepts -------------------------
add("liver", "PT+CT", None)
add("kidneys on renal ultrasound", None, "US")
add("left ventricle on echocardiography", None, "US")
add("spleen on the PET", None, "PT+CT")
add("thyroid ultrasound", None, "US")
add("brain on PET/CT", None, "PT+CT")
add("prostate zones on CT", None, "CT")
add("gallbladder US", None, "US")

# -- negatives: no anatomy -----------------------------------------------------------------
add("please run the usual", "CT", None)
add("urgent, thanks", "CT", None)
add("follow-up study", "MR", None)
add("segment everything you can see that looks abnormal?", None, None)
add("as per protocol", "CT", None)

# -- round five (issue #14): new requests over the whole registry, in new words ----------------
COUINAUD = C(("71133005", "277956007", "277957003", "277958008", "277959000", "277960005", "277961009", "277962002"))
# worklist procedure names, several vendors' styles
add("CT ABD W IV CONT - SPLEEN", None, "CT", SPLEEN)
add("MRI ABD WWO: PANCREAS", None, "MR", PANCREAS)
add("CT CHEST WO CONTRAST >> TRACHEA + ESOPHAGUS", None, "CT", TRACHEA, ESOPHAGUS)
add("CT UROGRAM - KIDNEYS BILAT", None, "CT", KIDNEY)
add("CT NECK W - SUBMANDIBULAR GLANDS", None, "CT", SUBMANDIBULAR)
add("CT HEAD W/O - BRAIN", None, "CT", BRAIN)
add("MR BRAIN WO - BRAIN MASK", None, "MR", BRAIN)
add("CTA CHEST - PULMONARY ARTERIES", None, "CT", PULM_ARTERY)
add("CT PELVIS - URINARY BLADDER", None, "CT", BLADDER)
add("CT C-SPINE - C1 TO C3", None, "CT", vertebrae("C1", "C2", "C3"))
add("CT T-SPINE: T11-L1", None, "CT", vertebrae("T11", "T12", "L1"))
add("CT LIVER 3 PHASE - HCC", None, "CT", LIVER_TUMOUR)
add("MR LIVER - SEGMENT THE LIVER", None, "MR", LIVER)
add("CT KIDNEY - LESIONS", None, "CT", KIDNEY_TUMOUR)
add("CT ADRENAL PROTOCOL - LEFT ADRENAL", None, "CT", ADRENAL.on("left"))
add("CT CARDIAC CALCIUM - HEART CHAMBERS LA RA", None, "CT", LA, RA)
add("CT ABD/PELVIS - GB + PANCREAS", None, "CT", GALLBLADDER, PANCREAS)
add("CT CHEST - MEDIASTINAL NODES", None, "CT", MEDIASTINAL_NODES)
add("CT ANGIO ABD - CELIAC AXIS, SMA", None, "CT", CELIAC, SMA)
add("CT THORAX: SVC, IVC", None, "CT", SVC, IVC)
# referrals in full sentences
add("Could you please outline the spleen on this scan?", "CT", None, SPLEEN)
add("We would like the pancreas segmented for volumetry before surgery.", "CT", None, PANCREAS)
add("Please delineate both parotid glands for the radiotherapy plan.", "CT", None, PAROTID)
add("I need the gallbladder and the liver outlined, thank you.", "CT", None, GALLBLADDER, LIVER)
add("Kindly segment the thyroid gland and the trachea.", "CT", None, THYROID, TRACHEA)
add("Can the urinary bladder be contoured?", "MR", None, BLADDER)
add("Requesting a segmentation of the right kidney only.", "CT", None, KIDNEY.on("right"))
add("Please mark the oesophagus and the stomach.", "CT", None, ESOPHAGUS, STOMACH)
add("Outline the brainstem and the spinal cord as organs at risk.", "CT", None, BRAINSTEM, SPINAL_CORD)
add("Would it be possible to contour the optic nerves?", "CT", None, OPTIC_NERVE)
# typos
add("spleeen", "CT", None, SPLEEN)
add("pancraes", "CT", None, PANCREAS)
add("gallbaldder", "CT", None, GALLBLADDER)
add("esophagous", "CT", None, ESOPHAGUS)
add("trachae", "CT", None, TRACHEA)
add("duodenum and stomache", "CT", None, DUODENUM, STOMACH)
add("hippocampus lef", "CT", None, HIPPOCAMPUS.on("left"))
add("thyriod", "CT", None, THYROID)
add("adrenal glnds", "CT", None, ADRENAL)
add("urinary bladdder", "CT", None, BLADDER)
# Latin and eponyms
add("vesica urinaria", "CT", None, BLADDER)
add("ren sinister", "CT", None, KIDNEY.on("left"))
add("glandula parotis", "CT", None, PAROTID)
add("Couinaud segments", "CT", None, COUINAUD)
add("os sacrum", "MR", None, SACRUM)
# lay terms
add("the voice box and windpipe", "CT", None, LARYNX, TRACHEA)
add("shoulder blade on the right", "CT", None, SCAPULA.on("right"))
add("both collar bones", "CT", None, CLAVICLE)
add("breast bone", "CT", None, STERNUM)
add("upper arm bone, left", "CT", None, HUMERUS.on("left"))
add("kneecaps", "CT", None, PATELLA)
add("food pipe and stomach", "CT", None, ESOPHAGUS, STOMACH)
add("belly organs: liver and spleen", "CT", None, LIVER, SPLEEN)
add("the jaw bone", "CT", None, MANDIBLE)
# multi-organ lists with laterality
add("left kidney, right kidney and spleen", "CT", None, KIDNEY, SPLEEN)
add("right parotid and left submandibular gland", "CT", None, PAROTID.on("right"), SUBMANDIBULAR.on("left"))
add("both femurs and both humeri", "CT", None, FEMUR, HUMERUS)
add("left and right hippocampus", "CT", None, HIPPOCAMPUS)
add("liver, spleen, pancreas, kidneys, adrenals", "CT", None, LIVER, SPLEEN, PANCREAS, KIDNEY, ADRENAL)
add("stomach, duodenum, small bowel and colon", "CT", None, STOMACH, DUODENUM, SMALL_BOWEL, COLON)
add("aorta, IVC and portal vein", "CT", None, AORTA, IVC, PORTAL)
add("left lens and left optic nerve", "CT", None, LENS.on("left"), OPTIC_NERVE.on("left"))
add("clavicles L/R and scapulae L/R", "CT", None, CLAVICLE, SCAPULA)
add("trapezius and deltoid, right side", "CT", None, TRAPEZIUS.on("right"), DELTOID.on("right"))
add("gluteus maximus both sides", "CT", None, GLUTEUS_MAX)
add("iliopsoas, left", "CT", None, ILIOPSOAS.on("left"))
# ranges of vertebrae and ribs
add("vertebrae T1 through T4", "CT", None, vertebrae("T1", "T2", "T3", "T4"))
add("C5-C7", "CT", None, vertebrae("C5", "C6", "C7"))
add("L2 to L4 vertebral bodies", "CT", None, vertebrae("L2", "L3", "L4"))
add("the first three lumbar vertebrae", "CT", None, vertebrae("L1", "L2", "L3"))
add("T12 and L1", "CT", None, vertebrae("T12", "L1"))
add("ribs 1-3 on the right", "CT", None, ribs("right", 1, 2, 3))
add("left 5th and 6th ribs", "CT", None, ribs("left", 5, 6))
add("ribs 4 and 5", "CT", None, ribs(None, 4, 5))
add("right rib 12", "CT", None, ribs("right", 12))
add("lumbar spine L3-L5 on MR", "MR", None, vertebrae("L3", "L4", "L5"))
# exclusions
add("spleen, pancreas and kidneys except the left kidney", "CT", None, SPLEEN, PANCREAS, KIDNEY.on("right"))
add("spleen and kidneys, excluding the left kidney", "CT", None, SPLEEN, KIDNEY.on("right"))
add("stomach and duodenum but not the esophagus", "CT", None, STOMACH, DUODENUM)
add("parotids other than the left one", "CT", None, PAROTID.on("right"))
add("bladder, not the prostate", "CT", None, BLADDER)
add("kidneys without the tumours", "CT", None, KIDNEY)
WITHOUT["kidneys without the tumours"] = KIDNEY_TUMOUR
add("trachea and esophagus, except the thyroid", "CT", None, TRACHEA, ESOPHAGUS)
add("ribs 1-12 left, except rib 12", "CT", None, ribs("left", *range(1, 12)))
# MR sequences
add("liver on T1 weighted images", "MR:T1", None, LIVER)
add("kidneys, T2", "MR:T2", None, KIDNEY)
add("brain extraction from the T2", "MR:T2", None, BRAIN)
add("spleen on DWI", "MR:DWI", None, SPLEEN)
add("prostate gland, axial T2", "MR:T2", None, PROSTATE)
add("pancreas on MR", "MR", None, PANCREAS)
add("sacrum on the T2 sagittal", "MR:T2", None, SACRUM)
add("MR BRAIN FLAIR - WHOLE TUMOR", None, "MR:FLAIR", WHOLE_TUMOUR)
add("diffusion weighted - stroke", None, "MR:DWI", STROKE)
add("brain on 3D T1", "MR:T1", None, BRAIN)
# PET/CT
add("PET-CT head and neck: GTVp", None, "PT+CT", GTVP)
add("GTVn on the PET/CT", "PT+CT", None, GTVN)
add("FDG PET/CT whole body lesions", None, "PT+CT", c("108369006", name=r"^tumor$"))
add("hypermetabolic lesions, PET-CT", "PT+CT", None, c("108369006", name=r"^tumor$"))
add("primary tumour and nodal GTV, PET/CT", "PT+CT", None, GTVP, GTVN)
# body composition, muscles and tissues
add("skeletal muscle area at L3", "CT", None, SKELETAL_MUSCLE)
add("subcutaneous fat and skeletal muscle", "CT", None, SUBCUT_FAT, SKELETAL_MUSCLE)
add("sternocleidomastoids L/R", "CT", None, STERNOCLEIDO)
add("left SCM", "CT", None, STERNOCLEIDO.on("left"))
add("pectoralis major, both", "CT", None, PECTORALIS_MAJOR)
add("latissimus dorsi right", "CT", None, LATISSIMUS.on("right"))
add("carpal bones of the wrist", "CT", None, CARPUS)
add("tarsal bones", "CT", None, TARSUS)
add("patellae on CT", "CT", None, PATELLA)
# vessels
add("common iliac arteries", "CT", None, COMMON_ILIAC_A)
add("renal arteries and veins", "CT", None, RENAL_ARTERY, RENAL_VEIN)
add("renal veins", "CT", None, RENAL_VEIN)
add("brachiocephalic trunk and SVC", "CT", None, BRACHIOCEPHALIC_TRUNK, SVC)
add("coronary arteries", "CT", None, CORONARY)
# negatives: uncovered structures, unaccepted modalities, no anatomy
add("kidney stones", "CT", None)
add("CT KUB - RENAL CALCULI", None, "CT")
add("gallstone burden", "MR", None)
add("posterior cruciate ligament, right knee", "MR", None)
add("lateral meniscus tear", "MR", None)
add("supraspinatus tendon", "MR", None)
add("the appendix please", "CT", None)
add("ovarian cyst", "MR", None)
add("pineal", "MR", None)
add("uterine fibroid mapping", "MR", None)
add("spleen on PET-CT", "PT+CT", None)
add("pancreas, PET/CT", None, "PT+CT")
add("renal ultrasound - kidneys", None, "US")
add("liver on ultrasound", None, "US")
add("thyroid US both lobes", None, "US")
add("please compare with prior", "CT", None)
add("routine", "MR", None)
add("no segmentation needed, report only", "CT", None)
add("see attached request form", None, None)
add("any abnormality?", "CT", None)

# -- round six: exclusions, sides over lists, number words, referral sentences, organ + lesion --
# exclusions
add("both kidneys apart from the right one", "CT", None, KIDNEY.on("left"))
add("adrenals but not the left adrenal", "CT", None, ADRENAL.on("right"))
add("submandibular glands other than the right", "CT", None, SUBMANDIBULAR.on("left"))
add("femurs, leaving out the right femur", "CT", None, FEMUR.on("left"))
add("humeri except the left humerus", "CT", None, HUMERUS.on("right"))
add("liver, not the gallbladder", "CT", None, LIVER)
add("stomach and pancreas, not the spleen", "CT", None, STOMACH, PANCREAS)
add("liver without its tumours", "CT", None, LIVER)
add("kidneys without the cysts", "CT", None, KIDNEY)
add("spleen, liver and pancreas excluding the liver", "CT", None, SPLEEN, PANCREAS)
add("all ribs apart from the floating ribs, left side", "CT", None, ribs("left", *range(1, 11)))
add("aorta and IVC, but not the portal vein", "CT", None, AORTA, IVC)
add("trachea, aside from the esophagus", "CT", None, TRACHEA)
add("bladder and rectum, please do not include the prostate", "CT", None, BLADDER, RECTUM)
add("lumbar vertebrae except L5", "CT", None, vertebrae("L1", "L2", "L3", "L4"))
add("parotid glands other than the left one", "MR", None)
add("liver without contrast", "CT", None, LIVER)
add("CT ABDOMEN WITHOUT IV CONTRAST - SPLEEN", None, "CT", SPLEEN)
# sides over lists
add("right kidney and ureter", "CT", None, KIDNEY.on("right"), URETER.on("right"))
add("left kidney and adrenal gland", "CT", None, KIDNEY.on("left"), ADRENAL.on("left"))
add("left femur and humerus", "CT", None, FEMUR.on("left"), HUMERUS.on("left"))
add("right 3rd and 4th ribs", "CT", None, ribs("right", 3, 4))
add("left seventh, eighth and ninth ribs", "CT", None, ribs("left", 7, 8, 9))
add("clavicle and scapula, left side", "CT", None, CLAVICLE.on("left"), SCAPULA.on("left"))
add("hip and femur, right side", "CT", None, HIP.on("right"), FEMUR.on("right"))
add("left hip, right hip", "CT", None, HIP)
add("right parotid and left parotid", "CT", None, PAROTID)
add("left humerus, right humerus and sternum", "CT", None, HUMERUS, STERNUM)
add("right kidney and both adrenals", "CT", None, KIDNEY.on("right"), ADRENAL)
add("left kidney and spleen", "CT", None, KIDNEY.on("left"), SPLEEN)
add("bilateral clavicles and scapulae", "CT", None, CLAVICLE, SCAPULA)
add("right optic nerve and lens", "CT", None, OPTIC_NERVE.on("right"), LENS.on("right"))
# number words and ordinals
add("the first two lumbar vertebrae", "CT", None, vertebrae("L1", "L2"))
add("the last two lumbar vertebrae", "CT", None, vertebrae("L4", "L5"))
add("first three cervical vertebrae", "CT", None, vertebrae("C1", "C2", "C3"))
add("the lowest three thoracic vertebrae", "CT", None, vertebrae("T10", "T11", "T12"))
add("the last two ribs on the left", "CT", None, ribs("left", 11, 12))
add("first 2 ribs, right side", "CT", None, ribs("right", 1, 2))
add("third to fifth ribs", "CT", None, ribs(None, 3, 4, 5))
add("ribs seven to nine", "CT", None, ribs(None, 7, 8, 9))
add("L-spine 2 through 4", "CT", None, vertebrae("L2", "L3", "L4"))
add("C spine 5 to 7", "CT", None, vertebrae("C5", "C6", "C7"))
add("T-spine 4-6", "CT", None, vertebrae("T4", "T5", "T6"))
add("second and third lumbar vertebrae", "CT", None, vertebrae("L2", "L3"))
# referral sentences
add("Requesting segmentation of the spleen only.", "CT", None, SPLEEN)
add("Could you please outline the pancreas?", "CT", None, PANCREAS)
add("I would like volumes of both kidneys.", "CT", None, KIDNEY)
add("We would appreciate a contour of the left parotid.", "CT", None, PAROTID.on("left"))
add("Kindly segment the liver for volumetry.", "MR", None, LIVER)
add("Please could you delineate the prostate gland on this study", "MR", None, PROSTATE)
add("Request: outline the urinary bladder and rectum.", "CT", None, BLADDER, RECTUM)
add("Would you be able to contour the brainstem and spinal cord", "CT", None, BRAINSTEM, SPINAL_CORD)
add("I need the right femur segmented, thanks", "CT", None, FEMUR.on("right"))
add("Requesting volumes of the spleen and liver, please.", "CT", None, SPLEEN, LIVER)
# organ plus its lesions
add("kidneys and kidney tumours", "CT", None, KIDNEY, KIDNEY_TUMOUR)
add("liver plus hepatic metastases", "CT", None, LIVER, LIVER_TUMOUR)
add("liver as well as liver tumours", "CT", None, LIVER, LIVER_TUMOUR)
add("kidney, renal cysts", "CT", None, KIDNEY, KIDNEY_CYST)
add("lungs nodules and trachea", "CT", None, LUNG_NODULE, TRACHEA)
# negatives
add("everything except the liver", "CT", None)
add("left menisci and the ACL", "MR", None)
add("Could you please outline the thymus?", "CT", None)
add("Requesting segmentation, see history.", "CT", None)
add("kidneys without the kidneys", "CT", None)
add("first three lumbar vertebrae on ultrasound", "US", None)


# -- round seven: one side asked takes that side only; a label coded with a part does not answer the whole --
HEAD_OF_FEMUR = c("2812003")
# one side, paired structures (held-out convention 4); no sided ureter, deltoid or trapezius label exists
add("right ureter", "CT", None)
add("left ureter only", "CT", None)
add("CT urogram - left kidney and left ureter", None, "CT", KIDNEY.on("left"), URETER.on("left"))
add("deltoid, left", "CT", None)
add("L kidney, L adrenal", "CT", None, KIDNEY.on("left"), ADRENAL.on("left"))
add("rt parotid and rt submandibular gland", "CT", None, PAROTID.on("right"), SUBMANDIBULAR.on("right"))
add("left lung upper lobe", "CT", None, UPPER_LOBE_L)
add("right humerus and right scapula", "CT", None, HUMERUS.on("right"), SCAPULA.on("right"))
add("Please contour the left optic nerve.", "CT", None, OPTIC_NERVE.on("left"))
add("the right eye lens", "CT", None, LENS.on("right"))
add("left hip bone", "CT", None, HIP.on("left"))
add("RIGHT KIDNEY VOLUME", None, "CT", KIDNEY.on("right"))
add("left kidney, spleen and pancreas", "CT", None, KIDNEY.on("left"), SPLEEN, PANCREAS)
add("right kidney and liver", "CT", None, KIDNEY.on("right"), LIVER)
add("the left clavicle", "CT", None, CLAVICLE.on("left"))
add("right gluteus medius", "CT", None, GLUTEUS_MED.on("right"))
add("left iliopsoas muscle", "CT", None, ILIOPSOAS.on("left"))
# both sides of the same paired structures: every label of it
add("both ureters", "CT", None, URETER)
add("deltoids, bilateral", "CT", None, DELTOID)
add("trapezius muscles L and R", "CT", None, TRAPEZIUS)
add("ureters and kidneys", "CT", None, URETER, KIDNEY)
# a label coded with a part (Head of femur) answers the part, not the whole (convention 2)
add("femoral head, left", "CT", None, HEAD_OF_FEMUR.on("left"))
add("head of the right femur", "CT", None, HEAD_OF_FEMUR.on("right"))
add("both femoral heads", "CT", None, HEAD_OF_FEMUR)
add("left femur", "CT", None, FEMUR.on("left"))
add("femora, both sides", "CT", None, FEMUR)
add("thigh bones", "CT", None, FEMUR)
add("right thighbone", "CT", None, FEMUR.on("right"))


# -- round eight: more exclusion words, MR techniques named for the modality, Roman Couinaud numbers,
# -- TG-263 structure identifiers, abbreviations and lay or Latin names from the lexicon
INTERNAL_CAROTID, INTERNAL_JUGULAR = c("86117002"), c("12123001")
LVOT, CHEST_CAVITY, GLOTTIS = c("13418002"), c("43799004"), c("1307006")
add("spleen and pancreas, omit the stomach", "CT", None, SPLEEN, PANCREAS)
add("liver, no gallbladder please", "CT", None, LIVER)
add("aorta and IVC but no renal vessels", "CT", None, AORTA, IVC)
add("trachea and esophagus - skip the thyroid", "CT", None, TRACHEA, ESOPHAGUS)
add("pancreas; the duodenum is not needed", "CT", None, PANCREAS)
add("segment the spleen without IV contrast", "CT", None, SPLEEN)
add("spleen and liver on the Dixon sequence", "MR", None, SPLEEN, LIVER)
add("pancreas on TrueFISP", None, "MR", PANCREAS)
add("brain aneurysm, TOF", None, None, ANEURYSM)
add("Couinaud segment VII", "CT", None, c("277961009"))
add("liver segments II to IV", "CT", None, c("277956007"), c("277957003"), c("277958008"))
add("Parotid_R and Glnd_Submand_L", "CT", None, PAROTID.on("right"), SUBMANDIBULAR.on("left"))
add("OpticNrv_R", "CT", None, OPTIC_NERVE.on("right"))
add("right ICA", "CT", None, INTERNAL_CAROTID.on("right"))
add("IJVs", "CT", None, INTERNAL_JUGULAR)
add("bilateral SMGs", "CT", None, SUBMANDIBULAR)
add("left ventricular outflow tract", "CT", None, LVOT)
add("LCIA and RCIV", "CT", None, COMMON_ILIAC_A.on("left"), COMMON_ILIAC_V.on("right"))
add("SAT and skeletal muscle at L3", "CT", None, SUBCUT_FAT, SKELETAL_MUSCLE)
add("os hyoideum and glandula thyroidea", "CT", None, HYOID, THYROID)
add("medulla spinalis", "MR", None, SPINAL_CORD)
add("truncus coeliacus", "CT", None, CELIAC)
add("the thoracic cavity", "CT", None, CHEST_CAVITY)
add("pericardial sac", "CT", None, PERICARDIUM)
add("left pec major", "CT", None, PECTORALIS_MAJOR.on("left"))
add("true vocal cords", "CT", None, GLOTTIS)
add("the breathing tube", "CT", None, TRACHEA)
add("my tummy", "CT", None, STOMACH)
add("small guts", "CT", None, SMALL_BOWEL)

# a label whose type is one side's heart structure has that side ("Myocardium" typed Left ventricle myocardium)
add("LV myocardium on cine MR", None, "MR", MYOCARDIUM)
add("myocardium of the left ventricle", "MR", None, MYOCARDIUM)
add("LV and RV cavities, short axis", "MR", None, LV, RV)
add("left ventricular wall", "CT", None, MYOCARDIUM)

# one side named of a structure whose labels have none: nothing (convention 4); a side spread from
# the first item of a list does not take a single organ's label away
add("the left kneecap only", "CT", None)
add("R breast", "CT", None)
add("tibia, left side", "CT", None)
add("left kidney and the spleen", "CT", None, KIDNEY.on("left"), SPLEEN)

# an item made of series adjectives takes the next item's head noun; the psoas major is a part of
# the iliopsoas, not the whole (convention 2)
PSOAS_MAJOR = c("102292000", name=r"psoas_major")
add("frontal and temporal lobes", "CT", None, FRONTAL, TEMPORAL_LOBE)
add("the upper and lower lobes of the left lung", "CT", None, UPPER_LOBE_L, LOWER_LOBE.on("left"))
add("psoas major, both sides", "CT", None, PSOAS_MAJOR)
add("the right psoas", "CT", None, PSOAS_MAJOR.on("right"))
add("iliopsoas on both sides", "CT", None, ILIOPSOAS)

# a phrase that places a structure is not the structure (its lesion keeps it: "cysts on the kidneys");
# radiographs, mammograms and scintigraphy are modalities no dataset accepts (negatives)
add("the adrenals on top of the kidneys", "CT", None, ADRENAL)
add("L4 and L5 on the lumbar spine MRI", "MR", None, vertebrae("L4", "L5"))
add("gallbladder beneath the liver", "CT", None, GALLBLADDER)
add("ribs 9 to 11 on the left side", "CT", None, ribs("left", 9, 10, 11))
add("lumen", "CT", None)
add("both clavicles on the chest radiograph", None, None)

# -- round nine: report sentences (findings words and section headers are not anatomy), order-entry
# -- shorthand ("vol", "thx"), procedures are why, not what ("pre nephrectomy"), and corrections
add("FINDINGS: markedly enlarged spleen. Please measure the spleen volume.", "CT", None, SPLEEN)
add("Conclusion: heterogeneous thyroid, mildly enlarged; outline the thyroid", "CT", None, THYROID)
add("pancreas vol thx", "CT", None, PANCREAS)
add("gallbladder seg post cholecystostomy", "CT", None, GALLBLADDER)
add("spleen before splenectomy", "CT", None, SPLEEN)
add("the left kidney. Sorry, I meant the right kidney", "CT", None, KIDNEY.on("right"))
add("liver only; actually add the spleen too", "CT", None, LIVER, SPLEEN)
add("stomach, correction: duodenum", "CT", None, DUODENUM)
add("spleen vol for ITP", "CT", None, SPLEEN)
add("gallbladder ?cholecystitis", "CT", None, GALLBLADDER)
add("bladder volume post TURBT f/u", "CT", None, BLADDER)
add("both adrenals. sorry, just the right one", "CT", None, ADRENAL.on("right"))
add("left kidney, I meant right", "CT", None, KIDNEY.on("right"))
add("spleen please. disregard, wrong patient", "CT", None)
add("pancreas. Actually cancel that, the study is withdrawn", "CT", None)

# order-entry abbreviations and Latin plurals of the lexicon; TG-263's VB is the vertebral body;
# devices (stent, filter) are what the study is for
add("VB_T12 and VB_L1", "CT", None, vertebrae("T12", "L1"))
add("duod and panc", "CT", None, DUODENUM, PANCREAS)
add("trach and oesophagus, stent planning", "CT", None, TRACHEA, ESOPHAGUS)
add("glutei maximi", "CT", None, GLUTEUS_MAX)
add("gaster", "CT", None, STOMACH)

# findings of trauma and protocol boilerplate (function, gated, tracking) are not anatomy; the
# endocardial contour of a ventricle is its cavity. (Session nine: an adjective describes the
# structure to segment, "fractured ribs"; the noun names the finding, "fractures of the ribs",
# which no dataset segments: the fourth blind set's convention, a negative row below.)
add("displaced fractured right ribs 5 to 8", "CT", None, ribs("right", 5, 6, 7, 8))
add("CT SHOULDER - humerus, instability tracking", "CT", None, c("85050009"))
add("LV endocardium on the cine", None, "MR", LV)

# a bare lesion word refers back to an organ's lesion named before it
add("Known hepatic metastases. Please contour the metastases for SBRT.", "CT", None, LIVER_TUMOUR)
add("kidney cysts, segment all cysts", "CT", None, KIDNEY_CYST)


# FDI tooth numbers (quadrant, position) are tooth names; an ordinal in a tooth's name is no index;
# a tooth is not its pulp (convention 2)
def tooth(code: str, fdi: int) -> C:
    return c(code, name=rf"_fdi{fdi}$")


add("cone beam CT, teeth 26 and 43", None, "CT", tooth("865988009", 26), tooth("860785004", 43))
add("FDI 35 please, dental CBCT", None, "CT", tooth("24573005", 35))
add("the upper left first molar on the CBCT", None, "CT", tooth("865988009", 26))
add("upper right central incisor", "CT", None, tooth("422653006", 11))
add("breast tissue on the mammogram", None, None)
add("thyroid scintigraphy - thyroid lobes", None, None)

# lexicon: the aortic sinuses (a side and "sinus of Valsalva" / "coronary cusp"), finger and toe bones
# (TotalSegmentator's phalanges), the hepatic portal system; "sinuses" is the plural of "sinus"
add("left sinus of Valsalva", "CT", None, c("36371001"))
add("right coronary cusp of the aortic valve", "CT", None, c("89093001"))
add("finger bones", "CT", None, c("7569003"))
add("phalanges of the feet", "CT", None, c("29707007"))
add("hepatic portal system", "CT", None, PORTAL)
add("aortic centreline", "CT", None, AORTA)
add("frontal and maxillary sinuses", "CT", None, FRONTAL_SINUS, MAXILLARY_SINUS)

# "bilaterally"; "CN" is a cranial nerve; a junction or a tree is its structures; external ear canals;
# a canal inside a bone is not a part of the bone ("mandible" is not its incisive canals)
add("twelfth ribs bilaterally", "CT", None, ribs(None, 12))
add("CN II, left", "CT", None, OPTIC_NERVE.on("left"))
add("cervicothoracic junction C7/T1", "CT", None, vertebrae("C7", "T1"))
add("pulmonary arterial tree", "CT", None, PULM_ARTERY)
add("both external ear canals", "CT", None, c("84301002"))
add("mandible", "CT", None, MANDIBLE)

# lexicon: salivary glands (parotids and submandibular glands), "panc", the infrarenal IVC, the face's
# soft tissue, signal words ("hyperintense", "gross", a pancreatic "tail") are filler; accessory spleen and papillary
# muscles known but uncovered; "primary" and "nodal" share the head noun after them
FACE = c("89545001")
add("major salivary glands", "CT", None, PAROTID, SUBMANDIBULAR)
add("panc tail lesion", "CT", None, c("108369006", name=r"pancrea"))
add("the infrarenal IVC", "CT", None, IVC)
add("soft tissue of the face", "CT", None, FACE)
add("DWI hyperintense stroke", "MR:DWI", None, STROKE)
add("splenule", "CT", None)
add("papillary muscle of the left ventricle", "CT", None)
add("primary and nodal gross tumour volumes", "PT+CT", None, GTVP, GTVN)

# a hyphenated prefix takes the stem of the list's last word; "common carotid" without "artery"
add("oro- and hypopharynx", "CT", None, OROPHARYNX, c("81502006"))
add("left common carotid", "CT", None, c("113263003"))

# a part named with its whole ("X of the Y") is the part
add("cricoid cartilage of the larynx", "CT", None, c("309312004", name=r"cricoid"))
add("the septum of the heart", "CT", None)

# an indication or timing clause says why, not what; "paediatric" names the patient, not a structure
add("liver volumetry, rule out metastases", "CT", None, LIVER)
add("pancreas; history of pancreatitis", "CT", None, PANCREAS)
add("spleen size after splenic trauma", "CT", None, SPLEEN)
add("paediatric spleen", "CT", None, SPLEEN)

# a number that is part of a structure's name ("4th ventricle") names it, not an index
add("the 4th ventricle", "CT", None, c("35918002"))
add("lower jaw bone", "CT", None, MANDIBLE)

# round eleven: tumour, mass, lesion and nodule are one referent; a bare one of them refers back to the
# organ's lesion named before it under another of these words
add("hepatic mass on the previous CT. Outline the tumour, please", "CT", None, LIVER_TUMOUR)
add("renal tumour found on ultrasound; CT to contour the lesion", "CT", None, KIDNEY_TUMOUR)
add("pulmonary nodule follow-up: segment the lesion", "CT", None, LUNG_NODULE)

# round eleven: an order line writes the structure, the command or quantity, then why: unknown words after
# the command are the reason (words before it still count: a diverticulum is not the bladder)
add("liver vol nafld baseline", "CT", None, LIVER)
add("pancreas seg ipmn surveillance", "CT", None, PANCREAS)
add("aorta seg marfan yearly", "CT", None, AORTA)
add("bladder diverticulum seg", "CT", None)

# round eleven: a request written for a machine: keys, tags and pipeline steps are the form, values the request
add("stage 3 = pancreas segmentation", "CT", None, PANCREAS)
add("<target>spleen</target>", "CT", None, SPLEEN)
add("job.target=aorta; job.output=seg", "CT", None, AORTA)
add('{"roi": "stomach", "format": "nifti"}', "CT", None, STOMACH)

# round eleven: TG-263 class prefixes (A_, V_, Musc_, Glnd_, Bone_ ...) name the class of the rest of the name,
# and add nothing when the rest names a structure by itself; with an unknown rest the prefix stays unread
add("Bone_Sacrum", "CT", None, SACRUM)
add("V_Venacava_I", "CT", None, IVC)
add("A_Mesenteric_S", "CT", None, SMA)
add("A_LCX", "CT", None)

# round eleven: a name written in camel case is its words ("UrinaryBladder", "SubmandibularGland_R" above)
add("UrinaryBladder", "CT", None, BLADDER)
add("RightAdrenal", "CT", None, ADRENAL.on("right"))
add("PenileBulb", "CT", None)

# round twelve: dictation breaks a name into two heard words ("tra chea"), runs words together ("rightkidney"),
# or hears a sound-alike for one word of a longer name ("superior vayna cava"); a pair whose words are both
# known is not joined ("kidney ca": the kidney's cancer)
add("contour the tra chea", "CT", None, TRACHEA)
add("clavicle and scap ula", "CT", None, SCAPULA, CLAVICLE)
add("rightkidney only", "CT", None, KIDNEY.on("right"))
add("spleenandliver volumes", "CT", None, SPLEEN, LIVER)
add("superior vayna cava", "CT", None, SVC)

# round twelve: a bare lesion under a header that names an organ's lesion is that lesion
add("CT LIVER MASS PROTOCOL - MASS VOLUME", None, "CT", LIVER_TUMOUR)
add("CT RENAL TUMOUR STAGING - TUMOR SEG", None, "CT", KIDNEY_TUMOUR)

# round twelve: a worklist line's record keys (HL7 segment and field names, a code's coding system, accession,
# order and record numbers) are not the request ("ACC:" before a number is not adrenocortical carcinoma); "|"
# separates HL7 fields, "^" their components
add("OBR|1|ORD55210|RX77104|74160^CT ABDOMEN W CONTRAST^C4||||||||segment pancreas", None, "CT", PANCREAS)
add("Accession #RX-4410923 CT CHEST WO - esophagus", None, "CT", ESOPHAGUS)
add("MRN: 00112233 CT NECK - thyroid gland", None, "CT", THYROID)
add("ACC: A5512340 CT CHEST - trachea", None, "CT", TRACHEA)


def admitted(dataset: Dataset, modality: str | None, text_modality: str | None) -> bool:
    if modality:
        return dataset.accepts(modality)
    if text_modality:
        return dataset.accepts(text_modality) or (text_modality == "CT" and dataset.accepts("PT+CT"))
    return True


def expected(
    modality: str | None, text_modality: str | None, concepts: list[C], without: C | None = None
) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for dataset in REGISTRY.datasets.values():
        if not admitted(dataset, modality, text_modality):
            continue
        values: set[int] = set()
        for label in dataset.labels.values():
            if any(concept(label) for concept in concepts):
                key = (dataset.name, label.name)
                values.update(WITH_PARTS.get(key, label.values))
        if without is not None:
            values -= {v for label in dataset.labels.values() if without(label) for v in label.values}
        if values:
            out[dataset.name] = sorted(values)
    return dict(sorted(out.items()))


def main() -> None:
    lines = []
    for query, modality, text_modality, concepts in REQUESTS:
        row: dict[str, object] = {"query": query}
        if modality:
            row["modality"] = modality
        row["expected_datasets"] = expected(modality, text_modality, concepts, WITHOUT.get(query))
        if concepts and not row["expected_datasets"]:
            raise SystemExit(f"{query!r}: its concepts match no label of the registry")
        lines.append(json.dumps(row))
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} requests to {OUT}")


if __name__ == "__main__":
    main()
