"""The weight-decay tools of :mod:`normmatters.optim`, attached to a :class:`Trainer` from its config.

``monitor`` (default on): :class:`~normmatters.optim.EffectiveLRMonitor` over the scale-invariant weights, on
the steps whose metrics are written (every ``log_every``-th); its values go into those step records
(``effective_lr/<weight>``, ``angular_update/<weight>``, …) and ``effective_lr.png`` is written at the end.
``record_norms``: a :class:`~normmatters.optim.NormTrajectory` recorded before every step, saved to that path.
``mimic_weight_decay``: ``"online"`` or a trajectory file — weight decay off on the scale-invariant weights
and :class:`~normmatters.optim.WeightDecayMimic` (rule ``mimic_rule``: rescale or replay) with
λ = ``wd_normalized`` (else ``weight_decay``) instead.
``norm_schedule``: the step/multi-step rate schedule's decays become :class:`~normmatters.optim.NormSchedule`
rescalings of the scale-invariant weights (the rate stays constant for every parameter).

The scale-invariant weights are those the optimizer files as "normalized" that also pass
:func:`~normmatters.optim.scale_invariant_parameters` on a training batch. All hooks act through the
optimizer's step pre/post hooks, so the training loop is unchanged; their state is checkpointed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..optim import EffectiveLRMonitor, NormSchedule, NormTrajectory, WeightDecayMimic, scale_invariant_parameters
from .optim import param_groups

__all__ = ["WeightDecayTools", "norm_schedule_steps"]

log = logging.getLogger(__name__)


def norm_schedule_steps(cfg: Any, steps_per_epoch: int) -> list[int]:
    """Optimizer steps at which a step/multi-step rate schedule would decay (where the norm schedule acts)."""
    if cfg.schedule == "multistep":
        epochs = [m for m in cfg.milestones if 0 < m < cfg.epochs]
    else:
        epochs = list(range(cfg.step_size, cfg.epochs, cfg.step_size))
    return [e * steps_per_epoch for e in epochs]


class WeightDecayTools:
    def __init__(self, trainer: Any) -> None:  # a Trainer (not imported: the trainer imports this module)
        cfg = trainer.cfg
        self.monitor: EffectiveLRMonitor | None = None
        self.trajectory: NormTrajectory | None = None
        self.mimic: WeightDecayMimic | None = None
        self.schedule: NormSchedule | None = None
        self.named: list[tuple[str, torch.nn.Parameter]] = []
        if not (cfg.monitor or cfg.record_norms or cfg.mimic_weight_decay or cfg.norm_schedule):
            return
        model = trainer.module
        batch = trainer.data.train.images[: min(64, len(trainer.data.train))].to(trainer.device)
        x = trainer.augment(batch, None, train=False).to(trainer.param_dtype)
        normalized = {id(p) for p in param_groups(model)["normalized"]}
        self.named = [(n, p) for n, p in scale_invariant_parameters(model, x) if id(p) in normalized]
        params = [p for _, p in self.named]
        if not self.named:
            if cfg.record_norms or cfg.mimic_weight_decay or cfg.norm_schedule:
                raise ValueError("config: record_norms / mimic_weight_decay / norm_schedule need scale-invariant "
                                 f"weights, and {cfg.model} with norm={cfg.norm!r} has none")
            log.info("no scale-invariant weights: effective-LR monitor off")
            return
        opt = trainer.optimizer
        log.debug("%d scale-invariant weights: %s", len(self.named), ", ".join(n for n, _ in self.named))
        if cfg.record_norms:
            self.trajectory = NormTrajectory()
            traj = self.trajectory
            opt.register_step_pre_hook(lambda *_: traj.append(params))
        if cfg.mimic_weight_decay:
            lam = cfg.weight_decay if cfg.wd_normalized is None else cfg.wd_normalized
            ref = None if cfg.mimic_weight_decay == "online" else NormTrajectory.load(cfg.mimic_weight_decay)
            online = ref is None or cfg.mimic_rule == "replay"  # replay needs λ with a trajectory too
            self.mimic = WeightDecayMimic(opt, params, reference=ref, weight_decay=lam if online else None,
                                          rule=cfg.mimic_rule)
            self.mimic.attach()
        if cfg.norm_schedule:
            steps = norm_schedule_steps(cfg, trainer.steps_per_epoch)
            self.schedule = NormSchedule(params, steps, 1.0 / cfg.gamma, optimizer=opt,
                                         adaptive=cfg.optimizer != "sgd")
            sched = self.schedule
            opt.register_step_post_hook(lambda *_: sched.step())
        if cfg.monitor:  # measures only the steps whose metrics are written (every log_every-th)
            mimic = self.mimic
            self.monitor = EffectiveLRMonitor(
                opt, self.named, every_n_steps=cfg.log_every,
                factors=(lambda: mimic.last_factors) if mimic is not None else None,
                weight_decay=mimic.weight_decay if mimic is not None else None)

    def metrics(self, global_step: int | None = None) -> dict[str, Any]:
        """The monitor's per-layer values of the last measured step (of ``global_step`` when given), metric
        first: ``effective_lr/<weight>``, ``angular_update/<weight>`` (degrees), ``norm/<weight>``."""
        row = self.monitor.latest() if self.monitor else {}
        if not row or (global_step is not None and row["step"] != global_step):
            return {}
        return {k: v for k, v in row.items() if k != "step"}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.mimic is not None:
            state["mimic"] = self.mimic.state_dict()
        if self.schedule is not None:
            state["schedule"] = self.schedule.state_dict()
        if self.trajectory is not None:
            state["trajectory"] = [[a.tolist() for a in step] for step in self.trajectory._steps]
        if self.monitor is not None:
            state["monitor_count"] = self.monitor.count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mimic is not None and "mimic" in state:
            self.mimic.load_state_dict(state["mimic"])
        if self.monitor is not None and "monitor_count" in state:
            self.monitor.count = int(state["monitor_count"])
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        if self.trajectory is not None and "trajectory" in state:
            self.trajectory._steps = [[np.asarray(a, dtype=np.float64) for a in step] for step in state["trajectory"]]
            if self.trajectory._steps:
                self.trajectory._shapes = [tuple(p.shape) for _, p in self.named]

    def finish(self, out: Path | None, record_path: str | None) -> None:
        """Save the trajectory (to ``record_path``, relative to ``out`` unless absolute) and the monitor plot."""
        if self.trajectory is not None and record_path and len(self.trajectory):
            path = Path(record_path)
            if not path.is_absolute() and out is not None:
                path = out / path
            self.trajectory.save(path)
            log.info("norm trajectory (%d steps) saved to %s", len(self.trajectory), path)
        if self.monitor is not None and out is not None and self.monitor.history:
            self.monitor.plot(out / "effective_lr.png")
