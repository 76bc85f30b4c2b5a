"""Conversion adapters: the public names of the registry (:mod:`.adapter_registry`: :class:`Adapter`,
:func:`register_adapter`, :func:`find_adapter`, the verified conversion engine — matching and verification are
described there) and the built-in adapters, registered when this module is imported.

Built in, by exact type: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.GroupNorm``, ``nn.InstanceNorm1d/2d/3d``. By module and class name (so timm, torchvision and transformers are
never imported here): channels-first ``LayerNorm2d`` (timm, torchvision's ConvNeXt) → :class:`~.nn.adapted.
LpLayerNorm2d`; timm's norm + activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct``,
``LayerNormAct2d``) → the ``Lp*Act`` layers, keeping ``drop`` and ``act``; the transformers RMS norms (Llama,
Mistral, Qwen2/3, Phi-3 and every ``*RMSNorm`` that verifies; Gemma/Gemma 2 with ``1 + weight``; T5) →
:class:`~.nn.adapted.LpHFRMSNorm` with the family's numerics.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .adapter_registry import (
    _BUILTIN_EXACT,
    _BUILTIN_PATTERNS,
    _STRUCTURAL,
    ADAPTER_KINDS,
    Adapter,
    ConversionReport,
    convert_modules,
    find_adapter,
    move_state,
    register_adapter,
    replace_modules,
    restore_original,
    unregister_adapter,
)
from .nn.adapted import (
    LpBatchNormAct2d,
    LpGroupNormAct,
    LpHFRMSNorm,
    LpLayerNorm2d,
    LpLayerNormAct,
    LpLayerNormAct2d,
)
from .nn.batchnorm import LpBatchNorm, LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from .nn.instancenorm import LpInstanceNorm1d, LpInstanceNorm2d, LpInstanceNorm3d
from .nn.layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm
from .nn.sync import SyncLpBatchNorm, SyncLpBatchNorm1d, SyncLpBatchNorm2d, SyncLpBatchNorm3d

__all__ = ["Adapter", "register_adapter", "unregister_adapter", "find_adapter", "ConversionReport", "ADAPTER_KINDS",
           "convert_modules", "replace_modules", "restore_original", "move_state", "batch_norm_to_lp"]


# --- built-in adapters ------------------------------------------------------------------------------------------

_BN_OPTIONS = ("eps", "momentum", "affine", "track_running_stats")
_LP_TO_SYNC = {LpBatchNorm1d: SyncLpBatchNorm1d, LpBatchNorm2d: SyncLpBatchNorm2d, LpBatchNorm3d: SyncLpBatchNorm3d,
               LpBatchNorm: SyncLpBatchNorm}


def _factory(m: nn.Module) -> dict:
    ref = getattr(m, "weight", None)
    if ref is None:
        ref = getattr(m, "running_mean", None)
    return {"device": None if ref is None else ref.device, "dtype": None if ref is None else ref.dtype}


def batch_norm_to_lp(lp_cls: type[LpBatchNorm], children: tuple[str, ...] = (), **fixed: Any):
    """An ``Adapter.to_lp`` for batch-norm-like modules (num_features, eps, momentum, affine, track_running_stats,
    weight, bias, running statistics): ``lp_cls``, or its synced twin when the options say ``sync=True`` (or the
    module is an ``nn.SyncBatchNorm``); ``children`` are moved over (e.g. ``("drop", "act")``)."""

    def to_lp(m: nn.Module, norm: str, options: dict) -> nn.Module:
        opts = dict(options)
        sync, group = opts.pop("sync", False), opts.pop("process_group", None)
        cls = lp_cls
        if sync or isinstance(m, nn.SyncBatchNorm):
            cls = _LP_TO_SYNC.get(lp_cls, lp_cls)
        extra = {}
        if issubclass(cls, SyncLpBatchNorm):
            extra["process_group"] = group if group is not None else getattr(m, "process_group", None)
        kwargs = {name: getattr(m, name) for name in _BN_OPTIONS}
        kwargs["bias"] = not m.affine or m.bias is not None
        kwargs.update(opts)
        new = cls(m.num_features, norm=norm, **kwargs, **extra, **fixed, **_factory(m),
                  **({"act": None, "drop": None} if children else {}))
        return move_state(m, new, children)

    return to_lp


def _layer_to_lp(lp_cls: type[LpLayerNorm], children: tuple[str, ...] = ()):
    def to_lp(m: nn.Module, norm: str, options: dict) -> nn.Module:
        opts = {k: v for k, v in options.items() if k not in _STRUCTURAL}
        new = lp_cls(m.normalized_shape, norm=norm, eps=m.eps, elementwise_affine=m.elementwise_affine,
                     bias=not m.elementwise_affine or m.bias is not None, **opts, **_factory(m))
        return move_state(m, new, children)

    return to_lp


def _rms_to_lp(m: nn.Module, norm: str, options: dict) -> nn.Module:
    opts = {k: v for k, v in options.items() if k not in _STRUCTURAL}
    new = LpRMSNorm(m.normalized_shape, norm=norm, eps=m.eps, elementwise_affine=m.elementwise_affine, **opts,
                    **_factory(m))
    return move_state(m, new)


def _group_to_lp(lp_cls: type[LpGroupNorm], children: tuple[str, ...] = ()):
    def to_lp(m: nn.Module, norm: str, options: dict) -> nn.Module:
        opts = {k: v for k, v in options.items() if k not in _STRUCTURAL}
        if m.affine and m.bias is None:
            if "bias" not in inspect.signature(lp_cls).parameters:
                raise ValueError(f"{lp_cls.__name__} takes no bias=: an affine group norm without bias has no Lp "
                                 "counterpart yet")
            opts["bias"] = False
        new = lp_cls(m.num_groups, m.num_channels, norm=norm, eps=m.eps, affine=m.affine, **opts, **_factory(m))
        return move_state(m, new, children)

    return to_lp


def _instance_to_lp(lp_cls):
    def to_lp(m: nn.Module, norm: str, options: dict) -> nn.Module:
        opts = {k: v for k, v in options.items() if k not in _STRUCTURAL}
        new = lp_cls(m.num_features, norm=norm, eps=m.eps, momentum=m.momentum, affine=m.affine,
                     track_running_stats=m.track_running_stats, bias=not m.affine or m.bias is not None, **opts,
                     **_factory(m))
        return move_state(m, new)

    return to_lp


def _hf_rms_to_lp(cast: str):
    def to_lp(m: nn.Module, norm: str, options: dict) -> nn.Module:
        opts = {k: v for k, v in options.items() if k not in _STRUCTURAL}
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        w = getattr(m, "weight", None)
        if eps is None or not isinstance(w, nn.Parameter) or w.dim() != 1:
            raise ValueError("expected a 1-d weight and an eps (variance_epsilon) attribute")
        new = LpHFRMSNorm(w.shape[0], norm=norm, eps=float(eps), cast=cast, **opts, **_factory(m))
        return move_state(m, new)

    return to_lp


def _shape_bn(rank: int | None):
    def probe(m: nn.Module) -> tuple[int, ...]:
        return (4, m.num_features) + (3,) * ((rank or 3) - 2)

    return probe


def _probe_last(m: nn.Module) -> tuple[int, ...]:
    return (3, *m.normalized_shape)


def _probe_channels_first(m: nn.Module) -> tuple[int, ...]:
    return (2, m.normalized_shape[0], 3, 4)


def _probe_group(m: nn.Module) -> tuple[int, ...]:
    return (2, m.num_channels, 3, 3)


def _probe_instance(rank: int):
    def probe(m: nn.Module) -> tuple[int, ...]:
        return (2, m.num_features) + (3,) * (rank - 2)

    return probe


def _probe_hf(m: nn.Module) -> tuple[int, ...]:
    return (2, 3, m.weight.shape[0])


def _no_running_stats(m: nn.Module) -> bool:
    return False


def _register_builtins() -> None:
    exact = {
        nn.BatchNorm1d: Adapter("batch", batch_norm_to_lp(LpBatchNorm1d), _shape_bn(3), name="BatchNorm1d"),
        nn.BatchNorm2d: Adapter("batch", batch_norm_to_lp(LpBatchNorm2d), _shape_bn(4), name="BatchNorm2d"),
        nn.BatchNorm3d: Adapter("batch", batch_norm_to_lp(LpBatchNorm3d), _shape_bn(5), name="BatchNorm3d"),
        nn.SyncBatchNorm: Adapter("batch", batch_norm_to_lp(LpBatchNorm), _shape_bn(None), name="SyncBatchNorm"),
        nn.LayerNorm: Adapter("layer", _layer_to_lp(LpLayerNorm), _probe_last, name="LayerNorm"),
        nn.RMSNorm: Adapter("rms", _rms_to_lp, _probe_last, name="RMSNorm"),
        nn.GroupNorm: Adapter("group", _group_to_lp(LpGroupNorm), _probe_group, name="GroupNorm"),
        nn.InstanceNorm1d: Adapter("instance", _instance_to_lp(LpInstanceNorm1d), _probe_instance(3)),
        nn.InstanceNorm2d: Adapter("instance", _instance_to_lp(LpInstanceNorm2d), _probe_instance(4)),
        nn.InstanceNorm3d: Adapter("instance", _instance_to_lp(LpInstanceNorm3d), _probe_instance(5)),
    }
    _BUILTIN_EXACT.update(exact)
    act = ("drop", "act")
    channels_first = Adapter("layer", _layer_to_lp(LpLayerNorm2d), _probe_channels_first, name="LayerNorm2d")
    hf = {cast: Adapter("rms", _hf_rms_to_lp(cast), _probe_hf, name=f"transformers RMS norm ({cast})",
                        has_running_stats=_no_running_stats) for cast in ("llama", "gemma", "t5")}
    patterns = [
        # channels-first layer norm: timm.layers.norm.LayerNorm2d, torchvision.models.convnext.LayerNorm2d
        ("timm.*.LayerNorm2d", channels_first),
        ("torchvision.models.*.LayerNorm2d", channels_first),
        # timm's fast-norm subclasses of the stock layers (same function)
        ("timm.*.LayerNorm", exact[nn.LayerNorm]),
        ("timm.*.GroupNorm", exact[nn.GroupNorm]),
        ("timm.*.GroupNorm1", exact[nn.GroupNorm]),
        # norm + activation (timm.layers.norm_act)
        ("timm.*.BatchNormAct2d", Adapter("batch", batch_norm_to_lp(LpBatchNormAct2d, act), _shape_bn(4),
                                          name="BatchNormAct2d")),
        ("timm.*.GroupNormAct", Adapter("group", _group_to_lp(LpGroupNormAct, act), _probe_group,
                                        name="GroupNormAct")),
        ("timm.*.LayerNormAct", Adapter("layer", _layer_to_lp(LpLayerNormAct, act), _probe_last,
                                        name="LayerNormAct")),
        ("timm.*.LayerNormAct2d", Adapter("layer", _layer_to_lp(LpLayerNormAct2d, act), _probe_channels_first,
                                          name="LayerNormAct2d")),
        # transformers: Gemma's 1 + weight, T5's float32 variance and cast to a half weight, Llama's family
        ("transformers.models.*.GemmaRMSNorm", hf["gemma"]),
        ("transformers.models.*.Gemma2RMSNorm", hf["gemma"]),
        ("transformers.models.*.T5LayerNorm", hf["t5"]),
        ("transformers.models.*.LlamaRMSNorm", hf["llama"]),
        ("transformers.models.*.MistralRMSNorm", hf["llama"]),
        ("transformers.models.*.Qwen2RMSNorm", hf["llama"]),
        ("transformers.models.*.Qwen3RMSNorm", hf["llama"]),
        ("transformers.models.*.Phi3RMSNorm", hf["llama"]),
        # the many "Copied from LlamaRMSNorm" classes: verified like every conversion, so a family with other
        # numerics (e.g. a 1 + weight) fails the probe and is left as it is
        ("transformers.models.*RMSNorm", hf["llama"]),
    ]
    _BUILTIN_PATTERNS.extend(patterns)


_register_builtins()
