"""The estimator registry: every dispersion measure σ̂ and its Gaussian-consistency constant, by name.

An Lp batch-norm layer computes ``y = weight · (x − μ) / sqrt(σ̂² + eps) + bias`` per channel, μ and σ̂
reduced over the n elements of a channel (batch and spatial axes). The estimator decides σ̂:

========  ==============================================  =============================================
name      σ̂ over the n reduced elements, d = x − μ        constant c(n) (E over n iid N(0, 1) draws)
========  ==============================================  =============================================
``l2``    sqrt(mean(d²))                                    1 (this *is* the biased std s_n)
``l1``    c₁(n) · mean(|d|)                                 E[s_n] / (sqrt(2/π) · sqrt((n−1)/n))
``linf``  c∞(n) · max(|d|)                                  E[s_n] / (sqrt((n−1)/n) · E[max of n |z|])
``topk``  c_k(n) · mean of the k largest |d|                E[s_n] / (sqrt((n−1)/n) · E[mean top-k |z|])
``range`` c_r(n/m) · mean over m chunks of (max − min)      E[s_n] / d₂(n/m)
``mean``  none (mean-only batch norm: y = weight·d + bias)  —
========  ==============================================  =============================================

with ``E[s_n] = sqrt(2/n)·Γ(n/2)/Γ((n−1)/2)`` (see :mod:`normmatters.constants`). Every c(n) makes
E[σ̂] = E[s_n] at the actual n, so on Gaussian input each layer normalizes like ``nn.BatchNorm``.
``l1`` and ``range`` are exact for Gaussian input. ``linf`` and ``topk`` treat the n deviations d_i as
independent N(0, (n−1)/n) draws; the true d_i are slightly negatively correlated. Monte Carlo puts the
resulting error of E[σ̂]/E[s_n] below 0.5 % at n = 16, below 0.05 % for n ≥ 64 and shrinking as 1/n, but
at 6 % at n = 4 (tests/test_estimators.py measures it).

The published constants are asymptotic: the paper's L∞ constant 0.5·(1+sqrt(π·ln 4))/sqrt(2·ln n)
over-estimates σ by 39–46 % for n = 64…65536 (Hoffer et al. 2018, sec. 4); :func:`paper_linf_constant`
keeps it for comparison only.

Partial statistics (for synced statistics across processes): a statistic is computed in two stages that
each reduce partial results with sum / max / min / top-k merge, so shards can be combined exactly:

1. ``mean_partial(x, dims)`` → {"count", "sum"}; combined → μ.
2. ``estimator.partial(x, mean, dims)`` → fields listed in ``estimator.reductions``; combined with
   :func:`combine`; ``estimator.finalize(part, n)`` → σ̂ (constant applied).

Uncentered (RMS norm, :mod:`normmatters.layer_functional`): ``constant(n, centered=False)`` targets
``E[RMS_n] = sqrt(2/n)·Γ((n+1)/2)/Γ(n/2)`` with the statistic of x itself (d = x, exactly iid, so no
sqrt((n−1)/n) factor): l1 E[RMS_n]/sqrt(2/π), linf / topk E[RMS_n]/E[max / mean top-k of n |z|], range
E[RMS_n]/d₂(n); ``statistic_uncentered(x, dims, n)`` computes it.

``estimator.statistic(x, mean, dims, n)`` runs stage 2 locally. ``dims`` are the reduced dimensions of
``x``; the result has the remaining shape.
"""

from __future__ import annotations

from . import l1, l2, linf, mean, range, topk
from .base import (
    ESTIMATORS,
    Estimator,
    Partial,
    available_norms,
    combine,
    get_estimator,
    mean_partial,
    norms_with_option,
    paper_linf_constant,
    paper_range_constant,
    register_estimator,
)

# one module per norm; registered in this order (that of available_norms())
for _module in (l2, l1, linf, topk, range, mean):
    register_estimator(_module.ESTIMATOR)
del _module

__all__ = [
    "Estimator",
    "Partial",
    "ESTIMATORS",
    "get_estimator",
    "register_estimator",
    "available_norms",
    "combine",
    "mean_partial",
    "norms_with_option",
    "paper_linf_constant",
    "paper_range_constant",
]
