"""Native CPU fast path of the lean kernels: cache-blocked C++ (``csrc/``) called as the ``normmatters::``
operators of :mod:`.native_ops`.

The Inductor kernels of :mod:`.compiled` run every pass (mean, dispersion, output; backward sums, then the
gradient) as its own parallel loop over all channels, so each pass streams the whole tensor from DRAM.
Two native layouts:

* channel kernels, for contiguous (N, C, S) input with S > 1: a block of adjacent channels (about
  :data:`BLOCK_BYTES` = 4 MB of input: 16 channels at 64×64×32×32 float32) goes through all passes while it
  sits in the caches: forward reads the input from DRAM once (each sample's block of channels as one
  contiguous run) and writes y, backward reads (g, x) once and writes ∂L/∂x. Range keeps the positions of
  each channel's max and min (int32), so backward needs no comparisons and its second pass does not read x
  where both are unique. Outputs of at least :data:`STREAM_BYTES` (1 MB) are written with non-temporal
  stores (no read-for-ownership of the written lines). Blocks are handed to OpenMP threads one at a time;
* rows kernels, for channels-innermost input (:func:`channels_innermost`: channels_last, channels_last_3d,
  (N, C)): each pass walks the (N·S, C) rows in memory order, vectorized across channels, one row range
  per thread, per-thread partial sums (top-k: per-thread candidates) combined between passes.

Both use ``torch.get_num_threads()`` OpenMP threads (the library links the libgomp that torch has already
loaded), compute bfloat16 in float32, update the running buffers inside the forward call
(:func:`update_fusable`), and are once-differentiable. Their outputs (y, ∂L/∂x) come from :mod:`.pool`,
which reuses a freed buffer rather than letting the allocator map fresh pages (the faults cost more than the
kernel).

The sources are compiled on first use by :mod:`.native_build` (``torch.utils.cpp_extension``, ``-O3
-march=native -fopenmp``, cached per source hash and flags). If the compiler is missing or fails,
:func:`available` is False after one warning and callers keep the Inductor path.

Scope (:func:`eligible`): CPU, float32/float64 with parameters of the same dtype, or bfloat16 with bfloat16
or float32 parameters (computed in float32, statistics kept in float32, as nn.BatchNorm), contiguous or
channels-innermost (N, C, *), one group (no ghost batches), one range chunk, norms mean, l2, l1, linf, range
and top-k (k ≤ :data:`TOPK_MAX`); not under torch.compile.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from ..estimators import available_norms, get_estimator
from ..estimators.topk import NATIVE_MAX_K
from . import native_ops, pool

log = logging.getLogger(__name__)

__all__ = ["NORMS", "available", "channels_innermost", "covers", "eligible", "inplace_eligible", "update_fusable",
           "Launch", "running_args"]

#: the norms the C++ kernels implement (csrc/common.h: NM_MEAN ... NM_TOPK; the registry holds no others yet)
NORMS = available_norms()
#: largest k of norm="topk"
TOPK_MAX = NATIVE_MAX_K
#: the dtype the kernel computes in and keeps per-channel vectors (weight, bias, statistics, buffers) in:
#: float32 for bfloat16 elements (as nn.BatchNorm and the reference), else the element dtype
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}

#: outputs of at least this many bytes ($NORMMATTERS_NATIVE_STREAM_BYTES overrides) are written with
#: non-temporal stores, which skip each line's read-for-ownership but leave the output out of the cache.
#: Measured side by side (fwd+bwd vs BN, interleaved): streamed 0.60-0.79x, cached 0.67-1.14x for 2-16 MB
#: layers; ResNet-20 step (2-8 MB activations, read back by the next conv) 1.02x streamed, 1.03-1.07x cached.
STREAM_BYTES = int(os.environ.get("NORMMATTERS_NATIVE_STREAM_BYTES", 0) or 1 << 20)

#: bytes of input per task of the channel kernels ($NORMMATTERS_NATIVE_BLOCK_BYTES overrides): a task takes
#: that many bytes' worth of adjacent channels, so its first pass reads each sample's channels as one
#: contiguous run (4 KB → 64 KB at 64×64×32×32 float32) and the later passes find them in L2/L3. Measured on
#: this VM (64×64×32×32 float32, range, interleaved): forward 1.25-1.29 ms with one channel per task,
#: 1.01-1.05 ms with 16 (4 MB); backward 1.99-2.05 → 1.81-2.02 ms.
BLOCK_BYTES = int(os.environ.get("NORMMATTERS_NATIVE_BLOCK_BYTES", 0) or 4 << 20)

def available() -> bool:
    """Whether the operators are built, loaded and registered (:func:`.native_ops.ensure`)."""
    return native_ops.ensure()


#: "auto" takes the channel kernels for contiguous input whose (sample, channel) rows have at least
#: AUTO_MIN_ROW_BYTES (bfloat16: AUTO_MIN_ROW_BYTES_BF16); else the Inductor kernels. Measured fwd+bwd / BN,
#: interleaved, native vs compiled (l1; range alike), since the channel kernels take blocks of channels:
#: fp32 256×256×8×8 (256 B rows, 16 MB) 0.48 vs 0.77; 32×512×7×7 (196 B) 0.80 vs 1.11; 64×256×4×4 (64 B)
#: 1.13 vs 1.42; but 256×64×3×3 (36 B) 2.36 vs 1.64. bf16 256×256×8×8 (128 B) 0.81 vs 1.31, 32×256×14×14
#: 1.35 vs 1.79; but 32×512×7×7 (98 B) 2.19 vs 1.15 and 64×256×4×4 (32 B) 5.8 vs 2.7.
AUTO_MIN_ROW_BYTES = 64
AUTO_MIN_ROW_BYTES_BF16 = 128
#: ... except for inputs under AUTO_SMALL_BYTES, which "auto" gives the native kernels in eager mode: there a call
#: of the Inductor kernels costs more than the work (its wrappers, ~1 ms a layer step), whatever the row length.
#: Measured fwd+bwd / BN, interleaved, thread CPU time, one thread, on the loaded 2-core VM, native vs
#: compiled: l1 64×64×2×2 (16 B rows, 64 KB; the last stage of ``normmatters compare``'s ResNet-8 on 8×8
#: digits) 0.79 vs 1.89, 256×64×2×2 0.96 vs 1.30, 128×64×3×3 (288 KB) 0.92 vs 1.97; range alike.
AUTO_SMALL_BYTES = 256 << 10


def channels_innermost(x: Tensor) -> bool:
    """Whether x is (N, C, *) stored as (N·spatial, C) rows with the C channels contiguous: channels_last
    (3-d), channels_last_3d, and (N, C) or any spatial size 1. The rows kernels take this layout."""
    return x.stride(1) == 1 and x.movedim(1, -1).is_contiguous()


def _row_bytes(x: Tensor) -> int:
    """Bytes of one (sample, channel) row of a contiguous (N, C, *) tensor."""
    return x.numel() // (x.shape[0] * x.shape[1]) * x.element_size()


def _channel_layout(x: Tensor) -> bool:
    """Whether the channel kernels take x (contiguous, spatial size > 1); else the rows kernels do."""
    return x.is_contiguous() and x.numel() > x.shape[0] * x.shape[1]


def auto_prefers(x: Tensor, norm: str | None = None) -> bool:
    """Whether "auto" should take the native kernels for an eligible ``x``: the rows kernels for
    channels-innermost layouts; the channel kernels for inputs under :data:`AUTO_SMALL_BYTES` and otherwise
    by row length (:data:`AUTO_MIN_ROW_BYTES`), and always for top-k (the Inductor top-k is 3-5x slower than
    the native one at every benchmark shape)."""
    if channels_innermost(x) or (norm is not None and get_estimator(norm).native_preferred):
        return True
    if x.numel() * x.element_size() < AUTO_SMALL_BYTES and not torch.compiler.is_compiling():
        return True  # (traced, the formulas cost no call of their own: Inductor fuses them into the graph)
    return _row_bytes(x) >= (AUTO_MIN_ROW_BYTES_BF16 if x.dtype == torch.bfloat16 else AUTO_MIN_ROW_BYTES)


def covers(x: Tensor, weight: Tensor, bias: Tensor, norm: str, groups: int, m: int, k: int = 10) -> bool:
    """Whether the kernels cover this call (see the module docstring), in eager mode or traced (as the
    ``normmatters::lp_batch_norm_fwd`` operator inside torch.compile / torch.export); builds nothing."""
    if not (norm in NORMS and groups == 1 and m == 1 and x.device.type == "cpu" and x.dtype in _COMPUTE):
        return False
    if not get_estimator(norm).native_covers(x, k, _channel_layout(x)):
        return False
    params = (x.dtype, _COMPUTE[x.dtype])  # bfloat16 elements: bfloat16 or float32 parameters
    return (weight.dtype in params and bias.dtype == weight.dtype
            and x.dim() >= 2 and x.numel() > 0 and x.numel() // (x.shape[0] * x.shape[1]) < 2**31
            and (x.is_contiguous() or channels_innermost(x)) and weight.is_contiguous()
            and bias.is_contiguous())


def eligible(x: Tensor, weight: Tensor, bias: Tensor, norm: str, groups: int, m: int, k: int = 10) -> bool:
    """Whether the eager native path (:class:`Launch`, the ``*_out`` operators) covers this call: :func:`covers`,
    not under torch.compile / torch.export (where the functional operator runs instead)."""
    return covers(x, weight, bias, norm, groups, m, k) and not torch.compiler.is_compiling()


def inplace_eligible(x: Tensor, weight: Tensor, bias: Tensor, norm: str, groups: int, m: int,
                     k: int = 10) -> bool:
    """Whether the native kernels cover this call in in-place mode: :func:`eligible`, except top-k in the
    rows layout (its in-place backward would need the top-k of the rebuilt d per thread)."""
    return eligible(x, weight, bias, norm, groups, m, k) and (get_estimator(norm).native_inplace_rows
                                                        or _channel_layout(x))


def _stream(x: Tensor) -> int:
    """Non-temporal stores for outputs of :data:`STREAM_BYTES` or more whose (sample, channel) rows are whole
    64-byte lines: a row that starts or ends inside a line leaves partial lines to the write-combining
    buffers, which memory then merges line by line (32×512×7×7 float32, 196-byte rows: 2x slower streamed)."""
    return int(x.numel() * x.element_size() >= STREAM_BYTES and _row_bytes(x) % 64 == 0)


def _stream_rows(x: Tensor) -> int:
    """Non-temporal stores in the rows kernels for outputs of :data:`STREAM_BYTES` or more: each thread writes
    one contiguous range, so lines are whole except at its two ends."""
    return int(x.numel() * x.element_size() >= STREAM_BYTES)


def _channel_block_for(N: int, C: int, S: int, dtype: torch.dtype, nt: int) -> int:
    """Channels per task of the channel kernels for (N, C, S) input: as many as fit :data:`BLOCK_BYTES` (at
    least 1, at most NM_CBMAX = 64), but no more than an even share of the C channels per thread."""
    fit = BLOCK_BYTES // max(1, N * S * dtype.itemsize)
    return int(max(1, min(fit, 64, -(-C // max(1, nt)))))


def _dims(x: Tensor) -> tuple[int, int, int]:
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // (N * C)


def update_fusable(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   num_batches_tracked: Tensor | None) -> bool:
    """Whether :func:`forward` can update these running buffers itself: CPU, contiguous, in the compute dtype
    (x's; float32 for bfloat16 x, whose buffers may also be bfloat16 — both alike), num_batches_tracked
    int64; otherwise the caller updates them from the returned statistics."""
    acc = _COMPUTE[x.dtype]
    allowed = (acc, torch.bfloat16) if x.dtype == torch.bfloat16 else (acc,)
    bufs = [t for t in (running_mean, running_var) if t is not None]
    return (all(t.dtype in allowed and t.dtype == bufs[0].dtype and t.device.type == "cpu" and t.is_contiguous()
                for t in bufs)
            and (num_batches_tracked is None or (num_batches_tracked.dtype == torch.int64
                                                 and num_batches_tracked.device.type == "cpu"
                                                 and num_batches_tracked.numel() == 1)))


class Launch:
    """One native kernel call site: the layout, statistic and options of a training step, with everything that
    does not change between steps (the operators, (N, C, S), non-temporal stores, the block size per thread
    count) worked out once.

    The eager autograd Functions build one per call; :class:`.native_autograd.NativePlan` keeps
    one across a layer's steps (its Python before and after the kernel runs on caches the previous layer's
    kernel has just flushed, where each helper call costs 10-40 µs). Valid for tensors with ``x``'s shape,
    strides and dtype on the CPU, as :func:`eligible` accepted (callers check that; :meth:`matches`).
    """

    __slots__ = ("shape", "strides", "dtype", "acc", "N", "C", "S", "channel", "norm", "divides", "c",
                 "eps", "k", "inplace", "stream", "fwd", "bwd", "nt", "cb")

    def __init__(self, x: Tensor, norm: str, c: float, eps: float, k: int = 10, inplace: bool = False) -> None:
        self.shape, self.strides, self.dtype = x.shape, x.stride(), x.dtype
        self.acc = _COMPUTE[x.dtype]
        self.N, self.C, self.S = _dims(x)
        self.channel = _channel_layout(x)
        self.norm, self.c, self.eps, self.k = norm, float(c), float(eps), k
        self.divides = get_estimator(norm).divides  # the statistic has a raw value to divide by (not mean-only)
        self.inplace = inplace
        self.stream = _stream(x) if self.channel else _stream_rows(x)
        self.fwd, self.bwd = native_ops.fwd_out(), native_ops.bwd_out()
        self.nt = 0
        self.cb = _channel_block_for(self.N, self.C, self.S, self.dtype, torch.get_num_threads()) if self.channel else 0

    def matches(self, x: Tensor) -> bool:
        """Whether x has the shape, strides and dtype this launch was built for (and is on the CPU)."""
        return x.shape == self.shape and x.dtype is self.dtype and x.stride() == self.strides and x.is_cpu

    def _threads(self) -> int:
        """torch.get_num_threads(), read every call; the channel block size follows it. The block size is set
        before the thread count, and is valid (1-64) from construction on, so a call racing another thread's
        update passes a valid, if not the best, block size."""
        nt = torch.get_num_threads()
        if nt != self.nt:
            if self.channel:
                self.cb = _channel_block_for(self.N, self.C, self.S, self.dtype, nt)
            self.nt = nt
        return nt

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor, run_mean: Tensor | None = None,
                run_var: Tensor | None = None, nbt: Tensor | None = None, momentum: float = 0.0,
                unbias: float = 0.0) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...], int]:
        """(y, μ (C,), raw (C,), aux, ok) — aux for range: (pos,) from the channel kernels, pos (2, C) int32 the
        per-channel position (sample·S + spatial index) of the max (row 0) and min (row 1), p if that element is
        the only one equal to it, -(p + 1) for the first of several; from the rows kernels (hi_lo,), (2, C) the
        per-channel max (row 0) and min (row 1); (τ,) for topk, (1, C) the k-th largest |d|; else ().

        The running buffers (each possibly None, :func:`update_fusable`) are updated by the kernel with
        ``momentum`` and ``unbias`` = n / (n − 1) (the update of :func:`normmatters.functional.update_running_stats`,
        fused: a separate call right after the kernel costs ~0.3 ms of cache misses); ``ok`` is its status: 1
        updated, 0 non-finite statistics, 2 finite statistics whose running_var would overflow the buffer's
        dtype (0 and 2: every buffer unchanged). Without buffers ``ok`` is still the finite flag."""
        nt = self._threads()
        y = x if self.inplace else pool.empty_like(x)
        mean, raw, aux, ok = self.fwd(x, weight, bias, self.norm, self.c, self.eps, self.k, y, run_mean, run_var,
                                      nbt, momentum, unbias, self.stream, self.cb, nt)
        return y, mean, raw, ((aux,) if aux.numel() else ()), ok

    def backward(self, gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor | None, raw: Tensor,
                 aux: tuple[Tensor, ...], need_x: bool, need_w: bool, need_b: bool,
                 bias: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """:func:`backward` for this launch."""
        nt = self._threads()
        gx = pool.empty_like(x) if need_x else None
        gw, gb = self.bwd(gy, x, weight, mean, raw, aux[0] if aux else _NO_AUX, bias, self.norm, self.c, self.eps,
                          self.k, need_w, need_b, gx, self.stream, self.cb, nt)
        return gx, gw, gb


#: the ``aux`` argument of statistics without one (mean, l2, l1, linf)
_NO_AUX = torch.empty(0, 0)


def running_args(running: tuple | None) -> tuple:
    """``running`` = (running_mean, running_var, num_batches_tracked, momentum, n) → the arguments
    (run_mean, run_var, nbt, momentum, unbias) of :meth:`Launch.forward`; () for None."""
    if running is None:
        return ()
    rm, rv, nbt, momentum, n = running
    return rm, rv, nbt, float(momentum), n / (n - 1)

