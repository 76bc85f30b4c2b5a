"""The estimator base class, the registry and the two-stage partial statistics (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

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
        options: the norm-specific options it takes besides the common ones (``"k"``: top-k,
            ``"chunks"``: range); layers and the functional API reject the others.
        native_aux_rows: rows of the ``aux`` output of the native forward operator
            (``normmatters::lp_batch_norm_fwd``, csrc/common.h) for this norm.
        native_preferred: "auto" takes the native kernels for every eligible input (not only long rows).
        native_inplace_rows: the native in-place backward covers the rows (channels-innermost) layout.
        row_aux: the per-sample (row) backward (:mod:`normmatters.kernels.row_norm`) reads a saved per-row
            threshold (top-k's k-th largest |d|: too costly to select again) rather than recomputing it.
    """

    name: str = ""
    divides: bool = True
    needs_mean: bool = True
    reductions: Mapping[str, str] = field(default_factory=dict)
    options: frozenset[str] = frozenset()
    native_aux_rows: int = 0
    native_preferred: bool = False
    native_inplace_rows: bool = True
    sync_needs_extremes: bool = False
    row_aux: bool = False

    def constant(self, n: int, k: int = 10, chunks: int | None = None, centered: bool = True) -> float:
        """c(n): the factor that makes E[σ̂] = E[s_n] for n Gaussian elements. ``centered=False``: the
        statistic taken of x itself (d = x, no mean subtracted, as RMS norm does), and c(n) makes
        E[σ̂] = E[RMS_n] = E[sqrt(mean(x²))] for n iid N(0, 1) elements."""
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

    def statistic_uncentered(self, x: Tensor, dims: tuple[int, ...], n: int, k: int = 10,
                             chunks: int | None = None) -> Tensor:
        """σ̂ of ``x`` itself over ``dims`` (no mean subtracted; RMS norm): the raw statistic of d = x times
        ``constant(n, centered=False)``, so E[σ̂] = E[RMS_n] on zero-mean Gaussian input (for l2: RMS_n)."""
        if self.needs_mean:
            zero = torch.zeros((), dtype=x.dtype, device=x.device).expand(
                [s for i, s in enumerate(x.shape) if i not in dims])
        else:
            zero = None
        ratio = self.constant(n, k=k, chunks=chunks, centered=False) / self.constant(n, k=k, chunks=chunks)
        return self.statistic(x, zero, dims, n, k=k, chunks=chunks) * ratio

    def validate(self, n: int, k: int = 10, chunks: int | None = None) -> str | None:
        """A problem with reducing n elements per channel under these options, or None."""
        return None

    def expected_raw(self, n: int, k: int = 10) -> float:
        """E[raw statistic]/σ for n iid N(0, σ²) draws, before the constant (``normmatters constants``)."""
        raise TypeError(f"norm={self.name!r} has no dispersion statistic")

    def paper_constant(self, n: int) -> float:
        """The published constant for this norm (Hoffer et al. 2018; the authors' code for range)."""
        raise TypeError(f"norm={self.name!r} has no published constant")

    def native_covers(self, x: Tensor, k: int, channel_layout: bool) -> bool:
        """Norm-specific limits of the native kernels (the generic ones are in :func:`.kernels.native.covers`);
        ``channel_layout``: x goes to the channel kernels (contiguous, spatial size > 1)."""
        return True

    # --- emulated low precision (:mod:`normmatters.precision.emulate`) ---------------------------------
    # xq: the rounded input (rows, n), d = xq − μ its rounded deviations; ``rsum(t, step)`` sums the last dim
    # in the accumulation format; ``rounder.c`` / ``rounder.s`` round to the compute / statistics format and
    # count the event under ``step``.

    def emulate_sigma(self, xq: Tensor, d: Tensor, n: int, eps: float, rsum, rounder, k: int = 10,
                      chunks: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(σ̂, √(σ̂² + eps) or None for the caller's overflow-safe form) in emulated arithmetic: the constant
        times :meth:`emulate_raw`, each product rounded to the statistics format."""
        c = torch.tensor(self.constant(n, k=k, chunks=chunks), dtype=torch.float64)
        raw = self.emulate_raw(xq, d, n, rsum, rounder, k=k, chunks=chunks)
        return rounder.s(rounder.s(c, "constant") * raw, "constant"), None

    def emulate_raw(self, xq: Tensor, d: Tensor, n: int, rsum, rounder, k: int = 10,
                    chunks: int | None = None) -> Tensor:
        """The raw statistic (rows,) in emulated arithmetic."""
        raise ValueError(f"emulate_normalization: no emulation for norm={self.name!r}")

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

    # --- synced statistics (:mod:`normmatters.kernels.sync`) ------------------------------------------------
    # The union batch's statistic over K ranks, in the lean layout (1, 1, N, C, S) of this rank's rows:
    # ``sync_needs_extremes`` puts the per-channel max and min of x into the first all-gather (with the count
    # and Σx); ``sync_raw`` returns (raw, aux, local) — raw and aux when they are known already (from the
    # extremes, or from ``all_gather``), else raw None and ``local`` a per-channel sum that the caller
    # all-reduces in one collective with the :meth:`lean_sums`, and ``sync_finish`` turns into raw.

    def sync_raw(self, d: Tensor, mu: Tensor, hi: Tensor | None, lo: Tensor | None, k: int,
                 all_gather) -> tuple[Tensor | None, tuple[Tensor, ...], Tensor | None]:
        """Mean-only: nothing to reduce."""
        return None, (), None

    def sync_finish(self, total: Tensor, n: int) -> Tensor:
        """raw from the all-reduced ``local`` of :meth:`sync_raw` over the union's n elements."""
        raise NotImplementedError(f"norm={self.name!r} reduces no local sum")

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


def _centered(x: Tensor, mean: Tensor, dims: tuple[int, ...]) -> Tensor:
    shape = list(x.shape)
    for d in dims:
        shape[d] = 1
    return x - mean.reshape(shape)


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


def available_norms() -> tuple[str, ...]:
    return tuple(ESTIMATORS)


def norms_with_option(option: str) -> str:
    """The registered norms that take ``option`` (``"k"``, ``"chunks"``), for error messages: ``'range'``."""
    return " / ".join(repr(name) for name, est in ESTIMATORS.items() if option in est.options)


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
