"""Concepts of the eleventh blind development set: the tenth blind set's table, as it is.

The tenth blind set's table (``tests/data/routing_dev_blind10/concepts.py``,
which loads the ninth's, the eighth's, ... the first's and the held-out
table in turn) is loaded by path and used as it is: every structure this set
asks for is one of its concepts, so ``EXTRA`` is empty.  A concept added later
must be found from the registry by SNOMED CT type and side or, where the type
code is shared, by the label's own name, never from the router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND10 = Path(__file__).resolve().parents[1] / "routing_dev_blind10" / "concepts.py"


def _load_blind10() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind11_base_concepts", _BLIND10)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind10()
Matcher = _b.Matcher
by_name = _b.by_name

EXTRA: dict[str, Matcher] = {}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the earlier tooling, so widening its
# table (which ``expected`` reads) changes nothing for the earlier sets.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
