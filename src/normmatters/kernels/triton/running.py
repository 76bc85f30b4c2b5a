"""The running-statistics update of the Triton path: one single-program kernel, exactly
:func:`normmatters.functional.update_running_stats` (running_mean ← running_mean + momentum·(mean_G(μ) −
running_mean); running_var ← running_var + momentum·(mean_G(σ̂²)·n/(n−1) − running_var), σ̂ = c·raw cast to the
buffer's dtype before squaring; num_batches_tracked += 1), masked on the device — every buffer keeps its value when a
statistic is not finite or a new value overflows the buffer's dtype — plus an optional int64 counter of the skipped
batches. Nothing is read back to the host: the 0-dim status is returned (1 stored, 0 non-finite, 2 unrepresentable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .batch_norm import _pow2

__all__ = ["update_running"]


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
