"""``SyncLpBatchNorm`` (and ``1d/2d/3d``): Lp batch norm with the statistics of every rank's batch together.

The drop-in for ``nn.SyncBatchNorm`` in the Lp family: under ``torch.distributed`` (torchrun, DDP; gloo or NCCL)
training normalizes with the mean and σ̂ of the union of the batches of every rank of ``process_group``
(:func:`normmatters.kernels.sync.sync_lp_batch_norm`: exact, the same rows, input gradients and running buffers
as :class:`~normmatters.nn.LpBatchNorm` on the concatenated batch). Eval mode, world size 1 and no initialised
process group behave exactly like :class:`~normmatters.nn.LpBatchNorm` (no collective at all).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernels.sync import group_size, sync_lp_batch_norm
from ..options import NormOptions
from .batchnorm import LpBatchNorm

__all__ = ["SyncLpBatchNorm", "SyncLpBatchNorm1d", "SyncLpBatchNorm2d", "SyncLpBatchNorm3d"]


class SyncLpBatchNorm(LpBatchNorm):
    """:class:`~normmatters.nn.LpBatchNorm` whose training statistics are those of the union of every rank's batch.

    Args: as :class:`~normmatters.nn.LpBatchNorm` (``options=`` included), plus ``process_group`` (None: the
    default group) — the ranks whose batches are normalized together. Every rank of the group must call the
    layer (an empty batch included) in the same order. Not combinable with ``chunks``, ``ghost_batch_size``,
    ``precision`` or ``inplace`` while syncing (``ValueError``). Any input rank ≥ 2, like ``nn.SyncBatchNorm``.
    """

    def __init__(self, num_features: int, norm: str = "l1", eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, k: int = 10,
                 chunks: int | None = None, ghost_batch_size: int | None = None, nonfinite: str = "skip",
                 device: Any = None, dtype: Any = None, impl: str | None = None, precision: Any = None,
                 inplace: bool = False, *, bias: bool = True, process_group: Any = None,
                 options: NormOptions | None = None) -> None:
        super().__init__(num_features, norm=norm, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, k=k, chunks=chunks,
                         ghost_batch_size=ghost_batch_size, nonfinite=nonfinite, device=device, dtype=dtype,
                         impl=impl, precision=precision, inplace=inplace, bias=bias, options=options)
        self.process_group = process_group

    def _syncs(self) -> bool:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        return bn_training and group_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:
        if not self._syncs():
            return super().forward(input)
        where = self._describe()
        for option in ("chunks", "ghost_batch_size", "precision"):
            if getattr(self, option) is not None:
                raise ValueError(f"{where}: {option}={getattr(self, option)!r} is not supported while syncing "
                                 "statistics across processes; leave it None")
        if self.inplace:
            raise ValueError(f"{where}: inplace=True is not supported while syncing statistics across processes")
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if track and self.momentum is None:  # cumulative moving average, as LpBatchNorm
            momentum = 1.0 / (self.num_batches_tracked + 1).to(torch.float32)
        return sync_lp_batch_norm(
            input, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, momentum, self.eps, self.norm, self.k,
            num_batches_tracked=self.num_batches_tracked if track else None, nonfinite=self.nonfinite,
            where=self._where(), group=self.process_group, skipped=self._buffers.get("_skipped") if track else None)


class SyncLpBatchNorm1d(SyncLpBatchNorm):
    """:class:`SyncLpBatchNorm` over (N, C) or (N, C, L) input."""

    _expected_dim = (2, 3)


class SyncLpBatchNorm2d(SyncLpBatchNorm):
    """:class:`SyncLpBatchNorm` over (N, C, H, W) input."""

    _expected_dim = (4,)


class SyncLpBatchNorm3d(SyncLpBatchNorm):
    """:class:`SyncLpBatchNorm` over (N, C, D, H, W) input."""

    _expected_dim = (5,)
