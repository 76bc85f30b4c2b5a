"""The batch statistics of Lp batch norm below every kernel: validation, the running-statistics update, the
non-finite guard and the plain reference path (:func:`reference_batch_norm`). Internal: the public entry is
:func:`normmatters.functional.lp_batch_norm` (which re-exports these names); the kernels import from here, so
imports run one way (functional → kernels → here).

The math of every Lp batch-norm path, shaped like ``F.batch_norm``.

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
the output has the input's dtype. ``1/sqrt(σ̂² + eps)`` is taken as ``1/hypot(σ̂, sqrt(eps))``, so it is finite
for every finite σ̂ (σ̂² alone overflows float32 above ~1.8e19).

Non-finite batches are handled on the device, with no host synchronisation (:func:`report_nonfinite`): a batch
whose statistics are NaN or Inf, or whose new running variance σ̂²·n/(n−1) overflows the buffer's dtype, leaves
every running buffer (``num_batches_tracked`` included) as it was, by a device-side select; a layer counts such
batches in a non-persistent counter (``layer.skipped_batches``, read only when asked). That is
``nonfinite="skip"`` (the default) and ``"ignore"`` (the same, not counted). ``nonfinite="raise"`` reads the
status back to the host after each training step (one device synchronisation per layer and step) and raises
:class:`NonFiniteBatchError` on non-finite statistics (a running variance the buffer cannot hold warns once per
layer); under ``torch.compile`` and without values (meta device, fake tensors, ``torch.export``) it raises
nothing.

As ``F.batch_norm`` on torch 2.13: training needs ``eps > 0`` and eval ``eps >= 0`` (``ValueError``); an empty
batch (a zero-size dim) in training gives an empty output, leaves the running statistics unchanged and still
counts in ``num_batches_tracked``.

References: Ioffe & Szegedy 2015 (batch norm); Hoffer et al. 2018 "Norm matters" (Lp batch norm);
Banner et al. 2018 (range batch norm); Hoffer, Hubara & Soudry 2017 (ghost batch norm).
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .estimators import get_estimator, norms_with_option
from .options import NONFINITE_MODES, BatchNormTensors, NormOptions, call_momentum

__all__ = ["reference_batch_norm", "BatchNormTensors", "call_momentum", "NonFiniteBatchError",
           "NONFINITE_MODES", "check_input", "training_groups",
           "update_running_stats", "report_nonfinite", "acc_dtype", "check_running_stats",
           "check_channel_vectors", "check_inplace_weight", "check_inplace_input", "check_eps", "inv_std",
           "empty_batch_norm", "LayerName", "no_values", "warn_once", "STORED", "NONFINITE", "UNREPRESENTABLE"]

#: status of a running-statistics update (:func:`update_running_stats`, the native kernels): the buffers were
#: updated; the statistics were non-finite; they were finite but the new running variance overflows the buffer's
#: dtype. Buffers are left unchanged in the last two cases.
STORED, NONFINITE, UNREPRESENTABLE = 1, 0, 2


class NonFiniteBatchError(FloatingPointError, ValueError):
    """A training batch produced NaN or Inf batch statistics; the running buffers were left unchanged."""


class LayerName(str):
    """A layer's description used as ``where`` in messages (``str(self)``), carrying the set of warnings that
    layer has already given (``warned``), so that each warns once per layer — two layers with the same
    description each warn once — whatever the ``warnings`` registry has seen."""

    warned: set

    def __new__(cls, text: str, warned: set) -> LayerName:
        self = super().__new__(cls, text)
        self.warned = warned
        return self


def warn_once(where: str, kind: str, msg: str, stacklevel: int) -> None:
    """Warn ``msg`` (RuntimeWarning); once per layer for a :class:`LayerName`, else as ``warnings.warn``."""
    warned = getattr(where, "warned", None)
    if warned is None:
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)
        return
    if kind in warned:
        return
    warned.add(kind)
    frame = sys._getframe(stacklevel)
    # registry=None: the per-module registry would drop a second layer's warning of the same text
    warnings.warn_explicit(msg, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"), registry=None)


def no_values(t: Tensor | None) -> bool:
    """Whether ``t`` has no data to look at: the meta device, a fake tensor (FakeTensorMode, torch.export
    tracing: on the "cpu" device, but with no memory a kernel could read), or torch.export tracing."""
    if t is None or not isinstance(t, Tensor) or torch.compiler.is_compiling():
        return False  # (under torch.compile the callers trace plain formulas and check nothing anyway)
    if t.device.type == "meta" or torch.compiler.is_exporting():
        return True
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def check_eps(eps: float, training: bool, where: str) -> None:
    """``F.batch_norm``'s rule on torch 2.13: ``eps > 0`` in training (sqrt(σ̂² + eps) of a constant channel
    is 0 otherwise), ``eps >= 0`` in eval; the message names ``where``."""
    if training and not eps > 0:
        raise ValueError(f"{where}: batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0:
        raise ValueError(f"{where}: batch_norm eps must be non-negative, but got {eps}")


def inv_std(sigma: Tensor, eps: float) -> Tensor:
    """r = 1 / sqrt(σ̂² + eps), computed as 1 / hypot(σ̂, sqrt(eps)) so that no square is formed: finite and
    accurate for every finite σ̂ ≥ 0 (σ̂² overflows float32 above ~1.8e19), with a finite gradient at σ̂ = 0."""
    return torch.hypot(sigma, torch.full_like(sigma, math.sqrt(eps))).reciprocal()


def empty_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                     num_batches_tracked: Tensor | None) -> Tensor:
    """Training on an empty batch (a zero-size dim), as ``nn.BatchNorm`` on torch 2.13: an output of the
    input's (empty) shape and dtype, connected to input, weight and bias (their gradients: zeros of their
    shapes); running_mean and running_var unchanged; num_batches_tracked still counts the batch."""
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    y = input.clone()
    if weight is not None:
        y = y * weight.to(input.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(input.dtype).reshape(shape)
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    return y


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
        if "chunks" not in get_estimator(norm).options:
            raise ValueError(f"{where}: chunks is an option of norm={norms_with_option('chunks')} only, "
                             f"got norm={norm!r}")
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
    if weight is None or torch.compiler.is_compiling() or no_values(weight):
        return
    zeros = int((weight == 0).sum())
    if zeros:
        raise ValueError(f"{where}: inplace=True needs every weight != 0 to reconstruct the input from the "
                         f"output (In-Place ABN); found {zeros} zero entr{'y' if zeros == 1 else 'ies'} — use "
                         "inplace=False or re-initialise the weight")


def check_inplace_input(input: Tensor, where: str, weight: Tensor | None = None, bias: Tensor | None = None) -> None:
    """``inplace=True`` training writes the output over ``input``: refuse, before anything is written (the input,
    the running buffers, num_batches_tracked), every input autograd would refuse to see modified in place —
    an inference tensor outside inference mode and, with grad enabled, a leaf that requires grad, a view of
    one, and a view autograd marks as not modifiable in place when the output requires grad (an output of a
    multi-output view op such as ``unbind``/``split``/``chunk``, a view made under no_grad, a view made
    inside a custom Function)."""
    if torch.compiler.is_compiling():
        return  # Dynamo / functionalization check this themselves
    hint = "; pass a tensor autograd lets you modify (an op's output, x.clone()) or use inplace=False"
    if input.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{where}: inplace=True cannot overwrite an inference tensor outside "
                           f"torch.inference_mode(){hint}")
    if not torch.is_grad_enabled():
        return
    if input._is_view():
        base = input._base
        if base is not None and base.is_leaf and base.requires_grad:
            raise RuntimeError(f"{where}: inplace=True cannot overwrite a view of a leaf tensor that requires "
                               f"grad (autograd forbids modifying it in place){hint}")
        meta = torch._C._autograd._get_creation_meta(input)
        needs_grad = any(t is not None and t.requires_grad for t in (input, weight, bias))
        if meta != torch._C._autograd.CreationMeta.DEFAULT and needs_grad:
            raise RuntimeError(f"{where}: inplace=True cannot overwrite this view (created as {meta.name}, e.g. by "
                               f"unbind/split/chunk or under no_grad: autograd forbids modifying it in place "
                               f"when the output requires grad){hint}")
    if input.is_leaf and input.requires_grad:
        raise RuntimeError(f"{where}: inplace=True cannot overwrite a leaf tensor that requires grad (autograd "
                           f"forbids modifying it in place){hint}")


def _masked_update(buf: Tensor, new: Tensor, ok: Tensor) -> None:
    buf.copy_(torch.where(ok, new, buf))


def _mixed(buf: Tensor, new: Tensor, momentum: float | Tensor) -> Tensor:
    """buf + momentum·(new − buf) in the buffer's dtype (new cast to it first)."""
    return buf + (new.to(buf.dtype) - buf) * momentum


def update_running_stats(mean: Tensor, sigma: Tensor | None, running_mean: Tensor | None,
                         running_var: Tensor | None, num_batches_tracked: Tensor | None,
                         momentum: float | Tensor, n: int) -> Tensor:
    """Update the running buffers in place from per-(group, channel) batch statistics ``mean`` and ``sigma``
    (G, C) — ``sigma`` None for mean-only — unless they are non-finite or a new value overflows the buffer's
    dtype (σ̂² of a float32 |x| ~ 1e20), in which case every buffer stays as it was (masked on device, no host
    synchronisation). Returns the 0-dim int status: :data:`STORED`, :data:`NONFINITE` or
    :data:`UNREPRESENTABLE`.

    running_mean ← running_mean + momentum·(mean_G(μ) − running_mean);
    running_var  ← running_var + momentum·(mean_G(σ̂²)·n/(n−1) − running_var) (σ̂ squared in the buffer's
    dtype); num_batches_tracked += 1.
    """
    ok = torch.isfinite(mean).all()
    if sigma is not None:
        ok = ok & torch.isfinite(sigma).all()
    fits = torch.ones((), dtype=torch.bool, device=mean.device)
    new_mean = new_var = None
    if running_mean is not None:
        new_mean = _mixed(running_mean, mean.mean(0), momentum)
        fits = fits & torch.isfinite(new_mean).all()
    if running_var is not None and sigma is not None:
        new_var = _mixed(running_var, sigma.to(running_var.dtype).square().mean(0) * (n / (n - 1)), momentum)
        fits = fits & torch.isfinite(new_var).all()
    stored = ok & fits
    if new_mean is not None:
        _masked_update(running_mean, new_mean, stored)
    if new_var is not None:
        _masked_update(running_var, new_var, stored)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(stored.to(num_batches_tracked.dtype))
    return torch.where(ok, torch.where(fits, STORED, UNREPRESENTABLE), NONFINITE)


def report_nonfinite(status: Tensor | int | bool, nonfinite: str, where: str, stacklevel: int = 4, *,
                     tracked: bool = True, skipped: Tensor | None = None) -> None:
    """Act on the status of a training step's running-statistics update (:func:`update_running_stats`; a bool
    is "statistics are finite"; the buffers are already protected on the device).

    * ``"skip"``: add 1 to ``skipped`` (a layer's 0-dim counter, if given) when the batch was not stored — a
      device-side add, no host read;
    * ``"ignore"``: nothing;
    * ``"raise"``: reads the status back to the host (a device synchronisation): non-finite statistics raise
      :class:`NonFiniteBatchError`, a running variance the buffer cannot hold warns once per layer; eager mode
      only (a data-dependent raise would break a ``torch.compile`` graph) and only with values (not on the meta
      device, with fake tensors or under torch.export). ``skipped`` counts there too.

    ``tracked``: whether the layer has running buffers (the message says what was left unchanged)."""
    if nonfinite == "ignore":
        return
    if skipped is not None and not no_values(skipped):
        if isinstance(status, Tensor):
            with torch.no_grad():
                skipped.add_(status != STORED)
        elif int(status) != STORED:  # a host value already (the native kernels' status)
            with torch.no_grad():
                skipped.add_(1)
    if nonfinite != "raise" or torch.compiler.is_compiling() or no_values(status):
        return
    code = int(status)
    if code == STORED:
        return
    if code == UNREPRESENTABLE:
        warn_once(where, "unrepresentable", f"{where}: the batch's running variance σ̂²·n/(n−1) overflows the "
                   "running_var buffer's dtype (|x − μ| too large for it); running_mean, running_var and "
                   "num_batches_tracked were left unchanged for this batch (the output is normalized correctly)",
                   stacklevel)
        return
    if tracked:
        msg = (f"{where}: the training batch has non-finite values (NaN or Inf) in its statistics; "
               "running_mean, running_var and num_batches_tracked were left unchanged")
    else:
        msg = (f"{where}: the training batch has non-finite values (NaN or Inf) in its statistics, so the output "
               "is non-finite (the layer tracks no running statistics: track_running_stats=False)")
    raise NonFiniteBatchError(msg + " (nonfinite='skip', the default, skips such batches on the device)")


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


def reference_batch_norm(input: Tensor, tensors: BatchNormTensors, options: NormOptions, training: bool,
                         momentum: float | Tensor, where: str, skipped: Tensor | None = None) -> Tensor:
    """The plain reference path (autograd through every op) of :func:`normmatters.functional.lp_batch_norm` on
    one :class:`BatchNormTensors` and validated ``options``; ``momentum`` the mixing factor of this step
    (:func:`call_momentum`); ``skipped`` the layer's counter of skipped batches (:func:`report_nonfinite`)."""
    weight, bias, running_mean, running_var, num_batches_tracked = tensors
    norm, k, chunks, eps = options.norm, options.k, options.chunks, options.eps
    est = get_estimator(norm)
    check_input(input, where=where)
    check_eps(eps, training, where)
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

    if input.numel() == 0:
        return empty_batch_norm(input, weight, bias, num_batches_tracked)
    groups, g, n = training_groups(input, where, norm, k, chunks, options.ghost_batch_size)
    acc = acc_dtype(input.dtype)
    x = input.reshape(groups, g, C, -1).to(acc)
    mean, sigma = _batch_statistics(x, norm, k, chunks)

    y = x - _broadcast(mean)
    if sigma is not None:
        y = y * _broadcast(inv_std(sigma, eps))
    if weight is not None:
        y = y * weight.to(acc)[None, None, :, None]
    if bias is not None:
        y = y + bias.to(acc)[None, None, :, None]
    y = y.reshape(input.shape).to(input.dtype)

    with torch.no_grad():
        ok = update_running_stats(mean, sigma, running_mean, running_var, num_batches_tracked, momentum, n)
    report_nonfinite(ok, options.nonfinite, where, skipped=skipped,
                     tracked=not (running_mean is None and running_var is None and num_batches_tracked is None))
    return y
