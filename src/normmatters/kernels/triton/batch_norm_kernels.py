"""The Triton kernels of the batch-statistics family (the host code, layout and formulas: :mod:`.batch_norm`).

Every kernel runs on a grid (G ghost groups × channel blocks of BC, m·P spans): program (pid, sp) reads the tile
[BI × BC] of its span in one of two addressing modes (``ROWS``: channels-last or no spatial dims, one row stride;
``NCS``: contiguous, a loop over samples and spatial tiles) and accumulates in the dtype of its workspace / statistics
pointer (float32, or float64 for float64 input). Norm ids (``NORM``): l2 0, l1 1, linf 2, topk 3, range 4, mean 5
(:data:`.batch_norm.NORM_IDS`).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []


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
