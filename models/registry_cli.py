"""``medsegagent registry list|validate``: inspect and check the model registry."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from medsegagent.models.registry import Dataset, RegistryError, default_registry_path, load_registry

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``registry`` command and its sub-commands.

    Parameters
    ----------
    subparsers
        The top-level sub-parsers of the ``medsegagent`` CLI.
    """
    parser = subparsers.add_parser(
        "registry", help="inspect or validate the model registry", description="Inspect or validate the model registry."
    )
    sub = parser.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    sub.required = True

    p_list = sub.add_parser("list", help="list datasets, their labels and installed models")
    p_list.add_argument("--collection", metavar="NAME", help="only datasets tagged with this collection")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.add_argument(
        "--registry", metavar="PATH", help="registry file (default: $MEDSEGAGENT_REGISTRY or the packaged one)"
    )
    p_list.set_defaults(func=_cmd_list)

    p_val = sub.add_parser("validate", help="validate a registry file")
    p_val.add_argument(
        "path", nargs="?", metavar="PATH", help="registry file (default: $MEDSEGAGENT_REGISTRY or the packaged one)"
    )
    p_val.set_defaults(func=_cmd_validate)


def _dataset_json(d: Dataset) -> dict[str, Any]:
    return {
        "name": d.name,
        "description": d.description,
        "collections": list(d.collections),
        "modalities": list(d.modalities),
        "regions": list(d.regions),
        "specificity": d.specificity,
        "num_labels": d.num_labels,
        "labels": {name: lab.values for name, lab in d.labels.items()},
        "models": [
            {"name": m.name, "backend": m.backend.value, "path": str(m.path), "installed": m.installed}
            for m in d.models
        ],
        "models_installed": len(d.installed_models),
        "models_total": len(d.models),
        "install_hint": d.install_hint,
    }


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        reg = load_registry(args.registry)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    datasets = reg.in_collection(args.collection)
    if args.json:
        doc = {
            "registry": str(reg.path),
            "content_hash": reg.content_hash,
            "collection": args.collection,
            "datasets": [_dataset_json(d) for d in datasets],
        }
        print(json.dumps(doc, indent=2))
        return 0
    if not datasets:
        known = ", ".join(reg.collections)
        print(f"no datasets in collection {args.collection!r} (collections: {known})", file=sys.stderr)
        return 1
    rows = [["dataset", "collections", "modalities", "regions", "labels", "models"]]
    for d in datasets:
        rows.append(
            [
                d.name,
                ",".join(d.collections),
                ",".join(d.modalities),
                ",".join(d.regions),
                str(d.num_labels),
                f"{len(d.installed_models)}/{len(d.models)}",
            ]
        )
    print(_table(rows))
    n_labels = sum(d.num_labels for d in datasets)
    print(f"\n{len(datasets)} datasets, {n_labels} labels ({reg.path})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    path = args.path or default_registry_path()
    try:
        reg = load_registry(path)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"OK: {len(reg.datasets)} datasets, {reg.num_labels} labels ({reg.path})")
    return 0
