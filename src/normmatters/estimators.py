"""The estimator registry: every dispersion measure σ̂ and its Gaussian-consistency constant, by name.

An Lp batch-norm layer computes ``y = weight · (x − μ) / sqrt(σ̂² + eps) + bias`` per channel, μ and σ̂
reduced over the n elements of a channel (batch and spatial axes). The estimator decides σ̂:

========  ==============================================  =============================================
name      σ̂ over the n reduced elements, d = x − μ        constant c(n) (E over n iid N(0, 1) draws)
========  ==============================================  =============================================
``l2``    sqrt(mean(d²))                                    1 (this *is* the biased std s_n)
``l1``    c₁(n) · mean(|d|)                                 E[s_n] / (sqrt(2/π) · sqrt((n−1)/n))
``linf``  c∞(n) · max(|d|)                                  E[s_n] / (sqrt((n−1)/n) · E[max of n |z|])
``topk``  c_k(n) · mean of the k largest |d|                E[s_n] / (sqrt((n−1)/n) · E[mean top-k |z|])
``range`` c_r(n/m) · mean over m chunks of (max − min)      E[s_n] / d₂(n/m)
``mean``  none (mean-only batch norm: y = weight·d + bias)  —
========  ==============================================  =============================================

with ``E[s_n] = sqrt(2/n)·Γ(n/2)/Γ((n−1)/2)`` (see :mod:`normmatters.constants`). Every c(n) makes
E[σ̂] = E[s_n] at the actual n, so on Gaussian input each layer normalizes like ``nn.BatchNorm``.
``l1`` and ``range`` are exact for Gaussian input. ``linf`` and ``topk`` treat the n deviations d_i as
independent N(0, (n−1)/n) draws; the true d_i are slightly negatively correlated. Monte Carlo puts the
resulting error of E[σ̂]/E[s_n] below 0.5 % at n = 16, below 0.05 % for n ≥ 64 and shrinking as 1/n, but
at 6 % at n = 4 (tests/test_estimators.py measures it).

The published constants are asymptotic: the paper's L∞ constant 0.5·(1+sqrt(π·ln 4))/sqrt(2·ln n)
over-estimates σ by 39–46 % for n = 64…65536 (Hoffer et al. 2018, sec. 4); :func:`paper_linf_constant`
keeps it for comparison only.

Partial statistics (for synced statistics across processes): a statistic is computed in two stages that
each reduce partial results with sum / max / min / top-k merge, so shards can be combined exactly:

1. ``mean_partial(x, dims)`` → {"count", "sum"}; combined → μ.
2. ``estimator.partial(x, mean, dims)`` → fields listed in ``estimator.reductions``; combined with
   :func:`combine`; ``estimator.finalize(part, n)`` → σ̂ (constant applied).

``estimator.statistic(x, mean, dims, n)`` runs stage 2 locally. ``dims`` are the reduced dimensions of
``x``; the result has the remaining shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import constants

__all__ = [
    "Estimator",
    "ESTIMATORS",
    "get_estimator",
    "register_estimator",
    "available_norms",
    "combine",
    "mean_partial",
    "paper_linf_constant",
    "paper_range_constant",
]

Partial = dict[str, Tensor]


def _sqrt_ratio(n: int) -> float:
    return math.sqrt((n - 1) / n)


@dataclass(frozen=True)
class Estimator:
    """Base estimator. Subclasses define ``partial``, ``finalize`` and ``constant``.

    Attributes:
        name: registry key (``norm=`` argument of the layers).
        divides: False only for mean-only normalization (no σ̂ at all).
        needs_mean: whether stage 2 needs the (global) mean; ``range`` does not.
        reductions: partial field → how shards combine it: ``"sum"``, ``"max"``, ``"min"``, ``"topk"``
            (concatenate along the last dim and keep the k largest).
    """

    name: str = ""
    divides: bool = True
    needs_mean: bool = True
    reductions: Mapping[str, str] = field(default_factory=dict)

    def constant(self, n: int, k: int = 10, chunks: int | None = None) -> float:
        """c(n): the factor that makes E[σ̂] = E[s_n] for n Gaussian elements."""
        raise NotImplementedError

    def partial(self, x: Tensor, mean: Tensor | None, dims: tuple[int, ...], k: int = 10,
                chunks: int | None = None) -> Partial:
        raise NotImplementedError

    def finalize(self, part: Partial, n: int, k: int = 10, chunks: int | None = None) -> Tensor:
        raise NotImplementedError

    def scale(self, n: int, like: Tensor, k: int = 10, chunks: int | None = None) -> float | Tensor:
        """c(n) for use inside a computation on ``like``: a Python float in eager mode, and under
        ``torch.compile`` a 0-dim tensor from the opaque op ``normmatters::dispersion_constant``, so a
        symbolic (dynamic) n neither specializes the graph nor gets the quadrature traced."""
        if torch.compiler.is_compiling():
            return _constant_op(self.name, n, k, chunks or 0, like.dtype, like.device)
        return self.constant(n, k=k, chunks=chunks)

    def constant_tensor(self, n: int, dtype: torch.dtype, device: torch.device, k: int = 10,
                        chunks: int | None = None) -> Tensor:
        """c(n) as a 0-dim tensor: cached per (n, k, chunks, dtype, device) in eager mode, the custom op
        ``normmatters::dispersion_constant`` under ``torch.compile`` (a symbolic n stays symbolic)."""
        if torch.compiler.is_compiling():
            return _constant_op(self.name, n, k, chunks or 0, dtype, device)
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            # under a FakeTensorMode (torch.export, shape inference) a cached real tensor cannot mix with fake ones
            return torch.tensor(self.constant(n, k=k, chunks=chunks), dtype=dtype, device=device)
        key = (self.name, n, k, chunks, dtype, device)
        c = _CONSTANT_TENSORS.get(key)
        if c is None:
            c = torch.tensor(self.constant(n, k=k, chunks=chunks), dtype=dtype, device=device)
            if _is_fake(c):  # made under a FakeTensorMode (torch.export, shape inference): valid only there
                return c
            _CONSTANT_TENSORS[key] = c
        return c

    def statistic(self, x: Tensor, mean: Tensor | None, dims: tuple[int, ...], n: int, k: int = 10,
                  chunks: int | None = None) -> Tensor:
        """σ̂ of ``x`` over ``dims`` (local, unsharded): finalize(partial(...))."""
        return self.finalize(self.partial(x, mean, dims, k=k, chunks=chunks), n, k=k, chunks=chunks)

    def validate(self, n: int, k: int = 10, chunks: int | None = None) -> str | None:
        """A problem with reducing n elements per channel under these options, or None."""
        return None

    # --- backward pieces for the lean kernels (:mod:`normmatters.kernels`) -----------------------------
    # Layout: x is viewed as (G, m, q, C, S) — G ghost groups, m range chunks (1 unless norm="range" with
    # chunks), q samples per chunk, C channels, S spatial elements — in the accumulation dtype. Per-channel
    # tensors keep their dims: (G, 1, 1, C, 1); per-chunk ones are (G, m, 1, C, 1). ``c`` is constant(n) as
    # a tensor. σ̂ = c · raw. The backward of σ̂ is written as σ̂·∂σ̂/∂x_i = e_i − mean_j e_j with e_i the
    # "elementwise part" below (the mean term is the gradient that flows through μ). Scaled by σ̂ so that no
    # piece divides by σ̂: l2's is d_i/n, finite (and 0) on a channel of zero dispersion.

    def lean_stats(self, x: Tensor, k: int = 10) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """(μ, raw, aux): the mean, the unscaled statistic and the small tensors backward needs."""
        mean = x.mean(_LEAN_DIMS, keepdim=True)
        raw, aux = self.lean_raw(x, x - mean, k)
        return mean, raw, aux

    def lean_raw(self, x: Tensor, d: Tensor, k: int = 10) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError(f"norm={self.name!r} has no lean kernel")

    def lean_sums(self, x: Tensor, d: Tensor, raw: Tensor, aux: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Per-channel sums the backward needs besides Σ grad and Σ grad·x̂ (fused into the same pass)."""
        return ()

    def lean_thresholds(self, d: Tensor, raw: Tensor, aux: tuple[Tensor, ...],
                        k: int = 10) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(raw, aux) as :meth:`lean_sums` and :meth:`lean_dstat` should see them when the backward has only
        a reconstruction of d (in-place mode: d = (y − bias) / (weight · r), equal to the forward's d up to
        rounding). Statistics that the backward compares elements against for equality (the max |d| of
        ``linf``, the k-th largest |d| of ``topk``, the per-chunk extremes of ``range``) must be recomputed
        from that d, or the rounding would make every comparison fail; the default passes them through.
        The d given here is centered, so it also serves as x (μ = 0)."""
        return raw, aux

    def lean_dstat(self, x: Tensor, d: Tensor, c: Tensor, raw: Tensor, sigma: Tensor,
                   aux: tuple[Tensor, ...], sums: tuple[Tensor, ...], n: int,
                   k: int = 10) -> tuple[Tensor, Tensor]:
        """(e, mean_j e_j): the elementwise part of σ̂·∂σ̂/∂x and its per-channel mean (see above)."""
        raise NotImplementedError(f"norm={self.name!r} has no lean kernel")


#: reduced dims of the lean-kernel layout (G, m, q, C, S): everything but the group and the channel
_LEAN_DIMS = (1, 2, 4)
#: reduced dims of one range chunk in that layout
_LEAN_CHUNK_DIMS = (2, 4)


def _extreme_pieces(d: Tensor, tau: Tensor, sums: tuple[Tensor, ...], k: int) -> tuple[Tensor, Tensor]:
    """Backward of "mean of the k largest |d|" (k = 1: max |d|), up to the constant: sign(d)/k on the
    elements above the k-th largest value τ; elements tied at τ share the remaining weight evenly (the
    average over all tie-breaks, which for k = 1 is exactly autograd's rule for amax)."""
    cnt_gt, cnt_eq, s_gt, s_eq = sums
    a = d.abs()
    w_eq = (k - cnt_gt) / cnt_eq
    e = torch.sign(d) * ((a > tau).to(d.dtype) + (a == tau).to(d.dtype) * w_eq) / k
    return e, (s_gt + w_eq * s_eq) / k


def _extreme_sums(d: Tensor, tau: Tensor) -> tuple[Tensor, ...]:
    a = d.abs()
    gt = (a > tau).to(d.dtype)
    eq = (a == tau).to(d.dtype)
    sd = torch.sign(d)
    return (gt.sum(_LEAN_DIMS, keepdim=True), eq.sum(_LEAN_DIMS, keepdim=True),
            (gt * sd).sum(_LEAN_DIMS, keepdim=True), (eq * sd).sum(_LEAN_DIMS, keepdim=True))


def _pow2_scale(a: Tensor) -> Tensor:
    """A power of two within a factor 2 of ``a`` (≥ 0; at least the dtype's smallest normal): dividing by it is
    exact, and after it the squares of values up to a few times ``a`` neither overflow nor underflow."""
    tiny = torch.finfo(a.dtype).tiny
    return torch.exp2(torch.floor(torch.log2(a.clamp_min(tiny))))


def _centered(x: Tensor, mean: Tensor, dims: tuple[int, ...]) -> Tensor:
    shape = list(x.shape)
    for d in dims:
        shape[d] = 1
    return x - mean.reshape(shape)


class _L2(Estimator):
    def constant(self, n, k=10, chunks=None):
        return 1.0

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {"sum_sq": _centered(x, mean, dims).square().sum(dims)}

    def finalize(self, part, n, k=10, chunks=None):
        return (part["sum_sq"] / n).sqrt()

    def statistic(self, x, mean, dims, n, k=10, chunks=None):
        # scaled before squaring (no d² overflows or underflows for a finite x), and a square root whose
        # gradient at 0 is 0 (a constant channel: ∂L/∂σ̂ = 0 there, and sqrt's inf would make it NaN)
        d = _centered(x, mean, dims)
        s = _pow2_scale(d.detach().abs().amax(dims, keepdim=True))
        v = (d / s).square().sum(dims) / n
        pos = v > 0
        return torch.where(pos, torch.where(pos, v, 1.0).sqrt(), 0.0) * s.reshape(v.shape)

    def lean_stats(self, x, k=10):
        # σ̂ finite for every finite x (σ̂² of float32 overflows above ~1.8e19). float32 (also the accumulation
        # dtype of half/bfloat16 input): one Welford pass in float64, which holds the square of every float32
        # (1.29-1.32x the float32 pass's time on Inductor CPU at 64x64x32x32, against 1.73-1.80x for the two
        # scaled passes below: docs/bench/l2_compiled_overflow_cost.py). float64: two scaled passes: μ and
        # max|x| (one fused reduction), then Σ((x − μ)/s)² with s a power of two near max|x| (exact, so equal to
        # the unscaled sum wherever that neither overflows nor underflows).
        if x.dtype == torch.float32:
            var, mean = torch.var_mean(x.to(torch.float64), _LEAN_DIMS, correction=0, keepdim=True)
            return mean.to(x.dtype), var.sqrt().to(x.dtype), ()
        mean = x.mean(_LEAN_DIMS, keepdim=True)
        s = _pow2_scale(x.abs().amax(_LEAN_DIMS, keepdim=True))
        d = (x - mean) / s
        return mean, (d * d).mean(_LEAN_DIMS, keepdim=True).sqrt() * s, ()

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        # σ̂·∂σ̂/∂d_i = d_i / n; Σ d_i = 0 so the mean term vanishes (as in nn.BatchNorm's backward)
        return d / n, torch.zeros_like(sigma)


class _L1(Estimator):
    def constant(self, n, k=10, chunks=None):
        return constants.expected_biased_std(n) / constants.expected_mean_abs_deviation(n)

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {"sum_abs": _centered(x, mean, dims).abs().sum(dims)}

    def finalize(self, part, n, k=10, chunks=None):
        return part["sum_abs"] * (self.scale(n, part["sum_abs"]) / n)

    def lean_raw(self, x, d, k=10):
        return d.abs().mean(_LEAN_DIMS, keepdim=True), ()

    def lean_sums(self, x, d, raw, aux):
        return (torch.sign(d).sum(_LEAN_DIMS, keepdim=True),)

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        # σ̂ = c · mean|d|  →  ∂σ̂/∂d_i = c · sign(d_i) / n
        return torch.sign(d) * (sigma * c / n), sums[0] * (sigma * c / n / n)


class _Linf(Estimator):
    def constant(self, n, k=10, chunks=None):
        return constants.expected_biased_std(n) / (_sqrt_ratio(n) * constants.expected_top_k_mean(n, 1))

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {"max_abs": _centered(x, mean, dims).abs().amax(dims)}

    def finalize(self, part, n, k=10, chunks=None):
        return part["max_abs"] * self.scale(n, part["max_abs"])

    def lean_raw(self, x, d, k=10):
        return d.abs().amax(_LEAN_DIMS, keepdim=True), ()

    def lean_sums(self, x, d, raw, aux):
        return _extreme_sums(d, raw)  # raw = max|d| is the threshold

    def lean_thresholds(self, d, raw, aux, k=10):
        return self.lean_raw(d, d, k)

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        e, e_sum = _extreme_pieces(d, raw, sums, 1)
        return e * (sigma * c), e_sum * (sigma * c / n)


def _move_reduced_last(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    keep = [d for d in range(x.dim()) if d not in dims]
    return x.permute(*keep, *dims).flatten(len(keep))


class _TopK(Estimator):
    def constant(self, n, k=10, chunks=None):
        return constants.expected_biased_std(n) / (_sqrt_ratio(n) * constants.expected_top_k_mean(n, k))

    def validate(self, n, k=10, chunks=None):
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            return f"norm='topk' needs 1 <= k <= n (elements reduced per channel), got k={k!r}, n={n}"
        return None

    def partial(self, x, mean, dims, k=10, chunks=None):
        d = _move_reduced_last(_centered(x, mean, dims), dims).abs()
        return {"topk": d.topk(min(k, d.shape[-1]), dim=-1, sorted=False).values}

    def finalize(self, part, n, k=10, chunks=None):
        return part["topk"].mean(-1) * self.scale(n, part["topk"], k=k)

    def lean_raw(self, x, d, k=10):
        # two-stage top-k without a transposed copy: the k largest of every contiguous row (G, m, q, C)
        # first, then the k largest of those candidates per channel (exact: the global top-k lies in
        # the union of the rows' top-k)
        a = d.abs()
        G, m, q, C, S = a.shape
        rows = a.topk(min(k, S), dim=-1, sorted=False).values if S > k else a
        cand = rows.permute(0, 3, 1, 2, 4).reshape(G, C, -1)
        top = cand.topk(k, dim=-1, sorted=False).values
        raw = top.mean(-1)[:, None, None, :, None]
        tau = top.amin(-1)[:, None, None, :, None]
        return raw, (tau,)

    def lean_sums(self, x, d, raw, aux):
        return _extreme_sums(d, aux[0])

    def lean_thresholds(self, d, raw, aux, k=10):
        return self.lean_raw(d, d, k)

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        e, e_sum = _extreme_pieces(d, aux[0], sums, k)
        return e * (sigma * c), e_sum * (sigma * c / n)


class _Range(Estimator):
    """Range, optionally chunked. With ``chunks=m`` the first reduced dim (the batch) is split into m
    equal chunks; σ̂ = c · mean over chunks of (max − min), c = E[s_n] / d₂(n/m)."""

    def constant(self, n, k=10, chunks=None):
        m = chunks or 1
        return constants.expected_biased_std(n) / constants.expected_range(n // m)

    def validate(self, n, k=10, chunks=None):
        m = chunks or 1
        if n // m < 2:
            return f"norm='range' with chunks={m} needs at least 2 elements per chunk, got n={n}"
        return None

    def partial(self, x, mean, dims, k=10, chunks=None):
        m = chunks or 1
        b = dims[0]
        if x.shape[b] % m:
            raise ValueError(f"chunks={m} must divide the batch dimension, got {x.shape[b]}")
        # split the batch dim into (m, batch/m); reduce everything but the chunk index
        xs = x.unflatten(b, (m, x.shape[b] // m))
        red = tuple(d + 1 if d > b else d for d in dims if d != b) + (b + 1,)
        ranges = xs.amax(red) - xs.amin(red)  # chunk index sits at position b of the result
        return {"range_sum": ranges.sum(b), "chunk_count": torch.full_like(ranges.sum(b), m)}

    def finalize(self, part, n, k=10, chunks=None):
        return part["range_sum"] / part["chunk_count"] * self.scale(n, part["range_sum"], chunks=chunks)

    def lean_raw(self, x, d, k=10):
        hi = x.amax(_LEAN_CHUNK_DIMS, keepdim=True)
        lo = x.amin(_LEAN_CHUNK_DIMS, keepdim=True)
        return (hi - lo).mean(1, keepdim=True), (hi, lo)

    def lean_thresholds(self, d, raw, aux, k=10):
        return self.lean_raw(d, d, k)  # the chunk extremes of d = x − μ are those of x, shifted by μ

    def lean_sums(self, x, d, raw, aux):
        hi, lo = aux
        return ((x == hi).to(x.dtype).sum(_LEAN_CHUNK_DIMS, keepdim=True),
                (x == lo).to(x.dtype).sum(_LEAN_CHUNK_DIMS, keepdim=True))

    def lean_dstat(self, x, d, c, raw, sigma, aux, sums, n, k=10):
        # σ̂ = c/m · Σ_chunks (max − min): the gradient reaches only the extremes of each chunk (shared
        # evenly among ties, like autograd's amax/amin); it does not depend on μ, so the mean term is 0
        hi, lo = aux
        m = hi.shape[1]
        e = ((x == hi).to(x.dtype) / sums[0] - (x == lo).to(x.dtype) / sums[1]) * (sigma * c / m)
        return e, torch.zeros_like(sigma)


class _MeanOnly(Estimator):
    def constant(self, n, k=10, chunks=None):
        return 1.0

    def partial(self, x, mean, dims, k=10, chunks=None):
        return {}

    def finalize(self, part, n, k=10, chunks=None):
        raise TypeError("norm='mean' has no dispersion statistic (mean-only batch norm)")


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


ESTIMATORS: dict[str, Estimator] = {}
_CONSTANT_TENSORS: dict[tuple, Tensor] = {}


@torch.library.custom_op("normmatters::dispersion_constant", mutates_args=())
def _constant_op(norm: str, n: int, k: int, chunks: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """c(n) of estimator ``norm`` as a 0-dim tensor (chunks=0 means no chunking); see Estimator.scale."""
    value = ESTIMATORS[norm].constant(n, k=k, chunks=chunks or None)
    return torch.tensor(value, dtype=dtype, device=device)


@_constant_op.register_fake
def _(norm: str, n: int, k: int, chunks: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty((), dtype=dtype, device=device)


def register_estimator(est: Estimator) -> Estimator:
    """Add an estimator to the registry under ``est.name`` (later issues register more)."""
    if not est.name:
        raise ValueError("an estimator needs a name")
    ESTIMATORS[est.name] = est
    return est


register_estimator(_L2(name="l2", reductions={"sum_sq": "sum"}))
register_estimator(_L1(name="l1", reductions={"sum_abs": "sum"}))
register_estimator(_Linf(name="linf", reductions={"max_abs": "max"}))
register_estimator(_TopK(name="topk", reductions={"topk": "topk"}))
register_estimator(_Range(name="range", needs_mean=False,
                          reductions={"range_sum": "sum", "chunk_count": "sum"}))
register_estimator(_MeanOnly(name="mean", divides=False))


def available_norms() -> tuple[str, ...]:
    return tuple(ESTIMATORS)


def get_estimator(norm: str) -> Estimator:
    """Look up an estimator by name; a clear ``ValueError`` for unknown names."""
    try:
        return ESTIMATORS[norm]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown norm {norm!r}: expected one of {', '.join(map(repr, ESTIMATORS))}") from None


def mean_partial(x: Tensor, dims: tuple[int, ...]) -> Partial:
    """Stage 1 partial statistics: element count and sum over ``dims``."""
    s = x.sum(dims)
    return {"count": torch.full_like(s, math.prod(x.shape[d] for d in dims)), "sum": s}


_MEAN_REDUCTIONS = {"count": "sum", "sum": "sum"}


def combine(parts: Sequence[Partial], reductions: Mapping[str, str] | None = None,
            k: int = 10) -> Partial:
    """Merge partial statistics from several shards (same field names and shapes).

    ``reductions`` defaults to those of the mean stage ({"count", "sum"}).
    """
    reductions = _MEAN_REDUCTIONS if reductions is None else reductions
    out: Partial = {}
    for key, how in reductions.items():
        vals = [p[key] for p in parts]
        if how == "sum":
            out[key] = torch.stack(vals).sum(0)
        elif how == "max":
            out[key] = torch.stack(vals).amax(0)
        elif how == "min":
            out[key] = torch.stack(vals).amin(0)
        elif how == "topk":
            cat = torch.cat(vals, dim=-1)
            out[key] = cat.topk(min(k, cat.shape[-1]), dim=-1, sorted=False).values
        else:
            raise ValueError(f"unknown reduction {how!r} for field {key!r}")
    return out


def paper_linf_constant(n: int) -> float:
    """The paper's asymptotic L∞ constant 0.5·(1+sqrt(π·ln 4))/sqrt(2·ln n) (for comparison only)."""
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))


def paper_range_constant(n: int) -> float:
    """The range constant in the authors' code, 0.175·(1+sqrt(π·ln 4))/sqrt(2·ln n) (comparison only)."""
    return 0.175 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))
