"""Move models between ``torch.nn.BatchNorm*`` and the Lp batch-norm family.

``convert_batchnorm`` swaps every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` for the Lp layer of the
same rank (``sync=True``: the synced :class:`~normmatters.nn.SyncLpBatchNorm` layers; ``nn.SyncBatchNorm``
always stays synced); ``convert_sync_lp_batchnorm`` makes every Lp layer synced; ``to_torch_batchnorm`` swaps
back so a model exports with stock layers. All reuse the original ``Parameter`` and buffer objects (as
``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so device, dtype, ``requires_grad`` and any optimizer holding
the parameters stay valid, and keep each layer's training mode.
An affine layer without bias (``bias=False``, torch ≥ 2.10) stays without bias both ways: same state_dict keys.
Eval outputs are identical both ways for every norm that divides (eval uses ``running_var`` exactly like
``nn.BatchNorm``); mean-only layers become ``nn.BatchNorm`` with ``running_var = 1 − eps``, equal up to
rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .estimators import get_estimator
from .nn.batchnorm import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from .nn.sync import SyncLpBatchNorm, SyncLpBatchNorm1d, SyncLpBatchNorm2d, SyncLpBatchNorm3d

__all__ = ["convert_batchnorm", "convert_sync_lp_batchnorm", "to_torch_batchnorm"]

_TO_LP: dict[type, type[LpBatchNorm]] = {
    nn.BatchNorm1d: LpBatchNorm1d,
    nn.BatchNorm2d: LpBatchNorm2d,
    nn.BatchNorm3d: LpBatchNorm3d,
    nn.SyncBatchNorm: LpBatchNorm,
}
#: the synced layer of each rank (the rank-agnostic one for nn.SyncBatchNorm and LpBatchNorm)
_TO_SYNC: dict[type, type[SyncLpBatchNorm]] = {
    nn.BatchNorm1d: SyncLpBatchNorm1d, nn.BatchNorm2d: SyncLpBatchNorm2d, nn.BatchNorm3d: SyncLpBatchNorm3d,
    nn.SyncBatchNorm: SyncLpBatchNorm,
    LpBatchNorm1d: SyncLpBatchNorm1d, LpBatchNorm2d: SyncLpBatchNorm2d, LpBatchNorm3d: SyncLpBatchNorm3d,
    LpBatchNorm: SyncLpBatchNorm,
}
#: the options an Lp layer carries over to its synced twin (besides num_features and the torch arguments)
_LP_OPTIONS = ("norm", "k", "chunks", "ghost_batch_size", "nonfinite", "impl", "precision", "inplace")
_TO_TORCH: dict[type, type[_BatchNorm]] = {
    SyncLpBatchNorm: nn.SyncBatchNorm,
    LpBatchNorm1d: nn.BatchNorm1d,
    LpBatchNorm2d: nn.BatchNorm2d,
    LpBatchNorm3d: nn.BatchNorm3d,
    LpBatchNorm: nn.SyncBatchNorm,
}


def _lp_class_for(bn: nn.Module, sync: bool = False) -> type[LpBatchNorm] | None:
    for torch_cls, lp_cls in _TO_LP.items():
        if isinstance(bn, torch_cls):
            return _TO_SYNC[torch_cls] if sync or torch_cls is nn.SyncBatchNorm else lp_cls
    return None


def _sync_class_for(lp: LpBatchNorm) -> type[SyncLpBatchNorm]:
    for cls in type(lp).__mro__:
        if cls in _TO_SYNC:
            return _TO_SYNC[cls]
    raise TypeError(f"no synced layer for {type(lp).__name__}")  # unreachable for LpBatchNorm


def _torch_class_for(lp: LpBatchNorm) -> type[_BatchNorm]:
    for lp_cls in type(lp).__mro__:
        if lp_cls in _TO_TORCH:
            return _TO_TORCH[lp_cls]
    raise TypeError(f"no torch batch norm for {type(lp).__name__}")  # unreachable for LpBatchNorm


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Reuse src's parameters and buffers in dst, and its training mode."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(src, name, None) is not None:
                setattr(dst, name, getattr(src, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(src, name, None) is not None:
                dst.register_buffer(name, getattr(src, name))
    dst.train(src.training)


def _replace(module: nn.Module, convert_one) -> nn.Module:
    new = convert_one(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _replace(child, convert_one)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def convert_batchnorm(module: nn.Module, norm: str = "l1", sync: bool = False, process_group: Any = None,
                      **options: Any) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by an Lp layer.

    Args:
        module: any model (converted in place; the returned object is the model, or the new layer if
            ``module`` itself is a batch norm).
        norm: estimator name for the new layers.
        sync: make every new layer a :class:`~normmatters.nn.SyncLpBatchNorm` (statistics of every rank's batch
            together, ``process_group`` None: the default group).
        **options: further :class:`~normmatters.nn.LpBatchNorm` arguments (``k``, ``chunks``,
            ``ghost_batch_size``, ``nonfinite``); ``eps``, ``momentum``, ``affine``, ``bias`` and
            ``track_running_stats`` are taken from each original layer unless given here.

    ``nn.SyncBatchNorm`` stays synced: it becomes the rank-agnostic :class:`~normmatters.nn.SyncLpBatchNorm`
    with its own ``process_group`` (unless ``process_group`` is given).
    """
    get_estimator(norm)

    def convert_one(m: nn.Module) -> nn.Module | None:
        cls = _lp_class_for(m, sync)
        if cls is None:
            return None
        if issubclass(cls, SyncLpBatchNorm):
            group = process_group if process_group is not None else getattr(m, "process_group", None)
            extra = {"process_group": group}
        else:
            extra = {}
        ref = m.weight if m.weight is not None else m.running_mean
        kwargs = {"eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                  "track_running_stats": m.track_running_stats, "bias": not m.affine or m.bias is not None,
                  **options}
        new = cls(m.num_features, norm=norm, **kwargs, **extra,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        _move_state(m, new)
        return new

    return _replace(module, convert_one)


def convert_sync_lp_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every (unsynced) Lp batch-norm layer in ``module`` by its :class:`~normmatters.nn.SyncLpBatchNorm`
    twin of the same rank, norm and options, reusing its parameters and buffers — the Lp counterpart of
    ``nn.SyncBatchNorm.convert_sync_batchnorm``. ``process_group``: the ranks whose batches are normalized
    together (None: the default group). Returns the model (converted in place) or the new layer."""

    def convert_one(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, LpBatchNorm) or isinstance(m, SyncLpBatchNorm):
            return None
        ref = m.weight if m.weight is not None else m.running_mean
        new = _sync_class_for(m)(
            m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
            track_running_stats=m.track_running_stats, bias=not m.affine or m.bias is not None,
            **{name: getattr(m, name) for name in _LP_OPTIONS}, process_group=process_group,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        _move_state(m, new)
        return new

    return _replace(module, convert_one)


def to_torch_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every Lp batch-norm layer in ``module`` by the stock ``nn.BatchNorm`` of the same rank.

    Eval outputs are preserved (running statistics carry over unchanged). Ghost batches, chunks and the
    dispersion measure are training-time choices that ``nn.BatchNorm`` does not have; after conversion the
    model trains as ordinary L2 batch norm. ``LpBatchNorm`` and ``SyncLpBatchNorm`` (any rank) become
    ``nn.SyncBatchNorm`` (the synced ones with their ``process_group``).
    """

    def convert_one(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, LpBatchNorm):
            return None
        cls = _torch_class_for(m)
        ref = m.weight if m.weight is not None else m.running_mean
        new = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, bias=not m.affine or m.bias is not None,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
                  **({"process_group": m.process_group} if isinstance(m, SyncLpBatchNorm) else {}))
        _move_state(m, new)
        if not get_estimator(m.norm).divides and new.running_var is not None:
            # mean-only never divides; 1 − eps makes sqrt(running_var + eps) = 1 in nn.BatchNorm's eval
            new.running_var = torch.full_like(new.running_var, 1.0 - m.eps)
        return new

    return _replace(module, convert_one)
