"""Framework-free pieces the callbacks share: candidate weights, the lazily built weight-decay mimic and the
monitor's key filter."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..optim import WeightDecayMimic, gradient_scale_invariant
from ..optim.monitor import EffectiveLRMonitor as CoreMonitor

__all__ = ["candidates", "LazyMimic", "build_monitor", "select_metrics", "mimic_factors"]

log = logging.getLogger(__name__)


def candidates(model: nn.Module, optimizer: torch.optim.Optimizer,
               names: Iterable[str] | None = None) -> list[tuple[str, Tensor]]:
    """The model's trainable parameters of ≥ 2 dims that ``optimizer`` updates (or exactly ``names``)."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in in_opt]
    if names is not None:
        wanted = list(names)
        have = dict(named)
        missing = [n for n in wanted if n not in have]
        if missing:
            raise ValueError(f"normmatters.integrations: parameter(s) {missing} are not trainable parameters of "
                             f"{type(model).__name__} that the optimizer updates")
        return [(n, have[n]) for n in wanted]
    return [(n, p) for n, p in named if p.requires_grad and p.dim() >= 2]


def raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (Lightning's LightningOptimizer, accelerate's
    AcceleratedOptimizer hold it as ``.optimizer``)."""
    for _ in range(4):  # AcceleratedOptimizer subclasses Optimizer, but its step hooks are not the inner one's
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"normmatters.integrations: found no torch.optim.Optimizer in the trainer's optimizer "
                        f"({type(optimizer).__name__})")
    return optimizer


class LazyMimic:
    """A :class:`~normmatters.optim.WeightDecayMimic` (online, ``group_decay="cancel"``) built at the first
    optimizer step, when gradients exist to tell the scale-invariant weights
    (:func:`~normmatters.optim.gradient_scale_invariant`) among ``named`` candidates; then every step of
    ``optimizer`` runs through it. ``rule``: None picks "rescale" for SGD and "replay" otherwise.
    ``weight_decay``: None takes λ from the weights' param groups (whose decay the mimic cancels).
    ``pre_hook=False``: the caller runs :meth:`before_step` once the gradients exist, before the update."""

    def __init__(self, optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]], rule: str | None,
                 weight_decay: float | None, detect: bool = True, pre_hook: bool = True) -> None:
        self.optimizer = optimizer
        self.named = named
        self.rule = rule or ("rescale" if isinstance(optimizer, torch.optim.SGD) else "replay")
        self.weight_decay = weight_decay
        self.detect = detect
        self.mimic: WeightDecayMimic | None = None
        self.names: list[str] = []
        self.pending_state: dict[str, Any] | None = None
        # pre_hook=False: the caller runs before_step() once the gradients exist (Lightning computes them inside
        # optimizer.step(closure), after the step pre-hooks)
        self._hooks = [optimizer.register_step_post_hook(lambda *_: self._after())]
        if pre_hook:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.before_step()))

    def _build(self) -> None:
        keep = gradient_scale_invariant([p for _, p in self.named]) if self.detect else [True] * len(self.named)
        chosen = [(n, p) for (n, p), k in zip(self.named, keep) if k]
        if not chosen:
            raise ValueError("WeightDecayMimicCallback: found no scale-invariant weight (a conv/linear weight whose "
                             "gradient is orthogonal to each output channel, as before a batch norm) to train "
                             "without weight decay")
        self.names = [n for n, _ in chosen]
        self.mimic = WeightDecayMimic(self.optimizer, [p for _, p in chosen], weight_decay=self.weight_decay,
                                      rule=self.rule, group_decay="cancel")
        if self.pending_state is not None:
            self.mimic.load_state_dict(self.pending_state)
            self.pending_state = None
        log.info("weight-decay mimic (rule %s, λ %g) on %d scale-invariant weights: %s", self.rule,
                 self.mimic.weight_decay, len(chosen), ", ".join(self.names))

    def before_step(self) -> None:
        if self.mimic is None:
            self._build()
        self.mimic._before_step()

    def _after(self) -> None:
        self.mimic._after_step()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.mimic is None else {"names": self.names, "mimic": self.mimic.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mimic") is not None:
            self.pending_state = state["mimic"]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def mimic_factors(monitored: list[tuple[str, Tensor]], mimic: WeightDecayMimic | None) -> list[Tensor] | None:
    """Per monitored weight the mimic's last per-channel factor (1 where the mimic does not act on it)."""
    if mimic is None:
        return None
    by_id = {id(p): f for p, f in zip(mimic.params, mimic.last_factors)}
    return [by_id.get(id(p), torch.ones(p.shape[0], dtype=torch.float64)) for _, p in monitored]


def build_monitor(optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]], every_n_steps: int,
                  start_step: int, detect: bool, lazy_mimic: LazyMimic | None = None, **kw: Any) -> CoreMonitor:
    """The core monitor, reading the mimic's factors and λ once the mimic exists."""
    mon = CoreMonitor(optimizer, named, every_n_steps=every_n_steps, start_step=start_step, detect=detect, **kw)
    if lazy_mimic is not None:
        def factors() -> list[Tensor] | None:
            m = lazy_mimic.mimic
            if m is not None and mon.weight_decay is None:
                mon.weight_decay = m.weight_decay
            return mimic_factors(mon.named_params, m)

        mon.factors_fn = factors
    return mon


def select_metrics(row: dict[str, Any], metrics: Iterable[str]) -> dict[str, float]:
    """The row's scalar entries whose metric (the part before the first "/") is in ``metrics``."""
    keep = set(metrics)
    return {k: float(v) for k, v in row.items()
            if k != "step" and not isinstance(v, list) and k.split("/", 1)[0] in keep}
