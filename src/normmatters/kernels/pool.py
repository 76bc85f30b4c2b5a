"""A cache of the native kernels' large output buffers (y, ∂L/∂x), reused once nothing else refers to them.

Why: glibc gives the free memory at the top of its heap back to the OS once more than ``M_TRIM_THRESHOLD`` is
free there (by default twice the largest block freed so far), so a training loop that frees its activations
every step maps them again the next step and pays one page fault per 4 KB on first touch. Measured on this
project's 2-core VM, 64×64×32×32 float32 range step: the native backward takes 2.0 ms, and 7 ms in the ~40%
of steps where ∂L/∂x landed on freshly mapped pages (~5000 faults, ~1 µs each) — the faults cost more than
the kernel. The CUDA caching allocator keeps freed blocks for the same reason; nn.BatchNorm2d on the CPU
does not, so it still pays them.

Rules:

* only buffers of at least :data:`MIN_BYTES` are pooled (smaller ones come from malloc's bins without faults);
* a pooled buffer is handed out again only while the pool holds the **sole** reference to its storage — no
  tensor, view, saved tensor or storage object elsewhere refers to it (``UntypedStorage`` use count 1), so a
  buffer a user still holds is never overwritten;
* the pool keeps at most :func:`limit` bytes (``$NORMMATTERS_POOL_BYTES`` at import, default 1 GiB, or
  :func:`set_limit`; ``0`` turns the pool off); past it, buffers come from ``torch.empty_like`` as without
  the pool;
* :func:`empty_cache` drops the idle buffers (memory held by the pool is not visible to the user as tensors;
  call it after training, as ``torch.cuda.empty_cache``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "ENV", "empty_like", "empty_cache", "limit", "set_limit", "disabled", "pooled_bytes",
           "idle_bytes"]

#: buffers smaller than this are not pooled
MIN_BYTES = 128 << 10
ENV = "NORMMATTERS_POOL_BYTES"
_DEFAULT_LIMIT = 1 << 30

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private, present since torch 1.x; None: pool off
_lock = threading.Lock()
#: Python references to an idle pooled storage object seen by sys.getrefcount inside _idle: the pool's list
#: entry, the caller's loop variable and _idle's argument (the getrefcount argument itself: one more)
_POOL_REFS = 4
_free: dict[tuple[int, torch.dtype], list[torch.UntypedStorage]] = {}
_total = 0


def _limit_from_env() -> int:
    raw = os.environ.get(ENV, "")
    if not raw:
        return _DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"normmatters.kernels.pool: ${ENV} must be a whole number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"normmatters.kernels.pool: ${ENV} must be >= 0, got {value}")
    return value


#: the most bytes the pool keeps; read from ``$NORMMATTERS_POOL_BYTES`` at import (default 1 GiB), changed with
#: :func:`set_limit` (reading the environment on every call cost ~10 µs, a tenth of a small layer's step)
_limit = _limit_from_env()


def limit() -> int:
    """The most bytes the pool keeps (0: the pool is off)."""
    return _limit


def set_limit(nbytes: int | None = None) -> int:
    """Set the most bytes the pool keeps (0 turns it off; already pooled buffers stay until
    :func:`empty_cache`); None: read ``$NORMMATTERS_POOL_BYTES`` again. Returns the new limit."""
    global _limit
    if nbytes is None:
        nbytes = _limit_from_env()
    elif not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"normmatters.kernels.pool.set_limit: expected a whole number of bytes >= 0, got {nbytes!r}")
    _limit = nbytes
    return _limit


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the pool hands out nothing (every buffer is a new allocation, visible to allocator
    statistics and profilers, as ``normmatters bench``'s peak memory needs); the limit is restored after."""
    global _limit
    before = _limit
    _limit = 0
    try:
        yield
    finally:
        _limit = before


def _idle(s: torch.UntypedStorage) -> bool:
    """Nothing outside the pool refers to s: its C++ use count is the pool's one reference, and no Python
    reference to the storage object exists beyond the pool's list entry (torch hands out one Python object per
    storage, so a user's ``t.untyped_storage()`` kept after t is gone is this very object)."""
    return _use_count(s._cdata) == 1 and sys.getrefcount(s) <= _POOL_REFS


def empty_like(x: Tensor) -> Tensor:
    """An uninitialised tensor with x's shape, strides, dtype and device (x dense: contiguous or a permutation
    of it, as the native kernels require), from the pool when an idle buffer of the same size is there."""
    nbytes = x.numel() * x.element_size()
    cap = _limit
    if _use_count is None or nbytes < MIN_BYTES or cap == 0 or x.device.type != "cpu":
        return torch.empty_like(x)
    global _total
    key = (nbytes, x.dtype)
    with _lock:
        for s in _free.get(key, ()):
            if _idle(s):
                return torch.empty(0, dtype=x.dtype).set_(s, 0, x.shape, x.stride())
        out = torch.empty_like(x)
        if _total + nbytes <= cap:
            _free.setdefault(key, []).append(out.untyped_storage())
            _total += nbytes
        return out


def empty_cache() -> int:
    """Drop every idle pooled buffer (buffers still in use stay tracked); returns the bytes released."""
    global _total
    released = 0
    with _lock:
        for key in list(_free):
            keep = [s for s in _free[key] if not _idle(s)]
            released += (len(_free[key]) - len(keep)) * key[0]
            if keep:
                _free[key] = keep
            else:
                del _free[key]
        _total -= released
    return released


def pooled_bytes() -> int:
    """Bytes of every buffer the pool tracks (in use or idle)."""
    return _total


def idle_bytes() -> int:
    """Bytes of the pooled buffers nothing else refers to (what :func:`empty_cache` would release)."""
    with _lock:
        return sum(key[0] for key, lst in _free.items() for s in lst if _idle(s))
