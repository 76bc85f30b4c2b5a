"""The stability map: error of emulated low-precision normalization over input scale, n and distribution.

For each input distribution (``gaussian`` N(0,1), ``relu`` max(N(0,1), 0), ``student_t3`` Student-t with
3 degrees of freedom), reduction size n and scale 2^s, one row x = 2^s · z (z seeded; the power-of-two
scale is exact) is normalized (weight 1, bias 0) by every norm in every format with
:func:`normmatters.precision.emulate.emulate_norms`, and compared with the same normalization in float64
on the unrounded x:

    err_out  = ‖y − y₆₄‖₂ / ‖y₆₄‖₂                       relative RMS error of the output
    err_stat = max(|r/r₆₄ − 1|, |μ − μ₆₄| · r₆₄)          error of the per-channel affine map alone,
                                                          r = 1/√(σ̂² + eps) (the statistics, not the
                                                          element-wise rounding)

NaN or inf anywhere counts as error ∞. ``eps`` defaults to 0 so the map shows the arithmetic, not the eps
floor (with eps = 1e-5 every input below scale ~2^-8 is "normalized" to ≈ 0 by design).

The *usable dynamic range* of (format, norm, n) is the widest run of consecutive scales whose error, worst
over the distributions, stays below 1 % (``threshold``). fp8 outputs carry 2–3 mantissa bits, so their
output error alone is ≈ 2–5 %: for fp8 the statistics criterion is the informative one.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..atomic_write import atomic_open, atomic_savefig
from ..estimators import get_estimator
from ..progress import progress_bar
from .emulate import Precision, emulate_norms, get_precision

__all__ = ["SweepRecord", "DISTRIBUTIONS", "sample", "reference", "run_sweep", "usable_range",
           "range_table", "write_csv", "plot_heatmaps"]

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("gaussian", "relu", "student_t3")


@dataclass
class SweepRecord:
    format: str
    norm: str
    dist: str
    log2_n: int
    log2_scale: int
    err_out: float
    err_stat: float
    out_inf: int
    out_zero: int
    out_nan: int


def sample(dist: str, n: int, rows: int, generator: torch.Generator) -> Tensor:
    """(rows, n) float64 draws of a named distribution."""
    z = torch.randn(rows, n, generator=generator, dtype=torch.float64)
    if dist == "gaussian":
        return z
    if dist == "relu":
        return z.clamp_min(0)
    if dist == "student_t3":
        chi2 = torch.randn(3, rows, n, generator=generator, dtype=torch.float64).square().sum(0)
        return z / torch.sqrt(chi2 / 3)
    raise ValueError(f"unknown distribution {dist!r}: expected one of {', '.join(DISTRIBUTIONS)}")


def reference(x: Tensor, norm: str, eps: float, k: int = 10) -> tuple[Tensor, Tensor, Tensor | None]:
    """float64 (y, μ, r = 1/√(σ̂² + eps)) per row of x (rows, n), σ̂ from the estimator registry."""
    x = x.to(torch.float64)
    n = x.shape[-1]
    mean = x.mean(-1)
    est = get_estimator(norm)
    if not est.divides:
        return x - mean[:, None], mean, None
    sigma = est.statistic(x, mean if est.needs_mean else None, (1,), n, k=k)
    r = 1 / torch.sqrt(sigma.square() + eps)
    return (x - mean[:, None]) * r[:, None], mean, r


def _rel(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ‖a − b‖₂ / ‖b‖₂, ∞ where a is not finite."""
    err = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)
    return torch.where(torch.isfinite(a).all(-1), err, torch.full_like(err, math.inf))


def run_sweep(formats: Sequence[str] = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"),
              norms: Sequence[str] = ("l2", "l1", "linf", "range"),
              dists: Sequence[str] = DISTRIBUTIONS,
              log2_scales: Sequence[int] = tuple(range(-24, 25, 4)),
              log2_ns: Sequence[int] = tuple(range(6, 21, 2)),
              eps: float = 0.0, order: str = "pairwise", seed: int = 0) -> list[SweepRecord]:
    """Run the grid; one :class:`SweepRecord` per (format, norm, dist, n, scale).

    Formats are layer presets (``fp16``: everything fp16; ``fp8_*``: fp8 values, fp16 sums/statistics;
    see ``PRESETS``) with the summation ``order`` replaced. All scales of one (dist, n) are emulated
    together as rows.
    """
    out: list[SweepRecord] = []
    scales = torch.tensor([2.0 ** s for s in log2_scales], dtype=torch.float64)
    with progress_bar(len(dists) * len(log2_ns), "precision sweep", unit="grid row") as bar:
        for dist, ln in ((d, n) for d in dists for n in log2_ns):
            bar.set_postfix(dist=dist, n=f"2^{ln}")
            g = torch.Generator().manual_seed(seed * 1000 + ln)
            z = sample(dist, 2 ** ln, 1, g)
            x = z * scales[:, None]  # rows = scales, exact
            refs = {norm: reference(x, norm, eps) for norm in norms}
            for fname in formats:
                base = get_precision(fname)
                p = Precision(base.compute, base.accumulate, base.stats, order=order, name=base.name)
                log.debug("sweep %s n=2^%d %s", dist, ln, fname)
                results = _per_row_events(x, norms, p, eps, refs)
                for norm in norms:
                    res, counts = results[norm]
                    y64, mu64, r64 = refs[norm]
                    e_out = _rel(res.y, y64)
                    if r64 is None:
                        e_stat = ((res.mean - mu64).abs() / y64.std(-1).clamp_min(1e-300))
                    else:
                        e_stat = torch.maximum((res.inv / r64 - 1).abs(), (res.mean - mu64).abs() * r64)
                    e_stat = torch.where(torch.isfinite(e_stat), e_stat, torch.full_like(e_stat, math.inf))
                    for i, s in enumerate(log2_scales):
                        out.append(SweepRecord(fname, norm, dist, ln, s, float(e_out[i]), float(e_stat[i]),
                                               *counts[i]))
            bar.update(1)
    return out


def _per_row_events(x: Tensor, norms: Sequence[str], p: Precision, eps: float, refs: dict):
    """Emulate all rows (scales) at once; per row, count the output values that are ±inf, NaN, or zero
    where the float64 output is not (the step-by-step event log is per call, not per row)."""
    res = emulate_norms(x, list(norms), p, eps=eps, count_events=False)
    out = {}
    for norm, r in res.items():
        y64 = refs[norm][0]
        counts = list(zip(torch.isinf(r.y).sum(-1).tolist(),
                          ((r.y == 0) & (y64 != 0)).sum(-1).tolist(),
                          torch.isnan(r.y).sum(-1).tolist(), strict=True))
        out[norm] = (r, counts)
    return out


def usable_range(records: Sequence[SweepRecord], fmt: str, norm: str, log2_n: int, threshold: float = 0.01,
                 metric: str = "err_out") -> tuple[int, int] | None:
    """The widest run of consecutive scales (log2) with the worst-over-distributions error < threshold."""
    worst: dict[int, float] = {}
    for r in records:
        if r.format == fmt and r.norm == norm and r.log2_n == log2_n:
            worst[r.log2_scale] = max(worst.get(r.log2_scale, 0.0), getattr(r, metric))
    best: tuple[int, int] | None = None
    start = None
    scales = sorted(worst)
    for s in scales:
        if worst[s] < threshold:
            start = s if start is None else start
            if best is None or s - start > best[1] - best[0]:
                best = (start, s)
        else:
            start = None
    return best


def range_table(records: Sequence[SweepRecord], metric: str = "err_out", threshold: float = 0.01) -> str:
    """Markdown table: rows (format, norm), columns n; cells the usable log2-scale range 'lo..hi'."""
    fmts = list(dict.fromkeys(r.format for r in records))
    norms = list(dict.fromkeys(r.norm for r in records))
    ns = sorted({r.log2_n for r in records})
    head = "| format | norm | " + " | ".join(f"n=2^{n}" for n in ns) + " |"
    lines = [head, "|---|---|" + "---|" * len(ns)]
    for f in fmts:
        for nm in norms:
            cells = []
            for n in ns:
                u = usable_range(records, f, nm, n, threshold, metric)
                cells.append("—" if u is None else f"2^{u[0]}..2^{u[1]}")
            lines.append(f"| {f} | {nm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(records: Sequence[SweepRecord], path: str | Path) -> Path:
    path = Path(path)
    with atomic_open(path) as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(records[0])))
        w.writeheader()
        for r in records:
            w.writerow(asdict(r))
    return path


def plot_heatmaps(records: Sequence[SweepRecord], outdir: str | Path, metric: str = "err_out",
                  threshold: float = 0.01) -> list[Path]:
    """One PNG per format: a panel per norm, log2 scale × log2 n, colour log10 of the worst error over
    the distributions, the threshold contour drawn. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fmts = list(dict.fromkeys(r.format for r in records))
    norms = list(dict.fromkeys(r.norm for r in records))
    scales = sorted({r.log2_scale for r in records})
    ns = sorted({r.log2_n for r in records})
    paths = []
    for f in fmts:
        # constrained layout keeps the figure title, the panel titles and the colour bar apart
        fig, axes = plt.subplots(1, len(norms), figsize=(3.2 * len(norms) + 1.5, 3.8), squeeze=False,
                                 sharey=True, layout="constrained")
        for ax, nm in zip(axes[0], norms, strict=True):
            grid = np.full((len(ns), len(scales)), -8.0)
            for r in records:
                if r.format == f and r.norm == nm:
                    i, j = ns.index(r.log2_n), scales.index(r.log2_scale)
                    v = getattr(r, metric)
                    v = 1e3 if not math.isfinite(v) else max(v, 1e-8)
                    grid[i, j] = max(grid[i, j], math.log10(v))
            im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=-8, vmax=1,
                           extent=(scales[0] - 1, scales[-1] + 1, ns[0] - 1, ns[-1] + 1))
            if len(scales) > 1 and len(ns) > 1:
                ax.contour(scales, ns, grid, levels=[math.log10(threshold)], colors="red", linewidths=1.2)
            ax.set_title(nm)
            ax.set_xlabel("log2 input scale")
        axes[0][0].set_ylabel("log2 n")
        fig.colorbar(im, ax=axes[0].tolist(), label=f"log10 {metric} (worst of distributions)")
        fig.suptitle(f"{f}: relative error vs float64 (red: {threshold:.0%})")
        p = outdir / f"precision_{f}.png"
        atomic_savefig(fig, p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
