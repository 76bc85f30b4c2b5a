"""Summaries, tables, files and plots of a norm comparison (:mod:`normmatters.experiments.compare`).

Per norm: test accuracy mean ± sample std over seeds, final training loss (mean), median step time and
saved-activation bytes as ratios to the baseline (``bn`` if present, else the first norm).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic_write import atomic_savefig, atomic_write
from .compare import BASELINE, RunResult
from .metrics import read_jsonl

__all__ = ["NormSummary", "summarize", "format_table", "write_report", "plot_curves"]


@dataclass
class NormSummary:
    norm: str
    seeds: int
    acc_mean: float
    acc_std: float
    loss_mean: float
    step_ms: float
    time_ratio: float
    saved_bytes: int
    memory_ratio: float


def summarize(results: list[RunResult]) -> list[NormSummary]:
    norms = list(dict.fromkeys(r.norm for r in results))
    if not norms:
        raise ValueError("summarize: no runs")
    base = BASELINE if BASELINE in norms else norms[0]
    by = {n: [r for r in results if r.norm == n] for n in norms}
    base_t = statistics.median(r.median_step_time for r in by[base])
    side_by_side = all(math.isfinite(r.step_ratio) for r in results)
    base_m = by[base][0].saved_bytes
    out = []
    for n in norms:
        rs = by[n]
        accs = [r.test_acc for r in rs]
        t = statistics.median(r.median_step_time for r in rs)
        out.append(
            NormSummary(
                n,
                len(rs),
                statistics.fmean(accs),
                statistics.stdev(accs) if len(accs) > 1 else 0.0,
                statistics.fmean(r.final_loss for r in rs),
                1e3 * t,
                statistics.median(r.step_ratio for r in rs) if side_by_side else t / base_t,
                rs[0].saved_bytes,
                rs[0].saved_bytes / base_m if base_m else float("nan"),
            )
        )
    return out


def format_table(summary: list[NormSummary]) -> str:
    """A Markdown table (readable as plain text too); with one seed per norm, no ± spread (there is none)."""
    spread = any(s.seeds > 1 for s in summary)
    head = (
        f"| norm | seeds | test acc{' (mean ± std)' if spread else ''} | final train loss | ms/step | time / bn | "
        "saved activations | memory / bn |"
    )
    rows = [head, "|" + "---|" * 8]
    for s in summary:
        acc = f"{100 * s.acc_mean:.2f} ± {100 * s.acc_std:.2f} %" if spread else f"{100 * s.acc_mean:.2f} %"
        rows.append(
            f"| {s.norm} | {s.seeds} | {acc} | "
            f"{s.loss_mean:.4f} | {s.step_ms:.2f} | {s.time_ratio:.2f}× | "
            f"{s.saved_bytes / 2**20:.2f} MiB | {s.memory_ratio:.2f}× |"
        )
    return "\n".join(rows)


def plot_curves(results: list[RunResult], out: Path) -> list[Path]:
    """``loss.png`` (train loss) and ``accuracy.png`` (test accuracy, %) per epoch: the mean over seeds per norm,
    the seeds' min..max as a band; the baseline (bn) drawn last, black and dashed, so no norm hides it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    norms = list(dict.fromkeys(r.norm for r in results))
    norms = [n for n in norms if n != BASELINE] + [n for n in norms if n == BASELINE]
    seeds = max(sum(r.norm == n for r in results) for n in norms)
    for key, fname, label, scale in (
        ("train_loss", "loss.png", "train loss", 1.0),
        ("test_acc", "accuracy.png", "test accuracy (%)", 100.0),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        for n in norms:
            runs = [r.epochs for r in results if r.norm == n]
            length = min(len(e) for e in runs)
            x = list(range(1, length + 1))
            per_epoch = [[scale * e[i][key] for e in runs] for i in range(length)]
            style = dict(color="black", linestyle="--", linewidth=2.2, zorder=5) if n == BASELINE else {}
            (line,) = ax.plot(x, [statistics.fmean(v) for v in per_epoch], marker="o", markersize=3,
                              label=f"{n} (nn.BatchNorm2d)" if n == BASELINE else n, **style)
            if len(runs) > 1:
                ax.fill_between(x, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "train_loss":
            ax.set_yscale("log")
        band = f"mean of {seeds} seeds, band: min..max" if seeds > 1 else "one seed"
        ax.set_title(f"{label} per norm ({band})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / fname
        atomic_savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_report(
    results: list[RunResult], out: Path, header: dict[str, Any], wall_s: float
) -> dict[str, Path]:
    """Write ``report.md``, ``runs.csv`` / ``runs.jsonl`` (every epoch of every run), ``summary.csv`` and the
    plots into ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    files: dict[str, Path] = {}
    rows = [
        {"norm": r.norm, "seed": r.seed, "median_step_s": r.median_step_time, "step_ratio": r.step_ratio,
         "saved_bytes": r.saved_bytes, **{k: v for k, v in e.items() if k != "kind"}}
        for r in results
        for e in r.epochs
    ]
    files["runs.jsonl"] = atomic_write(out / "runs.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    files["runs.csv"] = atomic_write(out / "runs.csv", _csv(rows, list(rows[0])))
    files["summary.csv"] = atomic_write(
        out / "summary.csv", _csv([s.__dict__ for s in summary], list(NormSummary.__dataclass_fields__))
    )
    for p in plot_curves(results, out):
        files[p.name] = p
    settings = ", ".join(f"{k}={v}" for k, v in header.items())
    md = [
        "# normmatters compare\n",
        f"Settings: {settings}.\n",
        f"Wall time: {wall_s:.1f} s.\n",
        format_table(summary),
        "",
        "Test accuracy is the final epoch's, mean ± sample std over seeds; final train loss is the last "
        "epoch's mean; ms/step is the median step time (forward + backward + optimizer step) when every "
        "norm's trained model steps in turn on the same batches, and time / bn the median over those rounds "
        "of the step time over bn's in the same round; "
        "saved activations are the bytes autograd keeps for backward in one training forward "
        "(torch.autograd.graph.saved_tensors_hooks, parameters excluded). Ratios are to nn.BatchNorm2d "
        "(bn) measured in the same process.",
        "",
        "![loss](loss.png)",
        "![accuracy](accuracy.png)",
        "",
    ]
    files["report.md"] = atomic_write(out / "report.md", "\n".join(md))
    return files


def plot_run(out_dir: Path) -> Path | None:
    """``curves.png`` of one ``normmatters train`` run: train/test loss and test accuracy per epoch, read from
    ``metrics.jsonl`` (so a resumed run plots all its epochs). None when no epoch has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if r.get("kind") == "epoch"]
    if not epochs:
        return None
    x = [r["epoch"] for r in epochs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax1.plot(x, [r["train_loss"] for r in epochs], marker="o", label="train")
    ax1.plot(x, [r["test_loss"] for r in epochs], marker="o", label="test")
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax1.legend()
    ax2.plot(x, [100 * r["test_acc"] for r in epochs], marker="o")
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(out_dir) / "curves.png"
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
