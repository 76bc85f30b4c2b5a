"""Emulated low-precision normalization: every intermediate of the batch-norm computation is rounded.

For rows r (channel × ghost group) of n reduced elements, with R_c / R_s / R_a rounding to the
*compute*, *statistics* and *accumulator* formats of a :class:`Precision`::

    input       x̃    = R_c(x)
    sum_x       S₁   = Σ_a x̃                 every partial sum rounded by R_a, in the chosen order
    mean        μ    = R_s(S₁ / n)            (the division by n)
    center      d    = R_c(x̃ − μ)
    l2:  square d²   = R_c(d · d);  sum_sq S = Σ_a d²;  div_n v = R_s(S / n)
         add_eps R_s(v + eps);  sqrt s = R_s(√·)
    l1:  abs |d| (exact);  sum_abs S = Σ_a |d|;  div_n R_s(S / n);  constant σ̂ = R_s(c(n) · ·)
    linf: max |d| (exact);  constant σ̂ = R_s(c(n) · max)
    topk: sum_topk Σ_a of the k largest |d|;  div_n R_s(S / k);  constant σ̂ = R_s(c · ·)
    range: range R_c(max − min) per chunk;  sum_range Σ_a over chunks;  div_n R_s(S / m);  constant
    (not l2) denominator s = √(σ̂² + eps) without forming σ̂² when σ̂ ≥ √eps:
         eps_ratio a = R_s(√eps / σ̂);  a² R_s;  1 + a² R_s;  sqrt R_s;  s = R_s(σ̂ · √(1 + a²))
         (σ̂ < √eps: s = R_s(√(R_s(R_s(σ̂²) + eps))) — no overflow is possible there)
    reciprocal  r    = R_s(1 / s)
    normalize   ŷ    = R_c(d · r);  scale R_c(ŷ · R_c(weight));  shift (output) R_c(· + R_c(bias))

Each operation is evaluated exactly enough in float64 and rounded once: operands are float32-representable,
and float64's 53 bits ≥ 2·24 + 2 make the double rounding of +, −, ×, ÷, √ innocuous (Figueroa 1995), so
``fp32`` everywhere reproduces float32 arithmetic. The constant c(n) comes from the estimator registry
(:mod:`normmatters.estimators`), rounded to the statistics format like any other operand.

Summation orders (:func:`emulated_sum`): ``sequential`` (acc ← R_a(acc + xᵢ), i = 1…n: the naive loop;
in fp16 a sum of ones stalls at 2048 = 2^11 where the ulp becomes 2), ``pairwise`` (a balanced tree of
rounded additions, error O(u·log n)), ``blocked`` (sequential inside blocks of ``block`` elements, then
pairwise across blocks — the shape of a GPU warp-then-tree reduction).

The l2 path must form d² and Σd²: in fp16 d² overflows 65504 once |d| > 255.9, so at activation scale ~300
the variance becomes inf and the output collapses to the bias. l1, linf and range only ever form values of
the size of d (and a sum of n of them), which is the claim of Hoffer et al. 2018 (sec. 4, "low precision")
and Banner et al. 2018 (sec. 5, range batch norm); the emulator makes it measurable.

Events: for every step the count of overflows (a finite exact value rounded to ±inf or saturated),
underflows (a nonzero exact value rounded to zero) and NaN values present after the step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..estimators import get_estimator
from .formats import FloatFormat, Format, IntFormat, get_format, round_to

__all__ = ["Precision", "Events", "Rounder", "PRESETS", "get_precision", "emulated_sum",
           "emulate_normalization", "emulate_norms", "EmulationResult", "SUM_ORDERS"]

log = logging.getLogger(__name__)

SUM_ORDERS = ("sequential", "pairwise", "blocked")


@dataclass(frozen=True)
class Precision:
    """Which format each class of intermediate is rounded to.

    Attributes:
        compute: element-wise values (input, x − μ, d², ranges, output).
        accumulate: every partial sum of a reduction.
        stats: per-row statistics (μ, division by n, σ̂, √, reciprocal); defaults to ``compute``.
        order: summation order, one of ``SUM_ORDERS``.
        block: block length of the ``blocked`` order.
        rounding: ``"nearest"`` or ``"stochastic"``; ``seed`` seeds the stochastic draws.
        quantized_int8: the Banner et al. 2018 8-bit scheme instead (see :func:`emulated_lp_batch_norm`).
    """

    compute: Format
    accumulate: Format
    stats: Format | None = None
    order: str = "pairwise"
    block: int = 32
    rounding: str = "nearest"
    seed: int = 0
    name: str = ""
    quantized_int8: bool = False

    def __post_init__(self) -> None:
        if self.order not in SUM_ORDERS:
            raise ValueError(f"Precision: order must be one of {SUM_ORDERS}, got {self.order!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"Precision: block must be a positive int, got {self.block!r}")

    @property
    def stats_format(self) -> Format:
        return self.stats if self.stats is not None else self.compute

    @classmethod
    def uniform(cls, fmt: str | Format, **kw) -> Precision:
        f = get_format(fmt)
        return cls(compute=f, accumulate=f, name=kw.pop("name", f.name), **kw)


def _f(name: str) -> Format:
    return get_format(name)


#: the ``precision=`` strings of the layers.
#: fp16 / bf16: everything in that format, accumulators included (the paper's half-precision setting).
#: fp8: element-wise values in fp8, sums and per-channel statistics in fp16 — fp8 has too few mantissa bits
#: (2–3) for any sum, and mixed fp8/fp16 is how 8-bit float training accumulates (Wang et al. 2018).
#: int8: the quantized range-BN scheme of Banner et al. 2018.
PRESETS: dict[str, Precision] = {
    "fp32": Precision(_f("fp32"), _f("fp32"), name="fp32"),
    "bf16": Precision(_f("bf16"), _f("bf16"), name="bf16"),
    "fp16": Precision(_f("fp16"), _f("fp16"), name="fp16"),
    "fp8_e4m3": Precision(_f("fp8_e4m3"), _f("fp16"), _f("fp16"), name="fp8_e4m3"),
    "fp8_e5m2": Precision(_f("fp8_e5m2"), _f("fp16"), _f("fp16"), name="fp8_e5m2"),
    "int8": Precision(_f("fp32"), _f("fp32"), name="int8", quantized_int8=True),
}


def get_precision(precision: str | Precision, where: str = "precision") -> Precision:
    """A :class:`Precision` from a preset name (``PRESETS``) or pass-through."""
    if isinstance(precision, Precision):
        return precision
    if isinstance(precision, str) and precision in PRESETS:
        return PRESETS[precision]
    raise ValueError(f"{where}: precision must be None, a Precision or one of "
                     f"{', '.join(map(repr, PRESETS))}; got {precision!r}")


@dataclass
class Events:
    """Per-step counts: ``counts[step] = {"overflow": int, "underflow": int, "nan": int}``."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, step: str, overflow: int = 0, underflow: int = 0, nan: int = 0) -> None:
        c = self.counts.setdefault(step, {"overflow": 0, "underflow": 0, "nan": 0})
        c["overflow"] += overflow
        c["underflow"] += underflow
        c["nan"] += nan

    def total(self, kind: str) -> int:
        return sum(c[kind] for c in self.counts.values())

    def bad_steps(self) -> dict[str, dict[str, int]]:
        """The steps with at least one event."""
        return {s: c for s, c in self.counts.items() if any(c.values())}

    def __str__(self) -> str:
        bad = self.bad_steps()
        if not bad:
            return "no events"
        return "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v) for s, c in bad.items())


class Rounder:
    """Rounds float64 tensors to formats, counting events per step (and drawing seeded random bits)."""

    def __init__(self, precision: Precision, events: Events | None = None, count: bool = True) -> None:
        self.p = precision
        self.events = events if events is not None else Events()
        self.count = count
        stochastic = precision.rounding == "stochastic"
        self.gen = torch.Generator().manual_seed(precision.seed) if stochastic else None

    def __call__(self, exact: Tensor, fmt: Format, step: str) -> Tensor:
        out = round_to(exact, fmt, self.p.rounding, generator=self.gen)
        if self.count:
            finite = torch.isfinite(exact)
            if isinstance(fmt, IntFormat) or (isinstance(fmt, FloatFormat) and fmt.saturate):
                over = finite & (exact.abs() > fmt.max)
            else:
                over = finite & torch.isinf(out)
            under = (exact != 0) & finite & (out == 0)
            self.events.add(step, int(over.sum()), int(under.sum()), int(torch.isnan(out).sum()))
        return out

    def c(self, exact: Tensor, step: str) -> Tensor:
        return self(exact, self.p.compute, step)

    def s(self, exact: Tensor, step: str) -> Tensor:
        return self(exact, self.p.stats_format, step)


def emulated_sum(x: Tensor, fmt: str | Format, order: str = "pairwise", block: int = 32, *,
                 rounder: Rounder | None = None, step: str = "sum") -> Tensor:
    """Σ over the last dim of ``x`` (values already in the addends' format) with every partial sum rounded
    to ``fmt``. Vectorized over the leading dims; ``sequential`` loops over the n additions.

    Orders: see the module docstring. Returns a float64 tensor of shape ``x.shape[:-1]``.
    """
    fmt = get_format(fmt)
    if rounder is None:
        rounder = Rounder(Precision(fmt, fmt, order=order, block=block), count=False)
    x = x.to(torch.float64)
    n = x.shape[-1]
    if n == 0:
        return x.sum(-1)
    if order == "sequential":
        acc = x[..., 0]
        for i in range(1, n):
            acc = rounder(acc + x[..., i], fmt, step)
        return acc
    if order == "blocked":
        if n > block:
            pad = (-n) % block
            xb = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, block))
            acc = xb[..., 0]
            for i in range(1, block):
                acc = rounder(acc + xb[..., i], fmt, step)
            x = acc
        else:
            return emulated_sum(x, fmt, "sequential", rounder=rounder, step=step)
    elif order != "pairwise":
        raise ValueError(f"emulated_sum: order must be one of {SUM_ORDERS}, got {order!r}")
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (0, 1))  # + 0 is exact
        x = rounder(x[..., 0::2] + x[..., 1::2], fmt, step)
    return x[..., 0]


@dataclass
class EmulationResult:
    """Output ``y`` (rows, n), per-row ``mean``, ``sigma`` (σ̂, None for mean-only), ``inv`` (the rounded
    1/√(σ̂² + eps)) and the :class:`Events`; all float64 holding values of their formats."""

    y: Tensor
    mean: Tensor
    sigma: Tensor | None
    inv: Tensor | None
    events: Events


def _denominator(sigma: Tensor, eps: float, R: Rounder) -> Tensor:
    """√(σ̂² + eps) in the statistics format without forming σ̂² when σ̂ ≥ √eps (see module docstring)."""
    se = R.s(torch.tensor(math.sqrt(eps), dtype=torch.float64), "eps_ratio")
    out = torch.empty_like(sigma)
    big = sigma >= se
    if big.any():
        s = sigma[big]
        a = R.s(se / s, "eps_ratio")
        a2 = R.s(a * a, "eps_ratio")
        t = R.s(1 + a2, "add_eps")
        out[big] = R.s(s * R.s(torch.sqrt(t), "sqrt"), "denominator")
    small = ~big  # includes NaN σ̂, which propagates
    if small.any():
        s = sigma[small]
        t = R.s(R.s(s * s, "square_sigma") + eps, "add_eps")
        out[small] = R.s(torch.sqrt(t), "sqrt")
    return out


def emulate_normalization(x: Tensor, norm: str, precision: str | Precision, *, eps: float = 1e-5,
                          k: int = 10, chunks: int | None = None, weight: Tensor | None = None,
                          bias: Tensor | None = None, count_events: bool = True,
                          _centered: tuple[Tensor, Tensor, Tensor, Events] | None = None) -> EmulationResult:
    """Emulate ``y = weight · (x − μ) / √(σ̂² + eps) + bias`` per row of ``x`` (rows, n) with every
    intermediate rounded as the module docstring lists. ``weight``/``bias``: (rows,) or None.

    ``chunks`` (range only) splits each row into that many contiguous equal chunks.
    """
    p = get_precision(precision, "emulate_normalization")
    est = get_estimator(norm)
    R = Rounder(p, count=count_events)
    if x.dim() != 2:
        raise ValueError(f"emulate_normalization: expected a (rows, n) tensor, got shape {tuple(x.shape)}")
    rows, n = x.shape
    acc = p.accumulate

    def rsum(t: Tensor, step: str) -> Tensor:
        return emulated_sum(t, acc, p.order, p.block, rounder=R, step=step)

    if _centered is None:
        xq = R.c(x.to(torch.float64), "input")
        mean = R.s(rsum(xq, "sum_x") / n, "mean")
        d = R.c(xq - mean[:, None], "center")
    else:  # shared prefix from emulate_norms: (x̃, μ, d, events so far)
        xq, mean, d, ev0 = _centered
        for step, c in ev0.counts.items():
            R.events.add(step, **c)
    sigma = inv = None
    if est.divides:
        sigma, den = est.emulate_sigma(xq, d, n, eps, rsum, R, k=k, chunks=chunks)
        if den is None:
            den = _denominator(sigma, eps, R)
        inv = R.s(1 / den, "reciprocal")
        y = R.c(d * inv[:, None], "normalize")
    else:
        y = d
    if weight is not None:
        w = R.c(weight.detach().to(torch.float64), "weight")
        y = R.c(y * w[:, None], "scale")
    if bias is not None:
        b = R.c(bias.detach().to(torch.float64), "bias")
        y = R.c(y + b[:, None], "shift")
    return EmulationResult(y, mean, sigma, inv, R.events)


def emulate_norms(x: Tensor, norms: list[str] | tuple[str, ...], precision: str | Precision, *,
                  eps: float = 1e-5, k: int = 10, count_events: bool = True) -> dict[str, EmulationResult]:
    """:func:`emulate_normalization` for several norms on the same rows, computing the common steps
    (input, sum_x, mean, center) once — the arithmetic is identical to separate calls (stochastic rounding
    aside, whose draws are then shared)."""
    p = get_precision(precision, "emulate_norms")
    R = Rounder(p, count=count_events)
    n = x.shape[-1]
    xq = R.c(x.to(torch.float64), "input")
    mean = R.s(emulated_sum(xq, p.accumulate, p.order, p.block, rounder=R, step="sum_x") / n, "mean")
    d = R.c(xq - mean[:, None], "center")
    return {norm: emulate_normalization(x, norm, p, eps=eps, k=k, count_events=count_events,
                                        _centered=(xq, mean, d, R.events)) for norm in norms}
