"""Schedule the weight norm instead of the learning rate (Hoffer et al. 2018, sec. 3)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["NormSchedule"]


class NormSchedule:
    """Keep η constant and, at each milestone, multiply the scale-invariant weights by √k where a rate
    schedule would divide η by k.

    For a scale-invariant weight the effective step is η/‖w‖², so multiplying w by √k equals dividing η by k.
    Gradients then come 1/√k smaller by themselves; the momentum buffers of ``optimizer`` (if given) are
    scaled by 1/√k too, which makes the equivalence exact for SGD with momentum (Adam's normalised step
    scales as η/‖w‖ instead; there the matching factor is k, not √k — pass ``adaptive=True``).

    Args:
        params: the scale-invariant parameters.
        milestones: step counts (calls of :meth:`step`) at which to rescale, increasing.
        factors: k per milestone (e.g. 10 for "divide η by 10"), or one number for all.
        optimizer: optional; its ``momentum_buffer`` state for ``params`` is rescaled consistently.
    Call :meth:`step` once per iteration (or per epoch, matching how the milestones are counted).
    """

    def __init__(self, params: Iterable[Tensor], milestones: Sequence[int], factors: float | Sequence[float],
                 optimizer: torch.optim.Optimizer | None = None, adaptive: bool = False) -> None:
        self.params = list(params)
        self.milestones = list(milestones)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"NormSchedule: milestones must increase, got {self.milestones}")
        self.factors = ([float(factors)] * len(self.milestones) if isinstance(factors, (int, float))
                        else [float(f) for f in factors])
        if len(self.factors) != len(self.milestones):
            raise ValueError(f"NormSchedule: {len(self.milestones)} milestones but {len(self.factors)} factors")
        if any(not (f > 0 and math.isfinite(f)) for f in self.factors):
            raise ValueError(f"NormSchedule: factors must be positive, got {self.factors}")
        self.optimizer = optimizer
        self.adaptive = adaptive
        self.count = 0

    def scale_at(self, count: int) -> float:
        """The total factor applied to the weights after ``count`` calls of :meth:`step`."""
        total = 1.0
        for m, f in zip(self.milestones, self.factors):
            if count >= m:
                total *= f if self.adaptive else math.sqrt(f)
        return total

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        for m, f in zip(self.milestones, self.factors):
            if self.count == m:
                s = f if self.adaptive else math.sqrt(f)
                for p in self.params:
                    p.mul_(s)
                    state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
                    # gradients now come 1/s smaller: put the stored moments on the same scale
                    if state.get("momentum_buffer") is not None:
                        state["momentum_buffer"].div_(s)
                    if state.get("exp_avg") is not None:
                        state["exp_avg"].div_(s)
                    if state.get("exp_avg_sq") is not None:
                        state["exp_avg_sq"].div_(s * s)

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["count"])
