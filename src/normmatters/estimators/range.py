"""``range``: σ̂ = c_r(n/m) · mean over m chunks of (max − min), c_r = E[s_n] / d₂(n/m)
(uncentered, for RMS norm: E[RMS_n] / d₂(n/m))."""

from __future__ import annotations

import torch

from .. import constants
from .base import _LEAN_CHUNK_DIMS, Estimator, paper_range_constant


class _Range(Estimator):
    """Range, optionally chunked. With ``chunks=m`` the first reduced dim (the batch) is split into m
    equal chunks; σ̂ = c · mean over chunks of (max − min), c = E[s_n] / d₂(n/m)."""

    def constant(self, n, k=10, chunks=None, centered=True):
        m = chunks or 1
        # the range ignores the mean, so only the target changes: E[s_n] (centered) or E[RMS_n] (RMS norm)
        target = constants.expected_biased_std(n) if centered else constants.expected_rms(n)
        return target / constants.expected_range(n // m)

    def validate(self, n, k=10, chunks=None):
        m = chunks or 1
        if n // m < 2:
            return f"norm='range' with chunks={m} needs at least 2 elements per chunk, got n={n}"
        return None

    def expected_raw(self, n, k=10):
        return constants.expected_range(n)

    def paper_constant(self, n):
        return paper_range_constant(n)

    def native_covers(self, x, k, channel_layout):
        return not (channel_layout and x.numel() // x.shape[1] >= 2**31)  # the max/min positions are int32

    def emulate_raw(self, xq, d, n, rsum, rounder, k=10, chunks=None):
        m = chunks or 1
        if n % m:
            raise ValueError(f"emulate_normalization: chunks={m} must divide n={n}")
        xc = xq.reshape(xq.shape[0], m, n // m)
        rng = rounder.c(xc.amax(-1) - xc.amin(-1), "range")
        return rounder.s(rsum(rng, "sum_range") / m, "div_n") if m > 1 else rng[:, 0]

    def partial(self, x, mean, dims, k=10, chunks=None):
        m = chunks or 1
        b = dims[0]
        if x.shape[b] % m:
            raise ValueError(f"chunks={m} must divide the batch dimension, got {x.shape[b]}")
        # split the batch dim into (m, batch/m); reduce everything but the chunk index
        xs = x.unflatten(b, (m, x.shape[b] // m))
        red = tuple(d + 1 if d > b else d for d in dims if d != b) + (b + 1,)
        ranges = xs.amax(red) - xs.amin(red)  # chunk index sits at position b of the result
        return {"range_sum": ranges.sum(b), "chunk_count": torch.full_like(ranges.sum(b), m)}

    def finalize(self, part, n, k=10, chunks=None):
        return part["range_sum"] / part["chunk_count"] * self.scale(n, part["range_sum"], chunks=chunks)

    def lean_raw(self, x, d, k=10):
        hi = x.amax(_LEAN_CHUNK_DIMS, keepdim=True)
        lo = x.amin(_LEAN_CHUNK_DIMS, keepdim=True)
        return (hi - lo).mean(1, keepdim=True), (hi, lo)

    def lean_thresholds(self, d, raw, aux, k=10):
        return self.lean_raw(d, d, k)  # the chunk extremes of d = x − μ are those of x, shifted by μ

    def lean_sums(self, x, d, raw, aux):
        hi, lo = aux
        return ((x == hi).to(x.dtype).sum(_LEAN_CHUNK_DIMS, keepdim=True),
                (x == lo).to(x.dtype).sum(_LEAN_CHUNK_DIMS, keepdim=True))

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        # σ̂ = c/m · Σ_chunks (max − min): the gradient reaches only the extremes of each chunk (shared
        # evenly among ties, like autograd's amax/amin); it does not depend on μ, so the mean term is 0
        hi, lo = aux
        m = hi.shape[1]
        e = ((x == hi).to(x.dtype) / sums[0] - (x == lo).to(x.dtype) / sums[1]) * (sigma * c / m)
        return e, torch.zeros_like(sigma)

    def sync_raw(self, d, mu, hi, lo, k, all_gather):
        # max − min of the union from the gathered extremes (one chunk: chunks are refused while syncing)
        hi, lo = hi.reshape(1, 1, 1, -1, 1), lo.reshape(1, 1, 1, -1, 1)
        return hi - lo, (hi, lo), None


ESTIMATOR = _Range(name="range", needs_mean=False, reductions={"range_sum": "sum", "chunk_count": "sum"},
                   options=frozenset({"chunks"}), native_aux_rows=2, sync_needs_extremes=True)
