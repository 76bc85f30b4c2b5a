"""Move models between the per-sample norms — the stock ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
``nn.InstanceNorm1d/2d/3d`` and the model-zoo classes with a conversion adapter (:mod:`normmatters.adapters`:
channels-first ``LayerNorm2d``, timm's norm+activation layers, the RMS norms of Hugging Face transformers) — and
:class:`~normmatters.nn.LpLayerNorm` / :class:`~normmatters.nn.LpRMSNorm` / :class:`~normmatters.nn.LpGroupNorm` /
:class:`~normmatters.nn.LpInstanceNorm2d` and the adapted layers of :mod:`normmatters.nn.adapted`.

Like :mod:`normmatters.convert` for batch norm: the stock classes are matched exactly (a subclass is not the stock
layer: it needs an adapter, else it is left as it is with a warning), every replacement is verified first (its
``norm="l2"`` counterpart reproduces the module on a probe input), the original ``Parameter`` objects are reused
(device, dtype, ``requires_grad`` and optimizers stay valid) and each layer keeps its training mode; an affine layer
without bias stays without bias (same state_dict keys). These layers have no running statistics (instance norm
aside), so only ``norm="l2"`` gives the stock layer's outputs; converting an l1/linf/... model back keeps the
weights but the model then normalizes by the standard deviation / RMS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .adapters import ConversionReport, convert_modules, move_state, replace_modules, restore_original
from .convert import _check_module
from .layer_functional import check_norm
from .nn.instancenorm import LpInstanceNorm
from .nn.layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm

__all__ = ["convert_norms", "to_torch_norms", "NORM_KINDS"]

#: the ``kinds`` convert_norms understands
NORM_KINDS = ("layer", "rms", "group", "instance")


def _kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in NORM_KINDS]
    if bad:
        raise ValueError(f"convert_norms: unknown kinds {bad!r}: expected a subset of {NORM_KINDS!r}")
    return frozenset(kinds)


def _like(m: nn.Module) -> dict:
    w = getattr(m, "weight", None)
    if w is None:
        w = getattr(m, "running_mean", None)
    return {"device": None if w is None else w.device, "dtype": None if w is None else w.dtype}


def convert_norms(module: nn.Module, norm: str = "l1", kinds: Iterable[str] = NORM_KINDS, *, strict: bool = False,
                  report: bool = False, **options: Any):
    """Replace every per-sample norm of the chosen ``kinds`` in ``module`` — ``nn.LayerNorm`` ("layer"),
    ``nn.RMSNorm`` ("rms"), ``nn.GroupNorm`` ("group"), ``nn.InstanceNorm1d/2d/3d`` ("instance"), exactly those
    classes, and the classes with a conversion adapter of those kinds — by a verified Lp layer with estimator
    ``norm``, keeping eps, affine/bias, parameters, dtype, device and mode (in place; returns the model, or the new
    layer if ``module`` is one).

    Args:
        strict: raise (``TypeError``: a subclass of a stock norm without an adapter; ``ValueError``: a failed
            verification) instead of leaving the module as it is with a warning.
        report: also return the :class:`~normmatters.adapters.ConversionReport`: ``(model, report)``.
        **options: estimator options of the new layers (``k``, ``chunks``, ``impl``).
    """
    _check_module(module, "convert_norms")
    chosen = _kinds(kinds)
    check_norm(norm, None, "convert_norms")
    out, rep = convert_modules(module, norm, chosen, dict(options), strict, "convert_norms")
    return (out, rep) if report else out


def to_torch_norms(module: nn.Module, *, report: bool = False):
    """Replace every Lp layer / RMS / group / instance norm in ``module`` by the stock layer (the l2 estimator); a
    layer that an adapter converted goes back to its original class (e.g. ``LlamaRMSNorm``, timm's
    ``LayerNorm2d``). An adapted layer built directly (no original) with no stock counterpart (channels-first,
    norm + activation, Hugging Face forms) is left as it is and reported. ``report=True``: ``(model, report)``."""
    _check_module(module, "to_torch_norms")
    rep = ConversionReport()

    def convert_one(m: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(m, (LpLayerNorm, LpRMSNorm, LpGroupNorm, LpInstanceNorm)):
            return None
        new = restore_original(m)
        if new is None:
            new = _stock(m)
            if new is None:
                rep.skipped.append((name, type(m).__name__, "no stock counterpart"))
                return m
        rep.converted.append((name, type(m).__name__, type(new).__name__))
        return new

    out = replace_modules(module, convert_one)
    return (out, rep) if report else out


def _stock(m: nn.Module) -> nn.Module | None:
    cls = type(m)
    if cls is LpLayerNorm:
        new = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                           bias=not m.elementwise_affine or m.bias is not None, **_like(m))
    elif cls is LpRMSNorm:
        new = nn.RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, **_like(m))
    elif cls is LpGroupNorm:
        new = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine,
                           bias=not m.affine or getattr(m, "bias", None) is not None, **_like(m))
    elif isinstance(m, LpInstanceNorm) and cls.__module__ == LpInstanceNorm.__module__:
        stock = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[m._dims[1] - 2]
        new = stock(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                    track_running_stats=m.track_running_stats, bias=not m.affine or m.bias is not None, **_like(m))
    else:
        return None
    return move_state(m, new)
