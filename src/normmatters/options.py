"""``NormOptions``: every option of an Lp batch-norm call in one frozen, validated object.

The layers (:class:`normmatters.nn.LpBatchNorm`), the functional paths
(:func:`normmatters.functional.lp_batch_norm`, :func:`normmatters.kernels.lean_batch_norm`,
:func:`normmatters.precision.layer.emulated_lp_batch_norm`) and the one dispatch
(:mod:`normmatters.kernels.dispatch`) carry one of these instead of long parameter lists:

========================  =========  ==================================================================
field                     default    meaning
========================  =========  ==================================================================
``norm``                  ``"l1"``   the dispersion estimator σ̂ (:mod:`normmatters.estimators`)
``k``                     ``10``     top-k: how many of the largest |x − μ| are averaged
``chunks``                ``None``   range: mean range of this many equal chunks of the batch
``ghost_batch_size``      ``None``   normalize each group of this many samples with its own statistics
``eps``                   ``1e-5``   y = weight · (x − μ) / sqrt(σ̂² + eps) + bias (> 0 to train, ≥ 0 in eval)
``momentum``              ``0.1``    running ← running + momentum · (batch − running); None: cumulative
``nonfinite``             ``"skip"``  NaN/Inf statistics: "skip" (on the device, counted), "ignore", "raise" (syncs)
``impl``                  ``None``   kernel: None ($NORMMATTERS_KERNEL, else "auto") or one of :data:`IMPLS`
``inplace``               ``False``  In-Place ABN: the training output overwrites the input
``precision``             ``None``   emulated low-precision forward (a preset name or a ``Precision``)
========================  =========  ==================================================================

Every rule lives in :func:`check_option` (used on construction and by the layers on every attribute
assignment, so ``layer.momentum = 5`` raises naming the layer). One value is not checked here: the *name* of a
``precision`` preset, whose vocabulary lives in :mod:`normmatters.precision` (above this module in the import
layers); the layers check it on assignment and the emulated path resolves it, both naming the layer.

Beside the options a call carries its tensors (:class:`BatchNormTensors`) and this step's momentum
(:func:`call_momentum`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .estimators import get_estimator, norms_with_option

__all__ = ["NormOptions", "check_option", "OPTION_NAMES", "NONFINITE_MODES", "IMPLS", "BatchNormTensors",
           "call_momentum"]

#: values of ``nonfinite``
NONFINITE_MODES = ("raise", "skip", "ignore")
#: values of ``impl`` (None: $NORMMATTERS_KERNEL, read only by :mod:`normmatters.kernels.dispatch`)
IMPLS = ("auto", "native", "compiled", "eager", "triton", "reference")


def _check_positive_int(where: str, name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


_INPLACE_PRECISION = ("inplace=True is not supported with precision= emulation (the emulated forward keeps its "
                      "own intermediates); use one or the other")


def check_option(name: str, value: Any, where: str, others: Mapping[str, Any]) -> None:
    """Validate option ``name`` = ``value`` against the ``others`` already set (a mapping of option names; a
    missing one is not yet set). ``ValueError`` naming ``where`` (the layer's class, or "NormOptions")."""
    if name == "norm":
        try:
            est = get_estimator(value)  # unknown names fail here
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if others.get("chunks") is not None and "chunks" not in est.options:
            raise ValueError(f"{where}: chunks is an option of norm={norms_with_option('chunks')} only, "
                             f"got norm={value!r} with chunks={others['chunks']} (set chunks=None first)")
    elif name == "k":
        _check_positive_int(where, "k", value, allow_none=False)
    elif name == "chunks":
        _check_positive_int(where, "chunks", value, allow_none=True)
        if value is not None and "norm" in others and "chunks" not in get_estimator(others["norm"]).options:
            raise ValueError(f"{where}: chunks is an option of norm={norms_with_option('chunks')} only, "
                             f"got norm={others['norm']!r}")
    elif name == "ghost_batch_size":
        _check_positive_int(where, "ghost_batch_size", value, allow_none=True)
    elif name == "nonfinite":
        if value not in NONFINITE_MODES:
            raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_MODES}, got {value!r}")
    elif name == "momentum":  # (a 0-dim tensor is read afresh every step; its value is not checked)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{where}: momentum must be a number in [0, 1], None or a 1-element tensor, "
                                 f"got a tensor of shape {tuple(value.shape)}")
        elif value is not None and not (_is_real(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{where}: momentum must be in [0, 1] or None, got {value!r}")
    elif name == "eps":
        if not _is_real(value):  # the sign is checked where torch checks it: eps > 0 in training, >= 0 in eval
            raise ValueError(f"{where}: eps must be a real number (> 0 to train), got {value!r}")
    elif name == "impl":
        if value is not None and value not in IMPLS:
            raise ValueError(f"{where}: impl must be one of {IMPLS}, got {value!r}")
    elif name == "precision":
        if value is not None:
            if isinstance(value, (bool, int, float, Tensor)):  # a preset name or a Precision (checked above)
                raise ValueError(f"{where}: precision must be None, a Precision or a preset name, got {value!r}")
            if others.get("inplace"):
                raise ValueError(f"{where}: {_INPLACE_PRECISION}")
    elif name == "inplace":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: inplace must be a bool, got {value!r}")
        if value and others.get("precision") is not None:
            raise ValueError(f"{where}: {_INPLACE_PRECISION}")
    else:
        raise ValueError(f"{where}: unknown option {name!r} (options: {', '.join(OPTION_NAMES)})")


@dataclass(frozen=True)
class NormOptions:
    """Every option of an Lp batch-norm call (see the module docstring for each field), validated once on
    construction. Frozen: derive a changed copy with :meth:`replace`.

    >>> NormOptions(norm="range", chunks=4).replace(momentum=None).momentum is None
    True
    """

    norm: str = "l1"
    k: int = 10
    chunks: int | None = None
    ghost_batch_size: int | None = None
    eps: float = 1e-5
    momentum: float | Tensor | None = 0.1
    nonfinite: str = "skip"
    impl: str | None = None
    inplace: bool = False
    precision: Any = None

    def __post_init__(self) -> None:
        self.validate("NormOptions")

    def validate(self, where: str) -> None:
        """Check every field (:func:`check_option`); errors name ``where``."""
        values = self.as_dict()
        for name in OPTION_NAMES:
            check_option(name, values[name], where, values)

    def as_dict(self) -> dict[str, Any]:
        """{field: value} (shallow: a tensor momentum is the same tensor)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def replace(self, **changes: Any) -> NormOptions:
        """A copy with ``changes`` (validated as a whole)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def trusted(cls, values: Mapping[str, Any]) -> NormOptions:
        """An instance of already-validated ``values`` (every field), without checking them again: a layer's
        current options, each checked when it was assigned (:func:`check_option`)."""
        self = object.__new__(cls)
        for name in OPTION_NAMES:
            object.__setattr__(self, name, values[name])
        return self

    @classmethod
    def resolve(cls, options: NormOptions | None, where: str, defaults: Mapping[str, Any] | None = None,
                **given: Any) -> NormOptions:
        """The options of a functional call: ``options`` if given (an explicit argument that differs from both
        its default and ``options``' value is a ``ValueError``: two answers to one question), else the
        ``given`` arguments (validated). ``defaults`` maps a field to its default where it is not the field's
        default here."""
        if options is None:
            try:
                return cls(**given)
            except ValueError as exc:
                raise ValueError(str(exc).replace("NormOptions:", f"{where}:", 1)) from None
        if not isinstance(options, NormOptions):
            raise TypeError(f"{where}: options must be a NormOptions, got {type(options).__name__}")
        for name, value in given.items():
            default = (defaults or {}).get(name, _DEFAULTS[name])
            if value is not default and not _same(value, default) and not _same(value, getattr(options, name)):
                raise ValueError(f"{where}: {name}={value!r} disagrees with options.{name}="
                                 f"{getattr(options, name)!r}; pass it in one place")
        return options


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return type(a) is type(b) and a == b or (_is_real(a) and _is_real(b) and a == b)


#: the fields of :class:`NormOptions`, in order
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(NormOptions))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NormOptions)}


class BatchNormTensors(NamedTuple):
    """The tensors of one batch-norm call, each possibly None: (C,) weight and bias, the (C,) running buffers a
    training step updates (or eval reads) and the 0-dim ``num_batches_tracked``."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def call_momentum(momentum: float | Tensor | None, num_batches_tracked: Tensor | None, where: str = "",
                  updates: bool = False) -> float | Tensor:
    """The mixing factor of one step for the option ``momentum``: itself, or for None (cumulative moving average,
    as ``nn.BatchNorm``) 1/(num_batches_tracked + 1), the weight of this batch among those tracked after it
    (0.0 without ``num_batches_tracked``: nothing is tracked; a ``ValueError`` naming ``where`` if the call
    ``updates`` running buffers, which would then silently stay as they are)."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        if updates:
            raise ValueError(f"{where}: momentum=None (the cumulative average) needs num_batches_tracked")
        return 0.0
    return 1.0 / (num_batches_tracked + 1).to(torch.float32)
