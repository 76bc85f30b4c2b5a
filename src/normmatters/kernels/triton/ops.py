"""The Triton kernels as ``torch.library`` operators, namespace ``normmatters_triton::``.

=============================================================================================================
operator (schema)                                                                        autograd
=============================================================================================================
``bn_fwd(Tensor x, Tensor? weight, Tensor? bias, float c, float eps, str norm, int k,      → ``bn_bwd``
int groups, int chunks) -> (Tensor y, Tensor mean, Tensor raw, Tensor aux)``
``bn_bwd(Tensor gy, Tensor x, Tensor? weight, Tensor mean, Tensor raw, Tensor aux,          none
float c, float eps, str norm, int k, int groups, int chunks) -> (Tensor gx, Tensor gw, Tensor gb)``
``bn_update(Tensor mean, Tensor? raw, Tensor(a!)? running_mean, Tensor(b!)? running_var,    none (no_grad)
Tensor(c!)? num_batches_tracked, Tensor(d!)? skipped, float c, float momentum,
Tensor? momentum_t, int n) -> Tensor status``
``row_fwd(Tensor x, Tensor? weight, Tensor? bias, float c, float eps, str norm,            → ``row_bwd``
bool centered, int k, int chunks, int groups, int spatial) -> (Tensor y, Tensor mean, Tensor raw, Tensor aux)``
``row_bwd(Tensor gy, Tensor x, Tensor? weight, Tensor mean, Tensor raw, Tensor aux, float c, none
float eps, str norm, bool centered, int k, int chunks, int groups, int spatial)
-> (Tensor gx, Tensor gw, Tensor gb)``
=============================================================================================================

Shapes: batch norm x (N, C, *), statistics (G, C) with G ghost groups (``groups``), ``chunks`` 0 or m (range);
rows x (R, n), statistics (R,). mean / raw / aux in the accumulation dtype (float32; float64 for float64 input);
``c`` the estimator's constant c(n) (:mod:`normmatters.estimators`), never computed here. The autograd
registration (``register_autograd``) saves x, the weight and the statistics — never an activation-sized
intermediate. Each op has an explicit fake implementation (shapes only).

How they are registered: with ``torch.library.triton_op`` (the kernels launched through ``wrap_triton``), so
``torch.compile`` and ``torch.export`` see the Triton kernels, on a real GPU. Under Triton's interpreter
(``TRITON_INTERPRET=1`` when this module is imported) ``wrap_triton`` hands back the interpreted kernel, which can
only run on real tensors — tracing through it on fake tensors fails — so there the same functions are
registered with ``torch.library.custom_op`` (opaque to the tracer, with the same fake implementations).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import batch_norm as bn
from . import row_norm as rn
from .running import update_running

__all__ = ["INTERPRET", "bn_fwd", "bn_bwd", "bn_update", "row_fwd", "row_bwd"]

#: whether the kernels run under Triton's interpreter (read once, when the kernels are defined)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_define = torch.library.custom_op if INTERPRET else torch.library.triton_op
_NS = "normmatters_triton"


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- batch statistics -------------------------------------------------------------------------------------

@_define(f"{_NS}::bn_fwd", mutates_args=())
def bn_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, c: float, eps: float, norm: str, k: int,
           groups: int, chunks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return bn.forward(x, weight, bias, c, eps, norm, k, groups, chunks)


@bn_fwd.register_fake
def _(x, weight, bias, c, eps, norm, k, groups, chunks):
    C = x.shape[1]
    acc = _acc(x)
    stat = x.new_empty((groups, C), dtype=acc)
    return (bn.out_like(x), stat, torch.empty_like(stat), x.new_empty(bn.aux_shape(norm, groups, C, chunks),
                                                                      dtype=acc))


@_define(f"{_NS}::bn_bwd", mutates_args=())
def bn_bwd(gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, raw: Tensor, aux: Tensor, c: float,
           eps: float, norm: str, k: int, groups: int, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    return bn.backward(gy, x, weight, mean, raw, aux, c, eps, norm, k, groups, chunks)


@bn_bwd.register_fake
def _(gy, x, weight, mean, raw, aux, c, eps, norm, k, groups, chunks):
    C = x.shape[1]
    return bn.out_like(x), mean.new_empty((C,)), mean.new_empty((C,))


def _bn_setup(ctx, inputs, output):
    x, weight, bias, c, eps, norm, k, groups, chunks = inputs
    _, mean, raw, aux = output
    ctx.mark_non_differentiable(mean, raw, aux)  # (they feed the running statistics only)
    ctx.save_for_backward(x, weight, mean, raw, aux)
    ctx.args = (c, eps, norm, k, groups, chunks)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _bn_backward(ctx, gy, _gmean, _graw, _gaux):
    x, weight, mean, raw, aux = ctx.saved_tensors
    if gy is None:
        return (None,) * 9
    gx, gw, gb = bn_bwd(gy, x, weight, mean, raw, aux, *ctx.args)
    gw = gw.to(weight.dtype) if weight is not None else None
    gb = gb.to(ctx.bias_dtype) if ctx.has_bias else None
    return (gx, gw, gb) + (None,) * 6


bn_fwd.register_autograd(_bn_backward, setup_context=_bn_setup)


@_define(f"{_NS}::bn_update",
         mutates_args=("running_mean", "running_var", "num_batches_tracked", "skipped"))
def bn_update(mean: Tensor, raw: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
              num_batches_tracked: Tensor | None, skipped: Tensor | None, c: float, momentum: float,
              momentum_t: Tensor | None, n: int) -> Tensor:
    return update_running(mean, raw, running_mean, running_var, num_batches_tracked, skipped, c,
                             momentum_t if momentum_t is not None else momentum, n)


@bn_update.register_fake
def _(mean, raw, running_mean, running_var, num_batches_tracked, skipped, c, momentum, momentum_t, n):
    return mean.new_empty((), dtype=torch.int64)


# --- rows -------------------------------------------------------------------------------------------------

@_define(f"{_NS}::row_fwd", mutates_args=())
def row_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, c: float, eps: float, norm: str, centered: bool,
            k: int, chunks: int, groups: int, spatial: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return rn.forward(x, weight, bias, c, eps, norm, centered, k, chunks, groups, spatial)


@row_fwd.register_fake
def _(x, weight, bias, c, eps, norm, centered, k, chunks, groups, spatial):
    R = x.shape[0]
    acc = _acc(x)
    stat = x.new_empty((R,), dtype=acc)
    aux = x.new_empty(rn.aux_shape(norm, R, chunks), dtype=acc)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat), aux


@_define(f"{_NS}::row_bwd", mutates_args=())
def row_bwd(gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, raw: Tensor, aux: Tensor, c: float,
            eps: float, norm: str, centered: bool, k: int, chunks: int, groups: int,
            spatial: int) -> tuple[Tensor, Tensor, Tensor]:
    return rn.backward(gy, x, weight, mean, raw, aux, c, eps, norm, centered, k, chunks, groups, spatial)


@row_bwd.register_fake
def _(gy, x, weight, mean, raw, aux, c, eps, norm, centered, k, chunks, groups, spatial):
    n = x.shape[1]
    width = groups * n // spatial
    return (torch.empty_like(x, memory_format=torch.contiguous_format), mean.new_empty((width,)),
            mean.new_empty((width,)))


def _row_setup(ctx, inputs, output):
    x, weight, bias, c, eps, norm, centered, k, chunks, groups, spatial = inputs
    _, mean, raw, aux = output
    ctx.mark_non_differentiable(mean, raw, aux)
    ctx.save_for_backward(x, weight, mean, raw, aux)
    ctx.args = (c, eps, norm, centered, k, chunks, groups, spatial)
    ctx.bias_like = (bias.shape, bias.dtype) if bias is not None else None


def _row_backward(ctx, gy, _gmean, _graw, _gaux):
    x, weight, mean, raw, aux = ctx.saved_tensors
    if gy is None:
        return (None,) * 11
    gx, gw, gb = row_bwd(gy, x, weight, mean, raw, aux, *ctx.args)
    gw = gw.reshape(weight.shape).to(weight.dtype) if weight is not None else None
    gb = gb.reshape(ctx.bias_like[0]).to(ctx.bias_like[1]) if ctx.bias_like is not None else None
    return (gx, gw, gb) + (None,) * 8


row_fwd.register_autograd(_row_backward, setup_context=_row_setup)
