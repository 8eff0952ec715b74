"""Concepts of the eighth blind development set: the seventh blind set's table, plus the ones it lacks.

The seventh blind set's table (``tests/data/routing_dev_blind7/concepts.py``,
which loads the sixth's, the fifth's, the fourth's, the third's, the second's,
the first's and the held-out table in turn) is loaded by path and used as it
is.  This set also asks for structures none of them names: the trigone and the
body of each lateral ventricle (TotalSegmentator's ventricle-parts task), the
transitional sixth lumbar vertebra, the pulmonary-artery bifurcation landmark
and the pulps of four more teeth.  Each is found from the registry by the
label's own name, because its type code is shared with other labels (*Lateral
Ventricle*, *Lumbar spine*, the tooth's type for its pulp) or names a landmark
(*Bifurcation*), never from the router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND7 = Path(__file__).resolve().parents[1] / "routing_dev_blind7" / "concepts.py"


def _load_blind7() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind8_base_concepts", _BLIND7)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind7()
Matcher = _b.Matcher
by_name = _b.by_name


def _sided_prefix(key: str, left: str, right: str) -> dict[str, Matcher]:
    """Both-sides, left and right concepts of a pair of labels named with their side."""
    return {key: by_name(left, right), f"{key}_l": by_name(left), f"{key}_r": by_name(right)}


EXTRA: dict[str, Matcher] = {
    # brain ventricles: "Lateral Ventricle" is shared by the body and the trigone labels
    **_sided_prefix("ventricle_trigone", "ventricle_trigone_left", "ventricle_trigone_right"),
    **_sided_prefix("ventricle_body", "ventricle_body_left", "ventricle_body_right"),
    # spine: "Lumbar spine" types TotalSegmentator's transitional L6 only, but names a region
    "l6": by_name("vertebrae_L6"),
    # pulmonary-artery landmarks: the bifurcation of the trunk
    "pulmonary_bifurcation": by_name("pul_bifurcation"),
    # dental pulps: they share the tooth's type code (a tooth is not its pulp, nor the reverse)
    "pulp_11": by_name("upper_right_central_incisor_pulp_fdi111"),
    "pulp_21": by_name("upper_left_central_incisor_pulp_fdi121"),
    "pulp_16": by_name("upper_right_first_molar_pulp_fdi116"),
    "pulp_37": by_name("lower_left_second_molar_pulp_fdi137"),
}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the earlier tooling, so widening its
# table (which ``expected`` reads) changes nothing for the earlier sets.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
