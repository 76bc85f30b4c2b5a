"""The equilibrium of a scale-invariant weight under SGD with momentum and weight decay (spherical motion).

Setting (PyTorch's SGD, dampening 0, no Nesterov): ``v ← μ·v + g + λ·w``, ``w ← w − η·v``, where the loss
depends on w only through its direction, so the gradient g is orthogonal to w and ‖g‖ = G/‖w‖ with G the
gradient norm the loss would have at ‖w‖ = 1 (G = ‖w‖·‖∇_w L‖ is the same at every scale).

Derivation (Wan et al. 2021, "Spherical motion dynamics", sec. 3; van Laarhoven 2017 for μ = 0). At
equilibrium ‖w‖ is constant, so ``2⟨w_t, v_t⟩ = η‖v_t‖²``. Assume (i) ηλ ≪ 1 − μ (the norm moves slowly against
the momentum's memory), (ii) gradients of different steps are uncorrelated (noise dominated), (iii) G is
stationary. Write v_t = Σ_k μ^k (g_{t−k} + λ w_{t−k}). Then

* the decay part gives ``⟨w_t, Σ μ^k λ w_{t−k}⟩ ≈ λ‖w‖²/(1−μ)``;
* g_{t−k} was orthogonal to w_{t−k}, but w moved since by −η Σ_{j=1..k} v_{t−j}, each v_{t−j} holding
  g_{t−k} with weight μ^{k−j}: ``⟨w_t, g_{t−k}⟩ ≈ −η‖g‖²(1−μ^k)/(1−μ)``, so
  ``⟨w_t, Σ μ^k g_{t−k}⟩ ≈ −η‖g‖² μ/((1−μ)²(1+μ))``;
* ``‖v_t‖² ≈ ‖g‖²/(1−μ²)`` (the decay part is O(λ²)).

So ``2λ‖w‖²/(1−μ) = η‖g‖²/(1−μ²)·(1 + 2μ/(1−μ)) = η‖g‖²/(1−μ)²``, i.e. ``‖w‖² = η‖g‖²/(2λ(1−μ))``; with
‖g‖ = G/‖w‖:

    ‖w*‖ = (η G² / (2λ(1−μ)))^(1/4)                                   (equilibrium_norm)

and the angular update per step, ‖Δw_⊥‖/‖w‖ = η‖v‖/‖w‖ = η G/(√(1−μ²)·‖w*‖²):

    Δθ* = √(2ηλ/(1+μ))   radians                                     (equilibrium_angular_update)

which does not depend on G. Both hold per scale-invariant group (one output channel of a convolution followed
by batch norm, with G the RMS of that channel's G over steps). The equilibrium is reached on a time scale of
about (1−μ)/(4ηλ) steps; after a change of η it must be reached again.
"""

from __future__ import annotations

import math

__all__ = ["equilibrium_angular_update", "equilibrium_norm"]


def _check(lr: float, weight_decay: float, momentum: float, where: str) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{where}: lr must be positive and finite, got {lr}")
    if not (weight_decay > 0 and math.isfinite(weight_decay)):
        raise ValueError(f"{where}: weight_decay must be positive and finite (no decay, no equilibrium), "
                         f"got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum}")


def equilibrium_angular_update(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """Δθ* = √(2ηλ/(1+μ)): the angular update per step (radians) of a scale-invariant weight at equilibrium
    under PyTorch SGD (rate η = ``lr``, momentum μ, dampening 0, coupled decay λ = ``weight_decay``).

    Assumes ηλ ≪ 1 − μ, gradients uncorrelated across steps and a stationary gradient scale (derivation in the
    module docstring; Wan et al. 2021, "Spherical motion dynamics"). Independent of the gradient's size.
    """
    _check(lr, weight_decay, momentum, "equilibrium_angular_update")
    return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))


def equilibrium_norm(lr: float, weight_decay: float, momentum: float = 0.0, grad_norm: float = 1.0) -> float:
    """‖w*‖ = (η G²/(2λ(1−μ)))^(1/4): the norm at which weight decay's shrinking and the gradient steps'
    growth balance, for a scale-invariant weight under PyTorch SGD (dampening 0, coupled decay λ).

    ``grad_norm`` is G = ‖w‖·‖∇_w L‖, the gradient norm the loss has at unit weight norm (scale-free), as a
    root mean square over steps. Same assumptions as :func:`equilibrium_angular_update` (module docstring):
    ηλ ≪ 1 − μ, gradients uncorrelated across steps, G stationary.
    """
    _check(lr, weight_decay, momentum, "equilibrium_norm")
    if not (grad_norm >= 0 and math.isfinite(grad_norm)):
        raise ValueError(f"equilibrium_norm: grad_norm must be >= 0 and finite, got {grad_norm}")
    return (lr * grad_norm**2 / (2.0 * weight_decay * (1.0 - momentum))) ** 0.25
