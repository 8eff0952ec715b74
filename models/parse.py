"""Grammar for segmentation requests: modality hint, region hints and targets.

A request such as ``"CT ABD/PEL W CON - LIVER + SPLEEN VOLUMETRY"`` or
``"segment both kidneys and the 3rd left rib on the T1 MR"`` is turned into

* a modality hint (``CT``, ``MR``, ``MR:T1`` ... ``PT+CT``, ``US``) when the
  text names one (the caller's DICOM modality always wins over it),
* region hints (``abdomen``, ``pelvis`` ...) from worklist-style context,
* a list of :class:`ParsedTarget`: one per requested structure, each a
  *concept* (a tuple of canonical tokens such as ``("kidney",)`` or
  ``("liver", "tumor")``) plus laterality, indices (rib numbers, vertebral
  levels) and flags (lesion, negated).

Label names of the registry go through the same canonicaliser
(:func:`label_concept`), so matching is a comparison of concepts rather than of
strings: ``"suprarenal_gland_left"`` and ``"left adrenal"`` both become
``(("adrenal",), left)``.  This module holds the rules only.  Every way to name a
structure is data in ``lexicon.yaml`` (:mod:`medsegagent.models.lexicon`); the words
the rules apply to (stop words, sides, lesion and region words, plural forms) are
data in ``grammar_words.yaml`` (:mod:`medsegagent.models.grammar_words`).
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from rapidfuzz.distance import OSA

from medsegagent.models.grammar_words import SPINE_LEVELS, ContextReading, load_grammar_words
from medsegagent.models.lexicon import Concept as LexiconConcept
from medsegagent.models.lexicon import Lexicon, load_lexicon

# ---------------------------------------------------------------------------
# Word classes (models/grammar_words.yaml): the words the rules below apply to
# ---------------------------------------------------------------------------

WORDS = load_grammar_words()
#: Words that carry no structure: commands, politeness, imaging boilerplate, findings.
STOPWORDS = WORDS.all_stopwords
#: Surgical and endoscopic procedures ("pre hepatectomy", "post cholecystectomy") are why, not what.
_PROCEDURE_WORD = re.compile(r"[a-z]{3,}(?:ectomy|otomy|ostomy|plasty|pexy|scopy|graphy)")

#: Token marking a composite concept ("kidney and masses"): it only ever matches exactly.
COMPOSITE = "&"
_COMPOSITE_WORDS = WORDS.composite_words
#: Tokens that make a concept a lesion (after canonicalisation), and those that stand in
#: for each other at a lower score ("liver lesion" ~ "liver tumor").
LESION_TOKENS = WORDS.lesion_words
SOFT_LESION = WORDS.soft_lesion_words
#: Class nouns too vague to stand alone ("arteries"), and generic nouns a request may add
#: to a structure's name ("left atrium cavity"): see grammar_words.yaml.
CLASS_NOUNS = WORDS.class_nouns
GENERIC_NOUNS = WORDS.generic_nouns | WORDS.generic_modifiers  # dropped when the rest reads alone
#: Region words: context for the anatomy stage, not targets by themselves.
REGION_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(WORDS.regions)
#: Side words.  ``l``/``r`` only count as laterality when standing alone.
_LATERAL = MappingProxyType(WORDS.side_of)

_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12,
}  # fmt: skip

_LEVEL_CONTEXT = WORDS.level_context
_HNC_WORDS = WORDS.head_and_neck_disease
_RIB_CLASSES = MappingProxyType(WORDS.rib_classes)
_SEGMENT_LEVELS = MappingProxyType(WORDS.segment_levels)

# ---------------------------------------------------------------------------
# Modality hints
# ---------------------------------------------------------------------------

_SUV_LIMIT = r"(?:\s*(?:max|mean|peak))?(?:\s*(?:of|above|over|>=?|greater\s+than))?(?:\s*\d+(?:\.\d+)?)?\b"
_MODALITY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PT+CT", re.compile(r"\b(?:fdg[\s-]*)?pet\s*(?:[/+\-&]|and|with)?\s*ct\b|\bpetct\b|\bpet\s*/\s*ct\b", re.I)),
    # (an SUV threshold is the PET's, and says which lesions count, not what they are: "lesions above SUV 2.5")
    (
        "PT",
        re.compile(
            r"\b(?:pet|positron\s+emission(?:\s+tomography)?|fdg(?![\s-]*avid)|psma|pt)\b"
            rf"|(?:\b(?:above|over|exceeding|with|greater\s+than)\s+(?:an?\s+)?)?\bsuv{_SUV_LIMIT}",
            re.I,
        ),
    ),
    (
        "MR:T1C",
        re.compile(
            r"\b(?:t1\s*(?:[-+]|w(?:eighted)?)?\s*(?:c\b|ce\b|gd\b|gad\w*|post[\s-]*(?:contrast|gad\w*|gd)|contrast[\s-]*enhanced|with\s+contrast|\+\s*c\b|\+\s*gd\b)|t1c\b|t1ce\b|t1gd\b|t1post\b|post[\s-]*(?:contrast|gad\w*|gd)\s*t1\w*|contrast[\s-]*enhanced\s+t1\w*|gadolinium[\s-]*enhanced\s+t1\w*|cet1\w*)",
            re.I,
        ),
    ),
    ("MR:T1", re.compile(r"\b(?:t1[\s-]*weighted|t1(?:w|wi)?|mprage|spgr)\b", re.I)),
    ("MR:T2", re.compile(r"\b(?:t2[\s-]*weighted|t2(?:w|wi)?|haste)\b(?![\s-]*flair)", re.I)),
    ("MR:FLAIR", re.compile(r"\b(?:t2[\s-]*)?flair\b", re.I)),
    # ("restricted diffusion" is a finding, the stroke's sign on DWI: its words stay, see below)
    ("MR:DWI", re.compile(r"\b(?:dwi|(?<!restricted )diffusion(?:[\s-]*weighted)?(?:\s+imaging)?|b1000)\b", re.I)),
    ("MR:ADC", re.compile(r"\b(?:adc(?:\s+map)?|apparent\s+diffusion\s+coefficient)\b", re.I)),
    (
        "MR",
        re.compile(
            r"\b(?:mri|mr|mra|mrcp|mrs|nmr|cmr|magnetic\s+resonance(?:\s+imaging)?|cine|mr\s+angiography|mpmri|mp-mri"
            # MR techniques named instead of the modality ("on the Dixon", "SSFP cine", "TOF MRA")
            r"|multiparametric|dixon|b?ssfp|true\s*fisp|fiesta|ciss|tof|time[\s-]of[\s-]flight|hepatobiliary\s+phase)\b",
            re.I,
        ),
    ),
    (
        "CT",
        re.compile(
            r"\b(?:ct|cta|ctpa|cect|ncct|nect|hrct|mdct|ldct|cat\s+scan|computed\s+tomography|computerized\s+tomography|computerised\s+tomography|ct\s+angiography|ctu|ctc|cac|cbct|ccta|ctca|cone[\s-]*beam\s+ct)\b",
            re.I,
        ),
    ),
    # Modalities no dataset accepts: named so that the modality stage refuses them, not ignored.
    ("DX", re.compile(r"\b(?:x[\s-]?rays?|radiographs?|radiography|plain\s+films?|cxr)\b", re.I)),
    ("MG", re.compile(r"\b(?:mammogra\w*|tomosynthesis)\b", re.I)),
    # catheter angiography; a "CT/MR angiogram" is CT or MR (XA is read only when neither is named)
    ("XA", re.compile(r"\b(?:angiogra(?:m|ms|phy)|cath(?:eter)?\s+lab|dsa|digital\s+subtraction\s+angio\w*)\b", re.I)),
    # fluoroscopy: barium and water-soluble contrast studies
    (
        "RF",
        re.compile(
            r"\b(?:fluoroscop\w*|videofluoroscop\w*|barium\s+(?:swallow|meal|enema|follow[\s-]*through)"
            r"|contrast\s+swallow|swallow\s+study)\b",
            re.I,
        ),
    ),
    (
        "NM",
        re.compile(
            r"\b(?:scintigra\w*|pertechnetate|spect|bone\s+scan|nuclear\s+medicine|mibg|dat\s*scan|nm|dmsa|mag3"
            r"|tc[\s-]?99m?|99m[\s-]?tc|technetium|uptake\s+scan|hida|renogra\w*|sestamibi|mibi|v\s*/?\s*q\s+scan)\b",
            re.I,
        ),
    ),
    (
        "US",
        re.compile(
            r"\b(?:ultrasound|ultrasonography|sonography|sonogram|sonographic|abus|echography|usg"
            r"|echocardiogra\w*|echo|tte|tee|transthoracic\s+echo\w*|transo?esophageal\s+echo\w*)\b",
            re.I,
        ),
    ),
)
_US_UPPER = re.compile(r"\bUS\b")  # "US" only in capitals: "help us" is not ultrasound

#: A T1/T2 that is a vertebra, not a sequence: "T1 vertebra", "T1-T4", "T1 through L2", "T12".
_VERTEBRA_T = re.compile(
    # (a "T2" listed after it does not make "T1" a level: "T1 and T2" are the two sequences)
    r"\bt(?:1[0-2]?|[2-9])\b(?=\s*(?:(?:-|–|to|through|thru|until)\s*t[12]\b|(?:-|–|to|through|thru|until|and|,)?\s*"
    r"(?:vertebra|vert\b|level|body|[cls]\d|t(?:1[0-2]|[3-9])\b)))"
    r"|(?:(?<=[-–])|(?<=\bto\s)|(?<=through\s)|(?<=thru\s)|(?<=[cls]\d/)|(?<=[cls]\d\d/))\s*t(?:1[0-2]?|[2-9])\b",
    re.I,
)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """A structure as canonical tokens plus attributes.

    Attributes
    ----------
    core : tuple of str
        Canonical tokens, sorted (matching is set-based).
    laterality : str or None
        ``left``, ``right``, ``bilateral`` or None.
    index : frozenset of str or None
        Rib numbers (``"3"``) or vertebral levels (``"L4"``); None = all.
    """

    core: tuple[str, ...]
    laterality: str | None = None
    index: frozenset[str] | None = None

    @property
    def lesion(self) -> bool:
        """True when the concept names a lesion (tumor, hemorrhage, ...)."""
        return any(t in LESION_TOKENS for t in self.core)

    def phrase(self) -> str:
        """Readable form, e.g. ``"left kidney"``."""
        parts = [self.laterality] if self.laterality else []
        parts += list(self.core)
        if self.index:
            parts.append("/".join(sorted(self.index, key=_index_order)))
        return " ".join(parts)


@dataclass
class ParsedTarget:
    """One requested structure.

    Attributes
    ----------
    text : str
        The phrase as written (after splitting), for reports.
    concept : Concept
        Canonical form used for matching.
    words : tuple of str
        The phrase's normalised words (for the sentence encoder).
    unknown : tuple of str
        Words the lexicon does not know (left for the sentence encoder).
    negated : bool
        From "except ..." / "excluding ..." / "but not ...".
    group : str or None
        ``"organs"`` ("abdominal organs") or ``"oars"`` ("head and neck OARs"): every
        organ (OARs: also bones and muscles) of the region's datasets.
    context : tuple of str
        Body regions named in the phrase itself ("thoracic aorta" -> ``thorax``).
    """

    text: str
    concept: Concept
    words: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    negated: bool = False
    group: str | None = None
    context: tuple[str, ...] = ()

    @property
    def laterality(self) -> str | None:
        """Shortcut for ``concept.laterality``."""
        return self.concept.laterality

    @property
    def lesion(self) -> bool:
        """Shortcut for ``concept.lesion``."""
        return self.concept.lesion


@dataclass
class ParsedRequest:
    """What the grammar made of a request."""

    text: str
    modality_hint: str | None
    regions: tuple[str, ...]
    targets: list[ParsedTarget] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The side a worklist header names ("CT HIP RT - FEMORAL HEAD") when no target below it
    #: names one: the router gives it to the targets that have sides.
    side: str | None = None
    #: The MR sequences the text names when it names several ("ADC, DWI and FLAIR"); the
    #: modality hint is then plain ``MR``.
    sequences: tuple[str, ...] = ()
    #: The word that makes the request one for another task than a segmentation ("burn",
    #: "fuse", "cancel"; :func:`other_task`); None for a segmentation request.
    other_task: str | None = None


# ---------------------------------------------------------------------------
# Token helpers
# ---------------------------------------------------------------------------

#: Words that end like a plural but are not one, and irregular plurals -> singular.
_NO_SINGULAR = WORDS.not_plural
_IRREGULAR = MappingProxyType(WORDS.irregular_plurals)


@lru_cache(maxsize=8192)
def singular(word: str) -> str:
    """Singular form of an English/medical plural (``kidneys`` -> ``kidney``)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word in _NO_SINGULAR or (word.endswith(("ss", "us", "is", "as", "ys")) and word != "kidneys"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "uses")):  # "sinuses", "plexuses"
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


# Targets are read after singularisation: a stop word's singular is one too ("cheers" -> "cheer"),
# though not a word the spelling corrector knows ("hurts" must not make "hart" a tie with "hurt").
STOPWORDS = STOPWORDS | frozenset(singular(w) for w in STOPWORDS)


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _ascii(text: str) -> str:
    # Typographic quotes first, or "don\u2019t" would lose its apostrophe and its negation.
    return unicodedata.normalize("NFKD", text.translate(_QUOTES)).encode("ascii", "ignore").decode("ascii")


def _index_order(key: str) -> tuple[int, int]:
    if key in SPINE_LEVELS:
        return (1, SPINE_LEVELS.index(key))
    return (0, int(key)) if key.isdigit() else (2, 0)


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_WORD = re.compile(r"[a-z0-9]+")
_LEVEL = re.compile(r"^([ctls])(\d{1,2})$")
_NUMBER = re.compile(r"^(\d{1,2})(?:st|nd|rd|th)?$")


#: Words of the grammar itself (lists, exclusions): known, so never "corrected" into anatomy.
_STRUCTURE_WORDS = WORDS.structure_words


def _edits(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance of ``a`` and ``b``; ``limit + 1`` once it exceeds ``limit``.

    rapidfuzz's C++ implementation: the same metric (transpositions of neighbours count one
    edit) that a pure-Python loop computed here before, which took ~80 % of the time of
    parsing a request with new words (docs/routing.md, "Latency").
    """
    return int(OSA.distance(a, b, score_cutoff=limit))


def _has_vowel(word: str) -> bool:
    return any(c in "aeiou" for c in word)


def _consonants(word: str) -> str:
    """A word's consonants, each run of one letter once ("gallbladder" -> "glbldr")."""
    return "".join(k for k, _ in itertools.groupby(c for c in word if c not in "aeiou"))


def _swapped(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with two neighbouring letters swapped ("aotra", "aorta")."""
    if len(a) != len(b):
        return False
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


#: A letter that optical character recognition reads as a digit: the digit's letters.
_OCR_DIGITS = {"0": "o", "1": "il", "5": "s"}
#: A word of letters with such digits inside or in front, never at its end ("l1ver", not "t12").
_OCR_WORD = re.compile(r"[a-z]*[015][a-z015]*[a-z]")


_SOUND_SPELLINGS = (("ph", "f"), ("ch", "c"), ("ck", "c"), ("k", "c"), ("q", "c"), ("z", "s"))


def _sound_key(word: str) -> str:
    """A word's consonant skeleton as it sounds ("hart", "heart" -> "hrt"; "hard" -> "hrd").

    Typing errors by ear keep the consonants and change the spelling of a sound or a vowel;
    the first letter stays, later vowels, ``h`` and doubled letters go.
    """
    for spelt, sound in _SOUND_SPELLINGS:
        word = word.replace(spelt, sound)
    head, rest = word[:1], re.sub(r"[aeiouyh]", "", word[1:])
    return re.sub(r"(.)\1+", r"\1", head + rest)


#: Words that run into a structure's name in dictation ("leftkidney", "liverandspleen").
_JOINING_WORDS = WORDS.joining_words


def _split_into(word: str, known: Callable[[str], bool]) -> list[str] | None:
    # Fewest parts of two letters or more, each ``known`` (breadth-first over the split points).
    best: dict[int, list[str]] = {0: []}
    for end in range(2, len(word) + 1):
        options = [best[start] + [word[start:end]] for start in best if end - start >= 2 and known(word[start:end])]
        if options:
            best[end] = min(options, key=len)
    return best.get(len(word))


def _finish_core(tokens: list[str]) -> tuple[str, ...]:
    toks = [t for t in tokens if t]
    # "stroke lesion", "tumor lesion": the generic word adds nothing next to a specific one.
    for generic in ("lesion", "gtv"):
        if generic in toks and any(t in LESION_TOKENS and t not in ("lesion", "gtv") for t in toks):
            toks = [t for t in toks if t != generic]
    # "heart left ventricle", "heart ascending aorta": the whole's name adds nothing to a part of it.
    for whole, parts in WORDS.whole_before_part.items():
        if whole in toks and parts & set(toks):
            toks = [t for t in toks if t != whole]
    # "upper lobe" is the lung's, unless another whole it may belong to is named ("temporal lobe").
    for part, default in WORDS.default_whole.items():
        if part in toks and default.whole not in toks and not (default.unless & set(toks)):
            toks.append(default.whole)
    return tuple(sorted(set(toks)))


@dataclass(frozen=True)
class Vocabulary:
    """Everything the grammar knows about words, built once from the lexicon (immutable).

    The tables come from :mod:`medsegagent.models.lexicon` (concept terms, word
    forms, qualifiers, filler words, groups, regions) plus the grammar's own
    structure words; ``extra_words`` (a registry's label words) only join the
    spelling vocabulary, so that they are never "corrected" into something else.
    Build one with :meth:`build`; :func:`default_vocabulary` is the lexicon's.

    Attributes
    ----------
    lexicon : Lexicon
        The source.
    words : mapping of str to str
        Single word -> canonical words (``""`` drops the word).
    phrases : mapping of int to mapping
        By length: tuple of singular words -> canonical tokens.
    known : frozenset of str
        The spelling vocabulary.
    groups : mapping
        Group core -> member cores (canonical, sorted tokens).
    wholes : frozenset
        The cores of the groups that are an organ made of its members (lexicon ``wholes``).
    organ_regions : mapping of str to tuple of str
        Canonical token -> body regions it lies in.
    concepts : mapping of tuple of str to Concept
        Canonical core -> the lexicon concept it reads as (for plans and refusals).
    """

    lexicon: Lexicon
    words: Mapping[str, str]
    phrases: Mapping[int, Mapping[tuple[str, ...], tuple[str, ...]]]
    known: frozenset[str]
    groups: Mapping[tuple[str, ...], tuple[tuple[str, ...], ...]]
    organ_regions: Mapping[str, tuple[str, ...]]
    concepts: Mapping[tuple[str, ...], LexiconConcept] = field(repr=False)
    _by_length: Mapping[int, tuple[str, ...]] = field(repr=False)
    _memo: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False, compare=False)
    wholes: frozenset[tuple[str, ...]] = field(default=frozenset(), repr=False)
    #: One-word names of structures, and the word pairs of the longer names (dictation repairs).
    anatomy: frozenset[str] = field(default=frozenset(), repr=False)
    name_pairs: frozenset[tuple[str, str]] = field(default=frozenset(), repr=False)
    #: The cores of every name the lexicon knows (and, in a router's vocabulary, every label's
    #: form): what a list item with a shared head noun must read as ("thyroid and cricoid cartilages").
    names: frozenset[tuple[str, ...]] = field(default=frozenset(), repr=False)
    #: A several-word term's words in any order -> the core it reads as ("sac around my heart" is the
    #: lay "heart sac"); words that two terms share in different readings are left out.
    unordered: Mapping[tuple[str, ...], tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )

    @classmethod
    def build(cls, lexicon: Lexicon | None = None, extra_words: Iterable[str] = ()) -> Vocabulary:
        """Vocabulary of a lexicon (default: the packaged one) plus extra known words.

        Parameters
        ----------
        lexicon
            The concept lexicon.
        extra_words
            Words to treat as known (never spelling-corrected), e.g. a registry's label words.

        Returns
        -------
        Vocabulary
        """
        lexicon = lexicon or load_lexicon()
        mapping = {term: canonical for term, canonical in lexicon.term_map().items() if term != canonical}
        mapping.update(dict.fromkeys(lexicon.filler, ""))
        words = {k: v for k, v in mapping.items() if " " not in k}
        phrases: dict[int, dict[tuple[str, ...], tuple[str, ...]]] = {}
        for k, v in mapping.items():
            if " " in k:
                toks = tuple(singular(t) for t in k.split())
                phrases.setdefault(len(toks), {})[toks] = tuple(v.split())
        known = set(WORDS.all_stopwords) | set(_LATERAL) | set(_ORDINALS) | set(_SEGMENT_LEVELS) | _STRUCTURE_WORDS
        for key in REGION_WORDS:
            known.update(key.split())
        for term, canonical in mapping.items():
            known.update(term.split())
            known.update(canonical.split())
        for concept in lexicon.concepts.values():
            known.update(concept.canonical.split())
        known.update(lexicon.qualifiers)
        # The grammar's own nouns ("THR component", "LV wall") are words, whether a term has them or not.
        known.update(WORDS.generic_nouns | WORDS.generic_modifiers | WORDS.class_nouns)
        for group, members in lexicon.groups.items():
            known.update(group.split())
            for member in members:
                known.update(member.split())
        known.update(w for w in extra_words if w.isalpha())
        known.discard("")
        by_length: dict[int, list[str]] = {}
        for w in sorted(known):
            by_length.setdefault(len(w), []).append(w)
        organ_regions = {c.canonical: c.regions for c in lexicon.concepts.values() if c.regions}
        organ_regions.update({w: r for w, r in lexicon.qualifiers.items() if r})
        vocab = cls(
            lexicon,
            MappingProxyType(words),
            MappingProxyType({n: MappingProxyType(t) for n, t in phrases.items()}),
            frozenset(known),
            MappingProxyType({}),
            MappingProxyType(organ_regions),
            MappingProxyType({}),
            MappingProxyType({n: tuple(ws) for n, ws in by_length.items()}),
        )
        # Both need the tables above; set once here, before anyone sees the object.
        groups = {vocab.core(key): tuple(vocab.core(m) for m in members) for key, members in lexicon.groups.items()}
        object.__setattr__(vocab, "groups", MappingProxyType(groups))
        object.__setattr__(vocab, "wholes", frozenset(vocab.core(w) for w in lexicon.wholes))
        concepts: dict[tuple[str, ...], LexiconConcept] = {}
        for concept in lexicon.concepts.values():
            concepts.setdefault(vocab.core(concept.canonical), concept)
        object.__setattr__(vocab, "concepts", MappingProxyType(concepts))
        names = [t.lower().split() for c in lexicon.concepts.values() for t in (*c.all_terms, c.canonical)]
        object.__setattr__(vocab, "anatomy", frozenset(n[0] for n in names if len(n) == 1 and len(n[0]) > 3))
        object.__setattr__(vocab, "name_pairs", frozenset(pair for n in names for pair in itertools.pairwise(n)))
        cores = (tuple(t for t in vocab.core(" ".join(n)) if t not in _LATERAL) for n in names)
        object.__setattr__(vocab, "names", frozenset(cores) - {()})
        object.__setattr__(vocab, "unordered", MappingProxyType(vocab._unordered_terms(mapping)))
        return vocab

    def _unordered_terms(self, mapping: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, ...]]:
        readings: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
        for term, canonical in mapping.items():
            words = tuple(sorted(singular(w) for w in term.split() if w not in STOPWORDS))
            if len(words) > 1 and canonical:
                readings.setdefault(words, set()).add(self.core(canonical))
        return {words: next(iter(cores)) for words, cores in readings.items() if len(cores) == 1}

    def with_names(self, cores: Iterable[Iterable[str]]) -> Vocabulary:
        """This vocabulary, knowing ``cores`` as names too (a registry's label forms)."""
        return replace(self, names=self.names | {tuple(sorted(c)) for c in cores}, _memo={})

    def core(self, phrase: str) -> tuple[str, ...]:
        """The canonical core ``phrase`` reads as: sorted tokens, sides and stop words gone.

        ``"Adrenal glands"`` and ``"suprarenal"`` read alike; whether a core names a structure
        is ``core in self.names``.
        """
        memo = self._memo.get(("core", phrase))
        if memo is None:
            memo = _finish_core(self.canonical_tokens(phrase.split(), False, True)[0])
            if len(self._memo) < 16384:  # a memo, not state: the answer never changes
                self._memo[("core", phrase)] = memo
        return memo

    def concept_core(self, concept: LexiconConcept) -> tuple[str, ...]:
        """The canonical core a lexicon concept reads as (e.g. ``("adrenal",)``)."""
        return self.core(concept.canonical)

    def correct_spelling(self, word: str) -> str:
        """Closest known word for a misspelt ``word`` (unchanged when none is close).

        One edit is allowed for words of 4-7 letters, two for longer ones; ties
        go to the one candidate that sounds the same (:func:`_sound_key`), else keep the
        word unchanged (a guess between two structures is worse than none).
        """
        if word in self.known or len(word) < 3 or singular(word) in self.known:
            return word  # the plural of a known word is known ("iacs" is no typo for "icas")
        memo = self._memo.get(("spell", word))
        if memo is not None:
            return memo
        if not word.isalpha():
            fixed = self._ocr_reading(word)
        else:
            # (a word without vowels is shorthand before it is a slip: "spln" is no "spn")
            fixed = self._shorthand(word) if not _has_vowel(word) else word
            fixed = self._spelt(word) if fixed == word and len(word) >= 4 else fixed
            fixed = self._shorthand(word) if fixed == word and _has_vowel(word) else fixed
        if len(self._memo) < 16384:  # a memo, not state: the answer never changes
            self._memo[("spell", word)] = fixed
        return fixed

    def _spelt(self, word: str) -> str:
        """The known word a word of letters is a misspelling of, else the word (:meth:`correct_spelling`)."""
        limit = 1 if len(word) <= 7 else 2
        best_d, best = self._nearest(word, limit)
        fixed = self._one_of(word, best) if best_d <= limit else None
        if fixed is None and best_d <= limit and len({_LATERAL.get(c) or self.core(c) for c in best}) == 1:
            # a tie between two names of one structure ("prostat": prostate, prostata) or one side
            fixed = best[0] if _LATERAL.get(best[0]) or self.core(best[0]) else None
        if fixed is None and best_d == 1:
            # ... else to the one that swaps two neighbouring letters, the commonest slip ("aotra")
            fixed = self._one_of(word, [c for c in best if _swapped(word, c)])
        if fixed is None and best_d <= limit and len(word) >= 6:
            # A tie that sound does not settle goes to the one structure among the candidates
            # ("kindey": kidney, not "kindly"; not in a short word: "live" is no "liver").
            fixed = self._one_of(word, [c for c in best if singular(c) in self.anatomy])
        if fixed is None and best_d > limit and 5 <= len(word) <= 7:
            # Spelt by ear, two edits off ("trakea"): the one structure that sounds the same and
            # keeps the word's first two letters and its last ("sppin" is no spine, "clinic" no "colonic").
            far_d, far = self._nearest(word, limit + 1)
            key = _sound_key(word)
            same = [
                c
                for c in far
                if _sound_key(c) == key and c[:2] == word[:2] and c[-1] == word[-1] and singular(c) in self.anatomy
            ]
            fixed = self._one_of(word, same) if far_d == limit + 1 else None
        if fixed is None and len(word) > 5 and word.endswith("s") and not word.endswith(("ss", "is", "us")):
            # The plural of a misspelt name ("pattellas"): its singular, one edit off and sounding the
            # same, is corrected ("cheers" is not "cheek").
            stem = self.correct_spelling(word[:-1])
            same_word = _edits(word[:-1], stem, 1) == 1 and _sound_key(stem) == _sound_key(word[:-1])
            fixed = stem if same_word else None
        return fixed or word

    def _shorthand(self, word: str) -> str:
        """The structure a note's shorthand stands for ("lvr", "kdnys"; "liv", "oes").

        Text messages and order lines drop a word's vowels or cut it short.  A word with no vowel
        is read as the one word of the structure names with the same consonants
        (doubled letters count once); else a word of three to six letters as the one structure whose
        names begin with it, the shortest reading of the names that do ("spl": spleen, not the
        accessory spleen).  Else the word stays as written.
        """
        if not _has_vowel(word):
            names = self.anatomy | {singular(a) for a in self.anatomy}  # (only for a word without vowels: rare)
            same = {c for c in names if _consonants(c) == _consonants(word)}
            fixed = self._one_of(word, sorted(same))
            if fixed:
                return fixed
        if len(word) > 6:
            return word
        cores = {self.core(c) for c in self.anatomy if c.startswith(word) and len(c) >= len(word) + 2}
        least = min(cores, key=len, default=())
        if least and all(set(least) <= set(c) for c in cores):
            return next(c for c in sorted(self.anatomy, key=len) if c.startswith(word) and self.core(c) == least)
        return word

    def _nearest(self, word: str, limit: int) -> tuple[int, list[str]]:
        """The known words nearest ``word`` within ``limit`` edits, and their distance."""
        best: list[str] = []
        best_d = limit + 1
        for length in range(len(word) - limit, len(word) + limit + 1):
            for cand in self._by_length.get(length, ()):
                if cand[0] != word[0] and len(word) <= 5:  # short words: first letter is rarely the typo
                    continue
                d = _edits(word, cand, limit)
                if d > limit:
                    continue
                if d < best_d:
                    best_d, best = d, [cand]
                elif d == best_d:
                    best.append(cand)
        return best_d, best

    @staticmethod
    def _one_of(word: str, candidates: list[str]) -> str | None:
        """The one word ``candidates`` stand for, else None (a guess between two is worse than none)."""
        if len({singular(c) for c in candidates}) > 1:
            # A tie ("hart": heart or hard) goes to the one candidate that also sounds the same.
            candidates = [c for c in candidates if _sound_key(c) == _sound_key(word)]
        return candidates[0] if candidates and len({singular(c) for c in candidates}) == 1 else None

    def _ocr_reading(self, word: str) -> str:
        """The known word a scanned request's letters-read-as-digits spell ("l1ver", "0esophagus").

        Optical character recognition of a faxed referral reads I and l as 1, O as 0, S as 5.  Only a
        word of letters with at most two such digits inside or in front is read, and only when every
        way of reading its digits that gives a known word gives the same one; "t12", "fdi11" and
        "covid19" stay as written.
        """
        digits = sum(c.isdigit() for c in word)
        if not _OCR_WORD.fullmatch(word) or digits > 2 or len(word) - digits < 3:
            return word
        spellings = [""]
        for c in word:
            spellings = [s + letter for s in spellings for letter in _OCR_DIGITS.get(c, c)]
        readings = {self.correct_spelling(s) for s in spellings}
        known = {r for r in readings if r in self.known or singular(r) in self.known}
        return known.pop() if len(known) == 1 else word

    def joined_reading(self, first: str, second: str) -> str | None:
        """The structure two words spell when written as one ("stern um", "man dibble"), else None.

        Dictation breaks a name into sounds that are words or nothing; when one of the two is not
        a known word, the pair is read as the one structure name it spells exactly or one edit
        from it. A correction that keeps one of the two words whole does not count ("kidney ca").
        """
        if len(first) + len(second) < 5 or (first in self.known and second in self.known):
            return None
        whole = first + second
        if whole in self.anatomy:
            return whole
        memo = self._memo.get(("join", f"{first} {second}"), False)
        if memo is not False:
            return memo
        # One edit leaves ``k`` letters untouched at the start or at the end: an exact filter that
        # spares the edit distance (the costliest step of parsing before it) most of the names.
        k = (len(whole) - 3) // 2
        near = {
            c
            for c in self.anatomy
            if abs(len(c) - len(whole)) <= 1
            and c not in (first, second)
            and (c[:k] == whole[:k] or c[len(c) - k :] == whole[len(whole) - k :])
            and _edits(whole, c, 1) <= 1
        }
        joined = next(iter(near)) if len(near) == 1 else None
        if len(self._memo) < 16384:  # a memo, not state: the answer never changes
            self._memo[("join", f"{first} {second}")] = joined
        return joined

    def split_reading(self, word: str) -> list[str] | None:
        """The words of a run-together word ("liverand", "leftkidney"), else None.

        Only a word that reads nothing, even corrected, is split; its parts are structure names and
        the list and side words between them, with at least one structure, fewest parts first.
        """
        if len(word) < 6 or word in self.known or self.correct_spelling(word) != word:
            return None
        parts = _split_into(word, lambda w: w in _JOINING_WORDS or singular(w) in self.anatomy)
        if parts is not None and any(singular(w) in self.anatomy for w in parts):
            return parts
        # A label's name written as one word ("sternothyroid" for sterno_thyroid): its parts are
        # words of the registry's names and, together, one structure's name.
        # (every part a word of that name: "tailbone" is no "tail" of a "bone")
        parts = _split_into(word, lambda w: len(w) > 3 and w in self.known)
        core = self.core(" ".join(parts)) if parts is not None and len(parts) > 1 else ()
        if parts is not None and core in self.names and len(core) >= len(parts):
            return parts
        return None

    def sound_in_name(self, word: str, before: str | None, after: str | None) -> str | None:
        """The word of a structure name that ``word`` sounds like, beside the rest of that name.

        "inferior vienna cava": a real word heard for a name's word is read as it when its
        neighbour completes that name and one word of the lexicon's names fits (:func:`_sound_key`).
        """
        if word in self.known or singular(word) in self.known or len(word) < 3:
            return None
        # The neighbour must be a name's own word: "and", "of" pair with too many names to say which.
        before, after = (w if w not in STOPWORDS and w not in _JOINING_WORDS else None for w in (before, after))
        key = _sound_key(word)
        fits = {
            a if b == after else b
            for a, b in self.name_pairs
            if (b == after and _sound_key(a) == key) or (a == before and _sound_key(b) == key)
        }
        return next(iter(fits)) if len(fits) == 1 else None

    def _apply_phrases(self, tokens: list[str]) -> list[str]:
        out: list[str] = []
        longest = max(self.phrases, default=1)
        i = 0
        while i < len(tokens):
            for n in range(min(longest, len(tokens) - i), 1, -1):
                rep = self.phrases.get(n, {}).get(tuple(tokens[i : i + n]))
                if rep is not None:
                    out.extend(rep)
                    i += n
                    break
            else:
                out.append(tokens[i])
                i += 1
        return out

    def canonical_tokens(
        self, words: list[str], fix_spelling: bool = True, keep_unknown: bool = False
    ) -> tuple[list[str], list[str]]:
        """Canonical tokens of a word list, plus the words nobody knows.

        Parameters
        ----------
        words
            Lower-case words (already without laterality/index words).
        fix_spelling
            Correct misspelt words (requests); off for registry names and synonyms.
        keep_unknown
            Keep unknown words in the tokens (registry synonyms: every word counts).

        Returns
        -------
        tokens : list of str
            Canonical tokens (stopwords removed), in order.
        unknown : list of str
            Words not in the vocabulary even after spelling correction.
        """
        if fix_spelling:
            fixed = [singular(self.correct_spelling(w)) for w in words]
            fixed = [singular(self.correct_spelling(w)) if w not in self.known else w for w in fixed]
        else:
            fixed = [singular(w) for w in words]
        tokens: list[str] = []
        unknown: list[str] = []
        for tok in self._apply_phrases(fixed):
            rep = self.words.get(tok, tok)
            for t in rep.split():
                if t in STOPWORDS or (rep != tok and self.words.get(t) == ""):
                    continue  # (a filler word an expansion brings: "SCM" is the sternocleidomastoid muscle)
                if _PROCEDURE_WORD.fullmatch(t):
                    continue
                if t not in self.known and not t.isdigit():
                    unknown.append(t)  # kept out of a request's concept: the encoder looks at these
                    if not keep_unknown:
                        continue
                tokens.append(t)
        # A second phrase pass: word mappings can complete a phrase ("suprarenal gland").
        tokens = [t for t in self._apply_phrases(tokens) if t and t not in STOPWORDS]
        return tokens, unknown


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The packaged lexicon's vocabulary (built once; immutable)."""
    return Vocabulary.build()


# ---------------------------------------------------------------------------
# Label names
# ---------------------------------------------------------------------------


def label_concepts(name: str, vocab: Vocabulary | None = None) -> tuple[Concept, ...]:
    """Concepts of a registry label name (several for composite labels).

    ``"kidney_left"`` -> ``(kidney, left)``; ``"TemporalLobe_L"`` ->
    ``(lobe temporal, left)``; ``"vertebrae_L4"`` -> ``(vertebra, index L4)``;
    ``"rib_left_3"`` -> ``(rib, left, index 3)``; composite names
    (``"prostate_or_uterus"``, ``"kidney and masses"``) give one concept per
    part, lesion parts inheriting the organ (``kidney``, ``kidney mass``).

    Parameters
    ----------
    name
        Label name as written in the registry.
    vocab
        Vocabulary (default: :func:`default_vocabulary`).

    Returns
    -------
    tuple of Concept
        The whole name first, then the parts of a composite name.
    """
    vocab = vocab or default_vocabulary()
    memo = vocab._memo.get(("label", name))
    if memo is None:
        memo = vocab._memo[("label", name)] = _label_concepts(name, vocab)
    return memo


def _label_concepts(name: str, vocab: Vocabulary) -> tuple[Concept, ...]:
    text = _CAMEL.sub(" ", _ascii(name)).replace("_", " ")
    words = _WORD.findall(text.lower())
    laterality = None
    index: set[str] = set()
    rest: list[str] = []
    for w in words:
        m = _LEVEL.match(w)
        if m and "vertebra" in " ".join(words) + " vertebrae":
            index.add(m.group(1).upper() + m.group(2))
        elif w.isdigit():
            index.add(str(int(w)))
        elif w in ("left", "l", "right", "r"):
            laterality = _LATERAL[w]
        else:
            rest.append(w)
    idx = frozenset(index) or None
    parts = _split_composite(rest)
    whole_tokens, _ = vocab.canonical_tokens([w for w in rest if w not in ("and", "or")], False, True)
    if len(parts) > 1 and any(w == "and" for w in rest):
        whole_tokens.append(COMPOSITE)  # "kidney and masses" is not "kidney masses"
    concepts = [Concept(_finish_core(whole_tokens), laterality, idx)]
    if len(parts) > 1:
        organ: list[str] = []
        for part in parts:
            toks, _ = vocab.canonical_tokens(part, False, True)
            if any(t in LESION_TOKENS for t in toks) and organ and not (set(toks) - LESION_TOKENS):
                toks = organ + toks  # "kidney and masses": the masses are kidney masses
            elif toks:
                organ = [t for t in toks if t not in LESION_TOKENS]
            concepts.append(Concept(_finish_core(toks), laterality, idx))
    return tuple(concepts)


def _split_composite(words: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for w in words:
        if w in ("and", "or"):
            parts.append([])
        else:
            parts[-1].append(w)
    return [p for p in parts if p]


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

_SPLIT = re.compile(
    r"\s*(?:[,;:\n\u2022]|\band\b|\bor\b|&|\+|/|\bplus\b|\bas well as\b|\balong with\b|\btogether with\b"
    r"|\balso\b|\bthen\b|\bwith\b|\bvs\b|\bversus\b|\s-\s|[-=]*>+)\s*"  # (arrows: "CT C-SPINE >> C1-C7")
)
_SPLIT_KEEP = re.compile("(" + _SPLIT.pattern + ")")
_BOTH_SIDES = re.compile(
    r"\b(?:(?:l|lt|left)\s*(?:/|&|\+|\band\b)\s*(?:r|rt|right)|(?:r|rt|right)\s*(?:/|&|\+|\band\b)\s*(?:l|lt|left))\b"
)
_TRAILING_SIDE = re.compile(r"(?:\b(?:on|of)\s+the\s+|,\s*)(left|right)(?:\s+side)?$|,\s*(left|right)\s+side$")
_WORKLIST_HEADER = re.compile(r"^\s*([^:;\n]{2,80}?)(?:\s[-\u2013\u2014]\s|\s*:\s)")
_NEGATION = re.compile(
    r"\b(?:except(?: for)?|excluding|exclude|excl|exc|but not|other than|apart from|aside from|minus|sparing"
    r"|with the exception of"
    r"|(?:but )?none of|bar(?=\s+(?:the|one|two|three|first|second|last)\b)"
    r"|leaving out|leave out|skip(?:ping)?|omit(?:ting)?"
    r"|(?:do |does )?not(?: including| include)?(?! (?:only|just|merely)\b)"
    # "heart, no coronaries", "but no bowel" (not "no contrast", "no IV con")
    r"|(?:but )?no(?!\s+(?:iv\s+|oral\s+)?(?:contrast|con|gad\w*|gd|enhancement|cm)\b)"
    # "without" excludes a structure ("kidneys without the tumours"), not the contrast agent
    r"|without(?!\s+(?:iv\s+|oral\s+)?(?:contrast|con|gad\w*|gd|enhancement|cm)\b))\b"
)
# A clinical indication or timing clause says why the study is done, not what to segment.
_INDICATION = re.compile(r"\b(?:rule\s+out|r/o|history\s+of|h/o|hx\s+of|before|after|prior\s+to)\b[^,;:()]*")
# An item closed by "not needed" is an exclusion: written before it, it is moved after "except".
# A list item (its opening separator, then its words) up to the words that close it.
_ITEM_BEFORE = r"(^|[,;]|\s[-\u2013\u2014]\s)((?:(?!\s[-\u2013\u2014]\s)[^,;])*?)\s+"
_NOT_NEEDED = re.compile(
    _ITEM_BEFORE + r"(?:is\s+|are\s+|was\s+|were\s+|(?:has|have|had)\s+been\s+|can\s+be\s+|may\s+be\s+)?"
    r"(?:not\s+(?:needed|required|necessary|wanted|collected|of\s+interest)|unnecessary|excluded|omitted|skipped|left\s+out"
    r"|excepted|(?:we\s+|i\s+)?(?:do\s+|does\s+)?not\s+need|(?:is\s+\w+\s+)?no\s+need"
    # ("fourth ventricle out", "cysts no" only at the item's end: not "out of the FOV", "no renal vessels")
    r"|(?:out|no)(?=\s*(?:$|[,;.])))\b"
)


# Work done before ("the prostate is already contoured", "bladder and rectum done by hand", "the parotids
# were done last week") and an organ that is gone ("the left one was removed in 2019"), closing an item
# that is a structure's name only (not "segment the brain where the tumour was resected").
_DONE_OR_GONE = re.compile(
    _ITEM_BEFORE + r"(?:is\s+|are\s+|was\s+|were\s+|(?:has|have|had)\s+been\s+)?"
    r"(?:already\s+(?:done|contoured|segmented|delineated|outlined|drawn|assessed)"
    r"|(?:done|contoured|segmented|delineated|outlined|drawn|assessed)\s+(?:already|by\s+hand|manually|previously"
    r"|elsewhere|last\s+(?:week|month|time))"
    # (not one still to go: "the lesion to be resected", "can be removed")
    r"|(?<!\bbe\s)(?:surgically\s+)?(?:removed|resected|excised|absent|taken\s+out)"
    r"(?=\s*(?:$|[,;.]|\(|\b(?:in|so|and|at|on)\b|\d)))\b"
)


def _done_or_gone_item(m: re.Match[str]) -> str:
    words = _WORD.findall(m.group(2))
    if any(w in WORDS.segmentation_words or w in WORDS.clause_words for w in words):
        return m.group(0)
    return _not_needed_item(m)


def _not_needed_item(m: re.Match[str]) -> str:
    # "liver with the tumour excluded": only what follows "with" is closed by the exclusion.
    kept, _, item = m.group(2).rpartition(" with ")
    return f"{m.group(1)} {kept} , except {item} " if kept.strip() else f"{m.group(1)} except {m.group(2)} "


_RIB_SIDE = re.compile(
    r"\b(ribs?\s+)([lr])\s?(?=\d)"
    # (an ordinal, or a range: "L 4th/5th ribs", "R 9-10 ribs"; not "L1 and 12th ribs")
    r"|\b([lr])\s?(?=(?:\d{1,2}(?:st|nd|rd|th)\s*(?:-|\u2013|to|/|,|and|\+)\s*\d{1,2}(?:st|nd|rd|th)?"
    r"|\d{1,2}\s*(?:-|\u2013|to|/)\s*\d{1,2})\s+ribs?\b)"
)
_LEVEL_RANGE = re.compile(
    r"\b(?:from\s+)?([ctls]|th(?=\d))\s?(\d{1,2})\s*(?:-|–|—|to|through|thru|until|down to)\s*"
    r"(?:([ctls]|th(?=\d))\s?)?(\d{1,2})\b"
)
_NUM_RANGE = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s*(?:-|–|—|to|through|thru)\s*(\d{1,2})(?:st|nd|rd|th)?\b")
_CARDINALS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip
_NUMBER_WORDS = {**_ORDINALS, **_CARDINALS}
# Levels dictated letter by letter ("el four and el five"): the letters' names.
_LETTER_NAMES = {"el": "l", "ell": "l", "cee": "c", "ess": "s"}  # (not "tee": TEE is an echo)
_SPELLED_LEVEL = re.compile(rf"\b({'|'.join(_LETTER_NAMES)})\s+(\d{{1,2}}|{'|'.join(_CARDINALS)})\b")


def _spelled_level(m: re.Match[str]) -> str:
    number = m.group(2)
    return f"{_LETTER_NAMES[m.group(1)]}{number if number.isdigit() else _CARDINALS[number]}"


_ORDINAL_RANGE = re.compile(
    r"\b(" + "|".join(_NUMBER_WORDS) + r")\s*(?:-|–|to|through|thru)\s*(" + "|".join(_NUMBER_WORDS) + r")\b"
)
#: How many of each counted structure there are, for "the last two ribs".
_COUNTS = {"rib": 12, **{word: len(levels) for word, levels in _SEGMENT_LEVELS.items()}}
#: "the first three lumbar vertebrae", "last 2 ribs": a count from one end of a series.
_FIRST_N = re.compile(
    r"\b(first|upper|uppermost|top|last|lower|lowest|bottom)\s+(\d{1,2}|" + "|".join(_CARDINALS) + r")\b"
    r"(?=\s+(?:(?:left|right|lt|rt|bilateral)\s+)?(?:pairs?\s+of\s+)?(rib|cervical|thoracic|dorsal|lumbar|sacral))"
)
#: "the last lumbar vertebra", "lowest rib": the one at the end of a series.
_LAST_ONE = re.compile(
    r"\b(?:last|lowest|bottom)\s+(?=(?:(?:left|right|lt|rt)\s+)?"
    r"(?:(rib)\b(?!s)|(cervical|thoracic|dorsal|lumbar|sacral)\s+vertebra\b))"
)
#: "T-spine", "L spine": the segment of the spine the letter names.
_LETTER_SPINE = re.compile(r"\b([ctl])[\s-]?spine\b")
_SPINE_SEGMENT = {"c": "cervical spine", "t": "thoracic spine", "l": "lumbar spine"}
#: "Primary" as a noun, at the end of its item ("oropharyngeal primary on PET/CT", "the primary
#: and the nodes"), is the primary tumour; as an adjective ("primary visual cortex") it is not.
_PRIMARY_NOUN = re.compile(
    r"(^|\b(?:the|oropharyngeal|nasopharyngeal|hypopharyngeal|laryngeal|tonsil|tonsillar|tongue|oral|hn|neck)\s+)"
    r"primary\b"
    r"(?=\s*(?:$|[,.;:)(/+-]|\b(?:on|in|at|only|please|plus|with|for|site)\b"
    r"|\band\s+(?:the\s+)?(?:[a-z]+\s+)?(?:nod|gtv|neck)))"
)
#: Order entry's "kid" right after a side is the kidney ("lt kid vol"); elsewhere it is a child.
_CONTRAST_PHASE = re.compile(
    r"\b(?:(?:early|late)\s+)?(?:arterial|portal[\s-]*venous|portal|venous|hepatobiliary|equilibrium)[\s-]+phase\b"
    r"|\bportal[\s-]venous\b(?!\s+(?:system|anatomy|vasculature|branch|branches|thromb\w*|inflow|confluence|trunk))"
)
_RADS_SCALE = re.compile(r"\b([a-z]{1,2})-rads\b")  # the ACR reporting scales: BI-, LI-, PI-, TI-RADS
#: A grade on a reporting scale, after the scale's name ("Deauville 4", "LI-RADS 5", "Bosniak IIF").
_GRADE = re.compile(
    rf"\b({'|'.join(sorted(WORDS.grading_scales))}|[a-z]{{1,2}}rads)(?:\s+(?:score|category|grade))?\s*"
    r"(?:\d[a-z]?(?:\s*(?:-|\u2013|to|or|/)\s*\d[a-z]?)?|(?:i{1,3}|iv|v)f?)\b"
)
_KID = re.compile(r"\b(lt|rt|left|right|l|r|bilat|both)\s+kids?\b")
#: A count after an article names all of a plural structure, not an index ("the two kidneys",
#: "all eight Couinaud segments", "the seven bones of my neck").
_ALL_OF_A_COUNT = re.compile(
    r"\b(the|my|his|her|their|its|all(?:\s+(?:of\s+)?the)?)\s+"
    r"(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|[2-9]|1[0-2])\s+"
    r"(?:of\s+(?:the|my|his|her|their)\s+)?(?=(?:[a-z]+\s+)?([a-z]+s)\b)"
)
#: "The bones in my neck", "my lower back bones": a segment of the spine in a patient's words.
_LAY_SPINE_PARTS = "|".join(sorted(map(re.escape, WORDS.lay_spine_parts), key=len, reverse=True))
_LAY_SPINE = re.compile(
    rf"\bbones?\s+(?:in|of)\s+(?:the\s+|my\s+|his\s+|her\s+|their\s+)?({_LAY_SPINE_PARTS})\b(?!\s+of\b)"
    rf"|\b({_LAY_SPINE_PARTS})\s+bones?\b"
)


def detect_modality(text: str) -> tuple[str | None, str]:
    """Modality hint named in ``text`` and the text with the hint removed.

    :func:`named_modalities` gives every modality and sequence named, before they are combined.

    Parameters
    ----------
    text
        Raw request text (original casing: ``US`` counts only in capitals).

    Returns
    -------
    hint : str or None
        ``CT``, ``MR``, ``MR:T1``, ``MR:T1C``, ``MR:T2``, ``MR:FLAIR``,
        ``MR:DWI``, ``MR:ADC``, ``PT``, ``PT+CT``, ``US`` or None.  Several MR
        sequences give ``MR``; PET and CT named separately give ``PT+CT``.
    rest : str
        Lower-case text with the modality words replaced by separators.
    """
    found, low = named_modalities(text)
    return _combine(found), low


_AFTER_ARTICLE = re.compile(r"\b(?:the|this|that|my|his|her)\s*$")
_NOUN_NEXT = re.compile(r"\s*(?!(?:of|from|on|at|in|dated|done|for|scan|scans|study|exam|images?|series)\b)[a-z]")


def _adjective(m: re.Match[str]) -> bool:
    """Whether a modality word qualifies the noun after it ("on the MR spine", "the CT part")."""
    return bool(_AFTER_ARTICLE.search(m.string, 0, m.start()) and _NOUN_NEXT.match(m.string, m.end()))


def named_modalities(text: str) -> tuple[list[str], str]:
    """Every modality and MR sequence ``text`` names, in order, and the text without them.

    Parameters
    ----------
    text
        Raw request text.

    Returns
    -------
    found : list of str
        ``CT``, ``MR``, ``MR:FLAIR`` ... as named ("ADC, DWI and FLAIR" names three).
    rest : str
        Lower-case text with the modality words replaced by separators.
    """
    found: list[str] = []
    work = _ascii(text)
    if _US_UPPER.search(work):
        found.append("US")
        work = _US_UPPER.sub(" ; ", work)
    low = work.lower()
    # Protect vertebral T-levels ("T1-T4", "T12 vertebra") from the sequence patterns.
    protected: dict[str, str] = {}

    def _protect(m: re.Match[str]) -> str:
        key = f"zzlevel{len(protected)}zz"
        protected[key] = m.group(0)
        return key

    low = _VERTEBRA_T.sub(_protect, low)
    # "C5, C6, C7 and T1": a list of levels ("S7" beside the liver is a Couinaud segment)
    sacral = "" if _LIVER_CONTEXT.search(low) else "|s[1-5]"
    levels = re.search(rf"\b(?:[cl]\d{{1,2}}|t(?:1[0-2]|[3-9]){sacral})\b", low)
    if (levels or re.search(r"\b(?:vertebra\w*|spine|spinal|rib|ribs)\b", low)) and not re.search(
        r"\b(?:mri?|magnetic|weighted|flair|sequence|sagittal|axial|coronal)\b", low
    ):
        # A bare "T7" in a spine request is a level, never a sequence.
        low = re.sub(r"\bt(?:1[0-2]?|[2-9])\b", _protect, low)
    for modality, pattern in _MODALITY_PATTERNS:
        if modality == "XA" and any(m == "CT" or m.startswith("MR") for m in found):
            continue
        if pattern.search(low):
            found.append(modality)
            # (a sequence qualifies the series and ends no list item: "lumbar vertebrae on sagittal T2 spine";
            # nor does a modality after an article: "thoracic levels on the MR spine")
            sequence = modality.startswith("MR:")
            low = pattern.sub(lambda m, seq=sequence: " " if seq or _adjective(m) else " ; ", low)
    for key, value in protected.items():
        low = low.replace(key, value)
    if "MR:DWI" not in found and re.search(r"\brestricted diffusion\b", low):
        found.append("MR:DWI")
    return found, low


def _combine(found: list[str]) -> str | None:
    kinds = set(found)
    if not kinds:
        return None
    if "PT+CT" in kinds or ("PT" in kinds and "CT" in kinds):
        return "PT+CT"
    mr = sorted(k for k in kinds if k.startswith("MR"))
    seqs = [k for k in mr if k != "MR"]
    if mr:
        if len(kinds - set(mr)) > 0:
            return None  # "CT or MR": no single hint
        return seqs[0] if len(seqs) == 1 else "MR"
    return found[0] if len(kinds) == 1 else None


#: "RT_BRAIN_OAR": a protocol's name, RT, a site and a planning word joined by underscores, is
#: radiotherapy ("rt parotid oar", with spaces, keeps its side).
_RT_PROTOCOL = re.compile(r"\bRT_(?=[A-Za-z]+_(?:OARs?|PLAN|PLANNING|SIM|SIMULATION)\b)", re.IGNORECASE)


def parse_request(text: str, vocab: Vocabulary | None = None, protected: Collection[str] = ()) -> ParsedRequest:
    """Parse a request into a modality hint, region hints and targets.

    Parameters
    ----------
    text
        Free text: a clinician's sentence, worklist shorthand, a list.
    vocab
        Vocabulary (default: :func:`default_vocabulary`).
    protected
        Lower-case phrases that contain a list word but name one structure
        (registry names/synonyms such as ``"kidney and masses"``): they are
        not split into several targets.

    Returns
    -------
    ParsedRequest
        Targets in the order written; a target whose words are all unknown is
        still returned (the router may resolve it with the sentence encoder).
    """
    vocab = vocab or default_vocabulary()
    written = text
    text = _rule_action(_RT_PROTOCOL.sub("radiotherapy_", text), vocab)
    text = _patients_side(_SIDE_COMPARISON.sub(" ", text))  # "R>L" compares the sides; it asks for neither
    text = _split_structure_names(_corrected(_values_only(_without_record_ids(text))), vocab)
    found, low = named_modalities(text)
    hint = _combine(found)
    sequences = tuple(sorted({m for m in found if m.startswith("MR:")})) if hint == "MR" else ()
    header = _read_header(text, vocab)
    if header is not None:
        low = detect_modality(header.body)[1]
    low = _SENTENCE_END.sub(" ; ", _abbreviation_dots(low, vocab))
    dental = _is_dental(text.lower())
    low = _context_readings(_complete_prefixes(_expand_shorthand(low, protected, dental), vocab), text.lower())
    low = _unpunctuated_items(_mend_dictation(low, vocab), vocab)
    low = _eponym_contexts(_drop_purposes(_SITE_PLAN.sub(" ", low), vocab), vocab)
    regions: list[str] = list(header.regions) if header is not None else []
    notes: list[str] = []
    targets = _segment_targets(_pronoun_exclusions(_split_segments(low, vocab)), vocab, regions, notes)
    targets = _apply_list_rules(targets, low, text, header.targets if header is not None else None, vocab)
    targets = _same_as_before([_ordinal_name(t, vocab) for t in targets])
    # Several mentions of one concept are one target.
    first: dict[tuple, ParsedTarget] = {}
    for t in targets:
        first.setdefault((t.concept, t.negated, t.group, t.unknown), t)
    unique = list(first.values())
    sided = any(t.concept.laterality for t in unique if not t.negated)
    sides = (header.sides if header is not None else set()) | _form_sides(written)
    side = next(iter(sides)) if len(sides) == 1 and not sided else None
    return ParsedRequest(
        text=written,
        modality_hint=hint,
        regions=tuple(dict.fromkeys(regions)),
        targets=unique,
        notes=notes,
        side=side if side in ("left", "right") else None,
        sequences=sequences,
        other_task=other_task(written),
    )


@dataclass(frozen=True)
class _Header:
    """A worklist header ("MR BRAIN W/WO - TUMOR"): the exam's body parts are context, not targets."""

    body: str  # the request after the header
    targets: list[ParsedTarget]
    regions: list[str]
    sides: set[str]


def _read_header(text: str, vocab: Vocabulary) -> _Header | None:
    """The header before a dash or colon when it names a modality and a request follows it."""
    head = _WORKLIST_HEADER.match(text)
    if not head or detect_modality(head.group(1))[0] is None or not _WORD.search(text[head.end() :].lower()):
        return None
    header = parse_request(head.group(1), vocab)
    regions = list(header.regions) + [
        r for t in header.targets for tok in t.concept.core for r in vocab.organ_regions.get(tok, ())
    ]
    targets = [t for t in header.targets if t.concept.core and not t.negated]
    return _Header(text[head.end() :], targets, regions, _sides_written(head.group(1)))


def _same_as_before(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    """A later "the cyst" is the lesion named before with its side ("Cyst on the left kidney ... the cyst")."""
    out: list[ParsedTarget] = []
    for t in targets:
        sided_before = any(
            p.concept.core == t.concept.core and p.concept.index == t.concept.index and p.concept.laterality
            for p in out
            if not p.negated
        )
        definite = _DEFINITE.search(t.text) is not None
        if sided_before and definite and t.concept.lesion and not t.negated and t.concept.laterality is None:
            continue
        out.append(t)
    return out


def other_task_kind(word: str) -> str:
    """What :func:`other_task`'s ``word`` does, for a plan's reason ("'who' asks a question")."""
    if word in WORDS.withdrawal or word in WORDS.consent_words:
        return "withdraws the request"
    if word in WORDS.questions:
        return "asks a question"
    return "asks for another task"


_REDO = re.compile(r"\bre-\s*([a-z]+)")
_DEFINITE = re.compile(r"\b(?:the|this|that|these|those)\b")


def other_task(text: str) -> str | None:
    """The word that asks for another task than a segmentation, if the request is one.

    The request's first word besides stop words is the verb: "Please burn my liver CT onto a disc" ->
    ``"burn"``; "cancel the spleen segmentation" -> ``"cancel"``; "CT CHEST W MIP - LUNG NODULES",
    "liver and spleen, send results to PACS" -> None.
    The word classes are ``other_tasks``, ``segmentation_words``, ``withdrawal`` and ``questions``
    of ``grammar_words.yaml``.
    """
    low = _REDO.sub(r"re\1", _ascii(text).lower())  # "re-send" is "resend"
    words = [singular(w) for w in _WORD.findall(low)]
    task = next((w for w in words if w in WORDS.result_tasks), None)
    if task is not None:
        return task  # (a result that exists: "re-send the liver SEG", "approve the kidney contours")
    for clause in re.split(r"[.;!?]", low):
        said = set(_WORD.findall(clause))
        if said & WORDS.consent_words and said & WORDS.withdrawal:
            return "consent"  # "consent for AI processing withdrawn, including the pancreas request"
    first = next((w for w in words if w not in STOPWORDS or w in WORDS.other_tasks), None)
    # (the task is the request's verb, its first word: not "CT CHEST W MIP - NODULES", "round window")
    if first in WORDS.withdrawal or (first in WORDS.questions and "?" in text):
        return first  # (a question only when asked: "Why: staging. Segment the liver" is a form)
    if first in WORDS.other_tasks and not any(w in WORDS.segmentation_words for w in words):
        return first
    return None


def _abbreviation_dots(low: str, vocab: Vocabulary) -> str:
    """Dots that close an abbreviation, not a sentence: "renal v.", "sup. mesenteric a.", "lt. kidney"."""
    low = _VESSEL_DOT.sub(lambda m: _VESSEL_DOTS[m.group(1)], low)

    def truncation(m: re.Match[str]) -> str:
        word = m.group(1)
        full = vocab.lexicon.forms.get(word, "")
        abbreviated_side = word in _LATERAL and _LATERAL[word] != word  # "lt." yes; "left." ends a sentence
        if abbreviated_side or word in ("excl", "exc", "vs") or (full.startswith(word[0]) and len(full) > len(word)):
            return word
        return m.group(0)

    return _TRUNCATION_DOT.sub(truncation, low)


def _form_sides(text: str) -> set[str]:
    """The sides a form's own field gives ("Side: LEFT | Organ: KIDNEY", "laterality = R")."""
    return {_LATERAL[m.group(1).lower()] for m in _SIDE_FIELD.finditer(_ascii(text))}


_SIDE_FIELD = re.compile(r"(?:^|(?<=[|;\n]))\s*(?:side|laterality)\s*[:=]\s*(left|right|lt|rt|l|r)\b", re.I)


def _sides_written(header: str) -> set[str]:
    """The sides a worklist header names as written ("CT HIP RT", "XR L HAND"; not "L SPINE",
    "RT PLAN", nor "sinus lift", which the spelling corrector would make "left")."""
    low = _RADIOTHERAPY.sub(" ", _LETTER_SPINE.sub(" ", header.lower()))
    if re.search(r"\b(?:sim|simulation|oars?)\b", low):
        low = re.sub(r"\brt\b", " ", low)  # "CT SIM H&N RT": radiotherapy ("... RT KIDNEY ... PLANNING" is a side)
    # (a letter beside a slash is shorthand, not a side: "R/O PE", "L/S SPINE"; "L/R" is both sides)
    return {_LATERAL[w] for w in re.findall(r"\b(?:left|right|lt|rt)\b|(?<![/\w])[lr](?![/\w])", low)}


def _mend_dictation(low: str, vocab: Vocabulary) -> str:
    """Undo dictation's word breaks: a name heard as two words, words run together, a sound-alike.

    "the a orta" -> "the aorta", "leftkidney" -> "left kidney", "inferior vienna cava" ->
    "inferior vena cava" (:meth:`Vocabulary.joined_reading`, :meth:`~Vocabulary.split_reading`,
    :meth:`~Vocabulary.sound_in_name`). Words joined only by spaces are read together.
    """
    pieces = re.split(r"([^a-z]+)", low)  # words at even positions, what separates them at odd
    out: list[str] = []
    i = 0
    while i < len(pieces):
        word = pieces[i]
        # (not with a letter glued to a number: "vertabra L3" is no "vertebral" and 3)
        level = i + 3 < len(pieces) and pieces[i + 3][:1].isdigit()
        if i + 2 < len(pieces) and word and pieces[i + 2] and pieces[i + 1].isspace() and not level:
            joined = vocab.joined_reading(word, pieces[i + 2])
            if joined is not None:  # read on as one word: it may join or sound with the next
                pieces[i + 2] = joined
                i += 2
                continue
        split = vocab.split_reading(word) if word else None
        if split is not None:
            word = " ".join(split)
        elif word:
            before = pieces[i - 2] if i >= 2 and pieces[i - 1].isspace() else None
            after = pieces[i + 2] if i + 2 < len(pieces) and pieces[i + 1].isspace() else None
            word = vocab.sound_in_name(word, before, after) or word
        out.append(word)
        if i + 1 < len(pieces):
            out.append(pieces[i + 1])
        i += 2
    return "".join(out)


_SIDE_AFTER_SIDED = re.compile(r"\b(left|right)\s+([a-z]+)\s+(?=(?:left|right)\s+[a-z])")
_THE_AFTER_NAME = re.compile(r"\b([a-z]+)\s+(?=the\s+[a-z])")


def _unpunctuated_items(low: str, vocab: Vocabulary) -> str:
    """Items spoken or typed without commas: "the eyes the lenses", "left masseter left temporalis".

    A "the" after a structure's name, or a side after a sided structure's name, starts a new item.
    """

    def named(word: str) -> bool:
        core = vocab.core(word)
        return bool(core) and core in vocab.names and not set(core) & LESION_TOKENS

    low = _SIDE_AFTER_SIDED.sub(lambda m: f"{m.group(1)} {m.group(2)} , " if named(m.group(2)) else m.group(0), low)
    return _THE_AFTER_NAME.sub(lambda m: f"{m.group(1)} , " if named(m.group(1)) else m.group(0), low)


def _drop_purposes(low: str, vocab: Vocabulary) -> str:
    """Drop what a study is for when it names no structure ("liver vol for TIPS", "kidney, donor eval").

    Order entry adds the purpose after the structure; a clause after "for"/"pre"/"post" (or a
    bare "?query") with no word of the vocabulary says why, not what.
    """

    low = _FRACTURE_SIGN.sub(" fractured ", low)  # "?# sternum": the sternum, queried for a fracture

    def purpose(m: re.Match[str]) -> str:
        if m.group(0).lstrip().startswith("?"):
            return " ; "
        if any(singular(w) in WORDS.procedure_words for w in _WORD.findall(m.group(1))):
            return " ; "  # "for the wisdom tooth extraction": what the study is for, though it names a tooth
        tokens, unknown = vocab.canonical_tokens(_WORD.findall(m.group(1)), fix_spelling=False)
        return " ; " if unknown and not tokens else m.group(0)

    return _PURPOSE.sub(purpose, low)


def _eponym_contexts(low: str, vocab: Vocabulary) -> str:
    """An eponymous disease as context: the structure written with it is the target.

    "Kawasaki disease coronary arteries", "Pott's disease T8 to T10", "Jefferson burst fracture of
    the atlas": the eponym (a word the vocabulary does not know, every part of it when hyphenated),
    at most one more word that names nothing, and the disease noun (``eponym_diseases``) end the
    list item before the structure. An inflammation ("-itis") the lexicon reads stays, as its
    organ ("Hashimoto's thyroiditis" is the thyroid). A word the vocabulary reads before the noun
    keeps them all ("polycystic kidney disease" names the kidneys; "DOTATATE-avid disease" is PET
    disease).
    """

    def context(m: re.Match[str]) -> str:
        eponym = _WORD.findall(m.group(1))
        tokens, unknown = vocab.canonical_tokens(eponym, fix_spelling=False)
        between = vocab.canonical_tokens(_WORD.findall(m.group(2) or ""), fix_spelling=False)[0]
        if len(unknown) != len(eponym) or tokens or between:
            return m.group(0)
        inflammation = m.group("itis")
        if inflammation and vocab.canonical_tokens([inflammation], fix_spelling=False)[0]:
            return f" ; {inflammation} ; "
        return " ; "

    return _EPONYM_DISEASE.sub(context, low)


_EPONYM_DISEASE = re.compile(
    r"(?<![\w'-])([a-z][a-z-]+?)(?:'s|s'|')?\s+(?:([a-z]+)\s+)?"
    rf"(?:(?:{'|'.join(sorted(WORDS.eponym_diseases))})s?|(?P<itis>[a-z]{{3,}}itis))\b"
    r"(?:\s+(?:of|at|in|affecting)\s+(?:the\s+)?|\s*[-\u2013\u2014:,](?=\s))?"
)


# "#" is clinical shorthand for a fracture ("# NOF", "?# sternum"): it describes what follows.
_FRACTURE_SIGN = re.compile(r"(?<![\w#])\??\s*#\s*(?=[a-z])")
# "for TIPS", "pre op", "post void", "?mesenteric ischaemia": up to the end of the list item.
# (up to the item's end: a comma, semicolon, colon, bracket, dash or question mark, or the
# request that follows a purpose written first: "For the prosthesis planning we want ...")
_PURPOSE = re.compile(
    r"(?:\b(?:for|pre|post)\s+|(?<![\w?])\?\s*)([^,;:()?]*?)"
    r"(?=\s[-\u2013\u2014]\s|[,;:()?]|\s(?:we|i)\s+(?:want|need|would|require)\b|\s(?:please|kindly)\b|$)"
)


# "Oropharynx plan, OARs to auto-contour: ...": a plan's site opening a request is context, not a target.
_SITE_PLAN = re.compile(r"^\s*(?:[a-z]+\s+){1,2}plan\s*(?=[,;:])")


def _without_record_ids(text: str) -> str:
    """A worklist line without its record keys: HL7 segment and field names, accession and order numbers.

    "ORM^O01 OBR-4 74150^CT ABDOMEN", "ACC# RAD-88123401 CT KUB", "OBR|1|...": identifiers, codes and
    dates (three digits or more), HL7 segment IDs with their field numbers, and a field that holds only a
    set number are the record, not the request; ``|`` separates fields, ``^`` components.
    """
    text = _HL7_SEGMENT.sub(" ", text)
    text = _UID.sub(" ", text)  # "input=series 1.2.3.4.5": a DICOM UID, not five indices
    text = _BRACKETED_ID.sub(" ", text)  # "[RPID1734]" with its brackets: no empty check box is left
    text = _ENUMERATOR.sub(" ; ", text)  # "[1] spleen [2] liver": item numbers, not segment 2
    text = _RECORD_ID.sub(" ", text)
    text = _SET_ID_FIELD.sub("|", text)
    text = _CODE_FIELD.sub("|", text)  # "NTE|1|L|": the comment's source code, not the left side
    return text.replace("|", " ; ").replace("^", " ")


# Segment IDs with field numbers ("OBR-4"), the message type ("ORM^O01"), a code's coding system ("^C4").
_HL7_SEGMENT = re.compile(
    r"\b(?:MSH|EVN|PID|PV1|ORC|OBR|OBX|NTE|ORM|ORU|OMI|ADT|SCH|TQ1)(?:[-.]\d+)*\b(?:\^[A-Z]\d{2}\b)?"
    r"|\^(?:C4|CPT4?|LN|LOINC|SCT|SNM3?|I10|I9C?|99\w*|L|LOCAL)(?=[\s|^~]|$)",
    re.I,
)
# A DICOM UID: four or more dot-separated numbers ("1.2.840.10008.5.1.4", "1.2.3.4.5").
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?!\w|\.\d)")
# Three digits or more, after a record's label ("ACC#", "MRN:") or a letter prefix ("RAD-", "CT"), but
# not a b-value ("b800"); levels and indices have two digits at most.
# A form's or list's item numbers: "[1] spleen [2] liver", "1) liver 2) spleen", "(1) liver".
_ENUMERATOR = re.compile(r"\[\s*\d{1,2}\s*\]|(?:^|(?<=[\s;:,]))\(?\d{1,2}\)(?=\s+[A-Za-z])")
_BRACKETED_ID = re.compile(r"[\[(]\s*#?(?:[A-Za-z]+[-#]?)?\d{3,}[\w-]*\s*[\])]")
_RECORD_ID = re.compile(
    r"(?:\b(?:acc(?:ession)?|mrn|order|req)\s*(?:#|no\.?|number)?\s*:?\s*)?"
    r"(?<![\w.])(?!b\d{2,4}\b)#?(?:[A-Za-z]+[-#]?)?\d{3,}[\w-]*",
    re.I,
)
_SET_ID_FIELD = re.compile(r"\|\s*\d{1,2}\s*(?=\|)")
_CODE_FIELD = re.compile(r"\|\s*[A-Za-z]\s*(?=\|)")


def _rule_action(text: str, vocab: Vocabulary) -> str:
    """What a routing rule asks for, without its condition.

    "Mirth route: OBR-4 contains 'RT KIDNEY' -> task = segment right kidney", "IF StudyDescription
    MATCHES 'LIVER' THEN liver volume": the condition matches studies, the action is the request
    when it names a structure (not "... then SendToModality('AISEG')").
    """
    arrows = list(_RULE_ARROW.finditer(text))
    if not arrows or not _RULE_CONDITION.search(text[: arrows[-1].start()]):
        return text
    action = text[arrows[-1].end() :]
    tokens, _ = vocab.canonical_tokens(_WORD.findall(_ascii(action).lower()), fix_spelling=False)
    return action if tokens else text


_RULE_ARROW = re.compile(r"->|=>|\u2192|\bthen\b", re.I)
_RULE_CONDITION = re.compile(r"\b(?:contains?|matches)\b|==|~|\blike\s*['\"]|=\s*['\"]", re.I)  # an operator


def _values_only(text: str) -> str:
    """A request written for a machine without its keys ("organ=liver", ``{"organ": "liver"}``, "step 2 =").

    Keys, tags and pipeline step numbers name the form, not a structure; the values are the request.
    """
    text = _DICOM_KEYWORD.sub(" , ", text)
    text = _MARKUP_TAG.sub(" , ", _JSON_KEY.sub(" , ", text))
    text = _PIPELINE_STEP.sub(" , ", text)
    text = _DROPDOWN.sub(" ", text)
    return _KEY_EQUALS.sub(" , ", text)


_JSON_KEY = re.compile(r'"[\w .-]+"\s*:')


def _patients_side(text: str) -> str:
    """Sides as the patient's and as named ("the image's left (the patient's right)").

    Only a request that says which side is the patient's loses the image's: a side on its own is
    the patient's already.  A side described, then named ("on the symptomatic side (left)"), is the
    named one.
    """
    text = _DESCRIBED_SIDE.sub(r" \1 ", text)
    text = _relative_side(text)
    if not _PATIENTS_SIDE.search(text):
        return text
    return _PATIENTS_SIDE.sub(r"\1", _IMAGE_SIDE.sub(" ", text))


def _relative_side(text: str) -> str:
    """ "Contralateral" and "ipsilateral" as the side they mean, when the request names one side.

    "Tumour in the left kidney - segment the contralateral kidney" asks for the right one; with
    no side, or both, named, the words stay as written.
    """
    if not _RELATIVE_SIDE.search(text):
        return text
    named = {_LATERAL[w.lower()] for w in re.findall(r"\b(left|right)\b", text, re.I)}
    if len(named) != 1:
        return text
    side = named.pop()
    other = "right" if side == "left" else "left"
    return _RELATIVE_SIDE.sub(lambda m: side if m.group(0).lower().startswith("ipsi") else other, text)


_RELATIVE_SIDE = re.compile(r"\b(?:contralateral|ipsilateral)\b", re.I)
_DESCRIBED_SIDE = re.compile(r"\b(?:on\s+)?the\s+[a-z]+\s+side\s*\(\s*(left|right)\s*\)", re.I)


_PATIENTS_SIDE = re.compile(r"\b(?:the\s+)?(?:patient|pt)'?s?'?\s+(left|right)\b", re.I)
_IMAGE_SIDE = re.compile(
    r"\b(?:on\s+)?(?:the\s+)?(?:image|screen|film|monitor|picture|viewer)'?s?'?\s+(?:left|right)(?:\s+side)?\b", re.I
)
_SIDE_COMPARISON = re.compile(r"\b(?:[LR]|left|right)\s*(?:>=|<=|>|<|=)\s*(?:[LR]|left|right)\b", re.I)
# A DICOM attribute's tag and keyword before its value: "(0040,0254) PerformedProcedureStepDescription:".
_DICOM_KEYWORD = re.compile(
    r"(?:\(\s*[0-9A-Fa-f]{4}\s*,\s*[0-9A-Fa-f]{4}\s*\)\s*)"
    r"(?:[A-Z][a-z]+(?:[A-Z][a-z]*)*\s*[:=]?)?"
    r"|\b[A-Z][a-z]+(?:[A-Z][a-z]*)*(?:Description|Comments?|Reason\w*|Sequence|Name)\s*[:=]"
)
_MARKUP_TAG = re.compile(r"</?[A-Za-z_][\w.-]*\s*/?>")
_PIPELINE_STEP = re.compile(r"\b(?:step|stage)\s*#?\d+\b\s*[:=]?", re.I)
# A drop-down's arrow copied as "v" after its value: "Body part: Pelvis v ; Structures v :".
_DROPDOWN = re.compile(
    # (not a Roman V in a list: "segments IV and V; spleen")
    r"(?<=\w)(?<!segment)(?<!segments)(?<!seg)(?<!\band)(?<!\bor)(?<!\bto)(?<!\biv)(?<!\bvi)(?<!\bii)(?<!\bi)"
    r"\s+[vV\u25bc\u25be](?=\s*(?:[;:|]|\s\w+\s*:))"
)
_KEY_EQUALS = re.compile(r"(?<![\w=<>!])[A-Za-z_][\w.]*\s*=(?!=)")


def _corrected(text: str) -> str:
    """The request as its writer corrected it ("liver. Correction: the spleen", "no, sorry, the spleen").

    What follows the last correction replaces what came before, unless it adds to it ("on second
    thought add the IVC as well").
    """
    last = max(_CORRECTION.finditer(text), key=lambda m: m.start(), default=None)
    if last is None or not text[last.end() :].strip():
        return text
    before, after = text[: last.start()], _CANCEL.sub("", text[last.end() :])
    if _ADDITION.search(after):
        return f"{before}; {after}"
    side = _SIDE_ONLY.fullmatch(after.strip(" .!").lower())
    if side:  # "the kidneys. actually only the left one": the side of what came before
        before = re.sub(r"\b(?:left|right|both|bilateral)\b", " ", before, flags=re.I)
        return f"{before.rstrip(' .,;')}, {side.group(1)} side"
    return after


# A correction starts a sentence or a clause: "Correction:", "Typo - meant", "no, sorry,", "I meant".
_CORRECTION = re.compile(
    r"(?:^|(?<=[.;!?,])|(?<=\.\.\.))\s*(?:no,?\s+)?(?:correction|typo|sorry|scratch that|on second thought"
    r"|i meant|meant|actually|i mean|rather|never\s*mind|cancel(?:led)?"
    # ("disregard that": a correction; "disregard the parathyroids": an exclusion)
    r"|disregard(?=\s*(?:[,.;:!]|$)|\s+(?:that|it|this|my|the\s+(?:above|previous|last|first))\b))\b"
    r"[\s:,\-\u2013]*(?:(?:i\s+)?meant\b[\s:,]*)?",
    re.I,
)
# "actually cancel that, no segmentation needed": the cancelling words themselves name nothing.
_CANCEL = re.compile(
    r"^\s*(?:cancel(?:led)?|never\s*mind|disregard|scratch|forget)\b(?:\s+(?:that|it|this))?[\s,.;:]*", re.I
)
_SIDE_ONLY = re.compile(r"(?:(?:just|only|the)\s+)*(left|right)(?:\s+(?:one|ones|side|only))*")
_ADDITION = re.compile(r"\b(?:add|also|as well|too|in addition)\b", re.I)
# A sentence ends at ". " (not "2.5", not "1." numbering, handled before): the next sentence is another item.
_SENTENCE_END = re.compile(r"(?<=[a-z)\]])[.!?]+\s+(?=\S)")


def _ordinal_name(target: ParsedTarget, vocab: Vocabulary) -> ParsedTarget:
    """A numbered structure whose number is part of its name.

    "3rd ventricle" is the third ventricle; in "upper right first molar" the ordinal is a word of
    the tooth's name (lexicon concepts name the first molar), not an index over molars.
    """
    index = target.concept.index
    if not index or len(index) != 1 or not next(iter(index)).isdigit():
        return target
    number = int(next(iter(index)))
    word = next((w for w, n in _ORDINALS.items() if n == number), None)
    named = tuple(sorted((*target.concept.core, word))) if word else ()
    core = set(target.concept.core)
    if named not in vocab.concepts and not any(word in key and core & set(key) for key in vocab.concepts):
        return target
    return replace(target, concept=replace(target.concept, core=named, index=None))


def _split_structure_names(text: str, vocab: Vocabulary) -> str:
    """Spell out structure names written as identifiers (AAPM TG-263: ``OpticNrv_L``, ``Glnd_Submand_R``).

    The parts of a name joined by underscores are words, a part in camel case is several, and
    a last part ``L``/``R`` is the side.
    """

    def words(m: re.Match[str]) -> str:
        parts = m.group(0).split("_")
        if parts[-1] in ("L", "R", "l", "r", "Lt", "Rt"):
            parts[-1] = "left" if parts[-1][0] in "Ll" else "right"
        parts[1:] = [_TG263_QUALIFIER.get(p, p) for p in parts[1:]]
        if len(parts) > 1 and parts[0].lower() in _TG263_CLASS:
            parts[0] = _tg263_class(
                parts[0].lower(), [w for p in parts[1:] for w in _CAMEL.sub(" ", p).lower().split()], vocab
            )
        return " ".join(_CAMEL.sub(" ", p) for p in parts if p)

    return _CAMEL_NAME.sub(lambda m: _CAMEL.sub(" ", m.group(0)), _IDENTIFIER.sub(words, text))


def _tg263_class(prefix: str, rest: list[str], vocab: Vocabulary) -> str:
    """What a TG-263 class prefix adds to the rest of the name ("Musc_Constrict": the muscle).

    Nothing when the rest names a structure by itself ("Bone_Mandible", "A_Aorta"); the class noun
    when the rest needs it; the prefix as written when the rest is not known ("A_LAD" stays unread).
    """
    if not all(vocab.correct_spelling(singular(w)) in vocab.known for w in rest):
        return prefix
    if tuple(sorted(vocab.canonical_tokens(rest)[0])) in vocab.concepts:
        return ""
    return _TG263_CLASS[prefix]


_IDENTIFIER = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+\b")
_CAMEL_NAME = re.compile(r"\b[A-Z][a-z]{2,}(?:[A-Z][a-z]{2,})+\b")  # "PenileBulb", "BrachialPlexus"
# AAPM TG-263's class prefixes and qualifiers.
_TG263_CLASS = MappingProxyType(WORDS.tg263.classes)
_TG263_QUALIFIER = MappingProxyType(WORDS.tg263.qualifiers)
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7, "viii": 8}
# Couinaud segments are written in Roman numerals ("segments V-VI", "Couinaud IV").
_LIVER_CONTEXT = re.compile(r"\b(?:couinaud|liver|hepatic|hepato\w*|hepatectomy|lobe|lobes|hpb|flr|sectionectomy)\b")
_LIVER_DIVISIONS = {" ".join(name.split()): tuple(segments) for name, segments in WORDS.liver_divisions.items()}
_LIVER_DIVISION = re.compile(
    r"\b("
    + "|".join(sorted(map(re.escape, _LIVER_DIVISIONS), key=len, reverse=True))
    + r")(?:\s+of\s+the\s+liver)?\b"
    # ("the left liver lobe" is the anatomical lobe; a "right liver lesion" is the liver's lesion)
    + r"(?!\s+(?:lobe|"
    + "|".join(sorted(WORDS.lesion_words | {"tumour", "metastasis", "metastases"}))
    + r"))"
)
_COUINAUD_S = re.compile(r"\b(?:s|seg)\s?([1-8])[ab]?\b")
_COUINAUD_ROMAN = re.compile(
    r"\b(couinaud|segments?(?:\s+from)?)((?:\s*(?:,|-|–|to|through|thru|and|&|/)?\s*\b(?:viii|vii|vi|iv|v|iii|ii|i)\b)+)"
)


def _complete_prefixes(low: str, vocab: Vocabulary) -> str:
    """ "naso-, oro- and hypopharynx": a prefix with a hyphen takes the stem of the word that ends the list."""

    def complete(m: re.Match[str]) -> str:
        word = m.group(2)
        stem = next((word[k:] for k in range(1, len(word) - 3) if word[k:] in vocab.known), None)
        return m.group(0) if stem is None else m.group(1) + stem + m.group(0)[len(m.group(1)) + 1 :]

    return _PREFIX_HYPHEN.sub(complete, low)


# "oro-" before ", " / " and " ... up to the list's last word (group 2)
_PREFIX_HYPHEN = re.compile(r"\b([a-z]{2,})-(?=(?:\s*(?:,|and|or|&)\s*[a-z]{2,}-)*\s*(?:,|and|or|&)\s*([a-z]{5,})\b)")


# Contractions: "don't need the spleen", "isn't needed" ("won't" and "can't" change their stem).
_CONTRACTION = re.compile(r"\b(\w+?)n't\b")
_STRUCK = re.compile(r"~~([^~]{1,60})~~")
# A form's list of what not to segment: "Exclusions: ...", "Non-targets (do not segment): ...".
_EXCLUDED_LIST = re.compile(
    r"\b(?:non[- ]?targets?|exclusions?|excluded(?:\s+structures?)?|do\s+not\s+(?:segment|contour|include)"
    r"|not\s+to\s+be\s+segmented)\b[^:;.\n]{0,30}:\s*([^.;|\n]+)"
)


def _excluded_items(m: re.Match[str]) -> str:
    # (an aside in brackets says why: "liver (segmented at screening)")
    items = [item.strip() for item in re.split(r",|\band\b|&|\+", re.sub(r"\([^)]*\)", " ", m.group(1)))]
    out: list[str] = []
    for i, item in enumerate(items):
        words = _WORD.findall(item)
        if any(w in WORDS.segmentation_words or w == "please" for w in words):
            # the list ended and the request goes on ("Exclusions: none, please segment the liver")
            return " ; " + " , ".join(out) + " ; " + " , ".join(items[i:]) + " "
        if item and item not in ("none", "nil", "n/a", "na", "nothing"):
            out.append(f"except {item}")
    return " ; " + " , ".join(out) + " ; "


# A form's answer for a structure: "Liver: Y | Spleen: N", "Left lung: n/a (pneumonectomy)".
_FORM_ANSWER = re.compile(
    r"(?:^|(?<=[|;,.\n]))\s*([a-z]+(?: [a-z]+){0,2})\s*:\s*(y|n|yes|no|n/a|none)(?=\s*(?:$|[|;,.(]))"
)
_CONTRACTED = {"wo": "will", "ca": "can", "sha": "shall"}  # the stems "won't", "can't", "shan't" change
# The other ways to write an exclusion, in the one form the list grammar reads ("except"):
# "everything but the bladder", "all organs but the spleen" (not "but not", "but also", "but only"),
# "leave the trachea alone / out", "no need for the spleen", "ignore / drop / remove the spleen".
# "but" before a focus word adds weight, it excludes nothing ("all organs but especially the liver").
_FOCUS = r"(?:especially|mainly|mostly|particularly|above\s+all)\b"
_ALL_BUT = re.compile(
    rf"\b((?:all|every|everything|anything|whole|entire)\b[^,;:.]*?)\s+but\s+(?!not\b|also\b|only\b|no\b|with\b"
    rf"|including\b|{_FOCUS})"
)
_LEAVE_ALONE = re.compile(r"\bleave\s+(?!out\b)([^,;:.]{1,60}?)\s+(?:alone|out)\b")
_EXCLUDING_VERB = re.compile(
    # ("ignore", "drop", "remove" only where a clause opens, perhaps after "you can", "please":
    # "drop metastases" is a finding)
    r"\bno\s+need\s+(?:for|of|to\s+(?:do|include|segment))\b"
    r"|(^|[,;:.]|\s-\s|\band\b|\bbut\b|\bthen\b)((?:\s*\b(?:you|we|can|could|may|please|just|also)\b)*)"
    r"\s*(?:ignore|disregard|drop|remove)\b"
)
_POSTFIX_NOT = re.compile(r"(^|[,;:])([^,;:]*?[a-z][^,;:]*?)(?<!\bor)\s+not\s*(?=$|[,;:.])")  # (not "... or not")
_BUT_FOCUS = re.compile(rf"\bbut\s+{_FOCUS}")
# "kidneys, but only the left": a side-only correction, not an exclusion.
_BUT_ONLY = re.compile(
    r"\bbut\s+(?=(?:just|only|except|exclude|excluding|skip|skipping|omit|omitting|minus|without|leaving)\b)"
)


# Anatomists' abbreviations after a name: "a." artery, "v." vein, "aa." / "vv." their plurals.
# (not a class letter: "type A.", "grade V.", "zone A.")
_VESSEL_DOT = re.compile(r"(?<=[a-z])(?<!\btype)(?<!\bgrade)(?<!\bzone)(?<!\bclass)(?<!\bstage)\s+(aa|vv|a|v)\.(?!\w)")
_VESSEL_DOTS = {"a": " artery ", "v": " vein ", "aa": " arteries ", "vv": " veins "}
_TRUNCATION_DOT = re.compile(r"\b([a-z]{2,6})\.(?=\s)")
# Words that carry a structure on into the next (level ranges are read before): a list.
_EXTENT = re.compile(
    r"\b(?:(?:all\s+the\s+way\s+)?down\s+(?:to|through|into)|through\s+to|as\s+far\s+as"
    r"|extending\s+(?:in)?to|continuing\s+(?:in)?to)\b"
)
# "VS" that stands alone or before what is measured is a vestibular schwannoma; "versus" compares
# two things or one with a prior ("tumour volume (vs. prior)", "vs 2019").
_VS_ALONE = re.compile(
    r"(^\s*|[-:;,>(/]\s*|\b(?:the|and)\s+)vs(?!\s*(?:prior|previous|baseline|last|\d))"
    r"(?=\s*(?:$|[;,.)]|\b(?:volume|volumetry|size|seg\w*|tumou?r|left|right|only)\b))"
)
# Punctuation spoken into a dictation system.
_DICTATED_PUNCTUATION = re.compile(r"\bcomma\b|\b(?:full\s+stop|period|new\s+line|next\s+line|semicolon)\b")
# An order form's check boxes: "[x] Liver [ ] Kidneys" asks for the liver, not the kidneys.
_CHECKBOX = re.compile(r"\[\s*([x\u2713\u2714\u2612*]?)\s*\]")
# An ordinal before an article orders the request, not a series: "first the liver, then ...".
_DISCOURSE_ORDINAL = re.compile(
    r"\b(?:first|second|third|last)\b(?=\s*,?\s*(?:the|a|an|my|of\s+all)\b)|\b(?:last|this|next)\s+time\b"
)
# "RT" before planning words is radiotherapy, not the right side.
_RADIOTHERAPY_WORDS = "|".join(sorted(WORDS.radiotherapy_context, key=len, reverse=True))
_RADIOTHERAPY = re.compile(rf"\brt(?=[\s:_-]+(?:{_RADIOTHERAPY_WORDS})\b)|(?<=\bsim\s)rt\b")


#: "Do not segment the enhancing tumour separately": no exclusion, the part stays inside its whole.
_NOT_JUST = re.compile(r"\b(?:but )?not (?:just|only|merely)\b")
_NOT_SEPARATELY = re.compile(
    r"\b(?:do not|does not|no need(?: to| for)?|not)\b(?:(?!\band\b|\s-\s)[^,;.:])*?\bseparately\b"
)


def _exclusion_forms(low: str) -> str:
    """Contractions spelt out and every exclusion written as "except"."""
    low = _STRUCK.sub(r" , except \1 , ", low)  # "~~Cochlea_L~~": struck off a template's list
    low = _EXCLUDED_LIST.sub(_excluded_items, low)  # "Non-targets (do not segment): liver lesions, vessels"
    low = _FORM_ANSWER.sub(
        lambda m: f" , {m.group(1)} , " if m.group(2) in ("y", "yes") else f" , except {m.group(1)} , ", low
    )
    low = _CONTRACTION.sub(lambda m: _CONTRACTED.get(m.group(1), m.group(1)) + " not", low)
    low = _NOT_SEPARATELY.sub(" , ", low)  # "no need for the core separately": it stays in the whole
    low = _NOT_JUST.sub(" and ", low)  # "the whole tumour, not just the enhancing part": both
    low = _ALL_BUT.sub(r"\1 except ", low)
    low = _LEAVE_ALONE.sub(r" except \1 ", low)
    low = _EXCLUDING_VERB.sub(lambda m: f"{m.group(1) or ''} except ", low)
    low = _POSTFIX_NOT.sub(r"\1 except \2 ", low)  # "the right kidney, the left one not"
    low = _BUT_FOCUS.sub(" , ", low)  # "all organs but especially the liver": nothing excluded
    return _BUT_ONLY.sub("", low)  # also "thyroid but except the trachea": the "but" adds nothing


def _is_dental(text: str) -> bool:
    """A dental request: a word of teeth, or a cone-beam CT that guides no radiotherapy fraction.

    Read from the whole request, its header included ("CBCT: UR1 and UL1").
    """
    if _DENTAL_WORD.search(text):
        return True
    return _DENTAL.search(text) is not None and not set(_WORD.findall(text)) & WORDS.image_guidance


def _couinaud_roman(m: re.Match[str]) -> str:
    """Couinaud segments in Roman numerals as numbers; after "segments" they are Couinaud's too.

    A lone "i" after the verb "segment" is the pronoun ("segment, I need the spleen").
    """
    word, numerals = m.group(1), m.group(2)
    if word.startswith("segment") and re.fullmatch(r"[\s,]*i", numerals):
        return m.group(0)
    head = "couinaud segments" if word.startswith("segment") else word
    return head + re.sub(r"\b[iv]+\b", lambda r: str(_ROMAN[r.group(0)]), numerals)


def _numbers_and_levels(low: str) -> str:
    """Couinaud segments, vertebral levels, rib sides and ranges spelt out as single items."""
    # (Roman numerals after "segments" are Couinaud's notation: "segments VI and VII" are the liver's)
    low = _COUINAUD_ROMAN.sub(_couinaud_roman, low)
    # "right hemiliver", "left lateral section": the liver's divisions are their Couinaud segments
    low = _LIVER_DIVISION.sub(
        lambda m: " couinaud " + " ".join(f"n{n}" for n in _LIVER_DIVISIONS[m.group(1)]) + " ", low
    )
    if _LIVER_CONTEXT.search(low):
        low = _COUINAUD_S.sub(r" segment \1 ", low)  # "liver S7", "Couinaud S4a": segments, not sacral levels
        # "the liver, segments (from) 5 to 8": a numbered segment is the liver's, not the command "segment"
        low = re.sub(r"(?<!couinaud )\bsegments?\s+(?:from\s+)?(?=\d)", " couinaud segment ", low)
    low = _SPELLED_LEVEL.sub(_spelled_level, low)  # dictated "el four and el five": L4 and L5
    # "ribs L5-8", "R 9-10 ribs": beside ribs, L and R are sides, not lumbar levels.
    low = _RIB_SIDE.sub(lambda m: f"{m.group(1) or ''} {_LATERAL[m.group(2) or m.group(3)]} ", low)
    # Ranges first: they contain separators ("T10-L2", "ribs 3-5").
    low = _LEVEL_RANGE.sub(_expand_level_range, low)
    low = _NUM_RANGE.sub(lambda m: _expand_numbers(int(m.group(1)), int(m.group(2))), low)
    low = _ORDINAL_RANGE.sub(lambda m: _expand_numbers(_NUMBER_WORDS[m.group(1)], _NUMBER_WORDS[m.group(2)]), low)
    low = _FIRST_N.sub(_expand_first_n, low)
    low = _LAST_ONE.sub(lambda m: f"n{_COUNTS[m.group(1) or m.group(2)]} ", low)
    return _LETTER_SPINE.sub(lambda m: _SPINE_SEGMENT[m.group(1)], low)


def _spoken_forms(low: str) -> str:
    """How patients, referrers and order entry name a structure, in the grammar's words."""
    low = _CONTRAST_PHASE.sub("phase", low)  # "on the arterial phase": when, not the arteries
    low = _RADS_SCALE.sub(r"\1rads", low)  # "PI-RADS 4": one findings word, as "pirads" is
    low = _PRIMARY_NOUN.sub(r"\1primary tumour", low)  # "the tonsil primary": the primary tumour
    low = _KID.sub(r"\1 kidney", low)  # order entry's "lt kid vol", "Rt kid"
    # "the two kidneys": both of them ("the two arteries to the legs" stays a description)
    low = _ALL_OF_A_COUNT.sub(lambda m: m.group(0) if singular(m.group(2)) in CLASS_NOUNS else f"{m.group(1)} ", low)
    return _LAY_SPINE.sub(lambda m: f"{WORDS.lay_spine_parts[m.group(1) or m.group(2)]} spine", low)


#: An abbreviation and, a few words on, its expansion in brackets ("SMA at L3 (skeletal muscle area)").
_SPELLED_OUT = re.compile(r"\b([a-z]{2,6})\b((?:\s+[a-z0-9]+){0,3}?)\s*\(\s*([a-z][a-z -]*[a-z])\s*\)")


def _spelled_out(m: re.Match[str]) -> str:
    """The expansion in place of the abbreviation whose letters its words' initials spell."""
    abbreviation, between, expansion = m.groups()
    initials = "".join(w[0] for w in re.split(r"[\s-]+", expansion) if w not in WORDS.acronym_fillers)
    return f"{expansion}{between}" if initials == abbreviation else m.group(0)


def _dental_notations(low: str) -> str:
    """Palmer and (when named) Universal tooth numbers as FDI numbers, FDI numbers as tooth names."""
    low = _PALMER.sub(lambda m: f" {_PALMER_QUADRANTS[m.group(1)]}{m.group(2)} ", low)  # "UR1", "LL8"
    if re.search(r"\buniversal\b", low):  # "tooth #19 (Universal numbering)": 1-32 to FDI
        low = _UNIVERSAL.sub(lambda m: _universal_to_fdi(int(m.group(1))) or m.group(0), low)
    return _FDI_TEETH.sub(_fdi_names, low)


def _expand_shorthand(low: str, protected: Collection[str], dental: bool = False) -> str:
    """Spell out worklist shorthand, sides, ranges and protected names before splitting."""
    low = _DICTATED_PUNCTUATION.sub(lambda m: " , " if m.group(0) == "comma" else " ; ", low)  # "aorta comma IVC"
    low = _check_boxes(low)  # "[x] liver [ ] spleen", "liver [x] spleen [ ]"
    low = _VS_ALONE.sub(r"\1 vestibular schwannoma ", low)  # "IAC - VS volume", "cochlea and VS"; not "vs. prior"
    low = _exclusion_forms(low)
    low = _RADIOTHERAPY.sub(" radiotherapy ", low)  # "BREAST (RT PLAN)" is no right breast
    low = _DISCOURSE_ORDINAL.sub(" ", low)  # "First the liver": no first liver segment
    low = low.replace("w/o", " without ").replace("w/", " with ").replace("s/p", " ").replace("f/u", " followup ")
    low = re.sub(r"\bh\s*[&/+]\s*n\b", " hn ", low)  # "H&N", "H/N": head and neck
    # Spelled out, "head and neck" is one region, not a list of two items.
    low = re.sub(r"\bhead\s*(?:and|&|/|\+)\s*neck\b", " hn ", low)
    low = re.sub(r"(?:^|(?<=\s))\(?\d{1,2}[).](?=\s)", " ; ", low)  # "1) liver 2) spleen", "1. liver"
    low = re.sub(r"[(\[]\s*(left|right|l|r|lt|rt|bilateral|both)\s*[)\]]", r" \1 ", low)  # "kidney (R)"
    low = _SPELLED_OUT.sub(_spelled_out, low)  # "SMA (skeletal muscle area)": the words, not the artery
    low = re.sub(r"[()\[\]]", " , ", low)  # any other bracket: an aside, i.e. another item
    low = re.sub(r"\b(?:b/l|b\\l)\b", " bilateral ", low)
    # "L/R", "left and right": both sides, i.e. left, right and unsided labels alike.
    low = _BOTH_SIDES.sub(" bilateral ", low)
    low = re.sub(r"\s=\s", " : ", low)  # 'Template "Upper abdo organs" = liver; spleen'
    low = re.sub(r"\b(?:numbers?|nos?\.|#)\s*(?=\d)", " ", low)  # "ribs except number 11 and number 12"
    low = re.sub(r"(?<=[a-z])'s\b", "", low)
    if dental:  # (before number ranges: "teeth 44-47" runs along one quadrant)
        low = _dental_notations(low)
    low = _GRADE.sub(r"\1", low)  # "Deauville 4-5 lesions": a grade, no index of the lesions (before ranges)
    low = _spoken_forms(_numbers_and_levels(low))
    low = _ENLARGEMENT.sub(_enlarged_organs, low)
    low = _MEASURE_OF.sub(" ; ", low)  # "volumes of the left kidney and of the bladder"
    low = _MUSCLE_MASS.sub(r"\1", low)  # "left ventricular muscle mass" is the myocardium, no tumour
    low = _EXTENT.sub(_extent_as_list, low)  # "aorta down through both CIAs": the aorta and the CIAs
    # (runs of spaces collapsed first: the item's lazy match before "\s+" is quadratic in them)
    low = _DONE_OR_GONE.sub(_done_or_gone_item, re.sub(r"[ \t]{2,}", " ", low))  # "the prostate is already contoured"
    low = _NOT_NEEDED.sub(_not_needed_item, low)  # "femoral heads not needed"
    low = _INDICATION.sub(" ; ", low)  # "history of cirrhosis", "rule out HCC": why, not what
    for phrase in protected:
        if phrase in low:
            joined = re.sub(r"\s*(?:\band\b|\bwith\b|\bincluding\b|&|\+)\s*", " incl ", phrase)
            low = re.sub(r"\b" + re.escape(phrase) + r"\b", joined, low)
    return low


_ENLARGEMENT_FORM = re.compile("|".join(sorted(WORDS.enlargement_forms, key=len, reverse=True)))
_ENLARGEMENT = re.compile(rf"\b((?:(?:{_ENLARGEMENT_FORM.pattern})o?)+)megal(?:y|ic|ies)\b")


_MEASURE_OF = re.compile(r"\b(?:volumes?|segmentations?|contours?|masks?|outlines?)\s+of\b")
_MUSCLE_MASS = re.compile(r"\b(muscle|ventricular|myocardial|lv)\s+mass\b")


def _names_nothing(word: str) -> bool:
    # no word, a stop word or an order's quantity ("annulus plane", "iliacs stat")
    return not word or word in STOPWORDS or word in _ORDER_WORDS


def _context_readings(low: str, request: str) -> str:
    """A bare word that names structures of several kinds, read as the kind its request's context names.

    "?AAA leak: aorta + both iliacs" are the iliac arteries, "CT TAVI - ANNULUS" the aortic annulus,
    "CT SINUS - MAXILLARY + FRONTAL" the sinuses (``context_readings`` in ``grammar_words.yaml``).
    The word is bare when nothing but stop words follows it in its item ("iliac veins" is no
    bare "iliac"); the context may be anywhere in the request, its worklist header included.
    """
    context, written = set(_WORD.findall(request)), set(_WORD.findall(low))
    for bare, reading in WORDS.context_readings.items():
        if bare in written and context & reading.context and not context & reading.unless:
            low = _CONTEXT_PATTERNS[bare].sub(
                lambda m, reads=reading.reads: reads if _names_nothing(m.group(1).strip()) else m.group(0),
                low,
            )
    return low


def _context_pattern(bare: str, reading: ContextReading) -> re.Pattern[str]:
    # The bare word, not after its reading's first word nor after a word that makes it no bare word.
    after = [reading.reads.split()[0], *sorted(reading.not_after)]
    behind = "".join(rf"(?<!\b{re.escape(w)} )" for w in after)
    return re.compile(rf"{behind}\b{bare}\b(?=((?:\s+[a-z']+)?))")


_CONTEXT_PATTERNS = {bare: _context_pattern(bare, reading) for bare, reading in WORDS.context_readings.items()}


def _enlarged_organs(m: re.Match[str]) -> str:
    """ "hepatosplenomegaly" -> "liver and spleen": an enlargement named is a volume request for the organs."""
    forms = _ENLARGEMENT_FORM.findall(m.group(1))
    return " " + " and ".join(WORDS.enlargement_forms[f] for f in forms) + " "


def _check_boxes(low: str) -> str:
    """An order form's check boxes as list items and exclusions.

    A box belongs to the item after it ("[x] Liver [ ] Spleen") unless the form ends with a box,
    which puts each box after its item ("Liver [x] Spleen [ ]", "Liver: [x]").
    """
    if not _CHECKBOX.search(low):
        return low
    if not re.search(r"\]\s*[.;,]?\s*$", low):
        return _CHECKBOX.sub(lambda m: " ; " if m.group(1).strip() else " ; except ", low)
    parts = _CHECKBOX.split(low)  # item, mark, item, mark, ..., trailing text
    items = [
        f" ; {'' if mark.strip() else 'except '}{item.strip(' :')}"
        for item, mark in zip(parts[0:-1:2], parts[1::2], strict=True)
    ]
    return " ".join(items) + " ; " + parts[-1]


def _extent_as_list(m: re.Match[str]) -> str:
    """An extent word as a list's "and", except inside a relative clause, where it describes.

    "aorta down through both CIAs" is two structures; "the pipe that carries food down to the
    stomach" is one, described.
    """
    clause = re.split(r"[,;:.]", m.string[: m.start()])[-1]
    before = _WORD.findall(clause)[-1:]
    # (nor after a verb of motion: "the air tube that goes down to my lungs" describes one structure;
    # nor on a course: "from the heart down to the belly")
    describes = _RELATIVE.search(clause) or (before and before[0] in WORDS.motion_verbs) or _FROM.search(clause)
    return m.group(0) if describes else " and "


_RELATIVE = re.compile(r"\b(?:that|which|who|where)\b")
_FROM = re.compile(r"\bfrom\b")


def _fdi_names(m: re.Match[str]) -> str:
    """ "incisors 11 and 21", "tooth 36": FDI two-digit tooth numbers (quadrant, position) as tooth names.

    A range runs along one quadrant ("teeth 44-47", "11 to 13"); ends in two quadrants are two teeth.
    A span is no range ("the bridge from 44 to 46" rests on 44 and 46): it is left as written.
    """
    if m.string[: m.start()].rstrip().endswith("from"):
        return m.group(0)  # a span, read as before dental notation
    numbers: list[str] = []
    for first, last in _FDI_RANGE.findall(m.group("numbers")):
        along = last and last[0] == first[0] and last[1] > first[1]
        numbers.extend(
            [f"{first[0]}{p}" for p in range(int(first[1]), int(last[1]) + 1)]
            if along
            else [first, last][: 1 + bool(last)]
        )
    return " ; ".join(_fdi_name(n) for n in numbers)


def _fdi_name(number: str) -> str:
    """The name of the tooth an FDI number ("36") stands for ("lower left first molar")."""
    quadrant, position = int(number[0]), int(number[1])
    jaw = "upper" if quadrant in (1, 2) else "lower"
    side = "right" if quadrant in (1, 4) else "left"
    return f"{jaw} {side} {_FDI_POSITIONS[position - 1]}"


# Palmer notation: a quadrant (upper/lower, right/left) and a position ("UR1" is FDI 11, "LL8" 38).
_PALMER_QUADRANTS = {"ur": 1, "ul": 2, "ll": 3, "lr": 4}
_PALMER = re.compile(r"\b(ur|ul|ll|lr)\s?([1-8])\b")
# A Universal tooth number: after "#" or a tooth word ("tooth #19", "teeth 3 and 14" takes the first).
_UNIVERSAL = re.compile(r"(?:#|\b(?:tooth|teeth)\s+#?)(\d{1,2})\b")
# A word of teeth, without "CBCT" (which radiotherapy takes too: "the prostate on the CBCT").
_DENTAL_WORD = re.compile(r"\b(?:tooth|teeth|incisors?|canines?|premolars?|molars?|fdi|dental|dentition|palmer)\b")


def _universal_to_fdi(n: int) -> str | None:
    """The FDI number of a tooth in the Universal (American) numbering, 1-32 ("19" is 36)."""
    if not 1 <= n <= 32:
        return None
    quadrant, k = divmod(n - 1, 8)  # 1-8 upper right from the third molar, 9-16 upper left, ...
    position = 8 - k if quadrant in (0, 2) else k + 1
    return f"{quadrant + 1}{position}"


# The permanent dentition by FDI position, 1 (central incisor) to 8 (third molar).
_FDI_POSITIONS = (
    "central incisor", "lateral incisor", "canine", "first premolar", "second premolar",
    "first molar", "second molar", "third molar",
)  # fmt: skip
_DENTAL = re.compile(r"\b(?:tooth|teeth|incisors?|canines?|premolars?|molars?|fdi|dental|dentition|cbct)\b")
# An FDI number, or a list of them, with the tooth words in front of it that it makes precise.
_FDI = r"[1-4][1-8]"
_FDI_TO = r"\s*(?:-|\u2013|to|through|thru)\s*"
_FDI_ITEM = rf"\b{_FDI}\b(?:{_FDI_TO}\b{_FDI}\b)?"  # a number, or a range of them
_FDI_RANGE = re.compile(rf"\b({_FDI})\b(?:{_FDI_TO}\b({_FDI})\b)?")
_FDI_TEETH = re.compile(
    r"(?:\b(?:upper|lower|maxillary|mandibular|left|right|central|lateral|first|second|third)\s+)*"
    r"(?:\b(?:teeth|tooth|incisors?|canines?|premolars?|molars?)\s+)?(?:\bfdi\s*)?"
    rf"(?P<numbers>{_FDI_ITEM}(?:\s*(?:,|and|&|/)?\s*{_FDI_ITEM})*)"
)


def _adjectives(vocab: Vocabulary) -> frozenset[str]:
    """The lexicon's one-word adjectives of structures ("femoral", "renal"), once per vocabulary."""
    key = ("adjectives", "")
    if key not in vocab._memo:
        concepts = vocab.lexicon.concepts.values()
        vocab._memo[key] = frozenset(a for c in concepts for a in c.terms.get("adjectives", ()) if " " not in a)
    return vocab._memo[key]


def _clause_goes_on(sep: str, piece: str, before: list[tuple[str, bool]]) -> bool:
    """Whether a list word continues the relative clause of the item before it."""
    if not before or not piece.strip() or not _RELATIVE.search(before[-1][0]):
        return False
    said = [w for w in _WORD.findall(piece) if w not in STOPWORDS]
    return sep == "with" or (sep == "and" and bool(said) and all(w in REGION_WORDS for w in said))


def _split_segments(low: str, vocab: Vocabulary) -> list[tuple[str, bool]]:
    """List items in order, each with whether it lies in an exclusion."""
    # \x00 marks where an exclusion starts ("right kidney; not the left kidney, not the liver").
    low = _NEGATION.sub(" \x00 ", low)
    # Segments with the separator before each; an exclusion lasts until a comma, semicolon, colon or dash.
    raw_segments: list[tuple[str, bool]] = []
    negated = False
    pieces = _SPLIT_KEEP.split(low)
    carried = False  # an exclusion word with nothing after it goes on: "excluding: spleen", "skip - GB"
    for k in range(0, len(pieces), 2):
        piece, sep = pieces[k], (pieces[k - 1] if k else "")
        if sep.strip() in (",", ";", ":", "-") and "\x00" not in piece and not carried:  # ("-" only as " - ")
            negated = False
        carried = False
        if "\x00" in piece:
            before, _, piece = piece.partition("\x00")
            if before.strip():
                raw_segments.append((before.strip(), negated))
            negated = True
            carried = all(w in STOPWORDS for w in _WORD.findall(piece))
        if _clause_goes_on(sep.strip(), piece, raw_segments):
            # a relative clause goes on past "with" ("the glands that swell up with mumps") and past
            # "and" before a body region ("the vein that carries blood up from my legs and belly")
            raw_segments[-1] = (f"{raw_segments[-1][0]} {sep.strip()} {piece.strip()}", raw_segments[-1][1])
            continue
        if piece.strip():
            raw_segments.append((piece.strip(), negated))
    # "head and neck" is a region, not two targets: rejoin before interpreting.
    return _share_head_noun(_rejoin_regions(raw_segments), vocab)


# Adjectives that tell one structure of a series from another: an item of a list made of them
# alone takes the head noun of the item after it.
_SERIES_ADJECTIVES = WORDS.series_adjectives


def _share_head_noun(segments: list[tuple[str, bool]], vocab: Vocabulary) -> list[tuple[str, bool]]:
    """ "medial and lateral menisci", "frontal, parietal and occipital lobes": each item is a meniscus, a lobe.

    An organ's adjective alone before a class noun's item takes that noun too: "femoral and popliteal
    arteries" are two arteries, not the femur and an artery. So does a word that names a structure
    only with the next item's noun ("middle and inner ear", "thyroid and cricoid cartilages").
    """
    adjectives = _adjectives(vocab)
    out = list(segments)
    for i in range(len(out) - 2, -1, -1):  # from the end, so that "upper, middle and lower lobes" chains
        (seg, neg), (nxt, nxt_neg) = out[i], out[i + 1]
        words = [w for w in _WORD.findall(seg) if w not in STOPWORDS]
        nxt_words = _WORD.findall(nxt)
        if not words or neg != nxt_neg:
            continue
        if len(words) == 1 and words[0] in adjectives and len(nxt_words) > 1 and singular(nxt_words[-1]) in CLASS_NOUNS:
            out[i] = (f"{seg} {nxt_words[-1]}", neg)
            continue
        k = 0
        while k < len(nxt_words) and (nxt_words[k] in _SERIES_ADJECTIVES or nxt_words[k] in _LATERAL):
            k += 1
        series = set(words) - _LATERAL.keys()  # "right upper, middle and lower lobes": a side goes along
        if series and series <= _SERIES_ADJECTIVES and 0 < k < len(nxt_words):
            out[i] = (f"{seg} {' '.join(nxt_words[k:])}", neg)
        elif len(words) == 1 and _takes_head_noun(words[0], [w for w in nxt_words if w not in STOPWORDS], vocab):
            out[i] = (f"{seg} {nxt_words[-1]}", neg)
    return _head_noun_before(out)


def _head_noun_before(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Series adjectives left without a noun take the one before them ("right lung lobes - upper, middle, lower")."""
    out = list(segments)
    for i in range(1, len(out)):
        (prev, prev_neg), (seg, neg) = out[i - 1], out[i]
        words = [w for w in _WORD.findall(seg) if w not in STOPWORDS]
        before = [w for w in _WORD.findall(prev) if w not in STOPWORDS]
        k = 0
        while k < len(before) and (before[k] in _SERIES_ADJECTIVES or before[k] in _LATERAL):
            k += 1
        if words and set(words) <= _SERIES_ADJECTIVES and neg == prev_neg and 0 < k < len(before):
            out[i] = (f"{seg} {' '.join(before[k:])}", neg)
    return out


def _takes_head_noun(word: str, nxt: list[str], vocab: Vocabulary) -> bool:
    """Whether ``word``, a list item of its own, means ``word`` + the next item's last noun.

    It does when only that phrase names a structure ("middle" + "ear"); a word that names one
    by itself only before a plural noun whose item is one modifier and the noun, and never when
    both items then name the same structure ("kidney and renal cysts" is the kidney and its cysts).
    """
    if len(nxt) < 2 or word in _LATERAL:
        return False
    joined, alone = vocab.core(f"{word} {nxt[-1]}"), vocab.core(word)
    if not alone or joined == alone or joined not in vocab.names or set(alone) & LESION_TOKENS:
        # (a lesion takes no head noun: "tumour and peritumoral oedema"; nor does a word that
        # reads as nothing: "laryngectomy: thyroid cartilage")
        return False
    if alone not in vocab.names and word not in vocab.anatomy:
        return True
    plural = singular(nxt[-1]) != nxt[-1]
    return plural and len(nxt) == 2 and singular(word) == word and joined != vocab.core(" ".join(nxt))


def _pronoun_exclusions(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """An exclusion of a pronoun excludes what the item before it names ("the cyst ..., leave it out")."""
    out: list[tuple[str, bool]] = []
    for seg, negated in segments:
        words = _WORD.findall(seg)
        pronoun = any(w in _PRONOUNS for w in words) and all(w in _PRONOUNS or w in STOPWORDS for w in words)
        # (the item before: past items of stop words only, "don't bother with it")
        named = [i for i, (s, _) in enumerate(out) if any(w not in STOPWORDS for w in _WORD.findall(s))]
        if negated and pronoun and named and not out[named[-1]][1]:
            out[named[-1]] = (out[named[-1]][0], True)
            continue
        out.append((seg, negated))
    return out


_PRONOUNS = WORDS.pronouns


def _segment_targets(
    raw_segments: list[tuple[str, bool]], vocab: Vocabulary, regions: list[str], notes: list[str]
) -> list[ParsedTarget]:
    """One target per segment; modifier-only segments take the head noun of a neighbour."""
    targets: list[ParsedTarget] = []
    pending: list[ParsedTarget] = []  # modifier-only segments waiting for a head noun
    for seg_text, neg_flag in raw_segments:
        target, seg_regions = _parse_segment(seg_text, neg_flag, vocab)
        regions.extend(seg_regions)
        if target is None:
            continue
        if not target.concept.core and not target.unknown and target.group is None:
            if target.concept.laterality or target.concept.index:
                pending.append(target)  # "left and right kidney", "3rd, 4th and 5th ribs"
            continue
        if pending and targets and targets[-1].concept.index and not target.concept.index:
            # Numbers that go on a numbered series end it ("ribs 9, 10 and the liver"): they are
            # the series', not the unnumbered structure's after them.
            targets.extend(_borrow_head(p, targets[-1]) for p in pending if p.concept.index)
            pending = [p for p in pending if not p.concept.index]
        if pending:
            # Modifiers take the next head noun ("left and right kidney") unless that one is on
            # the other side of an exclusion ("ribs except the 12th, left kidney").
            same = [p for p in pending if p.negated == target.negated]
            other = [p for p in pending if p.negated != target.negated]
            sides = {p.concept.laterality for p in same} - {None}
            numbered = target.concept.index and not target.concept.laterality
            if len(sides) == 1 and same[0].concept.laterality and numbered:
                # "L 4th/5th ribs", "left 9th, 10th and 11th ribs": a side written before the first
                # numbered item holds for the whole series
                side = sides.pop()
                target = _with_side(target, side)
                same = [p if p.concept.laterality else _with_side(p, side) for p in same]
            targets.extend(_borrow_head(p, target) for p in same)
            for p in other:
                head = next((t for t in reversed(targets) if t.concept.core), None)
                if head is not None:
                    targets.append(_borrow_head(p, head))
            pending = []
        targets.append(target)
    return _trailing_modifiers(targets, pending, notes)


def _trailing_modifiers(
    targets: list[ParsedTarget], pending: list[ParsedTarget], notes: list[str]
) -> list[ParsedTarget]:
    """Modifiers left at the end of the list qualify the head before them."""
    if pending and targets:
        # Trailing modifiers qualify the previous head: "ribs, left side" is the left ribs,
        # "kidney, left and right" both kidneys; an exclusion ("ribs except the 12th") adds.
        head = next((t for t in reversed(targets) if t.concept.core), targets[-1])
        same = [p for p in pending if p.negated == head.negated]
        # ... but an indexed head keeps its own indices: "ribs 11 and 12" is both ribs.
        adds_index = head.concept.index and any(p.concept.index for p in same)
        if same and not head.concept.laterality and not adds_index:
            targets.remove(head)
        targets.extend(_borrow_head(p, head) for p in pending)
    elif pending:
        for p in pending:
            if p.concept.index and all(i in SPINE_LEVELS for i in p.concept.index):
                targets.append(_borrow_head(p, ParsedTarget("vertebra", Concept(("vertebra",)))))
            else:
                notes.append(f"'{p.text}' names no structure")
    return targets


def _apply_list_rules(
    targets: list[ParsedTarget],
    low: str,
    text: str,
    header_targets: list[ParsedTarget] | None,
    vocab: Vocabulary,
) -> list[ParsedTarget]:
    """Rules over the whole list: headers, sides that close or open a list, lesion heads.

    ``header_targets`` are the targets a worklist header names (None without a header).
    """
    targets = _whole_heading_its_parts(targets, low, vocab)
    if any(t.group is None and not t.negated for t in targets):
        # "OARs: parotids, brainstem ..." - a vague group word heading a list is a header (one
        # followed by an exclusion only is the request: "all abdominal organs except the spleen").
        targets = [t for t in targets if t.group not in ("organs", "oars")]
    side = _TRAILING_SIDE.search(low.rstrip(" ;,."))
    if side and len(targets) > 1:
        # "gluteus maximus, medius and minimus on the left": the side closes the whole list.
        lat = _LATERAL[side.group(1) or side.group(2)]
        targets = [
            t if t.concept.laterality or t.negated else _borrow_head(ParsedTarget("", Concept((), lat), (lat,)), t)
            for t in targets
        ]
    targets = _both_sides_named(_spread_leading_side(_other_side_remains(_share_qualifiers(targets))))
    organs = [t for t in header_targets or () if not set(t.concept.core) & LESION_TOKENS]
    lesions = [t for t in header_targets or () if set(t.concept.core) & LESION_TOKENS]
    if header_targets is not None and len(organs) == 1:
        # "MR LIVER - SEGMENT LESIONS": bare lesions under a one-organ header are of that organ,
        # and so are bare vessels, joints or muscles ("CT TMJ BILAT - JOINTS").
        targets = [_of_header_structure(organs[0], t) for t in _inherit_lesion_organ(organs + targets)[1:]]
    elif not organs and lesions:
        # "CT RENAL MASS PROTOCOL - MASS VOLUME": a bare lesion refers back to the header's.
        targets = _inherit_lesion_organ(lesions + targets)[len(lesions) :]
    targets = _lesion_before_organ(_inherit_lesion_organ(_distribute_lesion_head(targets, text)), vocab)
    if header_targets and not any(t.concept.core and not t.negated for t in targets):
        # "MR PROSTATE - WHOLE GLAND": the rest only qualifies the exam's organ, or excludes
        # something from it ("MR LIVER - LESIONS NOT WANTED").
        targets = header_targets + [t for t in targets if t.negated and t.concept.core]
    scale = next((organ for word, organ in WORDS.scale_organs.items() if re.search(rf"\b{word}\b", low)), None)
    return [_in_default_organ(t, scale) for t in _vertebrae_at_levels(targets)]


_VERTEBRA = ("vertebra",)


def _vertebrae_at_levels(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    """A bare "the vertebrae" in a request that names spine levels is the vertebrae at those levels.

    The levels may come with a finding ("Chance fracture at L1 - vertebra segmentation", "Pott's
    disease T11-T12, segment both vertebrae") or alone ("L4-S1 levels, segment the vertebrae").
    "All" or "every" vertebra still asks for the whole spine.
    """
    levels = {
        i
        for t in targets
        if t.concept.index and not t.negated and all(i in SPINE_LEVELS for i in t.concept.index)
        for i in t.concept.index
    }
    if not levels:
        return targets
    return [
        replace(t, concept=replace(t.concept, index=frozenset(levels)))
        if t.concept.core == _VERTEBRA
        and not t.concept.index
        and not t.negated
        and not set(_WORD.findall(t.text)) & WORDS.totality
        else t
        for t in targets
    ]


def _whole_heading_its_parts(targets: list[ParsedTarget], low: str, vocab: Vocabulary) -> list[ParsedTarget]:
    """A whole written before " - " and then only its parts heads them ("Spine - L1 to L5").

    Free text with a dash is no worklist header without a modality, so the whole stays a target
    of its own, unless everything after the dash is a part of it: vertebrae of the spine, lobes of
    the lung, Couinaud segments of the liver (:attr:`Vocabulary.groups`).
    """
    head = re.match(r"\s*([^-\u2013\u2014:;,]+?)\s[-\u2013\u2014]\s", low)
    if head is None or len(targets) < 2 or targets[0].negated or targets[0].concept.index:
        return targets
    first, rest = targets[0], [t for t in targets[1:] if not t.negated]
    if first.text.strip() != head.group(1).strip() or not rest:
        return targets
    parts = set(vocab.groups.get(first.concept.core, ())) | (
        {("couinaud",)} if first.concept.core == ("liver",) else set()
    )
    # (a part indexed, or other than the whole: a group may count itself among its members)
    if all(t.concept.core in parts and (t.concept.index or t.concept.core != first.concept.core) for t in rest):
        return targets[1:]
    return targets


def _of_header_structure(structure: ParsedTarget, t: ParsedTarget) -> ParsedTarget:
    """A class noun under a one-structure worklist header is that structure's ("CT LIVER - VESSELS"),
    and the structure's own kind is the structure ("CT R FEMUR - BONE MODEL")."""
    core = set(t.concept.core)
    if not t.negated and core and core <= WORDS.kind_nouns:
        laterality = t.concept.laterality or structure.concept.laterality
        return replace(t, concept=replace(structure.concept, laterality=laterality))
    if t.negated or not core or not core <= CLASS_NOUNS:
        return t
    concept = replace(t.concept, core=_finish_core([*structure.concept.core, *core]))
    return replace(t, concept=replace(concept, laterality=t.concept.laterality or structure.concept.laterality))


def _in_default_organ(t: ParsedTarget, scale_organ: str | None = None) -> ParsedTarget:
    """A bare lesion still without an organ after the list rules (header included): "nodules" are the lung's.

    A request that grades its lesion on one organ's reporting scale places it in that organ
    (``scale_organ``: "PI-RADS 4 lesion" is the prostate's).
    """
    if len(t.concept.core) != 1 or t.group is not None:
        return t
    c = t.concept
    if scale_organ and c.core[0] in LESION_TOKENS:
        # (its words too: the encoder reads "lesion" alone as any lesion)
        concept = Concept(tuple(sorted((*c.core, scale_organ))), c.laterality, c.index)
        return replace(t, concept=concept, words=(*t.words, scale_organ))
    organ = WORDS.default_organ.get(c.core[0])
    if organ is None:
        return t
    return replace(t, concept=Concept(tuple(sorted((*c.core, organ))), c.laterality, c.index))


def _expand_level_range(m: re.Match[str]) -> str:
    # (German-style "Th10" is T10)
    a = f"{m.group(1)[0].upper()}{int(m.group(2))}"
    b = f"{(m.group(3) or m.group(1))[0].upper()}{int(m.group(4))}"
    if a not in SPINE_LEVELS or b not in SPINE_LEVELS:
        return m.group(0)
    i, j = sorted((SPINE_LEVELS.index(a), SPINE_LEVELS.index(b)))
    # Joined with spaces (not separators) so that they stay one target.
    return " " + " ".join(SPINE_LEVELS[i : j + 1]).lower() + " vertebra "


def _expand_first_n(m: re.Match[str]) -> str:
    n = int(m.group(2)) if m.group(2).isdigit() else _CARDINALS[m.group(2)]
    total = _COUNTS[m.group(3)]
    if not 1 <= n <= total:
        return m.group(0)
    from_top = m.group(1) in ("first", "upper", "uppermost", "top")
    return _expand_numbers(1, n) if from_top else _expand_numbers(total - n + 1, total)


def _expand_numbers(a: int, b: int) -> str:
    lo, hi = sorted((a, b))
    if hi - lo > 30:
        return f" {a} {b} "
    return " " + " ".join(f"n{n}" for n in range(lo, hi + 1)) + " "


_REGION_PHRASES = sorted(REGION_WORDS, key=lambda k: -len(k.split()))


_SIDES_OF = re.compile(r"(?:on\s+)?(?:both|either|each)\s+sides?\s+of\b")


def _rejoin_regions(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Items split where no list is: "head" and "neck", and a course after a description.

    An item that opens with "from" and no number goes on describing the one before it ("the
    biggest artery in my body, from the heart down to the belly"); "from T4 to T8" is levels. So
    does one that places it on both sides ("the glands that swell with mumps, on both sides of my face").
    """
    out: list[tuple[str, bool]] = []
    for seg, neg in segments:
        first = seg.split()[:1]
        if out and first == ["neck"] and out[-1][0].split()[-1:] == ["head"]:
            out[-1] = (out[-1][0] + " and " + seg, neg)
        elif out and neg == out[-1][1] and (_SIDES_OF.match(seg) or (first == ["from"] and not re.search(r"\d", seg))):
            out[-1] = (out[-1][0] + " " + seg, neg)
        else:
            out.append((seg, neg))
    return out


def _parse_segment(
    seg: str, negated: bool, vocab: Vocabulary, label_form: bool = False
) -> tuple[ParsedTarget | None, list[str]]:
    words = _WORD.findall(seg)
    if not words or _names_requester(words):
        return None, []
    regions: list[str] = []
    if not label_form:
        words = _after_command(words)
    cut = _purpose_start(words, vocab)
    if not label_form and cut and any(w not in STOPWORDS for w in words[:cut]):
        # "OARs for prostate RT", "kidneys for ADPKD follow-up": what follows "for" is the
        # purpose; its organs are region context, not targets ("asks for the liver" names none before).
        purpose, words = words[cut + 1 :], words[:cut]
        regions.extend(_context_regions(purpose, vocab))
    placed = False  # whether a phrase placing the structure was left out
    if not label_form:
        kept = _without_course(_without_relative_clause(words, vocab, regions), vocab)
        words = _drop_location(kept, vocab, regions)
        placed = words != kept
        words = _without_reason(words, vocab)
    read = _read_words(words, regions)
    composite = any(w in _COMPOSITE_WORDS for w in read.rest)
    tokens, unknown = vocab.canonical_tokens(read.rest, fix_spelling=not label_form, keep_unknown=label_form)
    if not tokens and not unknown and placed:
        # "the gland beside my windpipe": a class noun alone, which names by what is said of it
        tokens = [singular(w) for w in read.rest if singular(w) in CLASS_NOUNS][:1]
    if composite and tokens:
        tokens.append(COMPOSITE)
    laterality = read.laterality
    # A lateral lung-lobe abbreviation ("RML") carries its own side.
    for side in ("left", "right", "bilateral"):  # (or a side word the spelling check mended: "bilaterall")
        if side in tokens:
            tokens = [t for t in tokens if t != side]
            laterality = side if laterality in (None, side) else "bilateral"
    index = read.index()
    if index and all(i in SPINE_LEVELS for i in index) and not tokens:
        if words[0] == "at":
            return None, regions  # "at the level of L3, segment ...": where the slice is, for the items after
        tokens = ["vertebra"]
    if tokens and tokens[0] == "spine" and index:
        tokens = ["vertebra"]
    core = _finish_core(tokens)
    said = {w for w in words if w not in STOPWORDS and w not in _LATERAL and w not in _PLACE_ONLY}
    if not negated and set(core) <= WORDS.positions and said <= WORDS.positions:
        # A position alone names nothing ("central line planning"); an excluded one is of the
        # series before it ("the right lung lobes, not the middle one").
        core = ()
    if core not in vocab.names and core in vocab.unordered:
        core = vocab.unordered[core]  # a term's words in another order ("the sac around my heart")
    group: str | None = None
    described = any(w in RELATIVE_WORDS for w in words)  # "the organ that makes insulin": no group
    if ("oar" in core or "organ" in core) and not described:
        core, group = _organ_group(core, words, vocab, regions)
    if laterality == "bilateral":
        laterality = None  # both sides = the structure without a side restriction
    concept = Concept(core, laterality, frozenset(index) or None)
    context = tuple(sorted(set(regions)))
    return ParsedTarget(seg, concept, tuple(words), tuple(unknown), negated, group, context), regions


def _purpose_start(words: list[str], vocab: Vocabulary) -> int:
    """Where a list item's purpose begins: at "for", or at an infinitive of purpose after a structure.

    "heart outline to check myocardial uptake" is the heart, as "for" would say; "the doctor
    wants to see my liver" names its structure after the verb. 0 when the item has no purpose.
    """
    cut = words.index("for", 1) if "for" in words[1:] else 0
    why = next((k for k in range(1, len(words) - 1) if words[k] == "to" and words[k + 1] in WORDS.purpose_verbs), 0)
    why = why if why and vocab.canonical_tokens(words[:why])[0] else 0
    return min((c for c in (cut, why) if c), default=0)


def _organ_group(
    core: tuple[str, ...], words: list[str], vocab: Vocabulary, regions: list[str]
) -> tuple[tuple[str, ...], str | None]:
    """The core and group of an item naming organs or organs at risk; their regions go to ``regions``.

    Organs at risk (radiotherapy) include bones and muscles (mandible, constrictors). A region's
    words and positions are the group's place ("upper abdominal organs" are no upper teeth); an
    organ left over is the item itself ("liver organ"), except beside the plural organs at risk,
    where it is the treated site they lie around ("prostate RT OARs", as "OARs for prostate RT"
    say; "the cord as an OAR" and "RT parotid OAR" are the organ).
    """
    group = "oars" if "oar" in core else "organs"
    regions.extend(r for t in core if t in REGION_WORDS for r in REGION_WORDS[t])
    core = tuple(t for t in core if t not in ("oar", "organ") and t not in REGION_WORDS and t not in WORDS.positions)
    if core and group == "oars" and "as" not in words and {"oars", "organs"} & set(words):
        regions.extend(r for t in core for r in vocab.organ_regions.get(t, ()))
        core = ()
    return core, (None if core else group)


def _after_command(words: list[str]) -> list[str]:
    """A list item from the verb that hands its structures over ("the central reader will segment [the liver]").

    What comes before a command verb followed by an article is who asks or why ("dose calculation
    needs the liver volume", "LUQ trauma still needs the spleen"); only an item that says
    something before the verb is cut, so "segment the liver" and "liver segment 4" stay whole.
    """
    k = next(
        (
            i
            for i in range(len(words) - 2, 0, -1)
            if words[i] in WORDS.command_verbs and words[i + 1] in WORDS.determiners
        ),
        0,
    )
    if not k or all(w in STOPWORDS for w in words[:k]):
        return words
    return words[k + 1 :]


def _names_requester(words: list[str]) -> bool:
    """Whether a list item is who asks ("Spinal surgeons:", "the liver team"): a specialty and a requester.

    Not an item that names a structure for or to someone ("liver for the surgeon", "the liver
    which the surgeons asked for").
    """
    if any(w in _FOR_SOMEONE for w in words):
        return False
    content = [w for w in words if w not in STOPWORDS or singular(w) in _REQUESTERS]
    last = singular(content[-1]) if content else ""
    return len(content) <= 3 and (last in _REQUESTERS or last.endswith("ologist"))


_REQUESTERS = WORDS.requesters
RELATIVE_WORDS = frozenset({"that", "which", "where", "whose"})
_FOR_SOMEONE = RELATIVE_WORDS | {"for", "to", "by", "who"}  # "liver for the surgeon"


def _context_regions(words: list[str], vocab: Vocabulary) -> list[str]:
    """The body regions the structures and region words of a clause place a request in (context, no target)."""
    return [
        r
        for w in words
        for tok in vocab.canonical_tokens([w])[0]
        for r in vocab.organ_regions.get(tok, REGION_WORDS.get(tok, ()))
    ]


def _without_relative_clause(words: list[str], vocab: Vocabulary, regions: list[str]) -> list[str]:
    """A name without the relative clause that follows it ("the nerve cable [that runs down my spine]").

    Only after words that name a structure as they stand, none unknown: the clause then says
    something about it, and its organs are region context. A description keeps its clause ("the
    bag under the liver that stores bile" names no structure before "that").
    """
    k = next((i for i, w in enumerate(words) if i and w in RELATIVE_WORDS), 0)
    if not k:
        return words
    tokens, unknown = vocab.canonical_tokens(words[:k])
    core = vocab.core(" ".join(words[:k]))
    if unknown or not tokens or core not in vocab.names or set(core) <= CLASS_NOUNS | {"organ", "oar"}:
        return words
    clause = vocab.canonical_tokens(words[k + 1 :])[0]
    if set(clause) & LESION_TOKENS:
        return words  # a lesion in the clause is the structure's ("the kidney that has the cyst")
    organs = [t for t in clause if t in WORDS.lesion_organs]
    if set(core) <= LESION_TOKENS and len(set(organs)) == 1:
        # the clause says whose lesion ("the cancer that has spread to his liver", "... in her left kidney")
        return [*words[:k], *[w for w in words[k + 1 :] if _LATERAL.get(w) in ("left", "right")][:1], organs[0]]
    regions.extend(_context_regions(words[k + 1 :], vocab))
    return words[:k]


def _without_reason(words: list[str], vocab: Vocabulary) -> list[str]:
    """An order line without the reason written after its command ("cord seg ms pt", "kidneys vol ckd").

    Order entry writes the structure, then the command or quantity, then why; after a command that
    follows a known structure, words the vocabulary does not know are the why. Words before the
    command stay: "uterine fibroids seg" is still not the uterus.
    """
    for k, w in enumerate(words):
        if w not in _ORDER_WORDS:
            continue
        if k == 0 or not vocab.canonical_tokens(words[:k])[0]:
            return words
        tail = [t for t in words[k + 1 :] if _KEPT_INDEX.match(t) or not vocab.canonical_tokens([t])[1]]
        return words[: k + 1] + tail
    return words


_KEPT_INDEX = re.compile(r"^(?:[ctls]|th|n)?\d{1,2}(?:st|nd|rd|th)?$")  # levels, numbers, rib indices
# Commands and quantities of an order line ("liver seg", "spleen vol pls").
_ORDER_WORDS = WORDS.order_words


# Prepositions that place a structure ("glands on top of the kidneys", "T6-T8 on the spine MR").
_LOCATIVES = tuple(tuple(phrase.split()) for phrase in WORDS.locatives)  # longest first


def _locative_at(words: list[str], i: int) -> tuple[str, ...] | None:
    """The locative phrase that starts at ``words[i]``, if one does (the longest)."""
    return next((p for p in _LOCATIVES if tuple(words[i : i + len(p)]) == p), None)


def places(text: str, vocab: Vocabulary) -> bool:
    """Whether a phrase places its structure by another ("the spit glands in front of my ears")."""
    words = _WORD.findall(text.lower())
    return any(
        (prep := _locative_at(words, i)) is not None and vocab.canonical_tokens(words[i + len(prep) :])[0]
        for i in range(1, len(words))
    )


def _drop_location(words: list[str], vocab: Vocabulary, regions: list[str]) -> list[str]:
    """A structure's words without the phrase that places it; that phrase's organs become regions.

    The place's side stays with a class noun: the nerve behind the left eye is on the left.

    A lesion keeps its place, which names its organ ("cysts on the kidneys"); so does a lexicon
    term that holds one ("water on the lungs" is a pleural effusion).
    """
    if _is_term(words, vocab):
        return words  # (a term with its place in it: "the fat just under my skin")
    term = _placed_term(words, vocab)
    if term:
        regions.extend(_context_regions(words[len(term) :], vocab))
        return term
    for i in range(1, len(words)):
        prep = _locative_at(words, i)
        if prep is None:
            continue
        head = [t for t in vocab.canonical_tokens(words[:i])[0] if t not in REGION_WORDS]
        # (a class noun the vocabulary reads as no word of its own is a head too: "the gland at
        # the front of my throat")
        head = head or [singular(w) for w in words[:i] if singular(w) in CLASS_NOUNS][:1]
        place = [w for w in words[i + len(prep) :] if w not in STOPWORDS and w != "side"]
        if not head or set(head) & LESION_TOKENS or all(w in _LATERAL for w in place):
            return words  # "ribs 1-3 on the right": a side, not a place
        regions.extend(_context_regions(words[i + len(prep) :], vocab))
        # the side of the place is a class noun's ("the gland on top of the left kidney"; "the
        # organ under my left ribs" may be the spleen, which has none)
        side = [w for w in place if _LATERAL.get(w) in ("left", "right")][:1] if set(head) <= CLASS_NOUNS else []
        return words[:i] + side
    return words


def _placed_term(words: list[str], vocab: Vocabulary) -> list[str]:
    """The longest start of ``words`` that is a term with its place in it, placed further itself.

    "the fat just under the skin [of my tummy]": the lexicon's "fat under the skin" is the
    subcutaneous fat; what follows places it, as any place does.  Empty when there is none.
    """
    for j in range(len(words) - 1, 1, -1):
        if words[j] != "of" and _locative_at(words, j) is None:
            continue
        start = words[:j]
        if _is_term(start, vocab) and any(_locative_at(start, i) is not None for i in range(1, j)):
            return start
    return []


def _is_term(words: list[str], vocab: Vocabulary) -> bool:
    """Whether the words are one lexicon term, in its order or another ("fat under the skin")."""
    core = vocab.core(" ".join(words))
    return core in vocab.names or core in vocab.unordered


def _without_course(words: list[str], vocab: Vocabulary) -> list[str]:
    """A structure's name without the course a verb of motion or an extent gives it.

    "the spinal cord [running through my back]", "the aorta [from the root down to the bifurcation]".
    """
    for k, w in enumerate(words):
        if k and (w in WORDS.motion_verbs or w == "from") and _names_structure(words[:k], vocab):
            return words[:k]
    return words


def _names_structure(words: list[str], vocab: Vocabulary) -> bool:
    """Whether the words name one structure of the vocabulary, a generic noun aside ("the tracheal lumen")."""
    core = vocab.core(" ".join(words))
    return core in vocab.names or tuple(t for t in core if t not in WORDS.generic_nouns) in vocab.names


#: Region words that only place ("CT EXTREMITY LOWER RIGHT"); a spine segment places a range of levels.
_PLACE_ONLY = frozenset(REGION_WORDS) - frozenset(_SEGMENT_LEVELS)


@dataclass
class _SegmentWords:
    """What one segment's words say besides its structure words (``rest``)."""

    rest: list[str] = field(default_factory=list)
    laterality: str | None = None
    levels: set[str] = field(default_factory=set)
    numbers: set[int] = field(default_factory=set)
    segments: list[str] = field(default_factory=list)

    def index(self) -> set[str]:
        """Indices of the segment: explicit levels beat "lumbar" etc., which beat bare numbers."""
        if self.levels:
            return set(self.levels)
        if self.segments and self.numbers:
            out: set[str] = set()
            for seg_word in self.segments:
                letter = _SEGMENT_LEVELS[seg_word][0][0]
                out.update(f"{letter}{n}" for n in self.numbers if f"{letter}{n}" in SPINE_LEVELS)
            return out
        if self.segments:
            return {level for seg_word in self.segments for level in _SEGMENT_LEVELS[seg_word]}
        return {str(n) for n in self.numbers}


def _read_words(words: list[str], regions: list[str]) -> _SegmentWords:
    """Sort a segment's words into sides, levels, numbers, region hints and the rest."""
    out = _SegmentWords()
    level_context = any(w in _LEVEL_CONTEXT or _LEVEL.match(w) for w in words)  # "cervicothoracic C7"
    rib_context = any(w in ("rib", "ribs") for w in words)
    eye_context = any(w in WORDS.eye_words for w in words)  # "lens OS": the left one
    i = 0
    while i < len(words):
        w = words[i]
        if w in _SEGMENT_LEVELS and level_context:
            out.segments.append(w)  # "lumbar vertebrae", "fifth lumbar vertebra"
            i += 1
            continue
        if rib_context and w in _RIB_CLASSES:
            out.numbers.update(_RIB_CLASSES[w])  # "false ribs" = 8-12
            i += 1
            continue
        consumed = _region_phrase(words, i, out.rest, regions)
        if consumed:
            i += consumed
            continue
        m = _LEVEL.match(w)
        nm = re.match(r"^n(\d{1,2})$", w)
        if m and (m.group(1).upper() + str(int(m.group(2)))) in SPINE_LEVELS:
            out.levels.add(m.group(1).upper() + str(int(m.group(2))))
        elif re.match(r"^th(\d{1,2})$", w) and 1 <= int(w[2:]) <= 12:
            out.levels.add(f"T{int(w[2:])}")  # German-style "Th12"
        elif m:
            out.rest.append(w)
        elif nm:
            out.numbers.add(int(nm.group(1)))
        elif w in _ORDINALS:
            out.numbers.add(_ORDINALS[w])
        elif _NUMBER.match(w) and (w.isdigit() or w[-2:] in ("st", "nd", "rd", "th")):
            n = int(_NUMBER.match(w).group(1))
            if 1 <= n <= 30:
                out.numbers.add(n)
        elif w == "b" and i + 1 < len(words) and words[i + 1] == "l":
            out.laterality = "bilateral"
            i += 1
        elif w in _LATERAL or (w in WORDS.eye_sides and eye_context):
            lat = _LATERAL.get(w) or WORDS.eye_sides[w]
            out.laterality = lat if out.laterality in (None, lat) else "bilateral"
        elif w not in ("all", "every", "entire", "whole"):
            out.rest.append(w)
        i += 1
    return out


def _region_phrase(words: list[str], i: int, rest: list[str], regions: list[str]) -> int:
    """Words consumed by a region phrase at ``words[i]`` ("head and neck", "whole body"), else 0.

    The phrase's regions go to ``regions``; "head and neck cancer" also adds the primary
    tumour ("hnc") to ``rest``.
    """
    for phrase in _REGION_PHRASES:
        n = len(phrase.split())
        if words[i : i + n] != phrase.split():
            continue
        # "pelvic bones", "cranial nerve II": the region's adjective is part of a structure's name.
        structure_follows = i + n < len(words) and words[i + n] in WORDS.structure_after_region
        # "femoral head", "head of pancreas": a part of a structure, not the body region.
        part_of = phrase == "head" and bool(rest) and rest[-1] not in STOPWORDS
        if phrase in ("spine", "breast", "mediastinum") or structure_follows or part_of:
            return 0  # a structure itself ("the spine", "pelvic bones")
        regions.extend(REGION_WORDS[phrase])
        if phrase in ("head and neck", "hn", "h n") and i + n < len(words) and words[i + n] in _HNC_WORDS:
            rest.append("hnc")  # "head and neck cancer" is a disease, the primary tumour
            return n + 1
        return n
    return 0


def phrase_target(phrase: str, vocab: Vocabulary | None = None) -> ParsedTarget | None:
    """Parse one registry phrase (a label synonym) without splitting it into a list.

    Unlike requests, no spelling correction is applied and unknown words stay
    in the concept (a curated synonym means every word it has).

    Parameters
    ----------
    phrase
        E.g. ``"left upper lobe"`` or ``"thoracic aorta"``.
    vocab
        Vocabulary (default: :func:`default_vocabulary`).

    Returns
    -------
    ParsedTarget or None
        None when the phrase holds no word.
    """
    low = _ascii(phrase).lower().replace("-", " ")
    low = _LEVEL_RANGE.sub(_expand_level_range, low)
    target, _ = _parse_segment(low, False, vocab or default_vocabulary(), label_form=True)
    return target


def _borrow_head(modifier: ParsedTarget, head: ParsedTarget) -> ParsedTarget:
    c = head.concept
    index = modifier.concept.index
    letters = {i[0] for i in c.index or () if i in SPINE_LEVELS}
    if index and len(letters) == 1 and all(i.isdigit() for i in index):
        # "second and third lumbar vertebrae": the bare ordinal is a level of the head's segment.
        letter = letters.pop()
        index = frozenset(f"{letter}{i}" for i in index if f"{letter}{i}" in SPINE_LEVELS) or index
    concept = Concept(c.core, modifier.concept.laterality or c.laterality, index or c.index)
    text = f"{modifier.text} {head.text}".strip()
    return ParsedTarget(
        text, concept, modifier.words + head.words, head.unknown, modifier.negated, head.group, head.context
    )


_LIST_INTRO = re.compile(r"^[^:;\n]{2,80}?(?:\s[-\u2013\u2014]\s|\s*:\s)")


def _distribute_lesion_head(targets: list[ParsedTarget], text: str) -> list[ParsedTarget]:
    """A lesion heading a list of organs is the lesion of each ("abdominal tumours - liver, kidney")."""
    intro = _LIST_INTRO.match(text)
    if len(targets) < 2 or not intro:
        return targets
    # "Staging for a neuroendocrine tumour - please segment the pancreas, the liver": a heading
    # that says what the study is for names the reason, not the head of the list
    # ("Metastases: please segment liver and adrenals" is still the lesions of each).
    if re.search(r"\bfor\b", text[: intro.end()].lower()):
        return targets
    head, organs = targets[0], targets[1:]
    if not head.concept.core or set(head.concept.core) - LESION_TOKENS or head.negated:
        return targets
    if not all(t.concept.core and not (set(t.concept.core) & LESION_TOKENS) and t.group is None for t in organs):
        return targets
    return [
        ParsedTarget(
            f"{t.text} {head.text}",
            Concept(tuple(sorted(set(t.concept.core) | set(head.concept.core))), t.concept.laterality, t.concept.index),
            t.words + head.words,
            t.unknown,
            t.negated,
            None,
            tuple(sorted(set(t.context) | set(head.context))),
        )
        for t in organs
    ]


def _share_qualifiers(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    # "common iliac arteries and veins": a bare class noun after a qualified one of another
    # class takes its qualifiers (the common iliac veins), as a bare side takes a head noun.
    out: list[ParsedTarget] = []
    for t in targets:
        prev = out[-1].concept.core if out else ()
        core = t.concept.core
        if len(core) == 1 and core[0] in CLASS_NOUNS and not t.negated:
            nouns = set(prev) & CLASS_NOUNS
            qualifiers = set(prev) - CLASS_NOUNS
            if len(nouns) == 1 and qualifiers and core[0] not in nouns:
                t = replace(t, concept=replace(t.concept, core=_finish_core([*qualifiers, core[0]])))
        out.append(t)
    return out


def _with_side(t: ParsedTarget, side: str | None) -> ParsedTarget:
    c = t.concept
    return ParsedTarget(t.text, Concept(c.core, side, c.index), t.words, t.unknown, t.negated, t.group, t.context)


def _other_side_remains(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    # "kidneys except the left kidney", "parotids other than the left one": excluding one side
    # of a structure asked for on both sides leaves the other side, and a one-sided request
    # takes only labels of that side (no bilateral or unsided label).
    other = {"left": "right", "right": "left"}
    excluded = {(t.concept.core, t.concept.index): t.concept.laterality for t in targets if t.negated}
    return [
        _with_side(t, other[side])
        if not t.negated
        and t.concept.laterality is None
        and (side := excluded.get((t.concept.core, t.concept.index))) in other
        else t
        for t in targets
    ]


def _both_sides_named(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    # "left kidney, right kidney and spleen": both sides named one by one are the structure on
    # both sides, which also takes its bilateral and unsided labels (as "kidneys" does).  Only
    # sides written as words: "LV, RV" are two ventricles, not one structure's two sides.
    sides: dict[tuple, set[str | None]] = {}
    for t in targets:
        if not t.negated and t.concept.core and any(w in _LATERAL for w in t.words):
            sides.setdefault((t.concept.core, t.concept.index), set()).add(t.concept.laterality)
    both = {key for key, found in sides.items() if {"left", "right"} <= found}
    out: list[ParsedTarget] = []
    for t in targets:
        key = (t.concept.core, t.concept.index)
        if key in both and not t.negated:
            if t.concept.laterality == "right" and "left" in sides[key]:
                continue  # the left one already stands for both
            t = _with_side(t, None) if t.concept.laterality else t
        out.append(t)
    return out


def names_side(target: ParsedTarget) -> bool:
    """Whether the request names the side of ``target`` itself ("left kidney", "kidneys, right side").

    False for a side spread from the first item of a list ("right kidney and liver": the liver
    may have no side at all).
    """
    return any(w in _LATERAL for w in target.words)


def _spread_leading_side(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    # "right kidney and adrenal", "left 5th and 6th ribs": a side written before the first item
    # of a list holds for the items after it that name no side of their own ("both" is one).
    if not targets or targets[0].concept.laterality is None or targets[0].words[:1] == ():
        return targets
    first = targets[0]
    if first.words[0] not in _LATERAL or first.negated:
        return targets
    out = [first]
    for t in targets[1:]:
        if t.negated or t.concept.laterality or any(w in _LATERAL for w in t.words):
            break
        if t.group is not None or t.lesion or not t.concept.core:
            out.append(t)
            continue
        out.append(_with_side(t, first.concept.laterality))
    return out + targets[len(out) :]


_PRIMARY = "primary"  # the canonical token of a primary tumour's core


def _inherit_lesion_organ(targets: list[ParsedTarget]) -> list[ParsedTarget]:
    # "liver and its tumours", "kidney + masses": a bare lesion word after an
    # organ means a lesion of that organ; after an organ's lesion ("renal cysts. Please
    # segment the cysts", "a mass in the pancreatic head; contour the tumour"), the same
    # lesion word, or another word for a tumour, refers back to it.
    out: list[ParsedTarget] = []
    organ: tuple[str, ...] = ()
    named: dict[str, tuple[str, ...]] = {}  # lesion word -> the organ's lesion written with it
    for t in targets:
        core = t.concept.core
        bare = bool(core) and all(tok in LESION_TOKENS for tok in core) and t.group is None
        if bare and set(t.words) & WORDS.metastasis_words:
            # (a metastasis is not the primary before it: "primary tumour and metastases")
            named = {w: c for w, c in named.items() if _PRIMARY not in c}
            organ = () if _PRIMARY in organ else organ
        if bare and organ:
            t = replace(t, concept=replace(t.concept, core=tuple(sorted(set(core) | set(organ)))))
        elif (
            bare and len(core) == 1 and (referent := _named_before(core[0], named)) and not _whole_of_part(t, referent)
        ):
            t = replace(t, concept=replace(t.concept, core=referent))
        elif core and not any(tok in LESION_TOKENS for tok in core):
            organ = core
        elif core and not t.negated:
            for tok in (tok for tok in core if tok in LESION_TOKENS):
                named.pop(tok, None)  # the last named is the one referred to
                named[tok] = core
        out.append(t)
    return out


def _whole_of_part(target: ParsedTarget, referent: tuple[str, ...]) -> bool:
    """ "tumour core and whole tumour": the whole lesion is not the part of it named before."""
    part = set(referent) - LESION_TOKENS - set(WORDS.lesion_organs)
    return bool(part and set(target.words) & WORDS.totality)


def _lesion_before_organ(targets: list[ParsedTarget], vocab: Vocabulary) -> list[ParsedTarget]:
    """ "the mass and the left kidney": a bare lesion before the one organ a request names is that organ's.

    A word with an organ of its own ("nodules": the lung's) keeps it; a finding ("tumour and
    peritumoral oedema") is no organ.
    """
    organs = [
        t
        for t in targets
        if t.concept.core
        and not t.lesion
        and not t.negated
        and t.group is None
        and all(tok in vocab.organ_regions for tok in t.concept.core)
    ]
    if len({t.concept.core for t in organs}) != 1:
        return targets
    organ, first = organs[0].concept.core, targets.index(organs[0])
    out = list(targets)
    for i, t in enumerate(targets[:first]):
        core = t.concept.core
        bare = len(core) == 1 and core[0] in LESION_TOKENS and t.group is None and not t.negated
        if bare and core[0] not in WORDS.default_organ:
            out[i] = replace(t, concept=replace(t.concept, core=tuple(sorted({*core, *organ}))))
    return out


def _named_before(word: str, named: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The organ's lesion that a bare lesion word refers back to (empty when none was named).

    Tumour, mass, lesion and nodule are one referent: the last of them named with an organ.
    """
    if word in named:
        return named[word]
    if word in SOFT_LESION:
        return next((named[w] for w in reversed(named) if w in SOFT_LESION), ())
    return ()
