"""Native CPU fast path of the lean kernels: cache-blocked C (:mod:`.native_src`) called through ctypes.

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

The source is compiled on first use with ``gcc -O3 -march=native -fopenmp -shared -fPIC`` (no fast-math)
into ``$NORMMATTERS_CACHE`` (default ``~/.cache/normmatters``), named by a hash of source + command, and
written atomically (temporary file + rename), so concurrent processes are safe. If the compiler is missing
or fails, :func:`available` is False after one warning and callers keep the Inductor path.

Scope (:func:`eligible`): CPU, float32/float64 with parameters of the same dtype, or bfloat16 with bfloat16
or float32 parameters (computed in float32, statistics kept in float32, as nn.BatchNorm), contiguous or
channels-innermost (N, C, *), one group (no ghost batches), one range chunk, norms mean, l2, l1, linf, range
and top-k (k ≤ :data:`TOPK_MAX`); not under torch.compile.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..estimators import get_estimator
from . import pool
from .native_src import SOURCE

log = logging.getLogger(__name__)

__all__ = ["NORM_CODES", "available", "channels_innermost", "eligible", "inplace_eligible", "update_fusable",
           "Launch", "running_args", "forward", "backward", "load"]

#: norm name → code in the C source
NORM_CODES = {"mean": 0, "l2": 1, "l1": 2, "linf": 3, "range": 4, "topk": 5}
#: largest k of norm="topk"
TOPK_MAX = 64
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
#: the dtype the kernel computes in and keeps per-channel vectors (weight, bias, statistics, buffers) in:
#: float32 for bfloat16 elements (as nn.BatchNorm and the reference), else the element dtype
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
CC_ENV = "NORMMATTERS_CC"
CACHE_ENV = "NORMMATTERS_CACHE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99")

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

_lib: ctypes.CDLL | None = None
_failed = False
_lock = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "normmatters"


def _compile(cc: str, out: Path) -> None:
    """Compile SOURCE into ``out`` atomically (temporary names in the same directory, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_src = tempfile.mkstemp(suffix=".c", prefix=".nm-", dir=out.parent)
    tmp_so = tmp_src[:-2] + ".so"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(SOURCE)
        proc = subprocess.run([cc, *FLAGS, tmp_src, "-o", tmp_so, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{cc} failed: {(proc.stderr or proc.stdout).strip()[:300]}")
        os.replace(tmp_so, out)
    finally:
        for p in (tmp_src, tmp_so):
            if os.path.exists(p):
                os.unlink(p)


#: the first call's cost: (seconds, "compiled" | "cached") of building/loading the library, None before it
first_call: tuple[float, str] | None = None


def _build() -> ctypes.CDLL:
    global first_call
    t0 = time.perf_counter()
    cc = os.environ.get(CC_ENV) or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    key = hashlib.sha256("\0".join([SOURCE, cc, *FLAGS]).encode()).hexdigest()[:20]
    path = cache_dir() / f"normmatters_native_{key}.so"
    how = "cached"
    if not path.exists():
        _compile(cc, path)
        how = "compiled"
    lib = ctypes.CDLL(str(path))
    i64, ptr, dbl, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    for sfx in _SUFFIX.values():
        fwd = getattr(lib, f"nm_forward_{sfx}")
        fwd.argtypes = ([ptr] * 8 + [i64, i64, i64, cint, dbl, dbl, cint, cint] + [ptr] * 3
                        + [dbl, dbl, cint, cint, i64, ptr])
        fwd.restype = cint
        bwd = getattr(lib, f"nm_backward_{sfx}")
        bwd.argtypes = [ptr] * 10 + [i64, i64, i64, cint, dbl, dbl, cint, cint, cint, i64, ptr, ptr]
        bwd.restype = None
        fwd_rows = getattr(lib, f"nm_forward_rows_{sfx}")
        fwd_rows.argtypes = ([ptr] * 8 + [i64, i64, cint, dbl, dbl, cint] + [ptr] * 5
                             + [dbl, dbl, cint, cint, cint, ptr, ptr])
        fwd_rows.restype = cint
        bwd_rows = getattr(lib, f"nm_backward_rows_{sfx}")
        bwd_rows.argtypes = [ptr] * 10 + [i64, i64, cint, dbl, dbl, cint] + [ptr] * 2 + [cint, cint, ptr]
        bwd_rows.restype = None
    first_call = (time.perf_counter() - t0, how)
    log.debug("normmatters.kernels.native: %s library loaded in %.2f s", how, first_call[0])
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None (after one warning) if that fails."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is None and not _failed:
            try:
                _lib = _build()
            except Exception as exc:  # noqa: BLE001 - any build/load failure means: use the Inductor path
                _failed = True
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                warnings.warn(f"normmatters.kernels: the native CPU kernels are unavailable "
                              f"({type(exc).__name__}: {first_line}); using the torch.compile kernels",
                              RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    return load() is not None


#: "auto" takes the channel kernels for contiguous input whose (sample, channel) rows have at least
#: AUTO_MIN_ROW_BYTES (bfloat16: AUTO_MIN_ROW_BYTES_BF16); else the Inductor kernels. Measured fwd+bwd / BN,
#: interleaved, native vs compiled (l1; range alike), since the channel kernels take blocks of channels:
#: fp32 256×256×8×8 (256 B rows, 16 MB) 0.48 vs 0.77; 32×512×7×7 (196 B) 0.80 vs 1.11; 64×256×4×4 (64 B)
#: 1.13 vs 1.42; but 256×64×3×3 (36 B) 2.36 vs 1.64. bf16 256×256×8×8 (128 B) 0.81 vs 1.31, 32×256×14×14
#: 1.35 vs 1.79; but 32×512×7×7 (98 B) 2.19 vs 1.15 and 64×256×4×4 (32 B) 5.8 vs 2.7.
AUTO_MIN_ROW_BYTES = 64
AUTO_MIN_ROW_BYTES_BF16 = 128


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
    channels-innermost layouts; the channel kernels by row length (:data:`AUTO_MIN_ROW_BYTES`), and always
    for top-k (the Inductor top-k is 3-5x slower than the native one at every benchmark shape)."""
    if channels_innermost(x) or norm == "topk":
        return True
    return _row_bytes(x) >= (AUTO_MIN_ROW_BYTES_BF16 if x.dtype == torch.bfloat16 else AUTO_MIN_ROW_BYTES)


def eligible(x: Tensor, weight: Tensor, bias: Tensor, norm: str, groups: int, m: int, k: int = 10) -> bool:
    """Whether the native kernels cover this call (see the module docstring); does not build anything."""
    if not (norm in NORM_CODES and groups == 1 and m == 1 and x.device.type == "cpu" and x.dtype in _SUFFIX):
        return False
    if norm == "topk" and not 1 <= k <= TOPK_MAX:
        return False
    if norm == "range" and _channel_layout(x) and x.numel() // x.shape[1] >= 2**31:
        return False  # the max/min positions are int32
    params = (x.dtype, _COMPUTE[x.dtype])  # bfloat16 elements: bfloat16 or float32 parameters
    return (weight.dtype in params and bias.dtype == weight.dtype
            and x.dim() >= 2 and x.numel() > 0 and x.numel() // (x.shape[0] * x.shape[1]) < 2**31
            and (x.is_contiguous() or channels_innermost(x)) and weight.is_contiguous()
            and bias.is_contiguous() and not torch.compiler.is_compiling())


def inplace_eligible(x: Tensor, weight: Tensor, bias: Tensor, norm: str, groups: int, m: int,
                     k: int = 10) -> bool:
    """Whether the native kernels cover this call in in-place mode: :func:`eligible`, except top-k in the
    rows layout (its in-place backward would need the top-k of the rebuilt d per thread)."""
    return eligible(x, weight, bias, norm, groups, m, k) and (norm != "topk" or _channel_layout(x))


def _scratch(x: Tensor, C: int, doubles: int, compute: int) -> tuple[Tensor, Tensor]:
    """Per-call scratch of the rows kernels: ``doubles``·C float64 and ``compute``·C in the compute dtype."""
    return (torch.empty(doubles * C, dtype=torch.float64), torch.empty(compute * C, dtype=_COMPUTE[x.dtype]))


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


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
    does not change between steps (the C functions, (N, C, S), the norm code, non-temporal stores, which
    statistics to allocate, the block size per thread count) worked out once.

    :func:`forward` and :func:`backward` build one per call; :class:`.native_autograd.NativePlan` keeps
    one across a layer's steps (its Python before and after the kernel runs on caches the previous layer's
    kernel has just flushed, where each helper call costs 10-40 µs). Valid for tensors with ``x``'s shape,
    strides and dtype on the CPU, as :func:`eligible` accepted (callers check that; :meth:`matches`).
    """

    __slots__ = ("shape", "strides", "dtype", "acc", "N", "C", "S", "channel", "code", "norm", "divides", "c",
                 "eps", "k", "inplace", "stream", "want_pos", "want_hi", "want_lo", "fwd", "bwd", "nt", "cb")

    def __init__(self, x: Tensor, norm: str, c: float, eps: float, k: int = 10, inplace: bool = False) -> None:
        lib = _lib
        self.shape, self.strides, self.dtype = x.shape, x.stride(), x.dtype
        self.acc = _COMPUTE[x.dtype]
        self.N, self.C, self.S = _dims(x)
        self.channel = _channel_layout(x)
        self.code, self.norm, self.c, self.eps, self.k = NORM_CODES[norm], norm, float(c), float(eps), k
        self.divides = get_estimator(norm).divides  # the statistic has a raw value to divide by (not mean-only)
        self.inplace = inplace
        self.stream = _stream(x) if self.channel else _stream_rows(x)
        # in-place backward rebuilds its thresholds from y: no max/min positions
        self.want_pos = self.channel and norm == "range" and not inplace
        self.want_hi = norm == "topk" or (norm == "range" and not self.want_pos)
        self.want_lo = norm == "range" and not self.want_pos
        layout = "" if self.channel else "rows_"
        self.fwd = getattr(lib, f"nm_forward_{layout}{_SUFFIX[x.dtype]}")
        self.bwd = getattr(lib, f"nm_backward_{layout}{_SUFFIX[x.dtype]}")
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
                unbias: float = 0.0, buf_bf16: int = 0) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...], int]:
        """:func:`forward` for this launch; the running buffers (each possibly None, :func:`update_fusable`)
        are updated by the kernel with ``momentum`` and ``unbias`` = n / (n − 1); ``buf_bf16``: they are
        bfloat16 (with float32 statistics)."""
        nt = self._threads()
        C, acc = self.C, self.acc
        y = x if self.inplace else pool.empty_like(x)
        mean = torch.empty(C, dtype=acc)
        raw = torch.empty(C, dtype=acc)
        pos = torch.empty(2, C, dtype=torch.int32) if self.want_pos else None
        hi = torch.empty(C, dtype=acc) if self.want_hi else None
        lo = torch.empty(C, dtype=acc) if self.want_lo else None
        if weight.dtype is not acc:  # bfloat16 parameters of bfloat16 input
            weight, bias = weight.to(acc), bias.to(acc)
        if self.channel:
            ok = self.fwd(
                x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(), mean.data_ptr(), raw.data_ptr(),
                _ptr(hi), _ptr(lo), self.N, C, self.S, self.code, self.c, self.eps, self.stream, nt,
                _ptr(run_mean), _ptr(run_var), _ptr(nbt), momentum, unbias, buf_bf16, self.k, self.cb, _ptr(pos))
        else:  # channels innermost: (N·S, C) rows
            scratch, tscratch = _scratch(x, C, 4 * nt, 1 + 3 * nt)
            tops = topi = None
            if self.norm == "topk":  # per thread and channel: k values and a threshold; a count and a position
                tops = torch.empty(nt * C * (self.k + 1), dtype=acc)
                topi = torch.empty(nt * 2 * C, dtype=torch.int32)
            ok = self.fwd(
                x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(), mean.data_ptr(), raw.data_ptr(),
                _ptr(hi), _ptr(lo), self.N * self.S, C, self.code, self.c, self.eps, nt, scratch.data_ptr(),
                tscratch.data_ptr(), _ptr(run_mean), _ptr(run_var), _ptr(nbt), momentum, unbias, buf_bf16,
                self.stream, self.k, _ptr(tops), _ptr(topi))
        if self.norm == "range":
            aux = (pos,) if pos is not None else (hi, lo)
        else:
            aux = (hi,) if hi is not None else ()
        return y, mean, raw, aux, int(ok)

    def backward(self, gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor | None, raw: Tensor,
                 aux: tuple[Tensor, ...], need_x: bool, need_w: bool, need_b: bool,
                 bias: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """:func:`backward` for this launch."""
        if gy.dtype is not self.dtype or gy.stride() != self.strides:  # the kernels read gy in x's layout
            gy = torch.empty_like(x).copy_(gy)
        nt = self._threads()
        C, acc = self.C, self.acc
        gx = pool.empty_like(x) if need_x else None
        gw = torch.empty(C, dtype=acc) if need_w else None
        gb = torch.empty(C, dtype=acc) if need_b else None
        hi = lo = pos = None  # in place (bias given) the kernel rebuilds its thresholds: aux is unused
        if bias is None and aux:
            if self.norm == "topk":
                (hi,) = aux
            elif len(aux) == 1:  # range: the channel kernels' max/min positions
                (pos,) = aux
            else:  # range: the rows kernels' max and min values
                hi, lo = aux
        w = weight if weight.dtype is acc else weight.to(acc)  # held until the call returns
        b = None if bias is None else bias if bias.dtype is acc else bias.to(acc)
        if self.channel:
            self.bwd(gy.data_ptr(), x.data_ptr(), _ptr(gx), w.data_ptr(), _ptr(mean), raw.data_ptr(),
                     _ptr(hi), _ptr(lo), _ptr(gw), _ptr(gb), self.N, C, self.S, self.code, self.c, self.eps,
                     self.stream, nt, self.k, self.cb, _ptr(pos), _ptr(b))
        else:  # channels innermost: (N·S, C) rows
            scratch, tscratch = _scratch(x, C, 6 * nt, 10 + 6 * nt)
            self.bwd(gy.data_ptr(), x.data_ptr(), _ptr(gx), w.data_ptr(), _ptr(mean), raw.data_ptr(),
                     _ptr(hi), _ptr(lo), _ptr(gw), _ptr(gb), self.N * self.S, C, self.code, self.c, self.eps, nt,
                     scratch.data_ptr(), tscratch.data_ptr(), self.stream, self.k, _ptr(b))
        if gw is not None and weight.dtype is not acc:
            gw = gw.to(weight.dtype)
        if gb is not None and weight.dtype is not acc:
            gb = gb.to(weight.dtype)  # eligible() requires bias.dtype == weight.dtype
        return gx, gw, gb


def running_args(running: tuple | None) -> tuple:
    """``running`` = (running_mean, running_var, num_batches_tracked, momentum, n) → the keyword arguments
    (run_mean, run_var, nbt, momentum, unbias, buf_bf16) of :meth:`Launch.forward`; () for None."""
    if running is None:
        return ()
    rm, rv, nbt, momentum, n = running
    buf_bf16 = int(any(t is not None and t.dtype == torch.bfloat16 for t in (rm, rv)))
    return rm, rv, nbt, float(momentum), n / (n - 1), buf_bf16


def forward(x: Tensor, weight: Tensor, bias: Tensor, c: float, eps: float, norm: str,
            running: tuple | None = None, k: int = 10,
            inplace: bool = False) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...], int]:
    """(y, μ (C,), raw (C,), aux, ok) — aux for range: (pos,) from the channel kernels, pos (2, C) int32 the
    per-channel position (sample·S + spatial index) of the max (row 0) and min (row 1), p if that element is
    the only one equal to it, -(p + 1) for the first of several; (hi, lo) per channel from the rows kernels;
    (τ,) for topk (the k-th largest |d|); else ().

    ``running`` = (running_mean, running_var, num_batches_tracked, momentum, n), each buffer possibly None
    and all :func:`update_fusable`: the kernel then also applies
    :func:`normmatters.functional.update_running_stats` (one group) to them, in the same call, and ``ok`` is
    its status: 1 updated, 0 non-finite statistics, 2 finite statistics whose running_var would overflow the
    buffer's dtype (0 and 2: every buffer unchanged). Without ``running``, ``ok`` is still the finite flag (the
    kernel checks every call; no buffer is touched).
    The update is done here rather than by a separate (compiled) call because that call, coming right
    after a kernel that has streamed the activations through every cache, costs ~0.3 ms of cache misses.
    ``inplace``: y is written over x and returned as x itself.
    """
    return Launch(x, norm, c, eps, k, inplace).forward(x, weight, bias, *running_args(running))


def backward(gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor | None, raw: Tensor, aux: tuple[Tensor, ...],
             c: float, eps: float, norm: str, need_x: bool, need_w: bool, need_b: bool,
             k: int = 10, bias: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂x, ∂L/∂w, ∂L/∂b) from the saved input and per-channel statistics of :func:`forward`.

    In-place mode (``bias`` given; no top-k in the rows layout): ``x`` is the output y that overwrote the input,
    ``mean`` and ``aux`` are unused; the kernel rebuilds d = (y − b)/scale and, for linf/range/top-k, the
    thresholds it compares against from d (as :func:`.formulas.backward_inplace`)."""
    return Launch(x, norm, c, eps, k, bias is not None).backward(gy, x, weight, mean, raw, aux, need_x, need_w,
                                                                 need_b, bias)
