"""The ``normmatters`` command: argument parsing and printing only; the work is in the library.

Each sub-command lives in ``normmatters.commands.<name>`` and provides ``add_parser(subparsers)`` and
``run(args) -> int``, and optionally a ``check(args)`` (``set_defaults(check=...)``) for constraints between its
flags. Modules are imported lazily so ``normmatters --help`` stays fast.

Every setting is checked before any work starts (:mod:`normmatters.commands.checks`): a bad one ends the command
with one line on stderr naming the flag, the value and what is expected, exit 2. Errors the work itself meets
are one line too: bad settings or data (``ValueError`` and its kin) exit 2, a failed write (a full disk, a
file-size limit: the previous file is intact) exits 1; ``-v`` logs the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from .commands.checks import Parser, UsageError, fail

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
    parser = Parser(prog="normmatters", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(f"normmatters.commands.{module}").add_parser(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands' parsers by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _ignore_file_size_signal() -> None:
    """A write past the file-size limit (RLIMIT_FSIZE) then fails with EFBIG, which the atomic writer reports
    with the previous file intact, instead of SIGXFSZ killing the process mid-write."""
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # leftovers of a command's flags: that command refuses them, naming itself
            _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a flag refused by its own check (2, one line already printed)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    prog = args.command  # "train: ...", as every command's messages begin
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _ignore_file_size_signal()
    try:
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
    except (UsageError, ValueError) as e:  # a bad setting (ConfigError from a config file, ...)
        return fail(prog, e)
    from . import progress

    progress.enable(sys.stderr.isatty() and not getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as e:  # bad settings or data found while working (DataError, ...)
        logging.getLogger("normmatters").debug("%s failed", prog, exc_info=True)
        return fail(prog, e, 2)
    except (OSError, MemoryError) as e:  # a failed write (DiskFullError: the previous file is intact), ...
        logging.getLogger("normmatters").debug("%s failed", prog, exc_info=True)
        said = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else str(e)
        return fail(prog, said or type(e).__name__, 1)  # DiskFullError's own words, without "[Errno 28]"
    except KeyboardInterrupt:  # Ctrl-C: every file is whole (atomic writes); say so instead of a traceback
        return fail(prog, "interrupted (files already written are whole)", 130)


if __name__ == "__main__":
    sys.exit(main())
