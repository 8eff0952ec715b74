"""Concepts of the fourth blind development set: the third blind set's, plus the ones it lacks.

The third blind set's table (``tests/data/routing_dev_blind3/concepts.py``,
which loads the second's, the first's and the held-out table in turn) is
loaded by path and used as it is.  This set also asks for three structures
none of them names: the torso (visceral) fat, the maxilla and a dental bridge.
Each is found from the registry by the label's own name, because its type code
is shared with another label (*Fat*, *Maxilla*, *Dental Prosthesis*), never
from the router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND3 = Path(__file__).resolve().parents[1] / "routing_dev_blind3" / "concepts.py"


def _load_blind3() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind4_base_concepts", _BLIND3)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind3()
Matcher = _b.Matcher
by_name = _b.by_name
in_dataset = _b._b._h.in_dataset  # the held-out helper, as the second blind set holds it

EXTRA: dict[str, Matcher] = {
    # body composition: "Fat" is shared by torso_fat and intermuscular_fat
    "torso_fat": by_name("torso_fat"),
    # dental CBCT: "Maxilla" is shared with the hard palate, "Dental Prosthesis" with the crown
    "maxilla": by_name("upper_jawbone"),
    "dental_bridge": in_dataset("TotalSegmentator_teeth", "bridge"),
}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the earlier tooling, so widening its
# table (which ``expected`` reads) changes nothing for the earlier sets.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
