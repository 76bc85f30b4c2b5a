"""Reproduce weight decay with weight decay off, by a per-channel learning-rate correction.

Why it works (Hoffer et al. 2018, sec. 3). Let w_c be one output channel's weight, followed by normalization,
so the loss depends only on û = w_c/‖w_c‖. Its gradient is orthogonal to w_c and scales as 1/‖w_c‖, so an
update of size η‖∇‖ turns the direction by about η‖∇_û L‖/‖w_c‖². A run with weight decay λ has norms
ρ_c(k) that shrink; a run without has norms ‖w_c‖ that grow. Rescaling each channel's update of the no-decay
run by ‖w_c‖²/ρ_c(k)² (norms before step k) gives it the decay run's angular step, so its directions follow
the decay run's.

Where ρ_c(k) comes from:

* ``reference=NormTrajectory`` recorded before each step of a weight-decay run (``traj.append(params)``
  then ``optimizer.step()``): ρ_c(k) is read from it.
* ``reference=None, weight_decay=λ`` — no earlier run: ρ is evolved online by replaying the decay run's SGD
  update in the current direction. Because only directions matter, the decay run's gradient at the same
  direction is the current one scaled by ‖w‖/ρ. With PyTorch's SGD (momentum μ, dampening τ, Nesterov
  optional) and û = w/‖w‖::

      d      = grad · ‖w‖/ρ + λ·ρ·û                    (decay run's gradient + decay term)
      B      ← μ·B + (1 − τ)·d        (B = d at the first step)
      u      = d + μ·B if nesterov else B
      ρ'     = ‖ρ·û − η·u‖                            per channel

  Without momentum this is ρ'² = (1 − ηλ)²ρ² + η²‖grad·‖w‖/ρ‖² (the gradient is orthogonal to û). B is a
  weight-sized buffer per parameter. Online mode needs SGD; a reference trajectory works with any optimizer.

The wrapped optimizer must have ``weight_decay=0`` for these parameters. A step whose rescaled update is not
finite restores the parameters to their values before the step and raises ``FloatingPointError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .trajectory import NormTrajectory, channel_norms

__all__ = ["WeightDecayMimic"]


def _view(c: Tensor, like: Tensor) -> Tensor:
    """(C,) per-channel values → broadcastable against ``like`` (C, ...)."""
    return c.reshape((-1,) + (1,) * (like.dim() - 1))


class WeightDecayMimic:
    """Wrap ``optimizer`` (running without weight decay on ``params``) so its updates of ``params`` follow a
    weight-decay run's directions; see the module docstring for the rule and its derivation.

    Args:
        optimizer: the wrapped optimizer; call ``mimic.step()`` instead of ``optimizer.step()``.
        params: the scale-invariant parameters (e.g. from :func:`scale_invariant_parameters`).
        reference: a :class:`NormTrajectory` of the weight-decay run (recorded before each of its steps).
        weight_decay: λ for the online mode (``reference=None``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor],
                 reference: NormTrajectory | None = None, weight_decay: float | None = None) -> None:
        self.optimizer = optimizer
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("WeightDecayMimic: got no parameters")
        if (reference is None) == (weight_decay is None):
            raise ValueError("WeightDecayMimic: give exactly one of reference (a NormTrajectory) or "
                             "weight_decay (online mode)")
        self.reference = reference
        self.weight_decay = weight_decay
        # group indices, not the dicts: optimizer.load_state_dict replaces the dicts (and a scheduler then
        # updates the new ones)
        self._group_index = [self._group_of(p) for p in self.params]
        for i, g in enumerate(self._groups):
            if g.get("weight_decay", 0.0):
                raise ValueError(f"WeightDecayMimic: parameter {i} sits in a param group with weight_decay="
                                 f"{g['weight_decay']}; the wrapped optimizer must run without weight decay")
        if reference is not None:
            if reference.shapes is None:
                raise ValueError("WeightDecayMimic: the reference trajectory is empty")
            reference.check_params(self.params, "WeightDecayMimic")
        else:
            if weight_decay < 0:
                raise ValueError(f"WeightDecayMimic: weight_decay must be >= 0, got {weight_decay}")
            if not isinstance(optimizer, torch.optim.SGD):
                raise TypeError(f"WeightDecayMimic: online mode (reference=None) models SGD's update, got "
                                f"{type(optimizer).__name__}; record a NormTrajectory of the decay run instead")
            self.rho = [channel_norms(p).to(torch.float64) for p in self.params]
            self._buffers: list[Tensor | None] = [None] * len(self.params)
        self.steps = 0
        self._pending: tuple | None = None
        self._hooks: list = []

    def _group_of(self, p: Tensor) -> int:
        for i, g in enumerate(self.optimizer.param_groups):
            if any(p is q for q in g["params"]):
                return i
        raise ValueError("WeightDecayMimic: a parameter is not in the wrapped optimizer")

    @property
    def _groups(self) -> list[dict[str, Any]]:
        return [self.optimizer.param_groups[i] for i in self._group_index]

    def _reference_norms(self) -> list[Tensor]:
        if self.reference is not None:
            if self.steps >= len(self.reference):
                raise IndexError(f"WeightDecayMimic: step {self.steps} needs the reference's norms, but it holds "
                                 f"{len(self.reference)} steps")
            return self.reference.norms(self.steps)
        return self.rho

    @torch.no_grad()
    def _evolve_rho(self, norms_before: list[Tensor], dirs: list[Tensor]) -> None:
        lam = float(self.weight_decay)
        for i, (p, g) in enumerate(zip(self.params, self._groups)):
            if p.grad is None:
                continue
            lr, mu = g["lr"], g.get("momentum", 0.0)
            damp, nesterov = g.get("dampening", 0.0), g.get("nesterov", False)
            rho = _view(self.rho[i], p).to(p.dtype)
            d = p.grad * (_view(norms_before[i], p).to(p.dtype) / rho) + lam * rho * dirs[i]
            if mu:
                buf = self._buffers[i]
                buf = d.clone() if buf is None else buf.mul_(mu).add_(d, alpha=1 - damp)
                self._buffers[i] = buf
                u = d + mu * buf if nesterov else buf
            else:
                u = d
            self.rho[i] = channel_norms(rho * dirs[i] - lr * u).to(torch.float64)

    @torch.no_grad()
    def _before_step(self) -> None:
        ref = list(self._reference_norms())  # ρ before this step (online mode replaces self.rho below)
        before = [p.detach().clone() for p in self.params]
        norms = [channel_norms(b).to(torch.float64) for b in before]
        if (self.reference is None) and any((n == 0).any() for n in norms):
            raise FloatingPointError("WeightDecayMimic: a channel has zero norm; its direction is undefined")
        dirs = [b / _view(n, b).to(b.dtype) for b, n in zip(before, norms)]
        if self.reference is None:
            self._evolve_rho(norms, dirs)  # uses the gradients before the wrapped step
        self._pending = (ref, before, norms)

    @torch.no_grad()
    def _after_step(self) -> None:
        ref, before, norms = self._pending
        self._pending = None
        for i, (p, b) in enumerate(zip(self.params, before)):
            scale = _view((norms[i] / ref[i].to(norms[i].device)).square(), p).to(p.dtype)
            new = b + (p - b) * scale
            if not torch.isfinite(new).all():
                for q, bq in zip(self.params, before):
                    q.copy_(bq)
                raise FloatingPointError(f"WeightDecayMimic: step {self.steps} gave a non-finite update for "
                                         f"parameter {i}; parameters restored to their values before the step")
            p.copy_(new)
        self.steps += 1

    def step(self, closure: Any = None) -> Any:
        """The wrapped optimizer's step with each channel's update of ``params`` rescaled."""
        if self._hooks:
            return self.optimizer.step(closure)  # the hooks do the work
        self._before_step()
        loss = self.optimizer.step(closure)
        self._after_step()
        return loss

    def attach(self) -> WeightDecayMimic:
        """Make every ``optimizer.step()`` a mimic step (through the optimizer's step pre/post hooks), for
        training loops that call the optimizer directly. :meth:`detach` undoes it."""
        if not self._hooks:
            self._hooks = [self.optimizer.register_step_pre_hook(lambda *_: self._before_step()),
                           self.optimizer.register_step_post_hook(lambda *_: self._after_step())]
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps}
        if self.reference is None:
            state["rho"] = [r.clone() for r in self.rho]
            state["buffers"] = [None if b is None else b.clone() for b in self._buffers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self.reference is None:
            self.rho = [r.clone() for r in state["rho"]]
            self._buffers = [None if b is None else b.clone() for b in state["buffers"]]
