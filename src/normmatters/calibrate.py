"""``calibrate_norms``: fit the Lp layers swapped into a trained network to the activations they actually see.

The Gaussian-consistency constants (:mod:`normmatters.estimators`) make E[σ̂] = σ for Gaussian activations. Trained
networks are not Gaussian (transformers have a few outlier features, CNN channels are skewed by ReLUs), so right
after a swap σ̂ differs from the standard deviation the layer was trained with by a factor that varies from layer to
layer (and channel to channel). Calibration measures that factor on a few batches and folds it into the layer.

Model. For a stat unit r (a row of a layer norm, a sample×group of a group norm, a sample×channel of an instance
norm, a channel of a batch norm, per ghost batch) let ``s₁ = sqrt(σ̂²_Lp + eps)`` and ``s₂ = sqrt(σ²_L2 + eps)``
(σ² the biased variance, or the mean square for RMS norm: what the stock layer divides by). The L2 layer outputs
``w·d/s₂ + b``, the Lp layer ``w·d/s₁ + b``. Calibration multiplies the layer's gain by f (per layer, or per
channel with ``per_channel=True``)::

    y = (f·w)·d/s₁ + b ≈ w·d/s₂ + b        i.e. f ≈ s₁/s₂

which is exactly the same as dividing by σ̂_Lp/f (up to eps: the fold keeps eps, so it is exact where σ̂² ≫ eps).
The factor lives in what the layer already stores — ``weight ← f·weight`` (Gemma's ``1 + weight`` form:
``1 + weight ← f·(1 + weight)``), and for batch norm / instance norm with running statistics also
``running_var ← f²·running_var``, so eval (which divides by sqrt(running_var + eps)) keeps its output and training
(which divides by the batch σ̂_Lp ≈ f·σ and moves running_var towards σ̂²_Lp) starts consistent with it. Nothing
is added to the layer: the calibration is in the state_dict, costs nothing per call and exports as is. A layer
without an affine weight has nowhere to keep f: it is reported as not calibrated.

Estimator (chosen by measurement): f is the least-squares fit of the layer's output to its L2 counterpart's
output over every element of every batch,

    f* = argmin_f Σ (f·w·d/s₁ − w·d/s₂)² = Σ_c w_c² Q_c / Σ_c w_c² P_c,   P_c = Σ d²/s₁²,  Q_c = Σ d²/(s₁ s₂)

(``per_channel=True``: f_c = Q_c / P_c for each channel / feature c). Measured (held-out relative output drift of
the whole network; the acceptance network of two layer norms with two outlier features, 8 batches of 64): before →
least squares per layer / per feature, median of s₁/s₂ per layer: l1 0.078 → 0.046 / 0.060, 0.045; linf 0.357 →
0.077 / 0.082, 0.079; range 0.293 → 0.061 / 0.060, 0.062; topk 0.139 → 0.035 / 0.043, 0.035. Least squares and
the median tie; least squares is the default because it minimizes exactly the drift the report gives and keeps
O(C) sums instead of every ratio. Per-feature factors of a layer norm are worse (they chase the outlier features),
so per-sample norms get one factor per layer; batch norm, whose σ̂ is a per-channel statistic, gets per-channel
factors (a small CNN: equal or slightly better than per layer; near-Gaussian activations leave little to fix there,
the remaining drift is the estimator's sampling noise, which no constant removes). ``per_channel=None`` (default)
picks per-channel for batch and instance norm and per-layer for layer / RMS / group norm. The report gives each
layer's drift before and after: ‖y_Lp − y_L2‖/‖y_L2 − b‖ of the layer's output on the calibration batches.

Layers are fitted one at a time in forward order, each on the activations that the already calibrated layers
before it produce: for each layer the batches run through the model (in eval mode, without gradients) until that
layer, whose input is measured, and the forward is cut there.

Which layers: every Lp layer in the model whose norm divides and is not ``l2`` (l2 is its own L2 counterpart).
Calling it again refits from scratch on the same in-memory model (the factor applied before is undone first); a
model that loaded a calibrated state_dict is already calibrated (calibrating it again would compound).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .estimators import get_estimator
from .nn.batchnorm import LpBatchNorm
from .nn.instancenorm import LpInstanceNorm
from .nn.layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm

__all__ = ["calibrate_norms", "CalibrationReport", "LayerCalibration"]

log = logging.getLogger(__name__)

#: the stock layers' estimator: what every calibrated layer is fitted to
_L2 = "l2"
#: per-layer attribute holding the factor applied by the last calibration (in memory only)
_APPLIED = "_nm_calibration"
_METHODS = ("lstsq", "median")


@dataclass
class LayerCalibration:
    """One layer's calibration: ``factor`` the per-layer factor (per-channel: their mean), ``factors`` the
    per-channel ones (None when per-layer), drifts relative (see the module docstring); ``calibrated`` False with
    ``reason`` when the layer was left as it was."""

    name: str
    layer: str
    norm: str
    factor: float = 1.0
    factors: Tensor | None = None
    drift_before: float = math.nan
    drift_after: float = math.nan
    calibrated: bool = False
    reason: str = ""


class CalibrationReport(list):
    """The list of :class:`LayerCalibration` of one :func:`calibrate_norms` call, in forward order; ``str()`` is a
    table."""

    def __str__(self) -> str:
        head = f"{'layer':<32} {'class':<18} {'norm':<6} {'factor':>8} {'drift before':>13} {'drift after':>12}"
        lines = [head, "-" * len(head)]
        for r in self:
            if r.calibrated:
                fac = f"{r.factor:8.4f}" + ("*" if r.factors is not None else " ")
                lines.append(f"{r.name[:32]:<32} {r.layer[:18]:<18} {r.norm:<6} {fac:>8} {r.drift_before:13.4f} "
                             f"{r.drift_after:12.4f}")
            else:
                lines.append(f"{r.name[:32]:<32} {r.layer[:18]:<18} {r.norm:<6} not calibrated: {r.reason}")
        if any(r.factors is not None for r in self):
            lines.append("* per-channel factors (their mean shown)")
        return "\n".join(lines)


@dataclass
class _Sums:
    """Per-channel sums over every stat unit of every batch: P = Σ d²/s₁², Q = Σ d²/(s₁s₂), S = Σ d²/s₂², and the
    ratios s₁/s₂ (kept for the median estimator), in float64."""

    P: Tensor | None = None
    Q: Tensor | None = None
    S: Tensor | None = None
    ratios: list[Tensor] = field(default_factory=list)

    keep_ratios: bool = False

    def add(self, e: Tensor, s1: Tensor, s2: Tensor) -> None:
        """e: (R, C) sums of d² per unit and channel; s1, s2: (R, C) or (R, 1) scales of each unit."""
        e, s1, s2 = e.double(), s1.double(), s2.double()
        p, q, s = (e / s1.square()).sum(0), (e / (s1 * s2)).sum(0), (e / s2.square()).sum(0)
        self.P = p if self.P is None else self.P + p
        self.Q = q if self.Q is None else self.Q + q
        self.S = s if self.S is None else self.S + s
        if self.keep_ratios:
            self.ratios.append((s1 / s2).float())


def _unit_scales(est, rows: Tensor, centered: bool, n: int, eps: float, k: int,
                 chunks: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(d, s₁, s₂) of (R, n) rows: deviations and sqrt(σ̂² + eps) of the Lp estimator and of l2, from the
    estimator registry (centered: μ subtracted, else the uncentered statistic of RMS norm)."""
    l2 = get_estimator(_L2)
    if centered:
        mean = rows.mean(1)
        s_lp = est.statistic(rows, mean if est.needs_mean else None, (1,), n, k=k, chunks=chunks)
        s_l2 = l2.statistic(rows, mean, (1,), n)
        d = rows - mean[:, None]
    else:
        s_lp = est.statistic_uncentered(rows, (1,), n, k=k, chunks=chunks)
        s_l2 = l2.statistic_uncentered(rows, (1,), n)
        d = rows
    return d, (s_lp.square() + eps).sqrt(), (s_l2.square() + eps).sqrt()


def _compute(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _measure(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(e, s₁, s₂) of one input of ``layer``: e (R, C) sums of d² per stat unit and channel (C: the entries of the
    layer's weight, flattened), s₁/s₂ (R, C) or (R, 1)."""
    view = getattr(layer, "_nm_norm_input", None)  # adapters whose input is laid out differently (channels-first)
    if view is not None:
        x = view(x)
    est = get_estimator(layer.norm)
    k, chunks = getattr(layer, "k", 10), getattr(layer, "chunks", None)
    if isinstance(layer, (LpLayerNorm, LpRMSNorm)):
        n = math.prod(layer.normalized_shape)
        rows = _compute(x).reshape(-1, n)
        centered = isinstance(layer, LpLayerNorm)
        eps = layer.eps if layer.eps is not None else torch.finfo(x.dtype).eps
        d, s1, s2 = _unit_scales(est, rows, centered, n, eps, k, chunks)
        return d.square(), s1[:, None], s2[:, None]
    if isinstance(layer, (LpGroupNorm, LpInstanceNorm)):
        if isinstance(layer, LpInstanceNorm) and x.dim() == layer._get_no_batch_dim():
            x = x.unsqueeze(0)
        N, C = x.shape[:2]
        G = layer.num_groups if isinstance(layer, LpGroupNorm) else C
        rows = _compute(x).reshape(N * G, -1)
        d, s1, s2 = _unit_scales(est, rows, True, rows.shape[1], layer.eps, k, chunks)
        e = d.reshape(N, C, -1).square().sum(2)
        rep = C // G
        return e, s1.reshape(N, G).repeat_interleave(rep, 1), s2.reshape(N, G).repeat_interleave(rep, 1)
    if isinstance(layer, LpBatchNorm):
        N, C = x.shape[:2]
        G = N // layer.ghost_batch_size if layer.ghost_batch_size else 1
        rows = _compute(x).reshape(G, N // G, C, -1).permute(0, 2, 1, 3).reshape(G * C, -1)
        d, s1, s2 = _unit_scales(est, rows, True, rows.shape[1], layer.eps, k, chunks)
        return d.square().sum(1).reshape(G, C), s1.reshape(G, C), s2.reshape(G, C)
    raise TypeError(f"calibrate_norms: no calibration for {type(layer).__name__}")  # unreachable: _candidates


def _gain(layer: nn.Module) -> Tensor | None:
    """The layer's effective gain (C,) (weight, or 1 + weight for the Gemma form), or None without one."""
    g = getattr(layer, "_nm_gain", None)
    if g is not None:
        return g().detach().reshape(-1)
    w = getattr(layer, "weight", None)
    return None if w is None else w.detach().reshape(-1)


@torch.no_grad()
def _fold(layer: nn.Module, f: Tensor) -> None:
    """Multiply the layer's gain by f (scalar or (C,)), and running_var by f² where the layer keeps one."""
    scale = getattr(layer, "_nm_scale_gain", None)
    w = layer.weight
    if scale is not None:
        scale(f)
    else:
        w.mul_(f.to(w.dtype).reshape(w.shape) if f.dim() else f.to(w.dtype))
    rv = getattr(layer, "running_var", None)
    if isinstance(layer, (LpBatchNorm, LpInstanceNorm)) and rv is not None:
        rv.mul_(f.to(rv.dtype).square())


def _drift(sums: _Sums, w2: Tensor, f: Tensor) -> float:
    num = (w2 * (f.square() * sums.P - 2 * f * sums.Q + sums.S)).sum().clamp_min(0)
    return float((num / (w2 * sums.S).sum()).sqrt())


def _fit(sums: _Sums, w2: Tensor, per_channel: bool, method: str) -> Tensor:
    C = sums.P.numel()
    if method == "lstsq":
        if per_channel:
            return torch.where(sums.P > 0, sums.Q / sums.P.clamp_min(1e-300), torch.ones_like(sums.P))
        return (w2 * sums.Q).sum() / (w2 * sums.P).sum()
    ratios = torch.cat(sums.ratios).double()  # (units, C or 1)
    if per_channel and ratios.shape[1] == C:
        return ratios.median(0).values
    return ratios.median()


class _Stop(Exception):
    """Cuts the forward after the layer being measured."""


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (LpBatchNorm, LpLayerNorm, LpRMSNorm, LpGroupNorm, LpInstanceNorm)):
            est = get_estimator(m.norm)
            if est.divides and est is not get_estimator(_L2):
                out.append((name or "(model)", m))
    return out


def calibrate_norms(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None,
                    per_channel: bool | None = None, method: str = "lstsq") -> CalibrationReport:
    """Fit every Lp layer of ``model`` (norm not ``l2``) so that it normalizes the activations it sees on
    ``batches`` as its L2 counterpart (the stock layer it replaced) did; returns a :class:`CalibrationReport`.

    Args:
        model: the model, changed in place (its weights and, for batch / instance norm, running variances); its
            training mode is restored afterwards.
        batches: an iterable of model inputs: a tensor (``model(x)``), a tuple / list of positional inputs
            (``model(*b)``) or a dict of keyword inputs (``model(**b)``), on the model's device. Iterated once and
            kept (at most ``max_batches`` of them), as every layer is fitted on all of them.
        max_batches: use only the first this many batches.
        per_channel: one factor per channel / feature (True), one per layer (False), or None (default): per
            channel for batch and instance norm, per layer for layer, RMS and group norm.
        method: "lstsq" (default: least squares on the layer's outputs) or "median" (median of s₁/s₂ over the
            stat units) — see the module docstring for the formulas and why least squares is the default.

    Formula: weight ← f·weight (and running_var ← f²·running_var), f ≈ sqrt(σ̂²_Lp + eps)/sqrt(σ²_L2 + eps).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate_norms: model must be an nn.Module, got {type(model).__name__}")
    if method not in _METHODS:
        raise ValueError(f"calibrate_norms: method must be one of {_METHODS}, got {method!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"calibrate_norms: max_batches must be a positive int or None, got {max_batches!r}")
    kept = []
    for b in batches:
        if max_batches is not None and len(kept) >= max_batches:
            break
        kept.append(b)
    if not kept:
        raise ValueError("calibrate_norms: batches is empty: give at least one model input")
    layers = _candidates(model)
    report = CalibrationReport()
    if not layers:
        return report
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            order, calls = _forward_order(model, layers, kept[0])
            for name, layer in sorted(layers, key=lambda nl: order.get(nl[1], math.inf)):
                report.append(_calibrate_one(model, name, layer, kept, calls.get(layer, 0), per_channel, method))
    finally:
        for m, mode in modes.items():
            m.training = mode
    log.info("calibrate_norms:\n%s", report)
    return report


def _forward_order(model: nn.Module, layers, batch) -> tuple[dict, dict]:
    order: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}

    def hook(m, args):
        order.setdefault(m, len(order))
        calls[m] = calls.get(m, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    try:
        _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls


def _calibrate_one(model, name, layer, batches, calls, per_channel, method) -> LayerCalibration:
    rec = LayerCalibration(name=name, layer=type(layer).__name__, norm=layer.norm)
    if calls == 0:
        rec.reason = "not reached by the batches"
        return rec
    gain = _gain(layer)
    if gain is None:
        rec.reason = "no affine weight to keep the factor in"
        return rec
    sums = _Sums(keep_ratios=method == "median")

    def hook(m, args):
        e, s1, s2 = _measure(m, args[0])
        sums.add(e, s1, s2)
        if calls == 1:
            raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for b in batches:
            try:
                _run(model, b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if sums.P is None:
        rec.reason = "not reached by the batches"
        return rec
    pc = isinstance(layer, (LpBatchNorm, LpInstanceNorm)) if per_channel is None else per_channel
    prev = layer.__dict__.get(_APPLIED)
    w = gain.double()
    if prev is not None:  # measure against the uncalibrated gain
        w = w / prev.to(w)
    w2 = w.square()
    f = _fit(sums, w2, pc, method)
    if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
        rec.reason = "no finite positive factor (constant activations?)"
        return rec
    f_prev = torch.ones((), dtype=torch.float64) if prev is None else prev.double()
    rec.drift_before = _drift(sums, w2, f_prev.expand_as(sums.P))
    rec.drift_after = _drift(sums, w2, f.expand_as(sums.P))
    _fold(layer, f / f_prev)
    layer.__dict__[_APPLIED] = f.float()
    rec.factor, rec.factors, rec.calibrated = float(f.mean()), (f.float() if f.dim() else None), True
    return rec
