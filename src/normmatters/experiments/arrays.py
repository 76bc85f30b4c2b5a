"""In-memory image datasets (:class:`ArrayDataset`, :class:`DataSplit`, the fixed train/test split) and the
memory check that guards building them (:func:`check_fits`: a loader refuses, naming the file, a dataset whose
float32 tensors would not fit in the memory at hand). The loaders live in :mod:`.data`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ArrayDataset", "DataSplit", "DataError", "available_memory", "check_fits", "fixed_split", "size_text",
           "BYTES_PER_VALUE"]

_SPLIT_SEED = 0
_TEST_FRACTION = 0.2

#: bytes of memory per stored byte (uint8) while a loader builds its float32 tensors: the uint8 array, the
#: float32 copy, the tensor and a split's indexed copy
BYTES_PER_VALUE = 13


def available_memory() -> int | None:
    """Bytes of memory at hand (Linux ``MemAvailable``, else free physical pages), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def check_fits(path: Path, values: int, what: str) -> None:
    """Raise DataError naming ``path`` when ``values`` stored bytes would not fit in the memory at hand."""
    avail = available_memory()
    if avail is not None and values * BYTES_PER_VALUE > avail:
        raise DataError(
            f"{path}: {what} ({values} values, about {size_text(values * BYTES_PER_VALUE)} once loaded as float32) "
            f"would not fit in the {size_text(avail)} of memory available; refused"
        )


class DataError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it."""


@dataclass
class ArrayDataset:
    """In-memory images (N, C, H, W) float32 in [0, 1] and labels (N,) int64."""

    images: Tensor
    labels: Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise DataError(
                f"ArrayDataset: expected images of shape (N, C, H, W), got {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"ArrayDataset: expected {self.images.shape[0]} labels, got shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


@dataclass
class DataSplit:
    """Train and test datasets plus what a model needs to adapt: channels, size, class count, mean/std."""

    name: str
    train: ArrayDataset
    test: ArrayDataset

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    @property
    def num_classes(self) -> int:
        n = len(self.train.classes)
        return n if n else int(max(self.train.labels.max(), self.test.labels.max())) + 1

    def channel_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std (C,) of the training images, for standardization."""
        x = self.train.images
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return mean, std


def fixed_split(images: Tensor, labels: Tensor, classes: list[str], name: str) -> DataSplit:
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    perm = torch.randperm(len(labels), generator=g)
    n_test = max(1, int(round(len(labels) * _TEST_FRACTION)))
    test, train = perm[:n_test], perm[n_test:]
    return DataSplit(
        name,
        ArrayDataset(images[train], labels[train], classes),
        ArrayDataset(images[test], labels[test], classes),
    )
