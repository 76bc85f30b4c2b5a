"""The lean autograd Function and ``lean_batch_norm``, the fast path of every Lp batch-norm layer.

``lean_batch_norm`` has the signature and semantics of :func:`normmatters.functional.lp_batch_norm` (the
reference path, which it calls for eval mode and for ``impl="reference"``) plus ``impl``:

* ``"auto"`` (default): ``"native"`` where it is eligible (see :func:`.native.eligible`) and measured faster
  (channels-innermost input, or rows long enough: :func:`.native.auto_prefers`), else ``"compiled"``;
* ``"native"``: C/OpenMP CPU kernels (:mod:`.native`; built with gcc on first use, a few seconds) for
  float32/float64/bfloat16 input, contiguous (blocks of adjacent channels, cache-blocked) or channels-innermost
  (row kernels), norms mean, l2, l1, linf, range and top-k (k ≤ 64), no ghost batches or range chunks,
  in place too (not top-k on the row kernels); the running buffers are updated in the same call
  (:class:`NativePlan`, which a layer keeps across steps); other cases (and a missing compiler, after one
  warning) run ``"compiled"``;
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
kernels: :class:`NativeBatchNormInplaceFunction`). Inside a user's
``torch.compile`` the formulas are traced into the user's graph (no nested compile, no graph break).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..estimators import get_estimator
from ..functional import (
    NONFINITE_MODES,
    acc_dtype,
    check_channel_vectors,
    check_input,
    check_running_stats,
    lp_batch_norm,
    report_nonfinite,
    training_groups,
)
from . import compiled, formulas, native

__all__ = ["lean_batch_norm", "IMPLS", "resolve_impl", "gaussian_constant", "check_inplace_weight", "NativePlan"]

IMPLS = ("auto", "native", "compiled", "eager", "reference")
ENV = "NORMMATTERS_KERNEL"


def resolve_impl(impl: str | None, where: str = "lean_batch_norm") -> str:
    """The kernel to run: ``impl`` if given, else $NORMMATTERS_KERNEL, else "auto"."""
    chosen = impl if impl is not None else os.environ.get(ENV, "auto") or "auto"
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


def _save_for_backward(ctx, x: Tensor, weight: Tensor, norm: str, mean: Tensor, raw: Tensor,
                       aux: tuple[Tensor, ...]) -> None:
    """Save x, w, μ and, for dividing norms, raw and aux — what every out-of-place backward reads."""
    ctx.save_for_backward(x, weight, mean, *((raw, *aux) if get_estimator(norm).divides else ()))


def _saved(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """(x, w, μ, raw, aux) as saved by :func:`_save_for_backward` (mean-only: raw is μ, aux empty)."""
    x, weight, mean, *rest = ctx.saved_tensors
    raw, aux = (rest[0], tuple(rest[1:])) if rest else (mean, ())
    return x, weight, mean, raw, aux


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
        _save_for_backward(ctx, x, weight, norm, mean, raw, tuple(aux))
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
        x, weight, mean, raw, aux = _saved(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx5, gw, gb = _kernel("backward", norm, impl, x.device)(
            _view5(gy, groups, m, cl), _view5(x, groups, m, cl), weight, mean, raw, aux, ctx.c, eps, norm,
            k, need_w, need_b)
        gx = _unview5(gx5, x, cl) if need_x else None
        return gx, gw, gb, None, None, None, None, None, None, None


def _once_differentiable_under_create_graph(backward):
    """``backward`` as a Function's backward that is once-differentiable: the C kernels build no graph, so
    under create_graph=True the results must refuse a second backward (``once_differentiable``); otherwise
    the plain call, as that wrapper costs the common call ~20 µs on a cold cache."""
    once = torch.autograd.function.once_differentiable(backward)

    def wrapped(ctx, *grads):
        return (once if torch.is_grad_enabled() else backward)(ctx, *grads)
    return staticmethod(wrapped)


def _native_backward(ctx, gy, _gok):
    x, weight, mean, *rest = ctx.saved_tensors  # as _saved (mean-only: raw is μ, aux empty), inline
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = ctx.launch.backward(gy, x, weight, mean, rest[0] if rest else mean, tuple(rest[1:]), need_x,
                                     need_w, need_b)
    return gx, gw, gb, None, None, None


class NativeBatchNormFunction(torch.autograd.Function):
    """:class:`LeanBatchNormFunction` on the native CPU kernels (:mod:`.native`): one group, one chunk,
    contiguous or channels-innermost input. forward(x, weight, bias, launch, running, stats) → (y, ok):
    ``launch`` a :class:`.native.Launch` built for x (not in-place); ``running`` the buffer arguments of
    :meth:`.native.Launch.forward` (:func:`.native.running_args`: the kernel then updates those buffers in the
    same call) or (); ``ok`` is the Python bool "statistics are finite"; ``stats``, a list or None, receives
    the (1, C) μ and raw statistic (plain tensors) for a caller that updates buffers itself — not outputs,
    because each autograd output costs the common call ~10 µs on a cold cache. Saves x, w and the (C,)
    statistics (range: also the positions of the per-channel max and min, see :func:`.native.forward`; top-k:
    the k-th largest |d|), as many bytes as the Inductor path saves. Once differentiable (double backward
    raises)."""

    @staticmethod
    def forward(ctx, x, weight, bias, launch, running, stats=None):
        y, mean, raw, aux, ok = launch.forward(x, weight, bias, *running)
        if launch.divides:  # as _save_for_backward: x, w, μ and, for dividing norms, raw and aux
            ctx.save_for_backward(x, weight, mean, raw, *aux)
        else:
            ctx.save_for_backward(x, weight, mean)
        ctx.launch = launch
        if stats is not None:
            stats.extend((mean.view(1, -1), raw.view(1, -1)))
        return y, ok

    backward = _once_differentiable_under_create_graph(_native_backward)


def _native_inplace_backward(ctx, gy):
    y, weight, bias, raw = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = ctx.launch.backward(gy, y, weight, None, raw, (), need_x, need_w, need_b, bias=bias)
    return gx, gw, gb, None, None, None


class NativeBatchNormInplaceFunction(torch.autograd.Function):
    """In-place mode on the native channel kernels: forward(x, weight, bias, launch, running, status) → x,
    normalized in place (marked dirty), the running buffers updated in the same call as in
    :class:`NativeBatchNormFunction` (``launch`` built with ``inplace=True``); ``status`` (a list) receives the
    "statistics are finite" flag — the only output is x, as a Function that modifies a view in place must
    return one tensor. Saves y (the input's own storage), w, b and raw; backward rebuilds d = (y − b)/scale and
    the thresholds from it in the kernel (:meth:`.native.Launch.backward`). Every weight entry must be
    non-zero (checked by the caller)."""

    @staticmethod
    def forward(ctx, x, weight, bias, launch, running, status):
        _, _, raw, _, ok = launch.forward(x, weight, bias, *running)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, raw)
        ctx.launch = launch
        status.append(ok)
        return x

    backward = _once_differentiable_under_create_graph(_native_inplace_backward)


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
    if impl not in ("auto", "native") or not native.eligible(x, w, b, norm, groups, m, k):
        return False
    return (impl == "native" or native.auto_prefers(x, norm)) and native.available()


def check_inplace_weight(weight: Tensor | None, where: str) -> None:
    """``inplace=True`` reconstructs the input from the output by dividing by the weight: every entry must be
    non-zero. Eager only (one host synchronisation); skipped under ``torch.compile``, where a data-dependent
    raise would break the graph (a zero weight there gives non-finite input gradients)."""
    if weight is None or torch.compiler.is_compiling():
        return
    zeros = int((weight == 0).sum())
    if zeros:
        raise ValueError(f"{where}: inplace=True needs every weight != 0 to reconstruct the input from the "
                         f"output (In-Place ABN); found {zeros} zero entr{'y' if zeros == 1 else 'ies'} — use "
                         "inplace=False or re-initialise the weight")


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


class NativePlan:
    """The native training call of one layer (affine, one group, running buffers the kernel can update),
    worked out once: the checks of every path, the constant c(n), the :class:`.native.Launch` and the buffer
    arguments. :meth:`build` returns None where it does not apply (the general path then runs, and raises what
    it raises); calling the plan runs the step, or returns None when the call is not the one it was built for.

    Why: this Python runs right after the previous layer's kernel has streamed the activations through every
    cache, where each small helper call costs 10-40 µs; a layer that keeps its plan
    (:class:`normmatters.nn.LpBatchNorm`) skips them on every later step. A plan is valid for the input's
    shape, strides and dtype (on the CPU) and the very tensors it was built with (weight, bias, running
    buffers: the same objects, each still with the shape, strides and dtype it had, on the CPU — the kernel
    reads their addresses afresh every call — so ``module.to()``, ``load_state_dict(assign=True)`` or a
    ``.data`` of another layout make a new one); the caller keeps it out of ``torch.compile`` and drops it
    when any option is reassigned (:class:`normmatters.nn.LpBatchNorm` does both, and on ``.train()`` /
    ``.eval()``). Unless built with an explicit ``impl``, it also checks that ``$NORMMATTERS_KERNEL`` still has
    the value it was built with (0.7 µs a call), so the switch takes effect on the next step.
    """

    __slots__ = ("launch", "where", "nonfinite", "inplace", "running", "tensors", "layouts", "env")

    @staticmethod
    def build(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
              bias: Tensor | None, momentum: float | Tensor, eps: float, norm: str, k: int,
              num_batches_tracked: Tensor | None, nonfinite: str, where: str, impl: str | None,
              inplace: bool = False) -> NativePlan | None:
        """The plan of this call, or None where the native kernels do not take it. ``impl`` None: read
        $NORMMATTERS_KERNEL (:func:`resolve_impl`)."""
        # an explicit impl ignores the environment; else the value $NORMMATTERS_KERNEL had (checked every call)
        env = (True, None) if impl is not None else (False, os.environ.get(ENV))
        impl = resolve_impl(impl, where)
        if impl not in ("auto", "native"):
            return None
        eligible = native.inplace_eligible if inplace else native.eligible
        if not (isinstance(input, Tensor) and weight is not None and bias is not None
                and nonfinite in NONFINITE_MODES and eligible(input, weight, bias, norm, 1, 1, k)
                and (impl == "native" or native.auto_prefers(input, norm))):
            return None
        check_channel_vectors(input.shape[1], where, weight=weight, bias=bias, running_mean=running_mean,
                              running_var=running_var)
        est = get_estimator(norm)
        rv = running_var if est.divides else None
        if not (native.update_fusable(input, running_mean, rv, num_batches_tracked) and native.available()):
            return None
        n = training_groups(input, where, norm, k, None, None)[2]  # validates n as every path does
        c = est.constant(n, k=k) if est.divides else 1.0
        plan = NativePlan()
        plan.launch = native.Launch(input, norm, c, eps, k, inplace)
        plan.where, plan.nonfinite, plan.inplace = where, nonfinite, inplace
        plan.running = native.running_args((running_mean, rv, num_batches_tracked, momentum, n), input)
        plan.tensors = (weight, bias, running_mean, running_var, num_batches_tracked)
        plan.layouts = tuple((t, t.shape, t.stride(), t.dtype) for t in plan.tensors if t is not None)
        plan.env = env
        return plan

    def __call__(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                 running_var: Tensor | None, num_batches_tracked: Tensor | None) -> Tensor | None:
        """The training step (y, the running buffers updated), or None if this call differs from the one the
        plan was built for (see the class docstring)."""
        t = self.tensors
        if not (isinstance(input, Tensor) and self.launch.matches(input) and weight is t[0] and bias is t[1]
                and running_mean is t[2] and running_var is t[3] and num_batches_tracked is t[4]
                and (self.env[0] or os.environ.get(ENV) == self.env[1])):
            return None
        for tensor, shape, stride, dtype in self.layouts:  # .data reassigned, resize_, ...: what the kernel
            if tensor.shape != shape or tensor.stride() != stride or tensor.dtype is not dtype or not tensor.is_cpu:
                return None  # reads (it takes every address afresh on each call) must be as at build time
        return self.run(input, weight, bias)

    def run(self, input: Tensor, weight: Tensor, bias: Tensor, stacklevel: int = 4) -> Tensor:
        """The step without the validity check (:meth:`build` has just made the plan for this call);
        ``stacklevel`` of the "skip" warning (4: the caller of :meth:`__call__`)."""
        if self.inplace:
            check_inplace_weight(weight, self.where)
            status: list[bool] = []
            y = NativeBatchNormInplaceFunction.apply(input, weight, bias, self.launch, self.running, status)
            ok = status[0]
        else:
            y, ok = NativeBatchNormFunction.apply(input, weight, bias, self.launch, self.running)
        if not ok and self.nonfinite != "ignore":
            report_nonfinite(ok, self.nonfinite, self.where, stacklevel)
        return y


def _native_training(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, momentum: float | Tensor, eps: float, norm: str,
                     k: int, num_batches_tracked: Tensor | None, nonfinite: str, where: str,
                     impl: str, inplace: bool = False) -> Tensor | None:
    """The common training call in one native call (:class:`NativePlan`, built and run once); None where it
    does not apply."""
    plan = NativePlan.build(input, running_mean, running_var, weight, bias, momentum, eps, norm, k,
                            num_batches_tracked, nonfinite, where, impl, inplace)
    return None if plan is None else plan.run(input, weight, bias, stacklevel=5)  # the caller of lean_batch_norm


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
      "modified by an inplace operation" error at backward. If ``nonfinite="raise"`` raises, the input
      has already been overwritten (the running buffers are untouched). With ``impl="reference"`` the
      reference is computed (on a clone when grad is enabled) and copied into ``input`` — for testing.
    * eval: ``input·scale + shift`` in place when ``input`` does not require grad (same values as the
      reference within rounding); out of place (a new tensor) when it does.
    """
    impl = resolve_impl(impl, where)
    if training and impl in ("auto", "native") and ghost_batch_size is None and chunks is None:
        y = _native_training(input, running_mean, running_var, weight, bias, momentum, eps, norm, k,
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
    if inplace:
        # statistics first (no autograd: the Function's backward covers them), then y written over the input
        mean, raw = _kernel("stats", norm, impl, input.device)(
            _view5(input.detach(), groups, m, _is_channels_last(input)), norm, k)
        y = LeanBatchNormInplaceFunction.apply(input, w, b, mean, raw, c, eps, norm, k, groups, m, impl)
        mean, raw = mean.reshape(groups, C), raw.reshape(groups, C)
    elif _use_native(impl, input, w, b, norm, groups, m, k):
        check_channel_vectors(C, where, weight=w, bias=b)
        # not covered by _native_training (no affine parameters, or buffers of another dtype): the kernel's
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
        ok = _kernel("update_running", norm, impl, input.device)(
            mean, raw, c, running_mean, running_var if est.divides else None, num_batches_tracked,
            momentum, n, est.divides)
    report_nonfinite(ok, nonfinite, where)
    return y
