"""Concepts of the third blind development set: the second blind set's, plus the one it lacks.

The second blind set's table (``tests/data/routing_dev_blind2/concepts.py``,
which itself extends the first blind set's and the held-out table) is loaded
by path and used as it is.  This set asks for one structure none of them
names: the true lumen of an aortic dissection, found from the registry by the
label's own name (its type code is the whole aorta's), never from the router.
See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND2 = Path(__file__).resolve().parents[1] / "routing_dev_blind2" / "concepts.py"


def _load_blind2() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind3_base_concepts", _BLIND2)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind2()
Matcher = _b.Matcher
by_name = _b.by_name

EXTRA: dict[str, Matcher] = {
    # typed "Aorta" like the whole vessel, which the held-out "aorta" concept excludes by name
    "true_lumen": by_name("aorta_true_lumen"),
}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the earlier tooling, so widening its
# table (which ``expected`` reads) changes nothing for the earlier sets.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
