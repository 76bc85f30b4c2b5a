"""Bounded weight normalization (Hoffer et al. 2018, sec. 6) and plain weight normalization, as
``torch.nn.utils.parametrize`` parametrizations.

For a weight W cut into slices W_c along ``dim`` (one per output channel by default, one per gate row of an
LSTM/GRU weight), with direction v, per-slice magnitudes g and the p-norm taken per slice::

    weight norm  (Salimans & Kingma 2016):  W_c = g_c · v_c / ‖v_c‖_p
    bounded      (this paper):              W_c = ρ · (g_c / ‖g‖₂) · v_c / ‖v_c‖_p

ρ is a fixed buffer, by default ‖g‖₂ at registration, where g starts at the slices' p-norms — so the weight is
unchanged at that moment. Bounded weight norm therefore keeps the l2 norm of the vector of per-slice p-norms at
ρ for ever, while each slice's direction and the slices' relative scales learn. With ``learn_scale=False`` g
is a buffer, so every slice keeps its initial norm. p ∈ {1, 2, inf} (the L1/L∞ variants of the paper).

The originals live where parametrize puts them: ``<module>.parametrizations.<name>.original0`` (g, shape of
the per-slice norms with singleton dims kept) and ``original1`` (v), or only ``original`` (v) when g is fixed.
``torch.nn.utils.parametrize.remove_parametrizations(module, name)`` leaves a plain weight of the same value.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "BoundedWeightNorm", "WeightNorm", "bounded_weight_norm", "weight_norm",
    "apply_bounded_weight_norm", "apply_weight_norm", "data_dependent_init",
]

_P_VALUES = (1.0, 2.0, math.inf)


def _check_p(p: Any, where: str) -> float:
    try:
        pf = float(p)
    except (TypeError, ValueError):
        pf = float("nan")
    if pf not in _P_VALUES:
        raise ValueError(f"{where}: p must be 1, 2 or inf, got {p!r}")
    return pf


def _slice_norms(w: Tensor, dim: int, p: float) -> Tensor:
    """‖w_c‖_p per slice along ``dim``, keeping singleton dims so it broadcasts against w."""
    other = [d for d in range(w.dim()) if d != dim]
    if not other:
        return w.abs()
    return torch.linalg.vector_norm(w, ord=p, dim=other, keepdim=True)


class _SliceNorm(nn.Module):
    """Shared parts: which dim, which p, and how to split a weight into (g, v)."""

    def __init__(self, dim: int, p: float, learn_scale: bool, g_fixed: Tensor | None) -> None:
        super().__init__()
        self.dim = dim
        self.p = p
        self.learn_scale = learn_scale
        if not learn_scale:
            self.register_buffer("g", g_fixed)

    def direction(self, v: Tensor) -> Tensor:
        return v / _slice_norms(v, self.dim, self.p)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        if not self.learn_scale:
            return weight
        return _slice_norms(weight, self.dim, self.p).detach(), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}, p={self.p:g}, learn_scale={self.learn_scale}"


class WeightNorm(_SliceNorm):
    """W_c = g_c · v_c / ‖v_c‖_p (Salimans & Kingma 2016, with an Lp slice norm)."""

    def forward(self, *originals: Tensor) -> Tensor:
        g, v = originals if self.learn_scale else (self.g, originals[0])
        return g * self.direction(v)


class BoundedWeightNorm(_SliceNorm):
    """W_c = ρ · (g_c / ‖g‖₂) · v_c / ‖v_c‖_p with ρ a fixed buffer (Hoffer et al. 2018, sec. 6)."""

    def __init__(self, dim: int, p: float, learn_scale: bool, g_fixed: Tensor | None, rho: Tensor) -> None:
        super().__init__(dim, p, learn_scale, g_fixed)
        self.register_buffer("rho", rho)

    def forward(self, *originals: Tensor) -> Tensor:
        g, v = originals if self.learn_scale else (self.g, originals[0])
        return (self.rho / torch.linalg.vector_norm(g)) * g * self.direction(v)

    def extra_repr(self) -> str:
        return f"rho={self.rho.item():.6g}, " + super().extra_repr()


def _register(cls: type[_SliceNorm], module: nn.Module, name: str, dim: int, p: Any, rho: float | None,
              learn_scale: bool, where: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"{where}: {type(module).__name__} has no tensor named {name!r}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{where}: {type(module).__name__}.{name} is already parametrized")
    pf = _check_p(p, where)
    if weight.dim() == 0:
        raise ValueError(f"{where}: {type(module).__name__}.{name} is a scalar; nothing to normalize per slice")
    if not isinstance(dim, int) or not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"{where}: dim must be an int in [{-weight.dim()}, {weight.dim() - 1}] for "
                         f"{type(module).__name__}.{name} of shape {tuple(weight.shape)}, got {dim!r}")
    dim %= weight.dim()
    with torch.no_grad():
        g0 = _slice_norms(weight, dim, pf)
    if (g0 == 0).any():
        raise ValueError(f"{where}: {type(module).__name__}.{name} has an all-zero slice along dim {dim}; "
                         "its direction is undefined (initialize the weight first)")
    fixed = None if learn_scale else g0.clone()
    if cls is BoundedWeightNorm:
        r = torch.linalg.vector_norm(g0) if rho is None else torch.as_tensor(float(rho), dtype=weight.dtype,
                                                                             device=weight.device)
        if not (torch.isfinite(r) and r > 0):
            raise ValueError(f"{where}: rho must be a positive finite number, got {rho!r}")
        param = BoundedWeightNorm(dim, pf, learn_scale, fixed, r.detach().clone())
    else:
        if rho is not None:
            raise ValueError(f"{where}: rho is an option of bounded_weight_norm; weight_norm leaves the norm free")
        param = WeightNorm(dim, pf, learn_scale, fixed)
    parametrize.register_parametrization(module, name, param, )
    return module


def bounded_weight_norm(module: nn.Module, name: str = "weight", dim: int = 0, p: float = 2,
                        rho: float | None = None, learn_scale: bool = True) -> nn.Module:
    """Register bounded weight norm on ``module.<name>``: W_c = ρ·(g_c/‖g‖₂)·v_c/‖v_c‖_p.

    Args:
        module: the layer owning the weight (Conv, Linear, LSTM, …).
        name: the parameter's name (e.g. ``"weight_hh_l0"`` for an LSTM).
        dim: the slice dim (0 = per output channel / per gate row).
        p: 1, 2 or ``inf``: the per-slice norm of the direction.
        rho: the fixed bound; default ‖g‖₂ at registration (weight unchanged).
        learn_scale: learn the per-slice magnitudes g (else each slice keeps its initial norm).
    Returns the module (parametrized in place).
    """
    return _register(BoundedWeightNorm, module, name, dim, p, rho, learn_scale, "bounded_weight_norm")


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0, p: float = 2, rho: float | None = None,
                learn_scale: bool = True) -> nn.Module:
    """Register plain weight norm (free norm, the baseline): W_c = g_c·v_c/‖v_c‖_p. ``rho`` must be None;
    ``learn_scale=False`` freezes g (then identical to bounded weight norm with learn_scale=False)."""
    return _register(WeightNorm, module, name, dim, p, rho, learn_scale, "weight_norm")


_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_DEFAULT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T, nn.Linear, nn.RNNBase)


def _weights_of(module: nn.Module) -> list[tuple[str, int]]:
    """(parameter name, output-slice dim) of the weights this family normalizes in ``module``."""
    if isinstance(module, nn.RNNBase):
        return [(n, 0) for n, _ in module.named_parameters(recurse=False)
                if n.startswith(("weight_ih_l", "weight_hh_l"))]
    if getattr(module, "weight", None) is None:
        return []
    return [("weight", 1 if isinstance(module, _CONV_T) else 0)]


def _matches(qualname: str, patterns: str | Iterable[str] | Callable[[str], bool] | None) -> bool:
    if patterns is None:
        return False
    if callable(patterns):
        return bool(patterns(qualname))
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(qualname, pat) for pat in patterns)


def _apply(fn: Callable[..., nn.Module], model: nn.Module, p: float, include: Any, exclude: Any,
           **kwargs: Any) -> list[str]:
    done = []
    for mod_name, module in list(model.named_modules()):
        if not isinstance(module, _DEFAULT_TYPES):
            continue
        for pname, dim in _weights_of(module):
            qual = f"{mod_name}.{pname}" if mod_name else pname
            if include is not None and not _matches(qual, include):
                continue
            if _matches(qual, exclude) or parametrize.is_parametrized(module, pname):
                continue
            fn(module, pname, dim=dim, p=p, **kwargs)
            done.append(qual)
    return done


def apply_bounded_weight_norm(model: nn.Module, p: float = 2, include: Any = None, exclude: Any = None,
                              rho: float | None = None, learn_scale: bool = True) -> list[str]:
    """Apply :func:`bounded_weight_norm` to every conv, linear and recurrent weight of ``model``.

    Slices: output channels (dim 0; dim 1 for transposed convolutions) and, for LSTM/GRU/RNN, the rows of
    ``weight_ih_l*`` / ``weight_hh_l*`` (one per gate unit). ``include`` / ``exclude``: glob pattern(s) over
    qualified parameter names (``"layer1.*.conv1.weight"``) or a predicate on them; excluded wins. Already
    parametrized weights are skipped. ``rho`` (if given) is the bound of *each* weight. Returns the names done.
    """
    return _apply(bounded_weight_norm, model, p, include, exclude, rho=rho, learn_scale=learn_scale)


def apply_weight_norm(model: nn.Module, p: float = 2, include: Any = None, exclude: Any = None,
                      learn_scale: bool = True) -> list[str]:
    """Apply plain :func:`weight_norm` like :func:`apply_bounded_weight_norm` (the baseline)."""
    return _apply(weight_norm, model, p, include, exclude, learn_scale=learn_scale)


@torch.no_grad()
def data_dependent_init(model: nn.Module, example_input: Tensor, include: Any = None, exclude: Any = None) -> None:
    """Rescale each conv/linear weight's output channels so that, on ``example_input`` and with the layers
    before it already rescaled, every channel of its output has unit standard deviation (Salimans & Kingma
    2016, sec. 2.2, applied to the weights before weight norm is registered, so ρ keeps the result).

    Without it, mean-only batch norm passes on whatever scale the random init gives, and a deep weight-normed
    net starts with vanishing activations. Runs one forward per layer in training mode; buffers (running
    statistics) are restored afterwards.
    """
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        for name, module in list(model.named_modules()):
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or module.weight is None:
                continue
            qual = f"{name}.weight" if name else "weight"
            if (include is not None and not _matches(qual, include)) or _matches(qual, exclude):
                continue
            captured: list[Tensor] = []
            handle = module.register_forward_hook(lambda m, i, o, store=captured: store.append(o))
            try:
                model(example_input)
            finally:
                handle.remove()
            out = captured[0]
            std = out.transpose(0, 1).flatten(1).std(dim=1).clamp_min(1e-8)
            module.weight.div_(std.reshape((-1,) + (1,) * (module.weight.dim() - 1)))
            if module.bias is not None:
                module.bias.div_(std)
    finally:
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
        model.train(was_training)
