"""The concept lexicon: the router's vocabulary as data (``models/lexicon.yaml``).

One entry per concept, keyed by its SNOMED CT identifier (the codes the registry
gives its labels as ``type``) or by ``x-<slug>`` for a concept named here without
a SNOMED CT code.  Each concept holds its preferred name, the grammar's canonical
tokens and every other way to write it (synonyms, abbreviations, adjectives,
plurals, Latin, lay terms, eponyms), plus the body regions it lies in.

The file is validated when loaded; :func:`load_lexicon` caches the result, and
the records are frozen, so one lexicon is shared safely by every router.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from medsegagent.models.yaml_strict import load_unique

#: The lexicon shipped with the package.
DEFAULT_PATH = Path(__file__).with_name("lexicon.yaml")

#: Term lists of a concept, in the order they are documented.
TERM_FIELDS: tuple[str, ...] = ("synonyms", "abbreviations", "adjectives", "plurals", "latin", "lay", "eponyms")

#: Body regions a concept or qualifier may name (those of the registry's datasets).
REGIONS = frozenset(
    {
        "head",
        "neck",
        "thorax",
        "heart",
        "breast",
        "abdomen",
        "pelvis",
        "spine",
        "upper_limb",
        "lower_limb",
        "whole_body",
    }
)

_SECTIONS = frozenset({"version", "concepts", "forms", "qualifiers", "filler", "groups", "wholes"})
_CONCEPT_KEYS = frozenset({"name", "canonical", "regions", "gloss", "descriptions", *TERM_FIELDS})
_TERM = re.compile(r"^[a-z0-9]+(?: [a-z0-9]+)*$")
_LOCAL_KEY = re.compile(r"^x-[a-z0-9]+(?:-[a-z0-9]+)*$")


class LexiconError(ValueError):
    """The lexicon file is malformed; the message names every problem and where."""


@dataclass(frozen=True)
class Concept:
    """One concept of the lexicon.

    Attributes
    ----------
    key : str
        SNOMED CT concept id, or ``x-<slug>`` for a concept without an asserted code.
    name : str
        Preferred name.
    canonical : str
        The grammar's canonical tokens, space separated.
    terms : dict of str to tuple of str
        Term lists by kind (:data:`TERM_FIELDS`).
    regions : tuple of str
        Body regions the structure lies in.
    gloss : str or None
        A plain-language definition ("a long gland lying behind the stomach that makes
        insulin"): what the sentence encoder compares a request that describes the
        structure instead of naming it with.
    descriptions : tuple of str
        More ways a patient or a referrer describes the structure, by where it is, what
        it does or what it looks like ("the organ under the left ribs that swells with
        glandular fever"); compared like the definition.
    """

    key: str
    name: str
    canonical: str
    terms: Mapping[str, tuple[str, ...]]
    regions: tuple[str, ...] = ()
    gloss: str | None = None
    descriptions: tuple[str, ...] = ()

    @property
    def described(self) -> tuple[str, ...]:
        """The definition, then the other descriptions: what a description is compared with."""
        return ((self.gloss,) if self.gloss else ()) + self.descriptions

    @property
    def sctid(self) -> str | None:
        """The SNOMED CT identifier, or None for a local concept."""
        return None if self.key.startswith("x-") else self.key

    @property
    def all_terms(self) -> tuple[str, ...]:
        """Every way to write the concept, preferred name first, without repeats."""
        words = [self.name, *(t for kind in TERM_FIELDS for t in self.terms.get(kind, ()))]
        return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class Lexicon:
    """The validated lexicon file.

    Attributes
    ----------
    concepts : mapping of str to Concept
        By key (SNOMED CT id or ``x-`` slug).
    forms : mapping of str to str
        Word forms that are no concept of their own -> canonical words.
    qualifiers : mapping of str to tuple of str
        Words that only qualify a concept -> regions they place it in.
    filler : frozenset of str
        Words dropped from a target.
    groups : mapping of str to tuple of str
        A group's phrase -> its members' phrases (not yet canonicalised).
    wholes : frozenset of str
        Groups that are an organ made of its members (the heart of its chambers, a lung of
        its lobes): in a list of structures the organ is wanted whole, and its parts stand in
        for it only where no dataset has the whole organ.
    digest : str
        SHA-256 of the file (cache keys).
    path : Path
        Where it was read from.
    """

    concepts: Mapping[str, Concept]
    forms: Mapping[str, str]
    qualifiers: Mapping[str, tuple[str, ...]]
    filler: frozenset[str]
    groups: Mapping[str, tuple[str, ...]]
    wholes: frozenset[str]
    digest: str
    path: Path

    def concept(self, code: str) -> Concept | None:
        """The concept of a SNOMED CT code (e.g. a registry label's ``type.value``)."""
        return self.concepts.get(code)

    def term_map(self) -> dict[str, str]:
        """Every term and form -> the canonical words it stands for."""
        out: dict[str, str] = {}
        for concept in self.concepts.values():
            for term in concept.all_terms:
                out.setdefault(term, concept.canonical)
        out.update(self.forms)
        return out


def verhoeff_valid(number: str) -> bool:
    """Whether a SNOMED CT identifier's last digit is its Verhoeff check digit."""
    d = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
         (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
         (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
         (9, 8, 7, 6, 5, 4, 3, 2, 1, 0))  # fmt: skip
    p = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
         (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
         (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8))  # fmt: skip
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


class _Checker:
    """Collects every problem of the file before raising one error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []

    def err(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def terms(self, where: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.err(where, f"expected a list of lower-case terms, got {value!r}")
            return ()
        bad = [v for v in value if not isinstance(v, str) or not _TERM.match(v)]
        if bad:
            self.err(where, f"terms must be lower-case words separated by single spaces: {bad!r}")
        repeated = sorted({v for v in value if isinstance(v, str) and value.count(v) > 1})
        if repeated:
            self.err(where, f"terms listed twice: {repeated!r}")
        return tuple(v for v in value if v not in bad)

    def regions(self, where: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.err(where, f"expected a list of regions, got {value!r}")
            return ()
        out = tuple(str(v) for v in value)
        unknown = sorted(set(out) - REGIONS)
        if unknown:
            self.err(where, f"unknown regions {unknown} (known: {', '.join(sorted(REGIONS))})")
        return out

    def concept(self, key: Any, entry: Any) -> Concept | None:
        where = f"concepts.{key}"
        key = str(key)
        if key.isdigit():
            if not (6 <= len(key) <= 18 and verhoeff_valid(key)):
                self.err(where, "not a SNOMED CT identifier (length 6-18, Verhoeff check digit)")
        elif not _LOCAL_KEY.match(key):
            self.err(where, "key must be a SNOMED CT id or 'x-<slug>'")
        if not isinstance(entry, dict):
            self.err(where, "expected a mapping")
            return None
        for unknown in sorted(set(entry) - _CONCEPT_KEYS):
            self.err(f"{where}.{unknown}", f"unknown field (known: {', '.join(sorted(_CONCEPT_KEYS))})")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            self.err(f"{where}.name", "a preferred name is required")
            return None
        canonical = entry.get("canonical", " ".join(re.findall(r"[a-z0-9]+", name.lower())))
        if not isinstance(canonical, str) or not _TERM.match(canonical):
            self.err(f"{where}.canonical", f"lower-case words expected, got {canonical!r}")
            canonical = name
        terms = {f: self.terms(f"{where}.{f}", entry[f]) for f in TERM_FIELDS if entry.get(f) is not None}
        regions = self.regions(f"{where}.regions", entry.get("regions", []))
        gloss = entry.get("gloss")
        if gloss is not None and (not isinstance(gloss, str) or len(gloss.split()) < 4):
            self.err(f"{where}.gloss", f"a definition of four words or more expected, got {gloss!r}")
            gloss = None
        descriptions = self.descriptions(f"{where}.descriptions", entry.get("descriptions", []))
        return Concept(key, name, canonical, MappingProxyType(terms), regions, gloss, descriptions)

    def descriptions(self, where: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(d, str) and len(d.split()) >= 4 for d in value):
            self.err(where, f"a list of descriptions of four words or more expected, got {value!r}")
            return ()
        return tuple(value)


def parse_lexicon(data: Any, path: Path, digest: str = "") -> Lexicon:
    """Validate the parsed YAML of a lexicon file.

    Parameters
    ----------
    data
        ``yaml.safe_load`` of the file.
    path
        Its path, for messages.
    digest
        Its SHA-256.

    Returns
    -------
    Lexicon

    Raises
    ------
    LexiconError
        Listing every problem: unknown sections or fields, malformed terms, a
        key that is no SNOMED CT id, a term given two different meanings.
    """
    check = _Checker(path)
    if not isinstance(data, dict):
        raise LexiconError(f"{path}: expected a mapping with a 'concepts' section")
    for unknown in sorted(set(data) - _SECTIONS):
        check.err(str(unknown), f"unknown section (known: {', '.join(sorted(_SECTIONS))})")
    if data.get("version") != 1:
        check.err("version", f"unsupported lexicon version {data.get('version')!r} (expected 1)")
    concepts: dict[str, Concept] = {}
    for key, entry in (data.get("concepts") or {}).items():
        concept = check.concept(key, entry)
        if concept is not None:
            concepts[concept.key] = concept
    forms = data.get("forms") or {}
    if not isinstance(forms, dict) or not all(isinstance(v, str) for v in forms.values()):
        check.err("forms", "expected a mapping of word form -> canonical words")
        forms = {}
    qualifiers = {str(w): check.regions(f"qualifiers.{w}", r) for w, r in (data.get("qualifiers") or {}).items()}
    groups = {str(g): check.terms(f"groups.{g}", m) for g, m in (data.get("groups") or {}).items()}
    filler = check.terms("filler", data.get("filler") or [])
    wholes = check.terms("wholes", data.get("wholes") or [])
    for whole in wholes:
        if whole not in groups:
            check.err(f"wholes.{whole}", "not a group: an organ made of parts must list them under groups")
    _check_ambiguous(check, concepts, forms)
    if check.errors:
        raise LexiconError(f"{path}: {len(check.errors)} problem(s):\n  " + "\n  ".join(check.errors))
    return Lexicon(
        MappingProxyType(concepts),
        MappingProxyType(dict(forms)),
        MappingProxyType(qualifiers),
        frozenset(filler),
        MappingProxyType(groups),
        frozenset(wholes),
        digest,
        path,
    )


def _check_ambiguous(check: _Checker, concepts: dict[str, Concept], forms: Mapping[str, str]) -> None:
    # A term that reads as two different concepts would make routing depend on file order.
    meaning: dict[str, tuple[str, str]] = {}
    for concept in concepts.values():
        for term in concept.all_terms:
            if term == concept.name and term != concept.canonical and term in meaning:
                continue  # a preferred name may repeat another concept's canonical reading
            seen = meaning.setdefault(term, (concept.key, concept.canonical))
            if seen[1] != concept.canonical:
                check.err(f"concepts.{concept.key}", f"term {term!r} already means {seen[1]!r} ({seen[0]})")
    for form, canonical in forms.items():
        if form in meaning and meaning[form][1] != canonical:
            check.err(f"forms.{form}", f"already a term of {meaning[form][0]}")


@lru_cache(maxsize=4)
def load_lexicon(path: Path | None = None) -> Lexicon:
    """Read and validate a lexicon file (cached per path).

    Parameters
    ----------
    path
        Lexicon YAML (default: the packaged ``models/lexicon.yaml``).

    Returns
    -------
    Lexicon

    Raises
    ------
    LexiconError
        When the file is malformed.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    raw = path.read_bytes()
    try:
        data = load_unique(raw)
    except yaml.YAMLError as exc:
        raise LexiconError(f"{path}: {exc}") from None
    return parse_lexicon(data, path, hashlib.sha256(raw).hexdigest())
