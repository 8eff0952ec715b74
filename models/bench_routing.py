"""Routing benchmark: the MedSegAgent paper's model-selection metrics and latency.

Input lines are ``{"query": ..., "expected_datasets": {dataset: [values]}}``
with an optional ``"modality"`` (the study's modality, as DICOM headers would
give it).  Per query, over the union of expected and predicted datasets, a
dataset is *right* when the predicted label-value set equals the expected set
exactly:

* hit rate = mean over queries of (right datasets / union size),
* strict  = share of queries with every dataset right,
* soft    = share of queries with at least one dataset right.

A query expecting nothing and predicting nothing counts as fully right (hit
rate 1); the paper's file has no such query.  Such *negative* queries (no
dataset covers the structure, none accepts the modality, or there is no
anatomy) get their own measure:

* negatives correct = share of negative queries for which nothing is selected.

When the lines carry a ``"category"`` (the held-out set does), the result also
gives each category's size, strict and hit rate: aggregates only, so that a
frozen set can be read without reading its misses.  Latency is measured per
query after start-up (registry load, router build, encoder + embedding
warm-up), which is reported separately.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from medsegagent.models.registry import Registry, load_registry


def score_query(expected: dict[str, list[int]], predicted: dict[str, list[int]]) -> float:
    """Hit rate of one query (fraction of right datasets over the union).

    Parameters
    ----------
    expected, predicted
        Dataset -> label values (lists may hold nested lists; they are flattened).

    Returns
    -------
    float
        In [0, 1]; 1.0 when both are empty.
    """
    union = set(expected) | set(predicted)
    if not union:
        return 1.0
    right = sum(1 for name in expected if name in predicted and _flat(expected[name]) == _flat(predicted[name]))
    return right / len(union)


def _flat(values: Any) -> set[int]:
    out: set[int] = set()
    for v in values if isinstance(values, list | tuple) else [values]:
        if isinstance(v, list | tuple):
            out.update(int(x) for x in v)
        else:
            out.add(int(v))
    return out


@dataclass
class CategoryScore:
    """Aggregate scores of the queries of one ``category``."""

    n: int = 0
    strict: float = 0.0
    hit_rate: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"n": self.n, "strict": round(self.strict, 4), "hit_rate": round(self.hit_rate, 4)}


@dataclass
class BenchResult:
    """Scores and timings of one benchmark run."""

    file: str
    collection: str | None
    n: int = 0
    hit_rate: float = 0.0
    strict: float = 0.0
    soft: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    max_ms: float = 0.0
    startup_s: float = 0.0
    registry_s: float = 0.0
    negatives: int = 0
    negatives_correct: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    categories: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, CategoryScore] = field(default_factory=dict)

    def to_json(self, with_failures: bool = False) -> dict[str, Any]:
        """JSON form (failures only on request: they quote the queries)."""
        out = {
            "file": self.file,
            "collection": self.collection,
            "n": self.n,
            "hit_rate": round(self.hit_rate, 4),
            "strict": round(self.strict, 4),
            "soft": round(self.soft, 4),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "startup_s": round(self.startup_s, 3),
            "registry_s": round(self.registry_s, 3),
            "negatives": self.negatives,
            "negatives_correct": None if self.negatives_correct is None else round(self.negatives_correct, 4),
            "failure_categories": dict(self.categories),
        }
        if self.by_category:
            out["by_category"] = {k: v.to_json() for k, v in sorted(self.by_category.items())}
        if with_failures:
            out["failures"] = self.failures
        return out

    def table(self) -> str:
        """Human-readable table."""
        rows = [
            ("queries", f"{self.n}"),
            ("hit rate", f"{self.hit_rate:.4f}"),
            ("strict (all datasets right)", f"{self.strict:.4f}"),
            ("soft (any dataset right)", f"{self.soft:.4f}"),
            ("negatives correct (nothing selected)", _share(self.negatives_correct, self.negatives)),
            ("latency p50", f"{self.p50_ms:.2f} ms"),
            ("latency p95", f"{self.p95_ms:.2f} ms"),
            ("latency max", f"{self.max_ms:.2f} ms"),
            ("start-up (router + encoder)", f"{self.startup_s:.2f} s"),
            ("registry load", f"{self.registry_s:.2f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"routing benchmark: {self.file}  (collection: {self.collection or 'all'})"]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        if self.categories:
            lines.append("  failure categories (per dataset):")
            lines += [f"    {k}: {v}" for k, v in sorted(self.categories.items(), key=lambda kv: -kv[1])]
        if self.by_category:
            lines.append("  by query category (n, strict, hit rate):")
            lines += [f"    {k}: {v.n}, {v.strict:.3f}, {v.hit_rate:.3f}" for k, v in sorted(self.by_category.items())]
        return "\n".join(lines)


def _share(value: float | None, n: int) -> str:
    return "n/a (no negative queries)" if value is None else f"{value:.4f} (of {n})"


def load_cases(path: str | Path) -> list[dict[str, Any]]:
    """Read a benchmark JSONL file (blank lines and ``#`` comments skipped)."""
    cases = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                case = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
            if "query" not in case or "expected_datasets" not in case:
                raise ValueError(f"{path}:{n}: needs 'query' and 'expected_datasets'")
            cases.append(case)
    return cases


class Half(StrEnum):
    """One half of a set, by the parity of its 0-based line: tune on one, hold the other back."""

    EVEN = "even"
    ODD = "odd"


def run_bench(
    path: str | Path,
    collection: str | None = "medsegagent-23",
    registry: Registry | None = None,
    router: Any = None,
    half: Half | None = None,
) -> BenchResult:
    """Score a benchmark file.

    Parameters
    ----------
    path
        JSONL file in the benchmark format.
    collection
        Registry collection to route within (the paper's library: ``medsegagent-23``).
    registry
        Registry (default: :func:`load_registry`, timed as ``registry_s``).
    router
        A ready :class:`~medsegagent.models.routing.Router` (start-up is then not measured).
    half
        Score only the even or odd requests (0-based), as a blind set split into a half
        the router is tuned on and a half held back (docs/routing.md, round nine).

    Returns
    -------
    BenchResult
        Metrics, latency percentiles, and per-query failures.
    """
    from medsegagent.models.routing import Router

    cases = load_cases(path)
    if half is not None:
        cases = cases[half is Half.ODD :: 2]
    result = BenchResult(file=str(path), collection=collection, n=len(cases))
    t0 = time.perf_counter()
    reg = registry if registry is not None else load_registry()
    result.registry_s = time.perf_counter() - t0
    if router is None:
        t0 = time.perf_counter()
        router = Router(reg)
        router.warm_up()
        result.startup_s = time.perf_counter() - t0
    latencies: list[float] = []
    hits: list[float] = []
    categories: Counter[str] = Counter()
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        plan = router.plan(case["query"], case.get("modality"), collection=collection)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        expected = {k: sorted(_flat(v)) for k, v in case["expected_datasets"].items()}
        hit = score_query(expected, plan.selection)
        hits.append(hit)
        if hit < 1.0:
            categories.update(_miss_kinds(expected, plan.selection))
            result.failures.append(
                {
                    "line": i + 1,
                    "query": case["query"],
                    "modality": case.get("modality"),
                    "expected": expected,
                    "predicted": plan.selection,
                    "unmatched": [u.to_json() for u in plan.unmatched],
                }
            )
    result.categories = dict(categories)
    _summarise(result, cases, hits, latencies)
    return result


def _miss_kinds(expected: dict[str, list[int]], predicted: dict[str, list[int]]) -> Counter[str]:
    """Why a query missed, per dataset (extra, missing, wrong values; or it should select nothing)."""
    kinds: Counter[str] = Counter()
    for name in set(expected) | set(predicted):
        exp, got = expected.get(name), predicted.get(name)
        if exp is None:
            kinds["extra dataset"] += 1
        elif got is None:
            kinds["missing dataset"] += 1
        elif set(exp) != set(got):
            kinds["wrong label values"] += 1
    if not expected:
        kinds["should select nothing"] += 1
    return kinds


def _summarise(result: BenchResult, cases: list[dict[str, Any]], hits: list[float], latencies: list[float]) -> None:
    """Fill the aggregate scores, the negatives measure, per-category scores and latency percentiles."""
    right = [h >= 1.0 - 1e-12 for h in hits]
    n = max(len(hits), 1)
    result.hit_rate = sum(hits) / n
    result.strict = sum(right) / n
    result.soft = sum(1 for h in hits if h > 0.0) / n
    # A negative query is right exactly when nothing is selected (its hit rate is then 1, else 0).
    negatives = [ok for case, ok in zip(cases, right, strict=True) if not case["expected_datasets"]]
    result.negatives = len(negatives)
    result.negatives_correct = sum(negatives) / len(negatives) if negatives else None
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        if "category" in case:
            groups.setdefault(str(case["category"]), []).append(i)
    result.by_category = {
        name: CategoryScore(
            n=len(idx), strict=sum(right[i] for i in idx) / len(idx), hit_rate=sum(hits[i] for i in idx) / len(idx)
        )
        for name, idx in groups.items()
    }
    if latencies:
        ordered = sorted(latencies)
        result.p50_ms = statistics.median(ordered)
        result.p95_ms = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        result.max_ms = ordered[-1]
