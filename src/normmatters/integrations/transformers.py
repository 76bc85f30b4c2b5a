"""Hugging Face ``Trainer`` callbacks: the effective learning rate and angular update of scale-invariant weights
in the Trainer's logs, and weight decay reproduced without it (``pip install normmatters[transformers]``).

Example (a complete script: ``examples/hf_trainer_mimic.py``)::

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[WeightDecayMimicCallback(), EffectiveLRCallback()])

``EffectiveLRCallback`` adds ``effective_lr/<layer>`` and ``angular_update/<layer>`` (degrees per step) to the
``logs`` of every ``on_log``; it moves itself to the front of the Trainer's callback list, so every logger the
Trainer reports to (TensorBoard, W&B, …: callbacks that run before user callbacks otherwise) receives them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import transformers
from transformers.trainer_callback import CallbackHandler

from ..optim.monitor import EffectiveLRMonitor as CoreMonitor
from .hooks import LazyMimic, build_monitor, candidates, raw_optimizer, select_metrics

__all__ = ["EffectiveLRCallback", "WeightDecayMimicCallback"]


def _move_to_front(callback: transformers.TrainerCallback) -> bool:
    """Put ``callback`` first in the list of the ``CallbackHandler`` that is calling it (found on the call
    stack: callbacks receive no reference to it), so loggers see what it adds to ``logs``. Moving the current
    element to index 0 while the handler iterates its list neither skips nor repeats another callback."""
    frame = sys._getframe(1)
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks):
            if handler.callbacks[0] is not callback:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
            return True
        frame = frame.f_back
    return False


def _mimic_of(callbacks: list[Any]) -> LazyMimic | None:
    for cb in callbacks:
        if isinstance(cb, WeightDecayMimicCallback) and cb.lazy is not None:
            return cb.lazy
    return None


class EffectiveLRCallback(transformers.TrainerCallback):
    """On the Trainer's logging steps (``every_n_steps``; default: ``logging_steps``), the effective learning
    rate η·f_c/‖w_c‖^p and the angular update per step of every scale-invariant weight, per layer (mean over
    output channels), added to the ``logs`` of ``on_log`` (and to ``state.log_history``).

    The weights are ``params`` (names) or the model's conv/linear weights whose gradient is orthogonal to each
    output channel at the first logging step (:func:`~normmatters.optim.gradient_scale_invariant`). Between
    logging steps it costs two counter increments per step; a logging step clones the watched weights before
    the step and reads every value back in one transfer (:class:`normmatters.optim.EffectiveLRMonitor`).
    ``metrics``, ``max_layers``, ``weight_decay``: as in :class:`normmatters.integrations.lightning.EffectiveLRMonitor`.
    """

    def __init__(self, every_n_steps: int | None = None, params: Iterable[str] | None = None,
                 metrics: Sequence[str] = ("effective_lr", "angular_update"), max_layers: int = 32,
                 max_history: int = 1000, weight_decay: float | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"EffectiveLRCallback: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.params = None if params is None else list(params)
        self.metrics = tuple(metrics)
        self.max_layers = max_layers
        self.max_history = max_history
        self.weight_decay = weight_decay
        self.monitor: CoreMonitor | None = None
        self._logged_step: int | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        _move_to_front(self)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        _move_to_front(self)
        self.monitor = None
        self._logged_step = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kw: Any) -> None:
        # set up at the first step, after every on_train_begin: the hooks then run after a mimic's
        if self.monitor is not None or model is None or optimizer is None:
            return
        raw = raw_optimizer(optimizer)
        named = candidates(model, raw, self.params)
        if not named:
            return
        every = self.every_n_steps or max(1, int(getattr(state, "logging_steps", 0) or args.logging_steps or 1))
        frame = sys._getframe(1)
        handler = frame.f_locals.get("self") if frame is not None else None
        mimic = _mimic_of(handler.callbacks) if isinstance(handler, CallbackHandler) else None
        self.monitor = build_monitor(raw, named, every, state.global_step, detect=self.params is None,
                                     lazy_mimic=mimic, max_layers=self.max_layers, max_history=self.max_history,
                                     weight_decay=self.weight_decay)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if self.monitor is None or logs is None or not self.monitor.history:
            return
        row = self.monitor.history[-1]
        if row["step"] == self._logged_step or row["step"] != state.global_step:
            return
        self._logged_step = row["step"]
        values = select_metrics(row, self.metrics)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.monitor is not None:
            self.monitor.remove()


class WeightDecayMimicCallback(transformers.TrainerCallback):
    """Train the scale-invariant weights without weight decay while reproducing its effect online: the
    Trainer's optimizer keeps ``weight_decay`` (its other parameters keep theirs); for the weights whose
    gradient is orthogonal to each output channel at the first step (or ``params``) the callback takes the
    decay out of each step and reproduces it with :class:`~normmatters.optim.WeightDecayMimic` instead.

    ``rule``: "replay" (SGD and AdamW, the Trainer's default optimizer) or "rescale" (SGD); None picks rescale
    for SGD, replay otherwise. ``weight_decay``: λ to reproduce (default: ``args.weight_decay``, the λ of the
    weights' group). ``lazy.mimic`` is the mimic once the first step has run.
    """

    def __init__(self, rule: str | None = None, weight_decay: float | None = None,
                 params: Iterable[str] | None = None) -> None:
        from ..optim import MIMIC_RULES

        if rule is not None and rule not in MIMIC_RULES:
            raise ValueError(f"WeightDecayMimicCallback: rule must be one of {MIMIC_RULES} or None, got {rule!r}")
        self.rule = rule
        self.weight_decay = weight_decay
        self.params = None if params is None else list(params)
        self.lazy: LazyMimic | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kw: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("WeightDecayMimicCallback: the Trainer passed no model/optimizer to on_train_begin")
        raw = raw_optimizer(optimizer)
        named = candidates(model, raw, self.params)
        if not named:
            raise ValueError("WeightDecayMimicCallback: the optimizer updates no weight of two or more dims")
        self.lazy = LazyMimic(raw, named, self.rule, self.weight_decay, detect=self.params is None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.lazy is not None:
            self.lazy.remove()
