"""``topk``: σ̂ = c_k(n) · mean of the k largest |d|, c_k(n) = E[s_n] / (sqrt((n−1)/n) · E[mean top-k |z|]);
uncentered (RMS norm, d = x): E[RMS_n] / E[mean top-k |z|]."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import constants
from .base import Estimator, _centered, _sqrt_ratio, paper_linf_constant
from .extremes import _extreme_pieces, _extreme_sums

#: largest k of the native top-k kernels (csrc)
NATIVE_MAX_K = 64


def _move_reduced_last(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    keep = [d for d in range(x.dim()) if d not in dims]
    return x.permute(*keep, *dims).flatten(len(keep))


class _TopK(Estimator):
    def constant(self, n, k=10, chunks=None, centered=True):
        if not centered:  # E[RMS_n] / E[mean top-k |z|]: the x_i are exactly iid, no sqrt((n−1)/n)
            return constants.expected_rms(n) / constants.expected_top_k_mean(n, k)
        return constants.expected_biased_std(n) / (_sqrt_ratio(n) * constants.expected_top_k_mean(n, k))

    def validate(self, n, k=10, chunks=None):
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            return f"norm='topk' needs 1 <= k <= n (elements reduced per channel), got k={k!r}, n={n}"
        return None

    def expected_raw(self, n, k=10):
        return _sqrt_ratio(n) * constants.expected_top_k_mean(n, k)

    def paper_constant(self, n):
        return paper_linf_constant(n)  # the paper gives top-k the L∞ constant

    def native_covers(self, x, k, channel_layout):
        return 1 <= k <= NATIVE_MAX_K

    def emulate_raw(self, xq, d, n, rsum, rounder, k=10, chunks=None):
        top = d.abs().topk(min(k, n), dim=-1).values
        return rounder.s(rsum(top, "sum_topk") / top.shape[-1], "div_n")

    def partial(self, x, mean, dims, k=10, chunks=None):
        d = _move_reduced_last(_centered(x, mean, dims), dims).abs()
        return {"topk": d.topk(min(k, d.shape[-1]), dim=-1, sorted=False).values}

    def finalize(self, part, n, k=10, chunks=None):
        return part["topk"].mean(-1) * self.scale(n, part["topk"], k=k)

    def lean_raw(self, x, d, k=10):
        # two-stage top-k without a transposed copy: the k largest of every contiguous row (G, m, q, C)
        # first, then the k largest of those candidates per channel (exact: the global top-k lies in
        # the union of the rows' top-k)
        a = d.abs()
        G, m, q, C, S = a.shape
        rows = a.topk(min(k, S), dim=-1, sorted=False).values if S > k else a
        cand = rows.permute(0, 3, 1, 2, 4).reshape(G, C, -1)
        top = cand.topk(k, dim=-1, sorted=False).values
        raw = top.mean(-1)[:, None, None, :, None]
        tau = top.amin(-1)[:, None, None, :, None]
        return raw, (tau,)

    def lean_sums(self, x, d, raw, aux):
        return _extreme_sums(d, aux[0])

    def lean_thresholds(self, d, raw, aux, k=10):
        return self.lean_raw(d, d, k)

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        e, e_sum = _extreme_pieces(d, aux[0], sums, k)
        return e * (sigma * c), e_sum * (sigma * c / n)

    def sync_raw(self, d, mu, hi, lo, k, all_gather):
        # each rank's k largest |d| per channel around the union's μ, gathered; the k largest of those
        a = d.abs()
        C = a.shape[3]
        rows = a.permute(3, 0, 1, 2, 4).reshape(C, -1)
        mine = rows.topk(min(k, rows.shape[1]), dim=-1).values
        if mine.shape[1] < k:  # a shard with fewer than k elements pads with values no merge keeps
            mine = torch.cat([mine, mine.new_full((C, k - mine.shape[1]), -math.inf)], dim=1)
        top = all_gather(mine).transpose(0, 1).reshape(C, -1).topk(k, dim=-1).values
        return top.mean(-1).reshape(1, 1, 1, C, 1), (top.amin(-1).reshape(1, 1, 1, C, 1),), None


ESTIMATOR = _TopK(name="topk", reductions={"topk": "topk"}, options=frozenset({"k"}), native_aux_rows=1,
                  native_preferred=True, native_inplace_rows=False, row_aux=True)
