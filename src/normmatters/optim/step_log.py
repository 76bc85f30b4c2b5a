"""Per-channel record of the steps of scale-invariant weights, and the effective-step ratio of two runs.

The effective step of channel c at step k is e_c(k) = η_k·f_c(k)/‖w_c(k)‖^p (``effective_step``): ‖w_c(k)‖ the
norm before the step, p = 2 for SGD and 1 for adaptive optimizers, f_c(k) the per-channel factor a tool
applies to the step (the weight-decay mimic's rescaling; 1 for plain runs — a norm schedule acts on ‖w_c‖
itself, so it needs no factor). Two runs with the same effective steps turn their directions at the same rate
(Hoffer et al. 2018, sec. 3): :func:`effective_step_ratio` compares a run with a reference run channel by
channel at the same steps, which stays meaningful where the runs' directions have drifted apart by chaos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .effective_step import effective_step, norm_power
from .trajectory import channel_norms

__all__ = ["ChannelStepLog", "effective_step_ratio", "angular_update_ratio"]


class ChannelStepLog:
    """Record, through ``optimizer``'s step pre/post hooks, every ``every``-th step of ``params``: per output
    channel (channels of all params concatenated, C in total) the norm before the step, the rate η of its
    param group, the factor ``factors()`` reports (a list of (C_i,) tensors, read after the step; e.g.
    ``lambda: mimic.last_factors``) and the angle (radians) between the channel before and after the step.

    Register it after any tool that changes the step in its own hooks (mimic, norm schedule), so the angle
    covers the whole step. ``steps`` (S,) holds the 0-based step indices; :meth:`effective_steps`,
    :meth:`angles`, :meth:`norms` give (S, C) float64 tensors. :meth:`remove` detaches the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor],
                 factors: Callable[[], list[Tensor]] | None = None, every: int = 1) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        if not self.params:
            raise ValueError("ChannelStepLog: got no parameters")
        if every < 1:
            raise ValueError(f"ChannelStepLog: every must be >= 1, got {every}")
        self.power = norm_power(optimizer)
        self.factors_fn = factors
        self.every = every
        self._group_index = []
        for i, p in enumerate(self.params):
            index = next((j for j, g in enumerate(optimizer.param_groups) if any(p is q for q in g["params"])),
                         None)
            if index is None:
                raise ValueError(f"ChannelStepLog: parameter {i} is not in the optimizer")
            self._group_index.append(index)
        self.count = 0
        self.steps: list[int] = []
        self._norms: list[Tensor] = []
        self._lrs: list[Tensor] = []
        self._factors: list[Tensor] = []
        self._angles: list[Tensor] = []
        self._before: list[Tensor] | None = None
        self._pre = optimizer.register_step_pre_hook(self._snapshot)
        self._post = optimizer.register_step_post_hook(self._record)

    @torch.no_grad()
    def _snapshot(self, *_: object) -> None:
        self._before = [p.detach().clone() for p in self.params] if self.count % self.every == 0 else None

    @torch.no_grad()
    def _record(self, *_: object) -> None:
        if self._before is not None:
            lrs, angles = [], []
            for p, b, gi in zip(self.params, self._before, self._group_index):
                lr = self.optimizer.param_groups[gi]["lr"]
                lrs.append(torch.full((p.shape[0],), float(lr), dtype=torch.float64))
                a, w = b.flatten(1).double(), p.detach().flatten(1).double()
                cos = torch.nn.functional.cosine_similarity(a, w, dim=1).clamp(-1, 1)
                angles.append(torch.acos(cos).cpu())
            self.steps.append(self.count)
            self._norms.append(torch.cat([channel_norms(b).to("cpu", torch.float64) for b in self._before]))
            self._lrs.append(torch.cat(lrs))
            fs = self.factors_fn() if self.factors_fn is not None else None
            self._factors.append(torch.ones_like(self._lrs[-1]) if fs is None
                                 else torch.cat([f.to("cpu", torch.float64) for f in fs]))
            self._angles.append(torch.cat(angles))
            self._before = None
        self.count += 1

    def _stack(self, rows: list[Tensor]) -> Tensor:
        if not rows:
            raise ValueError("ChannelStepLog: no step recorded yet")
        return torch.stack(rows)

    def norms(self) -> Tensor:
        """(S, C) channel norms before each logged step."""
        return self._stack(self._norms)

    def angles(self) -> Tensor:
        """(S, C) angle (radians) each logged step turned each channel by."""
        return self._stack(self._angles)

    def effective_steps(self) -> Tensor:
        """(S, C) η·f_c/‖w_c‖^p per logged step and channel."""
        return effective_step(self._stack(self._lrs), self.norms(), self._stack(self._factors), self.power)

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()


def effective_step_ratio(run: ChannelStepLog, reference: ChannelStepLog) -> dict[str, float]:
    """Median and interquartile range (q75 − q25) of e_c(k)/e_c^ref(k) over the channels and the steps both
    logs hold. A run whose effective steps are the reference's sits at 1 with IQR 0."""
    if run.power != reference.power:
        raise ValueError(f"effective_step_ratio: the runs' optimizers differ in kind (effective step ∝ "
                         f"1/‖w‖^{run.power} vs 1/‖w‖^{reference.power})")
    common = sorted(set(run.steps) & set(reference.steps))
    if not common:
        raise ValueError("effective_step_ratio: the logs share no step")
    a, b = run.effective_steps(), reference.effective_steps()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"effective_step_ratio: the runs log {a.shape[1]} and {b.shape[1]} channels")
    pa, pb = {s: i for i, s in enumerate(run.steps)}, {s: i for i, s in enumerate(reference.steps)}
    ia, ib = torch.tensor([pa[s] for s in common]), torch.tensor([pb[s] for s in common])
    ratio = (a[ia] / b[ib]).flatten()
    q = torch.quantile(ratio, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "iqr": float(q[2] - q[0])}


def angular_update_ratio(run: ChannelStepLog, reference: ChannelStepLog, first_step: int = 0,
                         end_step: int | None = None) -> dict[str, float]:
    """Per channel c, the run's mean angular update per step over the steps k in [first_step, end_step) that both
    logs hold, over the reference's: r_c = mean_k θ_c(k) / mean_k θ_c^ref(k); median and interquartile range
    (q75 − q25) over the channels (channels the reference did not turn are left out; NaN if none is left).

    Unlike :func:`effective_step_ratio`, this compares what the runs did, not what their rules set: a run whose
    effective step equals the reference's by construction still turns slower where its own gradient is smaller
    (the angular update per step is about η·G/‖w‖² with G the gradient's size at unit norm)."""
    common = [s for s in sorted(set(run.steps) & set(reference.steps))
              if s >= first_step and (end_step is None or s < end_step)]
    if not common:
        return {"median": float("nan"), "iqr": float("nan")}
    a, b = run.angles(), reference.angles()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"angular_update_ratio: the runs log {a.shape[1]} and {b.shape[1]} channels")
    pa, pb = {s: i for i, s in enumerate(run.steps)}, {s: i for i, s in enumerate(reference.steps)}
    ia, ib = torch.tensor([pa[s] for s in common]), torch.tensor([pb[s] for s in common])
    num, den = a[ia].mean(0), b[ib].mean(0)
    ratio = num[den > 0] / den[den > 0]
    if ratio.numel() == 0:
        return {"median": float("nan"), "iqr": float("nan")}
    q = torch.quantile(ratio, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "iqr": float(q[2] - q[0])}
