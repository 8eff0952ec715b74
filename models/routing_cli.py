"""``medsegagent plan`` and ``medsegagent bench routing``: routing from the command line.

``plan "TEXT"`` prints a plan (human-readable, or the JSON contract with
``--json``); ``plan --jsonl FILE`` plans many requests, one JSON line each, in
order.  ``bench`` is a group of benchmark sub-commands; other modules add
theirs through :func:`get_bench_subparsers` (``routing`` is defined here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["get_bench_subparsers", "register"]

#: Default benchmark collection: the paper's library of 23 datasets.
DEFAULT_BENCH_COLLECTION = "medsegagent-23"

_BENCH_SUBPARSERS: Any = None
_BENCH_OWNER: Any = None


def get_bench_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``bench`` command's sub-parsers, creating the command on first call.

    Parameters
    ----------
    subparsers
        The top-level sub-parsers of the ``medsegagent`` CLI.

    Returns
    -------
    argparse._SubParsersAction
        Add benchmark sub-commands to it (``bench routing``, ``bench seg`` ...);
        the same object is returned for the same top-level parser.
    """
    global _BENCH_SUBPARSERS, _BENCH_OWNER
    if _BENCH_SUBPARSERS is None or _BENCH_OWNER is not subparsers:
        bench = subparsers.add_parser("bench", help="run a benchmark", description="Benchmarks of the node's stages.")
        _BENCH_SUBPARSERS = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
        _BENCH_SUBPARSERS.required = True
        _BENCH_OWNER = subparsers
    return _BENCH_SUBPARSERS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan`` and ``bench routing`` to the CLI.

    Parameters
    ----------
    subparsers
        The top-level sub-parsers of the ``medsegagent`` CLI.
    """
    p = subparsers.add_parser(
        "plan",
        help="plan which datasets' models segment a request",
        description="Parse a request and route it coarse-to-fine (modality -> anatomy -> label).",
    )
    p.add_argument("text", nargs="?", help="the request, e.g. 'liver and both kidneys'")
    p.add_argument("--modality", metavar="MOD", help="study modality: CT, MR, MR:T1, MR:T1C, MR:T2, MR:FLAIR, "
                   "MR:DWI, MR:ADC, PT, PT+CT, US (overrides the text)")  # fmt: skip
    p.add_argument("--collection", metavar="NAME", help="route within this registry collection only")
    p.add_argument("--installed-only", action="store_true", help="only datasets with an installed model")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--explain", action="store_true", help="show why each candidate was kept or dropped")
    p.add_argument("--jsonl", metavar="FILE", help="plan every line {'query', 'modality'} of FILE ('-' = stdin)")
    p.add_argument("-o", "--output", metavar="FILE", help="write --jsonl output here instead of stdout")
    p.add_argument("--registry", metavar="PATH", help="registry file (default: $MEDSEGAGENT_REGISTRY or packaged)")
    p.set_defaults(func=_cmd_plan)

    bench = get_bench_subparsers(subparsers)
    b = bench.add_parser(
        "routing",
        help="score routing on a benchmark file (hit rate, strict, soft, negatives, latency)",
        description="Score a JSONL file of {'query', 'expected_datasets'[, 'modality'][, 'category']} with the "
        "MedSegAgent paper's metrics, the share of negative queries (nothing expected) with nothing selected, "
        "per-category aggregates when lines carry a category, and per-query latency.",
    )
    b.add_argument("file", help="benchmark JSONL file")
    b.add_argument(
        "--collection",
        default=DEFAULT_BENCH_COLLECTION,
        metavar="NAME",
        help=f"registry collection to route within (default {DEFAULT_BENCH_COLLECTION}; 'all' for every dataset)",
    )
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--failures", action="store_true", help="also list the failing queries")
    b.add_argument(
        "--half",
        choices=["even", "odd"],
        help="score only the even or odd requests (0-based): a tuned half and a held-back half of a blind set",
    )
    b.add_argument("--registry", metavar="PATH", help="registry file (default: $MEDSEGAGENT_REGISTRY or packaged)")
    b.set_defaults(func=_cmd_bench_routing)


def _load(path: str | None) -> Any:
    from medsegagent.models.registry import RegistryError, load_registry

    try:
        return load_registry(path)
    except RegistryError as exc:
        print(f"medsegagent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from medsegagent.models.routing import Router

    if not args.text and not args.jsonl:
        print("medsegagent plan: give TEXT or --jsonl FILE", file=sys.stderr)
        return 2
    router = Router(_load(args.registry))
    if args.jsonl:
        return _plan_jsonl(router, args)
    try:
        plan = router.plan(args.text, args.modality, collection=args.collection, installed_only=args.installed_only)
    except ValueError as exc:
        print(f"medsegagent plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        data = plan.to_json()
        if not args.explain:
            data.pop("explain", None)
        print(json.dumps(data, indent=2))
    else:
        print(format_plan(plan, explain=args.explain))
    return 0


def _plan_jsonl(router: Any, args: argparse.Namespace) -> int:
    source: TextIO = sys.stdin if args.jsonl == "-" else open(args.jsonl, encoding="utf-8")  # noqa: SIM115
    out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    status = 0
    try:
        for n, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                query = item["query"] if isinstance(item, dict) else str(item)
                modality = item.get("modality") if isinstance(item, dict) else None
                collection = item.get("collection", args.collection) if isinstance(item, dict) else args.collection
                data = router.plan(query, modality, collection=collection, installed_only=args.installed_only).to_json()
                if not args.explain:
                    data.pop("explain", None)
            except (ValueError, KeyError, TypeError) as exc:
                # One bad line must not shift the rest: answer it in place.
                data = {"line": n, "error": f"{type(exc).__name__}: {exc}", "selection": {}, "targets": [],
                        "unmatched": []}  # fmt: skip
                status = 1
            out.write(json.dumps(data) + "\n")
    finally:
        if source is not sys.stdin:
            source.close()
        if out is not sys.stdout:
            out.close()
    return status


def format_plan(plan: Any, explain: bool = False) -> str:
    """Human-readable rendering of a :class:`~medsegagent.models.routing.Plan`.

    Parameters
    ----------
    plan
        The plan.
    explain
        Append the per-stage explanation.

    Returns
    -------
    str
        Several lines of text.
    """
    lines = [f"request:  {plan.text}"]
    mod = plan.modality or "any (none given)"
    if plan.modality_source:
        mod += f"  (from {'DICOM/caller' if plan.modality_source == 'caller' else 'text'})"
    lines.append(f"modality: {mod}")
    if plan.collection:
        lines.append(f"collection: {plan.collection}")
    if plan.regions:
        lines.append(f"regions:  {', '.join(plan.regions)}")
    lines.append("targets:")
    for t in plan.targets:
        side = f" [{t.laterality}]" if t.laterality else ""
        neg = " (excluded)" if t.negated else ""
        lines.append(f"  - {t.text!r} -> {t.concept}{side} ({t.kind}){neg}")
        for c in t.candidates:
            mark = "*" if c.selected else " "
            inst = "installed: " + ", ".join(c.models) if c.installed else "no installed model"
            lines.append(f"      {mark} {c.dataset}: {', '.join(c.labels)} = {c.values}  score {c.score:.2f}  ({inst})")
    lines.append("selection:")
    if plan.selection:
        lines += [f"  {name}: {values}" for name, values in plan.selection.items()]
    else:
        lines.append("  (nothing)")
    if plan.unmatched:
        lines.append("unmatched:")
        lines += [f"  - {u.target!r}: {u.reason}" for u in plan.unmatched]
    if plan.missing_models:
        lines.append("missing models:")
        for m in plan.missing_models:
            hint = (m.get("install_hint") or "").strip()
            lines.append(f"  - {m['dataset']}: {hint[:160] + ('...' if len(hint) > 160 else '')}")
    lines.append(f"planned in {plan.elapsed_ms:.1f} ms")
    if explain:
        lines.append("explain:")
        for step in plan.explain:
            lines.append("  " + json.dumps(step))
    return "\n".join(lines)


def _cmd_bench_routing(args: argparse.Namespace) -> int:
    from medsegagent.models.bench_routing import Half, run_bench

    if not Path(args.file).is_file():
        print(f"medsegagent bench routing: no such file {args.file}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    registry = _load(args.registry)
    registry_s = time.perf_counter() - t0
    collection = None if args.collection in ("all", "") else args.collection
    try:
        half = Half(args.half) if args.half else None
        result = run_bench(args.file, collection=collection, registry=registry, half=half)
    except ValueError as exc:
        print(f"medsegagent bench routing: {exc}", file=sys.stderr)
        return 2
    result.registry_s = registry_s
    if args.json:
        print(json.dumps(result.to_json(with_failures=args.failures), indent=2))
    else:
        print(result.table())
        if args.failures:
            for f in result.failures:
                print(f"  line {f['line']}: {f['query']!r} ({f['modality']}): expected {f['expected']}, "
                      f"got {f['predicted']}")  # fmt: skip
    return 0
