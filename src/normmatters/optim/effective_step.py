"""The effective step of a scale-invariant weight: η/‖w‖² under SGD, η/‖w‖ under adaptive optimizers.

A scale-invariant weight's gradient is orthogonal to it and scales as 1/‖w‖, so an SGD update of size η‖∇‖
turns its direction by about η‖∇_û L‖/‖w‖²; an adaptive optimizer (Adam, AdamW, …) normalises the gradient's
size away, so its update has a size set by η alone and turns the direction by about η/‖w‖ (Hoffer et al. 2018,
sec. 3). The exponent of ‖w‖ is :func:`norm_power`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ADAPTIVE_OPTIMIZERS", "norm_power", "effective_step"]

#: optimizers whose update size does not scale with the gradient's
ADAPTIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                       torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop)


def norm_power(optimizer: torch.optim.Optimizer) -> int:
    """2 for SGD-like optimizers (effective step η/‖w‖²), 1 for adaptive ones (η/‖w‖)."""
    return 1 if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else 2


def effective_step(lr: float | Tensor, norms: Tensor, factor: Tensor | None = None, power: int = 2) -> Tensor:
    """η·f_c/‖w_c‖^power per channel: ``norms`` (C,) are the channel norms before the step, ``factor`` (C,) the
    per-channel factor a tool applies to the step (the weight-decay mimic's rescaling; None means 1), ``lr`` a
    number or a tensor broadcastable against ``norms`` (any leading dims, e.g. (steps, C), work alike)."""
    norms = norms.to(torch.float64)
    lr = lr.to(norms) if isinstance(lr, Tensor) else float(lr)
    out = lr / norms**power
    return out if factor is None else out * factor.to(out)
