"""The batch-statistics dispatch (issue 25) side by side with the stock layers: host reads, Python calls per
training forward, small-shape step time, the public function against the layer, and a large-shape step.

    python docs/bench/bn_dispatch.py [--rounds 9] [--no-large]

Run it on two source trees (``PYTHONPATH=<tree>/src``) to compare before and after a change. Every timing is a
median over interleaved rounds of (ours / theirs) measured in the same round; nothing here asserts a time.

* host reads: ``aten._local_scalar_dense`` / ``is_nonzero`` / ``item`` seen by a ``TorchDispatchMode`` in one
  warm training step (fwd+bwd) of LpBatchNorm2d and SyncLpBatchNorm2d (no process group), per ``impl``;
* calls: Python function calls (``sys.setprofile`` "call" events) in one warm training forward, per ``impl``,
  and nn.BatchNorm2d's;
* small: 8×16×4×4, one thread, 50 fwd+bwd steps, LpBatchNorm2d / nn.BatchNorm2d for l2, l1, range;
* public: ``nm.lp_batch_norm(..., training=True)`` / the layer, 64×64×32×32 l1 fwd+bwd;
* large: 64×64×32×32 fwd+bwd / nn.BatchNorm2d for l1, range, linf.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normmatters as nm

IMPLS = (None, "eager", "compiled")


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads(cls, impl, norm: str) -> int:
    kw = {"impl": impl} if impl else {}
    layer = cls(8, norm=norm, **kw)
    x = torch.randn(16, 8, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    layer(x).sum().backward()
    with HostReads() as h:
        layer(x).sum().backward()
    return h.count


def python_calls(layer, x) -> int:
    for _ in range(3):
        layer(x)
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1
    sys.setprofile(prof)
    try:
        layer(x)
    finally:
        sys.setprofile(None)
    return count


def median_ratio(fa, fb, rounds: int) -> float:
    for _ in range(2):
        fa(), fb()
    rs = []
    for _ in range(rounds):
        t = time.perf_counter()
        fa()
        ta = time.perf_counter() - t
        t = time.perf_counter()
        fb()
        rs.append(ta / (time.perf_counter() - t))
    return sorted(rs)[len(rs) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per timing (default 9)")
    p.add_argument("--no-large", action="store_true", help="skip the 64x64x32x32 timings (default: run them)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")

    print("host reads per training step (fwd+bwd, l1 / l2 / range):")
    for cls in (nm.LpBatchNorm2d, nm.SyncLpBatchNorm2d):
        for impl in IMPLS:
            counts = [host_reads(cls, impl, norm) for norm in ("l1", "l2", "range")]
            print(f"  {cls.__name__:18s} impl={impl or 'default':9s} {counts}")

    print("Python calls per training forward (16x8x6x6, l1):")
    x = torch.randn(16, 8, 6, 6, requires_grad=True)
    print(f"  nn.BatchNorm2d                 {python_calls(torch.nn.BatchNorm2d(8), x)}")
    for impl in IMPLS:
        kw = {"impl": impl} if impl else {}
        print(f"  LpBatchNorm2d impl={impl or 'default':9s}   {python_calls(nm.LpBatchNorm2d(8, **kw), x)}")
    rm, rv = torch.zeros(8), torch.ones(8)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    fn = _Fn(lambda t: nm.lp_batch_norm(t, rm, rv, w, b, training=True, norm="l1"))
    print(f"  nm.lp_batch_norm (default)     {python_calls(fn, x)}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("small shapes 8x16x4x4, one thread, 50 fwd+bwd steps, / nn.BatchNorm2d:")
    for norm in ("l2", "l1", "range"):
        xs = torch.randn(8, 16, 4, 4, requires_grad=True)
        ours, stock = nm.LpBatchNorm2d(16, norm=norm), torch.nn.BatchNorm2d(16)
        r = median_ratio(lambda ours=ours, xs=xs: [ours(xs).sum().backward() for _ in range(50)],
                         lambda stock=stock, xs=xs: [stock(xs).sum().backward() for _ in range(50)], args.rounds)
        print(f"  {norm:6s} {r:.2f}")
    torch.set_num_threads(threads)

    if not args.no_large:
        xl = torch.randn(64, 64, 32, 32, requires_grad=True)
        layer = nm.LpBatchNorm2d(64, norm="l1")
        rm, rv = torch.zeros(64), torch.ones(64)
        w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
        r = median_ratio(lambda: nm.lp_batch_norm(xl, rm, rv, w, b, training=True, norm="l1").sum().backward(),
                         lambda: layer(xl).sum().backward(), max(3, args.rounds // 2))
        print(f"public: nm.lp_batch_norm / LpBatchNorm2d, 64x64x32x32 l1 fwd+bwd: {r:.2f}")
        print("large 64x64x32x32 fwd+bwd / nn.BatchNorm2d:")
        bn = torch.nn.BatchNorm2d(64)
        for norm in ("l1", "range", "linf"):
            ours = nm.LpBatchNorm2d(64, norm=norm)
            r = median_ratio(lambda ours=ours: ours(xl).sum().backward(), lambda: bn(xl).sum().backward(),
                             max(3, args.rounds // 2))
            print(f"  {norm:6s} {r:.2f}")


class _Fn:
    def __init__(self, f) -> None:
        self.f = f

    def __call__(self, x):
        return self.f(x)


if __name__ == "__main__":
    main()
