"""Batch augmentation with plain torch ops (no torchvision): standardize, random crop with padding, h-flip.

All functions take a float batch ``x`` of shape (N, C, H, W) and an explicit ``torch.Generator`` so a run's
data order and augmentation are reproducible and resumable (the generator's state is checkpointed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["standardize", "random_crop", "random_hflip", "Augment"]


def standardize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-channel ``(x − mean_c) / std_c``; ``mean``, ``std`` have shape (C,)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.to(x).reshape(shape)) / std.to(x).reshape(shape)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each side by ``padding`` and crop back to (H, W) at a random offset per sample."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each sample left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass
class Augment:
    """The per-batch pipeline: optional crop and flip (training only), then standardization."""

    mean: Tensor
    std: Tensor
    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, x: Tensor, generator: torch.Generator | None, train: bool) -> Tensor:
        if train and generator is not None:
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, generator)
            if self.hflip:
                x = random_hflip(x, generator)
        return standardize(x, self.mean, self.std)
