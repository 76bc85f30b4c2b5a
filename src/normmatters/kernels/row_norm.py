"""How a per-sample Lp norm call runs (``lp_layer_norm``, ``lp_rms_norm``, ``lp_group_norm`` of
:mod:`normmatters.layer_functional` and the layers of :mod:`normmatters.nn.layernorm`): the path, decided once per
(impl, device type, dtype, norm, k), and the one call that runs it.

The public functions validate and call :func:`rows` with x of any shape holding rows of n elements (layer / RMS
norm: the trailing normalized dims; group norm: sample × group). ``impl`` (else ``$NORMMATTERS_KERNEL``, else
"auto"; see :func:`normmatters.kernels.resolve_impl`) becomes a path by :func:`decide`:

* ``"native"`` (``impl="auto"`` on the CPU where the kernels cover the call — float32/float64/bfloat16/float16,
  top-k with k ≤ 64 —, and ``impl="native"`` on any device): the operator ``normmatters::lp_row_norm``
  (:mod:`.row_native`): on the CPU the C++/OpenMP row kernels (one row per task, each row's passes in L1/L2,
  vectorized along the row), on other devices a composite of torch ops; its autograd is C++;
* ``"compiled"`` (``impl="auto"`` off the CPU or where the native kernels do not cover the call, and
  ``impl="compiled"``): :mod:`.row_formulas` compiled by ``torch.compile`` (Inductor), per (direction, norm,
  centered, dtype); if compiling fails for an input, that input (device, dtype, shape) runs the eager formulas
  after one warning — other inputs keep compiling;
* ``"eager"``: the same formulas op by op;
* ``"reference"``: :func:`.row_formulas.reference`, autograd through every op.

"compiled" and "eager" keep a Python autograd Function (:class:`RowNormFunction`): they exist to run the formulas
themselves (Inductor compiles the forward and the backward formulas separately), which the operator's per-device
kernel cannot choose per call. Every fast path has an analytic backward that saves x, the weight and per-row
statistics (μ for the centered kinds, the raw statistic, and top-k's threshold). Half / bfloat16 input:
statistics in float32, output in the input's dtype. Nothing is read back to the host on any path. Inside a
user's ``torch.compile`` / ``torch.export`` the operator (or, for "compiled" / "eager", the formulas) goes into
the user's graph.
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

log = logging.getLogger(__name__)

__all__ = ["rows", "decide", "native_eligible", "RowNormFunction", "compile_seconds", "PATHS"]

#: what a call can run on (:func:`decide`)
PATHS = ("native", "triton", "compiled", "eager", "reference")
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_compiled: dict[tuple[str, ...], Callable[..., Any]] = {}
#: inputs (key, device type, shape) on which compiling failed: they run the eager formulas
_failed: set[tuple[Any, ...]] = set()
#: seconds of each compiled variant's first call, per (direction, norm, centered, dtype)
compile_seconds: dict[tuple[str, ...], float] = {}


def native_eligible(x2: Tensor, norm: str, k: int) -> bool:
    """The native CPU row kernels cover x2 (CPU, a dtype they implement, the estimator's own limits) and are
    built."""
    return decide("auto", x2.device.type, x2.dtype, norm, k) == "native" and row_native.native()


#: the paths decided: (impl, device type, dtype, norm, k) → path (:func:`decide`; callers look up here first)
DECIDED: dict[tuple[Any, ...], str] = {}


@torch._dynamo.assume_constant_result
def decide(impl: str, device_type: str, dtype: torch.dtype, norm: str, k: int) -> str:
    """The path (one of :data:`PATHS`) of a resolved ``impl`` for inputs of this device type and dtype, kept in
    :data:`DECIDED` (registers the operators on first use). Under ``torch.compile`` a constant of the trace."""
    path = _decide(impl, device_type, dtype, norm, k)
    try:
        DECIDED[(impl, device_type, dtype, norm, k)] = path
    except TypeError:  # an unhashable k: not kept
        pass
    return path


def _decide(impl: str, device_type: str, dtype: torch.dtype, norm: str, k: int) -> str:
    if impl in ("compiled", "eager", "reference"):
        return impl
    # "triton": the Triton row kernels (:mod:`.triton`; on CUDA, or on the CPU under Triton's interpreter), also
    # for "auto" on CUDA; beyond their limits (top-k's k) the eager formulas ("triton") or the usual choice
    if impl == "triton" or (impl == "auto" and device_type == "cuda"):
        from . import triton as triton_kernels
        if triton_kernels.covers(norm, k) and (impl == "triton" or triton_kernels.device_ok(device_type)):
            return "triton"
        if impl == "triton":
            return "eager"
    # --- the one place where a device's kernel is chosen. "native": the operator (CPU: the C++ kernels; other
    # --- devices: its composite, or a kernel registered for the device — the CUDA / Triton one); "auto": the
    # --- operator on the CPU, Inductor elsewhere. Beyond the native kernels' limits (top-k's k, dtype): Inductor.
    if dtype not in _NATIVE_DTYPES or not get_estimator(norm).native_covers(None, k, False):
        return "compiled"
    if impl == "auto" and device_type != "cpu":
        return "compiled"
    row_native.ensure()
    if device_type == "cpu" and not row_native.native():
        return "compiled"  # no C++ compiler: Inductor rather than the composite
    return "native"


def rows(x: Tensor, n: int, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, centered: bool,
         k: int, chunks: int | None, groups: int, spatial: int, path: str) -> Tensor:
    """y of x's shape: x holds rows of n elements (``x.reshape(-1, n)``), normalized by the ``path`` of
    :func:`decide`. ``centered``: subtract the row mean (layer, group norm) or not (RMS norm); weight / bias of
    ``groups · n/spatial`` elements (layer / RMS norm: groups = spatial = 1, one per element; group norm: one per
    channel of ``spatial`` elements, row r holding group r mod groups). Arguments are validated by the caller."""
    m = chunks or 1
    c = _CONSTANTS.get((norm, n, k, chunks, centered)) or _constant(norm, n, k, chunks, centered)
    if path == "native":
        return _ROW_OP(x, weight, bias, n, norm, centered, c, eps, k, m, groups, spatial)
    x2 = x.reshape(-1, n)
    if path == "triton":
        from . import triton as triton_kernels
        return triton_kernels.rows(x2, weight, bias, eps, norm, centered, k, chunks, groups, spatial,
                                   "normmatters").view(x.shape)
    if path == "reference":
        y = row_formulas.reference(x2, weight, bias, eps, norm, centered, k, chunks, groups, spatial)
    else:
        y = RowNormFunction.apply(x2, weight, bias, c, eps, norm, centered, k, m, groups, spatial, path)
    return y.view(x.shape)


def _ROW_OP(*args: Any) -> Tensor:  # noqa: N802 - rebound to the operator's overload once it exists
    row_native.ensure()
    global _ROW_OP
    _ROW_OP = torch.ops.normmatters.lp_row_norm.default
    return _ROW_OP(*args)


#: c(n) computed: (norm, n, k, chunks, centered) → constant (:func:`_constant`)
_CONSTANTS: dict[tuple[Any, ...], float] = {}


@torch._dynamo.assume_constant_result
def _constant(norm: str, n: int, k: int, chunks: int | None, centered: bool) -> float:
    """c(n) of the estimator (centered, or uncentered for RMS norm) as a Python float, computed once per argument
    tuple; under ``torch.compile`` / ``torch.export`` evaluated once at trace time and kept as a constant of the
    graph (its quadratures call numpy, which the tracer cannot follow). n is a static size: the row length."""
    c = float(get_estimator(norm).constant(int(n), k=k, chunks=chunks, centered=centered))
    _CONSTANTS[(norm, n, k, chunks, centered)] = c
    return c


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
    if impl == "eager" or torch.compiler.is_compiling() or x2.device.type == "meta":
        return base  # traced into the caller's graph under torch.compile
    return _guarded(base, direction, norm, centered, x2)


def _guarded(base: Callable[..., Any], direction: str, norm: str, centered: bool,
             x2: Tensor) -> Callable[..., Any]:
    """The compiled copy of ``base`` for (direction, norm, centered, dtype); the eager formulas (after one warning)
    for an input (device type, shape) on which compiling failed — only for that input."""
    key = (direction, norm, "centered" if centered else "uncentered", str(x2.dtype).replace("torch.", ""))
    device = x2.device.type
    failed = (key, device, tuple(x2.shape))
    if failed in _failed:
        return base

    def call(*args: Any) -> Any:
        fn = _compiled.get(key)
        if fn is None:
            fn = _compiled[key] = torch.compile(_copy(base, "_".join(("rows",) + key[1:])))
        args = tuple(a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - a compiler failure: this input runs eagerly from now on
            if failed not in _failed:
                _failed.add(failed)
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                warnings.warn(f"normmatters.kernels.row_norm: torch.compile failed on {device} rows of shape "
                              f"{list(failed[2])} ({type(exc).__name__}: {first}); using the eager row formulas "
                              f"for that input", RuntimeWarning, stacklevel=2)
            return base(*args)
        if key not in compile_seconds:
            compile_seconds[key] = time.perf_counter() - t0
            log.debug("normmatters.kernels.row_norm: compiled %s in %.1f s", key, compile_seconds[key])
        return out

    return call
