"""``l1``: σ̂ = c₁(n) · mean(|d|), c₁(n) = E[s_n] / (sqrt(2/π) · sqrt((n−1)/n));
uncentered (RMS norm, d = x): E[RMS_n] / sqrt(2/π)."""

from __future__ import annotations

import math

import torch

from .. import constants
from .base import _LEAN_DIMS, Estimator, _centered


class _L1(Estimator):
    def constant(self, n, k=10, chunks=None, centered=True):
        if not centered:  # E[RMS_n] / E|z|, E|z| = sqrt(2/π)
            return constants.expected_rms(n) / math.sqrt(2 / math.pi)
        return constants.expected_biased_std(n) / constants.expected_mean_abs_deviation(n)

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {"sum_abs": _centered(x, mean, dims).abs().sum(dims)}

    def finalize(self, part, n, k=10, chunks=None):
        return part["sum_abs"] * (self.scale(n, part["sum_abs"]) / n)

    def expected_raw(self, n, k=10):
        return constants.expected_mean_abs_deviation(n)

    def paper_constant(self, n):
        return math.sqrt(math.pi / 2)

    def emulate_raw(self, xq, d, n, rsum, rounder, k=10, chunks=None):
        return rounder.s(rsum(d.abs(), "sum_abs") / n, "div_n")

    def lean_raw(self, x, d, k=10):
        return d.abs().mean(_LEAN_DIMS, keepdim=True), ()

    def lean_sums(self, x, d, raw, aux):
        return (torch.sign(d).sum(_LEAN_DIMS, keepdim=True),)

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        # σ̂ = c · mean|d|  →  ∂σ̂/∂d_i = c · sign(d_i) / n
        return torch.sign(d) * (sigma * c / n), sums[0] * (sigma * c / n / n)

    def sync_raw(self, d, mu, hi, lo, k, all_gather):
        return None, (), d.abs().sum(_LEAN_DIMS, keepdim=True)  # Σ|d| around the union's μ: a second collective

    def sync_finish(self, total, n):
        return total / n


ESTIMATOR = _L1(name="l1", reductions={"sum_abs": "sum"})
