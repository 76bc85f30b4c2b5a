"""The lean autograd Function and ``lean_batch_norm``, the fast path of every Lp batch-norm layer.

``lean_batch_norm`` has the signature and semantics of :func:`normmatters.functional.lp_batch_norm` (the
reference path, which it calls for eval mode and for ``impl="reference"``) plus ``impl``:

* ``"compiled"`` (default): the formulas of :mod:`.formulas` compiled by ``torch.compile`` (first call
  costs seconds per norm; see :data:`.compiled.compile_seconds`), eager fallback with one warning;
* ``"eager"``: the same formulas run op by op (still lean in memory);
* ``"reference"``: :func:`~normmatters.functional.lp_batch_norm`, autograd through every op.

The environment variable ``NORMMATTERS_KERNEL`` (same values) overrides the default. Saved for backward:
the input, the weight and per-channel statistics (μ, the raw statistic and, for range, per-chunk max and
min) — at most the five (C,)-vectors + input that ``nn.BatchNorm2d`` saves. Inside a user's
``torch.compile`` the formulas are traced into the user's graph (no nested compile, no graph break).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..estimators import get_estimator
from ..functional import NONFINITE_MODES, check_input, lp_batch_norm, report_nonfinite, training_groups
from . import compiled, formulas

__all__ = ["lean_batch_norm", "IMPLS", "resolve_impl", "gaussian_constant"]

IMPLS = ("compiled", "eager", "reference")
ENV = "NORMMATTERS_KERNEL"


def resolve_impl(impl: str | None, where: str = "lean_batch_norm") -> str:
    """The kernel to run: ``impl`` if given, else $NORMMATTERS_KERNEL, else "compiled"."""
    chosen = impl if impl is not None else os.environ.get(ENV, "compiled") or "compiled"
    if chosen not in IMPLS:
        src = "impl" if impl is not None else f"${ENV}"
        raise ValueError(f"{where}: {src} must be one of {IMPLS}, got {chosen!r}")
    return chosen


def gaussian_constant(norm: str, n: int, k: int, chunks: int | None, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """c(n) of ``norm`` as a 0-dim tensor (1 for mean-only); see :meth:`Estimator.constant_tensor`."""
    return get_estimator(norm).constant_tensor(n, dtype, device, k=k, chunks=chunks)


# --- layout --------------------------------------------------------------------------------------------

def _is_channels_last(x: Tensor) -> bool:
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _view5(t: Tensor, groups: int, m: int, channels_last: bool) -> Tensor:
    """(N, C, *) → (G, m, q, C, S), a view for contiguous / channels-last tensors (a copy otherwise)."""
    C = t.shape[1]
    if channels_last:
        return t.movedim(1, -1).reshape(groups, m, -1, C, 1)
    return t.contiguous().view(groups, m, t.shape[0] // (groups * m), C, -1)


def _unview5(t5: Tensor, like: Tensor, channels_last: bool) -> Tensor:
    if channels_last:
        return t5.reshape(like.movedim(1, -1).shape).movedim(-1, 1)
    return t5.reshape(like.shape)


def _kernel(direction: str, norm: str, impl: str, device: torch.device):
    if impl == "eager" or torch.compiler.is_compiling():
        return getattr(formulas, direction)  # traced into the caller's graph under torch.compile
    return compiled.get(direction, norm, device)


class LeanBatchNormFunction(torch.autograd.Function):
    """Training-mode Lp batch norm with an analytic backward that saves only x, w and (C,)-statistics.

    forward(x, weight, bias, c, eps, norm, k, groups, chunks, impl) → (y, μ (G, C), raw (G, C));
    μ and raw are non-differentiable (they feed the running statistics).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, c, eps, norm, k, groups, m, impl):
        cl = _is_channels_last(x)
        x5 = _view5(x, groups, m, cl)
        y5, mean, raw, aux = _kernel("forward", norm, impl, x.device)(x5, weight, bias, c, eps, norm, k)
        # detached alias, not a view of an internal tensor: callers may modify y in place (ReLU(inplace))
        y = _unview5(y5, x, cl).detach()
        divides = get_estimator(norm).divides
        ctx.save_for_backward(x, weight, mean, *((raw,) + tuple(aux) if divides else ()))
        ctx.c = c  # a cached constant, not an activation
        ctx.meta = (eps, norm, k, groups, m, impl, cl)
        C = x.shape[1]
        mean_gc = mean.reshape(groups, C)
        raw_gc = raw.reshape(groups, C)
        ctx.mark_non_differentiable(mean_gc, raw_gc)
        return y, mean_gc, raw_gc

    @staticmethod
    def backward(ctx, gy, _gmean, _graw):
        eps, norm, k, groups, m, impl, cl = ctx.meta
        x, weight, mean, *rest = ctx.saved_tensors
        raw, aux = (rest[0], tuple(rest[1:])) if rest else (mean, ())
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx5, gw, gb = _kernel("backward", norm, impl, x.device)(
            _view5(gy, groups, m, cl), _view5(x, groups, m, cl), weight, mean, raw, aux, ctx.c, eps, norm,
            k, need_w, need_b)
        gx = _unview5(gx5, x, cl) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None, None


def lean_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    norm: str = "l1",
    k: int = 10,
    chunks: int | None = None,
    ghost_batch_size: int | None = None,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "raise",
    where: str = "lean_batch_norm",
    impl: str | None = None,
) -> Tensor:
    """Lp batch norm through the lean kernels; arguments and results as
    :func:`normmatters.functional.lp_batch_norm`, plus ``impl`` ("compiled", "eager", "reference")."""
    impl = resolve_impl(impl, where)
    if impl == "reference" or not training:
        return lp_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, norm,
                             k, chunks, ghost_batch_size, num_batches_tracked=num_batches_tracked,
                             nonfinite=nonfinite, where=where)
    est = get_estimator(norm)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    check_input(input, where=where)
    groups, g, n = training_groups(input, where, norm, k, chunks, ghost_batch_size)
    C = input.shape[1]
    acc = formulas.acc_dtype(input.dtype)
    pdtype = weight.dtype if weight is not None else acc
    w = weight if weight is not None else torch.ones(C, dtype=pdtype, device=input.device)
    b = bias if bias is not None else torch.zeros(C, dtype=pdtype, device=input.device)
    c = gaussian_constant(norm, n, k, chunks, acc, input.device)
    y, mean, raw = LeanBatchNormFunction.apply(input, w, b, c, eps, norm, k, groups, chunks or 1, impl)
    if running_mean is None and running_var is None and num_batches_tracked is None \
            and nonfinite == "ignore":
        return y
    with torch.no_grad():
        ok = _kernel("update_running", norm, impl, input.device)(
            mean, raw, c, running_mean, running_var if est.divides else None, num_batches_tracked,
            momentum, n, est.divides)
    report_nonfinite(ok, nonfinite, where)
    return y
