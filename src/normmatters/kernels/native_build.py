"""Builds and loads the native kernels' C++ sources (:data:`CSRC`: ``csrc/*.h``, ``csrc/ops.cpp``, shipped as
package data) with ``torch.utils.cpp_extension`` (ninja), which registers the ``normmatters::`` operators
(see :mod:`.native_ops`).

The library is compiled on first use with :data:`FLAGS` (``-O3 -march=native -fopenmp``, no fast-math) into
``$NORMMATTERS_CACHE`` (default ``~/.cache/normmatters``) under a directory named by a hash of the sources,
the flags, the compiler and the torch version, so a changed source or flag builds afresh and an unchanged
one is loaded from the cache (``cpp_extension`` locks the build directory, so concurrent processes are
safe). If the compiler is missing or fails, :func:`load` returns False after one warning and callers keep
the Inductor path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["CSRC", "FLAGS", "CACHE_ENV", "CC_ENV", "cache_dir", "source_key", "load", "available", "first_call"]

#: the C++ sources: ops.cpp (operators) includes rows_kernels.h → channel_kernels.h → common.h
CSRC = Path(__file__).with_name("csrc")
CC_ENV = "NORMMATTERS_CC"
CACHE_ENV = "NORMMATTERS_CACHE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math")
_NAME = "normmatters_native"
#: the translation units: the batch-norm operators and the per-sample (row) norm operators
SOURCES = ("ops.cpp", "row_norm_ops.cpp")

_loaded = False
_failed = False
_lock = threading.Lock()
#: the first call's cost: (seconds, "compiled" | "cached") of building/loading the library, None before it
first_call: tuple[float, str] | None = None


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "normmatters"


def _compiler() -> str:
    cc = os.environ.get(CC_ENV) or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cc:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")
    return cc


def source_key(cc: str) -> str:
    """Hash of every source file, the flags, the compiler and torch's version: the build directory's name."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".h", ".cpp"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join([cc, *FLAGS, torch.__version__]).encode())
    return h.hexdigest()[:20]


def _build() -> str:
    """Build (or find in the cache) and load the library; returns "compiled" or "cached"."""
    from torch.utils import cpp_extension  # imports setuptools: only when the kernels are wanted

    cc = _compiler()
    build = cache_dir() / f"{_NAME}_{source_key(cc)}"
    lib = build / f"{_NAME}.so"
    if lib.exists():
        torch.ops.load_library(str(lib))
        return "cached"
    build.mkdir(parents=True, exist_ok=True)
    env_cxx = os.environ.get("CXX")
    os.environ["CXX"] = cc  # cpp_extension's compiler
    try:
        cpp_extension.load(name=_NAME, sources=[str(CSRC / name) for name in SOURCES], extra_cflags=list(FLAGS),
                           extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                           verbose=False)
    finally:
        if env_cxx is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = env_cxx
    return "compiled"


def load() -> bool:
    """Build and load the library on first use; False (after one warning) if that fails."""
    global _loaded, _failed, first_call
    if _loaded or _failed:
        return _loaded
    with _lock:
        if not (_loaded or _failed):
            t0 = time.perf_counter()
            try:
                how = _build()
            except Exception as exc:  # noqa: BLE001 - any build/load failure means: use the Inductor path
                _failed = True
                first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                warnings.warn(f"normmatters.kernels: the native CPU kernels are unavailable "
                              f"({type(exc).__name__}: {first_line}); using the torch.compile kernels",
                              RuntimeWarning, stacklevel=3)
            else:
                _loaded = True
                first_call = (time.perf_counter() - t0, how)
                log.debug("normmatters.kernels: native library %s in %.2f s", how, first_call[0])
    return _loaded


def available() -> bool:
    return load()
