"""The held-out routing set stays frozen, large enough, and valid against the registry.

The set (``tests/data/heldout/requests.jsonl``) measures routing on requests
the rules were not written from; editing it to fit the router would make that
measure worthless, so its bytes are pinned here and in its README.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medsegagent.models.registry import load_registry

HELDOUT = Path(__file__).parent / "data" / "heldout"
REQUESTS = HELDOUT / "requests.jsonl"

#: SHA-256 of requests.jsonl as frozen (also stated in README.md). Never update it to fit the router.
FROZEN_SHA256 = "65d6446d92b606ed764c4086ede982ca1326d33c018d24a49f3f5c1697294b53"

MIN_REQUESTS = 400
MIN_NEGATIVE_SHARE = 0.15


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [json.loads(line) for line in REQUESTS.read_text(encoding="utf-8").splitlines()]


def test_file_is_frozen() -> None:
    digest = hashlib.sha256(REQUESTS.read_bytes()).hexdigest()
    assert digest == FROZEN_SHA256, "tests/data/heldout/requests.jsonl changed: the held-out set is frozen (README.md)"
    assert FROZEN_SHA256 in (HELDOUT / "README.md").read_text(encoding="utf-8")


def test_size_and_negative_share(records: list[dict]) -> None:
    negatives = sum(1 for r in records if not r["expected_datasets"])
    assert len(records) >= MIN_REQUESTS
    assert negatives / len(records) >= MIN_NEGATIVE_SHARE


def test_records_are_well_formed(records: list[dict]) -> None:
    for r in records:
        assert set(r) <= {"query", "expected_datasets", "modality", "category", "source"}, r
        assert isinstance(r["query"], str) and r["category"] and r["source"], r
        # a negative category is exactly a request that expects nothing
        assert r["category"].startswith("negative") == (not r["expected_datasets"]), r


def test_expected_datasets_and_values_exist_in_registry(records: list[dict]) -> None:
    registry = load_registry()
    values = {d.name: {v for label in d.labels.values() for v in label.values} for d in registry}
    for r in records:
        modality = r.get("modality")
        for name, wanted in r["expected_datasets"].items():
            assert name in values, f"{r['query']!r}: unknown dataset {name}"
            missing = set(wanted) - values[name]
            assert not missing, f"{r['query']!r}: {name} has no label value(s) {missing}"
            assert wanted == sorted(set(wanted)), r
            if modality is not None:
                assert registry[name].accepts(modality), f"{r['query']!r}: {name} does not accept {modality}"
