"""Concepts of the fifth blind development set: the fourth blind set's, plus the ones it lacks.

The fourth blind set's table (``tests/data/routing_dev_blind4/concepts.py``,
which loads the third's, the second's, the first's and the held-out table in
turn) is loaded by path and used as it is.  This set also asks for structures
none of them names one side at a time or at all: one maxillary sinus, one
sternocleidomastoid, one masseter, the transversospinalis, sternothyroid and
thyrohyoid muscles, and two tooth pulps.
Each is found from the registry by SNOMED CT type and side or, where the type
code is shared, by the label's own name, never from the router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND4 = Path(__file__).resolve().parents[1] / "routing_dev_blind4" / "concepts.py"


def _load_blind4() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind5_base_concepts", _BLIND4)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind4()
Matcher = _b.Matcher
by_name = _b.by_name
_h = _b._b._b._b._h  # the held-out helpers, as the first blind set loaded them
by_type = _h.by_type


def _one_side(key: str, meaning: str) -> dict[str, Matcher]:
    """``key_l`` / ``key_r`` of a type whose both-sides concept an earlier table already holds."""
    return {f"{key}_l": by_type(meaning, side="left"), f"{key}_r": by_type(meaning, side="right")}


def _sided(key: str, *stems: str) -> dict[str, Matcher]:
    """``<stem>_left`` / ``<stem>_right`` labels (type codes shared by many muscles)."""
    return _h._sided_names(key, *stems)


EXTRA: dict[str, Matcher] = {
    # one side of structures the earlier tables hold only as "both / unsided"
    # (the craniofacial task's sinus_maxillary has no side; the teeth task's two sinuses do)
    **_one_side("maxillary_sinus", "Maxillary sinus"),
    **_one_side("sternocleidomastoid", "Sternocleidomastoid muscle"),
    "masseter_l": by_name("masseter_left"),
    "masseter_r": by_name("masseter_right"),
    # neck and back muscles: "Muscle of neck" and "Skeletal muscle" are shared type codes
    **_sided("transversospinalis", "transversospinalis"),
    **_sided("sternothyroid", "sterno_thyroid"),
    **_sided("thyrohyoid", "thyrohyoid"),
    # dental pulps: they share the tooth's type code, so by name (a tooth is not its pulp, nor the reverse)
    "pulp_36": by_name("lower_left_first_molar_pulp_fdi136"),
    "pulp_46": by_name("lower_right_first_molar_pulp_fdi146"),
}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the earlier tooling, so widening its
# table (which ``expected`` reads) changes nothing for the earlier sets.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
