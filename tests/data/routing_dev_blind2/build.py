"""Derive ``requests.jsonl`` from ``requests.txt`` and the registry (never the router).

Rows are ``category | source | modality | concepts | query``, as in the held-out
set (``tests/data/heldout/README.md``); the modality ``~X`` means the text says
X and the record carries none, ``-`` means no modality at all.  The row parser
and the file format are the first blind set's (``tests/data/routing_dev_blind/
build.py``, loaded by path); the concept table is this folder's ``concepts.py``.
Re-run after a registry change or a corrected row, never to follow the router:

    .venv/bin/python tests/data/routing_dev_blind2/build.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from medsegagent.models.registry import Registry, load_registry

HERE = Path(__file__).resolve().parent
REQUESTS_TXT = HERE / "requests.txt"
REQUESTS_JSONL = HERE / "requests.jsonl"


def _load(name: str, path: Path) -> ModuleType:
    # by path: tests/data is not a package, and the other sets' folders stay untouched
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_first = _load("routing_dev_blind2_first_build", HERE.parent / "routing_dev_blind" / "build.py")
parse_row = _first.parse_row
to_jsonl = _first.to_jsonl


def rows() -> list[str]:
    """The request rows of ``requests.txt`` (comments and blank lines dropped)."""
    lines = REQUESTS_TXT.read_text(encoding="utf-8").splitlines()
    return [ln for ln in lines if ln.strip() and not ln.startswith("#")]


def build(registry: Registry) -> list[dict[str, Any]]:
    """Every request of ``requests.txt`` with its expectation over ``registry``.

    Parameters
    ----------
    registry
        The registry whose datasets and labels the expectations name (the
        default one, every collection).

    Returns
    -------
    list of dict
        One record per row: ``query``, ``expected_datasets``, ``modality``
        (absent when the record carries none), ``category``, ``source``.

    Raises
    ------
    ValueError
        On an unknown concept, a negative category whose expectation is not
        empty (or the reverse), or the same (query, modality) twice.
    """
    concepts = _load("routing_dev_blind2_concepts", HERE / "concepts.py")
    out = []
    for row in rows():
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


def main() -> None:
    registry = load_registry()
    records = build(registry)
    REQUESTS_JSONL.write_text(to_jsonl(records), encoding="utf-8")
    negatives = sum(not r["expected_datasets"] for r in records)
    print(f"{len(records)} requests, {negatives} negatives, registry {registry.content_hash}")


if __name__ == "__main__":
    main()
