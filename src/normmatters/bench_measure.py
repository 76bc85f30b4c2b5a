"""How ``normmatters bench`` measures (not what): interleaved timing rounds and their per-round ratios, the
memory copy bandwidth, bytes saved for backward and peak memory.

Every timing waits for the device before the clock starts and before it stops (:func:`sync_device`; on CUDA
kernels run asynchronously, so a timing without it would measure the launch only).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .kernels import pool

__all__ = ["copy_bandwidth", "interleaved", "median", "peak_bytes", "ratio", "saved_bytes", "sync_device",
           "unique_saved_bytes"]


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(v: Iterable[float]) -> float:
    """The median of ``v`` (any iterable)."""
    return statistics.median(list(v))


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, rounds: int = 15) -> float:
    """Bytes per second of a tensor copy (read + write counted) on ``device``, median of ``rounds``: the memory
    (DRAM / HBM) bandwidth, so the buffers are far larger than any cache — with 16 MB buffers (32 MB in all,
    this VM's L3) the copy partly ran from cache and read 39-64 GB/s between runs, against ~30 GB/s from
    memory, which made the roofline fraction depend on the run."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds + 3):
        sync_device(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync_device(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / median(times[3:])


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves while ``fn`` runs (each saved tensor counted once per save)."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@contextlib.contextmanager
def _quiet_native_stderr():
    """Send file descriptor 2 to /dev/null while one profiled call runs: the profiler's C++ side prints a
    "USDT ... profiler_start/stop" pair per use that no setting turns off. Anything else written to stderr
    inside that window is dropped too; sys.stderr is flushed before and fd 2 restored after."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of newly allocated memory while ``fn`` runs."""
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync_device(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    # the native kernels' buffer pool off: a reused buffer is no allocation event, and would read as zero
    with pool.disabled(), _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                                          profile_memory=True) as prof:
        fn()
    # allocations made inside an op are attributed to it (net, at its start); frees outside any op are
    # separate "[memory]" events: per-op granularity, so this is an estimate of the true peak
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every function, ``rounds`` rounds of one call each in turn (after ``warmup`` calls
    each), the device synchronised around every call: ``{name: [seconds per round]}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync_device(device)
            t = time.perf_counter()
            fn()
            sync_device(device)
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of the per-round ratio ``times[a] / times[b]``."""
    return median(x / y for x, y in zip(times[a], times[b], strict=True))


def unique_saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (a tensor saved by two ops, e.g. a conv
    output kept by the norm and by the ReLU after it, counts once) — the activation memory of a model."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        seen[(st.data_ptr(), str(t.device))] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
