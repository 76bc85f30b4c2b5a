"""The ``normmatters::`` operators of the native CPU kernels (schemas and CPU kernels in ``csrc/ops.cpp``, built
by :mod:`.native_build`): their fake (meta) implementations, so ``torch.compile`` and ``torch.export`` can
trace them.

Operators (x (N, C, *) float32/float64/bfloat16, contiguous or channels-innermost; norm mean, l2, l1, linf,
range or topk; c the 0-dim constant c(n) of :mod:`normmatters.estimators`):

* ``lp_batch_norm_fwd(x, weight, bias, norm, c, eps, k) -> (y, mean, raw, aux)``: the training forward
  y = w·(x − μ)/sqrt(σ̂² + eps) + b, σ̂ = c·raw, with the (C,) statistics μ and raw and ``aux`` (A, C) what
  backward compares against (range: the max/min positions, int32, or values; topk: the k-th largest |d|;
  else A = 0). Differentiable in x, weight, bias (analytic backward below), once.
* ``lp_batch_norm_bwd(grad_y, x, weight, mean, raw, aux, norm, c, eps, k, need_x) -> (grad_x, grad_w,
  grad_b)``: its backward (grad_x empty when not ``need_x``).
* ``update_running_stats(mean, raw, running_mean!, running_var!, num_batches_tracked!, norm, c, momentum, n)
  -> status``: :func:`normmatters.functional.update_running_stats` with σ̂ = c·raw, in place; status (0-dim
  int64) 1 updated, 0 non-finite statistics, 2 finite ones whose running_var would overflow (0, 2: unchanged).
* ``lp_batch_norm_fwd_out`` / ``lp_batch_norm_bwd_out``: the same kernels into caller-given outputs (pooled
  buffers, or x itself in place), the forward also updating the running buffers in the same call; the eager
  autograd Functions of :mod:`.native_autograd` call them through :class:`.native.Launch`.

The functional forward's autograd is a C++ autograd Function registered for the Autograd key in
``csrc/ops.cpp`` (its backward calls ``lp_batch_norm_bwd``): measured against ``torch.library.register_autograd``
it costs less per call (docs/bench/native-ops.md). The eager layers keep their own autograd Functions around
the ``*_out`` operators, which take pooled output buffers and update the running buffers in the same call.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..estimators import get_estimator
from . import native_build

__all__ = ["ensure", "fwd", "bwd", "update_running_stats", "fwd_out", "bwd_out"]


_registered = False
_lock = threading.Lock()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _aux_like(x: Tensor, norm: str, inplace: bool = False) -> Tensor:
    """The ``aux`` output the kernel returns for x: int32 positions for range on the channel kernels (contiguous,
    spatial size > 1; not in place), else (A, C) values in the compute dtype."""
    C = x.shape[1]
    rows = get_estimator(norm).native_aux_rows
    channel = x.is_contiguous() and x.numel() > x.shape[0] * C
    if rows == 2 and channel and not inplace:
        return x.new_empty((2, C), dtype=torch.int32)
    return x.new_empty((rows, C), dtype=_acc(x.dtype))


def _fwd_fake(x, weight, bias, norm, c, eps, k):
    C, acc = x.shape[1], _acc(x.dtype)
    return torch.empty_like(x), x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc), _aux_like(x, norm)


def _bwd_fake(grad_y, x, weight, mean, raw, aux, norm, c, eps, k, need_x):
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    return gx, torch.empty_like(weight), torch.empty_like(weight)


def _update_fake(mean, raw, running_mean, running_var, num_batches_tracked, norm, c, momentum, n):
    return mean.new_empty((), dtype=torch.int64)


def _fwd_out_fake(x, weight, bias, norm, c, eps, k, y, running_mean, running_var, num_batches_tracked,
                  momentum, unbias, stream, block, threads):
    C, acc = x.shape[1], _acc(x.dtype)
    return x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc), _aux_like(x, norm, y is x), 1


def _bwd_out_fake(grad_y, x, weight, mean, raw, aux, bias, norm, c, eps, k, need_w, need_b, grad_x, stream,
                  block, threads):
    return torch.empty_like(weight), torch.empty_like(weight)


def _register() -> None:
    lib = "normmatters::"
    torch.library.register_fake(lib + "lp_batch_norm_fwd")(_fwd_fake)
    torch.library.register_fake(lib + "lp_batch_norm_bwd")(_bwd_fake)
    torch.library.register_fake(lib + "update_running_stats")(_update_fake)
    torch.library.register_fake(lib + "lp_batch_norm_fwd_out")(_fwd_out_fake)
    torch.library.register_fake(lib + "lp_batch_norm_bwd_out")(_bwd_out_fake)


def ensure() -> bool:
    """Build/load the library and register the fake implementations, once; False (after one
    warning, from :func:`.native_build.load`) when the library cannot be built."""
    global _registered
    if _registered:
        return True
    if not native_build.load():
        return False
    with _lock:
        if not _registered:
            _register()
            _registered = True
    return True


def fwd(x: Tensor, weight: Tensor, bias: Tensor, norm: str, c: Tensor, eps: float, k: int):
    """``normmatters::lp_batch_norm_fwd`` → (y, mean (C,), raw (C,), aux (A, C)); call :func:`ensure` first."""
    return torch.ops.normmatters.lp_batch_norm_fwd(x, weight, bias, norm, c, eps, k)


def bwd(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, raw: Tensor, aux: Tensor, norm: str, c: Tensor,
        eps: float, k: int, need_x: bool = True):
    """``normmatters::lp_batch_norm_bwd`` → (grad_x, grad_w, grad_b)."""
    return torch.ops.normmatters.lp_batch_norm_bwd(grad_y, x, weight, mean, raw, aux, norm, c, eps, k, need_x)


def update_running_stats(mean: Tensor, raw: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                         num_batches_tracked: Tensor | None, norm: str, c: Tensor, momentum: float,
                         n: int) -> Tensor:
    """``normmatters::update_running_stats`` → the 0-dim int64 status (1 updated; 0, 2 unchanged)."""
    return torch.ops.normmatters.update_running_stats(mean, raw, running_mean, running_var, num_batches_tracked,
                                                      norm, c, momentum, n)


def fwd_out():
    """The ``normmatters::lp_batch_norm_fwd_out`` overload (resolved once by each :class:`.native.Launch`)."""
    return torch.ops.normmatters.lp_batch_norm_fwd_out.default


def bwd_out():
    """The ``normmatters::lp_batch_norm_bwd_out`` overload."""
    return torch.ops.normmatters.lp_batch_norm_bwd_out.default
