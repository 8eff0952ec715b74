"""Derive ``requests.jsonl`` from ``requests.txt`` and the registry (never the router).

Rows are ``category | source | modality | concepts | query``, as in the held-out
set (``tests/data/heldout/README.md``); the modality ``~X`` means the text says
X and the record carries none, ``-`` means no modality at all.  Re-run after a
registry change or a corrected row, never to follow the router:

    .venv/bin/python tests/data/routing_dev_blind/build.py [FOLDER]

One builder for every blind set: ``rows``, ``build`` and ``main`` take the set's
folder (default this one), whose ``requests.txt`` and ``concepts.py`` they read;
``routing_dev_blind2`` and ``routing_dev_blind3`` are built by passing their folder.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from medsegagent.models.registry import Registry, load_registry

HERE = Path(__file__).resolve().parent


def _concepts(folder: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"{folder.name}_concepts", folder / "concepts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(folder: Path = HERE) -> list[str]:
    """The request rows of the folder's ``requests.txt`` (comments and blank lines dropped)."""
    lines = (folder / "requests.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def parse_row(line: str, known: set[str]) -> tuple[dict[str, Any], list[str], str | None]:
    """One row -> (record without expectation, concept names, modality the expectation uses)."""
    category, source, modality, concepts, query = (part.strip() for part in line.split("|", 4))
    names = [] if concepts == "-" else concepts.split()
    unknown = [c for c in names if c not in known]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown} in: {line}")
    record: dict[str, Any] = {"query": query, "expected_datasets": {}, "category": category, "source": source}
    if modality != "-" and not modality.startswith("~"):
        record["modality"] = modality
    return record, names, None if modality == "-" else modality.lstrip("~")


def build(registry: Registry, folder: Path = HERE) -> list[dict[str, Any]]:
    """Every request of the folder's ``requests.txt`` with its expectation over ``registry``.

    Raises
    ------
    ValueError
        On an unknown concept, a negative category whose expectation is not
        empty (or the reverse), or the same (query, modality) twice.
    """
    concepts = _concepts(folder)
    out = []
    for row in rows(folder):
        record, names, modality = parse_row(row, set(concepts.CONCEPTS))
        record["expected_datasets"] = concepts.expected(registry, names, modality)
        if record["category"].startswith("negative") != (not record["expected_datasets"]):
            raise ValueError(f"negative category and empty expectation disagree: {row}")
        out.append(record)
    # the same words on two modalities are two requests (their answers differ)
    keys = [(r["query"].lower(), r.get("modality")) for r in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if dupes:
        raise ValueError(f"duplicate (query, modality): {dupes}")
    return out


def to_jsonl(records: list[dict[str, Any]]) -> str:
    """The committed file's text: one JSON object a line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(folder: Path = HERE) -> None:
    """Write the folder's ``requests.jsonl`` from its rows and the default registry."""
    registry = load_registry()
    records = build(registry, folder)
    (folder / "requests.jsonl").write_text(to_jsonl(records), encoding="utf-8")
    negatives = sum(not r["expected_datasets"] for r in records)
    print(f"{len(records)} requests, {negatives} negatives, registry {registry.content_hash}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE)
