"""The native per-sample (row) norm operators (``csrc/row_norm_ops.cpp``, built with the batch-norm kernels by
:mod:`.native_build`): their fake (meta) implementations, so ``torch.compile`` and ``torch.export`` trace them,
and their autograd (``torch.library.register_autograd``: the backward calls ``normmatters::lp_row_norm_bwd``).

* ``lp_row_norm_fwd(x, weight?, bias?, norm, centered, c, eps, k, chunks, groups, spatial) -> (y, mean, raw,
  aux)``: x (R, n) contiguous float32/float64/bfloat16/float16; the math of :mod:`.row_formulas` (per row μ
  (centered only, else an empty tensor), the estimator's raw statistic, σ̂ = c·raw, y = w·(x − μ)/sqrt(σ̂² +
  eps) + b); mean, raw (R,) and aux ((R,): top-k's k-th largest |d|, for estimators with ``row_aux``; else
  empty) in the compute dtype (float32 for 16-bit x). Differentiable in x, weight, bias, once.
* ``lp_row_norm_bwd(grad_y, x, weight?, mean, raw, aux, norm, centered, c, eps, k, chunks, groups, spatial,
  need_x, need_w, need_b) -> (grad_x, grad_w, grad_b)``: its backward (grad_w, grad_b flat in the compute
  dtype; an empty tensor where not needed).

Saved for backward: x, weight, mean, raw, aux — per row at most three scalars, against nn.LayerNorm's input,
weight, bias and per-row mean and rstd.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .._batch_stats import acc_dtype
from ..estimators import get_estimator
from . import native_build

__all__ = ["ensure", "ready", "fwd"]

_registered = False
_lock = threading.Lock()


def _affine_size(x: Tensor, groups: int, spatial: int) -> int:
    return groups * (x.shape[1] // spatial)


def _fwd_fake(x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial):
    R, acc = x.shape[0], acc_dtype(x.dtype)
    aux = R if get_estimator(norm).row_aux else 0
    return (torch.empty_like(x), x.new_empty(R if centered else 0, dtype=acc), x.new_empty(R, dtype=acc),
            x.new_empty(aux, dtype=acc))


def _bwd_fake(grad_y, x, weight, mean, raw, aux, norm, centered, c, eps, k, chunks, groups, spatial, need_x,
              need_w, need_b):
    acc, A = acc_dtype(x.dtype), _affine_size(x, groups, spatial)
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            x.new_empty(A if need_w and weight is not None else 0, dtype=acc),
            x.new_empty(A if need_b else 0, dtype=acc))


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial = inputs
    _, mean, raw, aux = output
    ctx.save_for_backward(x, weight, mean, raw, aux)
    ctx.args = (norm, centered, c, eps, k, chunks, groups, spatial)
    ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)
    ctx.mark_non_differentiable(mean, raw, aux)


def _backward(ctx, gy, _gmean, _graw, _gaux):
    x, weight, mean, raw, aux = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if gy is None:
        gy = torch.zeros_like(x)
    gx, gw, gb = torch.ops.normmatters.lp_row_norm_bwd(gy, x, weight, mean, raw, aux, *ctx.args, need_x,
                                                       need_w and weight is not None, need_b)
    gw = gw.reshape(weight.shape).to(weight.dtype) if need_w and weight is not None else None
    gb = gb.reshape(ctx.bias_like[0]).to(ctx.bias_like[1]) if need_b and ctx.bias_like is not None else None
    return (gx if need_x else None, gw, gb) + (None,) * 8


def _register() -> None:
    name = "normmatters::lp_row_norm_fwd"
    torch.library.register_fake(name)(_fwd_fake)
    torch.library.register_fake("normmatters::lp_row_norm_bwd")(_bwd_fake)
    torch.library.register_autograd(name, _backward, setup_context=_setup)


def ensure() -> bool:
    """Build/load the native library (:func:`.native_build.load`, one warning if it cannot be built) and register
    the row operators' fake implementations and autograd, once."""
    global _registered
    if _registered:
        return True
    if not native_build.load():
        return False
    with _lock:
        if not _registered:
            _register()
            _registered = True
    return True


def ready() -> bool:
    """Whether :func:`ensure` has succeeded (a plain flag: readable while ``torch.compile`` traces)."""
    return _registered


def fwd(x2: Tensor, weight: Tensor | None, bias: Tensor | None, norm: str, centered: bool, c: float, eps: float,
        k: int, chunks: int, groups: int, spatial: int) -> Tensor:
    """y of ``normmatters::lp_row_norm_fwd`` (differentiable); call :func:`ensure` first."""
    return torch.ops.normmatters.lp_row_norm_fwd(x2, weight, bias, norm, centered, c, eps, k, chunks, groups,
                                                 spatial)[0]
