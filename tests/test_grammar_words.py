"""The grammar's word classes (models/grammar_words.yaml): validated data, not code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from medsegagent.models import grammar_words, parse
from medsegagent.models.grammar_words import DEFAULT_PATH, GrammarWordsError, load_grammar_words
from medsegagent.models.lexicon import load_lexicon

PARSE_SOURCE = Path(parse.__file__)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "grammar_words.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture()
def shipped() -> dict:
    return yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))


def test_the_grammar_uses_the_shipped_word_classes():
    words = load_grammar_words()
    assert parse.WORDS is words
    assert words.all_stopwords <= parse.STOPWORDS and "please" in parse.STOPWORDS  # with their singulars
    assert parse.REGION_WORDS["tap"] == ("thorax", "abdomen", "pelvis")
    assert words.side_of["lt"] == "left" and words.side_of["both"] == "bilateral"
    assert words.segment_levels["lumbosacral"] == ("L1", "L2", "L3", "L4", "L5", "S1")
    assert words.tg263.qualifiers["Ant"] == "anterior"


def test_no_stop_word_is_a_name_of_anatomy():
    # A stop word is dropped before a target is read: one that names a structure would hide it.
    lexicon = load_lexicon()
    names = {t for c in lexicon.concepts.values() for t in (*c.all_terms, c.name)}
    assert not sorted(load_grammar_words().all_stopwords & names)


def test_parse_holds_rules_not_word_lists():
    # Issue #14: parse.py keeps structure.  The only literal tables left are the number
    # system (ordinal and cardinal words, Roman numerals) and the FDI tooth positions.
    allowed = {"_ORDINALS", "_CARDINALS", "_ROMAN", "_FDI_POSITIONS"}
    tables = []
    for node in ast.walk(ast.parse(PARSE_SOURCE.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = target.id if isinstance(target, ast.Name) else "?"
            for literal in ast.walk(node.value) if node.value is not None else ():
                if isinstance(literal, ast.Set | ast.List | ast.Tuple | ast.Dict):
                    items = literal.keys if isinstance(literal, ast.Dict) else literal.elts
                    words = [i for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
                    if len(words) >= 5 and name not in allowed:
                        tables.append(f"{name} (line {node.lineno})")
    assert not tables, tables


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d["stopwords"]["request"].append(True), "stopwords.request"),  # an unquoted YAML `on`
        (lambda d: d["regions"].update({"flank": ["abdomen", "flank"]}), "unknown region 'flank'"),
        (lambda d: d["spine_segments"].update({"backwards": ["L5", "T1"]}), "L5 comes after T1"),
        (lambda d: d["spine_segments"].update({"tail": ["S1", "Co1"]}), "unknown vertebral level 'Co1'"),
        (lambda d: d.update({"synonyms": {"liver": ["hepar"]}}), "synonyms"),
        (lambda d: d["lesion_words"].append("Tumour"), "lesion_words"),
        (lambda d: d["rib_classes"].update({"thirteenth": [13]}), "rib numbers 1-12"),
        (lambda d: d["tg263"]["qualifiers"].update({"sup": "superior"}), "tg263.qualifiers"),
    ],
)
def test_a_malformed_file_is_refused_with_its_place(tmp_path, shipped, edit, problem):
    edit(shipped)
    with pytest.raises(GrammarWordsError) as err:
        load_grammar_words(_write(tmp_path, shipped))
    assert problem in str(err.value) and str(tmp_path) in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path, shipped):
    del shipped["class_nouns"]
    shipped["regions"]["flank"] = ["flank"]
    with pytest.raises(GrammarWordsError, match=r"2 problem\(s\)") as err:
        load_grammar_words(_write(tmp_path, shipped))
    assert "class_nouns: Field required" in str(err.value)


def test_the_loaded_classes_are_frozen():
    words = load_grammar_words()
    with pytest.raises(Exception, match="frozen"):
        words.stopwords = {}  # type: ignore[misc]
    assert isinstance(words.lesion_words, frozenset)


_PLAN = """
import json, sys
from pathlib import Path
from medsegagent.models import grammar_words
grammar_words.DEFAULT_PATH = Path(sys.argv[1])   # as if shipped so
from medsegagent.models.registry import load_registry
from medsegagent.models.routing import Router
plan = Router(load_registry(), use_encoder=False).plan("spleen, cheers", "CT", collection="medsegagent-23")
print(json.dumps({"selection": plan.selection, "unmatched": [u.target for u in plan.unmatched]}))
"""


def test_the_documented_worked_example_adds_a_stop_word_without_code(tmp_path, shipped):
    # docs/routing.md, "How to add a word the grammar ignores": one word in grammar_words.yaml.
    def plan(path: Path) -> dict:
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(_PLAN), str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    before = plan(DEFAULT_PATH)
    assert before["unmatched"] == ["cheers"]  # read as a structure nobody knows
    shipped["stopwords"]["request"].append("cheers")
    after = plan(_write(tmp_path, shipped))
    assert after == {"selection": before["selection"], "unmatched": []}
    assert set(after["selection"]) >= {"TotalSegmentator_v2", "WORD"}


def test_the_default_path_is_packaged():
    # A wheel must carry both data files (pyproject package-data), or an installed node cannot route.
    text = (Path(grammar_words.__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"grammar_words.yaml"' in text and '"lexicon.yaml"' in text


@pytest.mark.parametrize(
    "word",
    ["size", "lift", "value", "metal", "crohn", "copd", "months", "last", "axillary", "abductor", "intrahepatic"],
)
def test_a_real_word_is_no_typo_of_a_structure(word):
    # Everyday, report and time words one edit from a structure's or side's name ("size" -> side,
    # "months" -> mouth, "axillary" -> maxillary) are known, so the spelling check leaves them.
    assert parse.default_vocabulary().correct_spelling(word) == word


def test_a_duplicate_key_is_refused_not_kept_last(tmp_path):
    # PyYAML keeps the last of two equal keys; a hand-edited word list must not lose an entry so.
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    path = tmp_path / "words.yaml"
    path.write_text(text + "\nclass_nouns: [artery]\n", encoding="utf-8")
    with pytest.raises(GrammarWordsError, match="duplicate key 'class_nouns'"):
        load_grammar_words(path)
