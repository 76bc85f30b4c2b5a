"""The training-mode math of the lean kernels as plain, traceable tensor code (compiled by ``compiled.py``).

Layout: the input is viewed (never copied for contiguous or channels-last inputs) as ``(G, m, q, C, S)``:
G ghost groups, m range chunks (1 unless ``norm="range", chunks=m``), q samples per chunk, C channels, S
spatial elements (for channels-last inputs the spatial elements are folded into q and S = 1). Per-channel
statistics keep their dims, ``(G, 1, 1, C, 1)``. With n = m·q·S elements per (group, channel)::

    forward   μ = mean(x),  σ̂ = c·raw(x − μ),  r = 1/sqrt(σ̂² + eps),  y = w·r·(x − μ) + b
    backward  x̂ = r·(x − μ),  g = ∂L/∂y,  Σg and Σg·x̂ per channel (one fused pass), then
              ∂L/∂x = w·r·(g − Σg/n) − w·r·Σg·x̂ · r·(e − mean(e))    (e: σ̂·∂σ̂/∂x, estimators.lean_dstat)
              ∂L/∂w = Σ_G Σg·x̂,  ∂L/∂b = Σ_G Σg

The first line of ∂L/∂x is the gradient through (x − μ) at fixed σ̂ and the second the one through σ̂
(chain rule: ∂L/∂σ̂ = −σ̂ r² Σ ∂L/∂x̂ · x̂), grouped so that nothing divides by σ̂ (finite on a constant
channel) and no product leaves the dtype's range for finite x (r = 1/hypot(σ̂, sqrt(eps)), never σ̂²:
:func:`normmatters.functional.inv_std`). Backward reads only the input x, the per-channel μ and raw
statistic and (range) the per-chunk extremes: the centered input, |d| and sign(d) are recomputed in
registers. Mean-only normalization: y = w·(x − μ) + b, ∂L/∂x = w·(g − Σg/n).

In-place mode (``inplace=True``, In-Place ABN, Rota Bulò et al. 2018): forward runs a statistics pass
(:func:`stats`) and then writes y into the input's buffer (:func:`forward_inplace`; the same memory traffic
as :func:`forward`); backward keeps only y, w, b and the (C,) raw statistic. It reconstructs the centered input::

    d = (y − b) / (w·r)      (mean-only: d = (y − b) / w;  w ≠ 0 is required)

and runs the backward above with x := d and μ := 0 (every formula depends on x only through d, and the
range extremes of d are those of x shifted by μ). σ̂ and r come from the forward's raw; the thresholds
that elements are compared against for equality (max |d|, the k-th largest |d|, per-chunk max / min) are
recomputed from the reconstructed d (``Estimator.lean_thresholds``), since d differs from the forward's
by rounding: about ulp(max(|y|, |b|)) / |w·r| per element, so a bias large against w·σ̂ costs accuracy.

The per-statistic pieces (raw, e, the extra sums) come from :mod:`normmatters.estimators`; this file only
composes them. Statistics accumulate in float32 for half/bfloat16 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._batch_stats import acc_dtype, inv_std, update_running_stats
from ..estimators import get_estimator

DIMS = (1, 2, 4)


def _per_channel(v: Tensor, acc: torch.dtype) -> Tensor:
    return v.to(acc)[None, None, None, :, None]


def forward(x5: Tensor, weight: Tensor, bias: Tensor, c: Tensor, eps: float, norm: str,
            k: int) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """(y, μ, raw, aux) for x5 of shape (G, m, q, C, S); raw is None-like (μ) for mean-only."""
    est = get_estimator(norm)
    x = x5.to(acc_dtype(x5.dtype))
    if not est.divides:
        mean = x.mean(DIMS, keepdim=True)
        return _normalize(x, weight, bias, mean, mean, c, eps, False).to(x5.dtype), mean, mean, ()
    mean, raw, aux = est.lean_stats(x, k)
    return _normalize(x, weight, bias, mean, raw, c, eps, True).to(x5.dtype), mean, raw, aux


def stats(x5: Tensor, norm: str, k: int) -> tuple[Tensor, Tensor]:
    """(μ, raw) of x5 (raw = μ for mean-only): the statistics pass of in-place mode."""
    est = get_estimator(norm)
    x = x5.to(acc_dtype(x5.dtype))
    if not est.divides:
        mean = x.mean(DIMS, keepdim=True)
        return mean, mean
    mean, raw, _ = est.lean_stats(x, k)
    return mean, raw


def forward_inplace(x5: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, raw: Tensor, c: Tensor, eps: float,
                    norm: str) -> None:
    """y from the statistics of :func:`stats`, written into x5 (in-place mode). Compiled, this is one
    elementwise kernel that stores into the input's buffer (no output allocation)."""
    x = x5.to(acc_dtype(x5.dtype))
    x5.copy_(_normalize(x, weight, bias, mean, raw, c, eps, get_estimator(norm).divides))


def _normalize(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, raw: Tensor, c: Tensor, eps: float,
               divides: bool) -> Tensor:
    """y = w·r·(x − μ) + b (mean-only: w·(x − μ) + b) in the accumulation dtype of x."""
    w = _per_channel(weight, x.dtype)
    b = _per_channel(bias, x.dtype)
    if not divides:
        return (x - mean) * w + b
    sigma = c.to(x.dtype) * raw
    scale = inv_std(sigma, eps) * w
    return (x - mean) * scale + b


def backward(gy5: Tensor, x5: Tensor, weight: Tensor, mean: Tensor, raw: Tensor, aux: tuple[Tensor, ...],
             c: Tensor, eps: float, norm: str, k: int, need_w: bool,
             need_b: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(∂L/∂x in x5's dtype and shape, ∂L/∂w, ∂L/∂b) from the saved input — see the module docstring."""
    x = x5.to(acc_dtype(x5.dtype))
    return _backward(gy5, x, x - mean, weight, raw, raw, aux, c, eps, norm, k, need_w, need_b, x5.dtype)


def backward_inplace(gy5: Tensor, y5: Tensor, weight: Tensor, bias: Tensor, raw: Tensor | None, c: Tensor,
                     eps: float, norm: str, k: int, need_w: bool,
                     need_b: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """As :func:`backward`, from the output y (in-place mode): d = (y − b) / (w·r) (mean-only: (y − b)/w),
    the thresholds recomputed from d (``Estimator.lean_thresholds``), then the same math with x = d, μ = 0."""
    est = get_estimator(norm)
    acc = acc_dtype(y5.dtype)
    y = y5.to(acc)
    w = _per_channel(weight, acc)
    b = _per_channel(bias, acc)
    if not est.divides:
        d = (y - b) / w
        return _backward(gy5, d, d, weight, d, d, (), c, eps, norm, k, need_w, need_b, y5.dtype)
    sigma = c.to(acc) * raw
    d = (y - b) / (w * inv_std(sigma, eps))
    raw_t, aux_t = est.lean_thresholds(d, raw, (), k)
    return _backward(gy5, d, d, weight, raw, raw_t, aux_t, c, eps, norm, k, need_w, need_b, y5.dtype)


def _backward(gy5: Tensor, x: Tensor, d: Tensor, weight: Tensor, raw: Tensor, raw_t: Tensor,
              aux: tuple[Tensor, ...], c: Tensor, eps: float, norm: str, k: int, need_w: bool, need_b: bool,
              dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The shared backward: x and d = x − μ in the accumulation dtype; σ̂ = c·raw; ``raw_t``, ``aux``: the
    statistics the estimator compares elements against (``raw`` itself unless reconstructed)."""
    est = get_estimator(norm)
    acc = x.dtype
    g = gy5.to(acc)
    n = x.shape[1] * x.shape[2] * x.shape[4]
    w = _per_channel(weight, acc)
    sum_g = g.sum(DIMS, keepdim=True)
    if not est.divides:
        gx = w * (g - sum_g / n)
        sum_gx = (g * d).sum(DIMS, keepdim=True) if need_w else None
    else:
        sigma = c.to(acc) * raw
        r = inv_std(sigma, eps)
        sum_gx = (g * d).sum(DIMS, keepdim=True) * r  # Σ g·x̂
        sums = est.lean_sums(x, d, raw_t, aux)
        e, e_mean = est.lean_dstat(x, d, c.to(acc), raw_t, sigma, aux, sums, n, k)  # σ̂·∂σ̂/∂x
        wr = w * r
        gx = wr * (g - sum_g / n) - (wr * sum_gx) * (r * (e - e_mean))
    gw = sum_gx.sum(DIMS + (0,)).to(weight.dtype) if need_w else None
    gb = sum_g.sum(DIMS + (0,)).to(weight.dtype) if need_b else None
    return gx.to(dtype), gw, gb


def update_running(mean: Tensor, raw: Tensor, c: Tensor, running_mean: Tensor | None,
                   running_var: Tensor | None, num_batches_tracked: Tensor | None, momentum: float | Tensor,
                   n: int, divides: bool) -> Tensor:
    """The reference's running-statistics update with σ̂ = c·raw (compiled into one kernel by
    :mod:`.compiled`); mean, raw: (G, C). Returns the 0-dim "statistics are finite" flag."""
    return update_running_stats(mean, c * raw if divides else None, running_mean, running_var,
                                num_batches_tracked, momentum, n)
