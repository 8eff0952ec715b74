"""The second blind routing development set is well formed and derived from the registry alone.

``tests/data/routing_dev_blind2/`` holds requests written without sight of the
routing rules or of the earlier sets' requests (README.md there).  Its
expectations come from ``build.py`` (registry concepts, never the router);
these tests keep the committed ``requests.jsonl`` equal to that derivation and
valid against the registry.  No routing score is asserted here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from medsegagent.models.registry import Registry, load_registry

HERE = Path(__file__).parent / "data" / "routing_dev_blind2"
REQUESTS = HERE / "requests.jsonl"

MIN_REQUESTS = 300
MIN_NEGATIVE_SHARE = 0.20
FIELDS = {"query", "expected_datasets", "modality", "category", "source"}


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build() -> ModuleType:
    return _load("routing_dev_blind2_build", HERE / "build.py")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in REQUESTS.read_text(encoding="utf-8").splitlines()]


def test_size_and_negative_share(records: list[dict[str, Any]]) -> None:
    negatives = sum(1 for r in records if not r["expected_datasets"])
    assert len(records) >= MIN_REQUESTS
    assert negatives / len(records) >= MIN_NEGATIVE_SHARE


def test_records_are_well_formed(records: list[dict[str, Any]]) -> None:
    for r in records:
        assert set(r) <= FIELDS and FIELDS - {"modality"} <= set(r), r
        assert r["query"].strip() and r["category"] and r["source"], r
        # a negative category is exactly a request that expects nothing
        assert r["category"].startswith("negative") == (not r["expected_datasets"]), r
    keys = [(r["query"].lower(), r.get("modality")) for r in records]
    assert len(set(keys)) == len(keys), "a (query, modality) pair occurs twice"


def test_datasets_and_label_values_exist_in_registry(records: list[dict[str, Any]], registry: Registry) -> None:
    values = {d.name: {v for label in d.labels.values() for v in label.values} for d in registry}
    for r in records:
        modality = r.get("modality")
        for name, wanted in r["expected_datasets"].items():
            assert name in values, f"{r['query']!r}: unknown dataset {name}"
            assert wanted and wanted == sorted(set(wanted)), r
            missing = set(wanted) - values[name]
            assert not missing, f"{r['query']!r}: {name} has no label value(s) {missing}"
            if modality is not None:
                assert registry[name].accepts(modality), f"{r['query']!r}: {name} does not accept {modality}"


def test_every_named_concept_delivers_something(build: ModuleType, registry: Registry) -> None:
    # a concept that matches no label would silently shrink a positive row's expectation
    concepts = _load("routing_dev_blind2_concepts_check", HERE / "concepts.py")
    for row in build.rows():
        _, names, modality = build.parse_row(row, set(concepts.CONCEPTS))
        empty = [n for n in names if not concepts.expected(registry, [n], modality)]
        assert not empty, f"concept(s) {empty} select nothing on {modality}: {row}"


def test_committed_file_is_the_build_output(build: ModuleType, registry: Registry) -> None:
    text = build.to_jsonl(build.build(registry))
    assert REQUESTS.read_text(encoding="utf-8") == text, (
        "requests.jsonl differs from build.py's derivation: re-run build.py after a registry "
        "change or a corrected row (README.md), never to follow the router"
    )


def test_build_rejects_an_unknown_concept(build: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown concept"):
        build.parse_row("synonym | test | CT | no_such_concept | anything", {"liver"})
