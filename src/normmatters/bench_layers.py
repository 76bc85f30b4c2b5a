"""``normmatters bench --layers``: the per-sample Lp layers (:class:`~normmatters.nn.LpLayerNorm`,
:class:`~normmatters.nn.LpRMSNorm`, :class:`~normmatters.nn.LpGroupNorm`) against ``nn.LayerNorm``,
``nn.RMSNorm`` and ``nn.GroupNorm``, eager and under ``torch.compile``, as ratios measured side by side.

For every case (layer kind, shape, dtype) the stock layer and one Lp layer per norm run on the same tensors in
interleaved rounds (every layer once per round, in the same order), forward alone (no grad) and forward +
backward; a ratio is the median over rounds of (Lp layer's time / stock layer's time in that round), so a load
change on the machine hits both sides of a ratio alike. "compiled": both modules wrapped in
``torch.compile(fullgraph=True)`` (the Lp layers then run the native operators inside the graph) and compared
with each other. ``saved``: the bytes autograd keeps for backward (:func:`normmatters.bench.saved_bytes`) over the
stock layer's. Cases (:data:`CASES`): transformer rows 8192×768 and 4096×4096 (float32, bfloat16) for layer and
RMS norm, and group norm on 16×256×32×32 with 32 groups; ``quick`` shrinks them to seconds.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .bench import saved_bytes
from .estimators import get_estimator
from .kernels import row_norm
from .nn.layernorm import LpGroupNorm, LpLayerNorm, LpRMSNorm

log = logging.getLogger(__name__)

__all__ = ["CASES", "QUICK_CASES", "NORMS", "run_layer_benchmark", "format_table"]

#: the norms of the per-sample layers (those with a dispersion statistic), in registry order
NORMS = ("l2", "l1", "linf", "topk", "range")
#: (kind, input shape, dtype): kind "layer" / "rms" normalize the last dim, "group" uses 32 groups
CASES = tuple((kind, shape, dtype) for kind in ("layer", "rms") for shape in ((8192, 768), (4096, 4096))
              for dtype in (torch.float32, torch.bfloat16)) + tuple(
    ("group", (16, 256, 32, 32), dtype) for dtype in (torch.float32, torch.bfloat16))
QUICK_CASES = (("layer", (256, 192), torch.float32), ("rms", (256, 192), torch.float32),
               ("group", (4, 64, 8, 8), torch.float32))
_GROUPS = 32
_QUICK_GROUPS = 8


def _layers(kind: str, shape: tuple[int, ...], dtype: torch.dtype, norms: tuple[str, ...],
            groups: int) -> dict[str, nn.Module]:
    kw = {"dtype": dtype}
    if kind == "layer":
        out: dict[str, nn.Module] = {"stock": nn.LayerNorm(shape[-1], **kw)}
        out.update({norm: LpLayerNorm(shape[-1], norm=norm, **kw) for norm in norms})
    elif kind == "rms":
        out = {"stock": nn.RMSNorm(shape[-1], **kw)}
        out.update({norm: LpRMSNorm(shape[-1], norm=norm, **kw) for norm in norms})
    else:
        out = {"stock": nn.GroupNorm(groups, shape[1], **kw)}
        out.update({norm: LpGroupNorm(groups, shape[1], norm=norm, **kw) for norm in norms})
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every entry, all entries once per round in the same order (after one warm-up)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(_timed(fn))
    return times


def _ratios(times: dict[str, list[float]]) -> dict[str, float]:
    base = times["stock"]
    return {name: statistics.median(a / b for a, b in zip(t, base)) for name, t in times.items() if name != "stock"}


def _case(kind: str, shape: tuple[int, ...], dtype: torch.dtype, norms: tuple[str, ...], rounds: int,
          compiled: bool, groups: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    layers = _layers(kind, shape, dtype, norms, groups)

    def fwd(m: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                m(x0)
        return run

    def step(m: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            x = x0.detach().requires_grad_()
            m(x).backward(g)
        return run

    res: dict[str, Any] = {"kind": kind, "shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
    for mode in ("eager", "compiled") if compiled else ("eager",):
        if mode == "compiled":
            torch._dynamo.reset()  # the previous cases' graphs: other shapes and dtypes
        mods = layers if mode == "eager" else {k: torch.compile(m, fullgraph=True) for k, m in layers.items()}
        # every Lp layer of a case shares one forward code object, guarded on its norm, with and without grad:
        # 2 graphs per norm, past Dynamo's default recompile limit (8) in one process
        with torch._dynamo.config.patch(recompile_limit=4 * len(layers)):
            f = _interleaved({k: fwd(m) for k, m in mods.items()}, rounds)
            s = _interleaved({k: step(m) for k, m in mods.items()}, rounds)
        res[mode] = {"stock_ms": (1e3 * statistics.median(f["stock"]), 1e3 * statistics.median(s["stock"])),
                     "fwd": _ratios(f), "fwd_bwd": _ratios(s)}
    base = saved_bytes(lambda: layers["stock"](x0.detach().requires_grad_()))
    res["saved"] = {k: saved_bytes(lambda m=m: m(x0.detach().requires_grad_())) / base
                    for k, m in layers.items() if k != "stock"}
    return res


def run_layer_benchmark(quick: bool = False, norms: tuple[str, ...] = NORMS, rounds: int | None = None,
                        compiled: bool = True) -> dict[str, Any]:
    """Measure every case; returns {"cases": [...], "table": markdown, "threads", "torch", "seconds"}."""
    for norm in norms:
        if not get_estimator(norm).divides:
            raise ValueError(f"bench --layers: norm={norm!r} has no dispersion statistic; use {', '.join(NORMS)}")
    t0 = time.perf_counter()
    rounds = rounds or (3 if quick else 9)
    cases = []
    for kind, shape, dtype in QUICK_CASES if quick else CASES:
        log.debug("bench --layers: %s %s %s", kind, shape, dtype)
        cases.append(_case(kind, shape, dtype, tuple(norms), rounds, compiled, _QUICK_GROUPS if quick else _GROUPS))
    native = row_norm.native_eligible(torch.empty(1, 2), "l2", 1)
    return {"cases": cases, "table": format_table(cases), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "native": native, "rounds": rounds,
            "seconds": time.perf_counter() - t0}


_STOCK = {"layer": "nn.LayerNorm", "rms": "nn.RMSNorm", "group": "nn.GroupNorm"}


def format_table(cases: list[dict[str, Any]]) -> str:
    """One markdown row per (case, norm): fwd and fwd+bwd time over the stock layer's, eager and compiled, and
    the saved bytes over the stock layer's; the stock layer's own times (ms) in the case column."""
    compiled = any("compiled" in c for c in cases)
    head = "| layer vs stock (stock eager fwd / fwd+bwd ms) | dtype | norm | fwd | fwd+bwd |"
    head += " compiled fwd | compiled fwd+bwd |" if compiled else ""
    head += " saved |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        f_ms, s_ms = c["eager"]["stock_ms"]
        name = f"{_STOCK[c['kind']]} {'×'.join(map(str, c['shape']))} ({f_ms:.1f} / {s_ms:.1f})"
        for norm, r in c["eager"]["fwd"].items():
            row = f"| {name} | {c['dtype']} | {norm} | {r:.2f} | {c['eager']['fwd_bwd'][norm]:.2f} |"
            if compiled:
                cc = c.get("compiled")
                row += f" {cc['fwd'][norm]:.2f} | {cc['fwd_bwd'][norm]:.2f} |" if cc else " — | — |"
            lines.append(row + f" {c['saved'][norm]:.2f} |")
    return "\n".join(lines)
