"""``lp_layer_norm``, ``lp_rms_norm``, ``lp_group_norm``: per-sample Lp normalization (the reference path
of :mod:`normmatters.nn.layernorm`), shaped like ``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm``.

Per sample, over the n normalized elements (the trailing ``normalized_shape`` dims; for group norm the
C/G channels of a group and their spatial elements)::

    layer / group:  μ = mean(x),  σ̂ = estimator(x − μ)               (centered constant c(n))
                    y = weight · (x − μ) / sqrt(σ̂² + eps) + bias
    rms:            σ̂ = estimator of x itself                         (uncentered constant, see below)
                    y = weight · x / sqrt(σ̂² + eps)

σ̂ comes from the estimator registry (:mod:`normmatters.estimators`): ``statistic`` (centered) and
``statistic_uncentered`` (RMS norm: ``constant(n, centered=False)`` makes E[σ̂] = E[RMS_n] on zero-mean
Gaussian input). For ``norm="l2"`` these are exactly ``nn.LayerNorm`` / ``nn.RMSNorm`` / ``nn.GroupNorm``.
``1/sqrt(σ̂² + eps)`` is :func:`normmatters.functional.inv_std` (1/hypot(σ̂, sqrt(eps)): no square formed, finite
gradient on a constant row). Half / bfloat16 input is normalized in float32 and returned in its dtype.

References: Ba et al. 2016 (layer norm); Zhang & Sennrich 2019 (RMS norm); Wu & He 2018 (group norm);
Hoffer et al. 2018 "Norm matters" (Lp normalization).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .estimators import get_estimator
from .functional import inv_std

__all__ = ["lp_layer_norm", "lp_rms_norm", "lp_group_norm", "check_norm"]


def check_norm(norm: str, n: int | None, where: str) -> None:
    """A clear ``ValueError`` naming ``where`` for an unknown norm, ``norm="mean"`` or (unless n is None, not
    known yet) too few elements per sample for it."""
    try:
        est = get_estimator(norm)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not est.divides:
        raise ValueError(f"{where}: norm={norm!r} has no dispersion statistic; use l2, l1, linf, topk or range")
    if n is None:
        return
    if n < 2:
        raise ValueError(f"{where}: needs at least 2 normalized elements per sample, got {n}")
    problem = est.validate(n)
    if problem:
        raise ValueError(f"{where}: {problem}")


def _trailing(input: Tensor, normalized_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(f"{where}: expected input with trailing shape {list(normalized_shape)}, "
                         f"got input of shape {list(input.shape)}")
    return tuple(range(input.dim() - k, input.dim()))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def lp_layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5, norm: str = "l1", where: str = "lp_layer_norm") -> Tensor:
    """y = weight · (x − μ) / sqrt(σ̂² + eps) + bias over the trailing ``normalized_shape`` dims of ``input``
    (any leading shape); weight / bias have shape ``normalized_shape``."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = _trailing(input, normalized_shape, where)
    n = math.prod(normalized_shape)
    check_norm(norm, n, where)
    est = get_estimator(norm)
    x = input.to(_compute_dtype(input))
    mean = x.mean(dims)
    sigma = est.statistic(x, mean if est.needs_mean else None, dims, n)
    shape = list(sigma.shape) + [1] * len(dims)
    d = x - mean.reshape(shape)
    y = d * inv_std(sigma, eps).reshape(shape)
    return _affine(y, weight, bias).to(input.dtype)


def lp_rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None,
                norm: str = "l1", where: str = "lp_rms_norm") -> Tensor:
    """y = weight · x / sqrt(σ̂² + eps), σ̂ the uncentered statistic over the trailing ``normalized_shape``
    dims; ``eps=None`` is ``torch.finfo(input.dtype).eps`` (as ``F.rms_norm``)."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = _trailing(input, normalized_shape, where)
    n = math.prod(normalized_shape)
    check_norm(norm, n, where)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    x = input.to(_compute_dtype(input))
    sigma = get_estimator(norm).statistic_uncentered(x, dims, n)
    y = x * inv_std(sigma, eps).reshape(list(sigma.shape) + [1] * len(dims))
    return _affine(y, weight, None).to(input.dtype)


def lp_group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5, norm: str = "l1", where: str = "lp_group_norm") -> Tensor:
    """Group norm: input (N, C, *) split into ``num_groups`` groups of C/G channels; μ and σ̂ per sample and
    group over n = C/G · prod(*) elements; weight / bias per channel (C,)."""
    if input.dim() < 2:
        raise ValueError(f"{where}: expected input of shape (N, C, *), got {list(input.shape)}")
    N, C = input.shape[:2]
    if C % num_groups:
        raise ValueError(f"{where}: num_groups={num_groups} must divide the {C} input channels")
    x = input.reshape(N, num_groups, -1)
    n = x.shape[-1]
    check_norm(norm, n, where)
    y = lp_layer_norm(x, (n,), eps=eps, norm=norm, where=where).reshape(input.shape)
    if weight is None and bias is None:
        return y
    cshape = [1, C] + [1] * (input.dim() - 2)
    return _affine(y, None if weight is None else weight.reshape(cshape),
                   None if bias is None else bias.reshape(cshape))
