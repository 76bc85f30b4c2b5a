"""Triton kernels of the per-sample family (layer / RMS / group norm), and their host code.

Rows x2 (R, n) — R samples (group norm: sample × group), n normalized elements — one program per row, looping
over blocks of BN elements (statistics in float32; float64 for float64 rows). The affine parameters are per
element (layer / RMS norm) or per channel of ``spatial`` elements (group norm: row r holds group r mod G, element
j of it channel (r mod G)·n/spatial + j // spatial). With d = x − μ (μ = mean(x) when ``centered``, else 0: RMS
norm), per row (:mod:`normmatters.kernels.row_formulas` is the same math in torch ops)::

    forward   raw: l2 sqrt(Σd²/n) (Chan's combination of per-block moments when centered); l1 Σ|d|/n;
              linf max(max x − μ, μ − min x) = max|d|; topk mean of the k largest |d| (tile sort + bitonic
              merge of a KP = next_pow2(k) register list); range mean over m chunks of (max − min)
              σ̂ = c·raw, r = 1/hypot(σ̂, sqrt(eps)),  y = w·r·d + b
    backward  gh = g·w, x̂ = r·d, Sx̂ = Σ gh·x̂ (one reduction pass with the norm's sums), then
              ∂L/∂x = r·(gh − [centered] mean gh) − r·Sx̂ · r·(e − [centered] mean e)
              ∂L/∂w = Σ_rows g·x̂, ∂L/∂b = Σ_rows g   (a column-reduction kernel over the rows of each group)

e = σ̂·∂σ̂/∂x as in the batch-norm kernels (:mod:`.batch_norm`): ties at τ (linf / topk) and at a chunk's max / min
(range) share the gradient evenly. Saved for backward (``aux``): τ per row (linf / topk), the chunk max, min and
their tie counts (range).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .batch_norm import LINF, NORM_IDS, RANGE, TOPK, _kp, _pow2

__all__ = ["forward", "backward", "aux_shape"]


@triton.jit
def _inv_hypot(sigma, se):
    a = tl.maximum(sigma, se)
    b = tl.minimum(sigma, se)
    a = tl.maximum(a, 1e-30)
    q = b / a
    return 1.0 / (a * tl.sqrt(1.0 + q * q))


@triton.jit
def _affine_index(row, j, n, G, SPATIAL: tl.constexpr):
    if SPATIAL == 1:
        return (row % G) * n + j
    else:
        return (row % G) * (n // SPATIAL) + j // SPATIAL


@triton.jit
def _row_fwd_kernel(x, y, w_p, b_p, mean_p, raw_p, aux_p, n, c_const, se, k, m, L, G,
                    NORM: tl.constexpr, CENTERED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    SPATIAL: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr):
    acc_t = mean_p.dtype.element_ty
    row = tl.program_id(0)
    xr = x + tl.cast(row, tl.int64) * n
    yr = y + tl.cast(row, tl.int64) * n
    offs = tl.arange(0, BN)
    # pass 1: moments and extremes
    cnt = tl.zeros([1], dtype=acc_t)
    mean = tl.zeros([1], dtype=acc_t)
    m2 = tl.zeros([1], dtype=acc_t)
    hi = tl.full([BN], float("-inf"), acc_t)
    lo = tl.full([BN], float("inf"), acc_t)
    for j0 in range(0, n, BN):
        j = j0 + offs
        msk = j < n
        v = tl.load(xr + j, mask=msk, other=0.0).to(acc_t)
        if CENTERED:
            nb = tl.sum(msk.to(acc_t), axis=0)
            mb = tl.sum(v, axis=0) / nb
            dv = tl.where(msk, v - mb, 0.0)
            tot = cnt + nb
            delta = mb - mean
            frac = nb / tot
            mean = mean + delta * frac
            m2 = m2 + tl.sum(dv * dv, axis=0) + delta * delta * cnt * frac
            cnt = tot
        else:
            m2 += tl.sum(v * v, axis=0)
        hi = tl.maximum(hi, tl.where(msk, v, float("-inf")))
        lo = tl.minimum(lo, tl.where(msk, v, float("inf")))
    mu = tl.sum(mean, axis=0)
    tau = 0.0
    if NORM == 0:
        raw = tl.sqrt(tl.sum(m2, axis=0) / n)
    elif NORM == 2:
        raw = tl.maximum(tl.max(hi, axis=0) - mu, mu - tl.min(lo, axis=0))
        tau = raw
    elif NORM == 1:
        s = tl.zeros([BN], dtype=acc_t)
        for j0 in range(0, n, BN):
            j = j0 + offs
            msk = j < n
            v = tl.load(xr + j, mask=msk, other=0.0).to(acc_t)
            s += tl.where(msk, tl.abs(v - mu), 0.0)
        raw = tl.sum(s, axis=0) / n
    elif NORM == 3:
        top = tl.full([1, KP], float("-inf"), acc_t)
        for j0 in range(0, n, BN):
            j = j0 + offs
            msk = j < n
            v = tl.load(xr + j, mask=msk, other=0.0).to(acc_t)
            a = tl.reshape(tl.where(msk, tl.abs(v - mu), float("-inf")), [1, BN])
            srt = tl.sort(a, dim=1, descending=True)
            best = tl.max(tl.reshape(srt, [1, BN // KP, KP]), axis=1)
            both = tl.reshape(tl.join(top, best), [1, 2 * KP])
            top = tl.max(tl.reshape(tl.sort(both, dim=1, descending=True), [1, 2, KP]), axis=1)
        kk = tl.arange(0, KP)[None, :]
        raw = tl.sum(tl.sum(tl.where(kk < k, top, 0.0), axis=1), axis=0) / k
        tau = tl.sum(tl.sum(tl.where(kk == k - 1, top, 0.0), axis=1), axis=0)
    else:  # range: per-chunk extremes
        tot = tl.zeros([1], dtype=acc_t)
        for ci in range(0, m):
            chi = tl.full([BN], float("-inf"), acc_t)
            clo = tl.full([BN], float("inf"), acc_t)
            for j0 in range(ci * L, (ci + 1) * L, BN):
                j = j0 + offs
                msk = j < (ci + 1) * L
                v = tl.load(xr + j, mask=msk, other=0.0).to(acc_t)
                chi = tl.maximum(chi, tl.where(msk, v, float("-inf")))
                clo = tl.minimum(clo, tl.where(msk, v, float("inf")))
            h = tl.max(chi, axis=0)
            lw = tl.min(clo, axis=0)
            tl.store(aux_p + (row * m + ci) * 4, h)
            tl.store(aux_p + (row * m + ci) * 4 + 1, lw)
            tot += h - lw
        raw = tl.sum(tot, axis=0) / m
    rinv = _inv_hypot(raw * c_const, se)
    tl.store(mean_p + row, mu)
    tl.store(raw_p + row, raw)
    if NORM == 2 or NORM == 3:
        tl.store(aux_p + row, tau)
    # normalize (range: chunk by chunk, counting the ties at each chunk's max and min)
    if NORM == 4:
        for ci in range(0, m):
            h = tl.load(aux_p + (row * m + ci) * 4)
            lw = tl.load(aux_p + (row * m + ci) * 4 + 1)
            nh = tl.zeros([BN], dtype=acc_t)
            nl = tl.zeros([BN], dtype=acc_t)
            for j0 in range(ci * L, (ci + 1) * L, BN):
                j = j0 + offs
                msk = j < (ci + 1) * L
                v = tl.load(xr + j, mask=msk, other=0.0).to(acc_t)
                nh += (msk & (v == h)).to(acc_t)
                nl += (msk & (v == lw)).to(acc_t)
                out = (v - mu) * rinv
                idx = _affine_index(row, j, n, G, SPATIAL)
                if HAS_W:
                    out = out * tl.load(w_p + idx, mask=msk, other=0.0).to(acc_t)
                if HAS_B:
                    out = out + tl.load(b_p + idx, mask=msk, other=0.0).to(acc_t)
                tl.store(yr + j, out.to(y.dtype.element_ty), mask=msk)
            tl.store(aux_p + (row * m + ci) * 4 + 2, tl.sum(nh, axis=0))
            tl.store(aux_p + (row * m + ci) * 4 + 3, tl.sum(nl, axis=0))
    else:
        for j0 in range(0, n, BN):
            j = j0 + offs
            msk = j < n
            v = tl.load(xr + j, mask=msk, other=0.0).to(acc_t)
            out = (v - mu) * rinv
            idx = _affine_index(row, j, n, G, SPATIAL)
            if HAS_W:
                out = out * tl.load(w_p + idx, mask=msk, other=0.0).to(acc_t)
            if HAS_B:
                out = out + tl.load(b_p + idx, mask=msk, other=0.0).to(acc_t)
            tl.store(yr + j, out.to(y.dtype.element_ty), mask=msk)


@triton.jit
def _sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _row_bwd_kernel(g, x, gx, w_p, mean_p, raw_p, aux_p, n, c_const, se, k, m, L, G,
                    NORM: tl.constexpr, CENTERED: tl.constexpr, HAS_W: tl.constexpr, SPATIAL: tl.constexpr,
                    BN: tl.constexpr):
    acc_t = mean_p.dtype.element_ty
    row = tl.program_id(0)
    off = tl.cast(row, tl.int64) * n
    offs = tl.arange(0, BN)
    mu = tl.load(mean_p + row)
    raw = tl.load(raw_p + row)
    sigma = raw * c_const
    rinv = _inv_hypot(sigma, se)
    if NORM == 2 or NORM == 3:
        tau = tl.load(aux_p + row)
    sgh = tl.zeros([BN], dtype=acc_t)
    sghd = tl.zeros([BN], dtype=acc_t)
    s1 = tl.zeros([BN], dtype=acc_t)
    s2 = tl.zeros([BN], dtype=acc_t)
    s3 = tl.zeros([BN], dtype=acc_t)
    s4 = tl.zeros([BN], dtype=acc_t)
    for j0 in range(0, n, BN):
        j = j0 + offs
        msk = j < n
        v = tl.load(x + off + j, mask=msk, other=0.0).to(acc_t)
        gh = tl.load(g + off + j, mask=msk, other=0.0).to(acc_t)
        if HAS_W:
            gh = gh * tl.load(w_p + _affine_index(row, j, n, G, SPATIAL), mask=msk, other=0.0).to(acc_t)
        d = tl.where(msk, v - mu, 0.0)
        sgh += gh
        sghd += gh * d
        if NORM == 1:
            s1 += _sign(d)
        elif NORM == 2 or NORM == 3:
            a = tl.abs(d)
            gt = msk & (a > tau)
            eq = msk & (a == tau)
            s1 += gt.to(acc_t)
            s2 += eq.to(acc_t)
            s3 += tl.where(gt, _sign(d), 0.0)
            s4 += tl.where(eq, _sign(d), 0.0)
    sgx = rinv * tl.sum(sghd, axis=0)
    kq = rinv * sgx * rinv
    mgh = 0.0
    ebar = 0.0
    e1 = 0.0
    e2 = 0.0
    if CENTERED:
        mgh = tl.sum(sgh, axis=0) / n
    if NORM == 0:
        e1 = 1.0 / n
    elif NORM == 1:
        e1 = sigma * c_const / n
        if CENTERED:
            ebar = tl.sum(s1, axis=0) * e1 / n
    elif NORM == 2 or NORM == 3:
        cgt = tl.sum(s1, axis=0)
        ceq = tl.sum(s2, axis=0)
        w_eq = (k - cgt) / ceq
        e1 = sigma * c_const / k
        e2 = e1 * w_eq
        if CENTERED:
            ebar = (tl.sum(s3, axis=0) + w_eq * tl.sum(s4, axis=0)) * e1 / n
    for ci in range(0, m):
        if NORM == 4:
            h = tl.load(aux_p + (row * m + ci) * 4)
            lw = tl.load(aux_p + (row * m + ci) * 4 + 1)
            fr = sigma * c_const / m
            eh = fr / tl.load(aux_p + (row * m + ci) * 4 + 2)
            el = fr / tl.load(aux_p + (row * m + ci) * 4 + 3)
        for j0 in range(ci * L, (ci + 1) * L, BN):
            j = j0 + offs
            msk = j < (ci + 1) * L
            v = tl.load(x + off + j, mask=msk, other=0.0).to(acc_t)
            gh = tl.load(g + off + j, mask=msk, other=0.0).to(acc_t)
            if HAS_W:
                gh = gh * tl.load(w_p + _affine_index(row, j, n, G, SPATIAL), mask=msk, other=0.0).to(acc_t)
            d = v - mu
            if NORM == 0:
                e = d * e1
            elif NORM == 1:
                e = _sign(d) * e1
            elif NORM == 2 or NORM == 3:
                a = tl.abs(d)
                e = _sign(d) * tl.where(a > tau, e1, tl.where(a == tau, e2, 0.0))
            else:
                e = tl.where(v == h, eh, 0.0) - tl.where(v == lw, el, 0.0)
            out = rinv * (gh - mgh) - kq * (e - ebar)
            tl.store(gx + off + j, out.to(gx.dtype.element_ty), mask=msk)


@triton.jit
def _row_dw_kernel(g, x, mean_p, raw_p, gw_p, gb_p, R, n, c_const, se, G, BN: tl.constexpr):
    """Σ over the rows of group pid(0) of g·x̂ and of g, per element: (G, n) each."""
    acc_t = mean_p.dtype.element_ty
    grp = tl.program_id(0)
    j = tl.program_id(1) * BN + tl.arange(0, BN)
    msk = j < n
    sw = tl.zeros([BN], dtype=acc_t)
    sb = tl.zeros([BN], dtype=acc_t)
    for row in range(grp, R, G):
        off = tl.cast(row, tl.int64) * n
        mu = tl.load(mean_p + row)
        rinv = _inv_hypot(tl.load(raw_p + row) * c_const, se)
        v = tl.load(x + off + j, mask=msk, other=0.0).to(acc_t)
        gv = tl.load(g + off + j, mask=msk, other=0.0).to(acc_t)
        sw += gv * (v - mu) * rinv
        sb += gv
    tl.store(gw_p + grp * n + j, sw, mask=msk)
    tl.store(gb_p + grp * n + j, sb, mask=msk)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def aux_shape(norm: str, R: int, chunks: int) -> tuple[int, ...]:
    """The shape of the forward's ``aux``: τ (R,) for linf / topk, (R, m, 4) for range, else (0,)."""
    nid = NORM_IDS[norm]
    if nid in (LINF, TOPK):
        return (R,)
    if nid == RANGE:
        return (R, max(1, chunks), 4)
    return (0,)


def _block(n: int, m: int) -> int:
    return max(16, min(_pow2(n // m), 2048))


def forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, c: float, eps: float, norm: str,
            centered: bool, k: int, chunks: int, groups: int, spatial: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y (R, n) in x2's dtype, μ (R,), raw (R,), aux) in the accumulation dtype; aux τ (R,) for linf / topk,
    (R, m, 4) chunk max, min and tie counts for range, else empty. μ is 0 for ``centered=False``."""
    nid = NORM_IDS[norm]
    x2 = x2.contiguous()
    R, n = x2.shape
    m = max(1, chunks) if nid == RANGE else 1
    acc = _acc(x2.dtype)
    y = torch.empty_like(x2)
    mean = torch.empty((R,), dtype=acc, device=x2.device)
    raw = torch.empty((R,), dtype=acc, device=x2.device)
    aux = torch.empty(aux_shape(norm, R, chunks), dtype=acc, device=x2.device)
    KP = _kp(k) if nid == TOPK else 2
    BN = max(_block(n, m), KP)
    if R:
        wrap_triton(_row_fwd_kernel)[(R,)](
            x2, y, weight if weight is not None else x2, bias if bias is not None else x2, mean, raw,
            aux if aux.numel() else mean, n, float(c), math.sqrt(eps), k, m, n // m, groups, NORM=nid,
            CENTERED=centered, HAS_W=weight is not None, HAS_B=bias is not None, SPATIAL=spatial, BN=BN, KP=KP)
    return y, mean, raw, aux


def backward(gy: Tensor, x2: Tensor, weight: Tensor | None, mean: Tensor, raw: Tensor, aux: Tensor, c: float,
             eps: float, norm: str, centered: bool, k: int, chunks: int, groups: int,
             spatial: int) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂x (R, n) in x2's dtype, ∂L/∂w, ∂L/∂b flat (groups · n/spatial,) in the accumulation dtype)."""
    nid = NORM_IDS[norm]
    x2 = x2.contiguous()
    gy = gy.contiguous()
    R, n = x2.shape
    m = max(1, chunks) if nid == RANGE else 1
    acc = mean.dtype
    gx = torch.empty_like(x2)
    gw = torch.empty((groups, n), dtype=acc, device=x2.device)
    gb = torch.empty((groups, n), dtype=acc, device=x2.device)
    BN = _block(n, m)
    if R:
        wrap_triton(_row_bwd_kernel)[(R,)](gy, x2, gx, weight if weight is not None else x2, mean, raw,
                              aux if aux.numel() else mean, n, float(c), math.sqrt(eps), k, m, n // m, groups,
                              NORM=nid, CENTERED=centered, HAS_W=weight is not None, SPATIAL=spatial, BN=BN)
        BD = max(16, min(_pow2(n), 256))
        wrap_triton(_row_dw_kernel)[(groups, triton.cdiv(n, BD))](gy, x2, mean, raw, gw, gb, R, n, float(c),
                                                                   math.sqrt(eps), groups, BN=BD)
    else:
        gw.zero_()
        gb.zero_()
    if spatial > 1:
        gw = gw.reshape(groups, n // spatial, spatial).sum(-1)
        gb = gb.reshape(groups, n // spatial, spatial).sum(-1)
    return gx, gw.reshape(-1), gb.reshape(-1)

