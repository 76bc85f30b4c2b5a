"""Emulated low-precision forward of the per-sample layers: ``LpLayerNorm`` / ``LpRMSNorm`` / ``LpGroupNorm``
with ``precision=``.

The arithmetic is that of :mod:`normmatters.precision.emulate` (the batch-norm emulator), with rows = samples
(layer / RMS norm: every leading index; group norm: sample × group) instead of channels, and an element-wise
affine map instead of a per-row one. For a row of n elements, R_c / R_s / R_a rounding to the compute,
statistics and accumulator formats of the :class:`~normmatters.precision.emulate.Precision`::

    input       x̃ = R_c(x)
    layer/group μ = R_s(Σ_a x̃ / n);  d = R_c(x̃ − μ);  σ̂ from the estimator's emulation steps (centered c(n))
    rms         μ = 0;  d = x̃;        σ̂ from the same steps with the uncentered constant c(n, centered=False)
    denominator √(σ̂² + eps): the estimator's own (l2 forms σ̂² = R_s(Σ_a R_c(d²) / n)) or, for the others,
                the overflow-safe σ̂·√(1 + (√eps/σ̂)²) of the batch-norm emulator
    reciprocal  r = R_s(1 / ·);  normalize ŷ = R_c(d · r)
    affine      scale R_c(ŷ · R_c(weight_i));  shift R_c(· + R_c(bias_i))  (weight, bias per element)

So in fp16 the l2 layer forms d² and Σd²: a single |d| > 255.9 gives d² = inf, and n·mean(d²) > 65504
(RMS of d above 22.6 for n = 128) overflows the sum; σ̂ = inf, r = 0 and the output collapses to the bias —
finite, but the layer's input no longer reaches its output. l1 / linf / range form only values of the size of
d and a sum of n of them (l1: Σ|d| overflows only once n·mean|d| > 65504). ``fp32`` everywhere reproduces the
float32 layer to a few ulps (the denominator is evaluated in another, equally rounded, order).

Backward — straight-through, as :func:`normmatters.precision.layer.emulated_lp_batch_norm`: the forward value
is the emulated output, the gradient is that of the native float32 layer
(:mod:`normmatters.layer_functional`) on the same input. There are no running statistics; the emulated
forward is used in training and in eval alike (a per-sample layer computes its statistics at inference too).
Non-finite values of the emulated forward (inf / NaN output) are returned as they are — the loss shows them —
and the gradient stays that of the float32 layer; the events of one call are available from
:func:`emulate_per_sample`.

``precision="int8"`` (the quantized range batch norm of Banner et al. 2018) is batch-norm only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..estimators import get_estimator
from .emulate import EmulationResult, Precision, Rounder, _denominator, emulated_sum, get_precision

__all__ = ["emulate_per_sample", "check_per_sample_precision"]


def check_per_sample_precision(precision: str | Precision, where: str) -> Precision:
    """The :class:`Precision` for ``precision=`` of a per-sample layer, or a ``ValueError`` naming ``where``."""
    p = get_precision(precision, where)
    if p.quantized_int8:
        raise ValueError(f"{where}: precision='int8' (quantized range batch norm, Banner et al. 2018) exists for "
                         f"batch norm only; use fp32, bf16, fp16, fp8_e4m3 or fp8_e5m2")
    return p


def emulate_per_sample(x: Tensor, norm: str, precision: str | Precision, *, eps: float = 1e-5, k: int = 10,
                       chunks: int | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                       centered: bool = True, count_events: bool = True) -> EmulationResult:
    """Emulate ``y = weight · (x − μ) / √(σ̂² + eps) + bias`` per row of ``x`` (rows, n) in ``precision``
    (centered: layer / group norm), or ``y = weight · x / √(σ̂² + eps)`` (``centered=False``: RMS norm, μ = 0,
    uncentered constant). ``weight`` / ``bias``: per element, broadcastable to (rows, n), or None. Returns the
    :class:`EmulationResult` (float64 tensors holding values of their formats; ``mean`` is 0 uncentered)."""
    p = check_per_sample_precision(precision, "emulate_per_sample")
    est = get_estimator(norm)
    if x.dim() != 2:
        raise ValueError(f"emulate_per_sample: expected a (rows, n) tensor, got shape {tuple(x.shape)}")
    rows, n = x.shape
    R = Rounder(p, count=count_events)

    def rsum(t: Tensor, step: str) -> Tensor:
        return emulated_sum(t, p.accumulate, p.order, p.block, rounder=R, step=step)

    xq = R.c(x.detach().to(torch.float64), "input")
    if centered:
        mean = R.s(rsum(xq, "sum_x") / n, "mean")
        d = R.c(xq - mean[:, None], "center")
        sigma, den = est.emulate_sigma(xq, d, n, eps, rsum, R, k=k, chunks=chunks)
    else:
        mean, d = torch.zeros(rows, dtype=torch.float64), xq
        c_unc = est.constant(n, k=k, chunks=chunks, centered=False)
        if c_unc == est.constant(n, k=k, chunks=chunks):  # same constant: the estimator's steps as they are
            sigma, den = est.emulate_sigma(xq, d, n, eps, rsum, R, k=k, chunks=chunks)
        else:
            raw = est.emulate_raw(xq, d, n, rsum, R, k=k, chunks=chunks)
            sigma = R.s(R.s(torch.tensor(c_unc, dtype=torch.float64), "constant") * raw, "constant")
            den = None
    if den is None:
        den = _denominator(sigma, eps, R)
    inv = R.s(1 / den, "reciprocal")
    y = R.c(d * inv[:, None], "normalize")
    if weight is not None:
        y = R.c(y * R.c(weight.detach().to(torch.float64), "weight"), "scale")
    if bias is not None:
        y = R.c(y + R.c(bias.detach().to(torch.float64), "bias"), "shift")
    return EmulationResult(y, mean, sigma, inv, R.events)
