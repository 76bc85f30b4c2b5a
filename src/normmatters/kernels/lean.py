"""The lean autograd Function and ``lean_batch_norm``, the fast path of every Lp batch-norm layer.

``lean_batch_norm`` has the signature and semantics of :func:`normmatters.functional.lp_batch_norm` (the
reference path, which it calls for eval mode and for ``impl="reference"``) plus ``impl``:

* ``"auto"`` (default): ``"native"`` where it is eligible (see :func:`.native.eligible`) and measured faster
  (channels-innermost input, or rows long enough: :func:`.native.auto_prefers`), else ``"compiled"``;
* ``"native"``: C++/OpenMP CPU operators (:mod:`.native`; built on first use, ~20 s) for
  float32/float64/bfloat16 input, contiguous (blocks of adjacent channels, cache-blocked) or channels-innermost
  (row kernels), norms mean, l2, l1, linf, range and top-k (k ≤ 64), no ghost batches or range chunks,
  in place too (not top-k on the row kernels); the running buffers are updated in the same call
  (:class:`.native_autograd.NativePlan`, which a layer keeps across steps); other cases (and a missing
  compiler, after one warning) run ``"compiled"``;
* ``"compiled"``: the formulas of :mod:`.formulas` compiled by ``torch.compile`` (first call
  costs seconds per norm; see :data:`.compiled.compile_seconds`), eager fallback with one warning;
* ``"eager"``: the same formulas run op by op (still lean in memory);
* ``"reference"``: :func:`~normmatters.functional.lp_batch_norm`, autograd through every op.

The environment variable ``NORMMATTERS_KERNEL`` (same values) overrides the default. Saved for backward:
the input, the weight and per-channel statistics (μ, the raw statistic and, for range, per-chunk max and
min) — at most the five (C,)-vectors + input that ``nn.BatchNorm2d`` saves. With ``inplace=True``
(In-Place ABN style) the output overwrites the input and backward saves only the output itself, the
weight, the bias and the (C,) raw statistic: it reconstructs the centered input from the output, which
needs every weight entry non-zero (see :func:`lean_batch_norm` and :mod:`.formulas`; on the native channel
kernels: :class:`.native_autograd.NativeBatchNormInplaceFunction`). Inside a user's
``torch.compile`` (and ``torch.export``) the call goes into the user's graph (no nested compile, no graph break):
the ``normmatters::lp_batch_norm_fwd`` and ``update_running_stats`` operators where eager mode would take the
native kernels (out of place), else the formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..estimators import get_estimator
from ..functional import (
    NONFINITE_MODES,
    acc_dtype,
    check_channel_vectors,
    check_eps,
    check_inplace_input,
    check_inplace_weight,
    check_input,
    check_running_stats,
    empty_batch_norm,
    lp_batch_norm,
    no_values,
    report_nonfinite,
    training_groups,
)
from . import compiled, formulas, native, native_ops
from .impl import ENV, IMPLS, resolve_impl
from .native_autograd import NativeBatchNormFunction, NativePlan, native_training
from .saved import save_stats, saved_stats

__all__ = ["lean_batch_norm", "IMPLS", "ENV", "resolve_impl", "gaussian_constant", "check_inplace_weight", "NativePlan"]

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
    if impl == "eager" or torch.compiler.is_compiling() or device.type == "meta":
        # traced into the caller's graph under torch.compile; on the meta device (shapes only) there is
        # nothing to compile
        return getattr(formulas, direction)
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
        save_stats(ctx, x, weight, get_estimator(norm).divides, mean, raw, tuple(aux))
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
        x, weight, mean, raw, aux = saved_stats(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx5, gw, gb = _kernel("backward", norm, impl, x.device)(
            _view5(gy, groups, m, cl), _view5(x, groups, m, cl), weight, mean, raw, aux, ctx.c, eps, norm,
            k, need_w, need_b)
        gx = _unview5(gx5, x, cl) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None, None


class LeanBatchNormInplaceFunction(torch.autograd.Function):
    """In-place mode (In-Place ABN style): y overwrites x; backward saves only y, w, b and raw.

    forward(x, weight, bias, mean, raw, c, eps, norm, k, groups, chunks, impl) → x (normalized, marked
    dirty). ``mean`` and ``raw`` (G, 1, 1, C, 1) are the batch statistics of x from ``formulas.stats``,
    computed beforehand without autograd: the gradient through them is part of this backward. They are
    inputs rather than outputs because a Function that modifies a view in place may return only one tensor.
    Every weight entry must be non-zero (checked by :func:`lean_batch_norm`, not here).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, raw, c, eps, norm, k, groups, m, impl):
        cl = _is_channels_last(x)
        x5 = _view5(x, groups, m, cl)
        # x5 is a view of x for contiguous and channels-last x: the kernel stores y into x's buffer
        _kernel("forward_inplace", norm, impl, x.device)(x5, weight, bias, mean, raw, c, eps, norm)
        if not (cl or x.is_contiguous()):  # other strides: _view5 copied; write the normalized copy back
            x.copy_(_unview5(x5, x, cl))
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, *((raw,) if get_estimator(norm).divides else ()))
        ctx.c = c
        ctx.meta = (eps, norm, k, groups, m, impl, cl)
        return x

    @staticmethod
    def backward(ctx, gy):
        eps, norm, k, groups, m, impl, cl = ctx.meta
        y, weight, bias, *rest = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx5, gw, gb = _kernel("backward_inplace", norm, impl, y.device)(
            _view5(gy, groups, m, cl), _view5(y, groups, m, cl), weight, bias, rest[0] if rest else None,
            ctx.c, eps, norm, k, need_w, need_b)
        gx = _unview5(gx5, y, cl) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


def _use_native(impl: str, x: Tensor, w: Tensor, b: Tensor, norm: str, groups: int, m: int, k: int = 10) -> bool:
    """"native" runs the native kernels where eligible and the library builds (else Inductor); "auto" too, where
    they measured faster (:func:`.native.auto_prefers`)."""
    if impl not in ("auto", "native") or not native.eligible(x, w, b, norm, groups, m, k) or no_values(x):
        return False  # (fake tensors say "cpu" but have no memory for the kernels to read)
    return (impl == "native" or native.auto_prefers(x, norm)) and native.available()


#: :func:`.native_ops.ensure` as Dynamo sees it: called once at trace time (building/loading the library outside
#: the graph), its result a constant of the graph
_ops_ready = torch.compiler.assume_constant_result(native_ops.ensure)


def _traced_native(impl: str, x: Tensor, w: Tensor, b: Tensor, norm: str, groups: int, m: int, k: int) -> bool:
    """Inside torch.compile / torch.export: whether the ``normmatters::lp_batch_norm_fwd`` operator runs (in the
    graph) where eager mode would take the native kernels: "native", or "auto" where they measured faster."""
    return (impl in ("auto", "native") and native.covers(x, w, b, norm, groups, m, k)
            and (impl == "native" or native.auto_prefers(x, norm)) and _ops_ready())


def _eval_inplace(input: Tensor, running_mean: Tensor, running_var: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, eps: float, divides: bool) -> Tensor:
    """Eval mode in place: input·scale + shift with the reference's scale and shift (equal within rounding)."""
    acc = acc_dtype(input.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps) if divides else torch.ones_like(running_mean, dtype=acc)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    return input.mul_(scale.reshape(shape)).add_(shift.reshape(shape))


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
    inplace: bool = False,
) -> Tensor:
    """Lp batch norm through the lean kernels; arguments and results as
    :func:`normmatters.functional.lp_batch_norm`, plus ``impl`` ("auto", "native", "compiled", "eager",
    "reference"; see the module docstring) and
    ``inplace`` (In-Place ABN style):

    * training: the output overwrites ``input`` and is returned (the same tensor); backward reconstructs
      the input from the output, so ``weight`` must have no zero entry (``ValueError`` naming ``where``;
      checked in eager mode only). Autograd's in-place rules apply: a leaf that requires grad cannot be
      passed, and an input that another op saved for its backward (e.g. the output of ``torch.sigmoid``),
      or an output modified in place afterwards (e.g. by ``ReLU(inplace=True)``), raises autograd's
      "modified by an inplace operation" error at backward. An input autograd refuses to see modified in
      place (a leaf that requires grad, a view of one, a multi-output view, an inference tensor:
      :func:`~normmatters.functional.check_inplace_input`) is refused before anything — input, running
      buffers, num_batches_tracked — is written. If ``nonfinite="raise"`` raises, the input
      has already been overwritten (the running buffers are untouched). With ``impl="reference"`` the
      reference is computed (on a clone when grad is enabled) and copied into ``input`` — for testing.
    * eval: ``input·scale + shift`` in place when ``input`` does not require grad (same values as the
      reference within rounding); out of place (a new tensor) when it does.
    """
    impl = resolve_impl(impl, where)
    if impl != "reference" and no_values(input):
        impl = "eager"  # meta / fake tensors: no memory for a native or Inductor kernel to read
    check_eps(eps, training, where)
    if training:
        check_input(input, where=where)
        if inplace:
            check_inplace_input(input, where, weight, bias)
        if input.numel() == 0:
            return empty_batch_norm(input, weight, bias, num_batches_tracked)
    if training and impl in ("auto", "native") and ghost_batch_size is None and chunks is None:
        y = native_training(input, running_mean, running_var, weight, bias, momentum, eps, norm, k,
                             num_batches_tracked, nonfinite, where, impl, inplace)
        if y is not None:
            return y
    est = get_estimator(norm)
    if not training:
        if inplace and not (input.requires_grad and torch.is_grad_enabled()):
            check_input(input, where=where)
            check_running_stats(running_mean, running_var, est.divides, where)
            return _eval_inplace(input, running_mean, running_var, weight, bias, eps, est.divides)
        impl = "reference"
    elif inplace:
        check_inplace_weight(weight, where)
    if impl == "reference":
        src = input.clone() if training and inplace and torch.is_grad_enabled() else input
        y = lp_batch_norm(src, running_mean, running_var, weight, bias, training, momentum, eps, norm,
                          k, chunks, ghost_batch_size, num_batches_tracked=num_batches_tracked,
                          nonfinite=nonfinite, where=where)
        return input.copy_(y) if training and inplace else y
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    check_input(input, where=where)
    groups, g, n = training_groups(input, where, norm, k, chunks, ghost_batch_size)
    C = input.shape[1]
    acc = acc_dtype(input.dtype)
    pdtype = weight.dtype if weight is not None else acc
    w = weight if weight is not None else torch.ones(C, dtype=pdtype, device=input.device)
    b = bias if bias is not None else torch.zeros(C, dtype=pdtype, device=input.device)
    c = gaussian_constant(norm, n, k, chunks, acc, input.device)
    m = chunks or 1
    traced_op = False
    if inplace:
        # statistics first (no autograd: the Function's backward covers them), then y written over the input
        mean, raw = _kernel("stats", norm, impl, input.device)(
            _view5(input.detach(), groups, m, _is_channels_last(input)), norm, k)
        y = LeanBatchNormInplaceFunction.apply(input, w, b, mean, raw, c, eps, norm, k, groups, m, impl)
        mean, raw = mean.reshape(groups, C), raw.reshape(groups, C)
    elif torch.compiler.is_compiling() and _traced_native(impl, input, w, b, norm, groups, m, k):
        # traced: the operator itself goes into the graph (fake impl, C++ autograd), and so does its
        # running-statistics update below
        y, mean, raw, _ = native_ops.fwd(input, w, b, norm, c, eps, k)
        mean, raw, traced_op = mean.view(1, C), raw.view(1, C), True
    elif _use_native(impl, input, w, b, norm, groups, m, k):
        check_channel_vectors(C, where, weight=w, bias=b)
        # not covered by native_training (no affine parameters, or buffers of another dtype): the kernel's
        # statistics feed the separate update below
        stats: list[Tensor] = []
        y, _ = NativeBatchNormFunction.apply(input, w, b, native.Launch(input, norm, float(c), eps, k), (), stats)
        mean, raw = stats
    else:
        y, mean, raw = LeanBatchNormFunction.apply(input, w, b, c, eps, norm, k, groups, m, impl)
    if running_mean is None and running_var is None and num_batches_tracked is None \
            and nonfinite == "ignore":
        return y
    with torch.no_grad():
        if traced_op and isinstance(momentum, (int, float)) and native.update_fusable(
                input, running_mean, running_var if est.divides else None, num_batches_tracked):
            native_ops.update_running_stats(mean, raw, running_mean, running_var if est.divides else None,
                                            num_batches_tracked, norm, c, float(momentum), n)
            return y  # traced: no report (report_nonfinite is eager-only)
        ok = _kernel("update_running", norm, impl, input.device)(
            mean, raw, c, running_mean, running_var if est.divides else None, num_batches_tracked,
            momentum, n, est.divides)
    report_nonfinite(ok, nonfinite, where,
                     tracked=not (running_mean is None and running_var is None and num_batches_tracked is None))
    return y
