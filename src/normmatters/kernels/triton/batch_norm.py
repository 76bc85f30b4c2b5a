"""The batch-statistics family (Lp batch norm, ghost batches, range chunks) on Triton: the host code of the kernels
of :mod:`.batch_norm_kernels` (layout, launches, the small combination steps).

Layout. The input (N, C, *) is read in place, never copied, when it is contiguous or channels-last (else one
``.contiguous()``), as G ghost groups of g samples, each channel c reduced over its n = g·S elements (S the
spatial size). Two addressing modes, both without any per-element integer division:

* ``ROWS`` (channels-last, or no spatial dims): the g·S elements of a group are rows j with one stride
  (``x[n, c, s]`` at ``(n·S + s)·s_row + c·s_c``); a tile is [BI rows × BC channels], channels innermost.
* ``NCS`` (contiguous with S > 1): a loop over the samples and, inside, tiles of [BI spatial × BC channels] with
  the spatial elements innermost.

Split reduction: each (group, channel block) is cut into ``m·P`` spans — m range chunks (1 unless ``norm="range"``
with ``chunks=m``), each split into P parts (P chosen to fill the GPU: about 4 programs per SM) — every program
writing its partial results to a small workspace (F, G, m·P, C); a few torch ops on those (G, m·P, C) tensors
combine them (no second kernel pass over the data, no atomics, deterministic). Statistics accumulate in float32
(float64 for float64 input).

Forward (per (group, channel), x in the accumulation dtype)::

    pass 1   count, mean and M2 (Chan's parallel combination of per-tile two-pass moments), max x, min x
             (per range chunk): l2 raw = sqrt(M2/n); linf raw = max(max x − μ, μ − min x) = max|x − μ| exactly
             (rounding is monotone); range raw = mean over chunks of (max − min); mean-only: μ alone
    pass 2   l1: Σ|x − μ|; topk: the KP = next_pow2(k) largest |x − μ| (tile sort + bitonic merge), merged over
             spans by ``torch.topk``; raw = mean of the k largest, τ = the k-th largest
    normalize  y = (x − μ)·(w·r) + b,  r = 1/hypot(c·raw, sqrt(eps))  (:func:`normmatters.functional.inv_std`)

Backward (:mod:`normmatters.kernels.formulas` is the same math in torch ops): one reduction pass (Σg, Σg·d and the
estimator's sums: Σ sign d for l1; the counts and signed sums of |d| above / at τ for linf and topk; the ties at
each chunk's max and min for range), then one elementwise pass::

    ∂L/∂x = w·r·(g − Σg/n) − w·r·Σg·x̂ · r·(e − mean e),   e = σ̂·∂σ̂/∂x (the estimator's lean_dstat)

written per element as ``A·g + B + (the norm's e-term)``: l2 ``E1·d``; l1 ``E1·sign d``; linf / topk
``sign d·(E1·[|d| > τ] + E2·[|d| = τ])`` (ties at τ share the remaining weight evenly); range
``E1·[x = max] + E2·[x = min]`` of its chunk (ties share evenly); mean-only no e-term.
∂L/∂w = Σ_G r·Σg·d, ∂L/∂b = Σ_G Σg.

Running statistics: :func:`.running.update_running` — one single-program kernel, exactly
:func:`normmatters.functional.update_running_stats` (see there), plus a skipped-batch counter; no host read.

``TOPK_MAX`` (16) bounds k; beyond it :func:`covers` says no and the dispatch runs the composite path.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from ...estimators import get_estimator
from .batch_norm_kernels import _bn_bwd_elem_kernel, _bn_bwd_reduce_kernel, _bn_norm_kernel, _bn_stats_kernel

__all__ = ["TOPK_MAX", "NORM_IDS", "covers", "forward", "backward", "out_like", "aux_shape", "Layout"]

#: the largest k of the top-k kernels (a power-of-two register list of that length per channel)
TOPK_MAX = 16
#: norm name → the constexpr id the kernels branch on
NORM_IDS = {"l2": 0, "l1": 1, "linf": 2, "topk": 3, "range": 4, "mean": 5}
L2, L1, LINF, TOPK, RANGE, MEAN = range(6)


def covers(norm: str, k: int) -> bool:
    """Whether these kernels implement ``norm`` with this ``k`` (a norm taking k: 1 ≤ k ≤ :data:`TOPK_MAX`)."""
    return norm in NORM_IDS and ("k" not in get_estimator(norm).options or 1 <= k <= TOPK_MAX)


# --- host side --------------------------------------------------------------------------------------------

def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _ncs_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(s_n, s_c, s_spatial) when t's spatial dims flatten to one stride (any stride, 0 included), else None."""
    shape, stride = t.shape[2:], t.stride()[2:]
    sS = None
    expect = None
    for size, st in reversed(list(zip(shape, stride))):
        if size == 1:
            continue
        if sS is None:
            sS, expect = st, st * size
        elif st != expect:
            return None
        else:
            expect = st * size
    return t.stride(0), t.stride(1), (0 if sS is None else sS)


class Layout:
    """How the kernels address an (N, C, *) tensor: mode (ROWS / NCS), strides, span structure."""

    def __init__(self, x: Tensor, groups: int, m: int, splits: int | None = None):
        N, C = x.shape[:2]
        S = math.prod(x.shape[2:])
        x = x if _dense(x) else x.contiguous()
        sN, sC, sS = _ncs_strides(x)
        if S == 1:
            sS = sN
        rows = S == 1 or (sC == 1 and sN == S * sS)
        self.x = x
        self.N, self.C, self.S, self.G, self.m = N, C, S, groups, m
        self.g = N // groups
        self.rows = rows
        self.n = self.g * S
        q = self.g // m
        self.CL = q * S if rows else q  # a chunk's length in the split unit (rows, or samples)
        if rows:
            self.BC = min(_pow2(C), 64)
            self.BI = max(4, min(_pow2(self.CL), 4096 // self.BC))
        else:
            self.BC = min(_pow2(C), 4)
            self.BI = max(4, min(_pow2(S), 4096 // self.BC))
        self.CB = triton.cdiv(C, self.BC)
        if splits is None:
            splits = _splits(x.device, groups * self.CB * m, self.CL, self.BI if rows else 1)
        self.P = max(1, min(splits, self.CL))
        self.SPL = triton.cdiv(self.CL, self.P)
        self.NSPLIT = m * self.P
        self.s_o, self.s_c, self.s_i = (0, sC, sS) if rows else (sN, sC, sS)
        self.gstride = self.g * sN

    def grid(self) -> tuple[int, int]:
        return (self.G * self.CB, self.NSPLIT)

    def span_args(self) -> tuple[int, ...]:
        return (self.P, self.CL, self.SPL)

    def strides_of(self, t: Tensor) -> tuple[Tensor, int, int, int, int]:
        """(t or a copy in x's layout, s_o, s_i, s_c, group stride) for a tensor of x's shape (the gradient)."""
        st = _ncs_strides(t)
        if st is not None:
            sN, sC, sS = st
            if self.S == 1:
                return t, 0, sN, sC, self.g * sN
            if self.rows and sN == self.S * sS:
                return t, 0, sS, sC, self.g * sN
            if not self.rows:
                return t, sN, sS, sC, self.g * sN
        t = torch.empty_like(self.x).copy_(t)
        return t, self.s_o, self.s_i, self.s_c, self.gstride


#: programs per streaming multiprocessor the split aims at; ``SPLIT_OVERRIDE`` (tests) fixes P instead
PROGRAMS_PER_SM = 4
SPLIT_OVERRIDE: int | None = None
_SM: dict[int, int] = {}


def _splits(device: torch.device, programs: int, length: int, unit: int) -> int:
    if SPLIT_OVERRIDE is not None:
        return SPLIT_OVERRIDE
    if device.type != "cuda":
        return 2  # the interpreter: few programs (each is interpreted), but a split to combine
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM:
        _SM[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = triton.cdiv(PROGRAMS_PER_SM * _SM[idx], max(1, programs))
    return max(1, min(want, triton.cdiv(length, 8 * unit)))


def _dense(x: Tensor) -> bool:
    """Contiguous, or channels-last of any rank (channels innermost): the layouts read and written in place."""
    return x.is_contiguous() or (x.dim() > 2 and x.movedim(1, -1).is_contiguous())


def out_like(x: Tensor) -> Tensor:
    """An empty tensor in the layout the kernels write y and ∂L/∂x in: x's own strides when x is contiguous or
    channels-last, else contiguous."""
    return torch.empty_like(x) if _dense(x) else torch.empty_like(x, memory_format=torch.contiguous_format)


def aux_shape(norm: str, groups: int, C: int, chunks: int) -> tuple[int, ...]:
    """The shape of the forward's ``aux`` output."""
    nid = NORM_IDS[norm]
    if nid in (LINF, TOPK):
        return (groups, C)
    if nid == RANGE:
        return (2, groups, max(1, chunks), C)
    return (0,)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kp(k: int) -> int:
    return max(2, _pow2(k))


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, c: float, eps: float, norm: str, k: int,
            groups: int, chunks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, μ (G, C), raw (G, C), aux) in the accumulation dtype; aux: τ (G, C) for linf / topk, the chunk extremes
    (2, G, m, C) for range, else an empty tensor. ``chunks`` 0 or 1: one chunk."""
    nid = NORM_IDS[norm]
    m = max(1, chunks)
    L = Layout(x, groups, m)
    xs = L.x
    acc = _acc(x.dtype)
    G, C = groups, L.C
    ws = torch.empty((5, G, L.NSPLIT, C), dtype=acc, device=x.device)
    KP = _kp(k) if nid == TOPK else 2
    BI = max(L.BI, KP)
    common = (C, L.CB, L.S, L.s_o, L.s_i, L.s_c, L.gstride, L.P, L.CL, L.SPL)
    launch = wrap_triton(_bn_stats_kernel)[L.grid()]
    launch(xs, ws, ws, *common, L.NSPLIT, G, MODE=1, ROWS=L.rows, BI=BI, BC=L.BC, KP=KP)
    cnt, mu_p, m2_p, hi_p, lo_p = ws.unbind(0)
    n = cnt.sum(1)  # (G, C)
    mean = (cnt * mu_p).sum(1) / n
    aux = x.new_empty((0,), dtype=acc)
    if nid == L2:
        raw = ((m2_p + cnt * (mu_p - mean[:, None]).square()).sum(1) / n).sqrt()
    elif nid == LINF:
        raw = torch.maximum(hi_p.amax(1) - mean, mean - lo_p.amin(1))
        aux = raw.clone()  # (an op's outputs may not alias each other)
    elif nid == RANGE:
        hi = hi_p.reshape(G, m, L.P, C).amax(2)
        lo = lo_p.reshape(G, m, L.P, C).amin(2)
        raw = (hi - lo).mean(1)
        aux = torch.stack((hi, lo))
    elif nid == MEAN:
        raw = mean.clone()
    elif nid == L1:
        ws1 = torch.empty((1, G, L.NSPLIT, C), dtype=acc, device=x.device)
        launch(xs, ws1, mean, *common, L.NSPLIT, G, MODE=2, ROWS=L.rows, BI=BI, BC=L.BC, KP=KP)
        raw = ws1[0].sum(1) / n
    else:  # topk
        wst = torch.empty((G, L.NSPLIT, C, KP), dtype=acc, device=x.device)
        BK = max(KP, min(L.BI, 256))  # (the tile is sorted: smaller tiles)
        wrap_triton(_bn_stats_kernel)[L.grid()](xs, wst, mean, *common, L.NSPLIT, G, MODE=3, ROWS=L.rows, BI=BK,
                                                BC=L.BC, KP=KP)
        top = wst.permute(0, 2, 1, 3).reshape(G, C, -1).topk(k, dim=-1).values  # sorted, largest first
        raw = top.mean(-1)
        aux = top[..., k - 1].contiguous()
    if nid == MEAN:
        scale = torch.ones_like(mean)
    else:
        sigma = raw * c
        scale = torch.hypot(sigma, torch.full_like(sigma, math.sqrt(eps))).reciprocal()
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = bias.to(acc).expand(G, C).contiguous() if bias is not None else torch.zeros_like(mean)
    y = out_like(xs)
    wrap_triton(_bn_norm_kernel)[L.grid()](xs, y, mean, scale.contiguous(), shift, *common, ROWS=L.rows, BI=L.BI,
                                           BC=L.BC)
    return y, mean, raw, aux


def backward(gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, raw: Tensor, aux: Tensor, c: float,
             eps: float, norm: str, k: int, groups: int, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂x in x's dtype and layout, ∂L/∂w, ∂L/∂b (C,) in the accumulation dtype)."""
    nid = NORM_IDS[norm]
    m = max(1, chunks)
    L = Layout(x, groups, m)
    xs = L.x
    acc = mean.dtype
    G, C = groups, L.C
    g, gs_o, gs_i, gs_c, ggs = L.strides_of(gy)
    nf = {L1: 3, LINF: 6, TOPK: 6, RANGE: 4}.get(nid, 2)
    ws = torch.empty((nf, G, L.NSPLIT, C), dtype=acc, device=x.device)
    tau = aux if nid in (LINF, TOPK) else mean
    hi, lo = (aux[0], aux[1]) if nid == RANGE else (mean, mean)
    common = (C, L.CB, L.S, L.s_o, L.s_i, L.s_c, L.gstride)
    wrap_triton(_bn_bwd_reduce_kernel)[L.grid()](g, xs, ws, mean, tau, hi, lo, *common, gs_o, gs_i, gs_c, ggs,
                                                 *L.span_args(), L.NSPLIT, G, m, NORM=nid, ROWS=L.rows, BI=L.BI,
                                                 BC=L.BC)
    n = L.n
    w = weight.to(acc) if weight is not None else torch.ones((C,), dtype=acc, device=x.device)
    if nid == RANGE:
        sums = ws.reshape(nf, G, m, L.P, C).sum(3)  # per chunk
        sg, sgd = sums[0].sum(1), sums[1].sum(1)
    else:
        sums = ws.sum(2)
        sg, sgd = sums[0], sums[1]
    gb = sg.sum(0)
    if nid == MEAN:
        gw = sgd.sum(0)
        a = w.expand(G, C).contiguous()
        b = -(a * sg / n)
        e1 = e2 = a
    else:
        sigma = raw * c
        r = torch.hypot(sigma, torch.full_like(sigma, math.sqrt(eps))).reciprocal()
        sgx = sgd * r  # Σ g·x̂
        gw = sgx.sum(0)
        wr = w * r
        a = wr
        kq = wr * sgx * r  # the factor of (e − mean e)
        b = -wr * sg / n
        if nid == L2:
            e1 = -kq / n
            e2 = e1
        elif nid == L1:
            f = sigma * c / n
            e1 = -kq * f
            b = b + kq * sums[2] * f / n
            e2 = e1
        elif nid in (LINF, TOPK):
            kk = 1 if nid == LINF else k
            cgt, ceq, sgt, seq = sums[2], sums[3], sums[4], sums[5]
            w_eq = (kk - cgt) / ceq
            f = sigma * c / kk
            e1 = -kq * f
            e2 = -kq * f * w_eq
            b = b + kq * (sgt + w_eq * seq) * f / n
        else:  # range, per chunk
            f = (sigma * c / m)[:, None, :]
            e1 = (-kq[:, None, :] * f / sums[2]).contiguous()
            e2 = (kq[:, None, :] * f / sums[3]).contiguous()
    gx = out_like(xs)
    wrap_triton(_bn_bwd_elem_kernel)[L.grid()](g, xs, gx, mean, a.contiguous(), b.contiguous(), e1, e2, tau, hi, lo,
                                               *common, gs_o, gs_i, gs_c, ggs, *L.span_args(), m, NORM=nid,
                                               ROWS=L.rows, BI=L.BI, BC=L.BC)
    return gx, gw, gb
