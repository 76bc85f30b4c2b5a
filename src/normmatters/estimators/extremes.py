"""Backward pieces shared by the extreme-value norms (``linf``, ``topk``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import _LEAN_DIMS


def _extreme_pieces(d: Tensor, tau: Tensor, sums: tuple[Tensor, ...], k: int) -> tuple[Tensor, Tensor]:
    """Backward of "mean of the k largest |d|" (k = 1: max |d|), up to the constant: sign(d)/k on the
    elements above the k-th largest value τ; elements tied at τ share the remaining weight evenly (the
    average over all tie-breaks, which for k = 1 is exactly autograd's rule for amax)."""
    cnt_gt, cnt_eq, s_gt, s_eq = sums
    a = d.abs()
    w_eq = (k - cnt_gt) / cnt_eq
    e = torch.sign(d) * ((a > tau).to(d.dtype) + (a == tau).to(d.dtype) * w_eq) / k
    return e, (s_gt + w_eq * s_eq) / k


def _extreme_sums(d: Tensor, tau: Tensor) -> tuple[Tensor, ...]:
    a = d.abs()
    gt = (a > tau).to(d.dtype)
    eq = (a == tau).to(d.dtype)
    sd = torch.sign(d)
    return (gt.sum(_LEAN_DIMS, keepdim=True), eq.sum(_LEAN_DIMS, keepdim=True),
            (gt * sd).sum(_LEAN_DIMS, keepdim=True), (eq * sd).sum(_LEAN_DIMS, keepdim=True))
