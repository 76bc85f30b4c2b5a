"""Hand-written Triton kernels: ``impl="triton"``, and ``impl="auto"`` on CUDA tensors.

Files: :mod:`.batch_norm` (the batch-statistics family: LpBatchNorm*, SyncLpBatchNorm in one process; ghost
batches, range chunks, contiguous and channels-last input), :mod:`.row_norm` (layer / RMS / group norm rows),
:mod:`.ops` (the ``normmatters_triton::`` operators: schemas, fake implementations, autograd). This module holds
the two entry points the dispatch calls, :func:`batch_norm_training` and :func:`rows`; nothing here imports
Triton until one of them runs.

Where they run: CUDA tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is first imported — how the tests run them). ``impl="triton"`` on a CPU tensor without the interpreter,
or without an importable ``triton``, raises a ``ValueError`` naming the layer; ``impl="auto"`` then simply does
not pick Triton.

Not covered (the entry points return None and the dispatch runs the composite path — the eager formulas of
:mod:`normmatters.kernels.formulas` / :mod:`~normmatters.kernels.row_formulas` for ``impl="triton"``, its usual
choice for ``impl="auto"``): ``norm="topk"`` with k > :data:`TOPK_MAX` (16), and ``inplace=True``.

Non-finite batches: the running buffers keep their values by a select inside the update kernel (num_batches_tracked
included) and an optional int64 counter tensor counts the skipped batches; nothing is read back to the host here —
:func:`batch_norm_training` returns the 0-dim status for the caller's policy
(:func:`normmatters.functional.report_nonfinite`).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from ..._batch_stats import check_channel_vectors, training_groups
from ...estimators import get_estimator
from ...options import BatchNormTensors, NormOptions

__all__ = ["TOPK_MAX", "available", "device_ok", "runs_on", "covers", "batch_norm_training", "rows"]

#: the largest k of the top-k kernels (also :data:`.batch_norm.TOPK_MAX`)
TOPK_MAX = 16


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether ``triton`` is importable (a constant of any traced graph)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Whether the kernels are (or, once defined, will be) Triton's interpreted ones: fixed when :mod:`.ops` is
    first imported (``TRITON_INTERPRET=1`` then)."""
    ops = sys.modules.get(__name__ + ".ops")
    if ops is not None:
        return ops.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def device_ok(device_type: str) -> bool:
    """Whether the kernels can run on this device type: CUDA, or the CPU under the interpreter (and triton
    importable); a constant of any traced graph."""
    return (device_type == "cuda" or (device_type == "cpu" and _interpreting())) and available()


def runs_on(x: Tensor) -> bool:
    """Whether the kernels can run on x's device: CUDA, or the CPU under the interpreter (and triton importable)."""
    return device_ok(x.device.type)


def covers(norm: str, k: int) -> bool:
    """Whether the kernels implement ``norm`` with this ``k`` (a norm taking k: 1 ≤ k ≤ :data:`TOPK_MAX`)."""
    try:
        est = get_estimator(norm)
    except ValueError:
        return False
    return "k" not in est.options or 1 <= k <= TOPK_MAX


def _check(x: Tensor, where: str) -> None:
    if not available():
        raise ValueError(f"{where}: impl='triton' needs the triton package (pip install triton), which is not "
                         "importable here")
    if not runs_on(x):
        raise ValueError(f"{where}: impl='triton' runs on CUDA tensors (or on CPU tensors under Triton's "
                         f"interpreter, TRITON_INTERPRET=1), got a tensor on {x.device}; use impl='auto' or move "
                         "the layer to the GPU")


@torch.compiler.assume_constant_result
def _constant(norm: str, n: int, k: int, chunks: int, centered: bool) -> float:
    """c(n) of the estimator registry (its quadratures call numpy: a constant of any traced graph)."""
    return float(get_estimator(norm).constant(n, k=k, chunks=chunks or None, centered=centered))


def _ops():
    from . import ops
    return ops


def batch_norm_training(input: Tensor, tensors: BatchNormTensors, options: NormOptions, momentum: float | Tensor,
                        where: str, explicit: bool = True,
                        skipped: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """One training call of Lp batch norm on the Triton kernels: (y, the 0-dim int64 update status:
    :data:`~normmatters.functional.STORED` / ``NONFINITE`` / ``UNREPRESENTABLE``), or None where they do not
    apply (not covered; ``explicit=False`` — ``impl="auto"`` — and the device cannot run them). ``input`` checked
    by the caller (a non-empty (N, C, *) floating tensor, eps > 0); ``momentum`` this step's factor
    (:func:`~normmatters.options.call_momentum`); ``skipped``: an int64 0-dim counter, += 1 per batch whose
    statistics left the buffers unchanged. The running buffers are updated in place on the device."""
    if options.inplace or not covers(options.norm, options.k):
        return None
    if not explicit and not runs_on(input):
        return None
    _check(input, where)
    weight, bias, running_mean, running_var, num_batches_tracked = tensors
    norm, k, chunks = options.norm, options.k, options.chunks
    groups, _, n = training_groups(input, where, norm, k, chunks, options.ghost_batch_size)
    C = input.shape[1]
    check_channel_vectors(C, where, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    divides = get_estimator(norm).divides
    c = _constant(norm, n, k, chunks or 0, True) if divides else 1.0
    ops = _ops()
    y, mean, raw, _ = ops.bn_fwd(input, weight, bias, c, options.eps, norm, k, groups, chunks or 0)
    with torch.no_grad():
        mom_t = momentum if isinstance(momentum, Tensor) else None
        status = ops.bn_update(mean, raw if divides else None, running_mean, running_var if divides else None,
                               num_batches_tracked, skipped, c, 0.0 if mom_t is not None else float(momentum),
                               mom_t, n)
    return y, status


def check_runs(x: Tensor, where: str) -> None:
    """A ``ValueError`` naming ``where`` when ``impl="triton"`` cannot run on x (no triton; a CPU tensor without the
    interpreter)."""
    _check(x, where)


def rows(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, centered: bool, k: int,
         chunks: int | None, groups: int, spatial: int, where: str, explicit: bool = True) -> Tensor | None:
    """y (R, n) of rows x2 on the Triton row kernels (arguments as :func:`normmatters.kernels.row_norm.rows`,
    validated by the caller), or None where they do not apply (see :func:`batch_norm_training`)."""
    if not covers(norm, k) or not get_estimator(norm).divides:
        return None
    if not explicit and not runs_on(x2):
        return None
    _check(x2, where)
    n = x2.shape[1]
    c = _constant(norm, int(n), k, chunks or 0, centered)
    w = weight.reshape(-1) if weight is not None else None
    b = bias.reshape(-1) if bias is not None else None
    y, _, _, _ = _ops().row_fwd(x2, w, b, c, eps, norm, centered, k, chunks or 0, groups, spatial)
    return y

