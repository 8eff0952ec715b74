"""Held-out routing score without the queries a development set also holds (same text, any case).

The held-out set was frozen first; development sets written later by engineers who never
opened it still share some texts with it (mostly one- or two-word names such as "liver").
This prints the held-out aggregate on the rest, so that the shared texts cannot flatter it.
Aggregates only: the held-out misses are not printed.

    python bench/heldout_overlap.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from medsegagent.models.bench_routing import run_bench

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DEVELOPMENT = ("routing_requests.jsonl", "routing_dev.jsonl", "routing_dev_all.jsonl")


def main() -> None:
    """Score the held-out set without the texts any development set holds."""
    held = [json.loads(line) for line in (DATA / "heldout" / "requests.jsonl").read_text().splitlines() if line]
    seen = {
        json.loads(line)["query"].strip().lower()
        for name in DEVELOPMENT
        for line in (DATA / name).read_text().splitlines()
        if line.strip()
    }
    rest = [case for case in held if case["query"].strip().lower() not in seen]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "heldout-unshared.jsonl"
        path.write_text("".join(json.dumps(case) + "\n" for case in rest))
        result = run_bench(path, collection=None)
    print(f"held-out: {len(held)} queries, {len(held) - len(rest)} also in a development set")
    print(f"the other {result.n}: strict {result.strict:.3f}, hit rate {result.hit_rate:.3f}, soft {result.soft:.3f}")


if __name__ == "__main__":
    main()
