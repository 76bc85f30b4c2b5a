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

Options: ``k`` (``norm="topk"``: how many of the largest |d| are averaged) and ``chunks`` (``norm="range"``: the
mean range of that many equal contiguous chunks of each sample's elements; must divide the first normalized dim,
for group norm the n elements of a group). ``impl`` picks the kernel (:mod:`normmatters.kernels.row_norm`: "auto"
— the native CPU row kernels or the Inductor path —, "native", "compiled", "eager", or "reference": the autograd
code below); ``None`` reads ``$NORMMATTERS_KERNEL``, default "auto". Every path computes the same formulas.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._batch_stats import inv_std
from .estimators import get_estimator, norms_with_option
from .kernels.row_norm import rows
from .precision.emulate import Precision
from .precision.layer import _StraightThrough
from .precision.per_sample import check_per_sample_precision, emulate_per_sample

__all__ = ["lp_layer_norm", "lp_rms_norm", "lp_group_norm", "check_norm", "emulated_lp_layer_norm",
           "emulated_lp_rms_norm", "emulated_lp_group_norm"]


def check_norm(norm: str, n: int | None, where: str, k: int = 10, chunks: int | None = None,
               first: int | None = None) -> None:
    """A clear ``ValueError`` naming ``where`` for an unknown norm, ``norm="mean"``, bad options (``k`` a positive
    int, ``chunks`` None or a positive int, and only for the norms that take it) or (unless n is None, not known
    yet) too few elements per sample for them; ``first``: the dim ``chunks`` splits (default n)."""
    try:
        est = get_estimator(norm)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not est.divides:
        raise ValueError(f"{where}: norm={norm!r} has no dispersion statistic; use l2, l1, linf, topk or range")
    for name, value, none_ok in (("k", k, False), ("chunks", chunks, True)):
        if not (value is None and none_ok) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {name} must be a positive int{' or None' if none_ok else ''}, got {value!r}")
    if chunks is not None and "chunks" not in est.options:
        raise ValueError(f"{where}: chunks is an option of norm={norms_with_option('chunks')} only, "
                         f"got norm={norm!r} with chunks={chunks}")
    if n is None:
        return
    if n < 2:
        raise ValueError(f"{where}: needs at least 2 normalized elements per sample, got {n}")
    problem = est.validate(n, k=k, chunks=chunks)
    if problem:
        raise ValueError(f"{where}: {problem}")
    split = n if first is None else first
    if chunks is not None and split % chunks:
        raise ValueError(f"{where}: chunks={chunks} must divide the first normalized dim ({split})")


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
                  eps: float = 1e-5, norm: str = "l1", where: str = "lp_layer_norm", k: int = 10,
                  chunks: int | None = None, impl: str | None = None) -> Tensor:
    """y = weight · (x − μ) / sqrt(σ̂² + eps) + bias over the trailing ``normalized_shape`` dims of ``input``
    (any leading shape); weight / bias have shape ``normalized_shape``."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = _trailing(input, normalized_shape, where)
    n = math.prod(normalized_shape)
    check_norm(norm, n, where, k, chunks, normalized_shape[0])
    y = rows(input.reshape(-1, n), weight, bias, eps, norm, True, k, chunks, 1, 1, impl, where)
    if y is not None:
        return y.reshape(input.shape)
    est = get_estimator(norm)
    x = input.to(_compute_dtype(input))
    mean = x.mean(dims)
    sigma = est.statistic(x, mean if est.needs_mean else None, dims, n, k=k, chunks=chunks)
    shape = list(sigma.shape) + [1] * len(dims)
    d = x - mean.reshape(shape)
    y = d * inv_std(sigma, eps).reshape(shape)
    return _affine(y, weight, bias).to(input.dtype)


def lp_rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None,
                norm: str = "l1", where: str = "lp_rms_norm", k: int = 10, chunks: int | None = None,
                impl: str | None = None) -> Tensor:
    """y = weight · x / sqrt(σ̂² + eps), σ̂ the uncentered statistic over the trailing ``normalized_shape``
    dims; ``eps=None`` is ``torch.finfo(input.dtype).eps`` (as ``F.rms_norm``)."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = _trailing(input, normalized_shape, where)
    n = math.prod(normalized_shape)
    check_norm(norm, n, where, k, chunks, normalized_shape[0])
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    y = rows(input.reshape(-1, n), weight, None, eps, norm, False, k, chunks, 1, 1, impl, where)
    if y is not None:
        return y.reshape(input.shape)
    x = input.to(_compute_dtype(input))
    sigma = get_estimator(norm).statistic_uncentered(x, dims, n, k=k, chunks=chunks)
    y = x * inv_std(sigma, eps).reshape(list(sigma.shape) + [1] * len(dims))
    return _affine(y, weight, None).to(input.dtype)


def lp_group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5, norm: str = "l1", where: str = "lp_group_norm", k: int = 10,
                  chunks: int | None = None, impl: str | None = None) -> Tensor:
    """Group norm: input (N, C, *) split into ``num_groups`` groups of C/G channels; μ and σ̂ per sample and
    group over n = C/G · prod(*) elements; weight / bias per channel (C,)."""
    if input.dim() < 2:
        raise ValueError(f"{where}: expected input of shape (N, C, *), got {list(input.shape)}")
    N, C = input.shape[:2]
    if C % num_groups:
        raise ValueError(f"{where}: num_groups={num_groups} must divide the {C} input channels")
    x = input.reshape(N, num_groups, -1)
    n = x.shape[-1]
    check_norm(norm, n, where, k, chunks)
    y2 = rows(x.reshape(-1, n), weight, bias, eps, norm, True, k, chunks, num_groups, n * num_groups // C, impl,
              where)
    if y2 is not None:
        return y2.reshape(input.shape)
    y = lp_layer_norm(x, (n,), eps=eps, norm=norm, where=where, k=k, chunks=chunks,
                      impl="reference").reshape(input.shape)
    if weight is None and bias is None:
        return y
    cshape = [1, C] + [1] * (input.dim() - 2)
    return _affine(y, None if weight is None else weight.reshape(cshape),
                   None if bias is None else bias.reshape(cshape))


# --- the forward emulated in a low-precision format (precision= of the layers) ---------------------------

def _flat(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.reshape(n)


def emulated_lp_layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None,
                           bias: Tensor | None = None, eps: float = 1e-5, norm: str = "l1", *,
                           precision: str | Precision = "fp16", k: int = 10, chunks: int | None = None,
                           where: str = "emulated_lp_layer_norm") -> Tensor:
    """:func:`lp_layer_norm` with the forward emulated in ``precision`` and a
    straight-through backward (:mod:`normmatters.precision.per_sample`). Shapes as in ``lp_layer_norm``."""
    p = check_per_sample_precision(precision, where)
    native = lp_layer_norm(input, normalized_shape, weight, bias, eps, norm, where=where, k=k, chunks=chunks)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(shape)
    with torch.no_grad():
        res = emulate_per_sample(input.reshape(-1, n), norm, p, eps=eps, k=k, chunks=chunks,
                                 weight=_flat(weight, n), bias=_flat(bias, n), count_events=False)
    return _StraightThrough.apply(native, res.y.reshape(input.shape))


def emulated_lp_rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None,
                         eps: float | None = None, norm: str = "l1", *, precision: str | Precision = "fp16",
                         k: int = 10, chunks: int | None = None, where: str = "emulated_lp_rms_norm") -> Tensor:
    """:func:`lp_rms_norm` emulated in ``precision`` (uncentered σ̂; ``eps=None``
    is ``torch.finfo(input.dtype).eps``), straight-through backward."""
    p = check_per_sample_precision(precision, where)
    native = lp_rms_norm(input, normalized_shape, weight, eps, norm, where=where, k=k, chunks=chunks)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(shape)
    with torch.no_grad():
        res = emulate_per_sample(input.reshape(-1, n), norm, p, eps=eps, k=k, chunks=chunks,
                                 weight=_flat(weight, n), centered=False, count_events=False)
    return _StraightThrough.apply(native, res.y.reshape(input.shape))


def emulated_lp_group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
                           bias: Tensor | None = None, eps: float = 1e-5, norm: str = "l1", *,
                           precision: str | Precision = "fp16", k: int = 10, chunks: int | None = None,
                           where: str = "emulated_lp_group_norm") -> Tensor:
    """:func:`lp_group_norm` emulated in ``precision``: rows = (sample, group) of
    n = C/G · spatial elements, per-channel weight / bias applied per element; straight-through backward."""
    p = check_per_sample_precision(precision, where)
    native = lp_group_norm(input, num_groups, weight, bias, eps, norm, where=where, k=k, chunks=chunks)
    N, C = input.shape[:2]
    x = input.reshape(N * num_groups, -1)
    n = x.shape[-1]
    check_norm(norm, n, where)

    def per_element(t: Tensor | None) -> Tensor | None:  # (C,) → (N·G, n): channel c covers n·G/C elements
        if t is None:
            return None
        return t.detach().reshape(1, num_groups, C // num_groups, 1).expand(
            N, num_groups, C // num_groups, n * num_groups // C).reshape(N * num_groups, n)

    with torch.no_grad():
        res = emulate_per_sample(x, norm, p, eps=eps, k=k, chunks=chunks, weight=per_element(weight),
                                 bias=per_element(bias), count_events=False)
    return _StraightThrough.apply(native, res.y.reshape(input.shape))
