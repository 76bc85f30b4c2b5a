"""``lp_batch_norm``: Lp batch norm as a function, the entry point every batch-norm layer calls (as ``F.batch_norm``
is for ``nn.BatchNorm2d``): validation, then one call of the dispatch (:func:`normmatters.kernels.dispatch.batch_norm`),
so the function runs the same kernel a layer does (native CPU kernels, Inductor/Triton, eager formulas).

The math (training, per channel c and ghost batch; :mod:`normmatters._batch_stats` has the details)::

    μ_c   = mean(x_c)                                   over the n = (batch · spatial) elements
    σ̂_c   = estimator(x_c − μ_c)                        see :mod:`normmatters.estimators`
    y     = weight_c · (x − μ_c) / sqrt(σ̂_c² + eps) + bias_c
    running_mean ← (1 − momentum) · running_mean + momentum · μ_c
    running_var  ← (1 − momentum) · running_var  + momentum · σ̂_c² · n / (n − 1)

exactly the conventions of ``nn.BatchNorm`` (for ``norm="l2"`` it *is* batch norm); eval mode divides by
``sqrt(running_var + eps)`` through ``F.batch_norm``. Non-finite batches are skipped on the device (no host
synchronisation; ``nonfinite="raise"`` syncs and raises :class:`NonFiniteBatchError`).

The validation helpers, the running-statistics update and the reference path live in
:mod:`normmatters._batch_stats` (below the kernels) and are re-exported here under their old names.

References: Ioffe & Szegedy 2015 (batch norm); Hoffer et al. 2018 "Norm matters" (Lp batch norm);
Banner et al. 2018 (range batch norm); Hoffer, Hubara & Soudry 2017 (ghost batch norm).
"""

from __future__ import annotations

from torch import Tensor

from ._batch_stats import (
    NONFINITE,
    NONFINITE_MODES,
    STORED,
    UNREPRESENTABLE,
    BatchNormTensors,
    LayerName,
    NonFiniteBatchError,
    acc_dtype,
    call_momentum,
    check_channel_vectors,
    check_eps,
    check_inplace_input,
    check_inplace_weight,
    check_input,
    check_running_stats,
    empty_batch_norm,
    inv_std,
    no_values,
    reference_batch_norm,
    report_nonfinite,
    training_groups,
    update_running_stats,
    warn_once,
)
from .kernels import dispatch
from .options import NormOptions

__all__ = ["lp_batch_norm", "reference_batch_norm", "BatchNormTensors", "call_momentum", "NonFiniteBatchError",
           "NONFINITE_MODES", "check_input", "training_groups",
           "update_running_stats", "report_nonfinite", "acc_dtype", "check_running_stats",
           "check_channel_vectors", "check_inplace_weight", "check_inplace_input", "check_eps", "inv_std",
           "empty_batch_norm", "LayerName", "no_values", "warn_once", "STORED", "NONFINITE", "UNREPRESENTABLE"]


def lp_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    norm: str = "l1",
    k: int = 10,
    chunks: int | None = None,
    ghost_batch_size: int | None = None,
    *,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "skip",
    where: str = "lp_batch_norm",
    impl: str | None = None,
    inplace: bool = False,
    options: NormOptions | None = None,
) -> Tensor:
    """Lp batch normalization of ``input`` (N, C, *) — see the module docstring for the formulas.

    Args follow ``F.batch_norm``; in addition ``norm``, ``k`` (topk), ``chunks`` (range) and
    ``ghost_batch_size`` pick the statistic (:mod:`normmatters.estimators`). ``num_batches_tracked``, if
    given, is incremented only when the batch is stored. ``nonfinite``: "skip" (default: a batch with NaN/Inf
    statistics, or whose running variance overflows the buffer's dtype, leaves every buffer unchanged, decided on
    the device with no host synchronisation), "ignore" (the same) or "raise" (reads the status back to the host
    after the step — one device synchronisation per call — and raises :class:`NonFiniteBatchError`). ``impl``:
    the kernel (None: ``$NORMMATTERS_KERNEL``, else "auto"; "native", "compiled", "eager", "reference" — the
    plain reference path; see :mod:`normmatters.kernels.dispatch`). ``inplace``: In-Place ABN, the training
    output overwrites ``input`` (see :func:`normmatters.kernels.lean_batch_norm`). ``where`` names the caller in
    errors. ``options``: a :class:`~normmatters.options.NormOptions` carrying every option at once (one given
    explicitly as well must agree with it; its ``precision``, if set, emulates the training forward).
    Per-channel tensors (weight, bias, running buffers) must have shape (C,) (``ValueError`` naming the argument).
    Returns a tensor of the input's shape, dtype and memory format.
    """
    opts = NormOptions.resolve(options, where, momentum=momentum, eps=eps, norm=norm, k=k,
                               chunks=chunks, ghost_batch_size=ghost_batch_size, nonfinite=nonfinite, impl=impl,
                               inplace=inplace)
    check_input(input, where=where)
    check_channel_vectors(input.shape[1], where, weight=weight, bias=bias, running_mean=running_mean,
                          running_var=running_var)
    tensors = BatchNormTensors(weight, bias, running_mean, running_var, num_batches_tracked)
    updates = training and not (running_mean is None and running_var is None)
    return dispatch.batch_norm(input, tensors, opts, training,
                               call_momentum(opts.momentum, num_batches_tracked, where, updates), where)

