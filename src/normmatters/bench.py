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

Plus a ResNet-20 (CIFAR, batch 128) SGD training step with each norm against nn.BatchNorm2d
(:mod:`.bench_resnet`). How it measures (interleaved rounds, bandwidth, saved bytes, peak memory):
:mod:`.bench_measure`; those names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# the measurement helpers also under their former names here (_sync, _median, _interleaved, _ratio), for modules
# written against them; ResNet-20 (_resnet20_variant included) likewise
from .bench_measure import copy_bandwidth, peak_bytes, saved_bytes, unique_saved_bytes
from .bench_measure import interleaved as _interleaved
from .bench_measure import median as _median
from .bench_measure import ratio as _ratio
from .bench_measure import sync_device as _sync  # noqa: F401
from .bench_resnet import WEIGHT_NORM_VARIANTS, _resnet20_variant, bench_resnet20, resnet20  # noqa: F401
from .estimators import available_norms, get_estimator
from .kernels import compiled, native_build
from .nn.batchnorm import LpBatchNorm1d, LpBatchNorm2d

log = logging.getLogger(__name__)

__all__ = ["FULL_SHAPES", "NORMS", "QUICK_SHAPES", "WEIGHT_NORM_VARIANTS", "Row", "bench_case", "bench_resnet20",
           "copy_bandwidth", "format_table", "peak_bytes", "resnet20", "run_benchmark", "saved_bytes",
           "unique_saved_bytes"]

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
