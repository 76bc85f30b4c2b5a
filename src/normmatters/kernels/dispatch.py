"""The one choice of how an Lp batch-norm call runs, per device, and what a layer decides once.

A call flows: ``LpBatchNorm.forward`` (state) or :func:`normmatters.functional.lp_batch_norm` (validation) →
:func:`batch_norm` (this module: the path) → one kernel (native C++ on the CPU, Inductor/Triton, the eager
formulas, the reference) → the running-statistics update, fused or separate, guarded on the device. A layer owns a
:class:`LayerKernels`: its options object, ``impl`` with ``$NORMMATTERS_KERNEL`` resolved at its first call, and the
native step's plan (replayed while input and tensors are the ones it was built for); assigning an option clears it.
On CUDA (``impl="auto"``) and for ``impl="triton"`` the hand-written Triton kernels (:mod:`.triton`) run; what they
do not cover takes Inductor's generated Triton ("compiled").

Every layer and functional call ends here (:func:`batch_norm`; the kernels-level entry :func:`lean_batch_norm`):

* ``"emulated"`` — ``precision=`` set, in training: :func:`normmatters.precision.layer.emulated_batch_norm`
  (every intermediate rounded, straight-through backward);
* ``"reference"`` — eval mode (``F.batch_norm`` on the running statistics), ``impl="reference"``:
  :func:`normmatters.functional.reference_batch_norm`, autograd through every op;
* ``"native"`` — CPU, where :func:`.native.eligible` and (for ``impl="auto"``) :func:`.native.auto_prefers`:
  the C++/OpenMP ``normmatters::`` operators (:mod:`.native`), built on first use; the common step (affine, one
  group, buffers the kernel updates) as one :class:`.native_autograd.NativePlan`, which a layer keeps across
  steps (:meth:`LayerKernels.replay`). Inside torch.compile / torch.export the functional operator goes into the graph;
* ``"compiled"`` — every other training call off the meta device: :mod:`.formulas` compiled by Inductor (C++ on
  CPU, Triton on CUDA: no native CUDA kernel exists, so ``impl="native"`` on CUDA runs this), eager fallback;
* ``"eager"`` — ``impl="eager"``, meta / fake tensors (no memory for a kernel to read) and the in-place eval
  (``input·scale + shift``): the formulas op by op.

``impl`` (a layer's option) None means ``$NORMMATTERS_KERNEL`` (:data:`ENV`), else "auto" — read once per layer
(at its first call, again after an option is assigned) and on every function call; this module is the only reader
of that variable. :func:`path` names the choice without running it.

Non-finite batches: every path leaves the running buffers unchanged on the device and, by default
(``nonfinite="skip"``), adds to the layer's counter on the device; only ``nonfinite="raise"`` reads a status back
to the host (:func:`normmatters._batch_stats.report_nonfinite`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._batch_stats import (
    BatchNormTensors,
    acc_dtype,
    call_momentum,
    check_channel_vectors,
    check_eps,
    check_inplace_input,
    check_inplace_weight,
    check_input,
    check_running_stats,
    empty_batch_norm,
    no_values,
    reference_batch_norm,
    report_nonfinite,
    training_groups,
)
from ..estimators import get_estimator
from ..options import IMPLS, NormOptions
from ..precision.layer import emulated_batch_norm
from . import native, native_ops
from .lean import (
    LeanBatchNormFunction,
    LeanBatchNormInplaceFunction,
    gaussian_constant,
    is_channels_last,
    kernel,
    view5,
)
from .native_autograd import NativeBatchNormFunction, NativePlan

__all__ = ["ENV", "IMPLS", "PATHS", "resolve_impl", "path", "batch_norm", "LayerKernels", "lean_batch_norm",
           "NativePlan",
           "check_inplace_weight"]

ENV = "NORMMATTERS_KERNEL"
#: what a call can run on
PATHS = ("reference", "eager", "compiled", "native", "emulated", "triton")


def resolve_impl(impl: str | None, where: str = "lean_batch_norm") -> str:
    """The kernel to run: ``impl`` if given, else $NORMMATTERS_KERNEL, else "auto"."""
    chosen = impl if impl is not None else os.environ.get(ENV, "auto") or "auto"
    if chosen not in IMPLS:
        src = "impl" if impl is not None else f"${ENV}"
        raise ValueError(f"{where}: {src} must be one of {IMPLS}, got {chosen!r}")
    return chosen


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


def _training_path(impl: str, x: Tensor, w: Tensor, b: Tensor, opts: NormOptions, groups: int) -> str:
    """The kernel of a (validated) training call off the reference: "native", "compiled" or "eager"."""
    if impl == "eager" or no_values(x):
        return "eager"
    m = opts.chunks or 1
    if torch.compiler.is_compiling():
        return "native" if _traced_native(impl, x, w, b, opts.norm, groups, m, opts.k) else "eager"
    # the hand-written Triton kernels (impl="triton", and "auto" on CUDA) are taken before this, in batch_norm and
    # path; a CUDA call they do not cover (top-k past their k, in-place) comes here: "compiled" (Inductor's Triton)
    return "native" if _use_native(impl, x, w, b, opts.norm, groups, m, opts.k) else "compiled"


def path(input: Tensor, options: NormOptions, training: bool, weight: Tensor | None = None,
         bias: Tensor | None = None) -> str:
    """Which of :data:`PATHS` :func:`batch_norm` takes for this call (nothing runs; the input is not checked;
    for a native plan, buffers the kernel can update are assumed: :func:`.native.update_fusable`)."""
    if training and options.precision is not None:
        return "emulated"
    impl = resolve_impl(options.impl, "path")
    if not training:
        eager = options.inplace and not (input.requires_grad and torch.is_grad_enabled())
        return "eager" if eager else "reference"
    if impl == "reference":
        return "reference"
    if impl == "triton" or (impl == "auto" and input.device.type == "cuda"):  # the Triton kernels
        from . import triton as triton_kernels
        if not options.inplace and triton_kernels.covers(options.norm, options.k) and (
                impl == "triton" or triton_kernels.runs_on(input)):
            return "triton"
        impl = "auto" if impl == "auto" else "eager"
    C = input.shape[1]
    dtype = weight.dtype if weight is not None else acc_dtype(input.dtype)
    w = weight if weight is not None else torch.ones(C, dtype=dtype, device=input.device)
    b = bias if bias is not None else torch.zeros(C, dtype=dtype, device=input.device)
    groups = input.shape[0] // options.ghost_batch_size if options.ghost_batch_size else 1
    if options.inplace:  # native only as a plan (:class:`NativePlan`: one group, one chunk)
        if impl == "eager" or no_values(input):
            return "eager"
        native_ok = (impl in ("auto", "native") and groups == 1 and options.chunks is None
                     and native.inplace_eligible(input, w, b, options.norm, 1, 1, options.k)
                     and (impl == "native" or native.auto_prefers(input, options.norm)) and native.available())
        return "native" if native_ok else "compiled"
    return _training_path(impl, input, w, b, options, groups)


class LayerKernels:
    """What a layer decides once and keeps (it owns one, :attr:`normmatters.nn.LpBatchNorm` ``._kernels``): its
    options as one :class:`~normmatters.options.NormOptions` (``options``), the kernel choice with
    ``$NORMMATTERS_KERNEL`` resolved (``impl``, at the first call), the native training step of the last call
    (``plan``, a :class:`.native_autograd.NativePlan`: valid for the input's device, dtype, shape and strides and
    the very tensors it was built with, which it checks on every call) and the once-per-layer warnings given
    (``warned``). :meth:`clear` forgets all but the warnings (the layer calls it when an option is assigned).
    Never pickled or copied: a copy starts empty (operator handles and tensor identities are this process's)."""

    __slots__ = ("options", "impl", "plan", "warned")

    def __init__(self) -> None:
        self.options: NormOptions | None = None
        self.impl: str | None = None
        self.plan: NativePlan | None = None
        self.warned: set = set()

    def clear(self) -> None:
        self.options = self.impl = self.plan = None

    def resolve(self, impl: str | None, where: str) -> str:
        """``impl`` with $NORMMATTERS_KERNEL resolved, once (:func:`resolve_impl`)."""
        chosen = self.impl
        if chosen is None:
            chosen = self.impl = resolve_impl(impl, where)
        return chosen

    def replay(self, input: Tensor, params: dict, buffers: dict | None) -> Tensor | None:
        """The native training step this layer made last time, or None where it does not apply (the plan is then
        dropped). ``params`` and ``buffers`` the layer's ``_parameters`` and ``_buffers`` (None: no running
        statistics tracked). None of the checks of :func:`batch_norm`, which cost ~0.1 ms per layer on the caches
        the previous kernel leaves. Eager mode only: the caller keeps it out of torch.compile (which traces
        :func:`batch_norm` instead)."""
        plan = self.plan
        # .get: a parametrization or `del` may have removed an entry
        if buffers is not None:
            if buffers.get("_skipped") is not plan.skipped:  # (.to() made a new counter)
                self.plan = None
                return None
            y = plan(input, params.get("weight"), params.get("bias"), buffers.get("running_mean"),
                     buffers.get("running_var"), buffers.get("num_batches_tracked"))
        else:
            y = plan(input, params.get("weight"), params.get("bias"), None, None, None)
        if y is None:
            self.plan = None
        return y

    def __reduce__(self) -> tuple:  # pickle and deepcopy: an empty one
        return (LayerKernels, ())


def _plan(input: Tensor, tensors: BatchNormTensors, opts: NormOptions, momentum: float | Tensor, where: str,
          kernels: LayerKernels | None, impl: str, skipped: Tensor | None) -> Tensor | None:
    """The common native training step as one :class:`NativePlan` (kept in ``kernels`` for
    :meth:`LayerKernels.replay` when given and the momentum is a number); None where the plan does not apply."""
    if opts.chunks is not None or opts.ghost_batch_size is not None or torch.compiler.is_compiling():
        return None
    plan = NativePlan.build(input, tensors, opts, momentum, where, impl, skipped)
    if plan is None:
        return None
    if kernels is not None and type(momentum) in (float, int):
        kernels.plan = plan
    return plan.run(input, tensors.weight, tensors.bias, stacklevel=4)


def _eval_inplace(input: Tensor, tensors: BatchNormTensors, eps: float, divides: bool) -> Tensor:
    """Eval mode in place: input·scale + shift with the reference's scale and shift (equal within rounding)."""
    weight, bias, running_mean, running_var, _ = tensors
    acc = acc_dtype(input.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps) if divides else torch.ones_like(running_mean, dtype=acc)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    return input.mul_(scale.reshape(shape)).add_(shift.reshape(shape))


def batch_norm(input: Tensor, tensors: BatchNormTensors, options: NormOptions, training: bool,
               momentum: float | Tensor, where: str, kernels: LayerKernels | None = None,
               skipped: Tensor | None = None) -> Tensor:
    """Run one Lp batch-norm call on the path :func:`path` names; arguments as
    :func:`normmatters._batch_stats.reference_batch_norm` (``momentum`` this step's mixing factor), plus
    ``kernels``: a layer's :class:`LayerKernels` (the kernel choice made once, the native step's plan kept for
    :meth:`LayerKernels.replay`; None: a function call, decided afresh), and
    ``skipped``: the layer's 0-dim counter of skipped batches (added to on the device)."""
    opts = options
    impl = kernels.resolve(opts.impl, where) if kernels is not None else resolve_impl(opts.impl, where)
    if impl != "reference" and no_values(input):
        impl = "eager"  # meta / fake tensors: no memory for a native or Inductor kernel to read
    weight, bias, running_mean, running_var, num_batches_tracked = tensors
    eps, norm, inplace = opts.eps, opts.norm, opts.inplace
    check_eps(eps, training, where)
    if training:
        check_input(input, where=where)
        if inplace:
            check_inplace_input(input, where, weight, bias)
        if input.numel() == 0:
            return empty_batch_norm(input, weight, bias, num_batches_tracked)
        if opts.precision is not None:
            return emulated_batch_norm(input, tensors, opts, True, momentum, where, skipped)
        if impl == "triton" or (impl == "auto" and input.device.type == "cuda"):  # the Triton kernels
            from . import triton as triton_kernels
            out = triton_kernels.batch_norm_training(input, tensors, opts, momentum, where, explicit=impl == "triton")
            if out is not None:
                report_nonfinite(out[1], opts.nonfinite, where, tracked=any(t is not None for t in tensors[2:]),
                                 skipped=skipped)
                return out[0]
            impl = "auto" if impl == "auto" else "eager"  # not covered (kernels.triton): the composite path
        if impl in ("auto", "native"):
            y = _plan(input, tensors, opts, momentum, where, kernels, impl, skipped)
            if y is not None:
                return y
    est = get_estimator(norm)
    if not training:
        if inplace and not (input.requires_grad and torch.is_grad_enabled()):
            check_input(input, where=where)
            check_running_stats(running_mean, running_var, est.divides, where)
            return _eval_inplace(input, tensors, eps, est.divides)
        impl = "reference"
    elif inplace:
        check_inplace_weight(weight, where)
    if impl == "reference":
        src = input.clone() if training and inplace and torch.is_grad_enabled() else input
        y = reference_batch_norm(src, tensors, opts, training, momentum, where, skipped)
        return input.copy_(y) if training and inplace else y
    return _lean_training(input, tensors, opts, momentum, where, impl, skipped)


def _lean_training(input: Tensor, tensors: BatchNormTensors, opts: NormOptions, momentum: float | Tensor,
                   where: str, impl: str, skipped: Tensor | None) -> Tensor:
    """Training on the lean autograd Functions (eager or compiled formulas) or the native kernels with a
    separate running-statistics update (no affine parameters, buffers of another dtype, traced)."""
    weight, bias, running_mean, running_var, num_batches_tracked = tensors
    norm, k, chunks, eps = opts.norm, opts.k, opts.chunks, opts.eps
    est = get_estimator(norm)
    groups, g, n = training_groups(input, where, norm, k, chunks, opts.ghost_batch_size)
    C = input.shape[1]
    acc = acc_dtype(input.dtype)
    pdtype = weight.dtype if weight is not None else acc
    w = weight if weight is not None else torch.ones(C, dtype=pdtype, device=input.device)
    b = bias if bias is not None else torch.zeros(C, dtype=pdtype, device=input.device)
    c = gaussian_constant(norm, n, k, chunks, acc, input.device)
    m = chunks or 1
    traced_op = False
    if opts.inplace:  # (the native in-place kernels ran as a plan, if at all)
        chosen = "eager" if impl == "eager" or no_values(input) else "compiled"
    else:
        chosen = _training_path(impl, input, w, b, opts, groups)
    if opts.inplace:
        kind = chosen
        # statistics first (no autograd: the Function's backward covers them), then y written over the input
        mean, raw = kernel("stats", norm, kind, input.device)(
            view5(input.detach(), groups, m, is_channels_last(input)), norm, k)
        y = LeanBatchNormInplaceFunction.apply(input, w, b, mean, raw, c, eps, norm, k, groups, m, kind)
        mean, raw = mean.reshape(groups, C), raw.reshape(groups, C)
    elif chosen == "native" and torch.compiler.is_compiling():
        # traced: the operator itself goes into the graph (fake impl, C++ autograd), and so does its
        # running-statistics update below
        y, mean, raw, _ = native_ops.fwd(input, w, b, norm, c, eps, k)
        mean, raw, traced_op = mean.view(1, C), raw.view(1, C), True
    elif chosen == "native":
        check_channel_vectors(C, where, weight=w, bias=b)
        # not covered by the plan (no affine parameters, or buffers of another dtype): the kernel's statistics
        # feed the separate update below
        stats: list[Tensor] = []
        y, _ = NativeBatchNormFunction.apply(input, w, b, native.Launch(input, norm, float(c), eps, k), (), stats)
        mean, raw = stats
    else:
        y, mean, raw = LeanBatchNormFunction.apply(input, w, b, c, eps, norm, k, groups, m, chosen)
    if running_mean is None and running_var is None and num_batches_tracked is None \
            and opts.nonfinite == "ignore":
        return y
    rv = running_var if est.divides else None
    with torch.no_grad():
        if traced_op and isinstance(momentum, (int, float)) and native.update_fusable(
                input, running_mean, rv, num_batches_tracked):
            native_ops.update_running_stats(mean, raw, running_mean, rv, num_batches_tracked, norm, c,
                                            float(momentum), n)
            return y  # traced: no report (report_nonfinite is eager-only)
        ok = kernel("update_running", norm, "eager" if chosen == "eager" else "compiled", input.device)(
            mean, raw, c, running_mean, rv, num_batches_tracked, momentum, n, est.divides)
    report_nonfinite(ok, opts.nonfinite, where, skipped=skipped,
                     tracked=not (running_mean is None and running_var is None and num_batches_tracked is None))
    return y


def lean_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    norm: str = "l1",
    k: int = 10,
    chunks: int | None = None,
    ghost_batch_size: int | None = None,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "skip",
    where: str = "lean_batch_norm",
    impl: str | None = None,
    inplace: bool = False,
    options: NormOptions | None = None,
) -> Tensor:
    """Lp batch norm through the one dispatch (:func:`batch_norm`); arguments and results as
    :func:`normmatters.functional.lp_batch_norm`, plus ``impl`` ("auto", "native", "compiled", "eager",
    "reference"; see the module docstring), ``inplace`` (In-Place ABN style) and ``options`` (a
    :class:`~normmatters.options.NormOptions` instead of the option arguments; its ``precision``, if set, takes
    the emulated path):

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
    opts = NormOptions.resolve(options, where, momentum=momentum, eps=eps, norm=norm, k=k, chunks=chunks,
                               ghost_batch_size=ghost_batch_size, nonfinite=nonfinite, impl=impl, inplace=inplace)
    tensors = BatchNormTensors(weight, bias, running_mean, running_var, num_batches_tracked)
    updates = training and not (running_mean is None and running_var is None)
    return batch_norm(input, tensors, opts, training,
                      call_momentum(opts.momentum, num_batches_tracked, where, updates), where)
