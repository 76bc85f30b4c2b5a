"""Find the parameters whose per-channel scaling leaves a model's training-mode output unchanged."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["scale_invariant_parameters", "gradient_scale_invariant"]


def _to_double(x: Any) -> Any:
    if isinstance(x, Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def _flat(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.reshape(-1)
    if isinstance(out, (list, tuple)):
        return torch.cat([_flat(o) for o in out])
    if isinstance(out, dict):
        return torch.cat([_flat(v) for v in out.values()])
    raise TypeError(f"scale_invariant_parameters: cannot compare model outputs of type {type(out).__name__}")


@torch.no_grad()
def scale_invariant_parameters(model: nn.Module, *example_inputs: Any, tol: float = 1e-3,
                               seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter (≥ 2 dims) whose output channels can each be
    rescaled by a positive factor without changing the model's training-mode output on ``example_inputs``.

    Checked numerically on a float64 copy of the model (models that cannot be deep-copied are probed in
    place in their own dtype and restored; either way parameters, buffers and running statistics end as
    they were): each candidate's channels (dim 0) are multiplied by independent factors in
    [0.5, 2]; the parameter counts if that moves the output by less than ``tol`` times what a random
    perturbation of the parameter of its own size does (normalization's eps makes the invariance inexact, by
    about eps/variance; parameters the output ignores are not reported). Typical hits: conv/linear weights
    followed by batch norm. The returned parameters are the model's own.
    """
    try:
        probe = copy.deepcopy(model).double().train()
        inputs = _to_double(example_inputs)
        saved_state, was_training = None, None
    except RuntimeError:  # e.g. a parametrized LSTM caches non-leaf weights that cannot be deep-copied
        probe, inputs = model, example_inputs
        saved_state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        was_training = model.training
        model.train()
    try:
        return _probe(model, probe, inputs, tol, seed)
    finally:
        if saved_state is not None:
            model.load_state_dict(saved_state)
            model.train(was_training)


def _probe(model: nn.Module, probe: nn.Module, inputs: Any, tol: float, seed: int) -> list[tuple[str, nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    base = _flat(probe(*inputs))
    size = base.abs().max().clamp_min(1e-30)
    own = dict(model.named_parameters())
    found = []
    for name, p in probe.named_parameters():
        if not p.requires_grad or p.dim() < 2:
            continue
        saved = p.detach().clone()
        factors = torch.rand(p.shape[0], generator=gen, dtype=p.dtype) * 1.5 + 0.5
        p.mul_(factors.reshape((-1,) + (1,) * (p.dim() - 1)))
        scaled = (_flat(probe(*inputs)) - base).abs().max() / size
        p.copy_(saved + torch.randn(p.shape, generator=gen, dtype=p.dtype) * saved.abs().mean().clamp_min(1e-3))
        moved = (_flat(probe(*inputs)) - base).abs().max() / size
        p.copy_(saved)
        if moved > 1e-9 and scaled <= tol * moved:
            found.append((name, own[name]))
    return found


@torch.no_grad()
def gradient_scale_invariant(params: list[Tensor], tol: float = 1e-2,
                             weights: list[Tensor] | None = None) -> list[bool]:
    """Per parameter, whether its current gradient says it is scale-invariant per output channel.

    If the loss L is unchanged by w_c → s·w_c for every channel c (dim 0), then d/ds L(s·w_c) at s = 1 is 0,
    i.e. ⟨w_c, ∇_{w_c} L⟩ = 0 (Euler's theorem for a 0-homogeneous function). A parameter passes when
    |cos(w_c, ∇_{w_c} L)| ≤ ``tol`` for every channel with a non-zero gradient and at least one channel has one
    (1-D parameters, and parameters without a gradient, fail). A necessary condition checked on one batch's
    gradient, with tolerance for normalization's eps; :func:`scale_invariant_parameters` is the direct test
    when an example input is at hand. ``weights``: the values the gradient was taken at, where the parameters
    have moved since (default: the parameters themselves). One host read for all parameters together.
    """
    if weights is not None and len(weights) != len(params):
        raise ValueError(f"gradient_scale_invariant: {len(weights)} weights for {len(params)} parameters")
    flags: list[Tensor] = []
    for i, p in enumerate(params):
        g = p.grad
        if g is None or p.dim() < 2:
            flags.append(torch.zeros((), dtype=torch.bool, device=p.device))
            continue
        at = p if weights is None else weights[i]
        w, g = at.detach().flatten(1).double(), g.detach().flatten(1).double()
        dot = (w * g).sum(1).abs()
        scale = torch.linalg.vector_norm(w, dim=1) * torch.linalg.vector_norm(g, dim=1)
        live = scale > 0
        flags.append(live.any() & (dot <= tol * scale).all())
    if not flags:
        return []
    dev = flags[0].device
    return torch.stack([f.to(dev) for f in flags]).tolist()
