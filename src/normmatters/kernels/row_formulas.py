"""The per-sample (row) Lp normalization math as plain, traceable tensor code: the ``"compiled"`` (Inductor) and
``"eager"`` paths of :mod:`.row_norm`, and the Python twin of ``csrc/row_norm_kernels.h``.

Layout: x is (R, n) — R rows (samples; for group norm sample × group), n normalized elements per row, the
affine parameters indexed per element (layer / RMS norm, ``S = 1``) or per channel (group norm: row r holds
group r mod G, channels of S spatial elements each). Per row, with d = x − μ (μ = mean(x) when ``centered``,
else 0: RMS norm), raw the estimator's statistic of d (range: of x, in m contiguous chunks), σ̂ = c·raw and
r = 1/sqrt(σ̂² + eps) (:func:`normmatters.functional.inv_std`)::

    forward   y = w·r·d + b
    backward  gh = g·w,  x̂ = r·d,  Sx̂ = Σ gh·x̂ per row
              ∂L/∂x = r·(gh − [centered] mean(gh)) − r·Sx̂ · r·(e − [centered] mean(e))
              ∂L/∂w = Σ_rows g·x̂,  ∂L/∂b = Σ_rows g       (per element, or per channel for group norm)

e = σ̂·∂σ̂/∂x (the registry's ``lean_dstat``, here with each row as a "channel" of the lean layout
(G, m, q, C, S) = (1, m, 1, R, n/m)); the statistic and its backward pieces come from
:mod:`normmatters.estimators` — this file composes them. Backward reads x, w, μ and raw (and, for estimators with
``row_aux``, the saved threshold); the other comparison thresholds (max |d|, the chunk extremes) are recomputed
from d by ``Estimator.lean_thresholds``, exactly as the forward computed them. Half / bfloat16 rows are
computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._batch_stats import acc_dtype, inv_std
from ..estimators import get_estimator

__all__ = ["forward", "backward", "reference", "to_lean", "from_lean"]


def to_lean(t: Tensor, m: int) -> Tensor:
    """(R, n) → the lean layout (1, m, 1, R, n/m) (a view)."""
    R, n = t.shape
    return t.reshape(R, m, n // m).permute(1, 0, 2)[None, :, None]


def from_lean(t5: Tensor, R: int, n: int) -> Tensor:
    """The inverse of :func:`to_lean` for an elementwise (1, m, 1, R, n/m) tensor."""
    return t5[0, :, 0].permute(1, 0, 2).reshape(R, n)


def _affine_mul(t: Tensor, weight: Tensor | None, groups: int, spatial: int) -> Tensor:
    """t (R, n) times the weight (groups · n/spatial,): of element j of row r, index
    (r mod groups)·n/spatial + j // spatial (layer / RMS norm: groups = spatial = 1, per element; group norm:
    per channel)."""
    if weight is None:
        return t
    R, n = t.shape
    return (t.reshape(-1, groups, n // spatial, spatial) * weight.to(t.dtype).reshape(groups, -1, 1)).reshape(R, n)


def _affine_add(t: Tensor, bias: Tensor | None, groups: int, spatial: int) -> Tensor:
    if bias is None:
        return t
    R, n = t.shape
    return (t.reshape(-1, groups, n // spatial, spatial) + bias.to(t.dtype).reshape(groups, -1, 1)).reshape(R, n)


def _affine_sum(t: Tensor, groups: int, spatial: int) -> Tensor:
    """Σ over rows of t (R, n), per affine index: (groups · n/spatial,)."""
    R, n = t.shape
    return t.reshape(-1, groups, n // spatial, spatial).sum((0, 3)).reshape(-1)


def stats(x: Tensor, norm: str, centered: bool, k: int, m: int) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(μ (R,) or a 0-dim zero, raw (R,), aux) of rows x in the compute dtype."""
    est = get_estimator(norm)
    R, n = x.shape
    x5 = to_lean(x, m)
    if centered:
        mean5, raw5, aux = est.lean_stats(x5, k)
        mean = mean5.reshape(R)
    else:
        raw5, aux = est.lean_raw(x5, x5, k)
        mean = x.new_zeros(())
    return mean, raw5.reshape(R), aux


def forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, c: float, eps: float, norm: str,
            centered: bool, k: int, m: int, groups: int,
            spatial: int) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """(y in x2's dtype, μ (R,) or 0-dim, raw (R,), aux) — aux the estimator's thresholds in the lean layout."""
    x = x2.to(acc_dtype(x2.dtype))
    mean, raw, aux = stats(x, norm, centered, k, m)
    r = inv_std(raw * c, eps)
    d = x - mean[:, None] if centered else x
    y = _affine_add(_affine_mul(d * r[:, None], weight, groups, spatial), bias, groups, spatial)
    return y.to(x2.dtype), mean, raw, aux


def backward(gy2: Tensor, x2: Tensor, weight: Tensor | None, mean: Tensor, raw: Tensor, aux: tuple[Tensor, ...],
             c: float, eps: float, norm: str, centered: bool, k: int, m: int, groups: int, spatial: int,
             need_w: bool, need_b: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(∂L/∂x in x2's dtype, ∂L/∂w, ∂L/∂b flat, in the compute dtype) from the saved rows — see the module
    docstring. ``aux`` empty: the thresholds are recomputed from d."""
    est = get_estimator(norm)
    acc = acc_dtype(x2.dtype)
    x = x2.to(acc)
    g = gy2.to(acc)
    R, n = x.shape
    d = x - mean[:, None] if centered else x
    sigma = raw * c
    r = inv_std(sigma, eps)[:, None]
    xh = d * r
    gh = _affine_mul(g, weight, groups, spatial)
    sum_gx = (gh * xh).sum(1, keepdim=True)  # Σ gh·x̂
    d5 = to_lean(d, m)
    raw5 = raw.reshape(1, 1, 1, R, 1)
    if aux:
        x5, raw_t, aux_t = to_lean(x, m), raw5, aux
    else:  # thresholds recomputed from d (the centered rows serve as x, μ = 0)
        x5 = d5
        raw_t, aux_t = est.lean_thresholds(d5, raw5, (), k)
    c_t = torch.tensor(c, dtype=acc, device=x.device)
    sums = est.lean_sums(x5, d5, raw_t, aux_t)
    e5, e_mean = est.lean_dstat(x5, d5, c_t, raw_t, sigma.reshape(1, 1, 1, R, 1), aux_t, sums, n, k)
    e = from_lean(e5.expand(d5.shape), R, n)
    if centered:
        e = e - e_mean.reshape(R, 1)
        gh_c = gh - gh.mean(1, keepdim=True)
    else:
        gh_c = gh
    gx = r * gh_c - (r * sum_gx) * (r * e)
    gw = _affine_sum(g * xh, groups, spatial) if need_w else None
    gb = _affine_sum(g, groups, spatial) if need_b else None
    return gx.to(x2.dtype), gw, gb


def reference(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, centered: bool, k: int,
              chunks: int | None, groups: int, spatial: int) -> Tensor:
    """The reference path (``impl="reference"``): y (R, n) in x2's dtype from the registry's ``statistic`` (centered)
    or ``statistic_uncentered`` (RMS norm) over each row, autograd through every op — the definition the fast paths
    are tested against."""
    est = get_estimator(norm)
    x = x2.to(acc_dtype(x2.dtype))
    n = x.shape[1]
    if centered:
        mean = x.mean(1)
        sigma = est.statistic(x, mean if est.needs_mean else None, (1,), n, k=k, chunks=chunks)
        d = x - mean[:, None]
    else:
        sigma = est.statistic_uncentered(x, (1,), n, k=k, chunks=chunks)
        d = x
    y = d * inv_std(sigma, eps)[:, None]
    return _affine_add(_affine_mul(y, weight, groups, spatial), bias, groups, spatial).to(x2.dtype)
