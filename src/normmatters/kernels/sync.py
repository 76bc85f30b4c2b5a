"""Synced Lp batch norm: the statistics of the union of every rank's batch, exactly, with few small collectives.

On K ranks with batches B₁…B_K (any sizes, empty ones included) :func:`sync_lp_batch_norm` gives each rank the
rows, input gradients and running-buffer updates of :func:`normmatters.functional.lp_batch_norm` on the
concatenated batch; parameter gradients are the rank's share (their sum over ranks — what DDP all-reduces — is
the single-process gradient). The estimators' partial statistics (:mod:`normmatters.estimators`) are what
travels; per channel, in the order every rank runs them:

========  =======================================================  ===========================================
norm      forward collectives (C channels, K ranks, d = x − μ)     backward (all-reduce SUM)
========  =======================================================  ===========================================
every     all-gather [count, Σx] — (1 + C) float64 per rank        C (gradient through μ)
``l2``    + all-reduce Σd² (C)                                     + C
``l1``    + all-reduce Σ|d| (C)                                    + C
``linf``  max x, min x ride in the first all-gather (+2C);         + C
          + all-reduce the tie count of max|d| (C)
          (max|x − μ| = max(max x − μ, μ − min x))
``topk``  + all-gather each rank's k largest |d| (C·k), merged     + C
          to the global k largest; + all-reduce the counts
          above / at the k-th largest (2C)
``range`` max x, min x ride in the first all-gather (+2C);         + C
          + all-reduce the tie counts at max and min (2C)
``mean``  nothing more                                             nothing more (μ's C)
========  =======================================================  ===========================================

The forward values are reduced without autograd; each reduced statistic is then tied to a local
"surrogate" whose gradient is the rank's share of the statistic's gradient (:class:`_ReducedSum`): its
backward all-reduces the gradient of the statistic over the group. The extreme elements of linf / topk /
range live on some rank; ties across ranks share the gradient evenly, as in one process (autograd's amax
rule, :func:`normmatters.estimators._extreme_pieces`). Every rank sees the same reduced statistics, so
every rank raises (``nonfinite="raise"``), warns or updates its buffers alike. Ranks must agree on whether
the input requires grad (each runs the same backward collectives), as with ``nn.SyncBatchNorm``.

Not supported with sync (``ValueError``): ``chunks`` (range), ``ghost_batch_size``, ``precision``,
``inplace``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..estimators import get_estimator
from ..functional import (
    acc_dtype,
    check_input,
    inv_std,
    report_nonfinite,
    update_running_stats,
)

__all__ = ["sync_lp_batch_norm", "group_size", "count_traffic"]

#: norms whose statistic needs the global per-channel max and min of x (riding in the first all-gather)
_NEEDS_EXTREMES = frozenset({"linf", "range"})


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


class _ReducedSum(torch.autograd.Function):
    """``total`` (a statistic already reduced over the group, identical on every rank) whose gradient flows to
    ``local``, the rank's differentiable share: backward all-reduces (SUM) the gradient of ``total``, since
    the total loss Σ_r L_r depends on every rank's copy of the statistic."""

    @staticmethod
    def forward(ctx, local: Tensor, total: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return total.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        _record("all_reduce", grad, "backward")
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


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


def _statistic(norm: str, k: int, x: Tensor, d: Tensor, mu: Tensor, hi: Tensor | None, lo: Tensor | None,
               n: int, group) -> Tensor:
    """σ̂ (C,) of the union batch, differentiable w.r.t. the local x (through d and μ)."""
    est = get_estimator(norm)
    dims = (0, 2)
    C = x.shape[1]
    with torch.no_grad():
        a = d.detach().abs()
    if norm in ("l2", "l1"):
        local = d.square().sum(dims) if norm == "l2" else d.abs().sum(dims)
        total = _all_reduce(local.detach(), group)
        field = "sum_sq" if norm == "l2" else "sum_abs"
        return est.finalize({field: _ReducedSum.apply(local, total, group)}, n)
    if norm == "linf":
        tau = torch.maximum(hi - mu.detach(), mu.detach() - lo)  # = max|x − μ| exactly (fl(·) is monotone)
        tied = (a == tau[None, :, None]).to(x.dtype)
        count = _all_reduce(tied.sum(dims), group)
        local = (d.abs() * tied).sum(dims) / count
        return est.finalize({"max_abs": _ReducedSum.apply(local, tau, group)}, n)
    if norm == "topk":
        rows = a.transpose(0, 1).reshape(C, -1)
        mine = rows.topk(min(k, rows.shape[1]), dim=-1).values
        if mine.shape[1] < k:  # a shard with fewer than k elements pads with values no merge keeps
            mine = torch.cat([mine, mine.new_full((C, k - mine.shape[1]), -math.inf)], dim=1)
        cand = _all_gather(mine, group).transpose(0, 1).reshape(C, -1)
        top = cand.topk(k, dim=-1).values
        tau = top.amin(-1)[None, :, None]
        gt, eq = (a > tau).to(x.dtype), (a == tau).to(x.dtype)
        counts = _all_reduce(torch.stack([gt.sum(dims), eq.sum(dims)]), group)
        w_eq = (k - counts[0]) / counts[1]  # elements tied at the k-th largest share its weight evenly
        local = (d.abs() * (gt + eq * w_eq[None, :, None])).sum(dims)
        total = _ReducedSum.apply(local, top.sum(-1), group)
        return est.finalize({"topk": (total / k)[:, None]}, n, k=k)
    if norm == "range":
        at_hi, at_lo = (x.detach() == hi[None, :, None]).to(x.dtype), (x.detach() == lo[None, :, None]).to(x.dtype)
        counts = _all_reduce(torch.stack([at_hi.sum(dims), at_lo.sum(dims)]), group)
        local = (x * at_hi).sum(dims) / counts[0] - (x * at_lo).sum(dims) / counts[1]
        part = {"range_sum": _ReducedSum.apply(local, hi - lo, group), "chunk_count": torch.ones_like(hi)}
        return est.finalize(part, n)
    raise ValueError(f"norm={norm!r} has no synced statistic")


def sync_lp_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                       weight: Tensor | None, bias: Tensor | None, momentum: float | Tensor, eps: float,
                       norm: str, k: int = 10, *, num_batches_tracked: Tensor | None = None,
                       nonfinite: str = "raise", where: str = "sync_lp_batch_norm",
                       group: dist.ProcessGroup | None = None) -> Tensor:
    """Training-mode Lp batch norm of ``input`` (N, C, *) with the statistics of the union of the batches of
    every rank of ``group`` (see the module docstring). Every rank must call it, in the same order as its other
    collectives, even with N = 0. Returns the rank's rows, shaped and typed like ``input``."""
    est = get_estimator(norm)
    check_input(input, where=where)
    N, C = input.shape[0], input.shape[1]
    S = math.prod(input.shape[2:])
    acc = acc_dtype(input.dtype)
    x = input.reshape(N, C, S).to(acc)
    dims = (0, 2)
    extremes = norm in _NEEDS_EXTREMES
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
    mu = _ReducedSum.apply(x.sum(dims) / n, (total / n).to(acc), group)
    d = x - mu[None, :, None]
    sigma = None
    if est.divides:
        hi = gathered[:, 1 + C:1 + 2 * C].amax(0).to(acc) if extremes else None
        lo = gathered[:, 1 + 2 * C:1 + 3 * C].amin(0).to(acc) if extremes else None
        sigma = _statistic(norm, k, x, d, mu, hi, lo, n, group)
        y = d * inv_std(sigma, eps)[None, :, None]
    else:
        y = d
    if weight is not None:
        y = y * weight.to(acc)[None, :, None]
    if bias is not None:
        y = y + bias.to(acc)[None, :, None]
    y = y.reshape(input.shape).to(input.dtype)
    with torch.no_grad():
        status = update_running_stats(mu.detach()[None], None if sigma is None else sigma.detach()[None],
                                      running_mean, running_var, num_batches_tracked, momentum, n)
    report_nonfinite(status, nonfinite, where,
                     tracked=not (running_mean is None and running_var is None and num_batches_tracked is None))
    return y
