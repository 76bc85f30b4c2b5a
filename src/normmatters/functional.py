"""``lp_batch_norm``: the plain reference path of every Lp batch-norm layer, shaped like ``F.batch_norm``.

Training mode, per channel c and per ghost batch (the whole batch unless ``ghost_batch_size`` is set)::

    μ_c   = mean(x_c)                                   over the n = (batch · spatial) elements
    σ̂_c   = estimator(x_c − μ_c)                        see :mod:`normmatters.estimators`
    y     = weight_c · (x − μ_c) / sqrt(σ̂_c² + eps) + bias_c
    running_mean ← (1 − momentum) · running_mean + momentum · μ_c
    running_var  ← (1 − momentum) · running_var  + momentum · σ̂_c² · n / (n − 1)

exactly the conventions of ``nn.BatchNorm`` (for ``norm="l2"`` it *is* batch norm). Eval mode divides by
``sqrt(running_var + eps)`` through ``F.batch_norm``, so a state_dict moves between ``nn.BatchNorm2d`` and
these layers with identical eval output. ``norm="mean"`` (mean-only batch norm) never divides:
``y = weight · (x − μ) + bias`` in training and ``weight · (x − running_mean) + bias`` in eval.

Half and bfloat16 inputs are normalized with statistics accumulated in float32 (like ``nn.BatchNorm``);
the output has the input's dtype. A non-finite batch statistic (NaN or Inf in the batch) never reaches the
running buffers: the update is masked on device, and ``nonfinite="raise"`` (default) then raises
:class:`NonFiniteBatchError` in eager mode, ``"skip"`` warns once per layer, ``"ignore"`` stays silent (no
host synchronisation at all, useful on CUDA). Under ``torch.compile`` the buffers stay protected but
nothing is raised (a data-dependent raise would break the graph).

References: Ioffe & Szegedy 2015 (batch norm); Hoffer et al. 2018 "Norm matters" (Lp batch norm);
Banner et al. 2018 (range batch norm); Hoffer, Hubara & Soudry 2017 (ghost batch norm).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .estimators import get_estimator

__all__ = ["lp_batch_norm", "NonFiniteBatchError", "NONFINITE_MODES", "check_input", "training_groups",
           "update_running_stats", "report_nonfinite", "acc_dtype", "check_running_stats",
           "check_channel_vectors", "check_inplace_weight"]

NONFINITE_MODES = ("raise", "skip", "ignore")


class NonFiniteBatchError(FloatingPointError, ValueError):
    """A training batch produced NaN or Inf batch statistics; the running buffers were left unchanged."""


def check_input(input: Tensor, *, where: str, num_features: int | None = None,
                expected_dim: int | tuple[int, ...] | None = None) -> None:
    """Type, rank and channel checks shared by the functional and the modules (errors name ``where``)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if not (input.is_floating_point()):
        raise TypeError(f"{where}: expected a floating-point input, got dtype {input.dtype}")
    if expected_dim is not None:
        dims = (expected_dim,) if isinstance(expected_dim, int) else expected_dim
        if input.dim() not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(f"{where}: expected {want} input (got {input.dim()}D input of shape "
                             f"{tuple(input.shape)})")
    elif input.dim() < 2:
        raise ValueError(f"{where}: expected input of shape (N, C, *) with at least 2 dims "
                         f"(got {input.dim()}D input of shape {tuple(input.shape)})")
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(f"{where}: expected {num_features} channels in dim 1, got {input.shape[1]} "
                         f"(input shape {tuple(input.shape)})")


def training_groups(input: Tensor, where: str, norm: str, k: int, chunks: int | None,
                    ghost_batch_size: int | None) -> tuple[int, int, int]:
    """Validate the training-mode reduction (shared by every path); returns (groups, per-group batch,
    n elements per channel and group)."""
    batch = input.shape[0]
    spatial = math.prod(input.shape[2:])
    g = batch
    if ghost_batch_size is not None:
        if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
            raise ValueError(f"{where}: ghost_batch_size must be a positive int, got {ghost_batch_size!r}")
        if batch % ghost_batch_size:
            raise ValueError(f"{where}: ghost_batch_size={ghost_batch_size} must divide the batch size, "
                             f"got batch size {batch}")
        g = ghost_batch_size
    if chunks is not None:
        if norm != "range":
            raise ValueError(f"{where}: chunks is an option of norm='range' only, got norm={norm!r}")
        if g % chunks:
            what = "ghost batch size" if ghost_batch_size is not None else "batch size"
            raise ValueError(f"{where}: chunks={chunks} must divide the {what}, got {what} {g}")
    n = g * spatial
    if n <= 1:
        raise ValueError(f"{where}: expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(input.shape)}" + (f" with ghost_batch_size={g}" if ghost_batch_size else ""))
    problem = get_estimator(norm).validate(n, k=k, chunks=chunks)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return batch // g, g, n


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: float32 for half/bfloat16 inputs (as nn.BatchNorm), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_running_stats(running_mean: Tensor | None, running_var: Tensor | None, divides: bool,
                        where: str) -> None:
    """Eval mode normalizes with the running statistics (``running_var`` only for dividing norms)."""
    if running_mean is None or (divides and running_var is None):
        raise ValueError(f"{where}: eval mode needs running statistics (or pass training=True)")


def check_channel_vectors(num_features: int, where: str, **vectors: Tensor | None) -> None:
    """Every given per-channel tensor (weight, bias, running buffers) has shape (C,): the native kernels read
    and write C entries of each, so a wrong size must stop here rather than read or write past its end."""
    for name, t in vectors.items():
        if t is not None and tuple(t.shape) != (num_features,):
            raise ValueError(f"{where}: expected {name} of shape ({num_features},) for an input with {num_features} "
                             f"channels, got {tuple(t.shape)}")


def check_inplace_weight(weight: Tensor | None, where: str) -> None:
    """``inplace=True`` reconstructs the input from the output by dividing by the weight: every entry must be
    non-zero. Eager only (one host synchronisation); skipped under ``torch.compile``, where a data-dependent
    raise would break the graph (a zero weight there gives non-finite input gradients)."""
    if weight is None or torch.compiler.is_compiling():
        return
    zeros = int((weight == 0).sum())
    if zeros:
        raise ValueError(f"{where}: inplace=True needs every weight != 0 to reconstruct the input from the "
                         f"output (In-Place ABN); found {zeros} zero entr{'y' if zeros == 1 else 'ies'} — use "
                         "inplace=False or re-initialise the weight")


def _masked_update(buf: Tensor, new: Tensor, momentum: float | Tensor, ok: Tensor) -> None:
    upd = buf + (new.to(buf.dtype) - buf) * momentum
    buf.copy_(torch.where(ok, upd, buf))


def update_running_stats(mean: Tensor, sigma: Tensor | None, running_mean: Tensor | None,
                         running_var: Tensor | None, num_batches_tracked: Tensor | None,
                         momentum: float | Tensor, n: int) -> Tensor:
    """Update the running buffers in place from per-(group, channel) batch statistics ``mean`` and ``sigma``
    (G, C) — ``sigma`` None for mean-only — unless they are non-finite, in which case every buffer stays as
    it was (masked on device, no host synchronisation). Returns the 0-dim "statistics are finite" flag.

    running_mean ← running_mean + momentum·(mean_G(μ) − running_mean);
    running_var  ← running_var + momentum·(mean_G(σ̂²)·n/(n−1) − running_var); num_batches_tracked += ok.
    """
    ok = torch.isfinite(mean).all()
    if sigma is not None:
        ok = ok & torch.isfinite(sigma).all()
    if running_mean is not None:
        _masked_update(running_mean, mean.mean(0), momentum, ok)
    if running_var is not None and sigma is not None:
        _masked_update(running_var, sigma.square().mean(0) * (n / (n - 1)), momentum, ok)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    return ok


def report_nonfinite(ok: Tensor, nonfinite: str, where: str, stacklevel: int = 4) -> None:
    """Raise (``"raise"``) or warn (``"skip"``) if ``ok`` is False; eager mode only (a data-dependent raise
    would break a ``torch.compile`` graph), and never for ``"ignore"`` (no host synchronisation)."""
    if nonfinite == "ignore" or torch.compiler.is_compiling() or bool(ok):
        return
    msg = (f"{where}: the training batch has non-finite values (NaN or Inf) in its statistics; "
           "running_mean, running_var and num_batches_tracked were left unchanged")
    if nonfinite == "raise":
        raise NonFiniteBatchError(msg + " (pass nonfinite='skip' to warn instead)")
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def _batch_statistics(x: Tensor, norm: str, k: int, chunks: int | None) -> tuple[Tensor, Tensor | None]:
    """Per-(group, channel) mean and σ̂ of x viewed as (G, g, C, S); None σ̂ for mean-only."""
    est = get_estimator(norm)
    n = x.shape[1] * x.shape[3]
    mean = x.mean((1, 3))
    sigma = est.statistic(x, mean if est.needs_mean else None, (1, 3), n, k=k, chunks=chunks) \
        if est.divides else None
    return mean, sigma


def _broadcast(stat: Tensor) -> Tensor:
    """(G, C) statistics → broadcastable against the (G, g, C, S) view."""
    return stat[:, None, :, None]


def lp_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    norm: str = "l1",
    k: int = 10,
    chunks: int | None = None,
    ghost_batch_size: int | None = None,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "raise",
    where: str = "lp_batch_norm",
) -> Tensor:
    """Lp batch normalization of ``input`` (N, C, *) — see the module docstring for the formulas.

    Args follow ``F.batch_norm``; in addition ``norm``, ``k`` (topk), ``chunks`` (range) and
    ``ghost_batch_size`` pick the statistic (:mod:`normmatters.estimators`). ``num_batches_tracked``, if
    given, is incremented only when the batch statistics are finite. ``where`` names the caller in errors.
    Returns a tensor of the input's shape, dtype and memory format.
    """
    est = get_estimator(norm)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    check_input(input, where=where)
    C = input.shape[1]

    if not training:
        check_running_stats(running_mean, running_var, est.divides, where)
        if est.divides:
            return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        shape = (1, C) + (1,) * (input.dim() - 2)
        y = input - running_mean.to(input.dtype).reshape(shape)
        if weight is not None:
            y = y * weight.to(input.dtype).reshape(shape)
        return y + bias.to(input.dtype).reshape(shape) if bias is not None else y

    groups, g, n = training_groups(input, where, norm, k, chunks, ghost_batch_size)
    acc = acc_dtype(input.dtype)
    x = input.reshape(groups, g, C, -1).to(acc)
    mean, sigma = _batch_statistics(x, norm, k, chunks)

    y = x - _broadcast(mean)
    if sigma is not None:
        y = y * _broadcast(torch.rsqrt(sigma.square() + eps))
    if weight is not None:
        y = y * weight.to(acc)[None, None, :, None]
    if bias is not None:
        y = y + bias.to(acc)[None, None, :, None]
    y = y.reshape(input.shape).to(input.dtype)

    with torch.no_grad():
        ok = update_running_stats(mean, sigma, running_mean, running_var, num_batches_tracked, momentum, n)
    report_nonfinite(ok, nonfinite, where)
    return y
