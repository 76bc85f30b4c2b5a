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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; a flag whose help already states it (or whose default is None,
    meaning "taken from elsewhere", which its help then says) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        if action.default is None or "default" in help_ or action.default is argparse.SUPPRESS:
            return help_
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return help_
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normmatters", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(f"normmatters.commands.{module}").add_parser(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from . import progress

    progress.enable(sys.stderr.isatty() and not getattr(args, "quiet", False))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
