"""Triton kernels of the batch-statistics family (Lp batch norm, ghost batches, range chunks), and their host code.

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

Running statistics: :func:`update_running` — one single-program kernel, exactly
:func:`normmatters.functional.update_running_stats` (see there), plus a skipped-batch counter; no host read.

``TOPK_MAX`` (16) bounds k; beyond it :func:`covers` says no and the dispatch runs the composite path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ...estimators import get_estimator

__all__ = ["TOPK_MAX", "NORM_IDS", "covers", "forward", "backward", "update_running", "out_like", "aux_shape"]

#: the largest k of the top-k kernels (a power-of-two register list of that length per channel)
TOPK_MAX = 16
#: norm name → the constexpr id the kernels branch on
NORM_IDS = {"l2": 0, "l1": 1, "linf": 2, "topk": 3, "range": 4, "mean": 5}
L2, L1, LINF, TOPK, RANGE, MEAN = range(6)


def covers(norm: str, k: int) -> bool:
    """Whether these kernels implement ``norm`` with this ``k`` (a norm taking k: 1 ≤ k ≤ :data:`TOPK_MAX`)."""
    return norm in NORM_IDS and ("k" not in get_estimator(norm).options or 1 <= k <= TOPK_MAX)


# --- kernels ----------------------------------------------------------------------------------------------

@triton.jit
def _span(sp, P, CL, SPL, S, ROWS: tl.constexpr):
    """(outer lo, outer hi, inner lo, inner hi) of span ``sp``: chunk sp // P, part sp % P of it (CL: a chunk's
    length in samples (NCS) or rows (ROWS); SPL: a part's length)."""
    ci = sp // P
    p = sp % P
    lo = ci * CL + p * SPL
    hi = tl.minimum(lo + SPL, (ci + 1) * CL)
    if ROWS:
        return 0, 1, lo, hi
    else:
        return lo, hi, 0, S


@triton.jit
def _bn_stats_kernel(x, ws, mean_p, C, CB, S, s_o, s_i, s_c, gstride, P, CL, SPL, NSPLIT, G,
                     MODE: tl.constexpr, ROWS: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr,
                     KP: tl.constexpr):
    """MODE 1: count, mean, M2, max, min per (group, span, channel) into ws (5, G, NSPLIT, C); MODE 2:
    Σ|x − μ| into ws (1, G, NSPLIT, C); MODE 3: the KP largest |x − μ| into ws (G, NSPLIT, C, KP)."""
    acc_t = ws.dtype.element_ty
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    gi = pid // CB
    cb = pid % CB
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    o_lo, o_hi, i_lo, i_hi = _span(sp, P, CL, SPL, S, ROWS)
    base = x + tl.cast(gi, tl.int64) * gstride
    offs = tl.arange(0, BI)
    if MODE != 1:
        mu = tl.load(mean_p + gi * C + c, mask=cm, other=0.0)
    cnt = tl.zeros([BC], dtype=acc_t)
    mean = tl.zeros([BC], dtype=acc_t)
    m2 = tl.zeros([BC], dtype=acc_t)
    hi = tl.full([BC], float("-inf"), acc_t)
    lo = tl.full([BC], float("inf"), acc_t)
    top = tl.full([BC, KP], float("-inf"), acc_t)
    for o in range(o_lo, o_hi):
        for i0 in range(i_lo, i_hi, BI):
            ii = i0 + offs
            mask = (ii < i_hi)[:, None] & cm[None, :]
            ptrs = base + tl.cast(o, tl.int64) * s_o + tl.cast(ii, tl.int64)[:, None] * s_i + c[None, :] * s_c
            v = tl.load(ptrs, mask=mask, other=0.0).to(acc_t)
            if MODE == 1:
                nb = tl.sum(mask.to(acc_t), axis=0)
                mb = tl.sum(v, axis=0) / tl.maximum(nb, 1.0)
                dv = tl.where(mask, v - mb[None, :], 0.0)
                m2b = tl.sum(dv * dv, axis=0)
                tot = cnt + nb
                delta = mb - mean
                frac = nb / tl.maximum(tot, 1.0)
                mean = mean + delta * frac
                m2 = m2 + m2b + delta * delta * cnt * frac
                cnt = tot
                hi = tl.maximum(hi, tl.max(tl.where(mask, v, float("-inf")), axis=0))
                lo = tl.minimum(lo, tl.min(tl.where(mask, v, float("inf")), axis=0))
            elif MODE == 2:
                m2 += tl.sum(tl.where(mask, tl.abs(v - mu[None, :]), 0.0), axis=0)
            else:
                a = tl.trans(tl.where(mask, tl.abs(v - mu[None, :]), float("-inf")))  # [BC, BI]
                srt = tl.sort(a, dim=1, descending=True)
                best = tl.max(tl.reshape(srt, [BC, BI // KP, KP]), axis=1)  # the tile's KP largest, sorted
                both = tl.reshape(tl.join(top, best), [BC, 2 * KP])
                top = tl.max(tl.reshape(tl.sort(both, dim=1, descending=True), [BC, 2, KP]), axis=1)
    if MODE == 1:
        out = ws + (gi * NSPLIT + sp) * C + c
        plane = G * NSPLIT * C
        tl.store(out, cnt, mask=cm)
        tl.store(out + plane, mean, mask=cm)
        tl.store(out + 2 * plane, m2, mask=cm)
        tl.store(out + 3 * plane, hi, mask=cm)
        tl.store(out + 4 * plane, lo, mask=cm)
    elif MODE == 2:
        tl.store(ws + (gi * NSPLIT + sp) * C + c, m2, mask=cm)
    else:
        kk = tl.arange(0, KP)
        out = ws + ((gi * NSPLIT + sp) * C + c)[:, None] * KP + kk[None, :]
        tl.store(out, top, mask=cm[:, None])


@triton.jit
def _bn_norm_kernel(x, y, mean_p, scale_p, shift_p, C, CB, S, s_o, s_i, s_c, gstride, P, CL, SPL,
                    ROWS: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr):
    """y = (x − μ)·scale + shift per (group, channel); y has x's strides."""
    acc_t = mean_p.dtype.element_ty
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    gi = pid // CB
    cb = pid % CB
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    o_lo, o_hi, i_lo, i_hi = _span(sp, P, CL, SPL, S, ROWS)
    mu = tl.load(mean_p + gi * C + c, mask=cm, other=0.0)
    sc = tl.load(scale_p + gi * C + c, mask=cm, other=0.0)
    sh = tl.load(shift_p + gi * C + c, mask=cm, other=0.0)
    goff = tl.cast(gi, tl.int64) * gstride
    offs = tl.arange(0, BI)
    for o in range(o_lo, o_hi):
        for i0 in range(i_lo, i_hi, BI):
            ii = i0 + offs
            mask = (ii < i_hi)[:, None] & cm[None, :]
            off = goff + tl.cast(o, tl.int64) * s_o + tl.cast(ii, tl.int64)[:, None] * s_i + c[None, :] * s_c
            v = tl.load(x + off, mask=mask, other=0.0).to(acc_t)
            out = (v - mu[None, :]) * sc[None, :] + sh[None, :]
            tl.store(y + off, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(g, x, ws, mean_p, tau_p, hi_p, lo_p, C, CB, S, s_o, s_i, s_c, gstride,
                          gs_o, gs_i, gs_c, ggstride, P, CL, SPL, NSPLIT, G, M,
                          NORM: tl.constexpr, ROWS: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr):
    """Per (group, span, channel) into ws (F, G, NSPLIT, C): Σg, Σg·d, then the norm's sums (l1: Σ sign d;
    linf / topk: #[|d| > τ], #[|d| = τ], Σ sign d over each; range: #[x = chunk max], #[x = chunk min])."""
    acc_t = ws.dtype.element_ty
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    gi = pid // CB
    cb = pid % CB
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    o_lo, o_hi, i_lo, i_hi = _span(sp, P, CL, SPL, S, ROWS)
    mu = tl.load(mean_p + gi * C + c, mask=cm, other=0.0)
    if NORM == 2 or NORM == 3:
        tau = tl.load(tau_p + gi * C + c, mask=cm, other=0.0)
    if NORM == 4:
        ci = sp // P
        chi = tl.load(hi_p + (gi * M + ci) * C + c, mask=cm, other=0.0)
        clo = tl.load(lo_p + (gi * M + ci) * C + c, mask=cm, other=0.0)
    xoff = tl.cast(gi, tl.int64) * gstride
    goff = tl.cast(gi, tl.int64) * ggstride
    offs = tl.arange(0, BI)
    sg = tl.zeros([BC], dtype=acc_t)
    sgd = tl.zeros([BC], dtype=acc_t)
    s1 = tl.zeros([BC], dtype=acc_t)
    s2 = tl.zeros([BC], dtype=acc_t)
    s3 = tl.zeros([BC], dtype=acc_t)
    s4 = tl.zeros([BC], dtype=acc_t)
    for o in range(o_lo, o_hi):
        for i0 in range(i_lo, i_hi, BI):
            ii = i0 + offs
            mask = (ii < i_hi)[:, None] & cm[None, :]
            o64 = tl.cast(o, tl.int64)
            i64 = tl.cast(ii, tl.int64)[:, None]
            v = tl.load(x + xoff + o64 * s_o + i64 * s_i + c[None, :] * s_c, mask=mask, other=0.0).to(acc_t)
            gv = tl.load(g + goff + o64 * gs_o + i64 * gs_i + c[None, :] * gs_c, mask=mask,
                         other=0.0).to(acc_t)
            d = tl.where(mask, v - mu[None, :], 0.0)
            sg += tl.sum(gv, axis=0)
            sgd += tl.sum(gv * d, axis=0)
            if NORM == 1:
                s1 += tl.sum(tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)), axis=0)
            elif NORM == 2 or NORM == 3:
                a = tl.abs(d)
                sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                gt = mask & (a > tau[None, :])
                eq = mask & (a == tau[None, :])
                s1 += tl.sum(gt.to(acc_t), axis=0)
                s2 += tl.sum(eq.to(acc_t), axis=0)
                s3 += tl.sum(tl.where(gt, sgn, 0.0), axis=0)
                s4 += tl.sum(tl.where(eq, sgn, 0.0), axis=0)
            elif NORM == 4:
                s1 += tl.sum((mask & (v == chi[None, :])).to(acc_t), axis=0)
                s2 += tl.sum((mask & (v == clo[None, :])).to(acc_t), axis=0)
    out = ws + (gi * NSPLIT + sp) * C + c
    plane = G * NSPLIT * C
    tl.store(out, sg, mask=cm)
    tl.store(out + plane, sgd, mask=cm)
    if NORM == 1:
        tl.store(out + 2 * plane, s1, mask=cm)
    elif NORM == 2 or NORM == 3:
        tl.store(out + 2 * plane, s1, mask=cm)
        tl.store(out + 3 * plane, s2, mask=cm)
        tl.store(out + 4 * plane, s3, mask=cm)
        tl.store(out + 5 * plane, s4, mask=cm)
    elif NORM == 4:
        tl.store(out + 2 * plane, s1, mask=cm)
        tl.store(out + 3 * plane, s2, mask=cm)


@triton.jit
def _bn_bwd_elem_kernel(g, x, gx, mean_p, a_p, b_p, e1_p, e2_p, tau_p, hi_p, lo_p, C, CB, S, s_o, s_i, s_c,
                        gstride, gs_o, gs_i, gs_c, ggstride, P, CL, SPL, M,
                        NORM: tl.constexpr, ROWS: tl.constexpr, BI: tl.constexpr, BC: tl.constexpr):
    """∂L/∂x = A·g + B + the norm's e-term (module docstring); gx has x's strides."""
    acc_t = mean_p.dtype.element_ty
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    gi = pid // CB
    cb = pid % CB
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    o_lo, o_hi, i_lo, i_hi = _span(sp, P, CL, SPL, S, ROWS)
    mu = tl.load(mean_p + gi * C + c, mask=cm, other=0.0)
    ca = tl.load(a_p + gi * C + c, mask=cm, other=0.0)
    cbias = tl.load(b_p + gi * C + c, mask=cm, other=0.0)
    if NORM == 4:
        ci = sp // P
        e1 = tl.load(e1_p + (gi * M + ci) * C + c, mask=cm, other=0.0)
        e2 = tl.load(e2_p + (gi * M + ci) * C + c, mask=cm, other=0.0)
        chi = tl.load(hi_p + (gi * M + ci) * C + c, mask=cm, other=0.0)
        clo = tl.load(lo_p + (gi * M + ci) * C + c, mask=cm, other=0.0)
    elif NORM != 5:
        e1 = tl.load(e1_p + gi * C + c, mask=cm, other=0.0)
        e2 = tl.load(e2_p + gi * C + c, mask=cm, other=0.0)
    if NORM == 2 or NORM == 3:
        tau = tl.load(tau_p + gi * C + c, mask=cm, other=0.0)
    xoff = tl.cast(gi, tl.int64) * gstride
    goff = tl.cast(gi, tl.int64) * ggstride
    offs = tl.arange(0, BI)
    for o in range(o_lo, o_hi):
        for i0 in range(i_lo, i_hi, BI):
            ii = i0 + offs
            mask = (ii < i_hi)[:, None] & cm[None, :]
            o64 = tl.cast(o, tl.int64)
            i64 = tl.cast(ii, tl.int64)[:, None]
            off = xoff + o64 * s_o + i64 * s_i + c[None, :] * s_c
            v = tl.load(x + off, mask=mask, other=0.0).to(acc_t)
            gv = tl.load(g + goff + o64 * gs_o + i64 * gs_i + c[None, :] * gs_c, mask=mask,
                         other=0.0).to(acc_t)
            d = v - mu[None, :]
            out = ca[None, :] * gv + cbias[None, :]
            if NORM == 0:
                out += e1[None, :] * d
            elif NORM == 1:
                out += e1[None, :] * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            elif NORM == 2 or NORM == 3:
                a = tl.abs(d)
                sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                out += sgn * tl.where(a > tau[None, :], e1[None, :], tl.where(a == tau[None, :], e2[None, :], 0.0))
            elif NORM == 4:
                out += tl.where(v == chi[None, :], e1[None, :], 0.0) + tl.where(v == clo[None, :], e2[None, :], 0.0)
            tl.store(gx + off, out.to(gx.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(mean_p, raw_p, rm_p, rv_p, nbt_p, skipped_p, status_p, mom_p, C, G, c_const, momentum,
                   bessel, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr, HAS_NBT: tl.constexpr,
                   HAS_SKIP: tl.constexpr, MOM_T: tl.constexpr, DIVIDES: tl.constexpr, BC: tl.constexpr):
    """One program: the running-statistics update of :func:`normmatters.functional.update_running_stats` —
    masked on "every statistic finite and every new value finite in the buffer's dtype"; the status
    (1 stored, 0 non-finite, 2 unrepresentable) into status_p, the skipped counter += 1 unless stored."""
    acc_t = mean_p.dtype.element_ty
    if MOM_T:
        mom = tl.load(mom_p)
    else:
        mom = momentum
    bad = tl.zeros([BC], dtype=tl.int32)
    over = tl.zeros([BC], dtype=tl.int32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        msum = tl.zeros([BC], dtype=acc_t)
        for gi in range(0, G):
            mv = tl.load(mean_p + gi * C + c, mask=cm, other=0.0)
            bad += (cm & ((tl.abs(mv) == float("inf")) | (mv != mv))).to(tl.int32)
            msum += mv
            if DIVIDES:
                sv = tl.load(raw_p + gi * C + c, mask=cm, other=0.0) * c_const
                bad += (cm & ((tl.abs(sv) == float("inf")) | (sv != sv))).to(tl.int32)
        if HAS_RM:
            rm = tl.load(rm_p + c, mask=cm, other=0.0)
            nm = rm + ((msum / G).to(rm.dtype) - rm) * mom
            over += (cm & ((tl.abs(nm) == float("inf")) | (nm != nm))).to(tl.int32)
        if HAS_RV:
            rv = tl.load(rv_p + c, mask=cm, other=0.0)
            vsum = tl.zeros([BC], dtype=rv.dtype)
            for gi in range(0, G):
                sv = (tl.load(raw_p + gi * C + c, mask=cm, other=0.0) * c_const).to(rv.dtype)
                vsum += sv * sv
            nv = rv + (vsum / G * bessel - rv) * mom
            over += (cm & ((tl.abs(nv) == float("inf")) | (nv != nv))).to(tl.int32)
    ok = tl.sum(bad, axis=0) == 0
    fits = tl.sum(over, axis=0) == 0
    stored = ok & fits
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        if HAS_RM:
            msum = tl.zeros([BC], dtype=acc_t)
            for gi in range(0, G):
                msum += tl.load(mean_p + gi * C + c, mask=cm, other=0.0)
            rm = tl.load(rm_p + c, mask=cm, other=0.0)
            nm = rm + ((msum / G).to(rm.dtype) - rm) * mom
            tl.store(rm_p + c, tl.where(stored, nm, rm), mask=cm)
        if HAS_RV:
            rv = tl.load(rv_p + c, mask=cm, other=0.0)
            vsum = tl.zeros([BC], dtype=rv.dtype)
            for gi in range(0, G):
                sv = (tl.load(raw_p + gi * C + c, mask=cm, other=0.0) * c_const).to(rv.dtype)
                vsum += sv * sv
            nv = rv + (vsum / G * bessel - rv) * mom
            tl.store(rv_p + c, tl.where(stored, nv, rv), mask=cm)
    if HAS_NBT:
        tl.store(nbt_p, tl.load(nbt_p) + stored.to(tl.int64))
    if HAS_SKIP:
        tl.store(skipped_p, tl.load(skipped_p) + (1 - stored.to(tl.int64)))
    status = tl.where(ok, tl.where(fits, 1, 2), 0)
    tl.store(status_p, status.to(tl.int64))


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


def update_running(mean: Tensor, raw: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                   num_batches_tracked: Tensor | None, skipped: Tensor | None, c: float,
                   momentum: float | Tensor, n: int) -> Tensor:
    """The running-statistics update (one kernel; see :func:`normmatters.functional.update_running_stats`);
    returns the 0-dim int64 status (1 stored, 0 non-finite statistics, 2 unrepresentable). ``raw`` None:
    mean-only (running_var untouched)."""
    G, C = mean.shape
    status = torch.empty((), dtype=torch.int64, device=mean.device)
    mom_t = isinstance(momentum, Tensor)
    mom_p = momentum.reshape(()).to(device=mean.device, dtype=mean.dtype) if mom_t else status
    divides = raw is not None
    has_rv = running_var is not None and divides
    dummy = mean
    wrap_triton(_update_kernel)[(1,)](
        mean, raw if divides else mean, running_mean if running_mean is not None else dummy,
        running_var if has_rv else dummy, num_batches_tracked if num_batches_tracked is not None else status,
        skipped if skipped is not None else status, status, mom_p, C, G, float(c),
        0.0 if mom_t else float(momentum), float(n / (n - 1)),
        HAS_RM=running_mean is not None, HAS_RV=has_rv, HAS_NBT=num_batches_tracked is not None,
        HAS_SKIP=skipped is not None, MOM_T=mom_t, DIVIDES=divides, BC=min(_pow2(C), 1024))
    return status
