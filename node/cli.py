"""Command line entry point ``medsegagent``.

Each concern registers its own sub-commands (``register(subparsers)``) so this
module stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules that contribute sub-commands; each has ``register(subparsers)``.
_COMMAND_MODULES = (
    "medsegagent.dicom.phantom_cli",
    "medsegagent.models.registry_cli",
    "medsegagent.node.models_commands",
    "medsegagent.models.routing_cli",
    "medsegagent.node.commands",
    "medsegagent.node.mcp_server",
    "medsegagent.node.orthanc_commands",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="medsegagent", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a concern not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
