"""Move models between ``torch.nn.BatchNorm*`` and the Lp batch-norm family.

``convert_batchnorm`` swaps every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` (exactly those classes: a
subclass is not the stock layer) and every batch-norm class with a conversion adapter (:mod:`normmatters.adapters`:
timm's ``BatchNormAct2d`` keeps its activation) for the Lp layer of the same rank (``sync=True``: the synced
:class:`~normmatters.nn.SyncLpBatchNorm` layers; ``nn.SyncBatchNorm`` always stays synced); each replacement is
verified first (its ``norm="l2"`` counterpart reproduces the module on a probe input, in training and eval mode),
and a module that fails, or a subclass without an adapter, is left as it was (a warning; ``strict=True`` raises;
``report=True`` also returns a :class:`~normmatters.adapters.ConversionReport`). ``convert_sync_lp_batchnorm``
makes every Lp layer synced; ``to_torch_batchnorm`` swaps back so a model exports with stock layers
(``sync=False``: plain ``nn.BatchNorm*d`` for the synced ones too). All reuse the original ``Parameter`` and buffer
objects (as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so device, dtype, ``requires_grad`` and any
optimizer holding the parameters stay valid, and keep each layer's training mode.
An affine layer without bias (``bias=False``, torch ≥ 2.10) stays without bias both ways: same state_dict keys.
Eval outputs are identical both ways for every norm that divides (eval uses ``running_var`` exactly like
``nn.BatchNorm``); mean-only layers become ``nn.BatchNorm`` with ``running_var = 1 − eps``, equal up to
rounding.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .adapters import ConversionReport, convert_modules, move_state, replace_modules, restore_original
from .estimators import get_estimator
from .nn.batchnorm import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from .nn.sync import SyncLpBatchNorm, SyncLpBatchNorm1d, SyncLpBatchNorm2d, SyncLpBatchNorm3d

__all__ = ["convert_batchnorm", "convert_sync_lp_batchnorm", "to_torch_batchnorm"]

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


def _check_module(module: Any, where: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be an nn.Module, got {type(module).__name__}")


def _replace(module: nn.Module, convert_one) -> nn.Module:
    return replace_modules(module, lambda m, name: convert_one(m))


def convert_batchnorm(module: nn.Module, norm: str = "l1", sync: bool = False, process_group: Any = None, *,
                      strict: bool = False, report: bool = False, **options: Any):
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` (exactly those classes) and every
    batch-norm class with a conversion adapter by a verified Lp layer.

    Args:
        module: any model (converted in place; the returned object is the model, or the new layer if
            ``module`` itself is a batch norm).
        norm: estimator name for the new layers.
        sync: make every new layer a :class:`~normmatters.nn.SyncLpBatchNorm` (statistics of every rank's batch
            together, ``process_group`` None: the default group).
        strict: raise (``TypeError``: a subclass of a stock batch norm without an adapter; ``ValueError``: a
            failed verification) instead of leaving the module as it is with a warning.
        report: also return the :class:`~normmatters.adapters.ConversionReport`: ``(model, report)``.
        **options: further :class:`~normmatters.nn.LpBatchNorm` arguments (``k``, ``chunks``,
            ``ghost_batch_size``, ``nonfinite``); ``eps``, ``momentum``, ``affine``, ``bias`` and
            ``track_running_stats`` are taken from each original layer unless given here.

    ``nn.SyncBatchNorm`` stays synced: it becomes the rank-agnostic :class:`~normmatters.nn.SyncLpBatchNorm`
    with its own ``process_group`` (unless ``process_group`` is given). Each replacement is verified first: its
    ``norm="l2"`` counterpart must reproduce the module on a probe input (see :mod:`normmatters.adapters`).
    """
    _check_module(module, "convert_batchnorm")
    get_estimator(norm)
    out, rep = convert_modules(module, norm, frozenset({"batch"}),
                               {"sync": sync, "process_group": process_group, **options}, strict, "convert_batchnorm")
    return (out, rep) if report else out


def convert_sync_lp_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every (unsynced) Lp batch-norm layer in ``module`` by its :class:`~normmatters.nn.SyncLpBatchNorm`
    twin of the same rank, norm and options, reusing its parameters and buffers — the Lp counterpart of
    ``nn.SyncBatchNorm.convert_sync_batchnorm``. ``process_group``: the ranks whose batches are normalized
    together (None: the default group). Returns the model (converted in place) or the new layer."""
    _check_module(module, "convert_sync_lp_batchnorm")

    def convert_one(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, LpBatchNorm) or isinstance(m, SyncLpBatchNorm):
            return None
        ref = m.weight if m.weight is not None else m.running_mean
        new = _sync_class_for(m)(
            m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
            track_running_stats=m.track_running_stats, bias=not m.affine or m.bias is not None,
            **{name: getattr(m, name) for name in _LP_OPTIONS}, process_group=process_group,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        move_state(m, new)
        return new

    return _replace(module, convert_one)


def _input_ranks(module: nn.Module, example_input: Any) -> dict[nn.Module, int]:
    """The input rank of every rank-agnostic Lp batch norm, from one forward of ``example_input`` (no gradients)."""
    ranks: dict[nn.Module, int] = {}
    targets = [m for m in module.modules() if type(m) in (LpBatchNorm, SyncLpBatchNorm)]

    def hook(m: nn.Module, args: tuple) -> None:
        ranks.setdefault(m, args[0].dim())

    handles = [m.register_forward_pre_hook(hook) for m in targets]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, dict):
                module(**example_input)
            elif isinstance(example_input, (tuple, list)):
                module(*example_input)
            else:
                module(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return ranks


_PLAIN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def to_torch_batchnorm(module: nn.Module, sync: bool = True, example_input: Any = None, *,
                       report: bool = False):
    """Replace every Lp batch-norm layer in ``module`` by the stock ``nn.BatchNorm`` of the same rank (a layer an
    adapter converted goes back to its original class, e.g. timm's ``BatchNormAct2d``).

    Eval outputs are preserved (running statistics carry over unchanged). Ghost batches, chunks and the
    dispersion measure are training-time choices that ``nn.BatchNorm`` does not have; after conversion the
    model trains as ordinary L2 batch norm.

    Args:
        sync: True (default): synced layers (and the rank-agnostic ``LpBatchNorm``) become ``nn.SyncBatchNorm``
            (with their ``process_group``). False: plain ``nn.BatchNorm1d/2d/3d`` for the synced layers of a known
            rank — ``nn.SyncBatchNorm`` refuses CPU tensors under a process group and does not export; a
            rank-agnostic layer needs ``example_input`` (a model input as :func:`normmatters.calibrate_norms`
            takes it) to find its rank, else it becomes ``nn.SyncBatchNorm`` with a warning.
        report: also return a :class:`~normmatters.adapters.ConversionReport`: ``(model, report)``.
    """
    _check_module(module, "to_torch_batchnorm")
    ranks = _input_ranks(module, example_input) if not sync and example_input is not None else {}
    rep = ConversionReport()

    def convert_one(m: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(m, LpBatchNorm):
            return None
        back = restore_original(m)
        if back is not None:
            rep.converted.append((name, type(m).__name__, type(back).__name__))
            return back
        if m._modules:  # e.g. LpBatchNormAct2d built directly: its activation has no place in nn.BatchNorm
            rep.skipped.append((name, type(m).__name__, "no stock counterpart (child modules)"))
            return m
        cls = _torch_class_for(m)
        if not sync and cls is nn.SyncBatchNorm:
            rank = m._expected_dim[-1] if m._expected_dim else ranks.get(m)
            if rank is None:
                warnings.warn(f"to_torch_batchnorm(sync=False): {name} ({type(m).__name__}) has no fixed rank and "
                              "example_input did not reach it: it becomes nn.SyncBatchNorm", stacklevel=3)
                rep.skipped.append((name, type(m).__name__, "rank unknown: nn.SyncBatchNorm"))
            else:
                cls = _PLAIN_BY_RANK[rank]
        ref = m.weight if m.weight is not None else m.running_mean
        new = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats, bias=not m.affine or m.bias is not None,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
                  **({"process_group": m.process_group}
                     if cls is nn.SyncBatchNorm and isinstance(m, SyncLpBatchNorm) else {}))
        move_state(m, new)
        if not get_estimator(m.norm).divides and new.running_var is not None:
            # mean-only never divides; 1 − eps makes sqrt(running_var + eps) = 1 in nn.BatchNorm's eval
            new.running_var = torch.full_like(new.running_var, 1.0 - m.eps)
        rep.converted.append((name, type(m).__name__, cls.__name__))
        return new

    out = replace_modules(module, convert_one)
    return (out, rep) if report else out
