"""Fast paths of the per-sample Lp norms (``lp_layer_norm``, ``lp_rms_norm``, ``lp_group_norm`` of
:mod:`normmatters.layer_functional` and the layers of :mod:`normmatters.nn.layernorm`): which kernel runs, and
the autograd Function of the Inductor / eager paths.

The public functions reshape their input to rows x2 (R, n) — R samples (group norm: sample × group), n
normalized elements — and call :func:`rows` (through :data:`normmatters.layer_functional` 's hook, since the
import layers run layer_functional → kernels). ``impl`` (else ``$NORMMATTERS_KERNEL``, else "auto"; see
:func:`normmatters.kernels.resolve_impl`):

* ``"auto"``: ``"native"`` where it is eligible (:func:`native_eligible`: CPU; float32/float64/bfloat16/float16;
  top-k with k ≤ 64), else ``"compiled"``;
* ``"native"``: the C++/OpenMP row kernels, ``normmatters::lp_row_norm_fwd`` / ``_bwd`` (:mod:`.row_native`;
  built on first use with the batch-norm kernels); one row per OpenMP task chunk, each row's passes in L1/L2,
  vectorized along the row. Not eligible, or no compiler (one warning): ``"compiled"``;
* ``"compiled"``: :mod:`.row_formulas` compiled by ``torch.compile`` (Inductor; CPU and CUDA), per (direction,
  norm, centered, dtype); eager formulas after one warning if compiling fails;
* ``"eager"``: the same formulas op by op;
* ``"reference"``: the autograd reference path of :mod:`normmatters.layer_functional` (:func:`rows` returns
  None).

Every fast path has an analytic backward that saves x, the weight and per-row statistics (μ for the centered
kinds, the raw statistic, and top-k's threshold) — at most what ``nn.LayerNorm`` saves (input, weight, bias, μ
and rstd per row) plus, for top-k, one scalar per row. Half / bfloat16 input: statistics in float32, output in
the input's dtype. Inside a user's ``torch.compile`` / ``torch.export`` the native operators (or, for
"compiled" / "eager", the formulas) go into the user's graph.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..estimators import get_estimator
from . import row_formulas, row_native
from .compiled import _copy
from .impl import resolve_impl

log = logging.getLogger(__name__)

__all__ = ["rows", "native_eligible", "RowNormFunction", "compile_seconds"]

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_compiled: dict[tuple[str, ...], Callable[..., Any]] = {}
_failed: set[str] = set()
#: seconds of each compiled variant's first call, per (direction, norm, centered, dtype)
compile_seconds: dict[tuple[str, ...], float] = {}


def native_eligible(x2: Tensor, norm: str, k: int) -> bool:
    """The native row kernels cover x2 (CPU, a dtype they implement, the estimator's own limits) and are built
    (under ``torch.compile``: already built, as tracing cannot build them)."""
    if x2.device.type != "cpu" or x2.dtype not in _NATIVE_DTYPES:
        return False
    if not get_estimator(norm).native_covers(x2, k, False):
        return False
    return row_native.ready() if torch.compiler.is_compiling() else row_native.ensure()


def rows(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, centered: bool, k: int,
         chunks: int | None, groups: int, spatial: int, impl: str | None, where: str) -> Tensor | None:
    """y (R, n) of rows x2 by the chosen fast path, or None for ``impl="reference"`` (the caller runs it).
    ``centered``: subtract the row mean (layer, group norm) or not (RMS norm); weight / bias of
    ``groups · n/spatial`` elements (layer / RMS norm: groups = spatial = 1, one per element; group norm: one per
    channel of ``spatial`` elements, row r holding group r mod groups). Arguments are validated by the caller."""
    chosen = resolve_impl(impl, where)
    if chosen == "triton" or (chosen == "auto" and x2.device.type == "cuda"):  # the Triton kernels
        from . import triton as triton_kernels
        y = triton_kernels.rows(x2, weight, bias, eps, norm, centered, k, chunks, groups, spatial, where,
                                explicit=chosen == "triton")
        if y is not None:
            return y
        chosen = "auto" if chosen == "auto" else "eager"  # not covered (kernels.triton): the composite path
    if chosen == "reference":
        return None
    n = x2.shape[1]
    m = chunks or 1
    c = _constant(norm, int(n), k, chunks, centered)
    if chosen in ("auto", "native") and native_eligible(x2, norm, k):
        return row_native.fwd(x2.contiguous(), weight, bias, norm, centered, c, eps, k, m, groups, spatial)
    return RowNormFunction.apply(x2, weight, bias, c, eps, norm, centered, k, m, groups, spatial, chosen)


@torch._dynamo.assume_constant_result
def _constant(norm: str, n: int, k: int, chunks: int | None, centered: bool) -> float:
    """c(n) of the estimator (centered, or uncentered for RMS norm) as a Python float; under ``torch.compile`` /
    ``torch.export`` evaluated once at trace time and kept as a constant of the graph (its quadratures call numpy,
    which the tracer cannot follow). n is a static size: the row length of the layer."""
    return float(get_estimator(norm).constant(n, k=k, chunks=chunks, centered=centered))


class RowNormFunction(torch.autograd.Function):
    """The Inductor / eager row norm with the analytic backward of :mod:`.row_formulas`.

    forward(x2, weight, bias, c, eps, norm, centered, k, m, groups, spatial, impl) → y (R, n); saves x2, the
    weight, μ (centered only), raw and, for estimators with ``row_aux``, their per-row threshold.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, c, eps, norm, centered, k, m, groups, spatial, impl):
        y, mean, raw, aux = _kernel("forward", norm, centered, impl, x2)(
            x2, weight, bias, c, eps, norm, centered, k, m, groups, spatial)
        keep = tuple(aux) if get_estimator(norm).row_aux else ()
        ctx.save_for_backward(x2, weight, mean if centered else None, raw, *keep)
        ctx.meta = (c, eps, norm, centered, k, m, groups, spatial, impl)
        ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        c, eps, norm, centered, k, m, groups, spatial, impl = ctx.meta
        x2, weight, mean, raw, *aux = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.bias_like is not None
        gx, gw, gb = _kernel("backward", norm, centered, impl, x2)(
            gy, x2, weight, mean, raw, tuple(aux), c, eps, norm, centered, k, m, groups, spatial, need_w, need_b)
        gw = gw.reshape(weight.shape).to(weight.dtype) if need_w else None
        gb = gb.reshape(ctx.bias_like[0]).to(ctx.bias_like[1]) if need_b else None
        return (gx if need_x else None, gw, gb) + (None,) * 9


def _kernel(direction: str, norm: str, centered: bool, impl: str, x2: Tensor) -> Callable[..., Any]:
    base = getattr(row_formulas, direction)
    if impl == "eager" or torch.compiler.is_compiling() or x2.device.type in ("meta", *_failed):
        return base  # traced into the caller's graph under torch.compile
    return _guarded(base, direction, norm, centered, x2)


def _guarded(base: Callable[..., Any], direction: str, norm: str, centered: bool,
             x2: Tensor) -> Callable[..., Any]:
    """The compiled copy of ``base`` for (direction, norm, centered, dtype); the eager formulas (after one warning)
    if compiling fails on this device type."""
    key = (direction, norm, "centered" if centered else "uncentered", str(x2.dtype).replace("torch.", ""))
    device = x2.device.type

    def call(*args: Any) -> Any:
        fn = _compiled.get(key)
        if fn is None:
            fn = _compiled[key] = torch.compile(_copy(base, "_".join(("rows",) + key[1:])))
        args = tuple(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly from now on
            if device not in _failed:
                _failed.add(device)
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                warnings.warn(f"normmatters.kernels.row_norm: torch.compile is unavailable on {device} "
                              f"({type(exc).__name__}: {first}); using the eager row formulas", RuntimeWarning,
                              stacklevel=2)
            return base(*args)
        if key not in compile_seconds:
            compile_seconds[key] = time.perf_counter() - t0
            log.debug("normmatters.kernels.row_norm: compiled %s in %.1f s", key, compile_seconds[key])
        return out

    return call
