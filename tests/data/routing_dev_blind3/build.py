"""Derive ``requests.jsonl`` from ``requests.txt`` and the registry (never the router).

Rows are ``category | source | modality | concepts | query``, as in the held-out
set (``tests/data/heldout/README.md``); the modality ``~X`` means the text says
X and the record carries none, ``-`` means no modality at all.  The row parser,
the derivation and the file format are the first blind set's
(``tests/data/routing_dev_blind/build.py``, loaded by path), run on this
folder's ``requests.txt`` with this folder's ``concepts.py``.  Re-run after a
registry change or a corrected row, never to follow the router:

    .venv/bin/python tests/data/routing_dev_blind3/build.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from medsegagent.models.registry import Registry

HERE = Path(__file__).resolve().parent

# by path: tests/data is not a package, and the first set's folder stays untouched
_spec = importlib.util.spec_from_file_location(
    "routing_dev_blind3_first_build", HERE.parent / "routing_dev_blind" / "build.py"
)
assert _spec is not None and _spec.loader is not None
_first = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_first)
parse_row = _first.parse_row
to_jsonl = _first.to_jsonl


def rows() -> list[str]:
    """The request rows of this folder's ``requests.txt``."""
    return _first.rows(HERE)


def build(registry: Registry) -> list[dict[str, Any]]:
    """Every request of this folder's ``requests.txt`` with its expectation over ``registry``."""
    return _first.build(registry, HERE)


if __name__ == "__main__":
    _first.main(HERE)
