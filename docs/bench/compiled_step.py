"""Training step of a small CNN under ``torch.compile``: LpBatchNorm2d (l1, range; the default impl and
``impl="compiled"``) against the same model with nn.BatchNorm2d, each model compiled, timed side by side.

    python docs/bench/compiled_step.py [--model resnet20|resnet8] [--batch 128] [--rounds 20] [--norms l1 range]

Under ``torch.compile`` the default ("auto") impl puts the ``normmatters::lp_batch_norm_fwd`` operator (and its
backward and ``update_running_stats``) into the graph where eager mode would take the native kernels
(:func:`normmatters.kernels.native.covers` and ``auto_prefers``); ``impl="compiled"`` traces the lean
formulas, which Inductor fuses with the neighbouring ops. One SGD step (forward, cross-entropy, backward, step)
of every model in turn per round, the order rotating; printed: per model the median over rounds of its step
time over nn.BatchNorm2d's in the same round, and the BN step in ms. Compilation (first steps) is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normmatters as nm
from normmatters.bench import resnet20
from normmatters.experiments.models import build_model


def _model(name: str, norm: str | None, impl: str | None, batch_shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.BatchNorm2d if norm is None else (lambda c: nm.LpBatchNorm2d(c, norm=norm, impl=impl))
    if name == "resnet20":
        return resnet20(layer).train()
    return build_model(name, norm="bn" if norm is None else norm, num_classes=10, in_channels=batch_shape[1],
                       **({} if impl is None else {"impl": impl})).train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--norms", nargs="+", default=["l1", "range"])
    p.add_argument("--impls", nargs="+", default=["auto", "compiled"], help="impl of the Lp layers")
    a = p.parse_args()
    shape = (a.batch, 3, 32, 32)
    x = torch.randn(shape)
    t = torch.randint(0, 10, (a.batch,))
    variants = {"bn": (None, None)}
    variants.update({f"{n}/{i}": (n, i) for n in a.norms for i in a.impls})
    steps = {}
    for name, (norm, impl) in variants.items():
        model = _model(a.model, norm, impl, shape)
        cmodel = torch.compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(cmodel=cmodel, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(cmodel(x), t).backward()
            opt.step()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        print(f"{name}: compiled and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(a.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"\n{a.model}, batch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.rounds} rounds; compiled step time / compiled nn.BatchNorm2d step (median of per-round ratios)")
    bn = times["bn"]
    for name in names[1:]:
        ratio = statistics.median(v / b for v, b in zip(times[name], bn, strict=True))
        print(f"  {name:16s} {ratio:5.2f}")
    print(f"  bn step {statistics.median(bn) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
