"""What the overflow-safe l2 statistic costs on the compiled (Inductor) path: fwd+bwd of LpBatchNorm2d(norm="l2",
impl="compiled") against nn.BatchNorm2d, and the statistic alone — the float32 one-pass Welford ``var_mean`` it
replaced (σ̂² overflows float32 above |x − μ| ~ 1.8e19) against the two float64 passes used now for float32
(``normmatters.estimators`` ``_L2.lean_stats``), the float64 Welford pass used before them (which Inductor cannot
vectorize when fed by a bfloat16 conversion) and the scaled two-pass one used for float64 — interleaved round by
round, median of the per-round ratios.

    python docs/bench/l2_compiled_overflow_cost.py [--rounds 15] [--shape 64 64 32 32]
"""

import argparse
import statistics
import time

import torch

from normmatters.estimators import get_estimator
from normmatters.nn import LpBatchNorm2d

DIMS = (1, 2, 4)


def welford(x):
    var, mean = torch.var_mean(x, DIMS, correction=0, keepdim=True)
    return mean, var.sqrt()


def welford64(x):  # the float32 path of lean_stats until it failed to compile for bfloat16 input
    var, mean = torch.var_mean(x.to(torch.float64), DIMS, correction=0, keepdim=True)
    return mean.float(), var.sqrt().float()


def current(x):
    mean, raw, _ = get_estimator("l2").lean_stats(x)
    return mean, raw


def scaled(x):  # the float64 path of lean_stats, run on float32
    mean, raw, _ = get_estimator("l2").lean_stats(x.double())
    return mean, raw


def timed(fn, reps=5):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--shape", type=int, nargs=4, default=[64, 64, 32, 32])
    a = p.parse_args()
    N, C, H, W = a.shape
    x = torch.randn(N, C, H, W)
    x5 = x.view(1, 1, N, C, H * W)
    old, new, two = torch.compile(welford), torch.compile(current), torch.compile(scaled)
    w64 = torch.compile(welford64)
    bn, lp = torch.nn.BatchNorm2d(C), LpBatchNorm2d(C, norm="l2", impl="compiled")
    g = torch.randn_like(x)

    def step(layer):
        xr = x.clone().requires_grad_()
        layer(xr).backward(g)

    for f in (lambda: old(x5), lambda: new(x5), lambda: two(x5), lambda: w64(x5), lambda: step(bn),
              lambda: step(lp)):  # warm up
        f()
        f()
    stat, stat2, stat3, layer = [], [], [], []
    for _ in range(a.rounds):
        t_old, t_new, t_two = timed(lambda: old(x5)), timed(lambda: new(x5)), timed(lambda: two(x5))
        stat3.append(timed(lambda: w64(x5)) / t_old)
        t_bn, t_lp = timed(lambda: step(bn)), timed(lambda: step(lp))
        stat.append(t_new / t_old)
        stat2.append(t_two / t_old)
        layer.append(t_lp / t_bn)
    print(f"shape {tuple(a.shape)} float32, {a.rounds} interleaved rounds, median ratio:")
    print(f"  l2 statistic, two float64 passes (float32 input now) / float32 Welford: {statistics.median(stat):.2f}")
    print(f"  l2 statistic, float64 Welford (before) / float32 Welford: {statistics.median(stat3):.2f}")
    print(f"  l2 statistic, scaled two-pass in float64 / float32 Welford: {statistics.median(stat2):.2f}")
    print(f"  LpBatchNorm2d(l2, impl='compiled') fwd+bwd / nn.BatchNorm2d: {statistics.median(layer):.2f}")


if __name__ == "__main__":
    main()
