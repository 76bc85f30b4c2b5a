"""Compiled variants of :mod:`formulas`: one ``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on
CUDA) per norm and direction, compiled on first use, with a single warning and an eager fallback when
compilation is unavailable.

Each (direction, norm, dtype) gets its own copy of the function's code object, so Dynamo
keeps a separate cache (and recompile budget) per variant instead of one shared cache that norms x dtypes x
memory formats x sizes would exhaust (past the limit Dynamo silently runs the code eagerly). Shapes
are compiled with automatic dynamic shapes: the first call specialises, a second batch size / spatial
size recompiles once into a dynamic kernel that serves every later size.
"""

from __future__ import annotations

import logging
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import formulas

log = logging.getLogger(__name__)

_compiled: dict[tuple[str, ...], Callable[..., Any]] = {}
_failed: set[str] = set()
#: seconds spent in first calls (compilation) per (direction, norm, dtype, device)
compile_seconds: dict[tuple[str, str, str, str], float] = {}


def _copy(fn: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{suffix}")
    new = types.FunctionType(code, fn.__globals__, f"{fn.__name__}_{suffix}", fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def get(direction: str, norm: str, device: torch.device) -> Callable[..., Any]:
    """The compiled ``formulas.<direction>`` for ``norm`` (falls back to eager after a failure)."""
    base = getattr(formulas, direction)
    if device.type in _failed:
        return base
    return _guarded(base, direction, norm, device)


def _variant(base: Callable[..., Any], direction: str, norm: str, lead: Any) -> Callable[..., Any]:
    """One compiled copy per (direction, norm, dtype of the first argument): each has its own Dynamo cache, so
    a model mixing dtypes, layouts and sizes never exhausts a shared recompile budget (past it Dynamo silently
    runs the formulas eagerly, several times slower). Both contiguous and channels-last inputs reach the
    formulas as contiguous (G, m, q, C, S) views; S = 1 (channels-last, (N, C)) is specialized by Dynamo, so
    it gets a copy of its own ("rows")."""
    dtype = str(lead.dtype).replace("torch.", "") if isinstance(lead, torch.Tensor) else "any"
    # channels-last (and (N, C)) inputs arrive with S = 1, which Dynamo specializes: their own cache, so the
    # two layouts do not share one recompile budget
    rows = isinstance(lead, torch.Tensor) and lead.dim() == 5 and lead.shape[-1] == 1
    key = (direction, norm, dtype, "rows" if rows else "channels")
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = torch.compile(_copy(base, f"{norm}_{dtype}{'_rows' if rows else ''}"))
    return fn


def _guarded(base: Callable[..., Any], direction: str, norm: str,
             device: torch.device) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        key = (direction, norm, str(args[0].dtype), device.type)
        first = key not in compile_seconds
        # nn.Parameters (weight, bias) as plain tensors: Dynamo keeps a Parameter's shape static, so every
        # channel count would recompile, and past the recompile limit run eagerly (the kernels run under
        # no-grad inside the autograd Functions: detaching changes nothing else)
        args = tuple(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args)
        t0 = time.perf_counter()
        try:
            out = _variant(base, direction, norm, args[0])(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly from now on
            if device.type not in _failed:
                _failed.add(device.type)
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                warnings.warn(f"normmatters.kernels: torch.compile is unavailable on {device.type} "
                              f"({type(exc).__name__}: {first_line}); falling back to the eager lean "
                              "kernels (set NORMMATTERS_KERNEL=eager to silence this)", RuntimeWarning,
                              stacklevel=2)
            return base(*args, **kwargs)
        if first:
            compile_seconds[key] = time.perf_counter() - t0
            log.debug("normmatters.kernels: compiled %s/%s for %s on %s in %.1f s", direction, norm,
                     key[2], device.type, compile_seconds[key])
        return out

    return call
