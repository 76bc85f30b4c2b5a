"""``linf``: σ̂ = c∞(n) · max(|d|), c∞(n) = E[s_n] / (sqrt((n−1)/n) · E[max of n |z|]);
uncentered (RMS norm, d = x): E[RMS_n] / E[max of n |z|]."""

from __future__ import annotations

import torch

from .. import constants
from .base import _LEAN_DIMS, Estimator, _centered, _sqrt_ratio, paper_linf_constant
from .extremes import _extreme_pieces, _extreme_sums


class _Linf(Estimator):
    def constant(self, n, k=10, chunks=None, centered=True):
        if not centered:  # E[RMS_n] / E[max of n |z|]: the x_i are exactly iid, no sqrt((n−1)/n)
            return constants.expected_rms(n) / constants.expected_top_k_mean(n, 1)
        return constants.expected_biased_std(n) / (_sqrt_ratio(n) * constants.expected_top_k_mean(n, 1))

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {"max_abs": _centered(x, mean, dims).abs().amax(dims)}

    def finalize(self, part, n, k=10, chunks=None):
        return part["max_abs"] * self.scale(n, part["max_abs"])

    def expected_raw(self, n, k=10):
        return _sqrt_ratio(n) * constants.expected_top_k_mean(n, 1)

    def paper_constant(self, n):
        return paper_linf_constant(n)

    def emulate_raw(self, xq, d, n, rsum, rounder, k=10, chunks=None):
        return d.abs().amax(-1)

    def lean_raw(self, x, d, k=10):
        return d.abs().amax(_LEAN_DIMS, keepdim=True), ()

    def lean_sums(self, x, d, raw, aux):
        return _extreme_sums(d, raw)  # raw = max|d| is the threshold

    def lean_thresholds(self, d, raw, aux, k=10):
        return self.lean_raw(d, d, k)

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        e, e_sum = _extreme_pieces(d, raw, sums, 1)
        return e * (sigma * c), e_sum * (sigma * c / n)

    def sync_raw(self, d, mu, hi, lo, k, all_gather):
        # max|x − μ| = max(max x − μ, μ − min x), exactly (rounding is monotone): no collective of its own
        return torch.maximum(hi - mu, mu - lo).reshape(1, 1, 1, -1, 1), (), None


ESTIMATOR = _Linf(name="linf", reductions={"max_abs": "max"}, sync_needs_extremes=True)
