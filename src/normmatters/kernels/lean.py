"""The lean autograd Functions: training-mode Lp batch norm with an analytic backward that saves only the input,
the weight and per-channel statistics (:class:`LeanBatchNormFunction`), and its in-place variant
(:class:`LeanBatchNormInplaceFunction`, In-Place ABN style); the formulas they run are :mod:`.formulas`, eager or
compiled (:mod:`.compiled`).

Which path a call takes (reference, eager, compiled, native, emulated) is decided in one place,
:mod:`.dispatch`; :func:`lean_batch_norm`, the functional entry, lives there too (importable from here as
before). Saved for backward: the input, the weight and per-channel statistics (μ, the raw statistic and, for
range, per-chunk max and min) — at most the five (C,)-vectors + input that ``nn.BatchNorm2d`` saves. With
``inplace=True`` the output overwrites the input and backward saves only the output itself, the weight, the bias
and the (C,) raw statistic: it reconstructs the centered input from the output, which needs every weight entry
non-zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..estimators import get_estimator
from . import compiled, formulas
from .saved import save_stats, saved_stats

__all__ = ["LeanBatchNormFunction", "LeanBatchNormInplaceFunction", "gaussian_constant", "kernel", "view5",
           "unview5", "is_channels_last"]

#: names that moved to :mod:`.dispatch` and stay importable from here
_MOVED = ("lean_batch_norm", "IMPLS", "ENV", "resolve_impl", "NativePlan", "check_inplace_weight")


def __getattr__(name: str) -> Any:  # (PEP 562: .dispatch imports this module, so not at import time)
    if name in _MOVED:
        from . import dispatch
        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def gaussian_constant(norm: str, n: int, k: int, chunks: int | None, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """c(n) of ``norm`` as a 0-dim tensor (1 for mean-only); see :meth:`Estimator.constant_tensor`."""
    return get_estimator(norm).constant_tensor(n, dtype, device, k=k, chunks=chunks)


# --- layout --------------------------------------------------------------------------------------------

def is_channels_last(x: Tensor) -> bool:
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def view5(t: Tensor, groups: int, m: int, channels_last: bool) -> Tensor:
    """(N, C, *) → (G, m, q, C, S), a view for contiguous / channels-last tensors (a copy otherwise)."""
    C = t.shape[1]
    if channels_last:
        return t.movedim(1, -1).reshape(groups, m, -1, C, 1)
    return t.contiguous().view(groups, m, t.shape[0] // (groups * m), C, -1)


def unview5(t5: Tensor, like: Tensor, channels_last: bool) -> Tensor:
    if channels_last:
        return t5.reshape(like.movedim(1, -1).shape).movedim(-1, 1)
    return t5.reshape(like.shape)


def kernel(direction: str, norm: str, path: str, device: torch.device):
    """``formulas.<direction>`` for the "eager" path, its compiled variant for "compiled" (:mod:`.dispatch`
    chooses); inside a torch.compile trace always the plain formulas (traced into the caller's graph)."""
    if path == "eager" or torch.compiler.is_compiling() or device.type == "meta":
        return getattr(formulas, direction)
    return compiled.get(direction, norm, device)


class LeanBatchNormFunction(torch.autograd.Function):
    """Training-mode Lp batch norm with an analytic backward that saves only x, w and (C,)-statistics.

    forward(x, weight, bias, c, eps, norm, k, groups, chunks, impl) → (y, μ (G, C), raw (G, C));
    μ and raw are non-differentiable (they feed the running statistics).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, c, eps, norm, k, groups, m, impl):
        cl = is_channels_last(x)
        x5 = view5(x, groups, m, cl)
        y5, mean, raw, aux = kernel("forward", norm, impl, x.device)(x5, weight, bias, c, eps, norm, k)
        # detached alias, not a view of an internal tensor: callers may modify y in place (ReLU(inplace))
        y = unview5(y5, x, cl).detach()
        save_stats(ctx, x, weight, get_estimator(norm).divides, mean, raw, tuple(aux))
        ctx.c = c  # a cached constant, not an activation
        ctx.meta = (eps, norm, k, groups, m, impl, cl)
        C = x.shape[1]
        mean_gc = mean.reshape(groups, C)
        raw_gc = raw.reshape(groups, C)
        ctx.mark_non_differentiable(mean_gc, raw_gc)
        return y, mean_gc, raw_gc

    @staticmethod
    def backward(ctx, gy, _gmean, _graw):
        eps, norm, k, groups, m, impl, cl = ctx.meta
        x, weight, mean, raw, aux = saved_stats(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx5, gw, gb = kernel("backward", norm, impl, x.device)(
            view5(gy, groups, m, cl), view5(x, groups, m, cl), weight, mean, raw, aux, ctx.c, eps, norm,
            k, need_w, need_b)
        gx = unview5(gx5, x, cl) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None, None


class LeanBatchNormInplaceFunction(torch.autograd.Function):
    """In-place mode (In-Place ABN style): y overwrites x; backward saves only y, w, b and raw.

    forward(x, weight, bias, mean, raw, c, eps, norm, k, groups, chunks, impl) → x (normalized, marked
    dirty). ``mean`` and ``raw`` (G, 1, 1, C, 1) are the batch statistics of x from ``formulas.stats``,
    computed beforehand without autograd: the gradient through them is part of this backward. They are
    inputs rather than outputs because a Function that modifies a view in place may return only one tensor.
    Every weight entry must be non-zero (checked by :func:`lean_batch_norm`, not here).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, raw, c, eps, norm, k, groups, m, impl):
        cl = is_channels_last(x)
        x5 = view5(x, groups, m, cl)
        # x5 is a view of x for contiguous and channels-last x: the kernel stores y into x's buffer
        kernel("forward_inplace", norm, impl, x.device)(x5, weight, bias, mean, raw, c, eps, norm)
        if not (cl or x.is_contiguous()):  # other strides: _view5 copied; write the normalized copy back
            x.copy_(unview5(x5, x, cl))
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, *((raw,) if get_estimator(norm).divides else ()))
        ctx.c = c
        ctx.meta = (eps, norm, k, groups, m, impl, cl)
        return x

    @staticmethod
    def backward(ctx, gy):
        eps, norm, k, groups, m, impl, cl = ctx.meta
        y, weight, bias, *rest = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx5, gw, gb = kernel("backward_inplace", norm, impl, y.device)(
            view5(gy, groups, m, cl), view5(y, groups, m, cl), weight, bias, rest[0] if rest else None,
            ctx.c, eps, norm, k, need_w, need_b)
        gx = unview5(gx5, y, cl) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None, None, None, None
