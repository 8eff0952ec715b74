"""Registry label synonyms as development requests: ``routing_dev_synonyms.jsonl``.

The registry's label synonyms moved into the concept lexicon (``models/lexicon.yaml``),
keyed by the label's SNOMED CT type; ``registry.yaml`` keeps only what no lexicon
concept can say (a dataset's own decoding of a label, such as "uterus" for
AMOS22's ``prostate/uterus``).  Nothing may be lost on the way: each line of the
JSONL file is one synonym the registry held, with the label values the router
chose for it, within its own dataset, while the registry still held it.
``tests/test_lexicon.py`` routes every line again and asserts the same values.

Run ``python tests/data/routing_dev_synonyms.py`` with the old registry to write
the file, and ``python tests/data/routing_dev_synonyms.py --check`` afterwards;
the check prints each synonym that no longer reads as its label (add it to the
lexicon concept of the label, or keep it in the registry when it is the dataset's
own).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medsegagent.models import parse as grammar
from medsegagent.models.registry import Registry, load_registry
from medsegagent.models.routing import Router

OUT = Path(__file__).with_name("routing_dev_synonyms.jsonl")


@dataclass(frozen=True)
class SynonymCase:
    """One registry synonym and the label values it read as."""

    dataset: str
    label: str
    synonym: str
    values: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {"dataset": self.dataset, "label": self.label, "synonym": self.synonym, "values": list(self.values)}


def read_as(router: Router, dataset: str, phrase: str) -> tuple[int, ...]:
    """The values of ``dataset`` the router selects for ``phrase`` when only that dataset is allowed.

    Parameters
    ----------
    router
        A router over the registry (the encoder is not used).
    dataset
        The dataset to route within.
    phrase
        A request, here a synonym.

    Returns
    -------
    tuple of int
        Sorted label values of the selected candidates over all targets.
    """
    parsed = grammar.parse_request(phrase, router.vocab, router._index.protected)
    values: set[int] = set()
    for pt in parsed.targets:
        if pt.negated:
            continue
        target, _ = router._route_target(pt, parsed, {dataset})
        values.update(v for c in target.candidates if c.selected and c.dataset == dataset for v in c.values)
    return tuple(sorted(values))


def registry_synonyms(registry: Registry) -> Iterator[tuple[str, str, str]]:
    """Every (dataset, label, synonym) the registry holds."""
    for dataset in registry.datasets.values():
        for label in dataset.labels.values():
            for synonym in label.synonyms:
                yield dataset.name, label.name, synonym


def load_cases(path: Path = OUT) -> list[SynonymCase]:
    """The recorded cases."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [SynonymCase(r["dataset"], r["label"], r["synonym"], tuple(r["values"])) for r in rows]


def lost(router: Router, cases: list[SynonymCase]) -> list[tuple[SynonymCase, tuple[int, ...]]]:
    """Cases whose synonym no longer reads as its label (with what it reads as now).

    A synonym still reads as its label when the router selects the label's values
    and nothing it did not select while the registry held the synonym, or exactly
    what the label's own name reads as ("voice box" as "larynx", with its parts).
    """
    out = []
    for case in cases:
        now = read_as(router, case.dataset, case.synonym)
        label = router.registry.datasets[case.dataset].labels[case.label]
        if set(label.values) <= set(now) <= set(case.values):
            continue
        if now != read_as(router, case.dataset, label.name.replace("_", " ")):  # not even as its name reads
            out.append((case, now))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare the current registry + lexicon with the file")
    args = ap.parse_args(argv)
    router = Router(load_registry(), use_encoder=False)
    if args.check:
        misses = lost(router, load_cases())
        for case, now in misses:
            print(f"{case.dataset}/{case.label}: {case.synonym!r} reads as {list(now)}, was {list(case.values)}")
        print(f"{len(misses)} lost", file=sys.stderr)
        return 1 if misses else 0
    cases = [SynonymCase(d, lab, s, read_as(router, d, s)) for d, lab, s in registry_synonyms(router.registry)]
    # A synonym that does not read as its own label today is a registry slip, not a meaning to keep.
    kept = [c for c in cases if set(router.registry.datasets[c.dataset].labels[c.label].values) <= set(c.values)]
    for c in cases:
        if c not in kept:
            print(f"not recorded (does not read as its label today): {c.dataset}/{c.label}: {c.synonym!r}")
    OUT.write_text("".join(json.dumps(c.to_json()) + "\n" for c in kept), encoding="utf-8")
    print(f"{len(kept)} of {len(cases)} synonyms -> {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
