"""Per-sample (row) norms against the stock layers, side by side: per-call overhead, the public function against
the layer, large shapes, Python calls per forward and host reads per training step.

    python docs/bench/row_overhead.py [--rounds 15] [--quick]

Printed, each a median over rounds of (ours / theirs) timed back to back in the same round:

* ``small``: ``LpLayerNorm(64)`` fwd+bwd at 8×64, one thread, 50 steps per round, over ``nn.LayerNorm(64)``;
* ``functional``: ``nm.lp_layer_norm(x, (768,), w, b, norm="l1")`` fwd+bwd over the layer's at 8192×768;
* ``large fwd``: ``LpLayerNorm(768)`` forward alone (no grad) at 8192×768 over ``F.layer_norm``;
* ``bf16``: bfloat16 ``LpLayerNorm(768)`` at 8192×768 and ``LpGroupNorm(8, 64)`` at 32×64×32×32 fwd+bwd over
  the stock layers in bfloat16;
* ``calls``: Python function calls (``sys.setprofile`` "call" events) of one steady-state training forward, ours
  and the stock layer's;
* ``host reads``: aten ``_local_scalar_dense`` / ``is_nonzero`` / ``item`` in one training step per impl.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normmatters as nm


class Ratio(float):
    """The median over rounds of ours/theirs; ``str`` adds the ratio of the fastest rounds (robust on a loaded
    machine, where the median is noisy)."""

    best: float

    def __format__(self, spec: str) -> str:
        return f"{float(self):{spec}}x (fastest {self.best:.2f}x)"


CLOCK = time.perf_counter


def median_ratio(fa, fb, rounds: int) -> Ratio:
    for _ in range(2):
        fa()
        fb()
    rs, tas, tbs = [], [], []
    for _ in range(rounds):
        t = CLOCK()
        fa()
        ta = CLOCK() - t
        t = CLOCK()
        fb()
        tb = CLOCK() - t
        rs.append(ta / tb)
        tas.append(ta)
        tbs.append(tb)
    r = Ratio(sorted(rs)[len(rs) // 2])
    r.best = min(tas) / min(tbs)
    return r


def python_calls(fn) -> int:
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event == "call":
            n += 1

    fn()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


class HostReads(TorchDispatchMode):
    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="fewer rounds, no bf16 group norm")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time (time.process_time) rather than the wall clock: steadier on a "
                        "machine shared with other work")
    p.add_argument("--skip-small", action="store_true", help="no small-shape and call-count lines")
    a = p.parse_args()
    rounds = 5 if a.quick else a.rounds
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    torch.manual_seed(0)
    threads = torch.get_num_threads()

    torch.set_num_threads(1)
    xs = torch.randn(8, 64, requires_grad=True)
    stock = nn.LayerNorm(64)
    for norm in () if a.skip_small else ("l2", "l1", "linf", "topk"):
        ours = nm.LpLayerNorm(64, norm=norm)
        r = median_ratio(lambda o=ours: [o(xs).sum().backward() for _ in range(50)],
                         lambda: [stock(xs).sum().backward() for _ in range(50)], rounds)
        print(f"small 8x64 fwd+bwd {norm:5s} {r:5.2f} nn.LayerNorm (1 thread)")
    for norm in ("l2", "l1"):
        ours = nm.LpLayerNorm(64, norm=norm)
        print(f"calls per training forward {norm}: ours {python_calls(lambda o=ours: o(xs))}, "
              f"nn.LayerNorm {python_calls(lambda: stock(xs))}")
    g, stock_g = nm.LpGroupNorm(4, 16), nn.GroupNorm(4, 16)
    xg = torch.randn(8, 16, 4, 4, requires_grad=True)
    print(f"calls per training forward LpGroupNorm l1: ours {python_calls(lambda: g(xg))}, "
          f"nn.GroupNorm {python_calls(lambda: stock_g(xg))}")
    torch.set_num_threads(threads)

    xl = torch.randn(8192, 768, requires_grad=True)
    ln = nm.LpLayerNorm(768, norm="l1")
    r = median_ratio(lambda: nm.lp_layer_norm(xl, (768,), ln.weight, ln.bias, norm="l1").sum().backward(),
                     lambda: ln(xl).sum().backward(), max(3, rounds // 2))
    print(f"functional lp_layer_norm l1 8192x768 fwd+bwd {r:5.2f} the layer")
    ref = nn.LayerNorm(768)
    with torch.no_grad():
        for norm in ("l2", "l1", "linf"):
            ours = nm.LpLayerNorm(768, norm=norm)
            r = median_ratio(lambda o=ours: o(xl), lambda: ref(xl), rounds)
            print(f"large fwd 8192x768 {norm:5s} {r:5.2f} F.layer_norm")
    xb = torch.randn(8192, 768, dtype=torch.bfloat16, requires_grad=True)
    refb = nn.LayerNorm(768, dtype=torch.bfloat16)
    for norm in ("l2", "l1"):
        ours = nm.LpLayerNorm(768, norm=norm, dtype=torch.bfloat16)
        r = median_ratio(lambda o=ours: o(xb).sum().backward(), lambda: refb(xb).sum().backward(), max(3, rounds // 2))
        print(f"bf16 layer 8192x768 fwd+bwd {norm:5s} {r:5.2f} nn.LayerNorm")
    if not a.quick:
        xgb = torch.randn(32, 64, 32, 32, dtype=torch.bfloat16, requires_grad=True)
        refg = nn.GroupNorm(8, 64, dtype=torch.bfloat16)
        for norm in ("l2", "l1"):
            ours = nm.LpGroupNorm(8, 64, norm=norm, dtype=torch.bfloat16)
            r = median_ratio(lambda o=ours: o(xgb).sum().backward(), lambda: refg(xgb).sum().backward(),
                             max(3, rounds // 2))
            print(f"bf16 group 32x64x32x32 fwd+bwd {norm:5s} {r:5.2f} nn.GroupNorm")

    for impl in (None, "eager", "compiled"):
        counts = []
        for layer, shape in ((nm.LpLayerNorm(32, impl=impl), (16, 32)), (nm.LpRMSNorm(32, impl=impl), (16, 32)),
                             (nm.LpGroupNorm(4, 16, impl=impl), (8, 16, 4, 4))):
            x = torch.randn(*shape, requires_grad=True)
            layer(x).sum().backward()
            with HostReads() as h:
                layer(x).sum().backward()
            counts.append(f"{type(layer).__name__} {h.count}")
        print(f"host reads per training step impl={impl}: " + ", ".join(counts))


if __name__ == "__main__":
    main()
