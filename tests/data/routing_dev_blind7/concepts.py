"""Concepts of the seventh blind development set: the sixth blind set's table, plus the ones it lacks.

The sixth blind set's table (``tests/data/routing_dev_blind6/concepts.py``,
which loads the fifth's, the fourth's, the third's, the second's, the first's
and the held-out table in turn) is loaded by path and used as it is.  This set
also asks for structures none of them names: the trunk and the extremities of
TotalSegmentator's body task, the vertebral bodies (as one label, without the
posterior elements), the S1 vertebra, the prevertebral muscles, the mandibular
incisive canals, the lingual canal and the central sulcus.  Each is found from
the registry by the label's own name, because its type code is shared with
other labels (*Vertebra*, *Muscle of neck*, *alveolar process of mandible*,
*Cerebral cortex*) or names a region (*Trunk*, *Extremity*), never from the
router.  See README.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

_BLIND6 = Path(__file__).resolve().parents[1] / "routing_dev_blind6" / "concepts.py"


def _load_blind6() -> ModuleType:
    # loaded by path: tests/data is not a package, and the earlier sets' folders stay untouched
    spec = importlib.util.spec_from_file_location("routing_dev_blind7_base_concepts", _BLIND6)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_b = _load_blind6()
Matcher = _b.Matcher
by_name = _b.by_name
_h = _b._b._h  # the held-out helpers, as the fifth blind set holds them


def _sided(key: str, *stems: str) -> dict[str, Matcher]:
    """``<stem>_left`` / ``<stem>_right`` labels (type codes shared by many muscles)."""
    return _h._sided_names(key, *stems)


def _sided_prefix(key: str, left: str, right: str) -> dict[str, Matcher]:
    """Labels whose names carry the side elsewhere (``left_mandibular_incisive_canal_fdi103``)."""
    return {key: by_name(left, right), f"{key}_l": by_name(left), f"{key}_r": by_name(right)}


EXTRA: dict[str, Matcher] = {
    # TotalSegmentator body task (CT and MR): the trunk and the limbs, each its own label
    "body_trunk": by_name("body_trunc"),
    "body_extremities": by_name("body_extremities"),
    # spine: "Vertebra" is shared by the bodies label, TotalSegmentator MRI's whole-spine
    # label and TotalSegmentator's S1; each is asked for by its own name
    "vertebral_bodies": by_name("vertebrae_body"),
    "s1": by_name("vertebrae_S1"),
    # neck: "Muscle of neck" is shared by many muscles
    **_sided("prevertebral", "prevertebral"),
    # dental CBCT: "alveolar process of mandible" is shared with the inferior alveolar canals
    **_sided_prefix(
        "incisive_canal",
        "left_mandibular_incisive_canal_fdi103",
        "right_mandibular_incisive_canal_fdi104",
    ),
    "lingual_canal": by_name("lingual_canal"),
    # brain: "Cerebral cortex" names the central sulcus label only, but the type is broader
    "central_sulcus": by_name("central_sulcus"),
}

_clash = set(EXTRA) & set(_b.CONCEPTS)
if _clash:
    raise ValueError(f"concepts defined twice: {sorted(_clash)}")

# ``_b`` is this module's private copy of the earlier tooling, so widening its
# table (which ``expected`` reads) changes nothing for the earlier sets.
CONCEPTS: dict[str, Matcher] = _b.CONCEPTS
CONCEPTS.update(EXTRA)
expected = _b.expected
