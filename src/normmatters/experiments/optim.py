"""Optimizer with three weight-decay groups, and per-step learning-rate schedules.

Parameter groups (see :class:`~normmatters.experiments.config.TrainConfig`):

* ``normalized`` — the weight of a Conv/Linear whose next parametrised module (in registration order, which
  is forward order in :mod:`normmatters.experiments.models`) is a normalization layer: the output of the norm
  does not change when that weight is scaled, so decay only sets its effective step size (Hoffer et al. 2018,
  §5; van Laarhoven 2017).
* ``norm`` — weight and bias of normalization layers.
* ``other`` — everything else (biases, the classifier).

Schedules are a multiplier of the base rate evaluated per optimizer step: optional linear warm-up from
``warmup_start`` to 1 over ``warmup_epochs``, then constant / step / multi-step / cosine (to 0) over the
remaining steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from .config import TrainConfig

__all__ = ["param_groups", "build_optimizer", "lr_multiplier", "build_scheduler", "is_norm_module"]


def is_norm_module(m: nn.Module) -> bool:
    """True for nn.BatchNorm*/SyncBatchNorm/InstanceNorm and normmatters' Lp batch norms (all ``_NormBase``),
    and for LayerNorm/GroupNorm."""
    return isinstance(m, _NormBase | nn.LayerNorm | nn.GroupNorm)


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split ``model``'s trainable parameters into ``normalized`` / ``norm`` / ``other`` (each once)."""
    leaves = [
        m
        for m in model.modules()
        if (not list(m.children()) or parametrize.is_parametrized(m, "weight"))
        and (is_norm_module(m) or parametrize.is_parametrized(m, "weight")
             or any(True for _ in m.parameters(recurse=False)))
    ]
    groups: dict[str, list[nn.Parameter]] = {"normalized": [], "norm": [], "other": []}
    seen: set[int] = set()

    def add(name: str, p: nn.Parameter | None) -> None:
        if p is not None and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups[name].append(p)

    for i, m in enumerate(leaves):
        if is_norm_module(m):
            for p in m.parameters(recurse=False):
                add("norm", p)
        elif parametrize.is_parametrized(m, "weight"):
            # weight norm: the direction v is scale-invariant by construction; the magnitudes g are not
            originals = m.parametrizations.weight
            add("normalized", getattr(originals, "original1", getattr(originals, "original", None)))
            add("other", getattr(originals, "original0", None) if hasattr(originals, "original1") else None)
            add("other", m.bias)
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            nxt = leaves[i + 1] if i + 1 < len(leaves) else None
            add("normalized" if nxt is not None and is_norm_module(nxt) else "other", m.weight)
            add("other", m.bias)
    for p in model.parameters():
        add("other", p)
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over the three decay groups (empty groups dropped)."""
    decay = {
        # with the mimic, decay on scale-invariant weights is reproduced by rescaled updates instead
        "normalized": 0.0 if cfg.mimic_weight_decay else
        (cfg.weight_decay if cfg.wd_normalized is None else cfg.wd_normalized),
        "norm": cfg.wd_norm,
        "other": cfg.weight_decay if cfg.wd_other is None else cfg.wd_other,
    }
    groups = [
        {"params": ps, "weight_decay": decay[name], "name": name}
        for name, ps in param_groups(model).items()
        if ps
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_multiplier(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """``f(step) -> factor`` of the base learning rate at optimizer step ``step`` (0-based)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def f(step: int) -> float:
        if step < warm:
            return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / warm
        epoch = step // steps_per_epoch
        if cfg.norm_schedule:  # the decays act on the weight norms instead (experiments.wd_tools)
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** (epoch // cfg.step_size)
        if cfg.schedule == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_multiplier` (its state is ``last_epoch`` = steps taken)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch))


def describe_length_change(saved: TrainConfig, cfg: TrainConfig, steps_per_epoch: int, step: int) -> str | None:
    """What resuming a run saved with ``saved.epochs`` as ``cfg.epochs`` does to its learning rate at ``step``.

    Only the cosine schedule depends on the run length: it is recomputed for the new length, so the rate jumps
    (said in the returned text). Constant, step and multistep schedules continue unchanged. None when the
    length is the same.
    """
    if saved.epochs == cfg.epochs:
        return None
    if cfg.schedule != "cosine" or cfg.norm_schedule:
        return (f"run length changed from {saved.epochs} to {cfg.epochs} epochs; the {cfg.schedule} schedule "
                "continues unchanged")
    old = lr_multiplier(saved, steps_per_epoch)(step) * cfg.lr
    new = lr_multiplier(cfg, steps_per_epoch)(step) * cfg.lr
    return (f"run length changed from {saved.epochs} to {cfg.epochs} epochs: the cosine schedule is recomputed "
            f"for {cfg.epochs} epochs (it restarts from the new curve), so the learning rate at step {step} jumps "
            f"from {old:.4g} (old schedule) to {new:.4g} and then decays to 0 at epoch {cfg.epochs}")
