"""Routing benchmark scores: the negatives measure and per-category aggregates.

A stub router stands in for the real one: these tests are about the scoring,
so they must not depend on what the router answers today.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medsegagent.models.bench_routing import Half, run_bench
from medsegagent.models.registry import load_registry


@dataclass
class _Plan:
    selection: dict[str, list[int]]
    unmatched: list[str] = field(default_factory=list)


class _Router:
    """Answers from a fixed table, keyed by query text."""

    def __init__(self, answers: dict[str, dict[str, list[int]]]) -> None:
        self.answers = answers

    def plan(self, query: str, modality: str | None = None, collection: str | None = None) -> _Plan:
        return _Plan(self.answers.get(query, {}))


CASES = [
    {"query": "liver", "expected_datasets": {"LiTS": [1]}, "category": "synonym"},
    {"query": "spleen", "expected_datasets": {"WORD": [2]}, "category": "synonym"},
    {"query": "meniscus", "expected_datasets": {}, "category": "negative_structure"},
    {"query": "retina", "expected_datasets": {}, "category": "negative_structure"},
    {"query": "echo LV", "expected_datasets": {}, "modality": "US", "category": "negative_modality"},
]
ANSWERS = {
    "liver": {"LiTS": [1]},
    "spleen": {"WORD": [2], "AMOS22_Task2": [1]},  # one extra dataset: hit 0.5, not strict
    "meniscus": {"TotalSegmentator_MRI": [33]},  # a near neighbour offered for an uncovered structure
}


@pytest.fixture
def bench_file(tmp_path: Path) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CASES), encoding="utf-8")
    return path


def test_negatives_correct_is_the_share_of_empty_predictions(bench_file: Path) -> None:
    result = run_bench(bench_file, collection=None, registry=load_registry(), router=_Router(ANSWERS))
    assert result.negatives == 3
    assert result.negatives_correct == pytest.approx(2 / 3)
    assert result.strict == pytest.approx(3 / 5)  # liver, retina, echo LV
    assert result.hit_rate == pytest.approx((1 + 0.5 + 0 + 1 + 1) / 5)
    assert result.categories["should select nothing"] == 1


def test_scores_per_category_are_aggregates(bench_file: Path) -> None:
    result = run_bench(bench_file, collection=None, registry=load_registry(), router=_Router(ANSWERS))
    data = result.to_json()
    assert data["negatives_correct"] == pytest.approx(0.6667)
    assert data["by_category"] == {
        "negative_modality": {"n": 1, "strict": 1.0, "hit_rate": 1.0},
        "negative_structure": {"n": 2, "strict": 0.5, "hit_rate": 0.5},
        "synonym": {"n": 2, "strict": 0.5, "hit_rate": 0.75},
    }
    assert "failures" not in data  # individual queries only on request
    assert "negatives correct (nothing selected)  0.6667 (of 3)" in result.table()


def test_no_negative_queries_gives_no_share(tmp_path: Path) -> None:
    path = tmp_path / "positives.jsonl"
    path.write_text(json.dumps(CASES[0]) + "\n", encoding="utf-8")
    result = run_bench(path, collection=None, registry=load_registry(), router=_Router(ANSWERS))
    assert result.negatives == 0 and result.negatives_correct is None
    assert result.to_json()["negatives_correct"] is None


def test_a_half_scores_only_its_rows(bench_file: Path) -> None:
    # even rows 0, 2, 4: liver (right), meniscus (a near neighbour), echo LV (right)
    even = run_bench(bench_file, collection=None, registry=load_registry(), router=_Router(ANSWERS), half=Half.EVEN)
    odd = run_bench(bench_file, collection=None, registry=load_registry(), router=_Router(ANSWERS), half=Half.ODD)
    assert (even.n, odd.n) == (3, 2)
    assert even.strict == pytest.approx(2 / 3) and odd.strict == pytest.approx(1 / 2)  # odd: spleen wrong, retina right
    assert even.negatives == 2 and odd.negatives == 1
