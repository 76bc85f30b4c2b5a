"""The per-sample (row) norm operators: one family, registered once with ``torch.library``.

* ``normmatters::lp_row_norm(x, weight?, bias?, n, norm, centered, c, eps, k, chunks, groups, spatial) -> y``:
  the entry point of every row-norm call (:mod:`.row_norm`); x of any shape holding rows of n elements
  (``x.reshape(-1, n)``), y of x's shape. CompositeImplicitAutograd: reshapes and calls the forward operator.
* ``lp_row_norm_fwd(x, weight?, bias?, norm, centered, c, eps, k, chunks, groups, spatial) -> (y, mean, raw,
  aux)``: x (R, n) contiguous; the math of :mod:`.row_formulas` (per row μ (centered only, else an empty tensor),
  the estimator's raw statistic, σ̂ = c·raw, y = w·(x − μ)/sqrt(σ̂² + eps) + b); mean, raw (R,) and aux ((R,):
  top-k's k-th largest |d|, for estimators with ``row_aux``; else empty) in the compute dtype (float32 for
  16-bit x). Differentiable in x, weight, bias, once: a C++ autograd Function (``csrc/row_norm_ops.cpp``).
* ``lp_row_norm_bwd(grad_y, x, weight?, mean, raw, aux, norm, centered, c, eps, k, chunks, groups, spatial,
  need_x, need_w, need_b) -> (grad_x, grad_w, grad_b)``: its backward (grad_w, grad_b flat in the compute
  dtype; an empty tensor where not needed).

Kernels per device: **CPU** the native C++/OpenMP kernels (``csrc/row_norm_kernels.h``, built with the batch-norm
kernels by :mod:`.native_build`); **every other device** the composite of torch ops below (:func:`_fwd_composite`,
:func:`_bwd_composite`: :mod:`.row_formulas` op by op), registered as the CompositeExplicitAutograd kernel so a
device-specific kernel (the CUDA / Triton one: register it for "CUDA" in :func:`_register`) takes precedence.
Fake (meta) implementations let ``torch.compile`` and ``torch.export`` trace them. Without a C++ compiler the
schemas are defined here instead, the composite serves the CPU too and the autograd is
``torch.library.register_autograd`` (the same backward operator).

Saved for backward: x, weight, mean, raw, aux — per row at most three scalars, against nn.LayerNorm's input,
weight, bias and per-row mean and rstd.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .._batch_stats import acc_dtype
from ..estimators import get_estimator
from . import native_build, row_formulas

__all__ = ["ensure", "ready", "fwd", "native", "SCHEMAS"]

_registered = False
_native = False
_lock = threading.Lock()
_lib: torch.library.Library | None = None

#: the operators' schemas (as ``csrc/row_norm_ops.cpp`` defines them; defined here only without the native library)
SCHEMAS = {
    "lp_row_norm_fwd": "lp_row_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, str norm, bool centered, float c, "
                       "float eps, int k, int chunks, int groups, int spatial) "
                       "-> (Tensor y, Tensor mean, Tensor raw, Tensor aux)",
    "lp_row_norm_bwd": "lp_row_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor raw, "
                       "Tensor aux, str norm, bool centered, float c, float eps, int k, int chunks, int groups, "
                       "int spatial, bool need_x, bool need_w, bool need_b) "
                       "-> (Tensor grad_x, Tensor grad_w, Tensor grad_b)",
    "lp_row_norm": "lp_row_norm(Tensor x, Tensor? weight, Tensor? bias, int n, str norm, bool centered, float c, "
                   "float eps, int k, int chunks, int groups, int spatial) -> Tensor",
}


def _affine_size(x: Tensor, groups: int, spatial: int) -> int:
    return groups * (x.shape[1] // spatial)


def _fwd_fake(x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial):
    R, acc = x.shape[0], acc_dtype(x.dtype)
    aux = R if get_estimator(norm).row_aux else 0
    return (torch.empty_like(x), x.new_empty(R if centered else 0, dtype=acc), x.new_empty(R, dtype=acc),
            x.new_empty(aux, dtype=acc))


def _bwd_fake(grad_y, x, weight, mean, raw, aux, norm, centered, c, eps, k, chunks, groups, spatial, need_x,
              need_w, need_b):
    acc, A = acc_dtype(x.dtype), _affine_size(x, groups, spatial)
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            x.new_empty(A if need_w and weight is not None else 0, dtype=acc),
            x.new_empty(A if need_b else 0, dtype=acc))


def _fwd_composite(x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial):
    """lp_row_norm_fwd as torch ops (:func:`.row_formulas.forward`), outputs in the native kernels' layout."""
    R = x.shape[0]
    y, mean, raw, aux = row_formulas.forward(x, weight, bias, c, eps, norm, centered, k, chunks, groups, spatial)
    aux_t = aux[0].reshape(R) if get_estimator(norm).row_aux else raw.new_empty(0)
    return y, (mean if centered else raw.new_empty(0)), raw, aux_t


def _bwd_composite(grad_y, x, weight, mean, raw, aux, norm, centered, c, eps, k, chunks, groups, spatial, need_x,
                   need_w, need_b):
    """lp_row_norm_bwd as torch ops (:func:`.row_formulas.backward`)."""
    R = x.shape[0]
    aux_t = (aux.reshape(1, 1, 1, R, 1),) if get_estimator(norm).row_aux else ()
    mean_t = mean if centered else raw.new_zeros(())
    need_w = need_w and weight is not None
    gx, gw, gb = row_formulas.backward(grad_y, x, weight, mean_t, raw, aux_t, c, eps, norm, centered, k, chunks,
                                       groups, spatial, need_w, need_b)
    empty = raw.new_empty(0)
    return (gx if need_x else x.new_empty(0)), (gw if need_w else empty), (gb if need_b else empty)


def _row_composite(x, weight, bias, n, norm, centered, c, eps, k, chunks, groups, spatial):
    """lp_row_norm without the native library (the C++ CompositeImplicitAutograd kernel's twin)."""
    y = torch.ops.normmatters.lp_row_norm_fwd(x.reshape(-1, n).contiguous(), weight, bias, norm, centered, c, eps,
                                              k, chunks, groups, spatial)[0]
    return y.view(x.shape)


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial = inputs
    _, mean, raw, aux = output
    ctx.save_for_backward(x, weight, mean, raw, aux)
    ctx.args = (norm, centered, c, eps, k, chunks, groups, spatial)
    ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)
    ctx.mark_non_differentiable(mean, raw, aux)


def _backward(ctx, gy, _gmean, _graw, _gaux):
    x, weight, mean, raw, aux = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if gy is None:
        gy = torch.zeros_like(x)
    gx, gw, gb = torch.ops.normmatters.lp_row_norm_bwd(gy, x, weight, mean, raw, aux, *ctx.args, need_x,
                                                       need_w and weight is not None, need_b)
    gw = gw.reshape(weight.shape).to(weight.dtype) if need_w and weight is not None else None
    gb = gb.reshape(ctx.bias_like[0]).to(ctx.bias_like[1]) if need_b and ctx.bias_like is not None else None
    return (gx if need_x else None, gw, gb) + (None,) * 8


def _register(native: bool) -> None:
    global _lib
    _lib = torch.library.Library("normmatters", "FRAGMENT")
    if not native:  # no C++ library: the schemas, lp_row_norm and the autograd from here
        for schema in SCHEMAS.values():
            _lib.define(schema)
        _lib.impl("lp_row_norm", _row_composite, "CompositeImplicitAutograd")
        torch.library.register_autograd("normmatters::lp_row_norm_fwd", _backward, setup_context=_setup)
    # --- the per-device kernels: CPU native (C++), every other device this composite. A CUDA (Triton) kernel
    # --- registers here for "CUDA" (torch.library.register_kernel) and takes precedence over the composite.
    _lib.impl("lp_row_norm_fwd", _fwd_composite, "CompositeExplicitAutograd")
    _lib.impl("lp_row_norm_bwd", _bwd_composite, "CompositeExplicitAutograd")
    torch.library.register_fake("normmatters::lp_row_norm_fwd")(_fwd_fake)
    torch.library.register_fake("normmatters::lp_row_norm_bwd")(_bwd_fake)


def ensure() -> bool:
    """Register the row operators once: build/load the native library (:func:`.native_build.load`, one warning if
    it cannot be built — then the operators are defined here with the composite as every device's kernel), the
    composite kernels and the fake implementations. True once the operators exist."""
    global _registered, _native
    if _registered:
        return True
    with _lock:
        if not _registered:
            _native = native_build.load()
            _register(_native)
            _registered = True
    return True


def ready() -> bool:
    """Whether :func:`ensure` has run (a plain flag: readable while ``torch.compile`` traces)."""
    return _registered


def native() -> bool:
    """Whether the CPU kernel of the operators is the native C++ one (False: the composite)."""
    return _native


def fwd(x2: Tensor, weight: Tensor | None, bias: Tensor | None, norm: str, centered: bool, c: float, eps: float,
        k: int, chunks: int, groups: int, spatial: int) -> Tensor:
    """y of ``normmatters::lp_row_norm`` for rows x2 (R, n) (differentiable); call :func:`ensure` first."""
    return torch.ops.normmatters.lp_row_norm(x2, weight, bias, x2.shape[-1], norm, centered, c, eps, k, chunks,
                                             groups, spatial)
