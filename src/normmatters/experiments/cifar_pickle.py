"""Read a CIFAR python batch without letting the file run code.

A CIFAR batch (Krizhevsky 2009, ``cifar-10-batches-py`` / ``cifar-100-python``) is a pickled dict of bytes or
str keys to a uint8 numpy array (``data``, N × 3072), lists of ints (labels) and lists of bytes (file names).
Plain ``pickle.load`` would also call any global the file names (``os.system`` through ``__reduce__``), so
:func:`load_cifar_pickle` uses an unpickler whose ``find_class`` returns only what such a batch needs to rebuild a
numpy array: ``numpy.core.multiarray._reconstruct`` (or ``numpy._core``), ``numpy.ndarray``, ``numpy.dtype``,
``numpy.core.numeric._frombuffer`` (protocol 5), and ``_codecs.encode`` limited to latin-1 (how Python 3 pickles
bytes at protocol ≤ 2). Every other global is refused with :class:`RefusedGlobalError` before it is called.
Dicts, lists, tuples, bytes, str, ints, floats, bools and None need no global and load as usual.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

__all__ = ["load_cifar_pickle", "RefusedGlobalError", "ALLOWED_GLOBALS"]

ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a Python global a CIFAR batch never holds; nothing was called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(
            f"the pickle names {module}.{name}, which a CIFAR batch never holds (allowed: dicts, lists, bytes, "
            "str, numbers and numpy arrays); refused without running it"
        )
        self.module, self.name = module, name


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedGlobalError("_codecs", f"encode(…, {encoding!r})")
    return codecs.encode(text, encoding, errors)


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedGlobalError(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        return super().find_class(module, name)


def load_cifar_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` (Python 2 strings read as bytes: ``encoding="bytes"``).

    Raises:
        RefusedGlobalError: the file names a global outside :data:`ALLOWED_GLOBALS`.
        pickle.UnpicklingError, EOFError, OSError, ValueError, ...: the file is not a readable pickle.
    """
    with Path(path).open("rb") as f:
        return _CifarUnpickler(f, encoding="bytes").load()
