"""Per-call cost of the Lp layers against nn.BatchNorm at the shapes of issue #17 (fwd+bwd, training, float32,
the default impl), measured side by side in interleaved rounds; then, with --autograd, what each way of making
an operator differentiable adds per fwd+bwd call at a tiny shape.

    python docs/bench/native_overhead.py [--rounds 40] [--autograd] [--no-layers]

Prints one table: for each case, the median over rounds of (Lp step time / nn.BatchNorm step time) measured in
the same round. Run it on two source trees (PYTHONPATH=<tree>/src) to compare before and after a change.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normmatters as nm

CASES = (("32x512x7x7 channels_last", (32, 512, 7, 7), True),
         ("256x1024 (N, C)", (256, 1024), False),
         ("64x64x32x32 contiguous", (64, 64, 32, 32), False))
NORMS = ("l2", "l1", "linf", "range", "mean", "topk")


def _step(m: nn.Module, x0: torch.Tensor, g: torch.Tensor):
    def f():
        x = x0.detach().requires_grad_()
        m(x).backward(g)
    return f


def _interleaved(fns: dict, rounds: int) -> dict:
    for f in fns.values():
        f(), f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def layers_vs_bn(rounds: int) -> None:
    print(f"normmatters {nm.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("case".ljust(28) + "".join(n.rjust(8) for n in NORMS) + "   BN ms")
    for name, shape, cl in CASES:
        torch.manual_seed(0)
        x0 = torch.randn(shape)
        if cl:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x0)
        C = shape[1]
        bn_cls, lp_cls = (nn.BatchNorm1d, nm.LpBatchNorm1d) if len(shape) == 2 else (nn.BatchNorm2d, nm.LpBatchNorm2d)
        mods = {"bn": bn_cls(C).train()}
        mods.update({n: lp_cls(C, norm=n).train() for n in NORMS})
        times = _interleaved({k: _step(m, x0, g) for k, m in mods.items()}, rounds)
        ratios = [statistics.median(a / b for a, b in zip(times[n], times["bn"])) for n in NORMS]
        print(name.ljust(28) + "".join(f"{r:8.2f}" for r in ratios) + f"{statistics.median(times['bn']) * 1e3:8.3f}")


def autograd_overhead(rounds: int) -> None:
    """µs per fwd+bwd at (8, 16): the functional operator with register_autograd (a Python autograd.Function
    that torch.library builds), the same operator and its backward op called without autograd, and the eager
    layer path (our own autograd.Function around the *_out operators); for scale, aten's native_batch_norm with
    its C++ autograd node against the same call without autograd."""
    from normmatters.estimators import get_estimator
    from normmatters.kernels import native, native_ops

    assert native.available()
    x0, C = torch.randn(8, 16), 16
    c = torch.tensor(get_estimator("l1").constant(8))
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    g = torch.randn_like(x0)
    layer = nm.LpBatchNorm1d(C, norm="l1", impl="native").train()
    bn_w, bn_b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)

    def op_autograd():
        x = x0.detach().requires_grad_()
        native_ops.fwd(x, w, b, "l1", c, 1e-5, 10)[0].backward(g)

    def op_plain():
        with torch.no_grad():
            y, mean, raw, aux = native_ops.fwd(x0, w, b, "l1", c, 1e-5, 10)
            native_ops.bwd(g, x0, w, mean, raw, aux, "l1", c, 1e-5, 10, True)

    def eager_layer():
        x = x0.detach().requires_grad_()
        layer(x).backward(g)

    def aten_autograd():
        x = x0.detach().requires_grad_()
        torch.ops.aten.native_batch_norm(x, bn_w, bn_b, None, None, True, 0.1, 1e-5)[0].backward(g)

    def aten_plain():
        with torch.no_grad():
            y, mean, invstd = torch.ops.aten.native_batch_norm(x0, bn_w, bn_b, None, None, True, 0.1, 1e-5)
            torch.ops.aten.native_batch_norm_backward(g, x0, bn_w, None, None, mean, invstd, True, 1e-5,
                                                      [True, True, True])

    fns = dict(op_autograd=op_autograd, op_plain=op_plain, eager_layer=eager_layer, aten_autograd=aten_autograd,
               aten_plain=aten_plain)
    times = _interleaved(fns, rounds * 20)
    print("\nµs per fwd+bwd at (8, 16), l1 (median of interleaved calls):")
    for k in fns:
        print(f"  {k:14s} {statistics.median(times[k]) * 1e6:8.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--autograd", action="store_true")
    p.add_argument("--no-layers", action="store_true", help="skip the layer table")
    a = p.parse_args()
    if not a.no_layers:
        layers_vs_bn(a.rounds)
    if a.autograd:
        autograd_overhead(a.rounds)
