"""``emulated_lp_batch_norm``: the layer path behind ``LpBatchNorm*(precision=...)``.

Training forward: the input (N, C, *) is viewed as rows = (ghost group, channel) of n = g · spatial elements
and normalized by :func:`normmatters.precision.emulate.emulate_normalization` with every intermediate
rounded. The running statistics are updated from the *emulated* μ and σ̂ (as float32 buffers, with the
reference path's conventions: running_var ← σ̂² · n/(n − 1), non-finite batches never reach the buffers).

Backward — straight-through: the forward value is the emulated output, the gradient is that of the native
float32 layer :func:`normmatters.functional.lp_batch_norm` on the same input (batch statistics
included), i.e. every rounding is treated as the identity (Bengio et al. 2013; Courbariaux et al. 2015).
So ``precision=`` emulates low-precision *forward* normalization; gradients stay in float32. Where the
emulated forward overflows (inf/NaN output) the loss shows it; the gradient itself stays finite.

Eval: the native path (running statistics folded into a per-channel affine map, computed once at high
precision, is what low-precision inference does).

``precision="int8"`` follows the quantized range batch norm of Banner et al. 2018 (sec. 5 and their
``RangeBN``): the input is quantized to 8 bits on a uniform grid over its [min, max] (per tensor); μ and σ̂
are computed from the quantized values by the float32 emulator (``PRESETS["fp32"]``: float32
intermediates and accumulators — this stands in for the wide integer accumulators of an 8-bit datapath; it is
not an integer-exact emulation: float32 sums of 8-bit grid values are exact only while they stay below 2^24
grid steps); the per-channel scale 1/√(σ̂² + eps) is quantized to 8 bits
over [min, max] across channels; the output is quantized to 8 bits over its own [min, max]; gradients
flow straight through in float32 ("gradients in higher precision"). Other norms with "int8" use the same
scheme with their σ̂.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._batch_stats import (
    NONFINITE,
    BatchNormTensors,
    NonFiniteBatchError,
    call_momentum,
    check_input,
    reference_batch_norm,
    report_nonfinite,
    training_groups,
    update_running_stats,
)
from ..options import NormOptions
from .emulate import PRESETS, EmulationResult, Events, Precision, emulate_normalization, get_precision

__all__ = ["emulated_lp_batch_norm", "emulated_batch_norm", "quantize_uniform"]

#: events of the most recent emulated forward per ``where`` name (inspection/debugging aid)


def quantize_uniform(x: Tensor, bits: int, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """Round ``x`` to the 2^bits-level uniform grid lo + k·s, s = (hi − lo)/(2^bits − 1), k = 0…2^bits − 1
    (round half to even, clamped): the dynamic-range quantizer of Banner et al. 2018. hi == lo → x."""
    lo = torch.as_tensor(lo, dtype=x.dtype)
    hi = torch.as_tensor(hi, dtype=x.dtype)
    s = (hi - lo) / (2 ** bits - 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = lo + torch.clamp(torch.round((x - lo) / safe), 0, 2 ** bits - 1) * safe
    return torch.where(s > 0, q, x)


class _StraightThrough(torch.autograd.Function):
    """Forward: the emulated value. Backward: the incoming gradient goes to the native output."""

    @staticmethod
    def forward(ctx, native: Tensor, emulated: Tensor) -> Tensor:
        return emulated.to(native.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _rows(x: Tensor, groups: int, C: int) -> Tensor:
    """(N, C, *) → (groups · C, n): rows = (ghost group, channel)."""
    return x.reshape(groups, x.shape[0] // groups, C, -1).permute(0, 2, 1, 3).reshape(groups * C, -1)


def _unrows(y: Tensor, shape: torch.Size, groups: int) -> Tensor:
    C = shape[1]
    g = shape[0] // groups
    return y.reshape(groups, C, g, -1).permute(0, 2, 1, 3).reshape(shape)


def _int8(x: Tensor, norm: str, eps: float, k: int, chunks: int | None, weight: Tensor | None,
          bias: Tensor | None) -> EmulationResult:
    xd = x.to(torch.float64)
    xq = quantize_uniform(xd, 8, xd.min(), xd.max())
    events = Events()
    events.add("input", underflow=int(((xd != 0) & (xq == 0)).sum()), nan=int(xq.isnan().sum()))
    st = emulate_normalization(xq.to(torch.float32), norm, PRESETS["fp32"], eps=eps, k=k, chunks=chunks)
    for step, c in st.events.counts.items():
        events.add(step, **c)
    d = xq - st.mean[:, None]
    if st.inv is None:
        y = d
        inv = None
    else:
        inv = quantize_uniform(st.inv, 8, st.inv.min(), st.inv.max())
        y = d * inv[:, None]
    if weight is not None:
        y = y * weight.detach().to(torch.float64)[:, None]
    if bias is not None:
        y = y + bias.detach().to(torch.float64)[:, None]
    yq = quantize_uniform(y, 8, y.min(), y.max())
    events.add("output", underflow=int(((y != 0) & (yq == 0)).sum()), nan=int(yq.isnan().sum()))
    return EmulationResult(yq.to(torch.float32).to(torch.float64), st.mean, st.sigma, inv, events)


def emulated_lp_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    norm: str = "l1",
    k: int = 10,
    chunks: int | None = None,
    ghost_batch_size: int | None = None,
    *,
    precision: str | Precision = "fp16",
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "skip",
    where: str = "emulated_lp_batch_norm",
    options: NormOptions | None = None,
) -> Tensor:
    """:func:`normmatters.functional.lp_batch_norm` with the training forward emulated in ``precision``
    (a name of ``PRESETS`` or a :class:`Precision`) and a straight-through backward; see the module
    docstring. Arguments and return value as in ``lp_batch_norm`` (``options``: a
    :class:`~normmatters.options.NormOptions` instead of the option arguments; its ``precision``, if set, is
    the one emulated)."""
    opts = NormOptions.resolve(options, where, momentum=momentum, eps=eps, norm=norm, k=k, chunks=chunks,
                               ghost_batch_size=ghost_batch_size, nonfinite=nonfinite)
    if opts.precision is None:
        opts = NormOptions.trusted({**opts.as_dict(), "precision": precision, "inplace": False})
    tensors = BatchNormTensors(weight, bias, running_mean, running_var, num_batches_tracked)
    updates = training and not (running_mean is None and running_var is None)
    return emulated_batch_norm(input, tensors, opts, training,
                               call_momentum(opts.momentum, num_batches_tracked, where, updates), where)


def emulated_batch_norm(input: Tensor, tensors: BatchNormTensors, options: NormOptions, training: bool,
                        momentum: float | Tensor, where: str, skipped: Tensor | None = None) -> Tensor:
    """:func:`emulated_lp_batch_norm` on one :class:`~normmatters.functional.BatchNormTensors` and validated
    ``options`` (``options.precision`` the format; eval: the reference path); ``momentum`` this step's;
    ``skipped`` the layer's counter of skipped batches (``report_nonfinite``)."""
    p = get_precision(options.precision, where)
    if not training:
        return reference_batch_norm(input, tensors, options, False, momentum, where)
    weight, bias, running_mean, running_var, num_batches_tracked = tensors
    norm, k, chunks, eps, nonfinite = options.norm, options.k, options.chunks, options.eps, options.nonfinite
    check_input(input, where=where)
    groups, g, n = training_groups(input, where, norm, k, chunks, options.ghost_batch_size)
    C = input.shape[1]
    plain = NormOptions.trusted({**options.as_dict(), "nonfinite": "ignore"})
    native = reference_batch_norm(input, BatchNormTensors(weight, bias, None, None, None), plain, True, momentum,
                                  where)
    with torch.no_grad():
        rows = _rows(input.detach(), groups, C)
        w = weight.repeat(groups) if weight is not None else None
        b = bias.repeat(groups) if bias is not None else None
        if p.quantized_int8:
            res = _int8(rows, norm, eps, k, chunks, w, b)
        else:
            res = emulate_normalization(rows, norm, p, eps=eps, k=k, chunks=chunks, weight=w, bias=b)
        y = _unrows(res.y, input.shape, groups)
    out = _StraightThrough.apply(native, y)

    sigma = res.sigma.reshape(groups, C) if res.sigma is not None else None
    with torch.no_grad():
        ok = update_running_stats(res.mean.reshape(groups, C), sigma, running_mean, running_var,
                                  num_batches_tracked, momentum, n)
    if nonfinite == "raise" and not torch.compiler.is_compiling() and int(ok) == NONFINITE:  # (syncs: "raise")
        if skipped is not None:
            skipped.add_(1)
        raise NonFiniteBatchError(f"{where}: emulated {p.name or 'low-precision'} statistics are non-finite "
                                  f"({res.events}); running statistics left unchanged (nonfinite='skip', the "
                                  "default, skips such batches on the device)")
    report_nonfinite(ok, nonfinite, where, stacklevel=3, skipped=skipped)
    return out
