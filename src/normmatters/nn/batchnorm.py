"""Lp batch-norm modules: ``LpBatchNorm1d/2d/3d`` and the per-norm aliases.

The modules hold state (weight, bias, running statistics) and choose training vs eval, exactly like
``torch.nn.BatchNorm*d``; the math is :func:`normmatters.functional.lp_batch_norm`. Differences from
``nn.BatchNorm`` (all documented in the README):

* ``norm`` picks the dispersion measure (:mod:`normmatters.estimators`); ``k``, ``chunks`` and
  ``ghost_batch_size`` are its options; ``nonfinite`` decides what a NaN/Inf batch does (running buffers are
  never corrupted).
* ``norm="mean"`` (mean-only batch norm) never reads ``running_var``; it keeps the buffer (filled with 1)
  so state_dicts keep their keys.
* The classes derive from ``torch.nn.modules.batchnorm._NormBase`` (parameters, buffers, reset and
  state-dict versioning as in PyTorch) but not from ``_BatchNorm``, so tools that rewrite every
  ``_BatchNorm`` (e.g. ``nn.SyncBatchNorm.convert_sync_batchnorm``) leave them alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from .._batch_stats import BatchNormTensors, LayerName, call_momentum, check_input
from ..estimators import get_estimator
from ..kernels import dispatch
from ..kernels.native_autograd import NativePlan
from ..options import OPTION_NAMES, NormOptions, check_option
from ..precision.emulate import get_precision

__all__ = [
    "LpBatchNorm", "LpBatchNorm1d", "LpBatchNorm2d", "LpBatchNorm3d",
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "TopKBatchNorm1d", "TopKBatchNorm2d", "TopKBatchNorm3d",
    "RangeBatchNorm1d", "RangeBatchNorm2d", "RangeBatchNorm3d",
    "MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d",
]


def _check_positive_int(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")


def _check_option(layer: LpBatchNorm, name: str, value: Any) -> None:
    """Validate one option of ``layer`` (:func:`normmatters.options.check_option`, against the options it already
    has); errors name the layer's class, as the option may be what is being set. A precision preset's name is
    resolved here too (:func:`normmatters.precision.emulate.get_precision`)."""
    where = type(layer).__name__
    check_option(name, value, where, layer.__dict__)  # (the options already set, by name)
    if name == "precision" and value is not None:
        get_precision(value, where)


def _option(name: str, doc: str) -> property:
    """The layer option ``name``: stored in the instance's ``__dict__`` under its own name (as modules pickled
    before the options were properties have it), validated on assignment (:func:`_check_option`, naming the
    layer), and assigning one makes the layer decide its kernel afresh (:meth:`LayerKernels.clear`)."""
    late = _LATE_DEFAULTS.get(name, _MISSING)

    def fget(self: LpBatchNorm) -> Any:
        try:
            return self.__dict__[name]
        except KeyError:
            if late is not _MISSING:  # an option newer than a pickled module
                return late
            raise AttributeError(f"{type(self).__name__} has no option {name!r} set yet") from None

    def fset(self: LpBatchNorm, value: Any) -> None:
        _check_option(self, name, value)
        self.__dict__[name] = value
        kernels = self.__dict__.get("_kernels")
        if kernels is not None:
            kernels.clear()

    return property(fget, fset, doc=doc)


_MISSING = object()
#: options a module pickled before they existed lacks
_LATE_DEFAULTS = {"inplace": False, "precision": None}
#: whether torch's batch-norm base class takes ``bias=`` (torch >= 2.10)
_BASE_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


class LpBatchNorm(_NormBase):
    """Lp batch normalization over the channel dim of an (N, C, *) input of any rank ≥ 2.

    ``y = weight · (x − μ) / sqrt(σ̂² + eps) + bias`` with σ̂ chosen by ``norm`` ("l2", "l1", "linf",
    "topk", "range", "mean"); see :mod:`normmatters.functional` for training/eval semantics and
    :mod:`normmatters.estimators` for σ̂ and its Gaussian-consistency constant.

    Args:
        num_features: C.
        norm: registered estimator name.
        eps: as in ``nn.BatchNorm2d``.
        momentum: as in ``nn.BatchNorm2d`` (``momentum=None``: cumulative moving average).
        affine: as in ``nn.BatchNorm2d``.
        track_running_stats: as in ``nn.BatchNorm2d``.
        device: as in ``nn.BatchNorm2d``.
        dtype: as in ``nn.BatchNorm2d``.
        k: how many of the largest |x − μ| ``norm="topk"`` averages.
        chunks: ``norm="range"`` only — average the ranges of this many equal chunks of the batch.
        ghost_batch_size: normalize each group of this many samples with its own statistics.
        nonfinite: what a training batch with NaN/Inf statistics (or a running variance its buffer's dtype
            cannot hold) does: "skip" (default) leaves every running buffer unchanged by a device-side select, with
            no host synchronisation, and counts the batch (:attr:`skipped_batches`); "ignore" the same, not
            counted; "raise" reads the status back to the host after every training step (a device
            synchronisation per layer and step) and raises ``NonFiniteBatchError``.
        impl: kernel — None (default: $NORMMATTERS_KERNEL or "auto"), "auto", "native", "compiled", "eager"
            or "reference" (see :mod:`normmatters.kernels.dispatch`).
        bias: keyword-only, as ``nn.BatchNorm*d`` of recent torch: ``bias=False`` with ``affine=True`` keeps the
            weight and registers no bias (state_dict without ``bias``); on a torch whose base class lacks the
            argument (2.11), the layer drops the bias itself.
        options: keyword-only, a :class:`~normmatters.options.NormOptions` giving every option above at once
            (norm, k, chunks, ghost_batch_size, eps, momentum, nonfinite, impl, inplace, precision); an option
            passed as well must agree with it. ``layer.options`` is the layer's current options.
        inplace: In-Place ABN style (Rota Bulò et al. 2018): in training the output overwrites the input
            (the same tensor is returned) and backward reconstructs the input from the output, saving
            only the output, weight, bias and (C,) statistics. Needs every weight entry != 0 (checked
            in eager mode, ``ValueError``); autograd's in-place rules apply (an output another op saved,
            e.g. of ``torch.sigmoid``, cannot be the input, and ``ReLU(inplace=True)`` right after this
            layer fails at backward — use ``ReLU()``). Eval mode runs in place when the input does not
            require grad. Not combinable with ``precision``. See :func:`normmatters.kernels.lean_batch_norm`.
            Memory: one activation fewer per layer when the next op saves its input anyway (a conv or
            linear layer, SiLU, GELU); before ``ReLU()`` the count is unchanged (ReLU saves its own output;
            In-Place ABN fuses an invertible activation to get that one too).
        precision: None (native) or "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8" (or a
            ``normmatters.precision.Precision``): the training forward is emulated with every intermediate
            rounded to that format, the backward is straight-through (float32 gradient of the native
            layer); see :mod:`normmatters.precision.layer`.

    Every option above is validated again when it is assigned after construction (``layer.momentum = 5``
    raises ``ValueError``). ``eps`` must be > 0 to train and >= 0 in eval (as ``F.batch_norm``).
    """

    _expected_dim: tuple[int, ...] | None = None
    norm = _option("norm", "the dispersion estimator σ̂")
    k = _option("k", "top-k: how many of the largest |x − μ| are averaged")
    chunks = _option("chunks", "range: mean range of this many equal chunks of the batch (None: one)")
    ghost_batch_size = _option("ghost_batch_size", "normalize each group of this many samples on its own")
    eps = _option("eps", "added to σ̂² (> 0 to train, >= 0 in eval)")
    momentum = _option("momentum", "running ← running + momentum·(batch − running); None: cumulative")
    nonfinite = _option("nonfinite", '"skip", "ignore" or "raise" (syncs every step): see the class docstring')
    impl = _option("impl", "the kernel: None ($NORMMATTERS_KERNEL at the first call, else auto) or one of IMPLS")
    inplace = _option("inplace", "In-Place ABN: the training output overwrites the input")
    precision = _option("precision", "emulated low-precision training forward (None: off)")
    #: what the layer decides once (options object, kernel choice, native plan, warnings given); made in
    #: __init__ (None: a module pickled before it existed, made on first use)
    _kernels: dispatch.LayerKernels | None = None

    def __init__(self, num_features: int, norm: str = "l1", eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, k: int = 10,
                 chunks: int | None = None, ghost_batch_size: int | None = None, nonfinite: str = "skip",
                 device: Any = None, dtype: Any = None, impl: str | None = None,
                 precision: Any = None, inplace: bool = False, *, bias: bool = True,
                 options: NormOptions | None = None) -> None:
        where = type(self).__name__
        _check_positive_int(where, "num_features", num_features)
        if options is not None:
            options = NormOptions.resolve(options, where, norm=norm, eps=eps, momentum=momentum, k=k, chunks=chunks,
                                          ghost_batch_size=ghost_batch_size, nonfinite=nonfinite, impl=impl,
                                          precision=precision, inplace=inplace)
            norm, eps, momentum, k, chunks = options.norm, options.eps, options.momentum, options.k, options.chunks
            ghost_batch_size, nonfinite, impl = options.ghost_batch_size, options.nonfinite, options.impl
            precision, inplace = options.precision, options.inplace
        self._kernels = dispatch.LayerKernels()
        # each assignment is validated (the option properties → check_option), before any state exists
        self.norm = norm
        self.k = k
        self.chunks = chunks
        self.ghost_batch_size = ghost_batch_size
        self.nonfinite = nonfinite
        self.impl = impl
        self.precision = precision
        self.inplace = inplace
        if _BASE_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                             bias=bias)
        else:  # torch 2.11 (checked): the base class always makes a bias when affine
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            if affine and not bias:
                self.register_parameter("bias", None)
        # batches skipped as non-finite (nonfinite="skip"), counted on the device; outside the state_dict
        self.register_buffer("_skipped", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @property
    def skipped_batches(self) -> int:
        """How many training batches this layer has skipped (non-finite statistics, or a running variance the
        buffer's dtype cannot hold: every running buffer left unchanged) since construction; reading it
        synchronises with the device (it is kept there). Not saved in the state_dict."""
        counter = self._buffers.get("_skipped")
        return 0 if counter is None else int(counter)

    @property
    def options(self) -> NormOptions:
        """The layer's current options as one :class:`~normmatters.options.NormOptions` (cached until one is
        assigned; each was validated when assigned)."""
        kernels = self._own_kernels()
        opts = kernels.options
        if opts is None:
            opts = kernels.options = NormOptions.trusted({name: getattr(self, name) for name in OPTION_NAMES})
        return opts

    def _own_kernels(self) -> dispatch.LayerKernels:
        kernels = self._kernels
        if kernels is None:  # a module pickled before layers kept one
            kernels = self._kernels = dispatch.LayerKernels()
        return kernels

    @property
    def _plan(self) -> NativePlan | None:
        """The native training step of the last call, kept for the next (None: none)."""
        return self._own_kernels().plan

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, norm={self.norm!r})"

    def _where(self) -> LayerName:
        """The layer's description for messages, carrying its once-per-layer warning state."""
        return LayerName(self._describe(), self._own_kernels().warned)

    def __prepare_scriptable__(self):  # torch.jit.script calls this on every submodule first
        raise RuntimeError(f"{self._describe()}: torch.jit.script is not supported by normmatters layers; use "
                           "torch.compile(model) or torch.export.export(model, args) instead, or "
                           "nm.to_torch_batchnorm(model) first to script a model with stock nn.BatchNorm layers")

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(input, where=self._describe(), num_features=self.num_features,
                    expected_dim=self._expected_dim)

    def forward(self, input: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()
        kernels = self._kernels or self._own_kernels()
        if not compiling and self.training and kernels.plan is not None:  # the native step made last time
            y = kernels.replay(input, self._parameters, self._buffers if self.track_running_stats else None)
            if y is not None:
                return y
        self._check_input_dim(input)
        # mode and state, as nn.BatchNorm: batch statistics in training (or without running statistics), the
        # running buffers updated only when training and tracking, momentum None = cumulative moving average
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats
        use_running = track or not self.training
        nbt = self.num_batches_tracked if track else None
        tensors = BatchNormTensors(self.weight, self.bias, self.running_mean if use_running else None,
                                   self.running_var if use_running else None, nbt)
        # the plan is kept only for registered parameters: a parametrized weight is a new tensor on every access
        keep = self.training and not compiling and tensors.weight is self._parameters.get("weight") \
            and tensors.bias is self._parameters.get("bias")
        where = self._describe() if compiling else self._where()  # (nothing warns compiled)
        return dispatch.batch_norm(input, tensors, self.options, bn_training, call_momentum(self.momentum, nbt),
                                   where, kernels if keep else None, self._buffers.get("_skipped") if track
                                   else None)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, norm={self.norm!r}"
        if "k" in get_estimator(self.norm).options:
            s += f", k={self.k}"
        if self.chunks is not None:
            s += f", chunks={self.chunks}"
        if self.ghost_batch_size is not None:
            s += f", ghost_batch_size={self.ghost_batch_size}"
        s += f", eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
        if self.affine and self.bias is None:
            s += "bias=False, "
        s += f"track_running_stats={self.track_running_stats}"
        if self.nonfinite != "skip":
            s += f", nonfinite={self.nonfinite!r}"
        if self.precision is not None:
            s += f", precision={self.precision!r}"
        if self.inplace:
            s += ", inplace=True"
        return s


class LpBatchNorm1d(LpBatchNorm):
    """Lp batch norm over (N, C) or (N, C, L) input; see :class:`LpBatchNorm`."""

    _expected_dim = (2, 3)


class LpBatchNorm2d(LpBatchNorm):
    """Lp batch norm over (N, C, H, W) input; see :class:`LpBatchNorm`."""

    _expected_dim = (4,)


class LpBatchNorm3d(LpBatchNorm):
    """Lp batch norm over (N, C, D, H, W) input; see :class:`LpBatchNorm`."""

    _expected_dim = (5,)


def _make_alias(base: type[LpBatchNorm], norm: str, name: str) -> type[LpBatchNorm]:
    def __init__(self: LpBatchNorm, num_features: int, **kwargs: Any) -> None:
        given = kwargs.get("norm", getattr(kwargs.get("options"), "norm", norm))
        if given != norm:
            raise ValueError(f"{name} always uses norm={norm!r}; got norm={given!r} "
                             f"(use {base.__name__}(..., norm=...) instead)")
        kwargs.pop("norm", None)
        base.__init__(self, num_features, norm=norm, **kwargs)

    doc = f"``{base.__name__}`` with ``norm={norm!r}``; other arguments as in :class:`LpBatchNorm`."
    cls = type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    cls.__qualname__ = name
    return cls


_ALIASES = {"L1": "l1", "Linf": "linf", "TopK": "topk", "Range": "range", "MeanOnly": "mean"}
_BASES = {"1d": LpBatchNorm1d, "2d": LpBatchNorm2d, "3d": LpBatchNorm3d}
for _prefix, _norm in _ALIASES.items():
    for _suffix, _base in _BASES.items():
        _name = f"{_prefix}BatchNorm{_suffix}"
        globals()[_name] = _make_alias(_base, _norm, _name)
del _prefix, _norm, _suffix, _base, _name

L1BatchNorm1d: type[LpBatchNorm1d]
L1BatchNorm2d: type[LpBatchNorm2d]
L1BatchNorm3d: type[LpBatchNorm3d]
LinfBatchNorm1d: type[LpBatchNorm1d]
LinfBatchNorm2d: type[LpBatchNorm2d]
LinfBatchNorm3d: type[LpBatchNorm3d]
TopKBatchNorm1d: type[LpBatchNorm1d]
TopKBatchNorm2d: type[LpBatchNorm2d]
TopKBatchNorm3d: type[LpBatchNorm3d]
RangeBatchNorm1d: type[LpBatchNorm1d]
RangeBatchNorm2d: type[LpBatchNorm2d]
RangeBatchNorm3d: type[LpBatchNorm3d]
MeanOnlyBatchNorm1d: type[LpBatchNorm1d]
MeanOnlyBatchNorm2d: type[LpBatchNorm2d]
MeanOnlyBatchNorm3d: type[LpBatchNorm3d]
