"""``LpInstanceNorm1d/2d/3d``: drop-in replacements for ``nn.InstanceNorm1d/2d/3d`` with a ``norm=`` argument.

Same arguments (``affine``, ``track_running_stats``, ``bias``), parameters, buffers, state_dict, unbatched input and
semantics as the stock layers (Ulyanov et al. 2016):

* training, or ``track_running_stats=False``: each (sample, channel) is normalized by its own statistics —
  ``y = weight · (x − μ) / sqrt(σ̂² + eps) + bias`` over the spatial elements, σ̂ from the estimator ``norm``
  (:func:`normmatters.layer_functional.lp_group_norm` with one group per channel);
* training with ``track_running_stats=True``: the running buffers move towards the mean over the batch of the
  per-instance μ and of the per-instance unbiased σ̂² · n/(n − 1), with ``momentum`` (``None`` leaves them as they
  are, as ``nn.InstanceNorm`` does); ``num_batches_tracked`` is not incremented (as ``nn.InstanceNorm``);
* eval with ``track_running_stats=True``: ``y = weight · (x − running_mean) / sqrt(running_var + eps) + bias`` per
  channel (``F.batch_norm`` in eval, exactly the stock layer).

``norm="l2"`` is the stock layer. σ̂ and its constant come from :mod:`normmatters.estimators`; ``k`` (topk),
``chunks`` (range: chunks of the spatial elements) and ``impl`` as for :class:`~normmatters.nn.LpGroupNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.instancenorm import _InstanceNorm

from ..estimators import get_estimator
from ..layer_functional import check_norm, lp_group_norm

__all__ = ["LpInstanceNorm", "LpInstanceNorm1d", "LpInstanceNorm2d", "LpInstanceNorm3d"]


class LpInstanceNorm(_InstanceNorm):
    """Lp instance normalization (base class; use the 1d/2d/3d layers). See the module docstring."""

    _dims: tuple[int, ...] = ()  # accepted input ranks: (unbatched, batched)

    def __init__(self, num_features: int, norm: str = "l1", eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device: Any = None, dtype: Any = None,
                 k: int = 10, chunks: int | None = None, impl: str | None = None, *, bias: bool = True) -> None:
        where = type(self).__name__
        check_norm(norm, None, where, k, chunks)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{where}: num_features must be a positive int, got {num_features!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.norm, self.k, self.chunks, self.impl = norm, k, chunks, impl

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__}: expected {self._dims[0]}D (unbatched) or {self._dims[1]}D "
                             f"input, got {input.dim()}D input of shape {list(input.shape)}")

    def _get_no_batch_dim(self) -> int:
        return self._dims[0]

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        where = type(self).__name__
        if not (self.training or not self.track_running_stats):
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        if self.training and self.track_running_stats and self.momentum is not None:
            self._update_running_stats(input.detach())
        return lp_group_norm(input, input.shape[1], self.weight, self.bias, self.eps, self.norm, where=where,
                             k=self.k, chunks=self.chunks, impl=self.impl)

    @torch.no_grad()
    def _update_running_stats(self, input: Tensor) -> None:
        """running ← (1 − momentum)·running + momentum·(mean over the batch of the per-instance statistic)."""
        N, C = input.shape[:2]
        x = input.reshape(N, C, -1)
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = x.shape[2]
        est = get_estimator(self.norm)
        mean = x.mean(2)
        sigma = est.statistic(x, mean if est.needs_mean else None, (2,), n, k=self.k, chunks=self.chunks)
        var = sigma.square() * (n / (n - 1)) if n > 1 else sigma.square()
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(mean.mean(0).to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(var.mean(0).to(self.running_var.dtype), alpha=m)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, norm={self.norm!r}"
        if "k" in get_estimator(self.norm).options:
            s += f", k={self.k}"
        if self.chunks is not None:
            s += f", chunks={self.chunks}"
        s += (f", eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
              f"track_running_stats={self.track_running_stats}")
        if self.affine and self.bias is None:
            s += ", bias=False"
        return s


class LpInstanceNorm1d(LpInstanceNorm):
    """``nn.InstanceNorm1d`` with σ̂ from ``norm``: input (N, C, L) or (C, L)."""

    _dims = (2, 3)


class LpInstanceNorm2d(LpInstanceNorm):
    """``nn.InstanceNorm2d`` with σ̂ from ``norm``: input (N, C, H, W) or (C, H, W)."""

    _dims = (3, 4)


class LpInstanceNorm3d(LpInstanceNorm):
    """``nn.InstanceNorm3d`` with σ̂ from ``norm``: input (N, C, D, H, W) or (C, D, H, W)."""

    _dims = (4, 5)
