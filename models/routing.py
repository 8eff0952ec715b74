"""Coarse-to-fine routing: request text -> (dataset, label values) selection.

The method (MedSegAgent's coarse-to-fine model matching, done locally):

1. **Parse** (:mod:`medsegagent.models.parse`): the request becomes targets
   (canonical concepts with laterality, rib numbers / vertebral levels, lesion
   flag) plus an optional modality hint and region hints.
2. **Modality** (coarse): the caller's DICOM modality, else the text's hint,
   keeps only datasets whose models accept it (``Dataset.accepts``).  A dataset
   that does not accept the modality is never selected.
3. **Anatomy**: region hints ("abdominal", "head and neck") restrict targets
   that carry no organ of their own ("tumour", "all organs") to datasets of
   those regions; lesion labels without an organ are matched against the
   target's organ through the dataset's regions.
4. **Label** (fine): every label is known by its name and registry synonyms,
   all canonicalised like the request; a target matches a label by concept
   comparison (exact, part of a composite label, a group's members, a more
   specific label, a lesion word standing in for another), scored in [0, 1].
   A target with words the lexicon does not know goes to the local sentence
   encoder (all-MiniLM-L6-v2): its similarity to the concept terms (lexicon
   terms, label names and synonyms) is the target's score, and one calibrated
   threshold, :data:`ACCEPT_THRESHOLD`, decides (a grammar reading of known
   words is an exact synonym hit, score 1).  Below it the target is unmatched.  Only the best *tier*
   of matches over all datasets is selected, so that a label matching only
   loosely never joins exact matches of other datasets.

The result is a :class:`Plan` (JSON via :meth:`Plan.to_json`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from medsegagent.models import parse as grammar
from medsegagent.models.lexicon import Concept as LexiconConcept
from medsegagent.models.registry import Dataset, Label, Registry, load_registry, normalize_modality

log = logging.getLogger(__name__)

#: Score tiers: only datasets whose best match is in the best tier found are selected.
TIERS: tuple[float, ...] = (0.9, 0.7, 0.5)
#: Scores of the kinds of lexical match (see :func:`Router._score`).
SCORE_EXACT = 1.0
SCORE_PART = 0.95  # a part of a composite label ("prostate_or_uterus", "kidney and masses")
SCORE_GROUP = 0.93  # a member of a group ("lung" -> its lobes)
SCORE_SOFT_LESION = 0.9  # "liver lesion" ~ "liver tumour"
SCORE_SPECIFIC = 0.75  # the label is a more specific kind of the target ("vena cava" -> "inferior vena cava")
SCORE_COARSE = 0.6  # the label covers more than asked (no side / no level)

# Why a candidate of a matching tier is left out (the plan's explanation).
_NOT_MADE_FOR = "a lesion without an organ: other models are made for"
_PARTS_ONLY = "only the organ's parts: listed with other structures, the organ is wanted whole"
#: The one acceptance threshold on a target's score: an exact lexicon reading scores 1, an
#: encoder neighbour its cosine similarity.  Calibrated on the development sets
#: (docs/routing.md, "The threshold"); below it the target is unmatched.
ACCEPT_THRESHOLD = 0.78
#: A request that describes a structure instead of naming it ("the gland behind the stomach
#: that makes insulin") is compared with the lexicon's plain-language definitions (glosses):
#: the nearest is taken at this similarity or more, and only when it leads the nearest
#: definition of another concept by the margin.  Calibrated on the development sets
#: (docs/routing.md, "Descriptions").
GLOSS_THRESHOLD = 0.60
GLOSS_MARGIN = 0.045
#: A concept's other descriptions (lexicon ``descriptions``) say where a structure is or what it does,
#: which a phrase about something else there shares ("the screws in the lower jaw"): their
#: similarity counts this much less than the definition's, for the threshold and the margin alike.
DESCRIPTION_HANDICAP = 0.05
#: Patients reuse the plain words a definition is written in ("the flat bone down the middle of
#: my chest"), which the sentence encoder weighs no more than any other: the share of the
#: description's words a row also uses, each weighted by how few rows use it, adds this much to
#: the row's similarity for choosing between rows and for the margin, never for the threshold.
#: Calibrated on the open development sets (docs/routing.md, "Shared words").
SHARED_WORDS_WEIGHT = 0.10


def _content_words(text: str) -> frozenset[str]:
    """A phrase's words that say something, in the singular."""
    return frozenset(grammar.singular(w) for w in grammar._WORD.findall(text.lower()) if w not in grammar.STOPWORDS)


_DESCRIPTION_WORDS = 3  # words besides stop words that make a phrase a description
_PHRASES_PER_PASS = 16  # at most this many phrases in one forward pass
_PHRASE_CACHE_SIZE = 4096  # query phrases kept across requests
_SURE_CORRECTION = 6  # letters from which a word's spelling correction stands in for it


def _only_places(tokens: set[str] | frozenset[str]) -> bool:
    """Whether these words only place a lesion in a part of its organ ("right upper lobe", "segment 4")."""
    return any(t in grammar.WORDS.organ_part_words for t in tokens) and all(
        t in grammar.WORDS.organ_part_words or t in grammar.WORDS.series_adjectives or t.isdigit() for t in tokens
    )


def _by_encoder(explain: dict[str, Any]) -> bool:
    """Whether a routed target was read by the encoder's nearest term, not by the lexicon."""
    return str(explain.get("method", "")).startswith("encoder:")


def _union(a: dict[str, set[int]], b: dict[str, set[int]]) -> dict[str, set[int]]:
    return {k: a.get(k, set()) | b.get(k, set()) for k in a.keys() | b.keys()}


def _tier(score: float) -> int:
    for i, floor in enumerate(TIERS):
        if score >= floor - 1e-9:
            return i
    return len(TIERS)


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


@dataclass
class Candidate:
    """One dataset that can segment a target.

    Attributes
    ----------
    dataset : str
        Dataset name.
    labels : list of str
        Label names of the dataset for the target.
    values : list of int
        Their output values, flattened and sorted.
    score : float
        Match score in [0, 1] (1 = exact name or synonym).
    installed : bool
        Whether the dataset has at least one installed model.
    models : list of str
        Names of its installed models.
    selected : bool
        Whether the candidate is part of the plan's selection.
    """

    dataset: str
    labels: list[str]
    values: list[int]
    score: float
    installed: bool
    models: list[str]
    selected: bool = True

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "dataset": self.dataset,
            "labels": list(self.labels),
            "values": list(self.values),
            "score": round(self.score, 4),
            "installed": self.installed,
            "models": list(self.models),
            "selected": self.selected,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        """The candidate :meth:`to_json` wrote."""
        return cls(
            dataset=data["dataset"],
            labels=list(data["labels"]),
            values=[int(v) for v in data["values"]],
            score=float(data["score"]),
            installed=bool(data["installed"]),
            models=list(data["models"]),
            selected=bool(data.get("selected", True)),
        )


@dataclass
class Target:
    """One requested structure and its ranked candidates.

    Attributes
    ----------
    text : str
        The phrase as parsed from the request.
    concept : str
        Canonical reading of it (e.g. ``"left kidney"``, ``"rib 3/4"``).
    laterality : str or None
        ``left``, ``right`` or None (both / not lateral).
    kind : str
        Label kind of the best candidate (``organ``, ``lesion``, ``vessel`` ...),
        or the grammar's guess (``lesion``/``organ``) when nothing matched.
    candidates : list of Candidate
        The selected candidates, best first (run them all; rank by ``score``,
        then registry quality).
    negated : bool
        True for "except ..." targets (listed in ``Plan.excluded``).
    alternatives : list of Candidate
        Datasets that also match, but only in a lower tier (not selected).
    """

    text: str
    concept: str
    laterality: str | None
    kind: str
    candidates: list[Candidate] = field(default_factory=list)
    negated: bool = False
    alternatives: list[Candidate] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "target": self.text,
            "concept": self.concept,
            "laterality": self.laterality,
            "kind": self.kind,
            "negated": self.negated,
            "candidates": [c.to_json() for c in self.candidates],
            "alternatives": [c.to_json() for c in self.alternatives],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        """The target :meth:`to_json` wrote."""
        return cls(
            text=data["target"],
            concept=data["concept"],
            laterality=data["laterality"],
            kind=data["kind"],
            candidates=[Candidate.from_json(c) for c in data["candidates"]],
            negated=bool(data["negated"]),
            alternatives=[Candidate.from_json(c) for c in data["alternatives"]],
        )


class UnmatchedKind(StrEnum):
    """Why a target selects nothing (:attr:`Unmatched.kind`)."""

    #: The request names no segmentable structure at all.
    NO_TARGET = "no_target"
    #: "all organs" without a region: too vague to route.
    TOO_VAGUE = "too_vague"
    #: Words that name no structure or lesion the lexicon knows.
    UNKNOWN_STRUCTURE = "unknown_structure"
    #: A known structure no dataset (of the region, of the registry) segments.
    NOT_COVERED = "not_covered"
    #: Datasets cover it, but for other modalities than the study's.
    OTHER_MODALITY = "other_modality"
    #: Datasets cover it, but outside the collection routed within.
    OUTSIDE_COLLECTION = "outside_collection"
    #: The request asks for another task (burn to disc, anonymise, fuse, window, cancel ...).
    NOT_SEGMENTATION = "not_segmentation"


@dataclass(frozen=True)
class Unmatched:
    """A target that selects nothing, and why.

    Attributes
    ----------
    target : str
        The phrase as parsed from the request (the whole request for ``NO_TARGET``).
    kind : UnmatchedKind
        The kind of reason, for programs.
    reason : str
        The reason in words, for people (e.g. "no dataset covers 'coronary arteries' in MR; ...").
    """

    target: str
    kind: UnmatchedKind
    reason: str

    def to_json(self) -> dict[str, str]:
        """JSON form: ``{"target", "kind", "reason"}``."""
        return {"target": self.target, "kind": self.kind.value, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Unmatched:
        """The record :meth:`to_json` wrote."""
        return cls(data["target"], UnmatchedKind(data["kind"]), data["reason"])


@dataclass
class Plan:
    """What to segment with which datasets' models.

    Attributes
    ----------
    text : str
        The request.
    modality : str or None
        Modality used for the modality stage (caller's, else the text's hint).
    modality_source : str or None
        ``"caller"`` (DICOM headers), ``"text"`` or None (no filter).
    collection : str or None
        Registry collection routed within.
    targets : list of Target
        Parsed targets with ranked candidates.
    selection : dict of str to list of int
        Dataset -> sorted label values (region labels flattened): the plan.
    unmatched : list of Unmatched
        Targets that select nothing, with the reason.
    missing_models : list of dict
        ``{"dataset", "install_hint"}`` for selected datasets without an installed model.
    explain : list of dict
        Per target and stage, what was kept or dropped and why.
    regions : list of str
        Region hints found in the text.
    excluded : list of Target
        "except ..." targets; their values are not in the selection.
    elapsed_ms : float
        Planning time.
    """

    text: str
    modality: str | None
    modality_source: str | None
    collection: str | None
    targets: list[Target] = field(default_factory=list)
    selection: dict[str, list[int]] = field(default_factory=dict)
    unmatched: list[Unmatched] = field(default_factory=list)
    missing_models: list[dict[str, str | None]] = field(default_factory=list)
    explain: list[dict[str, Any]] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    excluded: list[Target] = field(default_factory=list)
    elapsed_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-serialisable dict (the ``--json`` contract)."""
        return {
            "text": self.text,
            "modality": self.modality,
            "modality_source": self.modality_source,
            "collection": self.collection,
            "selection": {k: list(v) for k, v in self.selection.items()},
            "targets": [t.to_json() for t in self.targets],
            "unmatched": [u.to_json() for u in self.unmatched],
            "missing_models": [dict(m) for m in self.missing_models],
            "regions": list(self.regions),
            "excluded": [t.to_json() for t in self.excluded],
            "explain": list(self.explain),
            "elapsed_ms": round(self.elapsed_ms, 3),
        }

    def dumps(self, **kwargs: Any) -> str:
        """``json.dumps`` of :meth:`to_json`."""
        return json.dumps(self.to_json(), **kwargs)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        """The plan :meth:`to_json` wrote (a job's stored plan), equal to the one planned.

        Raises
        ------
        KeyError, ValueError, TypeError
            ``data`` is not a plan's JSON form.
        """
        return cls(
            text=data["text"],
            modality=data["modality"],
            modality_source=data["modality_source"],
            collection=data["collection"],
            targets=[Target.from_json(t) for t in data["targets"]],
            selection={k: [int(v) for v in values] for k, values in data["selection"].items()},
            unmatched=[Unmatched.from_json(u) for u in data["unmatched"]],
            missing_models=[dict(m) for m in data["missing_models"]],
            explain=list(data["explain"]),
            regions=list(data["regions"]),
            excluded=[Target.from_json(t) for t in data["excluded"]],
            elapsed_ms=float(data["elapsed_ms"]),
        )


# ---------------------------------------------------------------------------
# Label index
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    """One way a label is named: a canonical core with its context regions."""

    core: frozenset[str]
    context: frozenset[str]
    source: str  # "name", "part" (of a composite name), "synonym" or "lexicon" (its SNOMED CT type)
    values: tuple[int, ...] | None = None  # a part's own values when derivable ("kidney" of "kidney and masses")


@dataclass
class _Entry:
    dataset: Dataset
    label: Label
    laterality: str | None  # left / right / bilateral / None
    index: frozenset[str] | None
    lesion: bool
    forms: list[_Form]
    generic_lesion: bool  # a lesion label naming no organ ("tumor", "stroke lesion")
    strings: list[str]  # name + synonyms, for the sentence encoder

    @property
    def name_core(self) -> frozenset[str]:
        return self.forms[0].core


def _label_entry(dataset: Dataset, label: Label, vocab: grammar.Vocabulary) -> _Entry:
    concepts = grammar.label_concepts(label.name, vocab)
    index = concepts[0].index
    # The registry's side, else the one in the name ("heart_left_atrium_blood_cavity").
    laterality = label.laterality.value if label.laterality is not None else concepts[0].laterality
    forms: list[_Form] = []
    seen: set[tuple[frozenset[str], frozenset[str]]] = set()

    def add(core: Iterable[str], context: Iterable[str], source: str) -> None:
        key = (frozenset(core), frozenset(context))
        if key[0] and key[0] != {grammar.COMPOSITE} and key not in seen:
            seen.add(key)
            forms.append(_Form(key[0], key[1], source))

    for i, c in enumerate(concepts):
        add(c.core, (), "part" if i else "name")
    for synonym in label.synonyms:
        t = grammar.phrase_target(synonym, vocab)
        if t is None:
            continue
        if t.laterality and laterality in ("left", "right") and t.laterality != laterality:
            continue  # a synonym naming the other side is a registry slip; ignore it
        if t.concept.index and index and not (t.concept.index <= index):
            continue
        core = frozenset(t.concept.core)
        if (core, frozenset(t.context)) in seen:
            # "kidneys" for KiTS23's "kidney and masses": the part is the whole label, not the
            # label's values minus the other part's (_derive_part_values)
            forms[:] = [_whole_part(f, label) if f.core == core and f.source == "part" else f for f in forms]
        add(t.concept.core, t.context, "synonym")
    concept = vocab.lexicon.concept(label.type.value)
    if concept is not None and forms:
        # The label's SNOMED CT type names it too ("larynx_air" is a Larynx, "lung_arteries" a
        # Pulmonary artery), unless the code is only a shared closest concept: a lesion code
        # ("Neoplasm, primary" for a tumour core) or one whose words the label's name does not use
        # ("Maxilla" for a hard palate).
        core = frozenset(vocab.concept_core(concept))
        side = core & {"left", "right"}
        if len(side) == 1 and laterality is None and core - side <= forms[0].core:
            # A type that is one side's structure (ACDC's "Myocardium" is the Left ventricle
            # myocardium) gives the label that side, as its name would ("left ventricle").
            laterality, core = next(iter(side)), core - side
        # "aorta_true_lumen" is a part of the aorta ("annulus_proper", a modifier, is the annulus)
        part = forms[0].core & grammar.WORDS.generic_nouns
        if core and not core & grammar.LESION_TOKENS and core & forms[0].core and not part:
            add(core, (), "lexicon")
    if not forms:  # a name of stopwords only: keep the raw words
        forms.append(_Form(frozenset(label.name.lower().split()), frozenset(), "name"))
    lesion = label.kind.value == "lesion" or any(f.core & grammar.LESION_TOKENS for f in forms if f.source == "name")
    # Generic: the label's own name names no organ ("tumor", "stroke lesion", "GTVp").
    generic = lesion and not any(f.core & _ORGAN_TOKENS for f in forms if f.source == "name")
    strings = [label.name.replace("_", " ")] + [s for s in label.synonyms if s]
    return _Entry(dataset, label, laterality, index, lesion, forms, generic, strings)


def _subdivision(m: _Match, core: Iterable[str]) -> bool:
    """Whether a label is a named subdivision of the target (the glottic larynx of the larynx).

    Not when its name adds a class noun: a canal or an artery inside the structure is another
    kind of structure ("mandible" does not bring the mandibular incisive canals); nor a generic
    noun: a wall or a lumen is a part of every tube, not a named division of this one (the
    airways do not bring their walls, the aorta not a dissection's true lumen).
    """
    if m.why != _WHY_SPECIFIC or m.source != "name":
        return False
    asked = frozenset(core)
    other = grammar.CLASS_NOUNS | grammar.WORDS.generic_nouns
    return not any(f.source == "name" and asked < f.core and (f.core - asked) & other for f in m.entry.forms)


#: Nouns that name a part inside a structure ("the pulp of tooth 11", "the incisive canal").
_INNER_PARTS = grammar.WORDS.inner_parts


def _wholes_first(matches: list[_Match], core: Iterable[str]) -> list[_Match]:
    """Equal matches less those naming a part inside another (a tooth, not its pulp: convention 2).

    When a request names neither, a label more specific than the request whose name adds an
    inner-part noun is the part of a whole that matched as well, so it goes. Group members
    ("head and neck OARs") all stay.
    """
    asked = set(core)

    def inner(m: _Match) -> bool:
        specific = m.why == _WHY_SPECIFIC
        return specific and any(f.source == "name" and (f.core - asked) & _INNER_PARTS for f in m.entry.forms)

    wholes = [m for m in matches if not inner(m)]
    return wholes if wholes and len(wholes) < len(matches) else matches


def _leave_out(c: Candidate, explain: dict[str, Any], reason: str) -> None:
    """Deselect a candidate of a selected tier, and say why in the target's explanation."""
    c.selected = False
    explain["label"][c.dataset].update(selected=False, reason=reason)


def _whole_part(form: _Form, label: Label) -> _Form:
    """A composite label's part that the registry names as the label's synonym: the whole label."""
    return _Form(form.core, form.context, form.source, tuple(label.values))


def _derive_part_values(entries: list[_Entry]) -> None:
    """Give each part of a composite label its own values, unless the registry named it whole."""
    # "kidney and masses" = [1, 2, 3] and "kidney masses" = [2, 3] in one dataset: the part
    # "kidney" alone is [1].  Region labels are unions, so a part's values are the whole's
    # values minus those of the dataset's labels that are the other parts.
    by_dataset: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        by_dataset[e.dataset.name].append(e)
    for group in by_dataset.values():
        for e in group:
            if grammar.COMPOSITE not in e.name_core:
                continue
            parts = [f for f in e.forms if f.source == "part"]
            for k, part in enumerate(parts):
                if part.values is not None:
                    continue  # the registry calls the whole label by the part's name
                others: set[int] = set()
                for other_part in parts[:k] + parts[k + 1 :]:
                    for o in group:
                        if o is not e and o.name_core == other_part.core:
                            others.update(o.label.values)
                own = tuple(v for v in e.label.values if v not in others)
                if others and own:
                    e.forms[e.forms.index(part)] = _Form(part.core, part.context, part.source, own)


#: Tokens that name an organ/structure a lesion may be in (for "liver tumour" vs a generic "tumor" label).
_ORGAN_TOKENS = grammar.WORDS.lesion_organs

#: Label kinds making up "the bones"/"skeleton" of a dataset without a bone label of its own.
_SKELETAL_TOKENS = grammar.WORDS.skeletal_parts
_NEIGHBOURS = 40  # encoder neighbours looked through for one of the target's kind (organ/lesion)


class _Index:
    """Label forms of a registry, indexed by token for fast candidate lookup."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # Registry words first: they must not be "corrected" into other words.
        words: set[str] = set()
        for dataset in registry.datasets.values():
            for label in dataset.labels.values():
                for s in [label.name, *label.synonyms]:
                    words.update(w for w in grammar._WORD.findall(grammar._CAMEL.sub(" ", s).lower()) if len(w) > 3)
        self.vocab = grammar.Vocabulary.build(extra_words=words | {grammar.singular(w) for w in words})
        self.entries: list[_Entry] = [
            _label_entry(dataset, label, self.vocab)
            for dataset in registry.datasets.values()
            for label in dataset.labels.values()
        ]
        _derive_part_values(self.entries)
        # Label names join the lexicon's as names a list item can take a head noun into.
        self.vocab = self.vocab.with_names(f.core for e in self.entries for f in e.forms)
        self.by_token: dict[str, list[int]] = defaultdict(list)
        for n, entry in enumerate(self.entries):
            for token in {t for f in entry.forms for t in f.core}:
                self.by_token[token].append(n)
        # Lexicon concepts no label reads as (Router._uncovered_concept): worked out once, as
        # reading every concept for every unmatched target cost ~1.5 ms a target.
        self.unlabelled: list[tuple[tuple[str, ...], frozenset[str], LexiconConcept]] = [
            (key, frozenset(key), concept)
            for key, concept in self.vocab.concepts.items()
            if key and not self._labels_every(key)
        ]
        # Phrases that contain a list word but name one structure ("kidney and masses").
        protected: set[str] = set()
        for e in self.entries:
            for s in e.strings:
                low = " ".join(grammar._WORD.findall(grammar._ascii(s).lower()))
                if (
                    re.search(r"\b(?:and|with|including)\b", low)
                    and len(low.split()) <= 6
                    and "head and neck" not in low
                ):
                    protected.add(low)
        self.protected = tuple(sorted(protected, key=lambda x: -len(x)))
        # Structures with sided labels somewhere: a sideless label of them covers both sides.
        self.paired: set[frozenset[str]] = set()
        for e in self.entries:
            if e.laterality in ("left", "right", "bilateral"):
                self.paired.update(f.core for f in e.forms)
        # What the encoder compares a phrase with: every label's name and synonyms and every
        # term of the lexicon, each with the concept (canonical core) it stands for.
        terms: dict[str, tuple[frozenset[str], bool]] = {}
        for e in self.entries:
            for s in e.strings:
                terms.setdefault(s.lower(), (e.name_core, e.lesion))
        for concept in self.vocab.lexicon.concepts.values():
            core = frozenset(self.vocab.concept_core(concept))
            for term in concept.all_terms:
                if core and core != {grammar.COMPOSITE}:
                    terms.setdefault(term, (core, bool(core & grammar.LESION_TOKENS)))
        self.strings: list[str] = list(terms)
        self.string_core: list[frozenset[str]] = [terms[t][0] for t in self.strings]
        self.string_lesion: list[bool] = [terms[t][1] for t in self.strings]
        self.string_row: dict[str, int] = {t: i for i, t in enumerate(self.strings)}
        # What a description is compared with: each concept's plain-language definition and its
        # other descriptions, one row each (a concept's rows never compete: they share its core).
        rows = [
            (text, c, i == 0 and bool(c.gloss))
            for c in self.vocab.lexicon.concepts.values()
            for i, text in enumerate(c.described)
        ]
        self.glosses: list[str] = [text for text, _, _ in rows]
        #: Whether a row is its concept's definition (else one of its other descriptions).
        self.gloss_is_definition = np.array([definition for _, _, definition in rows], dtype=bool)
        self.gloss_handicap = np.where(self.gloss_is_definition, 0.0, DESCRIPTION_HANDICAP).astype(np.float32)
        # Which rows use each word, and how rare it is among rows (its inverse document frequency).
        users: dict[str, list[int]] = {}
        for i, (text, _, _) in enumerate(rows):
            for word in _content_words(text):
                users.setdefault(word, []).append(i)
        self.gloss_users: dict[str, np.ndarray] = {w: np.array(ix, dtype=np.intp) for w, ix in users.items()}
        self.gloss_rarity: dict[str, float] = {w: float(np.log(len(rows) / len(ix))) for w, ix in users.items()}
        self.gloss_rarity_unused = float(np.log(max(len(rows), 1)))
        glossed = [c for _, c, _ in rows]
        self.gloss_concept: list[LexiconConcept] = glossed
        self.gloss_core: list[frozenset[str]] = [frozenset(self.vocab.concept_core(c)) for c in glossed]
        self.gloss_lesion = np.array([bool(core & grammar.LESION_TOKENS) for core in self.gloss_core], dtype=bool)
        # A class's definition ("organ", "abdominal organ", "vein") fits every member's description:
        # it is never the runner-up that makes a description ambiguous.
        kinds = grammar.CLASS_NOUNS | grammar.GENERIC_NOUNS | frozenset(grammar.REGION_WORDS) | {"organ"}
        self.gloss_class: list[bool] = [bool(core) and core <= kinds for core in self.gloss_core]
        #: The classes ("gland", "muscle") each row's concept is a member of, as its name and its
        #: definition say ("the thyroid: a butterfly-shaped gland ...").
        self.gloss_member_of: list[frozenset[str]] = [_classes_of(c) for c in glossed]

    def _labels_every(self, key: tuple[str, ...]) -> bool:
        """Whether a registry label reads as the concept ``key``.

        One label's reading uses every word of it; a lesion's organ is often its dataset's
        region, not a word of its label ("brain tumor"), so a lesion needs only each word in
        some label.
        """
        if set(key) & grammar.LESION_TOKENS:
            return all(t in self.by_token for t in key)
        return bool(set.intersection(*(set(self.by_token.get(t, ())) for t in key)))

    def lookup(self, tokens: Iterable[str]) -> set[int]:
        out: set[int] = set()
        for t in tokens:
            out.update(self.by_token.get(t, ()))
        return out


# ---------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------


def _classes_of(concept: LexiconConcept) -> frozenset[str]:
    """The class nouns a concept's name and definition use: the classes it is a member of."""
    words = re.findall(r"[a-z]+", f"{concept.name} {concept.gloss}".lower())
    return frozenset(grammar.singular(w) for w in words) & grammar.CLASS_NOUNS


_ORGANLESS = "grammar: a lesion with no organ or region named, on a CT, says not whose it is"
_OPPOSITES = {**grammar.WORDS.opposites, **{b: a for a, b in grammar.WORDS.opposites.items()}}
_SERIES = grammar.WORDS.series_adjectives


def _opposed(written: set[str], term: str) -> bool:
    """Whether a term tells its structure from the phrase's by another position.

    "inferior mesenteric artery" is no superior one, "external iliac" no common iliac, "sphenoid
    sinus" no maxillary sinus; a term without a position of its own ("pulmonary vein") may
    still be the nearest.
    """
    words = set(term.split())
    mine = written & (_SERIES | _OPPOSITES.keys())
    return bool(mine - words) and any(w in _SERIES or _OPPOSITES.get(w) in mine for w in words - written)


@dataclass
class _Match:
    entry: _Entry
    score: float
    why: str
    source: str = "name"  # which kind of form matched: name / part / synonym / group / encoder
    values: tuple[int, ...] | None = None  # overrides the label's values (a composite's part)

    @property
    def label_values(self) -> tuple[int, ...]:
        return self.values if self.values is not None else tuple(self.entry.label.values)


_INDEXES: dict[tuple[int, str], _Index] = {}
_INDEX_LOCK = threading.Lock()


def _shared_index(registry: Registry) -> _Index:
    # Routers of one registry share its label index (built once, read-only afterwards).
    key = (id(registry), registry.content_hash)
    with _INDEX_LOCK:
        index = _INDEXES.get(key)
        if index is None or index.registry is not registry:
            index = _INDEXES[key] = _Index(registry)
        return index


class Router:
    """Reusable router: holds the registry, its label index and the encoder.

    Parameters
    ----------
    registry
        The model library (default: :func:`load_registry`).
    use_encoder
        Use the sentence encoder for words the grammar does not know (loaded
        lazily, on first need, once per process).
    encoder
        An encoder object with ``encode(list[str]) -> ndarray`` (default: the
        process-wide all-MiniLM-L6-v2 from :func:`encoder.get_encoder`).
    threshold
        The acceptance threshold on a target's score (:data:`ACCEPT_THRESHOLD`).

    Notes
    -----
    ``plan`` is thread-safe; the label index is built once in the constructor.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        use_encoder: bool = True,
        encoder: Any = None,
        threshold: float = ACCEPT_THRESHOLD,
    ) -> None:
        t0 = time.perf_counter()
        self.threshold = threshold
        self.registry = registry if registry is not None else load_registry()
        self._index = _shared_index(self.registry)
        self.vocab = self._index.vocab
        self.use_encoder = use_encoder
        self._encoder = encoder
        self._label_emb: np.ndarray | None = None
        self._gloss_emb: np.ndarray | None = None
        self._lock = threading.Lock()
        self._phrase_cache: dict[str, np.ndarray] = {}
        #: This thread's request: the phrases it may still ask the encoder for, and their vectors.
        self._request = threading.local()
        self.init_seconds = time.perf_counter() - t0

    # -- encoder -----------------------------------------------------------------
    def warm_up(self) -> float:
        """Load the sentence encoder and the label embeddings now (not on first need).

        Returns
        -------
        float
            Seconds spent.
        """
        t0 = time.perf_counter()
        if self.use_encoder:
            self._embeddings()
            if self._index.glosses:
                self._gloss_embeddings()
            self._get_encoder().encode(["liver"])  # known terms skip the model: load it now
        return time.perf_counter() - t0

    def _get_encoder(self) -> Any:
        if self._encoder is None:
            from medsegagent.models.encoder import get_encoder

            self._encoder = get_encoder()
        return self._encoder

    def _embeddings(self) -> np.ndarray:
        if self._label_emb is None:
            with self._lock:
                if self._label_emb is None:
                    from medsegagent.models.encoder import cached_embeddings

                    self._label_emb = cached_embeddings(
                        self._index.strings,
                        key=f"{self.registry.content_hash[:16]}-{self.vocab.lexicon.digest[:16]}",
                        encoder=self._encoder,
                    )
        return self._label_emb

    def _gloss_embeddings(self) -> np.ndarray:
        if self._gloss_emb is None:
            with self._lock:
                if self._gloss_emb is None:
                    from medsegagent.models.encoder import cached_embeddings

                    self._gloss_emb = cached_embeddings(
                        self._index.glosses, key=f"glosses-{self.vocab.lexicon.digest[:16]}", encoder=self._encoder
                    )
        return self._gloss_emb

    def _encode_phrase(self, phrase: str) -> np.ndarray:
        row = self._index.string_row.get(phrase)
        if row is not None:  # a known term: its embedding is precomputed
            return self._embeddings()[row]
        vec = self._phrase_cache.get(phrase)
        if vec is None:
            vec = getattr(self._request, "vectors", {}).get(phrase)
        if vec is None:
            vec = self._encode_with_request(phrase)
        return vec

    def _encode_with_request(self, phrase: str) -> np.ndarray:
        # A pass costs ~10 ms on one CPU thread, and each further short sequence in it ~2 ms:
        # the first phrase a request needs takes every phrase the request may still need along,
        # so a request makes one pass, not one per phrase (docs/routing.md, "Latency").
        pending: list[str] = getattr(self._request, "pending", [])
        batch = [phrase, *(p for p in pending if p != phrase)][:_PHRASES_PER_PASS]
        self._request.pending = [p for p in pending if p not in batch]
        vectors = dict(zip(batch, self._get_encoder().encode(batch), strict=True))
        self._request.vectors = {**getattr(self._request, "vectors", {}), **vectors}
        if len(self._phrase_cache) + len(vectors) <= _PHRASE_CACHE_SIZE:
            self._phrase_cache.update(vectors)
        return vectors[phrase]

    def _expect_phrases(self, targets: list[grammar.ParsedTarget]) -> None:
        """Note the phrases this request's targets may ask the encoder for (none is encoded yet).

        Those are, for a target with unknown words or a reading that names no known structure, its
        structure words (:meth:`_phrase`: the encoder's neighbours and the check of a partial
        reading) and, when they are many, its words as written (:meth:`_description`). The list
        is a guess: a request that needs no pass makes none.
        """
        phrases: dict[str, None] = {}
        if self.use_encoder:
            for pt in targets:
                if pt.unknown or tuple(sorted(pt.concept.core)) not in self.vocab.names:
                    phrases[self._phrase(pt)] = None
                    phrases[self._description(pt)] = None
        known = self._index.string_row
        self._request.pending = [p for p in phrases if p and p not in known and p not in self._phrase_cache]
        self._request.vectors = {}

    # -- planning ----------------------------------------------------------------
    def plan(
        self,
        text: str,
        modality: str | None = None,
        *,
        collection: str | None = None,
        installed_only: bool = False,
    ) -> Plan:
        """Plan the segmentation of ``text``.

        Parameters
        ----------
        text
            The request (free text, list, worklist shorthand).
        modality
            Study modality from the DICOM headers (``CT``, ``MR``, ``MR:T1`` ...,
            ``PT``, ``PT+CT``, ``US``); it overrides any modality named in the text.
        collection
            Route within this registry collection only (e.g. ``medsegagent-23``, ``demo``).
        installed_only
            Consider only datasets with an installed model.

        Returns
        -------
        Plan
            Selection, ranked candidates per target, unmatched targets with reasons.

        Raises
        ------
        ValueError
            For an unknown modality or an empty collection.
        """
        t0 = time.perf_counter()
        parsed = grammar.parse_request(text, self.vocab, self._index.protected)
        source: str | None = None
        if modality:
            modality = normalize_modality(modality)
            source = "caller"
        elif parsed.modality_hint:
            modality = parsed.modality_hint
            source = "text"
        plan = Plan(text=text, modality=modality, modality_source=source, collection=collection)
        plan.regions = list(parsed.regions)
        datasets = self.registry.in_collection(collection) if collection else list(self.registry.datasets.values())
        if collection and not datasets:
            raise ValueError(f"no dataset in collection {collection!r} (known: {', '.join(self.registry.collections)})")
        sequences = parsed.sequences if source == "text" else ()
        kept = self._modality_stage(plan, datasets, installed_only, sequences)
        kept_names = {d.name for d in kept}
        all_names = {d.name for d in datasets}
        if parsed.other_task is not None:
            # "Please burn my liver CT onto a disc": the liver is named, but nothing is to be segmented.
            reason = f"not a segmentation request: '{parsed.other_task}' {grammar.other_task_kind(parsed.other_task)}"
            plan.unmatched.append(Unmatched(text, UnmatchedKind.NOT_SEGMENTATION, reason))
            plan.elapsed_ms = (time.perf_counter() - t0) * 1000.0
            return plan
        if not parsed.targets:
            reason = "no segmentable structure found in the request"
            if parsed.regions:
                reason += f" (only the region {', '.join(parsed.regions)}: name the structures)"
            plan.unmatched.append(Unmatched(text, UnmatchedKind.NO_TARGET, reason))
        routed = self._route_targets(parsed, kept_names, all_names)
        self._wholes_in_lists(routed)
        self._one_body_area(routed)
        self._sequence_models_first(routed, plan.modality)
        self._collect(plan, routed, parsed, all_names, kept_names)
        for name in plan.selection:
            d = self.registry.datasets[name]
            if not d.installed_models:
                plan.missing_models.append({"dataset": name, "install_hint": d.install_hint})
        plan.elapsed_ms = (time.perf_counter() - t0) * 1000.0
        return plan

    def _modality_stage(
        self, plan: Plan, datasets: list[Dataset], installed_only: bool, sequences: tuple[str, ...] = ()
    ) -> list[Dataset]:
        """Stage 1 (coarse): the datasets that accept the plan's modality; never relaxed later.

        ``sequences`` are the MR sequences a request names when it names several ("ADC, DWI
        and FLAIR"): a dataset that accepts none of them (a T1-only model) is dropped too.
        """
        kept: list[Dataset] = []
        dropped: dict[str, str] = {}
        for d in datasets:
            if plan.modality and not admits(d, plan.modality, plan.modality_source):
                dropped[d.name] = f"does not accept {plan.modality} (accepts {', '.join(d.modalities)})"
            elif sequences and not any(d.accepts(seq) for seq in sequences):
                dropped[d.name] = f"accepts {', '.join(d.modalities)}; the request names {', '.join(sequences)}"
            elif installed_only and not d.installed_models:
                dropped[d.name] = "no installed model"
            else:
                kept.append(d)
        plan.explain.append(
            {
                "stage": "modality",
                "modality": plan.modality,
                "source": plan.modality_source,
                "kept": [d.name for d in kept],
                "dropped": dropped,
            }
        )
        return kept

    def _route_targets(
        self, parsed: grammar.ParsedRequest, kept_names: set[str], all_names: set[str]
    ) -> list[tuple[grammar.ParsedTarget, Target, dict[str, Any]]]:
        """Stages 2 and 3 for every parsed target, re-reading targets the grammar split badly."""
        self._expect_phrases(parsed.targets)
        routed: list[tuple[grammar.ParsedTarget, Target, dict[str, Any]]] = []
        for pt in map(self._header_side(parsed), parsed.targets):
            target, explain = self._route_target(pt, parsed, kept_names)
            # (a phrase the lexicon knows whole is one structure, even one no dataset segments:
            # "breast implants" is not the breast and the hip implant)
            known_whole = explain["method"].startswith("lexicon:")
            loose = not known_whole and (
                not any(c.selected for c in target.candidates)
                or explain["method"].startswith(("encoder", "description"))
            )
            if loose and len(pt.words) > 1:
                pieces = self._split_unseparated(pt, parsed, all_names)
                if pieces:
                    # "LV RV MYO", "LIVER SPLEEN": a list written without separators.
                    for piece in map(self._header_side(parsed), pieces):
                        routed.append((piece, *self._route_target(piece, parsed, kept_names)))
                    continue
            if loose and routed:
                sibling = self._sibling(pt, routed[-1][0], parsed, all_names)
                if sibling is not None:
                    # "gluteus maximus, medius and minimus": "medius" shares the head "gluteus".
                    routed.append((sibling, *self._route_target(sibling, parsed, kept_names)))
                    continue
            routed.append((pt, target, explain))
        return routed

    def _one_body_area(self, routed: list[tuple[grammar.ParsedTarget, Target, dict[str, Any]]]) -> None:
        """An item read in two body areas is read in the one its list's other items share.

        "annulus, LVOT, sinuses" are the aortic sinuses, not the paranasal or the venous ones:
        of the kinds an item names (labels of a more specific kind, never its exact name), one
        is left out when its dataset's regions miss the regions every other item's datasets
        reach, provided another kind's dataset reaches them.
        """
        positive = [target for pt, target, _ in routed if not pt.negated]

        def regions(c: Candidate) -> set[str]:
            return set(self.registry.datasets[c.dataset].regions)

        def areas(target: Target) -> list[set[str]]:
            return [regions(c) for c in target.candidates if c.selected]

        for target in positive:
            kinds = [c for c in target.candidates if c.selected and c.score < SCORE_EXACT]
            if not any(regions(a).isdisjoint(regions(b)) for a, b in itertools.combinations(kinds, 2)):
                continue  # one body area already
            others = [set().union(*theirs) for t in positive if t is not target and (theirs := areas(t))]
            shared = set.intersection(*others) if others else set()
            inside = [c for c in kinds if shared & regions(c)]
            if inside:
                for c in kinds:
                    c.selected = c in inside

    def _organless_lesion(self, pt: grammar.ParsedTarget, regions: set[str], kept: set[str]) -> bool:
        """Whether a target is a bare lesion ("the mass", "all the lesions") on a CT, with no organ or region named."""
        core = frozenset(pt.concept.core)
        if not core or not core <= grammar.SOFT_LESION or regions or pt.negated or pt.unknown or not kept:
            return False  # (an unknown word may name it: "Wilms tumour")
        return all(self.registry.datasets[name].accepts("CT") for name in kept)

    def _header_side(self, parsed: grammar.ParsedRequest) -> Callable[[grammar.ParsedTarget], grammar.ParsedTarget]:
        """The header's side ("CT HIP RT - FEMORAL HEAD") for a target of a structure that has sides."""

        def sided(pt: grammar.ParsedTarget) -> grammar.ParsedTarget:
            core = frozenset(pt.concept.core)
            if parsed.side is None or pt.negated or pt.concept.laterality or core not in self._index.paired:
                return pt
            return dataclasses.replace(pt, concept=dataclasses.replace(pt.concept, laterality=parsed.side))

        return sided

    def _collect(
        self,
        plan: Plan,
        routed: list[tuple[grammar.ParsedTarget, Target, dict[str, Any]]],
        parsed: grammar.ParsedRequest,
        all_names: set[str],
        kept_names: set[str],
    ) -> None:
        """Fill the plan's targets, exclusions, unmatched targets and selection from the routed targets."""
        # "all ribs except the 12th": excluded targets remove their values from the others. An
        # exclusion only the encoder read (a neighbour, not the structure named) removes nothing
        # from a target the lexicon read: "portal vein (not the hepatic veins)" keeps the portal
        # vein, though the hepatic veins' nearest label is the portal vein's.
        removal: dict[str, set[int]] = defaultdict(set)
        guessed: dict[str, set[int]] = defaultdict(set)
        for pt, target, explain in routed:
            if pt.negated:
                into = guessed if _by_encoder(explain) else removal
                for c in target.candidates:
                    if c.selected:
                        into[c.dataset].update(c.values)
        selection: dict[str, set[int]] = defaultdict(set)
        for pt, target, explain in routed:
            plan.explain.append(explain)
            if pt.negated:
                target.candidates = [c for c in target.candidates if c.selected]
                plan.excluded.append(target)
                continue
            if not any(c.selected for c in target.candidates):
                kind, reason = self._why_unmatched(pt, parsed, all_names, kept_names, plan.modality, plan.collection)
                plan.unmatched.append(Unmatched(pt.text, kind, reason))
            removed = removal if not _by_encoder(explain) else _union(removal, guessed)
            for c in target.candidates:
                gone = removed.get(c.dataset)
                # (an exclusion holding all of a target and more is the organ around it: "the renal
                # tumour, not the kidney", where one label is the kidney with its masses)
                if c.selected and gone and not (pt.lesion and set(c.values) < gone):
                    self._apply_exclusion(c, gone)
            # Consumers run every listed candidate: only the selected ones are candidates.
            target.alternatives = [c for c in target.candidates if not c.selected]
            target.candidates = [c for c in target.candidates if c.selected]
            plan.targets.append(target)
            for c in target.candidates:
                selection[c.dataset].update(c.values)
        for name in sorted(selection):
            if selection[name]:
                plan.selection[name] = sorted(selection[name])

    def _apply_exclusion(self, c: Candidate, removed: set[int]) -> None:
        labels = self.registry.datasets[c.dataset].labels
        c.values = [v for v in c.values if v not in removed]
        c.labels = [name for name in c.labels if set(labels[name].values) & set(c.values)]
        if not c.values:
            c.selected = False

    def _route_target(
        self, pt: grammar.ParsedTarget, parsed: grammar.ParsedRequest, kept: set[str]
    ) -> tuple[Target, dict[str, Any]]:
        c = pt.concept
        explain: dict[str, Any] = {"stage": "target", "target": pt.text, "concept": c.phrase() or None}
        known = self.vocab.concepts.get(c.core)
        if known is not None:
            # Which lexicon concept the grammar read (SNOMED CT code + preferred name).
            explain["lexicon"] = {"code": known.sctid or known.key, "name": known.name}
        regions = set(pt.context) | set(parsed.regions)
        # ("measure the tumour volume" on a CT: whose? A PET's lesions are the whole body's, and
        # "nodules" are the lung's by default.)
        organless = self._organless_lesion(pt, regions, kept)
        matches, how = ([], _ORGANLESS) if organless else self._match(pt, regions, kept)
        explain["method"] = how
        matches, anatomy_dropped = self._anatomy_stage(pt, matches, regions, known)
        explain["anatomy"] = {"regions": sorted(regions), "dropped": anatomy_dropped}
        matches = _demote_synonym_only(matches)
        per_dataset: dict[str, list[_Match]] = defaultdict(list)
        for m in matches:
            per_dataset[m.entry.dataset.name].append(m)
        best = {name: max(m.score for m in ms) for name, ms in per_dataset.items()}
        top_tier = min((_tier(v) for v in best.values()), default=len(TIERS))
        candidates: list[Candidate] = []
        label_explain: dict[str, Any] = {}
        for name, ms in per_dataset.items():
            top = best[name]
            chosen = _wholes_first([m for m in ms if m.score >= top - 1e-9], c.core)
            if top >= TIERS[0] and not pt.lesion:
                # A structure's named subdivisions come with it ("larynx" -> glottic, supraglottic larynx).
                chosen += [m for m in ms if m not in chosen and _subdivision(m, c.core)]
            d = self.registry.datasets[name]
            # registry order, not match order: matches come from set walks, and a plan must not depend on the hash seed
            order = {label: i for i, label in enumerate(d.labels)}
            labels = sorted({m.entry.label.name for m in chosen}, key=order.__getitem__)
            values = sorted({v for m in chosen for v in m.label_values})
            selected = _tier(top) == top_tier and top_tier < len(TIERS)
            installed = [r.name for r in d.installed_models]
            candidates.append(Candidate(name, labels, values, top, bool(installed), installed, selected))
            label_explain[name] = {
                "labels": labels,
                "score": round(top, 4),
                "why": sorted({m.why for m in chosen}),
                "selected": selected,
                **({} if selected else {"reason": "a better tier of match exists in another dataset"}),
            }
        candidates.sort(
            key=lambda x: (
                not x.selected,
                -x.score,
                not x.installed,
                -(self.registry.datasets[x.dataset].specificity or 0.0),
                x.dataset,
            )
        )
        explain["label"] = label_explain
        kinds = [self.registry.datasets[x.dataset].labels[x.labels[0]].kind.value for x in candidates if x.selected]
        kind = max(sorted(set(kinds)), key=kinds.count) if kinds else ("lesion" if pt.lesion else "organ")
        target = Target(pt.text, c.phrase() or pt.text, c.laterality, kind, candidates, pt.negated)
        return target, explain

    def _sequence_models_first(
        self, routed: list[tuple[grammar.ParsedTarget, Target, dict[str, Any]]], modality: str | None
    ) -> None:
        """For a lesion that names no organ, the models made for the study's MR sequence.

        "Lesion" on a DWI or ADC study is the stroke model's (ISLES lists DWI and ADC), not a
        liver-lesion model that takes any MR; with no organ named, the sequence is the only hint.
        """
        if not modality or not modality.startswith("MR:"):
            return
        for pt, target, explain in routed:
            if pt.negated or set(pt.concept.core) - grammar.LESION_TOKENS:
                continue
            selected = [c for c in target.candidates if c.selected]
            made_for = [c for c in selected if modality in self.registry.datasets[c.dataset].modalities]
            if not made_for or len(made_for) == len(selected):
                continue
            for c in selected:
                if c not in made_for:
                    _leave_out(c, explain, f"{_NOT_MADE_FOR} {modality}")

    def _wholes_in_lists(self, routed: list[tuple[grammar.ParsedTarget, Target, dict[str, Any]]]) -> None:
        """Leave out the parts of an organ that is listed with other structures (or against them).

        "Oesophagus, heart, lungs, cord" (an OAR list, a volumetry) wants each organ whole: the
        heart's chambers and a lobes-only dataset's lobes are left out when another candidate
        dataset (the modality stage kept only those that accept the study) segments the organ
        itself.  Asked for alone, an organ keeps its parts ("the heart": whole-heart segmentation).
        """
        # (an excluded structure counts: "lungs, but not the nodules" names the lungs as one organ)
        found = {pt.concept.core for pt, target, _ in routed if any(c.selected for c in target.candidates)}
        if len(found) < 2:
            return
        for pt, target, explain in routed:
            selected = [c for c in target.candidates if c.selected]
            if pt.negated or pt.concept.core not in self.vocab.wholes:
                continue
            if not any(c.score >= SCORE_EXACT - 1e-9 for c in selected):
                continue  # (no dataset has the organ whole: its parts are the answer)
            for c in selected:
                if abs(c.score - SCORE_GROUP) < 1e-9:
                    _leave_out(c, explain, _PARTS_ONLY)

    def _anatomy_stage(
        self, pt: grammar.ParsedTarget, matches: list[_Match], regions: set[str], known: LexiconConcept | None
    ) -> tuple[list[_Match], dict[str, str]]:
        """Stage 2: the matches that lie in the request's regions, and why the others were dropped."""
        where: set[str] = set()
        organless = not (set(pt.concept.core) - grammar.LESION_TOKENS - {grammar.COMPOSITE})
        # "Whole body" names every region: it restricts nothing.
        if regions and "whole_body" not in regions and (pt.group in ("organs", "oars") or organless):
            where = regions  # targets without an organ of their own stay in the hinted regions
        elif pt.concept.core in self.vocab.groups:
            # A group's members stay where the group is ("heart chambers": the heart's ventricles,
            # not the brain's), and in the hinted regions ("CT CARDIAC - chambers").
            where = ((set(known.regions) if known is not None else set()) | regions) - {"whole_body"}
            if not any(set(m.entry.dataset.regions) & where for m in matches):
                where = set()  # (a group no dataset of its regions has stays where it is found)
        if not where or not matches:
            return matches, {}
        inside = [m for m in matches if set(m.entry.dataset.regions) & where]
        dropped = {
            m.entry.dataset.name: f"regions {', '.join(m.entry.dataset.regions)}" for m in matches if m not in inside
        }
        return inside, dropped

    def _sibling(
        self, pt: grammar.ParsedTarget, prev: grammar.ParsedTarget, parsed: grammar.ParsedRequest, everywhere: set[str]
    ) -> grammar.ParsedTarget | None:
        # A one-word item after a multi-word one may replace its last word.
        own = [w for w in pt.words if w not in grammar.STOPWORDS and w not in ("left", "right", "on", "side")]
        head = [w for w in prev.words if w not in grammar.STOPWORDS]
        if len(own) != 1 or len(head) < 2:
            return None
        words = head[:-1] + own
        cand = grammar.phrase_target(" ".join(words), self.vocab)
        if cand is None or cand.unknown or not cand.concept.core:
            return None
        concept = grammar.Concept(cand.concept.core, pt.concept.laterality, pt.concept.index or cand.concept.index)
        sibling = grammar.ParsedTarget(
            f"{' '.join(head[:-1])} {pt.text}", concept, tuple(words), (), pt.negated, None, pt.context
        )
        matches, _ = self._match(sibling, set(parsed.regions), everywhere, use_encoder=False)
        return sibling if any(m.score >= TIERS[0] for m in matches) else None

    def _split_unseparated(
        self, pt: grammar.ParsedTarget, parsed: grammar.ParsedRequest, everywhere: set[str]
    ) -> list[grammar.ParsedTarget]:
        # Greedy longest spans of the segment's words that each name a known structure exactly.
        words = list(pt.words)
        if len(words) > 8:
            return []
        pieces: list[grammar.ParsedTarget] = []
        starts: list[int] = []
        i = 0
        regions = set(parsed.regions)
        while i < len(words):
            for j in range(len(words), i, -1):
                sub = " ".join(words[i:j])
                cand = grammar.phrase_target(sub, self.vocab)
                if cand is None or not cand.concept.core or cand.unknown:
                    continue
                written = {grammar.singular(w) for w in grammar._WORD.findall(sub)} - grammar.STOPWORDS
                if not (set(cand.concept.core) - grammar.LESION_TOKENS) or written <= grammar.LESION_TOKENS:
                    # "lung nodules" is one lesion concept, never "lung" + "nodules"; nor is "thyroid
                    # nodule" the thyroid and a nodule (which, unplaced, would be the lung's)
                    return []
                # (the segment's side is each name's: "CT SHOULDER RT - HUMERUS SCAPULA")
                concept = dataclasses.replace(cand.concept, laterality=cand.concept.laterality or pt.concept.laterality)
                cand = grammar.ParsedTarget(
                    sub, concept, cand.words, (), pt.negated, cand.group, cand.context or pt.context
                )
                matches, _ = self._match(cand, regions, everywhere, use_encoder=False)
                if any(m.score >= TIERS[0] for m in matches):
                    pieces.append(cand)
                    starts.append(i)
                    i = j
                    break
            else:
                if words[i] in grammar.STOPWORDS:
                    i += 1
                    continue
                return []
        if len(pieces) == 2 and grammar.singular(pieces[-1].text) == "bone":
            return pieces[:1]  # "mandibular bone": the bone the adjective names, not every bone too
        if len(pieces) == 2 and set(pieces[-1].concept.core) <= grammar.CLASS_NOUNS:
            # "femoral artery": a class noun last is the head the words before it modify,
            # a structure of its own that no label names, not the femur and every artery.
            return []
        if "of" in words and len(pieces) > 1:
            # "thyroid cartilage of the larynx": a part named with its whole is the part (a lesion
            # named with its organ is that organ's: "tumour of the kidney" is not split here).
            before = [p for p, start in zip(pieces, starts, strict=True) if start < words.index("of")]
            if before and not any(set(p.concept.core) & grammar.LESION_TOKENS for p in pieces):
                return before
        return pieces if len(pieces) > 1 else []

    def _why_unmatched(
        self,
        pt: grammar.ParsedTarget,
        parsed: grammar.ParsedRequest,
        everywhere: set[str],
        kept: set[str],
        modality: str | None,
        collection: str | None,
    ) -> tuple[UnmatchedKind, str]:
        regions = set(pt.context) | set(parsed.regions)
        if pt.group in ("organs", "oars"):
            if not regions:
                return (
                    UnmatchedKind.TOO_VAGUE,
                    "too vague: name the structures or the body region (e.g. 'abdominal organs')",
                )
            return (
                UnmatchedKind.NOT_COVERED,
                f"no region-specific dataset for the organs of {', '.join(sorted(regions))}",
            )
        if self._organless_lesion(pt, regions, kept):
            return UnmatchedKind.TOO_VAGUE, "too vague: name the organ the lesion lies in (e.g. 'liver lesions')"
        if not pt.concept.core and pt.unknown:
            return (
                UnmatchedKind.UNKNOWN_STRUCTURE,
                f"not a known anatomical structure or lesion: '{' '.join(pt.unknown)}'",
            )
        refused = self._uncovered_concept(frozenset(pt.concept.core))
        if refused is not None:
            return (
                UnmatchedKind.NOT_COVERED,
                f"{_concept_ref(refused)} is a known structure, but no dataset of the registry segments it",
            )
        phrase = pt.concept.phrase() or pt.text
        if modality and everywhere - kept:
            others, _ = self._match(pt, regions, everywhere - kept)
            if others:
                mods = sorted({m for x in others for m in x.entry.dataset.modalities})
                names = sorted({x.entry.dataset.name for x in others})
                return (
                    UnmatchedKind.OTHER_MODALITY,
                    f"no dataset covers '{phrase}' in {modality}; available in {', '.join(mods)} ({', '.join(names)})",
                )
        scope = f" in collection '{collection}'" if collection else ""
        if collection:
            outside, _ = self._match(pt, regions, set(self.registry.datasets) - everywhere, use_encoder=False)
            names = sorted({m.entry.dataset.name for m in outside if m.score >= TIERS[0]})
            if names:
                return (
                    UnmatchedKind.OUTSIDE_COLLECTION,
                    f"no dataset{scope} has a label for '{phrase}'; outside it: {', '.join(names)}",
                )
        return UnmatchedKind.NOT_COVERED, f"no dataset{scope} has a label for '{phrase}'"

    # -- matching ------------------------------------------------------------------
    def _match(
        self, pt: grammar.ParsedTarget, regions: set[str], allowed: set[str], *, use_encoder: bool = True
    ) -> tuple[list[_Match], str]:
        c = pt.concept
        core = frozenset(c.core)
        if pt.group in ("organs", "oars"):
            # "the organ under my left ribs that swelled with glandular fever" describes one organ
            described = self._described(pt, regions, allowed) if use_encoder and self.use_encoder else None
            if described is not None and described[0]:
                return described
            return self._organ_group(regions, allowed, pt.group == "oars"), "group: organs of the named region"
        if core and core <= grammar.CLASS_NOUNS and use_encoder and self.use_encoder:
            # "the nerve behind my left eye that carries the sight": a class noun alone names no
            # structure; what the phrase says about it does, when it says enough.
            described = self._described(pt, regions, allowed)
            if described is not None and described[0]:
                return described
        members = list(self.vocab.groups.get(c.core, ()))
        placed = self._placed_member(pt, members, regions, allowed) if use_encoder and self.use_encoder else None
        if placed is not None:
            return placed
        if "vessel" in core and len(core) > 1:
            # "iliac vessels" = the iliac arteries and veins.
            rest = core - {"vessel"}
            members += [tuple(sorted(rest | {"artery"})), tuple(sorted(rest | {"vein"}))]
        member_sets = {frozenset(m) for m in members}
        tokens = set(core)
        for m in members:
            tokens.update(m)
        if core & grammar.SOFT_LESION:
            tokens |= grammar.SOFT_LESION  # "lesion" may be called "tumor" in a label
        out: list[_Match] = []
        if core:
            for n in self._index.lookup(tokens):
                e = self._index.entries[n]
                if e.dataset.name in allowed:
                    m = self._score(pt, core, member_sets, regions, e)
                    if m is not None:
                        out.append(m)
            if core == {"bone"}:
                has_bone = {m.entry.dataset.name for m in out if m.score >= TIERS[0]}
                out += self._skeleton(pt, regions, allowed, has_bone)
            out = _enough_members(out, len(member_sets))
        if out and pt.unknown and use_encoder and self.use_encoder and self._unknown_in_phrase(pt):
            score, term, term_core = self._partial_reading(pt, out)
            how = f"'{' '.join(pt.unknown)}' unknown; '{self._phrase(pt)}' ~ '{term}' {score:.3f}"
            if score < self.threshold:
                described = self._described(pt, regions, allowed)
                return described or ([], f"encoder: {how} < threshold {self.threshold}")
            if term_core > core:
                # The nearest term names a kind of the reading ("Wilms tumour" ~ "wilms tumor", the
                # kidney's): the unknown word was what made it that kind.
                narrower, _ = self._match(
                    self._with_core(pt, tuple(sorted(term_core))), regions, allowed, use_encoder=False
                )
                if narrower:
                    return narrower, f"grammar, {how} (a kind of '{' '.join(sorted(core))}')"
            return out, f"grammar, {how}"
        if out:
            return out, "grammar"
        relaxed = self._relaxed(pt, regions, allowed) if use_encoder else None
        if relaxed is not None:
            return relaxed
        described = self._described(pt, regions, allowed) if use_encoder and self.use_encoder and pt.unknown else None
        if described is not None:
            # "the bag under the liver that stores bile": a description, though it uses the
            # name of a structure no dataset segments (bile) on the way.
            return described
        refused = self._uncovered_concept(core)
        if refused is not None:
            # A structure the lexicon knows but no label of the registry names (a meniscus, a
            # prostate zone): refused by name, never handed to the encoder's nearest neighbour.
            return [], f"lexicon: {_concept_ref(refused)} is known, but no dataset segments it"
        alone = _class_noun_alone(pt)  # (which has no neighbour term)
        if use_encoder and self.use_encoder and not alone and (pt.unknown or (core and not self._known(pt, regions))):
            # The encoder reads words the grammar does not know, or a reading that no label of
            # the whole registry has.  A known structure that the allowed datasets do not cover
            # stays unmatched (with its reason), never "something similar".
            found = self._encoder_match(pt, regions, allowed)
            return found if found[0] else self._described(pt, regions, allowed) or found
        return [], "grammar"

    def _relaxed(
        self, pt: grammar.ParsedTarget, regions: set[str], allowed: set[str]
    ) -> tuple[list[_Match], str] | None:
        """A reading without the words that only qualify the structure, when the whole reads as nothing."""
        core = frozenset(pt.concept.core)
        generic = core & grammar.GENERIC_NOUNS
        if generic and core - generic:
            # "left atrium cavity": retry without the generic noun.
            out, _ = self._match(
                self._with_core(pt, tuple(sorted(core - generic))), regions, allowed, use_encoder=False
            )
            if out:
                return out, f"grammar (without '{' '.join(sorted(generic))}')"
        placed = core & (grammar.LESION_TOKENS | _ORGAN_TOKENS)
        where = core - placed  # the part of the organ, and its place
        if pt.lesion and where and placed - grammar.LESION_TOKENS and _only_places(where):
            # "nodule, right upper lobe": a lesion of an organ's part is the organ's lesion when no
            # dataset segments the part's own (the lung nodule).
            out, _ = self._match(self._with_core(pt, tuple(sorted(placed))), regions, allowed, use_encoder=False)
            if out:
                return out, f"grammar (the lesion of the organ: '{' '.join(sorted(where))}' dropped)"
        return None

    def _described(
        self, pt: grammar.ParsedTarget, regions: set[str], allowed: set[str]
    ) -> tuple[list[_Match], str] | None:
        """The concept a description defines ("the tubes that carry urine down from the kidneys").

        The written phrase is compared with every concept's plain-language definition and its
        other descriptions (which count :data:`DESCRIPTION_HANDICAP` less); the nearest one stands
        when it is close enough and clearly nearer than any other concept's.  None when the phrase
        is no description or no definition is near.
        """
        text = self._description(pt)
        if not text or not self._index.glosses:
            return None
        raw, sims = self._gloss_similarities(text)
        # Structure-checked like the term neighbours: a description of an organ never reads as
        # a lesion of it ("the small glands that sit on top of the kidneys"), nor vice versa.
        named = frozenset(pt.concept.core)
        lesion = bool(named & grammar.LESION_TOKENS)
        if lesion or pt.concept.core in self.vocab.names or named <= grammar.CLASS_NOUNS | grammar.WORDS.size_words:
            # (words that name nothing themselves may describe either: "the fluid-filled bubbles
            # on my kidneys" are its cysts)
            sims = np.where(self._index.gloss_lesion == lesion, sims, -1.0)
        if named and named <= grammar.CLASS_NOUNS:
            # "the gland in front of my windpipe" is a gland: the thyroid, not the windpipe
            member = np.array([named <= classes for classes in self._index.gloss_member_of], dtype=bool)
            sims = np.where(member, sims, -1.0)
        order = np.argsort(-sims, kind="stable")
        best, core = int(order[0]), self._index.gloss_core[int(order[0])]
        # (the runner-up is another structure: not the same one, nor a kind of it or its kind,
        # as "nodule" is of "lung nodule")
        others = (
            i
            for i in order[1:]
            if not (self._index.gloss_core[i] <= core or core <= self._index.gloss_core[i])
            and not self._index.gloss_class[i]
        )
        runner = next((float(sims[i]) for i in others), 0.0)
        score = float(sims[best])
        concept = self._index.gloss_concept[best]
        if float(raw[best]) < GLOSS_THRESHOLD or score - runner < GLOSS_MARGIN:
            return None
        kind = "definition" if self._index.gloss_is_definition[best] else "description"
        row = kind if kind == "definition" else f"description '{self._index.glosses[best]}'"
        shared = f" (encoder {float(raw[best]):.3f}, shared words)" if score > float(raw[best]) else ""
        how = f"description: '{text}' ~ {row} of {_concept_ref(concept)} {score:.3f}{shared}"
        matches, _ = self._match(self._with_core(pt, tuple(sorted(core))), regions, allowed, use_encoder=False)
        if not matches:
            return [], f"{how}, which no dataset segments"
        via = f" (via {kind} {score:.3f})"
        return [_Match(m.entry, m.score, m.why + via, "encoder", m.values) for m in matches], how

    def _placed_member(
        self, pt: grammar.ParsedTarget, members: list[tuple[str, ...]], regions: set[str], allowed: set[str]
    ) -> tuple[list[_Match], str] | None:
        """ "the spit glands in front of my ears": the member of a group that the group's place describes."""
        if len(members) < 2 or not grammar.places(pt.text, self.vocab):
            return None
        member = self._member_described(pt, members)
        if member is None:
            return None
        out, how = self._match(self._with_core(pt, member), regions, allowed, use_encoder=False)
        return (out, f"{how}, the member of '{' '.join(pt.concept.core)}' its place describes") if out else None

    def _member_described(self, pt: grammar.ParsedTarget, members: list[tuple[str, ...]]) -> tuple[str, ...] | None:
        """The one member of a group the written phrase describes, when it is clearly nearer than the others."""
        text = self._description(pt)
        if not text:
            return None
        raw, sims = self._gloss_similarities(text)
        wanted = {frozenset(m) for m in members}
        best: dict[frozenset[str], tuple[float, float]] = {}
        for i, core in enumerate(self._index.gloss_core):
            if core in wanted and float(sims[i]) > best.get(core, (-1.0, -1.0))[0]:
                best[core] = (float(sims[i]), float(raw[i]))
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
        if not ranked or ranked[0][1][1] < GLOSS_THRESHOLD:
            return None
        if len(ranked) > 1 and ranked[0][1][0] - ranked[1][1][0] < GLOSS_MARGIN:
            return None
        return tuple(sorted(ranked[0][0]))

    def _gloss_similarities(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """How near ``text`` is to every definition and description row, other descriptions handicapped.

        Returns the encoder's similarities (for the threshold) and the same with the shared
        words' bonus (for choosing a row and for the margin).
        """
        sims = self._gloss_embeddings() @ self._encode_phrase(text) - self._index.gloss_handicap
        return sims, sims + self._shared_words(text)

    def _shared_words(self, text: str) -> np.ndarray:
        """Each row's share of ``text``'s words, rare words counting more, times :data:`SHARED_WORDS_WEIGHT`."""
        ix = self._index
        shared = np.zeros(len(ix.glosses), dtype=np.float32)
        said = _content_words(text)
        total = sum(ix.gloss_rarity.get(w, ix.gloss_rarity_unused) for w in said)
        if not total:
            return shared
        for word in said & ix.gloss_users.keys():
            shared[ix.gloss_users[word]] += ix.gloss_rarity[word]
        return SHARED_WORDS_WEIGHT * shared / total

    def _uncovered_concept(self, core: frozenset[str]) -> LexiconConcept | None:
        # The largest lexicon concept inside the target whose words no registry label uses
        # together ("breast implant": labels name the breast and implants, none both).
        best: LexiconConcept | None = None
        size = 0
        for key, words, concept in self._index.unlabelled:
            if len(key) > size and words <= core:
                best, size = concept, len(key)
        return best

    def _known(self, pt: grammar.ParsedTarget, regions: set[str]) -> bool:
        everywhere = set(self.registry.datasets)
        return bool(self._match(pt, regions, everywhere, use_encoder=False)[0])

    @staticmethod
    def _with_core(pt: grammar.ParsedTarget, core: tuple[str, ...]) -> grammar.ParsedTarget:
        c = pt.concept
        return grammar.ParsedTarget(
            pt.text, grammar.Concept(core, c.laterality, c.index), pt.words, (), pt.negated, None, pt.context
        )

    def _score(
        self,
        pt: grammar.ParsedTarget,
        core: frozenset[str],
        members: set[frozenset[str]],
        regions: set[str],
        e: _Entry,
    ) -> _Match | None:
        c = pt.concept
        side = self._side_cap(pt, e)
        if side is None:
            return None
        cap, why_cap = side
        # Indices (rib numbers, vertebral levels).
        if c.index:
            if e.index:
                if not (e.index & c.index):
                    return None
            else:
                cap, why_cap = SCORE_COARSE, "label covers all levels"
        best: _Match | None = None
        target_lesion = bool(core & grammar.LESION_TOKENS)
        ctx = set(pt.context) | regions
        for f in e.forms:
            if f.context and not f.context <= ctx:
                continue  # "thoracic aorta" is not just "aorta"... unless the context is given
            kind = self._form_kind(f, core, members, target_lesion, e)
            if kind is None:
                continue
            s, w = kind
            # Generic lesion labels of whole-body datasets lose against region-specific ones
            # when the target names a place.
            place = e.generic_lesion and bool(ctx - {"whole_body"}) and not f.context
            if place and "whole_body" in e.dataset.regions and s > SCORE_COARSE:
                # A whole-body dataset's lesions are nobody's "abdominal tumours": a tier lower.
                s, w = SCORE_COARSE, "whole-body lesion label, region named"
            elif place and s >= TIERS[0]:
                s = min(s, 0.7 + 0.3 * float(e.dataset.specificity or 0.0))
                w = "generic lesion label, region named"
            if s > cap:
                s, w = cap, why_cap
            if s > 0.0 and (best is None or s > best.score):
                source = {"member of the requested group": "group", _WHY_CONTEXT: "context"}.get(w, f.source)
                best = _Match(e, s, w, source, f.values)
        return best

    def _form_kind(
        self, f: _Form, core: frozenset[str], members: set[frozenset[str]], target_lesion: bool, e: _Entry
    ) -> tuple[float, str] | None:
        """How one form of a label meets the target's core: its score and why; None when it must not."""
        if f.core == core:
            return (SCORE_PART, "part of a composite label") if f.source == "part" else (SCORE_EXACT, "exact")
        if grammar.COMPOSITE in f.core or grammar.COMPOSITE in core:
            return None  # composite names ("kidney and masses") match exactly or not at all
        if _soft_equal(f.core, core):
            return SCORE_SOFT_LESION, "lesion word stands in for another"
        if f.core in members:
            # (a group that counts itself among its members names kinds of one structure, all
            # equal: "sinuses of Valsalva" are the left, right and non-coronary sinus)
            return (SCORE_EXACT if core in members else SCORE_GROUP), "member of the requested group"
        if f.core < core:
            extra = core - f.core
            if e.generic_lesion and target_lesion and all(t in self.vocab.organ_regions for t in extra):
                # "brain tumour" vs a label "tumor": fine if the dataset covers that organ's region.
                return self._organ_lesion(extra, e, 0.0)
            return 0.0, ""
        if e.generic_lesion and _soft_subset(f.core, core):
            # "bone lesions" vs a label "tumor": the organ's lesion, called by another lesion word
            extra = (core - grammar.SOFT_LESION) - f.core
            if all(t in self.vocab.organ_regions for t in extra):
                return self._organ_lesion(extra, e, 0.05)
        if core < f.core and not core <= grammar.CLASS_NOUNS | grammar.GENERIC_NOUNS | grammar.WORDS.size_words:
            extra = f.core - core
            if (extra & grammar.LESION_TOKENS) and not target_lesion:
                return None  # organ asked, lesion label: never
            if target_lesion and not (core - grammar.LESION_TOKENS) and not (extra - grammar.LESION_TOKENS):
                return None  # "tumor" vs "tumor core": a sub-region of the lesion, not the lesion
            if target_lesion and not (core & f.core & grammar.LESION_TOKENS):
                return SCORE_SPECIFIC - 0.05, _WHY_SPECIFIC  # "mass" vs "kidney tumor": the lesion word differs too
            return SCORE_SPECIFIC, _WHY_SPECIFIC
        if target_lesion and _soft_subset(core, f.core):
            return SCORE_SPECIFIC - 0.05, _WHY_SPECIFIC
        return 0.0, ""

    def _organ_lesion(self, organs: frozenset[str], e: _Entry, handicap: float) -> tuple[float, str] | None:
        """An organ's lesion read by a dataset's generic lesion label: only where it covers that organ's region."""
        organ_regions = set().union(*(self.vocab.organ_regions[t] for t in organs))
        if not (organ_regions & set(e.dataset.regions)):
            return None
        return 0.7 + 0.25 * float(e.dataset.specificity or 0.0) - handicap, _WHY_CONTEXT

    def _side_cap(self, pt: grammar.ParsedTarget, e: _Entry) -> tuple[float, str] | None:
        """The most a label may score for the target's side, or None when its side excludes it."""
        side = pt.concept.laterality
        if side not in ("left", "right"):
            return 1.0, ""
        # A sided target takes only labels of its side (held-out convention 4): not the other
        # side, nor a sideless label, which would deliver both.
        if e.laterality in ("left", "right") and e.laterality != side:
            return None
        # A sideless lesion label ("kidney masses") finds lesions on either side.
        sideless = e.laterality == "bilateral" or (e.laterality is None and not e.lesion)
        if sideless and grammar.names_side(pt):
            return None
        # A side spread from the list's first item ("right kidney and liver") may not concern
        # this structure: a sideless label of an unpaired one stands, a paired one's is capped.
        if sideless and any(f.core in self._index.paired for f in e.forms):
            return SCORE_COARSE, f"label covers both sides, {side} asked"
        return 1.0, ""

    def _skeleton(
        self, pt: grammar.ParsedTarget, regions: set[str], allowed: set[str], has_bone: set[str]
    ) -> list[_Match]:
        # "bones"/"skeleton": datasets without a bone label of their own give all their bones
        # (and skeletal cartilage), by the registry's label kinds.  Without a region named,
        # only whole-body datasets hold "the skeleton"; a head-and-neck dataset's mandible is not it.
        out: list[_Match] = []
        for e in self._index.entries:
            d = e.dataset.name
            if d not in allowed or d in has_bone:
                continue
            if not (set(e.dataset.regions) & (regions or {"whole_body"})):
                continue
            if e.label.kind.value == "bone" or (e.name_core & _SKELETAL_TOKENS):
                lat = pt.concept.laterality
                if lat in ("left", "right") and e.laterality in ("left", "right") and e.laterality != lat:
                    continue
                out.append(_Match(e, SCORE_GROUP, "bone of the skeleton (label kind)", "group"))
        return out

    def _organ_group(self, regions: set[str], allowed: set[str], oars: bool = False) -> list[_Match]:
        out: list[_Match] = []
        if not regions:
            return out
        for e in self._index.entries:
            d = e.dataset
            if d.name not in allowed or e.lesion or "whole_body" in d.regions:
                continue
            if not oars and e.label.kind.value in ("bone", "muscle"):
                continue  # organs, their vessels and cavities; not the skeleton or muscles
            if set(d.regions) & regions and (d.specificity or 0.0) >= 0.5:
                out.append(_Match(e, SCORE_GROUP, "organ of a dataset of the named region", "group"))
        return out

    def _description(self, pt: grammar.ParsedTarget) -> str:
        """The target's words as written, when enough of them say something to be a description.

        The story told after the description is left out ("the flat bone in my chest [they sawed
        through]"): from a story word (:attr:`GrammarWords.story_words`) that follows the
        description's own words, before any clause that describes it further ("the gland that is ...").
        A clause on its own ("where things get stuck when I swallow") describes no structure.
        """
        words = grammar._WORD.findall(pt.text.lower())
        if not words or words[0] in grammar.RELATIVE_WORDS or words[0] in grammar.WORDS.clause_words:
            return ""
        said = 0
        for i, w in enumerate(words):
            if w in grammar.RELATIVE_WORDS or w in grammar.WORDS.clause_words:
                said += sum(v not in grammar.STOPWORDS for v in words[i:])  # the clause describes too
                break
            if said >= _DESCRIPTION_WORDS and w in grammar.WORDS.story_words:
                words = words[:i]
                break
            said += w not in grammar.STOPWORDS
        return " ".join(words) if said >= _DESCRIPTION_WORDS else ""

    def _phrase(self, pt: grammar.ParsedTarget) -> str:
        # The words that name the structure: no commands, sides, numbers or levels; a long
        # misspelt word that the reading comes from as the grammar corrected it ("galbladder plz"
        # is compared as "gallbladder plz"). A short word stays as written: one edit in four
        # letters is weak evidence ("Lars" in a signature is no "lats", "Desc" no "disc").
        skip = grammar.STOPWORDS | {"left", "right", "l", "r", "lt", "rt", "bilateral", "both"}
        core = set(pt.concept.core)

        def spelt(word: str) -> str:
            fixed = self.vocab.correct_spelling(word) if len(word) >= _SURE_CORRECTION else word
            return fixed if fixed != word and set(self.vocab.core(fixed)) & core else word

        return " ".join(spelt(w) for w in pt.words if w not in skip and not any(ch.isdigit() for ch in w))

    def _encoder_match(
        self, pt: grammar.ParsedTarget, regions: set[str], allowed: set[str]
    ) -> tuple[list[_Match], str]:
        # The encoder translates a phrase the grammar cannot read into the nearest concept; the
        # grammar then matches that concept everywhere (sides, levels, all datasets), so the
        # encoder never picks a single dataset by itself.
        phrase = self._phrase(pt)
        if not phrase:
            return [], "encoder: nothing to encode"
        sims = self._embeddings() @ self._encode_phrase(phrase)
        lesion = bool(set(pt.concept.core) & grammar.LESION_TOKENS)
        best, best_s = -1, -1.0
        # The 40 nearest terms, nearest first: a partition, then a sort of those 40 only.
        k = min(_NEIGHBOURS, len(sims))
        top = np.argpartition(-sims, k - 1)[:k] if k else np.empty(0, dtype=np.intp)
        written = set(phrase.split())
        for i in top[np.argsort(-sims[top], kind="stable")]:
            if pt.concept.core and self._index.string_lesion[i] != lesion:
                continue  # an organ request never takes a lesion concept, nor vice versa
            if _opposed(written, self._index.strings[i]):
                continue  # "inferior mesenteric artery" is no superior one
            best, best_s = int(i), float(sims[i])
            break
        if best < 0 or best_s < self.threshold:
            nearest = self._index.strings[best] if best >= 0 else "-"
            return [], f"encoder: '{phrase}' ~ '{nearest}' {max(best_s, 0.0):.3f} < threshold {self.threshold}"
        core = tuple(sorted(self._index.string_core[best]))
        matches, _ = self._match(self._with_core(pt, core), regions, allowed, use_encoder=False)
        how = f"encoder: '{phrase}' ~ '{self._index.strings[best]}' ({best_s:.3f}) -> {' '.join(core)}"
        via = f" (via encoder {best_s:.3f})"
        return [_Match(m.entry, m.score, m.why + via, "encoder", m.values) for m in matches], how

    @staticmethod
    def _unknown_in_phrase(pt: grammar.ParsedTarget) -> bool:
        """Whether an unknown word belongs to the structure's phrase ("uterine fibroids").

        It does when it stands next to the structure's words (unknown words between them
        count as next) or before a preposition that leads to them ("water on the lungs").
        One set off by words that say nothing ("my husband's spleen got hurt in the car
        crash", "can you work out my liver volume") is in another clause, and does not put
        the reading in doubt.
        """
        unknown = set(pt.unknown)

        def is_unknown(word: str) -> bool:
            return word in unknown or grammar.singular(word) in unknown

        words = pt.words
        named = [j for j, w in enumerate(words) if not is_unknown(w) and grammar.singular(w) not in grammar.STOPWORDS]
        # A participle after the structure, with words of its own, opens a clause ("collarbone
        # playing rugby"); one that ends the phrase may be its head noun ("tongue piercing").
        # A relative word after it opens one too ("the breast bone where they opened my chest").
        participle = next(
            (
                i
                for i, w in enumerate(words[:-1])
                if named and i > named[0] and ((is_unknown(w) and w.endswith("ing")) or w in grammar.RELATIVE_WORDS)
            ),
            len(words),
        )
        named = [j for j in named if j < participle]
        found = [i for i, w in enumerate(words) if is_unknown(w) and i < participle]
        if not found and participle == len(words):
            return True  # the unknown words are not words of the phrase as written: stay careful
        for i, j in itertools.product(found, named):
            between = words[min(i, j) + 1 : max(i, j)]
            if all(is_unknown(w) for w in between):
                return True
            # "water on the lungs", "stones in my kidney"; not "depends on how big my liver is"
            placing = set(between) <= grammar.WORDS.prepositions | grammar.WORDS.determiners
            if i < j and set(between) & grammar.WORDS.prepositions and placing:
                return True
            if j < i and between == ("of",) and grammar.singular(words[j]) in grammar.CLASS_NOUNS:
                return True  # "the vein of Galen": the unknown name says which vein
        return False

    def _partial_reading(self, pt: grammar.ParsedTarget, matches: list[_Match]) -> tuple[float, str, frozenset[str]]:
        # Some words were unknown and dropped ("uterine fibroids" read as the uterus): the
        # reading stands only if the whole phrase is as close to the concept's terms as the
        # threshold asks.  The nearest term and its core come back too.
        phrase = self._phrase(pt)
        cores = {m.entry.name_core for m in matches} | {frozenset(pt.concept.core)}
        rows = [i for i, c in enumerate(self._index.string_core) if c in cores]
        if not phrase or not rows:
            return 0.0, "-", frozenset()
        sims = self._embeddings()[rows] @ self._encode_phrase(phrase)
        k = int(np.argmax(sims))
        return float(sims[k]), self._index.strings[rows[k]], frozenset(self._index.string_core[rows[k]])


def admits(dataset: Dataset, modality: str, source: str | None) -> bool:
    """Whether the modality stage keeps ``dataset`` for a study of ``modality``.

    Parameters
    ----------
    dataset
        A registry dataset.
    modality
        The normalised modality of the plan.
    source
        ``"caller"`` (DICOM headers) or ``"text"`` (named in the request).

    Returns
    -------
    bool
        ``dataset.accepts(modality)``; besides, a ``CT`` named only in the text
        also admits PET/CT datasets.
    """
    # A "CT" the requester wrote is also what a PET/CT's CT is called ("tumours on whole-body
    # CT", "GTVp in CT" for HECKTOR): with no study to read, the text cannot tell them apart,
    # so PET/CT datasets stay candidates.  A CT from the DICOM headers is a CT-only study,
    # which a PET/CT model (it needs the PET too) never gets.
    if dataset.accepts(modality):
        return True
    return source == "text" and modality == "CT" and dataset.accepts("PT+CT")


def _concept_ref(concept: LexiconConcept) -> str:
    code = f"SNOMED CT {concept.sctid}" if concept.sctid else "no SNOMED CT code in the lexicon"
    return f"'{concept.name}' ({code})"


_WHY_SPECIFIC = "label is a more specific kind"
_WHY_CONTEXT = "lesion label of a dataset covering that organ's region"


def _enough_members(matches: list[_Match], n_members: int) -> list[_Match]:
    # A group of many parts ("heart": chambers, myocardium, great-vessel roots) is not
    # served by a dataset holding one of them only (a pulmonary-artery dataset is no heart model).
    if n_members < 3:
        return matches
    found: dict[str, set[frozenset[str]]] = defaultdict(set)
    for m in matches:
        if m.source == "group":
            found[m.entry.dataset.name].add(m.entry.name_core)
    return [m for m in matches if m.source != "group" or len(found[m.entry.dataset.name]) >= 2]


def _demote_synonym_only(matches: list[_Match]) -> list[_Match]:
    # When some dataset names the structure exactly, a label that only matches through a
    # curated synonym is a looser fit (WORD "intestine" vs "small bowel"): one tier down.
    if not any(m.source in ("name", "part", "group") and m.score >= TIERS[0] for m in matches):
        return matches
    out = []
    for m in matches:
        if m.source == "synonym" and m.score >= TIERS[0]:
            m = _Match(m.entry, SCORE_SPECIFIC + 0.05, "synonym only, another dataset names it", m.source, m.values)
        out.append(m)
    return out


def _class_noun_alone(pt: grammar.ParsedTarget) -> bool:
    """Whether a target is a class noun written alone ("the glands"; not "chest cavity")."""
    written = {grammar.singular(w) for w in pt.words} - grammar.STOPWORDS
    core = frozenset(pt.concept.core)
    return bool(core) and core <= grammar.CLASS_NOUNS and written <= grammar.CLASS_NOUNS


def _soft_equal(a: frozenset[str], b: frozenset[str]) -> bool:
    # Equal once every soft lesion word counts as one ("liver lesion" == "liver tumor").
    if not (a & grammar.SOFT_LESION and b & grammar.SOFT_LESION):
        return False
    return (a - grammar.SOFT_LESION) == (b - grammar.SOFT_LESION)


def _soft_subset(a: frozenset[str], b: frozenset[str]) -> bool:
    if not (a & grammar.SOFT_LESION and b & grammar.SOFT_LESION):
        return False
    return (a - grammar.SOFT_LESION) < (b - grammar.SOFT_LESION)


_DEFAULT: dict[int, Router] = {}
_DEFAULT_LOCK = threading.Lock()


def plan(
    text: str,
    modality: str | None = None,
    *,
    collection: str | None = None,
    registry: Registry | None = None,
    installed_only: bool = False,
) -> Plan:
    """Plan ``text`` with a process-wide :class:`Router` (one per registry).

    Parameters
    ----------
    text
        The request.
    modality
        Study modality from the DICOM headers; overrides the text.
    collection
        Registry collection to route within.
    registry
        Registry to use (default: :func:`load_registry`).
    installed_only
        Consider only datasets with an installed model.

    Returns
    -------
    Plan
        See :class:`Plan`.
    """
    reg = registry if registry is not None else load_registry()
    with _DEFAULT_LOCK:
        router = _DEFAULT.get(id(reg))
        if router is None or router.registry is not reg:
            router = _DEFAULT[id(reg)] = Router(reg)
    return router.plan(text, modality, collection=collection, installed_only=installed_only)
