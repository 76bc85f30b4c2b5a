"""What the out-of-place lean Functions (Inductor/eager: :mod:`.lean`; native: :mod:`.native_autograd`) save for
backward, and how they read it back: the input, the weight and (C,)-statistics — never an activation-sized
intermediate."""

from __future__ import annotations

from torch import Tensor

__all__ = ["save_stats", "saved_stats"]


def save_stats(ctx, x: Tensor, weight: Tensor, divides: bool, mean: Tensor, raw: Tensor,
               aux: tuple[Tensor, ...]) -> None:
    """Save x, w, μ and, for dividing norms (``Estimator.divides``), raw and aux — what every out-of-place
    backward reads."""
    if divides:
        ctx.save_for_backward(x, weight, mean, raw, *aux)
    else:
        ctx.save_for_backward(x, weight, mean)


def saved_stats(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """(x, w, μ, raw, aux) as saved by :func:`save_stats` (mean-only: raw is μ, aux empty)."""
    x, weight, mean, *rest = ctx.saved_tensors
    raw, aux = (rest[0], tuple(rest[1:])) if rest else (mean, ())
    return x, weight, mean, raw, aux
