"""The request grammar's word classes as data (``models/grammar_words.yaml``).

The concept lexicon (:mod:`medsegagent.models.lexicon`) holds every way to name a
structure.  This module holds the other words the grammar's rules are written over:
the small, closed classes such as words that say nothing, sides, lesion words,
body-region words and plural forms.  The rules stay in :mod:`medsegagent.models.parse`;
the words they apply to are data, so that a site can add one without touching code.

The file is validated by a pydantic schema when loaded (unknown sections, a word that
is not lower case, a region the registry does not know, a spine segment whose range
runs backwards are all errors naming their place), and the result is frozen.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

from medsegagent.models.lexicon import REGIONS
from medsegagent.models.yaml_strict import load_unique

#: The word classes shipped with the package.
DEFAULT_PATH = Path(__file__).with_name("grammar_words.yaml")

#: Vertebral levels in cranio-caudal order (ranges such as "T10 through L2" walk this list).
SPINE_LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    *(f"S{i}" for i in range(1, 6)),
)

#: A word or phrase of the grammar: lower-case words separated by single spaces.
Word = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z0-9']+(?: [a-z0-9']+)*$")]


def _known_region(region: str) -> str:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r} (known: {', '.join(sorted(REGIONS))})")
    return region


def _known_level(level: str) -> str:
    if level not in SPINE_LEVELS:
        raise ValueError(f"unknown vertebral level {level!r} (C1-C7, T1-T12, L1-L5, S1-S5)")
    return level


#: A section's own name for a group of words ("imaging_it").
GroupName = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z][a-z0-9_]*$")]
Region = Annotated[str, StringConstraints(strict=True), AfterValidator(_known_region)]
Level = Annotated[str, StringConstraints(strict=True), AfterValidator(_known_level)]
Qualifier = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Z][a-z]*$")]
Side = Literal["left", "right", "bilateral"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Laterality(_Frozen):
    """The words for each side (``l``/``r`` count only when they stand alone)."""

    left: frozenset[Word]
    right: frozenset[Word]
    bilateral: frozenset[Word]


class TG263(_Frozen):
    """AAPM TG-263 class prefixes (``A_``, ``Musc_``) and qualifiers (``_L_Sup``)."""

    classes: dict[Word, Word]
    qualifiers: dict[Qualifier, Word]


class DefaultWhole(_Frozen):
    """The whole a part noun belongs to unless the request names another (``unless``)."""

    whole: Word
    unless: frozenset[Word]


class ContextReading(_Frozen):
    """What a bare word that names several structures reads as in a request with a context word."""

    context: frozenset[Word]
    reads: Word
    #: Words of another reading's context that keep the word as it is ("cardiac" for "ventricles").
    unless: frozenset[Word] = frozenset()
    #: Words that, written just before the word, make it no bare word ("3rd ventricle", "left ventricle").
    not_after: frozenset[Word] = frozenset()


class GrammarWords(_Frozen):
    """The grammar's word classes, validated.

    Each field is one section of ``grammar_words.yaml``; the file's comments say what
    each class does in the grammar.  Use :func:`load_grammar_words`, not the constructor.
    """

    version: Literal[1]
    stopwords: dict[GroupName, frozenset[Word]]
    structure_words: frozenset[Word]
    composite_words: frozenset[Word]
    joining_words: frozenset[Word]
    laterality: Laterality
    eye_sides: dict[Word, Side]
    eye_words: frozenset[Word]
    regions: dict[Word, tuple[Region, ...]]
    structure_after_region: frozenset[Word]
    head_and_neck_disease: frozenset[Word]
    lesion_words: frozenset[Word]
    soft_lesion_words: frozenset[Word]
    lesion_organs: frozenset[Word]
    metastasis_words: frozenset[Word]
    class_nouns: frozenset[Word]
    kind_nouns: frozenset[Word]
    image_guidance: frozenset[Word]
    clause_words: frozenset[Word]
    story_words: frozenset[Word]
    generic_nouns: frozenset[Word]
    generic_modifiers: frozenset[Word]
    size_words: frozenset[Word]
    inner_parts: frozenset[Word]
    skeletal_parts: frozenset[Word]
    series_adjectives: frozenset[Word]
    positions: frozenset[Word]
    totality: frozenset[Word]
    order_words: frozenset[Word]
    command_verbs: frozenset[Word]
    determiners: frozenset[Word]
    locatives: tuple[Word, ...]
    prepositions: frozenset[Word]
    level_context: frozenset[Word]
    spine_segments: dict[Word, tuple[Level, Level]]
    lay_spine_parts: dict[str, Word]
    rib_classes: dict[Word, tuple[int, ...]]
    irregular_plurals: dict[Word, Word]
    not_plural: frozenset[Word]
    tg263: TG263
    whole_before_part: dict[Word, frozenset[Word]]
    enlargement_forms: dict[Word, Word]
    organ_part_words: frozenset[Word]
    procedure_words: frozenset[Word]
    default_organ: dict[Word, Word]
    scale_organs: dict[Word, Word]
    opposites: dict[Word, Word]
    acronym_fillers: frozenset[Word]
    purpose_verbs: frozenset[Word]
    grading_scales: frozenset[Word]
    eponym_diseases: frozenset[Word]
    liver_divisions: dict[str, tuple[int, ...]]
    motion_verbs: frozenset[Word]
    radiotherapy_context: frozenset[Word]
    other_tasks: frozenset[Word]
    segmentation_words: frozenset[Word]
    withdrawal: frozenset[Word]
    result_tasks: frozenset[Word]
    consent_words: frozenset[Word]
    questions: frozenset[Word]
    requesters: frozenset[Word]
    pronouns: frozenset[Word]
    default_whole: dict[Word, DefaultWhole]
    context_readings: dict[Word, ContextReading]

    @model_validator(mode="after")
    def _consistent(self) -> GrammarWords:
        if not self.soft_lesion_words <= self.lesion_words:
            raise ValueError("soft_lesion_words must be lesion_words too")
        for name, (first, last) in self.spine_segments.items():
            if SPINE_LEVELS.index(first) > SPINE_LEVELS.index(last):
                raise ValueError(f"spine_segments.{name}: {first} comes after {last}")
        for part, segment in self.lay_spine_parts.items():
            if segment not in self.spine_segments:
                raise ValueError(f"lay_spine_parts.{part}: {segment} is no spine segment")
        for name, segments in self.liver_divisions.items():
            if not segments or not all(1 <= n <= 8 for n in segments):
                raise ValueError(f"liver_divisions.{name}: Couinaud segments 1-8 expected, got {list(segments)}")
        for name, ribs in self.rib_classes.items():
            if not ribs or not all(1 <= r <= 12 for r in ribs):
                raise ValueError(f"rib_classes.{name}: rib numbers 1-12 expected, got {list(ribs)}")
        return self

    @cached_property
    def all_stopwords(self) -> frozenset[str]:
        """Every stop word, of every group."""
        return frozenset().union(*self.stopwords.values())

    @cached_property
    def side_of(self) -> dict[str, str]:
        """Side word -> ``left``, ``right`` or ``bilateral``."""
        sides = self.laterality
        return {w: side for side in ("left", "right", "bilateral") for w in getattr(sides, side)}

    @cached_property
    def segment_levels(self) -> dict[str, tuple[str, ...]]:
        """Spine segment word -> its vertebral levels, cranio-caudal."""
        index = SPINE_LEVELS.index
        return {w: SPINE_LEVELS[index(a) : index(b) + 1] for w, (a, b) in self.spine_segments.items()}


class GrammarWordsError(ValueError):
    """The word-class file is malformed; the message names every problem and where."""


@lru_cache(maxsize=4)
def load_grammar_words(path: Path | None = None) -> GrammarWords:
    """Read and validate a word-class file (cached per path).

    Parameters
    ----------
    path
        Word-class YAML (default: the packaged ``models/grammar_words.yaml``).

    Returns
    -------
    GrammarWords

    Raises
    ------
    GrammarWordsError
        When the file is malformed: every problem, with its section and entry.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        data = load_unique(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise GrammarWordsError(f"{path}: {exc}") from None
    try:
        return GrammarWords.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in exc.errors()]
        raise GrammarWordsError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)) from None
