"""Move models between the stock per-sample norms (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``) and
:class:`~normmatters.nn.LpLayerNorm` / :class:`~normmatters.nn.LpRMSNorm` / :class:`~normmatters.nn.LpGroupNorm`.

Like :mod:`normmatters.convert` for batch norm: the original ``Parameter`` objects are reused (device, dtype,
``requires_grad`` and optimizers stay valid) and each layer keeps its training mode; an affine layer without
bias stays without bias (same state_dict keys). These layers have no running statistics, so only
``norm="l2"`` gives the stock layer's outputs; converting an l1/linf/... model back to stock layers keeps
the weights but the model then normalizes by the standard deviation / RMS.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .convert import _move_state, _replace
from .layer_functional import check_norm
from .nn.layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm

__all__ = ["convert_norms", "to_torch_norms", "NORM_KINDS"]

#: the ``kinds`` convert_norms understands
NORM_KINDS = ("layer", "rms", "group")


def _kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in NORM_KINDS]
    if bad:
        raise ValueError(f"convert_norms: unknown kinds {bad!r}: expected a subset of {NORM_KINDS!r}")
    return frozenset(kinds)


def _like(m: nn.Module) -> dict:
    w = getattr(m, "weight", None)
    return {"device": None if w is None else w.device, "dtype": None if w is None else w.dtype}


def convert_norms(module: nn.Module, norm: str = "l1", kinds: Iterable[str] = NORM_KINDS) -> nn.Module:
    """Replace every ``nn.LayerNorm`` ("layer"), ``nn.RMSNorm`` ("rms") and ``nn.GroupNorm`` ("group") of the
    chosen ``kinds`` in ``module`` (in place; returns the model, or the new layer if ``module`` is one) by the
    Lp layer with estimator ``norm``, keeping eps, affine/bias, parameters, dtype, device and mode."""
    chosen = _kinds(kinds)
    check_norm(norm, None, "convert_norms")

    def convert_one(m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.LayerNorm) and "layer" in chosen:
            new = LpLayerNorm(m.normalized_shape, norm=norm, eps=m.eps, elementwise_affine=m.elementwise_affine,
                              bias=not m.elementwise_affine or m.bias is not None, **_like(m))
        elif isinstance(m, nn.RMSNorm) and "rms" in chosen:
            new = LpRMSNorm(m.normalized_shape, norm=norm, eps=m.eps, elementwise_affine=m.elementwise_affine,
                            **_like(m))
        elif isinstance(m, nn.GroupNorm) and "group" in chosen:
            new = LpGroupNorm(m.num_groups, m.num_channels, norm=norm, eps=m.eps, affine=m.affine, **_like(m))
        else:
            return None
        _move_state(m, new)
        return new

    return _replace(module, convert_one)


def to_torch_norms(module: nn.Module) -> nn.Module:
    """Replace every LpLayerNorm / LpRMSNorm / LpGroupNorm in ``module`` by the stock layer (the l2 estimator)."""

    def convert_one(m: nn.Module) -> nn.Module | None:
        if isinstance(m, LpLayerNorm):
            new = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                               bias=not m.elementwise_affine or m.bias is not None, **_like(m))
        elif isinstance(m, LpRMSNorm):
            new = nn.RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, **_like(m))
        elif isinstance(m, LpGroupNorm):
            new = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine, **_like(m))
        else:
            return None
        _move_state(m, new)
        return new

    return _replace(module, convert_one)
