"""The native CPU kernels (:mod:`.native`) as autograd Functions, and :class:`NativePlan`, the training step a
layer works out once and reuses: the fast path :func:`~normmatters.kernels.lean_batch_norm` and the layers take
for the common training call (affine, one group, running buffers the kernel updates itself). :mod:`.dispatch`
decides when they run and keeps a layer's plan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._batch_stats import (
    NONFINITE_MODES,
    STORED,
    check_channel_vectors,
    check_eps,
    check_inplace_input,
    check_inplace_weight,
    no_values,
    report_nonfinite,
    training_groups,
)
from ..estimators import get_estimator
from . import native
from .saved import save_stats, saved_stats

__all__ = ["NativeBatchNormFunction", "NativeBatchNormInplaceFunction", "NativePlan"]


def _once_differentiable_under_create_graph(backward):
    """``backward`` as a Function's backward that is once-differentiable: the C kernels build no graph, so
    under create_graph=True the results must refuse a second backward (``once_differentiable``); otherwise
    the plain call, as that wrapper costs the common call ~20 µs on a cold cache."""
    once = torch.autograd.function.once_differentiable(backward)

    def wrapped(ctx, *grads):
        return (once if torch.is_grad_enabled() else backward)(ctx, *grads)
    return staticmethod(wrapped)


def _native_backward(ctx, gy, _gok):
    x, weight, mean, raw, aux = saved_stats(ctx)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = ctx.launch.backward(gy, x, weight, mean, raw, aux, need_x, need_w, need_b)
    return gx, gw, gb, None, None, None


class NativeBatchNormFunction(torch.autograd.Function):
    """:class:`LeanBatchNormFunction` on the native CPU kernels (:mod:`.native`): one group, one chunk,
    contiguous or channels-innermost input. forward(x, weight, bias, launch, running, stats) → (y, ok):
    ``launch`` a :class:`.native.Launch` built for x (not in-place); ``running`` the buffer arguments of
    :meth:`.native.Launch.forward` (:func:`.native.running_args`: the kernel then updates those buffers in the
    same call) or (); ``ok`` is the Python bool "statistics are finite"; ``stats``, a list or None, receives
    the (1, C) μ and raw statistic (plain tensors) for a caller that updates buffers itself — not outputs,
    because each autograd output costs the common call ~10 µs on a cold cache. Saves x, w and the (C,)
    statistics (range: also the positions of the per-channel max and min, see :meth:`.native.Launch.forward`; top-k:
    the k-th largest |d|), as many bytes as the Inductor path saves. Once differentiable (double backward
    raises)."""

    @staticmethod
    def forward(ctx, x, weight, bias, launch, running, stats=None):
        y, mean, raw, aux, ok = launch.forward(x, weight, bias, *running)
        save_stats(ctx, x, weight, launch.divides, mean, raw, aux)
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
    ``.data`` of another layout make a new one); the caller keeps it out of ``torch.compile`` and eval mode, and
    drops it when any option is reassigned (:class:`normmatters.nn.LpBatchNorm` does all three, through its
    :class:`.dispatch.LayerKernels`). ``skipped``: the layer's counter of skipped batches it adds to.
    """

    __slots__ = ("launch", "where", "nonfinite", "inplace", "running", "tensors", "layouts", "tracked",
                 "skipped")

    @staticmethod
    def build(input: Tensor, tensors: tuple, options, momentum: float | Tensor, where: str,
              impl: str, skipped: Tensor | None = None) -> NativePlan | None:
        """The plan of this call, or None where the native kernels do not take it. ``tensors`` (weight, bias,
        running_mean, running_var, num_batches_tracked); ``options`` a :class:`~normmatters.options.NormOptions`
        (norm, k, eps, nonfinite, inplace); ``impl`` resolved by :mod:`.dispatch` ("auto" or "native")."""
        if impl not in ("auto", "native"):
            return None
        weight, bias, running_mean, running_var, num_batches_tracked = tensors
        norm, k, eps, nonfinite, inplace = options.norm, options.k, options.eps, options.nonfinite, options.inplace
        eligible = native.inplace_eligible if inplace else native.eligible
        if not isinstance(input, Tensor) or no_values(input):  # fake tensors say "cpu" but have no memory
            return None
        if not (weight is not None and bias is not None
                and nonfinite in NONFINITE_MODES and eligible(input, weight, bias, norm, 1, 1, k)
                and (impl == "native" or native.auto_prefers(input, norm))):
            return None
        check_channel_vectors(input.shape[1], where, weight=weight, bias=bias, running_mean=running_mean,
                              running_var=running_var)
        check_eps(eps, True, where)
        est = get_estimator(norm)
        rv = running_var if est.divides else None
        if not (native.update_fusable(input, running_mean, rv, num_batches_tracked) and native.available()):
            return None
        n = training_groups(input, where, norm, k, None, None)[2]  # validates n as every path does
        c = est.constant(n, k=k) if est.divides else 1.0
        plan = NativePlan()
        plan.launch = native.Launch(input, norm, c, eps, k, inplace)
        plan.where, plan.nonfinite, plan.inplace = where, nonfinite, inplace
        plan.running = native.running_args((running_mean, rv, num_batches_tracked, momentum, n))
        plan.tensors = (weight, bias, running_mean, running_var, num_batches_tracked)
        plan.tracked = not (running_mean is None and running_var is None and num_batches_tracked is None)
        plan.layouts = tuple((t, t.shape, t.stride(), t.dtype) for t in plan.tensors if t is not None)
        plan.skipped = skipped  # the layer's counter of skipped batches (None: not counted)
        return plan

    def __call__(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                 running_var: Tensor | None, num_batches_tracked: Tensor | None) -> Tensor | None:
        """The training step (y, the running buffers updated), or None if this call differs from the one the
        plan was built for (see the class docstring)."""
        t = self.tensors
        if not (isinstance(input, Tensor) and self.launch.matches(input) and weight is t[0] and bias is t[1]
                and running_mean is t[2] and running_var is t[3] and num_batches_tracked is t[4]):
            return None
        for tensor, shape, stride, dtype in self.layouts:  # .data reassigned, resize_, ...: what the kernel
            if tensor.shape != shape or tensor.stride() != stride or tensor.dtype is not dtype or not tensor.is_cpu:
                return None  # reads (it takes every address afresh on each call) must be as at build time
        return self.run(input, weight, bias)

    def run(self, input: Tensor, weight: Tensor, bias: Tensor, stacklevel: int = 4) -> Tensor:
        """The step without the validity check (:meth:`build` has just made the plan for this call);
        ``stacklevel`` of the "skip" warning (4: the caller of :meth:`__call__`)."""
        if self.inplace:
            check_inplace_input(input, self.where, weight, bias)  # before the kernel writes the input and the buffers
            check_inplace_weight(weight, self.where)
            status: list[int] = []
            y = NativeBatchNormInplaceFunction.apply(input, weight, bias, self.launch, self.running, status)
            ok = status[0]
        else:
            y, ok = NativeBatchNormFunction.apply(input, weight, bias, self.launch, self.running)
        if ok != STORED and self.nonfinite != "ignore":  # 0 non-finite, 2 running_var unrepresentable
            report_nonfinite(ok, self.nonfinite, self.where, stacklevel, tracked=self.tracked,
                             skipped=self.skipped)
        return y
