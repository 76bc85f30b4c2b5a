"""The paper's weight-norm form of a batch-norm model: a conversion on top of :mod:`normmatters.convert` and the
weight-norm parametrizations of :mod:`normmatters.nn.weightnorm` (Hoffer et al. 2018, sec. 6)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .convert import convert_batchnorm
from .estimators import get_estimator
from .nn.weightnorm import apply_bounded_weight_norm, apply_weight_norm, data_dependent_init

__all__ = ["to_weight_norm_form"]


def to_weight_norm_form(model: nn.Module, bounded: bool = True, p: float = 2, include: Any = None,
                        exclude: Any = None, example_input: Tensor | None = None) -> nn.Module:
    """The paper's weight-norm form of a batch-norm model (Hoffer et al. 2018, sec. 6; Salimans & Kingma 2016).

    Every ``nn.BatchNorm*`` becomes mean-only batch norm whose scale is frozen (``weight.requires_grad=False``)
    and whose bias learns, and every conv/linear/recurrent weight gets (bounded, if ``bounded``) weight norm,
    whose per-channel magnitudes g take over the scale. With ``example_input`` the weights first get
    :func:`data_dependent_init` (recommended for deep nets). Returns the model (changed in place).
    """
    model = convert_batchnorm(model, norm="mean")
    for m in model.modules():
        if hasattr(m, "norm") and not get_estimator(m.norm).divides and getattr(m, "weight", None) is not None:
            m.weight.requires_grad_(False)
    if example_input is not None:
        data_dependent_init(model, example_input, include=include, exclude=exclude)
    if bounded:
        apply_bounded_weight_norm(model, p=p, include=include, exclude=exclude)
    else:
        apply_weight_norm(model, p=p, include=include, exclude=exclude)
    return model
