"""The conversion adapter registry and the verified conversion engine (:mod:`normmatters.adapters` holds the
public names and the built-in adapters; import from there).

An :class:`Adapter` says how to turn one norm class into an Lp layer (``to_lp``: reusing the module's ``Parameter``
and buffer objects and keeping what it does besides normalizing), of which ``kind`` it is (which converter and
``kinds=`` select it), the shape of a probe input, and how to go back (``to_torch``; default: rebuild the original
class with its attributes and the current parameters, buffers and child modules).

Matching (:func:`find_adapter`): a class registered by itself matches only that exact class (the stock classes
``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
``nn.InstanceNorm1d/2d/3d`` are registered so: a subclass of them is *not* the stock layer); a string is a
:mod:`fnmatch` pattern on the class's ``module.qualname`` — the built-in adapters for timm, torchvision and
transformers are matched that way, so none of those packages is imported unless the model already uses them.
User registrations (:func:`register_adapter`) take precedence over the built-in ones, later over earlier.

Verification (:func:`convert_modules`): before a module is replaced, its ``norm="l2"`` counterpart, built by the
same adapter from a copy, runs on a random probe input of the module's shape, dtype and device — in training and in
eval mode when the module keeps running statistics — next to a copy of the original; a counterpart whose output
differs by more than the dtype's tolerance (max |Δ| ≤ tol·(1 + max |y|): float64 1e-9, float32 1e-5, float16 5e-3,
bfloat16 3e-2; ``nn.SyncBatchNorm``: eval mode only, as its training step is a collective) leaves the module as it
was, with a warning and an entry in the report. A subclass of a stock class
without an adapter is left as it is with one warning per class (``strict=True``: ``TypeError``; a failed
verification: ``ValueError``).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Adapter", "register_adapter", "unregister_adapter", "find_adapter", "ConversionReport", "ADAPTER_KINDS",
           "convert_modules", "replace_modules", "restore_original", "move_state"]

log = logging.getLogger(__name__)

#: the kinds of norm an adapter converts: "batch" (convert_batchnorm), the others (convert_norms' ``kinds``)
ADAPTER_KINDS = ("batch", "layer", "rms", "group", "instance")
#: attribute of a converted layer: (original class, its plain attributes) for going back
ORIGIN = "_nm_origin"
_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Adapter:
    """How to convert one norm class.

    Attributes:
        kind: one of ``ADAPTER_KINDS``.
        to_lp: ``(module, norm, options) -> nn.Module``: the Lp layer with estimator ``norm`` reusing the module's
            parameters and buffers (:func:`move_state`); ``options`` are the converter's keyword options
            (estimator options like ``k``; for batch norm also ``sync`` and ``process_group``). Raising
            ``TypeError`` / ``ValueError`` leaves the module unconverted (reported).
        probe: ``module -> shape`` of a probe input for the verification.
        to_torch: ``lp_layer -> nn.Module`` going back; None: :func:`restore_original`.
        name: shown in reports.
        has_running_stats: ``module -> bool``: verify in eval mode too (batch / instance norm with running stats).
    """

    kind: str
    to_lp: Callable[[nn.Module, str, dict], nn.Module]
    probe: Callable[[nn.Module], tuple[int, ...]]
    to_torch: Callable[[nn.Module], nn.Module] | None = None
    name: str = ""
    has_running_stats: Callable[[nn.Module], bool] = lambda m: getattr(m, "running_mean", None) is not None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"Adapter: kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")


_BUILTIN_EXACT: dict[type, Adapter] = {}
_BUILTIN_PATTERNS: list[tuple[str, Adapter]] = []
_USER: list[tuple[type | str, Adapter]] = []


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(match: type | str, adapter: Adapter) -> Adapter:
    """Register ``adapter`` for a class (that exact class) or an fnmatch pattern on ``module.qualname`` (e.g.
    ``"mypkg.*.ScaledLayerNorm"``); it takes precedence over the built-in adapters and earlier registrations.
    Returns the adapter (so it can decorate a factory call)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter: adapter must be an Adapter, got {type(adapter).__name__}")
    if not isinstance(match, (type, str)):
        raise TypeError(f"register_adapter: match must be a class or a pattern string, got {type(match).__name__}")
    _USER.insert(0, (match, adapter))
    return adapter


def unregister_adapter(match: type | str) -> None:
    """Remove the user registrations for ``match`` (the built-in adapters stay)."""
    _USER[:] = [(m, a) for m, a in _USER if m != match]


def find_adapter(cls: type) -> Adapter | None:
    """The adapter that converts ``cls`` (user registrations first), or None."""
    name = _qualname(cls)
    for match, adapter in _USER:
        if match is cls or (isinstance(match, str) and fnmatch.fnmatchcase(name, match)):
            return adapter
    if cls in _BUILTIN_EXACT:
        return _BUILTIN_EXACT[cls]
    for pattern, adapter in _BUILTIN_PATTERNS:
        if fnmatch.fnmatchcase(name, pattern):
            return adapter
    return None


@dataclass
class ConversionReport:
    """What one conversion did: ``converted`` (name, from class, to class) and ``skipped`` (name, class, why)
    entries, in module order; ``str()`` is a readable summary."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}, skipped {len(self.skipped)}"]
        lines += [f"  converted {n}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"  skipped {n}: {a} ({why})" for n, a, why in self.skipped]
        return "\n".join(lines)


# --- moving state -----------------------------------------------------------------------------------------------

_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def move_state(src: nn.Module, dst: nn.Module, children: Iterable[str] = ()) -> nn.Module:
    """Reuse src's parameters and buffers (and the named child modules) in dst, and its training mode."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(src, name, None) is not None:
                setattr(dst, name, getattr(src, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(src, name, None) is not None:
                dst.register_buffer(name, getattr(src, name))
    for name in children:
        child = getattr(src, name, None)
        if child is not None:
            setattr(dst, name, child)
    dst.train(src.training)
    return dst


def _remember(src: nn.Module, dst: nn.Module) -> None:
    """Keep src's class and plain attributes on dst, for :func:`restore_original`."""
    attrs = {k: v for k, v in src.__dict__.items() if k not in _MODULE_INTERNALS}
    dst.__dict__[ORIGIN] = (type(src), attrs, tuple(src._parameters), tuple(src._buffers), tuple(src._modules),
                            frozenset(src._non_persistent_buffers_set))


def restore_original(lp: nn.Module) -> nn.Module | None:
    """The original module an adapter converted ``lp`` from (its class and attributes, with lp's current
    parameters, buffers and child modules), or None for a layer not converted by an adapter."""
    origin = lp.__dict__.get(ORIGIN)
    if origin is None:
        return None
    cls, attrs, params, buffers, modules, non_persistent = origin
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m.__dict__.update(copy.copy(attrs))
    for name in params:
        m.register_parameter(name, getattr(lp, name, None))
    for name in buffers:
        m.register_buffer(name, getattr(lp, name, None), persistent=name not in non_persistent)
    for name in modules:
        m.add_module(name, getattr(lp, name, None))
    m.train(lp.training)
    return m


# --- verification -----------------------------------------------------------------------------------------------

def _like(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _verify(m: nn.Module, adapter: Adapter, options: dict) -> str | None:
    """None if the l2 counterpart reproduces m on a probe input, else why not."""
    dtype, device = _like(m)
    gen = torch.Generator().manual_seed(0)
    try:
        x = (torch.randn(adapter.probe(m), generator=gen, dtype=torch.float32) * 2 + 0.5).to(device, dtype)
        ref = copy.deepcopy(m)
        twin = adapter.to_lp(copy.deepcopy(m), "l2", {})
        if isinstance(m, nn.SyncBatchNorm):  # training would be a collective (and CPU-refused) under a process group
            modes = (False,)
        else:
            modes = (True, False) if adapter.has_running_stats(m) else (m.training,)
        tol = _TOL.get(dtype, 1e-5)
        with torch.no_grad():
            for mode in modes:
                ref.train(mode), twin.train(mode)
                want, got = ref(x), twin(x)
                if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                    return f"the l2 counterpart's output has another shape ({_shape(got)} vs {_shape(want)})"
                err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
                scale = float(want.float().abs().max()) if want.numel() else 0.0
                if not err <= tol * (1 + scale):
                    return (f"the l2 counterpart differs from the original by {err:.3g} (max abs) in "
                            f"{'training' if mode else 'eval'} mode on a probe of shape {list(x.shape)}")
    except Exception as e:  # noqa: BLE001 — any failure to reproduce the module means: leave it as it is
        return f"verification failed: {type(e).__name__}: {e}"
    return None


def _shape(t: Any) -> Any:
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


#: converter options that change structure, not the statistic (the l2 counterpart being verified is built without
#: them: an unsynced twin computes the same as a synced one on one process, without a collective)
_STRUCTURAL = frozenset({"sync", "process_group"})


# --- the engine -------------------------------------------------------------------------------------------------

def _stock_base(m: nn.Module, kinds: frozenset[str]) -> type | None:
    """The stock class of one of ``kinds`` that m is an instance of, if any."""
    for cls, adapter in _BUILTIN_EXACT.items():
        if adapter.kind in kinds and isinstance(m, cls):
            return cls
    return None


def convert_modules(module: nn.Module, norm: str, kinds: frozenset[str], options: dict, strict: bool,
                    where: str) -> tuple[nn.Module, ConversionReport]:
    """Replace, in place, every module of ``kinds`` that has an adapter by its verified Lp layer; returns (model or
    the new layer if ``module`` itself is converted, report)."""
    report = ConversionReport()
    warned: set[type] = set()

    def warn(cls: type, message: str) -> None:
        log.warning("%s", message)
        if cls not in warned:
            warned.add(cls)
            warnings.warn(message, stacklevel=4)

    def convert_one(m: nn.Module, name: str) -> nn.Module | None:
        cls = type(m)
        adapter = find_adapter(cls)
        if adapter is None or adapter.kind not in kinds:
            base = _stock_base(m, kinds) if adapter is None else None
            if base is not None:
                msg = (f"{where}: {name}: {_qualname(cls)} subclasses {base.__name__} but has no conversion adapter; "
                       f"left unconverted (normmatters.register_adapter adds one)")
                if strict:
                    raise TypeError(msg)
                report.skipped.append((name, cls.__name__, f"subclass of {base.__name__} without an adapter"))
                warn(cls, msg)
            return None
        problem = _verify(m, adapter, options)
        if problem is None:
            try:
                new = adapter.to_lp(m, norm, options)
            except (TypeError, ValueError) as e:
                problem = f"the adapter failed: {e}"
        if problem is not None:
            msg = f"{where}: {name} ({cls.__name__}) left unconverted: {problem}"
            if strict:
                raise ValueError(msg)
            report.skipped.append((name, cls.__name__, problem))
            warn(cls, msg)
            return None
        if cls not in _BUILTIN_EXACT:
            _remember(m, new)
        report.converted.append((name, cls.__name__, type(new).__name__))
        return new

    return replace_modules(module, convert_one), report


def replace_modules(module: nn.Module, convert_one: Callable[[nn.Module, str], nn.Module | None],
                    prefix: str = "") -> nn.Module:
    """Depth-first: ``convert_one(m, name)`` returns a replacement (not recursed into) or None (recurse)."""
    new = convert_one(module, prefix or "(model)")
    if new is not None:
        return new
    for name, child in list(module.named_children()):
        replaced = replace_modules(child, convert_one, f"{prefix}.{name}" if prefix else name)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
