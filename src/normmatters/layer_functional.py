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
— the operator ``normmatters::lp_row_norm`` with the native CPU row kernels, or the Inductor path —, "native",
"compiled", "eager", or "reference": autograd through the registry's statistic); ``None`` reads
``$NORMMATTERS_KERNEL``, default "auto". Every path computes the same formulas.

Each function is validation (a ``TypeError`` for non-floating input, a ``ValueError`` naming ``where`` for a bad
shape, eps ≤ 0 or NaN, options or affine sizes) and one call of :func:`normmatters.kernels.row_norm.rows`, the
path decided once per (impl, device type, dtype, norm, k). An input with no rows (an empty batch) gives an empty
output of its shape, as the stock functions do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .estimators import get_estimator, norms_with_option
from .kernels.impl import resolve_impl
from .kernels.row_norm import DECIDED, decide, rows
from .kernels.triton import check_runs as check_triton_runs
from .options import IMPLS
from .precision.emulate import Precision
from .precision.layer import _StraightThrough
from .precision.per_sample import check_per_sample_precision, emulate_per_sample

__all__ = ["lp_layer_norm", "lp_rms_norm", "lp_group_norm", "check_norm", "emulated_lp_layer_norm",
           "emulated_lp_rms_norm", "emulated_lp_group_norm"]


def _problem(norm: str, n: int | None, k: int, chunks: int | None, first: int | None) -> str | None:
    """What is wrong with these options (see :func:`check_norm`), or None."""
    try:
        est = get_estimator(norm)
    except ValueError as e:
        return str(e)
    if not est.divides:
        return f"norm={norm!r} has no dispersion statistic; use l2, l1, linf, topk or range"
    for name, value, none_ok in (("k", k, False), ("chunks", chunks, True)):
        if not (value is None and none_ok) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{name} must be a positive int{' or None' if none_ok else ''}, got {value!r}"
    if chunks is not None and "chunks" not in est.options:
        return (f"chunks is an option of norm={norms_with_option('chunks')} only, got norm={norm!r} with "
                f"chunks={chunks}")
    if n is None:
        return None
    if n < 2:
        return f"needs at least 2 normalized elements per sample, got {n}"
    problem = est.validate(n, k=k, chunks=chunks)
    if problem:
        return problem
    split = n if first is None else first
    if chunks is not None and split % chunks:
        return f"chunks={chunks} must divide the first normalized dim ({split})"
    return None


#: the problems found: (norm, n, k, chunks, first) → message or None
_PROBLEMS: dict[tuple, str | None] = {}


@torch._dynamo.assume_constant_result
def _problem_kept(norm: str, n: int | None, k: int, chunks: int | None, first: int | None) -> str | None:
    problem = _problem(norm, n, k, chunks, first)
    try:
        _PROBLEMS[(norm, n, k, chunks, first)] = problem
    except TypeError:  # an unhashable option: not kept
        pass
    return problem


def check_norm(norm: str, n: int | None, where: str, k: int = 10, chunks: int | None = None,
               first: int | None = None) -> None:
    """A clear ``ValueError`` naming ``where`` for an unknown norm, ``norm="mean"``, bad options (``k`` a positive
    int, ``chunks`` None or a positive int, and only for the norms that take it) or (unless n is None, not known
    yet) too few elements per sample for them; ``first``: the dim ``chunks`` splits (default n). Checked once per
    argument tuple."""
    try:
        problem = _PROBLEMS[(norm, n, k, chunks, first)]
    except (KeyError, TypeError):
        problem = _problem_kept(norm, n, k, chunks, first)
    if problem:
        raise ValueError(f"{where}: {problem}")


_IMPLS = frozenset(IMPLS)
_INF = math.inf


def _path(input: Tensor, impl: str | None, norm: str, k: int, eps, where: str) -> str:
    """Validate what every per-sample call shares (floating input, eps) and decide its path."""
    if not input.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point input, got {input.dtype}")
    if not (isinstance(eps, (int, float)) and 0 < eps < _INF):
        raise ValueError(f"{where}: eps must be a positive finite number, got {eps!r}")
    if impl is None or impl not in _IMPLS:
        impl = resolve_impl(impl, where)
    try:
        path = DECIDED[(impl, input.device.type, input.dtype, norm, k)]
    except (KeyError, TypeError):
        path = decide(impl, input.device.type, input.dtype, norm, k)
    if path == "triton" and impl == "triton":
        check_triton_runs(input, where)
    return path


def _check_affine(t: Tensor | None, shape, name: str, where: str) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"{where}: expected {name} of shape {list(shape)}, got {list(t.shape)}")


def lp_layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5, norm: str = "l1", where: str = "lp_layer_norm", k: int = 10,
                  chunks: int | None = None, impl: str | None = None) -> Tensor:
    """y = weight · (x − μ) / sqrt(σ̂² + eps) + bias over the trailing ``normalized_shape`` dims of ``input``
    (any leading shape); weight / bias have shape ``normalized_shape``; y has input's shape and dtype."""
    if type(normalized_shape) is not tuple:
        normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    path = _path(input, impl, norm, k, eps, where)
    if input.shape[input.dim() - len(normalized_shape):] != normalized_shape:
        raise ValueError(f"{where}: expected input with trailing shape {list(normalized_shape)}, "
                         f"got input of shape {list(input.shape)}")
    n = math.prod(normalized_shape)
    try:
        fine = _PROBLEMS[(norm, n, k, chunks, normalized_shape[0])] is None
    except (KeyError, TypeError):
        fine = False
    if not fine:
        check_norm(norm, n, where, k, chunks, normalized_shape[0])
    if (weight is not None and weight.shape != normalized_shape) or (
            bias is not None and bias.shape != normalized_shape):
        _check_affine(weight, normalized_shape, "weight", where)
        _check_affine(bias, normalized_shape, "bias", where)
    return rows(input, n, weight, bias, eps, norm, True, k, chunks, 1, 1, path)


def lp_rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None,
                norm: str = "l1", where: str = "lp_rms_norm", k: int = 10, chunks: int | None = None,
                impl: str | None = None) -> Tensor:
    """y = weight · x / sqrt(σ̂² + eps), σ̂ the uncentered statistic over the trailing ``normalized_shape``
    dims; ``eps=None`` is ``torch.finfo(input.dtype).eps`` (as ``F.rms_norm``)."""
    if type(normalized_shape) is not tuple:
        normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if eps is None and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    path = _path(input, impl, norm, k, eps, where)
    if input.shape[input.dim() - len(normalized_shape):] != normalized_shape:
        raise ValueError(f"{where}: expected input with trailing shape {list(normalized_shape)}, "
                         f"got input of shape {list(input.shape)}")
    n = math.prod(normalized_shape)
    try:
        fine = _PROBLEMS[(norm, n, k, chunks, normalized_shape[0])] is None
    except (KeyError, TypeError):
        fine = False
    if not fine:
        check_norm(norm, n, where, k, chunks, normalized_shape[0])
    if weight is not None and weight.shape != normalized_shape:
        _check_affine(weight, normalized_shape, "weight", where)
    return rows(input, n, weight, None, eps, norm, False, k, chunks, 1, 1, path)


def lp_group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5, norm: str = "l1", where: str = "lp_group_norm", k: int = 10,
                  chunks: int | None = None, impl: str | None = None) -> Tensor:
    """Group norm: input (N, C, *) split into ``num_groups`` groups of C/G channels; μ and σ̂ per sample and
    group over n = C/G · prod(*) elements; weight / bias per channel (C,)."""
    path = _path(input, impl, norm, k, eps, where)
    if input.dim() < 2:
        raise ValueError(f"{where}: expected input of shape (N, C, *), got {list(input.shape)}")
    C = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"{where}: num_groups={num_groups!r} (a positive int) must divide the {C} input channels")
    spatial = math.prod(input.shape[2:])
    n = C // num_groups * spatial
    check_norm(norm, n, where, k, chunks)
    _check_affine(weight, (C,), "weight", where)
    _check_affine(bias, (C,), "bias", where)
    return rows(input, n, weight, bias, eps, norm, True, k, chunks, num_groups, spatial, path)


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
    n = C // num_groups * math.prod(input.shape[2:])
    x = input.reshape(N * num_groups, n)

    def per_element(t: Tensor | None) -> Tensor | None:  # (C,) → (N·G, n): channel c covers n·G/C elements
        if t is None:
            return None
        return t.detach().reshape(1, num_groups, C // num_groups, 1).expand(
            N, num_groups, C // num_groups, n * num_groups // C).reshape(N * num_groups, n)

    with torch.no_grad():
        res = emulate_per_sample(x, norm, p, eps=eps, k=k, chunks=chunks, weight=per_element(weight),
                                 bias=per_element(bias), count_events=False)
    return _StraightThrough.apply(native, res.y.reshape(input.shape))
