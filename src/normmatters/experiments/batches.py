"""The batches of one epoch as tensors, read in the main process or by ``DataLoader`` worker processes.

The trainer decides which samples form each batch (a pure function of seed, epoch and rank, so a resumed
run replays the same batches); :func:`iterate_batches` only gathers them, in order, from an in-memory
:class:`~normmatters.experiments.data.ArrayDataset`: images (B, C, H, W) float32 and labels (B,) int64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import ArrayDataset

__all__ = ["iterate_batches"]


class _Gather(torch.utils.data.Dataset):
    """Dataset of whole batches (for DataLoader workers): item i is the batch of index tensor i."""

    def __init__(self, data: ArrayDataset, batches: list[Tensor]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        idx = self.batches[i]
        return self.data.images[idx], self.data.labels[idx]


def iterate_batches(data: ArrayDataset, batches: list[Tensor], workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images[idx], labels[idx])`` for each index tensor in ``batches``, in order; ``workers`` > 0
    gathers them in that many ``DataLoader`` worker processes (same tensors, same order)."""
    if workers > 0:
        yield from DataLoader(_Gather(data, batches), batch_size=None, shuffle=False, num_workers=workers)
    else:
        for idx in batches:
            yield data.images[idx], data.labels[idx]
