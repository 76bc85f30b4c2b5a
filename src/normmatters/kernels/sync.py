"""Synced Lp batch norm: the statistics of the union of every rank's batch, exactly, with few small collectives.

On K ranks with batches B₁…B_K (any sizes, empty ones included) :func:`sync_lp_batch_norm` gives each rank the
rows, input gradients and running-buffer updates of :func:`normmatters.functional.lp_batch_norm` on the
concatenated batch; parameter gradients are the rank's share (their sum over ranks — what DDP all-reduces — is
the single-process gradient). The estimators' partial statistics (:mod:`normmatters.estimators`) are what
travels; per channel, in the order every rank runs them:

========  =========================================================  ===================================
norm      forward collectives (C channels, k of topk, d = x − μ)       backward
========  =========================================================  ===================================
every     all-gather [count, Σx] — (1 + C) float64 per rank            one all-reduce [Σg·w, Σg·w·d] (2C)
``l2``    + all-reduce Σd² (C)
``l1``    + all-reduce [Σ|d|, Σ sign d] (2C)
``linf``  max x, min x ride in the first all-gather (+2C), as
          max|x − μ| = max(max x − μ, μ − min x); + all-reduce the
          counts and sign sums above / at max|d| (4C)
``topk``  + all-gather each rank's k largest |d| (C·k), merged to the
          global k largest; + all-reduce the counts and sign sums
          above / at the k-th largest (4C)
``range`` max x, min x ride in the first all-gather (+2C);
          + all-reduce the tie counts at max and min (2C)
``mean``  nothing more
========  =========================================================  ===================================

The reductions the backward needs besides Σg·w and Σg·w·d are the estimator's own
(:meth:`~normmatters.estimators.Estimator.lean_sums`), reduced in the forward; the backward is the estimator's
(:meth:`~normmatters.estimators.Estimator.lean_dstat`) with the union batch's thresholds, counts and n, so the
extreme elements of linf / topk / range, which live on some rank, get their gradient there, and ties across ranks
share it evenly as in one process. Every rank sees the same reduced statistics, so every rank raises
(``nonfinite="raise"``), skips or updates its buffers alike. Ranks must agree on whether anything requires grad
(each runs the backward all-reduce), as with ``nn.SyncBatchNorm``.

Not supported with sync (``ValueError``): ``chunks`` (range), ``ghost_batch_size``, ``precision``,
``inplace``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .._batch_stats import (
    acc_dtype,
    check_input,
    inv_std,
    report_nonfinite,
    update_running_stats,
)
from ..estimators import get_estimator

__all__ = ["sync_lp_batch_norm", "group_size", "count_traffic"]

#: while :func:`count_traffic` is active: (collective, "forward"/"backward", bytes this rank contributes)
_TRAFFIC: list[tuple[str, str, int]] | None = None


class count_traffic:  # noqa: N801 — used as a context manager, like torch.no_grad
    """Record every collective this module runs while active (for the benchmark): ``with count_traffic() as t:``
    then ``t.log`` lists (collective, phase, bytes this rank contributes)."""

    def __enter__(self) -> count_traffic:
        global _TRAFFIC
        self.log: list[tuple[str, str, int]] = []
        _TRAFFIC = self.log
        return self

    def __exit__(self, *exc) -> None:
        global _TRAFFIC
        _TRAFFIC = None


def _record(op: str, t: Tensor, phase: str = "forward") -> None:
    if _TRAFFIC is not None:
        _TRAFFIC.append((op, phase, t.numel() * t.element_size()))


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (the default group for None); 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_gather(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(K, *t.shape): every rank's ``t``, in rank order (identical on every rank)."""
    out = [torch.empty_like(t) for _ in range(group_size(group))]
    _record("all_gather", t)
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _all_reduce(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    t = t.contiguous().clone()
    _record("all_reduce", t)
    dist.all_reduce(t, group=group)
    return t


def _local_extreme(x: Tensor, dims: tuple[int, ...], largest: bool) -> Tensor:
    if x.numel() == 0:  # an empty shard still joins the gather, with the identity of max / min
        return torch.full((x.shape[1],), -math.inf if largest else math.inf, dtype=x.dtype, device=x.device)
    return x.amax(dims) if largest else x.amin(dims)


def _statistic(norm: str, k: int, x5: Tensor, d5: Tensor, mu: Tensor, hi: Tensor | None, lo: Tensor | None,
               n: int, group) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(raw, aux, sums) of the union batch in the lean layout (1, 1, N, C, S) (see
    :meth:`normmatters.estimators.Estimator.lean_dstat`): the unscaled statistic, the thresholds the backward
    compares elements with, and the estimator's backward sums (:meth:`~normmatters.estimators.Estimator.lean_sums`)
    reduced over the group — in one all-reduce with the estimator's own local sum (l2's Σd², l1's Σ|d|; see
    :meth:`~normmatters.estimators.Estimator.sync_raw`)."""
    est = get_estimator(norm)
    raw, aux, first = est.sync_raw(d5, mu, hi, lo, k, lambda t: _all_gather(t, group))
    local = ((first,) if first is not None else ()) + tuple(est.lean_sums(x5, d5, raw, aux))
    total = _all_reduce(torch.stack(local), group).unbind(0) if local else ()
    if first is not None:
        raw = est.sync_finish(total[0], n)
        total = total[1:]
    return raw, aux, tuple(total)


class _SyncLpBatchNormFunction(torch.autograd.Function):
    """y = w·(x − μ)·r + b on the rank's (N, C, S) rows with the union batch's μ and r = 1/sqrt(σ̂² + eps)
    (precomputed, in ``stats``). Backward, with g̃ = g·w and d = x − μ, in one all-reduce of [Σg̃, Σg̃·d] (2C):
    dx = r·(g̃ − Σg̃/n) − (Σg̃·d)·r³·(e − ē), e and ē the estimator's elementwise part of σ̂·∂σ̂/∂x and its mean
    (:meth:`~normmatters.estimators.Estimator.lean_dstat`, with the reduced sums); dw = Σ g·d·r, db = Σ g
    (the rank's share: DDP sums them)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: dict) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stats = stats
        ctx.has_bias = bias is not None
        y = (x - stats["mu"][None, :, None]) * stats["r"][None, :, None]
        if weight is not None:
            y = y * weight[None, :, None]
        return y + bias[None, :, None] if bias is not None else y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        st = ctx.stats
        n, r = st["n"], st["r"][None, :, None]
        d = x - st["mu"][None, :, None]
        gw = g * weight[None, :, None] if weight is not None else g
        sums = torch.stack([gw.sum((0, 2)), (gw * d).sum((0, 2))]).contiguous()
        _record("all_reduce", sums, "backward")
        dist.all_reduce(sums, group=st["group"])
        dx = (gw - (sums[0] / n)[None, :, None]) * r
        if st["est"].divides:
            N, C, S = x.shape
            e, e_mean = st["est"].lean_dstat(x.reshape(1, 1, N, C, S), d.reshape(1, 1, N, C, S), st["c"], st["raw"],
                                             st["sigma"], st["aux"], st["sums"], n, st["k"])
            dx = dx - (sums[1][None, :, None] * r.pow(3)) * (e - e_mean).reshape(N, C, S)
        dw = (g * d * r).sum((0, 2)) if weight is not None and ctx.needs_input_grad[1] else None
        db = g.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def sync_lp_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                       weight: Tensor | None, bias: Tensor | None, momentum: float | Tensor, eps: float,
                       norm: str, k: int = 10, *, num_batches_tracked: Tensor | None = None,
                       nonfinite: str = "skip", where: str = "sync_lp_batch_norm",
                       group: dist.ProcessGroup | None = None, skipped: Tensor | None = None) -> Tensor:
    """Training-mode Lp batch norm of ``input`` (N, C, *) with the statistics of the union of the batches of
    every rank of ``group`` (see the module docstring). Every rank must call it, in the same order as its other
    collectives, even with N = 0. Returns the rank's rows, shaped and typed like ``input``. ``skipped``: the
    layer's counter of skipped batches (:func:`normmatters._batch_stats.report_nonfinite`). Reads the union
    batch's size back to the host once per call (it is validated as every path does)."""
    est = get_estimator(norm)
    check_input(input, where=where)
    N, C = input.shape[0], input.shape[1]
    S = math.prod(input.shape[2:])
    acc = acc_dtype(input.dtype)
    x = input.reshape(N, C, S).to(acc)
    dims = (0, 2)
    extremes = est.sync_needs_extremes
    with torch.no_grad():
        xd = x.detach()
        pieces = [torch.full((1,), float(N * S), dtype=torch.float64, device=x.device),
                  xd.sum(dims).to(torch.float64)]
        if extremes:
            pieces += [_local_extreme(xd, dims, True).to(torch.float64),
                       _local_extreme(xd, dims, False).to(torch.float64)]
        gathered = _all_gather(torch.cat(pieces), group)
    n = int(gathered[:, 0].sum().item())
    if n <= 1:  # every rank sees the same n: every rank raises
        raise ValueError(f"{where}: expected more than 1 value per channel over the process group when training, "
                         f"got {n} (this rank's input shape {tuple(input.shape)})")
    problem = est.validate(n, k=k)
    if problem:
        raise ValueError(f"{where}: {problem}")
    total = gathered[:, 1:1 + C].sum(0)
    mu = (total / n).to(acc)
    stats = {"mu": mu, "n": n, "est": est, "k": k, "group": group, "r": torch.ones_like(mu)}
    sigma = None
    if est.divides:
        with torch.no_grad():
            hi = gathered[:, 1 + C:1 + 2 * C].amax(0).to(acc) if extremes else None
            lo = gathered[:, 1 + 2 * C:1 + 3 * C].amin(0).to(acc) if extremes else None
            x5 = x.detach().reshape(1, 1, N, C, S)
            raw, aux, sums = _statistic(norm, k, x5, x5 - mu.reshape(1, 1, 1, C, 1), mu, hi, lo, n, group)
            c = est.constant_tensor(n, acc, x.device, k=k)
            sigma5 = c * raw
            sigma = sigma5.reshape(C)
        stats.update(r=inv_std(sigma, eps), raw=raw, aux=aux, sums=sums, c=c, sigma=sigma5)
    y = _SyncLpBatchNormFunction.apply(x, None if weight is None else weight.to(acc),
                                       None if bias is None else bias.to(acc), stats)
    y = y.reshape(input.shape).to(input.dtype)
    for fmt in (torch.channels_last, torch.channels_last_3d):  # keep the input's memory format, as LpBatchNorm
        if input.dim() == (4 if fmt is torch.channels_last else 5) and not input.is_contiguous() \
                and input.is_contiguous(memory_format=fmt):
            y = y.contiguous(memory_format=fmt)
    with torch.no_grad():
        status = update_running_stats(mu[None], None if sigma is None else sigma[None],
                                      running_mean, running_var, num_batches_tracked, momentum, n)
    report_nonfinite(status, nonfinite, where, skipped=skipped,
                     tracked=not (running_mean is None and running_var is None and num_batches_tracked is None))
    return y
