"""The benchmark behind ``normmatters bench``: Lp batch norm vs ``nn.BatchNorm`` measured side by side.

Every number is a ratio taken round by round in interleaved rounds (contender A, contender B, … then the
next round), so machine contention hits all sides alike; the reported value is the median over rounds.
Per case (shape, dtype, memory format) and norm:

* ``fwd`` / ``fwd+bwd``: time of the layer's training forward (and backward) divided by that of
  ``nn.BatchNorm`` eager (``/bn``), of ``nn.BatchNorm`` under ``torch.compile`` (``/bnc``) and of the
  naive composition (the reference path of the same norm, ``/naive``);
* ``saved``: bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``) / nn.BatchNorm's;
* ``peak``: peak memory of a forward+backward above the live inputs / nn.BatchNorm's (CUDA: the caching
  allocator's peak; CPU: allocator events recorded by the profiler, with the native kernels' buffer pool
  (:mod:`.pool`) off so that every buffer is counted);
* ``roof``: fraction of the memory roofline reached: one read and one write of the tensor in forward and
  in backward (4 × its bytes) at the memory copy bandwidth measured in the same run (:func:`copy_bandwidth`,
  256 MB buffers, before and after the cases, the larger reading), divided by fwd+bwd time.

Each dividing norm also gets a ``<norm>+inplace`` row (``inplace=True``, In-Place ABN style) with ``saved``
and ``peak`` only (no timings: every call would need a fresh copy of the input). Its saved tensor is the
output itself, which overwrote the input, so ``saved`` ≈ 1 means "nothing kept beyond the output", and
``peak`` shows the memory actually saved.

Plus a ResNet-20 (CIFAR, batch 128) SGD training step with each norm against nn.BatchNorm2d.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .estimators import available_norms, get_estimator
from .kernels import compiled, native_build, pool
from .nn.batchnorm import LpBatchNorm1d, LpBatchNorm2d
from .weight_norm_form import to_weight_norm_form

log = logging.getLogger(__name__)

NORMS = available_norms()
FULL_SHAPES = ((64, 64, 32, 32), (128, 128, 16, 16), (256, 256, 8, 8), (32, 512, 7, 7), (256, 1024))
QUICK_SHAPES = ((64, 64, 32, 32),)


@dataclasses.dataclass
class Row:
    shape: tuple[int, ...]
    dtype: str
    layout: str
    norm: str
    fwd_bn: float
    fwd_bnc: float
    fwd_naive: float
    step_bn: float
    step_bnc: float
    step_naive: float
    saved: float
    peak: float
    roof: float
    step_ms: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(v: Iterable[float]) -> float:
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
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / _median(times[3:])


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
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
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


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                 warmup: int = 2) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return _median(x / y for x, y in zip(times[a], times[b], strict=True))


def _layers(C: int, dim: int, norm: str | None, impl: str | None, device, dtype=torch.float32,
            inplace: bool = False) -> nn.Module:

    if norm is None:
        m = (nn.BatchNorm1d if dim == 2 else nn.BatchNorm2d)(C)
    else:
        m = (LpBatchNorm1d if dim == 2 else LpBatchNorm2d)(C, norm=norm, impl=impl, inplace=inplace)
    return m.to(device).train()


def bench_case(shape: tuple[int, ...], dtype: torch.dtype, layout: str, norms: Iterable[str],
               device: torch.device, rounds: int, bandwidth: float,
               inplace_norms: Iterable[str] | None = None) -> list[Row]:
    """All norms at one (shape, dtype, layout): ratios measured in the same interleaved rounds; in-place
    memory rows for ``inplace_norms`` (default: every dividing norm in ``norms``)."""
    C = shape[1]
    x0 = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x0)
    mods: dict[str, nn.Module] = {"bn": _layers(C, len(shape), None, None, device)}
    mods["bnc"] = torch.compile(_layers(C, len(shape), None, None, device))
    for norm in norms:
        mods[norm] = _layers(C, len(shape), norm, None, device)
        mods["naive:" + norm] = _layers(C, len(shape), norm, "reference", device)

    # every layer keeps float32 parameters; low-precision inputs go in directly (as under autocast)
    def run(m: nn.Module, backward: bool) -> Callable[[], None]:
        def f() -> None:
            x = x0.detach().requires_grad_()
            y = m(x)
            if backward:
                y.backward(g)
        return f

    def run_inplace(m: nn.Module, backward: bool) -> Callable[[], None]:
        # the input must be a fresh non-leaf copy per call; it is made here, outside the measured call
        x = x0.detach().requires_grad_().clone()

        def f() -> None:
            y = m(x)
            if backward:
                y.backward(g)
        return f

    fwd = _interleaved({k: run(m, False) for k, m in mods.items()}, rounds, device)
    step = _interleaved({k: run(m, True) for k, m in mods.items()}, rounds, device)
    nbytes = x0.numel() * x0.element_size()
    roof_s = 4 * nbytes / bandwidth
    base_saved = saved_bytes(run(mods["bn"], False))
    base_peak = max(1, peak_bytes(run(mods["bn"], True), device))
    rows = []
    for norm in norms:
        rows.append(Row(
            shape=tuple(shape), dtype=str(dtype).replace("torch.", ""), layout=layout, norm=norm,
            fwd_bn=_ratio(fwd, norm, "bn"), fwd_bnc=_ratio(fwd, norm, "bnc"),
            fwd_naive=_ratio(fwd, norm, "naive:" + norm),
            step_bn=_ratio(step, norm, "bn"), step_bnc=_ratio(step, norm, "bnc"),
            step_naive=_ratio(step, norm, "naive:" + norm),
            saved=saved_bytes(run(mods[norm], False)) / base_saved,
            peak=peak_bytes(run(mods[norm], True), device) / base_peak,
            roof=roof_s / _median(step[norm]), step_ms=_median(step[norm]) * 1e3))

    nan = math.nan
    for norm in (norms if inplace_norms is None else inplace_norms):
        if get_estimator(norm).divides:
            m = _layers(C, len(shape), norm, None, device, inplace=True)
            run_inplace(m, True)()  # warm-up: compile outside the measurements
            rows.append(Row(tuple(shape), str(dtype).replace("torch.", ""), layout, norm + "+inplace",
                            nan, nan, nan, nan, nan, nan,
                            saved=saved_bytes(run_inplace(m, False)) / base_saved,
                            peak=peak_bytes(run_inplace(m, True), device) / base_peak, roof=nan, step_ms=nan))
    rows.append(Row(tuple(shape), str(dtype).replace("torch.", ""), layout, "bn(eager)", 1.0,
                    _ratio(fwd, "bn", "bnc"), math.nan, 1.0, _ratio(step, "bn", "bnc"), math.nan, 1.0, 1.0,
                    roof_s / _median(step["bn"]), _median(step["bn"]) * 1e3))
    return rows


# --- ResNet-20 (He et al. 2016, CIFAR variant: 3 stages of 3 basic blocks, 16/32/64 channels) ---------

class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def resnet20(norm: Callable[[int], nn.Module], num_classes: int = 10) -> nn.Module:
    """ResNet-20 for 32×32 inputs with ``norm(num_features)`` as its normalization layer."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_Block(cin, cout, stride if i == 0 else 1, norm))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


#: ResNet-20 variants besides the Lp norms: the paper's weight-norm form (Hoffer et al. 2018, sec. 6) —
#: (bounded) weight norm on every conv/linear weight + mean-only batch norm with a learned bias
WEIGHT_NORM_VARIANTS = ("wn+mean", "bwn+mean")


def _resnet20_variant(name: str, device: torch.device) -> nn.Module:

    torch.manual_seed(0)
    if name == "bn":
        return resnet20(nn.BatchNorm2d).to(device).train()
    if name in WEIGHT_NORM_VARIANTS:
        model = resnet20(nn.BatchNorm2d)
        return to_weight_norm_form(model, bounded=name.startswith("bwn")).to(device).train()
    return resnet20(lambda c: LpBatchNorm2d(c, norm=name)).to(device).train()


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


def bench_resnet20(norms: Iterable[str], device: torch.device, rounds: int, batch: int = 128,
                   weight_norm: bool = True) -> dict[str, Any]:
    """One SGD training step of ResNet-20 with each norm (and, with ``weight_norm``, the WN / bounded-WN +
    mean-only-BN forms) against the same step with nn.BatchNorm2d: median time ratios (``step``), ratios of
    the activation memory saved for backward (``saved``) and the nn.BatchNorm2d step in ms (``bn_ms``)."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 10, (batch,), device=device)
    names = ("bn", *norms, *(WEIGHT_NORM_VARIANTS if weight_norm else ()))
    steps: dict[str, Callable[[], None]] = {}
    saved: dict[str, int] = {}
    for name in names:
        model = _resnet20_variant(name, device)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
        steps[name] = step
        step()  # warm-up (compilation) outside the saved-bytes count
        saved[name] = unique_saved_bytes(lambda model=model: nn.functional.cross_entropy(model(x), t))
    times = _interleaved(steps, rounds, device)
    return {"bn_ms": _median(times["bn"]) * 1e3,
            "step": {name: _ratio(times, name, "bn") for name in names[1:]},
            "saved": {name: saved[name] / saved["bn"] for name in names[1:]}}


def format_table(rows: list[Row]) -> str:
    head = ("| shape | dtype | layout | norm | fwd /bn | fwd /bnc | fwd /naive | fwd+bwd /bn | "
            "fwd+bwd /bnc | fwd+bwd /naive | saved /bn | peak /bn | roofline | fwd+bwd ms |")
    lines = [head, "|" + "---|" * 14]
    def f(v: float, spec: str = ".2f") -> str:
        return "–" if math.isnan(v) else format(v, spec)

    for r in rows:
        lines.append(f"| {'x'.join(map(str, r.shape))} | {r.dtype} | {r.layout} | {r.norm} | "
                     f"{f(r.fwd_bn)} | {f(r.fwd_bnc)} | {f(r.fwd_naive)} | {f(r.step_bn)} | "
                     f"{f(r.step_bnc)} | {f(r.step_naive)} | {f(r.saved)} | {f(r.peak)} | "
                     f"{f(r.roof, '.0%')} | {f(r.step_ms)} |")
    return "\n".join(lines)


def run_benchmark(quick: bool = False, device: str = "cpu", norms: Iterable[str] = NORMS,
                  shapes: Iterable[tuple[int, ...]] | None = None, rounds: int | None = None,
                  resnet: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns a dict with rows, ResNet-20 ratios, bandwidth and compile seconds."""

    dev = torch.device(device)
    norms = tuple(norms)
    if shapes is None:
        shapes = QUICK_SHAPES if quick else FULL_SHAPES
    rounds = rounds or (7 if quick else 15)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    layouts = ("contiguous",) if quick else ("contiguous", "channels_last")
    bw = copy_bandwidth(dev)
    rows: list[Row] = []
    t0 = time.perf_counter()
    # every case compiles its own nn.BatchNorm for the /bnc baseline, all on BatchNorm's one forward: Dynamo's
    # default budget of 8 graphs per code object would run the later cases' baseline eagerly
    with torch._dynamo.config.patch(recompile_limit=256):
        rows = _bench_cases(shapes, dtypes, layouts, norms, dev, rounds, bw, quick)
    # the roofline is the best bandwidth the machine sustains: measured again after the cases and the larger
    # reading taken (on this VM single readings ranged 23-54 GB/s, most 28-33), the rows rescaled to it
    samples = [bw, copy_bandwidth(dev)]
    bw = max(samples)
    for r in rows:
        r.roof *= samples[0] / bw
    # --quick: the ResNet-20 step with l1 and range (plus BN and the weight-norm forms) only
    res_norms = [n for n in norms if n in ("l1", "range")] if quick else norms
    res = bench_resnet20(res_norms, dev, rounds=3 if quick else 9) if resnet else {}
    return {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "copy_bandwidth_GBps": bw / 1e9, "copy_bandwidth_samples_GBps": [b / 1e9 for b in samples],
            "rows": [dataclasses.asdict(r) for r in rows],
            "table": format_table(rows), "resnet20_step_ratio": res,
            "compile_seconds": {"/".join(k): v for k, v in compiled.compile_seconds.items()},
            "native_first_call": native_build.first_call,
            "seconds": time.perf_counter() - t0}


def _bench_cases(shapes: Iterable[tuple[int, ...]], dtypes: tuple[torch.dtype, ...], layouts: tuple[str, ...],
                 norms: tuple[str, ...], dev: torch.device, rounds: int, bw: float, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts:
                if layout == "channels_last" and len(shape) != 4:
                    continue
                log.debug("bench %s %s %s", shape, dtype, layout)
                # --quick: in-place rows for l1 and range only (each in-place norm compiles 3 more kernels)
                rows += bench_case(shape, dtype, layout, norms, dev, rounds, bw,
                                   inplace_norms=[n for n in norms if n in ("l1", "range")] if quick else None)
    return rows
