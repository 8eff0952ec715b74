"""Derive ``requests.jsonl`` from ``requests.txt`` and the registry (not the router).

Run once when the set was written; the output is frozen (README.md).  Re-run
only after a registry change, never to follow the router:

    .venv/bin/python tests/data/heldout/build.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from concepts import CONCEPTS, expected  # noqa: E402

from medsegagent.models.registry import load_registry  # noqa: E402


def parse(line: str) -> dict[str, object]:
    """One table row -> record (modality ``~X``: the text says X, the record has none)."""
    category, source, modality, concepts, query = (part.strip() for part in line.split("|", 4))
    names = [] if concepts == "-" else concepts.split()
    unknown = [c for c in names if c not in CONCEPTS]
    if unknown:
        raise SystemExit(f"unknown concept(s) {unknown} in: {line}")
    text_modality = None if modality == "-" else modality.lstrip("~")
    record: dict[str, object] = {"query": query, "expected_datasets": {}, "category": category, "source": source}
    if modality != "-" and not modality.startswith("~"):
        record["modality"] = modality
    record["_concepts"] = names
    record["_modality"] = text_modality
    return record


def main() -> None:
    registry = load_registry()
    rows = [ln for ln in (HERE / "requests.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    out = []
    for row in rows:
        record = parse(row)
        names, modality = record.pop("_concepts"), record.pop("_modality")
        record["expected_datasets"] = expected(registry, names, modality)  # type: ignore[arg-type]
        is_negative = str(record["category"]).startswith("negative")
        if is_negative != (not record["expected_datasets"]):
            raise SystemExit(f"negative category and empty expectation disagree: {row}")
        out.append(record)
    # the same words on two modalities are two requests (their answers differ)
    keys = [(r["query"], r.get("modality")) for r in out]
    if len(set(keys)) != len(keys):
        raise SystemExit("duplicate (query, modality)")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    (HERE / "requests.jsonl").write_text(text, encoding="utf-8")
    negatives = sum(not r["expected_datasets"] for r in out)
    print(f"{len(out)} requests, {negatives} negatives, registry {registry.content_hash}")


if __name__ == "__main__":
    main()
