"""Per-sample Lp normalization layers: drop-in replacements for ``nn.LayerNorm``, ``nn.RMSNorm`` and
``nn.GroupNorm`` (same arguments, parameters, state_dict, ``reset_parameters``, ``extra_repr``) with a
``norm=`` argument choosing the dispersion estimator (see :mod:`normmatters.layer_functional` for the
formulas). ``norm="l2"`` is the stock layer; the others are Gaussian-consistent per sample.

Estimator options as in the batch-norm layers: ``k`` (``norm="topk"``) and ``chunks`` (``norm="range"``: mean
range of that many contiguous chunks of each sample's elements). ``impl`` picks the kernel
(:mod:`normmatters.kernels.row_norm`: "auto", "native", "compiled", "eager", "reference"; None: the environment
variable ``NORMMATTERS_KERNEL``, else "auto").

``eps`` must be a positive finite number (or, for ``LpRMSNorm``, None), checked at construction and on every
assignment (``layer.eps = 0`` raises a ``ValueError`` naming the layer). A layer's ``forward`` is its state and one
call of the public function; the path (:func:`normmatters.kernels.row_norm.decide`, ``impl`` and
``$NORMMATTERS_KERNEL`` resolved) is kept per (device, dtype, training) in the layer's own ``_paths`` cache, so
the environment variable is read once per layer and kind of input. Empty input gives an empty output of its
shape; non-floating input a ``TypeError`` naming the layer.

``precision=`` (None: native; ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or a
:class:`~normmatters.precision.emulate.Precision`): the forward with every intermediate rounded to that format,
the backward straight-through in float32 (:mod:`normmatters.precision.per_sample`)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ..estimators import get_estimator
from ..kernels import resolve_impl
from ..kernels.row_norm import decide
from ..layer_functional import (
    check_norm,
    emulated_lp_group_norm,
    emulated_lp_layer_norm,
    emulated_lp_rms_norm,
    lp_group_norm,
    lp_layer_norm,
    lp_rms_norm,
)
from ..precision.per_sample import check_per_sample_precision

__all__ = ["LpLayerNorm", "LpRMSNorm", "LpGroupNorm"]


def _shape(normalized_shape, where: str) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(normalized_shape)
    if not shape or not all(isinstance(s, numbers.Integral) and s >= 1 for s in shape):
        raise ValueError(f"{where}: normalized_shape must be a positive int or a non-empty tuple of positive "
                         f"ints, got {normalized_shape!r}")
    return tuple(int(s) for s in shape)


def _options(layer: nn.Module, k: int, chunks: int | None, impl: str | None, n: int | None,
             first: int | None) -> None:
    """Validate and keep the estimator options and the kernel choice (errors name the layer)."""
    where = type(layer).__name__
    check_norm(layer.norm, n, where, k, chunks, first)
    if impl is not None:
        resolve_impl(impl, where)
    layer.k, layer.chunks, layer.impl = k, chunks, impl


def _check_eps(eps, where: str, none_ok: bool = False):
    if eps is None and none_ok:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{where}: eps must be a positive finite number{' or None' if none_ok else ''}, "
                         f"got {eps!r}")
    return eps


def _path_option(name: str) -> property:
    """An option the path depends on (``norm``, ``k``, ``impl``): assigning it empties the layer's path cache."""
    attr = "_" + name

    def get(self):
        return self.__dict__[attr]

    def set(self, value) -> None:
        object.__setattr__(self, attr, value)
        object.__setattr__(self, "_paths", {})

    return property(get, set, doc=f"``{name}`` (assigning it re-decides the path on the next call)")


class _RowLayer(nn.Module):
    """What the three layers share: the validated ``eps`` and the per-(device, dtype, training) path cache
    ``_paths`` (emptied when ``norm``, ``k`` or ``impl`` is assigned; device and dtype are part of its key)."""

    _eps_none_ok = False
    norm = _path_option("norm")
    k = _path_option("k")
    impl = _path_option("impl")

    @property
    def eps(self):
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = _check_eps(value, type(self).__name__, self._eps_none_ok)

    def _path(self, input: Tensor) -> str:
        """The path for this input's (device, dtype, training), decided on first sight and kept in ``_paths``."""
        key = (input.device, input.dtype, self.training)
        path = self._paths.get(key)
        if path is None:
            if not input.is_floating_point():
                return "auto"  # the public function refuses it, naming the layer
            impl = resolve_impl(self._impl, type(self).__name__)
            path = self._paths[key] = decide(impl, input.device.type, input.dtype, self._norm, self._k)
        return path

    def __setstate__(self, state) -> None:
        for name in ("eps", "norm", "k", "impl"):  # pickled before these became properties
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)
        self.__dict__.setdefault("_paths", {})


def _options_repr(layer: nn.Module) -> str:
    s = f", k={layer.k}" if "k" in get_estimator(layer.norm).options else ""
    s += f", chunks={layer.chunks}" if layer.chunks is not None else ""
    return s + (f", impl={layer.impl!r}" if layer.impl is not None else "")


def _precision(precision, where: str):
    """``precision=``: None, or a name / Precision the per-sample emulation accepts (a ValueError naming the layer)."""
    if precision is not None:
        check_per_sample_precision(precision, where)
    return precision


def _precision_repr(precision) -> str:
    if precision is None:
        return ""
    return f", precision={precision!r}" if isinstance(precision, str) else f", precision={precision.name!r}"


class LpLayerNorm(_RowLayer):
    """``nn.LayerNorm`` with σ̂ from the estimator ``norm`` (l2 / l1 / linf / topk / range) over the trailing
    ``normalized_shape`` dims: y = weight · (x − μ) / sqrt(σ̂² + eps) + bias."""

    def __init__(self, normalized_shape, norm: str = "l1", eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, k: int = 10, chunks: int | None = None,
                 impl: str | None = None, precision=None) -> None:
        super().__init__()
        self._paths: dict = {}
        self.normalized_shape = _shape(normalized_shape, type(self).__name__)
        self.precision = _precision(precision, type(self).__name__)
        self.norm, self.eps, self.elementwise_affine = norm, eps, elementwise_affine
        _options(self, k, chunks, impl, math.prod(self.normalized_shape), self.normalized_shape[0])
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **kw))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **kw))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if self.precision is not None:
            return emulated_lp_layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, self.norm,
                                          precision=self.precision, k=self.k, chunks=self.chunks,
                                          where=type(self).__name__)
        return lp_layer_norm(input, self.normalized_shape, self.weight, self.bias, self._eps, self._norm,
                             type(self).__name__, self._k, self.chunks, self._paths.get(
                                 (input.device, input.dtype, self.training)) or self._path(input))

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, norm={self.norm!r}{_options_repr(self)}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}" + _precision_repr(self.precision))


class LpRMSNorm(_RowLayer):
    """``nn.RMSNorm`` with the uncentered σ̂ of the estimator ``norm``: y = weight · x / sqrt(σ̂² + eps);
    ``eps=None`` is ``torch.finfo(input.dtype).eps``."""

    _eps_none_ok = True

    def __init__(self, normalized_shape, norm: str = "l1", eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, k: int = 10, chunks: int | None = None,
                 impl: str | None = None, precision=None) -> None:
        super().__init__()
        self._paths: dict = {}
        self.normalized_shape = _shape(normalized_shape, type(self).__name__)
        self.precision = _precision(precision, type(self).__name__)
        self.norm, self.eps, self.elementwise_affine = norm, eps, elementwise_affine
        _options(self, k, chunks, impl, math.prod(self.normalized_shape), self.normalized_shape[0])
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        if self.precision is not None:
            return emulated_lp_rms_norm(input, self.normalized_shape, self.weight, self.eps, self.norm,
                                        precision=self.precision, k=self.k, chunks=self.chunks,
                                        where=type(self).__name__)
        return lp_rms_norm(input, self.normalized_shape, self.weight, self._eps, self._norm, type(self).__name__,
                           self._k, self.chunks, self._paths.get((input.device, input.dtype, self.training))
                           or self._path(input))

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, norm={self.norm!r}{_options_repr(self)}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}" + _precision_repr(self.precision))


class LpGroupNorm(_RowLayer):
    """``nn.GroupNorm`` with σ̂ from the estimator ``norm`` per sample and group of C/G channels. ``bias=False``
    (with ``affine=True``): a weight only, the state_dict of ``nn.GroupNorm(..., bias=False)``."""

    def __init__(self, num_groups: int, num_channels: int, norm: str = "l1", eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, k: int = 10, chunks: int | None = None,
                 impl: str | None = None, precision=None, *, bias: bool = True) -> None:
        super().__init__()
        self._paths: dict = {}
        where = type(self).__name__
        self.precision = _precision(precision, where)
        if not (isinstance(num_groups, numbers.Integral) and isinstance(num_channels, numbers.Integral)
                and num_groups >= 1 and num_channels >= 1 and num_channels % num_groups == 0):
            raise ValueError(f"{where}: num_groups={num_groups!r} must be a positive int dividing "
                             f"num_channels={num_channels!r}")
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        self.norm, self.eps, self.affine = norm, eps, affine
        _options(self, k, chunks, impl, None, None)  # n depends on the spatial size: checked per input
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        where = type(self).__name__
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"{where}: expected input of shape (N, {self.num_channels}, *), "
                             f"got {list(input.shape)}")
        if self.precision is not None:
            return emulated_lp_group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.norm,
                                          precision=self.precision, k=self.k, chunks=self.chunks, where=where)
        return lp_group_norm(input, self.num_groups, self.weight, self.bias, self._eps, self._norm, where, self._k,
                             self.chunks, self._paths.get((input.device, input.dtype, self.training))
                             or self._path(input))

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, norm={self.norm!r}{_options_repr(self)}, eps={self.eps}, "
                f"affine={self.affine}" + ("" if not self.affine or self.bias is not None else ", bias=False")
                + _precision_repr(self.precision))
