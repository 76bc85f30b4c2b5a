"""The validation layer of every command: each flag declares what it accepts once, where it is added.

Two kinds of declaration, both checked before any work starts:

* per flag, an argparse ``type=`` callable built here (:func:`int_in`, :func:`number`, :func:`one_of`,
  :func:`device`, :func:`out_folder`, :func:`dataset`, ...). A value it refuses makes argparse stop with one line
  (:class:`Parser`): ``normmatters <command>: argument --flag: expected ..., got 'value'``, exit 2.
* per command, the constraints between flags (``--scale-min`` ≤ ``--scale-max``, increasing ``--milestones``)
  in a ``check(args)`` function given to ``set_defaults(check=...)``; it raises :class:`UsageError` naming the
  flag, the value and what is expected, which :func:`normmatters.cli.main` prints as one line, exit 2.

A new flag declares its constraint with its ``add_argument``; a new command adds its ``check`` next to its
``run``. Nothing here imports torch or numpy until a value is actually checked (``normmatters --help`` stays
fast): name lists (norms, formats, models) are looked up when a value is parsed.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["Parser", "UsageError", "int_in", "number", "real", "one_of", "names_in", "via", "device", "out_folder",
           "out_file", "dataset", "text_folder", "check_out_folder", "increasing", "train_norms", "estimator_norms",
           "fail"]

#: folders that hold no user files: results are never written under them
_SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


class UsageError(ValueError):
    """A command's setting is invalid; the message names the flag, the value found and what is expected."""

    def __init__(self, flag: str, value: Any, expected: str) -> None:
        got = repr(value) if isinstance(value, str) else str(value)
        super().__init__(f"{flag}: expected {expected}, got {got}")
        self.flag, self.value, self.expected = flag, value, expected


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        name = self.prog.split(" ", 1)[1] if " " in self.prog else self.prog  # "train", as the commands say
        self.exit(2, f"{name}: {message} (see {self.prog} --help)\n")


def _type(name: str, fn: Callable[[str], Any]) -> Callable[[str], Any]:
    fn.__name__ = name  # argparse names the type in some messages
    return fn


def _bad(expected: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An int in ``lo .. hi`` (either bound may be None)."""
    if lo is not None and hi is not None:
        expected = f"an int in {lo} .. {hi}"
    elif lo is not None:
        expected = f"an int ≥ {lo}"
    elif hi is not None:
        expected = f"an int ≤ {hi}"
    else:
        expected = "an int"

    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise _bad(expected, text) from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _bad(expected, text)
        return v

    return _type("int", parse)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval ``lo .. hi`` (open ends with ``lo_open`` / ``hi_open``); NaN and ±inf are
    refused."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '≥'} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '≤'} {hi:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        try:
            v = float(text.strip())
        except ValueError:
            raise _bad(expected, text) from None
        if not math.isfinite(v):
            raise _bad(expected, text)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise _bad(expected, text)
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise _bad(expected, text)
        return v

    return _type("float", parse)


def real(text: str) -> float:
    """Any float, NaN and ±inf included (for a flag whose range a later check states, e.g. TrainConfig's)."""
    try:
        return float(text.strip())
    except ValueError:
        raise _bad("a number", text) from None


def one_of(choices: Iterable[str] | Callable[[], Iterable[str]]) -> Callable[[str], str]:
    """One of ``choices`` (a collection, or a function returning it, called only when a value is checked)."""

    def parse(text: str) -> str:
        allowed = tuple(choices() if callable(choices) else choices)
        if text not in allowed:
            raise _bad("one of " + ", ".join(allowed), text)
        return text

    return _type("choice", parse)


def names_in(module: str, attr: str, extra: Iterable[str] = ()) -> Callable[[], tuple[str, ...]]:
    """The names in ``module.attr`` (a tuple or the keys of a dict), imported when first needed."""
    extra = tuple(extra)

    def names() -> tuple[str, ...]:
        value = getattr(importlib.import_module(module), attr)
        return extra + tuple(value() if callable(value) else value)

    return names


def train_norms() -> tuple[str, ...]:
    """The norm names a model accepts: ``bn`` (nn.BatchNorm), ``none`` and every registered estimator."""
    from ..estimators import available_norms

    return ("bn", "none", *available_norms())


def estimator_norms() -> tuple[str, ...]:
    """The registered estimators (the Lp layers' ``norm=``)."""
    from ..estimators import available_norms

    return tuple(available_norms())


def via(check: Callable[[str], Any], expected: str) -> Callable[[str], str]:
    """A value the library's own parser ``check`` accepts (its ValueError becomes one line); returns the text."""

    def parse(text: str) -> str:
        try:
            check(text)
        except (ValueError, TypeError, KeyError) as e:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} ({e})") from None
        return text

    return _type("value", parse)


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda`` / ``cuda:N`` (N < the number of GPUs), ``mps``."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise _bad("a torch device: cpu, cuda or cuda:N", text) from None
    if d.type == "cpu":
        return text
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise _bad("cpu (CUDA is not available on this machine)", text)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise _bad(f"cuda:0 .. cuda:{torch.cuda.device_count() - 1} (this machine's GPUs)", text)
        return text
    if d.type == "mps" and torch.backends.mps.is_available():
        return text
    raise _bad("cpu or cuda[:N] (a device this machine has)", text)


def _under_system_root(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved == r or r in resolved.parents for r in _SYSTEM_ROOTS)


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def out_folder(text: str) -> Path:
    """An output folder: an existing folder or a path that does not exist yet whose nearest existing parent is
    a folder we may write into; never under /proc, /sys or /dev."""
    path = Path(text)
    if not text.strip():
        raise _bad("a folder path", text)
    if _under_system_root(path):
        raise _bad("a folder outside /proc, /sys and /dev", text)
    if path.exists() and not path.is_dir():
        raise _bad("a folder (or a path that does not exist yet), but it is a file", text)
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise _bad(f"a path under folders, but {parent} is a file", text)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _bad(f"a folder we may write to ({parent} is not writable)", text)
    return path


def out_file(text: str) -> Path:
    """A file to write: not a folder, its folder writable (or creatable); never under /proc, /sys or /dev."""
    path = Path(text)
    if not text.strip() or text.endswith(os.sep):
        raise _bad("a file path", text)
    if _under_system_root(path):
        raise _bad("a file outside /proc, /sys and /dev", text)
    if path.is_dir():
        raise _bad("a file path, but it is a folder", text)
    out_folder(str(path.parent) if str(path.parent) else ".")
    return path


def check_out_folder(flag: str, path: Path) -> Path:
    """Create the output folder and prove it takes a file (the last check before a command works): raise
    :class:`UsageError` naming ``flag`` otherwise. A folder that already holds files is used (a rerun replaces
    the files it writes again, each whole) with a warning naming them, so nothing is replaced silently."""
    import logging
    import tempfile

    earlier = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
    if earlier:  # the user named this folder: its files are replaced one by one (each whole), none deleted
        logging.getLogger("normmatters").warning(
            "%s already holds %d file(s) (%s): those this run writes again are replaced, the others kept", path,
            len(earlier), ", ".join(earlier[:5]) + (", ..." if len(earlier) > 5 else ""))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(flag, str(path), f"a folder we can write to ({e.strerror or e})") from None
    return path


def dataset(text: str) -> str:
    """``digits``, ``idx:DIR``, ``cifar:DIR``, ``folder:DIR`` or an existing DIR (its files are read later)."""
    expected = "digits, idx:DIR, cifar:DIR, folder:DIR or an existing DIR"
    if text == "digits":
        return text
    kind, sep, rest = text.partition(":")
    folder = Path(rest) if sep and kind in ("idx", "cifar", "folder") else Path(text)
    if not str(folder).strip() or not folder.is_dir():
        raise _bad(expected + (f" ({folder} is not a folder)" if str(folder).strip() else ""), text)
    return text


def text_folder(text: str) -> Path:
    """An existing folder holding at least one file."""
    path = Path(text)
    if not path.is_dir():
        raise _bad("an existing folder of text files", text)
    if not any(p.is_file() for p in path.rglob("*")):
        raise _bad("a folder of text files, but it holds no file", text)
    return path


def increasing(flag: str, values: list[int] | None) -> None:
    """Raise :class:`UsageError` unless ``values`` (if given) increase strictly."""
    if values and sorted(set(values)) != list(values):
        raise UsageError(flag, " ".join(map(str, values)), "strictly increasing values")


def fail(prog: str, error: object, code: int = 2) -> int:
    """Print ``error`` as one line under ``prog`` and return ``code``."""
    print(f"{prog}: {' '.join(str(error).split())}", file=sys.stderr)
    return code
