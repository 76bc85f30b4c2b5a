"""The ``normmatters`` command: argument parsing and printing only; the work is in the library.

Each sub-command lives in ``normmatters.commands.<name>`` and provides ``add_parser(subparsers)`` and
``run(args) -> int``. Modules are imported lazily so ``normmatters --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: sub-command name → module under normmatters.commands
COMMANDS: dict[str, str] = {
    "constants": "constants",
    "compare": "compare",
    "train": "train",
    "bench": "bench",
    "precision": "precision",
    "reproduce": "reproduce",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normmatters", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(f"normmatters.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
