"""The blind routing development sets are well formed and derived from the registry alone.

``tests/data/routing_dev_blind/`` and ``routing_dev_blind2/`` to ``routing_dev_blind11/``
hold requests written without sight of the routing rules (the second to eleventh
also without sight of the earlier sets' requests; README.md in each).  Their expectations come
from one builder, ``routing_dev_blind/build.py``, run on each folder with that folder's
``concepts.py`` (registry concepts, never the router); these tests keep each committed
``requests.jsonl`` equal to that derivation and valid against the registry.  No
routing score is asserted here (``tests/test_routing.py`` holds the floors).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from medsegagent.models.registry import Registry, load_registry

DATA = Path(__file__).parent / "data"
MIN_NEGATIVE_SHARE = 0.20
FIELDS = {"query", "expected_datasets", "modality", "category", "source"}


@dataclass(frozen=True)
class BlindSet:
    folder: str
    min_requests: int

    @property
    def here(self) -> Path:
        return DATA / self.folder

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.here / "requests.jsonl").read_text(encoding="utf-8").splitlines()]

    def concepts(self) -> ModuleType:
        return _load(f"{self.folder}_concepts", self.here / "concepts.py")


def _load(name: str, path: Path) -> ModuleType:
    # by path: tests/data is not a package
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The one builder of every blind set, run on each set's folder.
BUILD = _load("routing_dev_blind_build", DATA / "routing_dev_blind" / "build.py")


SETS = [
    BlindSet("routing_dev_blind", 350),
    BlindSet("routing_dev_blind2", 300),
    BlindSet("routing_dev_blind3", 300),
    BlindSet("routing_dev_blind4", 300),
    BlindSet("routing_dev_blind5", 300),
    BlindSet("routing_dev_blind6", 400),
    BlindSet("routing_dev_blind7", 400),
    BlindSet("routing_dev_blind8", 400),
    BlindSet("routing_dev_blind9", 400),
    BlindSet("routing_dev_blind10", 400),
    BlindSet("routing_dev_blind11", 400),
]
each_set = pytest.mark.parametrize("blind", SETS, ids=[s.folder for s in SETS])


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@each_set
def test_size_and_negative_share(blind: BlindSet) -> None:
    records = blind.records()
    negatives = sum(1 for r in records if not r["expected_datasets"])
    assert len(records) >= blind.min_requests
    assert negatives / len(records) >= MIN_NEGATIVE_SHARE


@each_set
def test_records_are_well_formed(blind: BlindSet) -> None:
    records = blind.records()
    for r in records:
        assert set(r) <= FIELDS and FIELDS - {"modality"} <= set(r), r
        assert r["query"].strip() and r["category"] and r["source"], r
        # a negative category is exactly a request that expects nothing
        assert r["category"].startswith("negative") == (not r["expected_datasets"]), r
    keys = [(r["query"].lower(), r.get("modality")) for r in records]
    assert len(set(keys)) == len(keys), "a (query, modality) pair occurs twice"


@each_set
def test_datasets_and_label_values_exist_in_registry(blind: BlindSet, registry: Registry) -> None:
    values = {d.name: {v for label in d.labels.values() for v in label.values} for d in registry}
    for r in blind.records():
        modality = r.get("modality")
        for name, wanted in r["expected_datasets"].items():
            assert name in values, f"{r['query']!r}: unknown dataset {name}"
            assert wanted and wanted == sorted(set(wanted)), r
            missing = set(wanted) - values[name]
            assert not missing, f"{r['query']!r}: {name} has no label value(s) {missing}"
            if modality is not None:
                assert registry[name].accepts(modality), f"{r['query']!r}: {name} does not accept {modality}"


@each_set
def test_every_named_concept_delivers_something(blind: BlindSet, registry: Registry) -> None:
    # a concept that matches no label would silently shrink a positive row's expectation
    concepts = blind.concepts()
    for row in BUILD.rows(blind.here):
        _, names, modality = BUILD.parse_row(row, set(concepts.CONCEPTS))
        empty = [n for n in names if not concepts.expected(registry, [n], modality)]
        assert not empty, f"concept(s) {empty} select nothing on {modality}: {row}"


@each_set
def test_committed_file_is_the_build_output(blind: BlindSet, registry: Registry) -> None:
    built = BUILD.to_jsonl(BUILD.build(registry, blind.here))
    assert (blind.here / "requests.jsonl").read_text(encoding="utf-8") == built, (
        f"requests.jsonl differs from the builder's derivation: re-run build.py {blind.folder} after a registry "
        "change or a corrected row (README.md), never to follow the router"
    )


def test_build_rejects_an_unknown_concept() -> None:
    with pytest.raises(ValueError, match="unknown concept"):
        BUILD.parse_row("synonym | test | CT | no_such_concept | anything", {"liver"})
