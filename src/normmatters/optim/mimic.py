"""Reproduce weight decay with weight decay off, by a per-channel learning-rate correction.

Why it works (Hoffer et al. 2018, sec. 3). Let w_c be one output channel's weight, followed by normalization,
so the loss depends only on û = w_c/‖w_c‖. Its gradient is orthogonal to w_c and scales as 1/‖w_c‖, so an
SGD update of size η‖∇‖ turns the direction by about η‖∇_û L‖/‖w_c‖² (an adaptive optimizer's, whose size does
not follow the gradient's, by about η/‖w_c‖). A run with weight decay λ has norms ρ_c(k) that shrink; a run
without has norms N_c = ‖w_c‖ that grow. Two rules (``rule=``) make the no-decay run's directions follow the
decay run's:

* ``"rescale"`` (the paper's): multiply each channel's update by (N_c/ρ_c)² — (N_c/ρ_c) for adaptive
  optimizers — (norms before step k), which gives it the decay run's effective step η/ρ_c². With momentum this
  is approximate: the momentum buffer holds old gradients on their own step's scale but gets the current
  factor, and decay also acts *through* the buffer — the λρû terms of past steps pointed along past
  directions, so their component across the current direction pulls the weight back (friction), which no
  rescaling of the no-decay update contains. Any optimizer with a reference trajectory; SGD online.
* ``"replay"``: replays the decay run's step in direction space exactly (in exact arithmetic). Before the
  wrapped step each channel's gradient is multiplied by N_c/ρ_c — by scale invariance it then *is* the decay
  run's gradient at ω = ρ_c·û — so the optimizer's state (SGD's momentum buffer, Adam's moments) holds the
  decay run's gradients; the wrapped step Δ is the decay run's step without its decay part. The decay part
  is added in ω-space and the weight takes ω''s direction::

      SGD (momentum μ, dampening τ, Nesterov):  D ← μ·D + (1−τ)·λω  (D = λω at the first step),
                                               ω' = ω + Δ − η·(λω + μD if nesterov else D)
      AdamW (decoupled decay):                  ω' = (1 − ηλ)·ω + Δ
      w' = N'·ω'/‖ω'‖,   N' = ‖w + (N/ρ)·Δ‖   (the norm a learning-rate-corrected step gives: no decay)

  D is a weight-sized buffer per parameter. SGD and Adam/AdamW (the decay run taken as AdamW, decoupled);
  not Adam with coupled L2 decay: there λw enters the moment estimates (m̂/√v̂ of g + λw), so the decay run's
  step does not split into a gradient part the wrapped optimizer can compute and a decay part added after.

Where ρ_c(k) comes from:

* ``reference=NormTrajectory`` recorded before each step of a weight-decay run (``traj.append(params)``
  then ``optimizer.step()``): ρ_c(k) is read from it.
* ``reference=None, weight_decay=λ`` — no earlier run: ρ is evolved online. ``"replay"`` takes ρ' = ‖ω'‖.
  ``"rescale"`` replays the decay run's SGD update in the current direction: the decay run's gradient at the
  same direction is the current one scaled by ‖w‖/ρ, so with PyTorch's SGD and û = w/‖w‖::

      d      = grad · ‖w‖/ρ + λ·ρ·û                    (decay run's gradient + decay term)
      B      ← μ·B + (1 − τ)·d        (B = d at the first step)
      u      = d + μ·B if nesterov else B
      ρ'     = ‖ρ·û − η·u‖                            per channel

  Without momentum this is ρ'² = (1 − ηλ)²ρ² + η²‖grad·‖w‖/ρ‖² (the gradient is orthogonal to û).

:attr:`last_factors` holds each channel's factor (N_c/ρ_c)^p of the last step (p = 2 for SGD, 1 for adaptive
optimizers): the mimic's effective step is η·factor/N_c^p = η/ρ_c^p. The wrapped optimizer must have
``weight_decay=0`` for these parameters. A step whose result is not finite restores the parameters (and
gradients) to their values before the step and raises ``FloatingPointError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .effective_step import ADAPTIVE_OPTIMIZERS, norm_power
from .trajectory import NormTrajectory, channel_norms

__all__ = ["WeightDecayMimic", "MIMIC_RULES", "GROUP_DECAY"]

MIMIC_RULES = ("rescale", "replay")
#: what the mimic does with weight decay the wrapped optimizer's groups apply to ``params``
GROUP_DECAY = ("error", "cancel")


def _view(c: Tensor, like: Tensor) -> Tensor:
    """(C,) per-channel values → broadcastable against ``like`` (C, ...)."""
    return c.reshape((-1,) + (1,) * (like.dim() - 1))


class WeightDecayMimic:
    """Wrap ``optimizer`` (running without weight decay on ``params``) so its updates of ``params`` follow a
    weight-decay run's directions; see the module docstring for the rules and their derivation.

    Args:
        optimizer: the wrapped optimizer; call ``mimic.step()`` instead of ``optimizer.step()`` (or
            :meth:`attach`).
        params: the scale-invariant parameters (e.g. from :func:`scale_invariant_parameters`).
        reference: a :class:`NormTrajectory` of the weight-decay run (recorded before each of its steps).
        weight_decay: λ of the decay run: needed online (``reference=None``) and by ``rule="replay"``.
        rule: ``"rescale"`` (per-channel rescaling of the update; the default) or ``"replay"`` (the decay
            run's step replayed in direction space, momentum friction included; SGD and AdamW).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor],
                 reference: NormTrajectory | None = None, weight_decay: float | None = None,
                 rule: str = "rescale", group_decay: str = "error") -> None:
        self.optimizer = optimizer
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("WeightDecayMimic: got no parameters")
        if rule not in MIMIC_RULES:
            raise ValueError(f"WeightDecayMimic: rule must be one of {MIMIC_RULES}, got {rule!r}")
        if group_decay not in GROUP_DECAY:
            raise ValueError(f"WeightDecayMimic: group_decay must be one of {GROUP_DECAY}, got {group_decay!r}")
        self.rule = rule
        self.group_decay = group_decay
        # group indices, not the dicts: optimizer.load_state_dict replaces the dicts (and a scheduler then
        # updates the new ones)
        self._group_index = [self._group_of(p) for p in self.params]
        decays = {float(g.get("weight_decay", 0.0)) for g in self._groups}
        if group_decay == "cancel" and weight_decay is None and reference is None:
            if len(decays) != 1 or not min(decays) > 0:
                raise ValueError(f"WeightDecayMimic: group_decay='cancel' without weight_decay takes λ from the "
                                 f"parameters' groups, which must share one λ > 0; found {sorted(decays)}")
            weight_decay = float(self._groups[0]["weight_decay"])
        if rule == "rescale" and (reference is None) == (weight_decay is None):
            raise ValueError("WeightDecayMimic: give exactly one of reference (a NormTrajectory) or "
                             "weight_decay (online mode)")
        if rule == "replay" and weight_decay is None:
            raise ValueError("WeightDecayMimic: rule='replay' needs weight_decay (the decay run's λ)")
        self.reference = reference
        self.weight_decay = weight_decay
        self.power = norm_power(optimizer)
        for i, g in enumerate(self._groups):
            if g.get("weight_decay", 0.0) and group_decay == "error":
                raise ValueError(f"WeightDecayMimic: parameter {i} sits in a param group with weight_decay="
                                 f"{g['weight_decay']}; the wrapped optimizer must run without weight decay "
                                 f"(or pass group_decay='cancel')")
        if weight_decay is not None and weight_decay < 0:
            raise ValueError(f"WeightDecayMimic: weight_decay must be >= 0, got {weight_decay}")
        if rule == "replay" and not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
            raise TypeError(f"WeightDecayMimic: rule='replay' models SGD's and AdamW's update, got "
                            f"{type(optimizer).__name__}; use rule='rescale' with a reference trajectory")
        if reference is not None:
            if reference.shapes is None:
                raise ValueError("WeightDecayMimic: the reference trajectory is empty")
            reference.check_params(self.params, "WeightDecayMimic")
        elif rule == "rescale" and not isinstance(optimizer, torch.optim.SGD):
            hint = " or rule='replay' (AdamW)" if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else ""
            raise TypeError(f"WeightDecayMimic: online mode (reference=None) with rule='rescale' models SGD's "
                            f"update, got {type(optimizer).__name__}; record a NormTrajectory of the decay run "
                            f"instead{hint}")
        if reference is None:
            self.rho = [channel_norms(p).to(torch.float64) for p in self.params]
        self._buffers: list[Tensor | None] = [None] * len(self.params)
        self.last_factors: list[Tensor] = [torch.ones(p.shape[0], dtype=torch.float64) for p in self.params]
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
        """Online ρ for the rescale rule: the decay run's SGD update replayed in the current direction."""
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
        ref = [r.to(p.device) for r, p in zip(self._reference_norms(), self.params)]  # ρ before this step
        before = [p.detach().clone() for p in self.params]
        norms = [channel_norms(b).to(torch.float64) for b in before]
        if (self.rule == "replay" or self.reference is None) and any((n == 0).any() for n in norms):
            raise FloatingPointError("WeightDecayMimic: a channel has zero norm; its direction is undefined")
        dirs = [b / _view(n, b).to(b.dtype) for b, n in zip(before, norms)]
        self.last_factors = [(n / r).pow(self.power) for n, r in zip(norms, ref)]
        grads = None
        coupled = self._coupled_decays()
        if self.rule == "replay" or any(coupled):
            grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        if self.rule == "replay":
            # the decay run's gradient at ω = ρ·û is this one times N/ρ (scale invariance)
            for p, n, r in zip(self.params, norms, ref):
                if p.grad is not None:
                    p.grad.mul_(_view(n / r, p).to(p.dtype))
        elif self.reference is None:
            self._evolve_rho(norms, dirs)  # uses the gradients before the wrapped step
        for p, lam in zip(self.params, coupled):  # the group adds λ·w to the gradient: take it out beforehand
            if lam and p.grad is not None:
                p.grad.add_(p.detach(), alpha=-lam)
        self._pending = (ref, before, norms, dirs, grads)

    def _decoupled(self) -> bool:
        return isinstance(self.optimizer, torch.optim.AdamW) or bool(
            self.optimizer.defaults.get("decoupled_weight_decay", False))

    def _coupled_decays(self) -> list[float]:
        """Per parameter, the coupled decay λ_g its group adds to the gradient that ``group_decay='cancel'``
        takes out (0 where none, or where the decay is decoupled)."""
        if self.group_decay != "cancel" or self._decoupled():
            return [0.0] * len(self.params)
        return [float(g.get("weight_decay", 0.0)) for g in self._groups]

    @torch.no_grad()
    def _undo_decoupled_decay(self, before: list[Tensor]) -> None:
        """AdamW shrank w to (1 − ηλ_g)·w before its update: add ηλ_g·w back (``group_decay='cancel'``)."""
        if self.group_decay != "cancel" or not self._decoupled():
            return
        for p, b, g in zip(self.params, before, self._groups):
            lam = float(g.get("weight_decay", 0.0))
            if lam and p.grad is not None:
                p.add_(b * (g["lr"] * lam))

    @torch.no_grad()
    def _replayed(self, i: int, p: Tensor, before: Tensor, rho: Tensor, norm: Tensor, u: Tensor) -> Tensor:
        """The replay rule's new weight for parameter i (and the online ρ' in ``self.rho``)."""
        g = self._groups[i]
        lr, lam = float(g["lr"]), float(self.weight_decay)
        rho_v = _view(rho, p).to(p.dtype)
        omega = rho_v * u
        delta = p - before
        if isinstance(self.optimizer, torch.optim.SGD):
            mu, damp, nesterov = g.get("momentum", 0.0), g.get("dampening", 0.0), g.get("nesterov", False)
            d = lam * omega
            if mu:
                buf = self._buffers[i]
                buf = d.clone() if buf is None else buf.mul_(mu).add_(d, alpha=1 - damp)
                self._buffers[i] = buf
                d = d + mu * buf if nesterov else buf
            new_omega = omega + delta - lr * d
        else:  # AdamW: decoupled decay shrinks ω before the (gradient-only) Adam step Δ
            new_omega = (1.0 - lr * lam) * omega + delta
        new_rho = channel_norms(new_omega).to(torch.float64)
        new_norm = channel_norms(before + delta * _view(norm / rho, p).to(p.dtype)).to(torch.float64)
        if self.reference is None:
            self.rho[i] = new_rho
        return new_omega * _view(new_norm / new_rho, p).to(p.dtype)

    @torch.no_grad()
    def _after_step(self) -> None:
        ref, before, norms, dirs, grads = self._pending
        self._pending = None
        self._undo_decoupled_decay(before)
        saved = (None if self.reference is not None else [r.clone() for r in self.rho],
                 [None if b is None else b.clone() for b in self._buffers]) if self.rule == "replay" else None
        news = []
        for i, (p, b) in enumerate(zip(self.params, before)):
            if self.rule == "replay":
                if grads[i] is None:  # the optimizer skipped it, and so does the decay run
                    news.append(p.detach().clone())
                    continue
                new = self._replayed(i, p, b, ref[i], norms[i], dirs[i])
            else:
                new = b + (p - b) * _view(self.last_factors[i], p).to(p.dtype)
            if not torch.isfinite(new).all():
                for q, bq in zip(self.params, before):
                    q.copy_(bq)
                if grads is not None:
                    for q, gq in zip(self.params, grads):
                        if gq is not None:
                            q.grad.copy_(gq)
                if saved is not None:
                    if saved[0] is not None:
                        self.rho = saved[0]
                    self._buffers = saved[1]
                raise FloatingPointError(f"WeightDecayMimic: step {self.steps} gave a non-finite update for "
                                         f"parameter {i}; parameters restored to their values before the step")
            news.append(new)
        for p, new in zip(self.params, news):
            p.copy_(new)
        if grads is not None:  # hand back the gradients as the loss gave them
            for p, gq in zip(self.params, grads):
                if gq is not None:
                    p.grad.copy_(gq)
        self.steps += 1

    def step(self, closure: Any = None) -> Any:
        """The wrapped optimizer's step with each channel's update of ``params`` corrected by the rule."""
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
        state: dict[str, Any] = {"steps": self.steps,
                                 "buffers": [None if b is None else b.clone() for b in self._buffers]}
        if self.reference is None:
            state["rho"] = [r.clone() for r in self.rho]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._buffers = [None if b is None else b.clone() for b in state.get("buffers", self._buffers)]
        if self.reference is None:
            self.rho = [r.clone() for r in state["rho"]]
