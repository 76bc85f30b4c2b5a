"""The cost of the effective-LR monitor on a ResNet-20 training step, measured side by side (issue: ≤ 1.01× the
plain step on steps that log nothing, ≤ 1.05× on logging steps with every_n_steps=1).

    python docs/bench/monitor_overhead.py [--device cuda] [--batch 128] [--rounds 30] [--threads N]

Each round times one training step (forward, backward, SGD step with momentum and weight decay) three ways, in a
rotating order on the same model: no monitor; a monitor whose next step logs nothing; a monitor that logs every
step (clones the scale-invariant weights before the step, measures, one device-to-host read). The monitor is
built and removed outside the timed region. Prints the median step time of each and the ratios to the plain step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from normmatters.experiments.models import build_model
from normmatters.optim import EffectiveLRMonitor, scale_invariant_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    ap.add_argument("--rounds", type=int, default=30, help="timed steps per variant (default: 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("resnet20", "bn", in_channels=3, image_size=32, num_classes=10).to(dev).train()
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    named = scale_invariant_parameters(model, x[:16])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up: allocator, kernels, momentum buffers
        step()
    variants = {"plain": None, "monitor, step logs nothing": 10**9, "monitor, logs every step": 1}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order: drift hits every variant alike
            every = variants[name]
            mon = None if every is None else EffectiveLRMonitor(opt, named, every_n_steps=every, max_history=4)
            times[name].append(step())
            if mon is not None:
                assert len(mon.history) == (1 if every == 1 else 0)
                mon.remove()
    # the logging step's own work alone (snapshot before the step, measure after it), timed on its own: on a
    # shared machine the step-time ratios carry the machine's noise, this does not
    mon = EffectiveLRMonitor(opt, named, every_n_steps=10**9)
    work = []
    for _ in range(args.rounds):
        sync()
        t0 = time.perf_counter()
        before = [p.detach().clone() for _, p in named]
        mon.measure(before)
        sync()
        work.append(time.perf_counter() - t0)
    mon.remove()
    base = statistics.median(times["plain"])
    print(f"ResNet-20, batch {args.batch}, {len(named)} scale-invariant weights, device {dev}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds")
    print(f"{'variant':32s} {'median step (ms)':>17s} {'× plain':>8s} {'median of per-round ratios':>27s} "
          f"{'fastest step, × plain':>22s}")
    for name in names:
        med = statistics.median(times[name])
        paired = statistics.median(t / p for t, p in zip(times[name], times["plain"]))
        fastest = min(times[name]) / min(times["plain"])  # the least disturbed step of each
        print(f"{name:32s} {1e3 * med:17.2f} {med / base:8.3f} {paired:27.3f} {fastest:22.3f}")
    w = statistics.median(work)
    print(f"{'logging work alone':32s} {1e3 * w:17.2f} {1 + w / base:8.3f}   (1 + its time / the plain step)")


if __name__ == "__main__":
    main()
