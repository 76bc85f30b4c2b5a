"""Lightning callbacks: the effective learning rate and angular update of scale-invariant weights, logged
through the trainer's loggers, and weight decay reproduced without it (``pip install normmatters[lightning]``).

Example (a complete script: ``examples/lightning_mimic.py``)::

    trainer = lightning.pytorch.Trainer(callbacks=[WeightDecayMimicCallback(), EffectiveLRMonitor(every_n_steps=50)])
    trainer.fit(module, data)   # SGD(..., weight_decay=5e-4) in configure_optimizers

``EffectiveLRMonitor`` logs ``effective_lr/<layer>``, ``angular_update/<layer>`` (degrees per step) and, where
the optimizer has weight decay (or a mimic reproduces it), ``angular_update/equilibrium`` = √(2ηλ/(1+μ)) —
metric first, so a dashboard shows one card per metric; past ``max_layers`` layers, quantiles over layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl

from ..optim.monitor import EffectiveLRMonitor as CoreMonitor
from .hooks import LazyMimic, build_monitor, candidates, raw_optimizer, select_metrics

__all__ = ["EffectiveLRMonitor", "WeightDecayMimicCallback"]


def _mimic_of(trainer: pl.Trainer) -> LazyMimic | None:
    for cb in trainer.callbacks:
        if isinstance(cb, WeightDecayMimicCallback) and cb.lazy:
            return cb.lazy[0]
    return None


class EffectiveLRMonitor(pl.Callback):
    """Log, every ``every_n_steps`` optimizer steps (default: the trainer's ``log_every_n_steps``), the
    effective learning rate η·f_c/‖w_c‖^p and the angular update per step of every scale-invariant weight,
    per layer (mean over output channels), through every logger of the trainer.

    The weights are ``params`` (parameter names) or, by default, the model's conv/linear weights whose gradient
    is orthogonal to each output channel at the first logging step
    (:func:`~normmatters.optim.gradient_scale_invariant`: what scale invariance implies).
    Between logging steps the callback costs two counter increments per step; a logging step clones the watched
    weights before the step and reads every value back in one transfer
    (:class:`normmatters.optim.EffectiveLRMonitor` does the work; ``monitors`` holds one per optimizer).

    Args:
        every_n_steps: optimizer steps between logged steps.
        params: names of the weights to watch (default: detected).
        metrics: which metrics reach the loggers, of ``effective_lr``, ``angular_update``, ``norm``.
        max_layers: past this many layers, quantiles over layers replace the per-layer entries.
        max_history: rows each monitor keeps (``monitors[i].history``).
        weight_decay: λ for the equilibrium line where the optimizer has none (default: the optimizer's, or the
            λ a :class:`WeightDecayMimicCallback` reproduces).
    """

    def __init__(self, every_n_steps: int | None = None, params: Iterable[str] | None = None,
                 metrics: Sequence[str] = ("effective_lr", "angular_update"), max_layers: int = 32,
                 max_history: int = 1000, weight_decay: float | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"EffectiveLRMonitor: every_n_steps must be >= 1, got {every_n_steps}")
        unknown = set(metrics) - {"effective_lr", "angular_update", "norm"}
        if unknown:
            raise ValueError(f"EffectiveLRMonitor: unknown metrics {sorted(unknown)}; choose from effective_lr, "
                             "angular_update, norm")
        self.every_n_steps = every_n_steps
        self.params = None if params is None else list(params)
        self.metrics = tuple(metrics)
        self.max_layers = max_layers
        self.max_history = max_history
        self.weight_decay = weight_decay
        self.monitors: list[CoreMonitor] = []
        self._trainer: pl.Trainer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitors, self._trainer = [], None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # set up at the first batch, after any callback's on_train_start: the hooks then run after a mimic's
        if self._trainer is not None:
            return
        self._trainer = trainer
        every = self.every_n_steps or max(1, int(trainer.log_every_n_steps))
        mimic = _mimic_of(trainer)
        for opt in trainer.optimizers:
            raw = raw_optimizer(opt)
            named = candidates(pl_module, raw, self.params)
            if named:
                self.monitors.append(build_monitor(
                    raw, named, every, trainer.global_step, detect=self.params is None, lazy_mimic=mimic,
                    max_layers=self.max_layers, max_history=self.max_history, weight_decay=self.weight_decay,
                    sink=self._log))

    def _log(self, row: dict[str, Any]) -> None:
        trainer = self._trainer
        metrics = select_metrics(row, self.metrics)
        if trainer is None or not metrics:
            return
        # the step Lightning logs this batch's own metrics at (as its LearningRateMonitor does)
        step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", row["step"] - 1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.monitors:  # kept, with their history, until the next fit
            m.remove()


class WeightDecayMimicCallback(pl.Callback):
    """Train the scale-invariant weights without weight decay while reproducing its effect online (no earlier
    run): :class:`~normmatters.optim.WeightDecayMimic` with ``group_decay="cancel"`` — the optimizer keeps its
    ``weight_decay`` (its other parameters keep theirs); for the scale-invariant weights the callback takes the
    decay out of each step and reproduces it by the mimic's rule instead.

    The weights are ``params`` (names) or those whose gradient is orthogonal to each output channel at the
    first step (:func:`~normmatters.optim.gradient_scale_invariant`). ``rule``: "rescale" (SGD) or "replay"
    (SGD and AdamW; None: rescale for SGD, replay otherwise). ``weight_decay``: λ to reproduce (default: the
    weights' param-group λ). The mimic's state is saved in Lightning checkpoints. ``lazy[i].mimic`` is the
    mimic of optimizer i once the first step has run.
    """

    def __init__(self, rule: str | None = None, weight_decay: float | None = None,
                 params: Iterable[str] | None = None) -> None:
        from ..optim import MIMIC_RULES

        if rule is not None and rule not in MIMIC_RULES:
            raise ValueError(f"WeightDecayMimicCallback: rule must be one of {MIMIC_RULES} or None, got {rule!r}")
        self.rule = rule
        self.weight_decay = weight_decay
        self.params = None if params is None else list(params)
        self.lazy: list[LazyMimic] = []
        self._loaded: list[dict[str, Any]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lazy = []
        for opt in trainer.optimizers:
            raw = raw_optimizer(opt)
            named = candidates(pl_module, raw, self.params)
            if named:
                self.lazy.append(LazyMimic(raw, named, self.rule, self.weight_decay, detect=self.params is None,
                                           pre_hook=False))
        if not self.lazy:
            raise ValueError("WeightDecayMimicCallback: the optimizers update no weight of two or more dims")
        for lazy, state in zip(self.lazy, self._loaded):
            lazy.load_state_dict(state)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # after the closure's backward, before the update (Lightning runs the closure inside optimizer.step)
        raw = raw_optimizer(optimizer)
        for lazy in self.lazy:
            if lazy.optimizer is raw:
                lazy.before_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for lazy in self.lazy:
            lazy.remove()

    def state_dict(self) -> dict[str, Any]:
        return {"mimics": [lazy.state_dict() for lazy in self.lazy]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("mimics", []))
