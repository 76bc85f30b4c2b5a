"""The weight-decay study's outputs: ``results.csv``, ``angular_update.csv``, the summary table, plots and
``report.md`` (the study itself: :mod:`normmatters.experiments.weight_decay`)."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from ..atomic_write import atomic_open, atomic_savefig, atomic_write
from .weight_decay import MODES, TWIN_LR_FACTOR, WeightDecayStudy

__all__ = ["RESULT_COLUMNS", "result_columns", "summarize_weight_decay", "format_weight_decay_table",
           "write_weight_decay_report"]

#: the leading columns of results.csv, in order (public: readers depend on them); per rate phase i (from 1)
#: ``angular_update_ratio_phase<i>_median`` and ``…_iqr`` follow (:func:`result_columns`)
RESULT_COLUMNS = ("mode", "seed", "test_acc", "angle_final", "angle_floor", "elr_ratio_median", "elr_ratio_iqr")


def result_columns(phases: int) -> tuple[str, ...]:
    """Every column of results.csv for a study of ``phases`` rate phases."""
    return RESULT_COLUMNS + tuple(f"angular_update_ratio_phase{i}_{q}" for i in range(1, phases + 1)
                                  for q in ("median", "iqr"))


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def _early_ratio(r: dict[str, Any], results: list[dict[str, Any]]) -> float:
    """The run's angle to ``wd`` after the first epoch over the twin's (the floor then), before chaos has
    grown the floor to its final size."""
    twin = next((t for t in results if t["mode"] == "wd-twin" and t["seed"] == r["seed"]), None)
    if twin is None or not r["angle_deg"] or not twin["angle_deg"][0] > 0:
        return float("nan")
    return r["angle_deg"][0] / twin["angle_deg"][0]


def summarize_weight_decay(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode: means over seeds (accuracy with its sample std; the angular update per phase)."""
    rows = []
    for mode in MODES:
        rs = [r for r in results if r["mode"] == mode]
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        au = [r["angular_update"] for r in rs]
        rows.append({
            "mode": mode, "seeds": len(rs), "acc_mean": statistics.fmean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "angle_final": _mean([r["angle_final"] for r in rs]),
            "angle_floor": _mean([r["angle_floor"] for r in rs]),
            "early_ratio": _mean([_early_ratio(r, results) for r in rs]),
            "elr_median": _mean([r["elr_ratio_median"] for r in rs]),
            "elr_iqr": _mean([r["elr_ratio_iqr"] for r in rs]),
            "phases": [{"measured_deg": _mean([a[i]["measured_deg"] for a in au]),
                        "equilibrium_deg": au[0][i]["equilibrium_deg"], "lr": au[0][i]["lr"],
                        "ratio_median": _mean([a[i].get("ratio_median", math.nan) for a in au]),
                        "ratio_iqr": _mean([a[i].get("ratio_iqr", math.nan) for a in au])}
                       for i in range(len(au[0]))],
        })
    return rows


def _deg(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}°"


def format_weight_decay_table(results: list[dict[str, Any]]) -> str:
    """Markdown: accuracy, angles against the floor, effective-step ratio and angular update per step."""
    rows = summarize_weight_decay(results)
    phases = rows[0]["phases"] if rows else []
    head = ("| mode | seeds | test acc (mean ± std) | angle to wd ÷ floor, epoch 1 | angle to wd, final | ÷ floor "
            "| effective-step ratio, median (IQR) | "
            + " | ".join(f"angular update/step, phase {i + 1} (η {p['lr']:.2g})" for i, p in enumerate(phases))
            + "".join(f" | angular update ÷ wd's, phase {i + 1}, median (IQR)" for i in range(len(phases))) + " |")
    lines = [head, "|" + "---|" * (7 + 2 * len(phases))]

    def num(x: float) -> str:
        return "—" if math.isnan(x) else f"{x:.2f}"

    def num3(x: float) -> str:
        return "—" if math.isnan(x) else f"{x:.3f}"

    for r in rows:
        ratio = r["angle_final"] / r["angle_floor"] if r["angle_floor"] > 0 else float("nan")
        lines.append(f"| {r['mode']} | {r['seeds']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} % | "
                     f"{num(r['early_ratio'])} | {_deg(r['angle_final'])} | {num(ratio)} | "
                     f"{r['elr_median']:.3f} ({r['elr_iqr']:.3f}) | "
                     + " | ".join(f"{p['measured_deg']:.3f}°" for p in r["phases"])
                     + "".join(f" | {num3(p['ratio_median'])} ({num3(p['ratio_iqr'])})" for p in r["phases"]) + " |")
    if phases and not math.isnan(phases[0]["equilibrium_deg"]):
        lines.append("| equilibrium √(2ηλ/(1+μ)) | | | | | | | "
                     + " | ".join(f"{p['equilibrium_deg']:.3f}°" for p in phases) + " |" + " |" * len(phases))
    return "\n".join(lines)


def _write_csvs(results: list[dict[str, Any]], out: Path) -> None:
    import json

    keep = [{k: v for k, v in r.items() if k != "trajectory"} for r in results]
    atomic_write(out / "results.json", json.dumps(keep))  # everything measured, to rebuild the report
    phases = len(results[0]["angular_update"]) if results else 0
    with atomic_open(out / "results.csv") as fh:
        w = csv.writer(fh)
        w.writerow(result_columns(phases))
        for r in results:
            ratios = [f"{a.get(k, math.nan):.6f}" for a in r["angular_update"] for k in ("ratio_median", "ratio_iqr")]
            w.writerow([r["mode"], r["seed"], f"{r['test_acc']:.6f}", f"{r['angle_final']:.4f}",
                        f"{r['angle_floor']:.4f}", f"{r['elr_ratio_median']:.6f}", f"{r['elr_ratio_iqr']:.6f}",
                        *ratios])
    with atomic_open(out / "angular_update.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "seed", "phase", "lr", "first_step", "end_step", "measured_deg", "equilibrium_deg",
                    "ratio_median", "ratio_iqr"])
        for r in results:
            for a in r["angular_update"]:
                w.writerow([r["mode"], r["seed"], a["phase"], f"{a['lr']:.6g}", a["first_step"], a["end_step"],
                            f"{a['measured_deg']:.6f}", f"{a['equilibrium_deg']:.6f}",
                            f"{a.get('ratio_median', math.nan):.6f}", f"{a.get('ratio_iqr', math.nan):.6f}"])


def _plot(study: WeightDecayStudy, results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed0 = results[0]["seed"]
    mine = [r for r in results if r["seed"] == seed0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in mine:
        axes[0].plot(r["effective_lr"], label=r["mode"], lw=1)
        curve, k = r["angle_per_step_deg"], 20  # a running mean over k steps: single steps are noisy
        smooth = [statistics.fmean(curve[max(0, i - k + 1): i + 1]) for i in range(len(curve))]
        axes[1].plot(smooth, label=r["mode"], lw=1)
    for a in mine[0]["angular_update"]:
        if not math.isnan(a["equilibrium_deg"]):
            axes[1].hlines(a["equilibrium_deg"], a["first_step"], a["end_step"], colors="k", linestyles="--", lw=1)
    p = "η/‖w‖" if study.optimizer != "sgd" else "η/‖w‖²"
    axes[0].set(yscale="log", xlabel="step", ylabel=f"mean {p} (× the mimic's factor)",
                title=f"effective step (seed {seed0})")
    axes[1].set(yscale="log", xlabel="step", ylabel="degrees",
                title="angular update per step (20-step mean); dashed: √(2ηλ/(1+μ))")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, out / "effective_lr.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES[1:]:
        rs = [r for r in results if r["mode"] == mode]
        if rs:
            curve = [statistics.fmean(v) for v in zip(*(r["angle_deg"] for r in rs))]
            ax.plot(range(1, len(curve) + 1), curve, label=mode, ls="--" if mode == "wd-twin" else "-")
    ax.set(xlabel="epoch", ylabel="degrees", title="angle to the weight-decay run (wd-twin: the chaos floor)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out / "angles.png", dpi=110)
    plt.close(fig)


def write_weight_decay_report(study: WeightDecayStudy, results: list[dict[str, Any]], out: Path,
                              command: str | None = None) -> Path:
    """report.md, results.csv, angular_update.csv, results.json (every measurement), effective_lr.png and
    angles.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csvs(results, out)
    _plot(study, results, out)
    steps = study.epochs * results[0]["steps_per_epoch"] if results and "steps_per_epoch" in results[0] else None
    opt = (f"SGD lr {study.lr} momentum {study.momentum}" if study.optimizer == "sgd"
           else f"AdamW lr {study.lr} (decoupled decay)")
    text = [
        "# Weight decay ⇄ learning rate: the study",
        "",
        f"{study.model} with {study.norm} on {study.dataset}, {study.epochs} epochs"
        + (f" ({steps} steps)" if steps else "") + f", {opt}, multi-step schedule at epochs "
        f"{list(study.milestones)} (×{study.gamma}); weight decay λ = {study.weight_decay} on the scale-invariant "
        f"weights only in modes `wd` and `wd-twin`; seeds {list(study.seeds)}.",
        *([f"Command: `{command}`"] if command else []),
        "",
        format_weight_decay_table(results),
        "",
        "* angle to wd: mean over channels and scale-invariant layers, then over seeds, to the same seed's `wd` "
        f"run at the end; floor: `wd` against `wd-twin` (the rate × {TWIN_LR_FACTOR}, same seed and batches) — "
        "an angle near the floor (÷ floor ≈ 1) is as close as chaos lets two runs be. Epoch 1: the same ratio "
        "after the first epoch, before chaos has grown the floor (the twin's angle then).",
        "* effective-step ratio: per channel and step, η·f_c/‖w_c‖² (f_c the mimic's factor) over the `wd` run's "
        "at the same step; median and interquartile range over channels and steps, mean over seeds.",
        "* angular update per step: mean over channels and over the second half of each rate phase "
        "(`angular_update.csv`), against the decay run's spherical-motion equilibrium.",
        "* angular update ÷ wd's: per channel, the run's own mean angular update per step over the `wd` run's, over "
        "the second half of each phase; median (IQR) over channels, mean over seeds. Unlike the effective-step "
        "ratio (1 by construction for `mimic-ref`, whose factor comes from the recorded norms) it measures what "
        "the run did: `mimic-ref` applies the decay run's norms open-loop, so a run that settles where its "
        "gradient is small turns slower by that factor (its norms cannot answer its gradient as the decay run's "
        "do); see `normmatters.experiments.weight_decay`.",
        "* `norm-schedule` keeps the rate of the other parameters constant, while the rate schedule lowers it for "
        "every parameter.",
        "",
        "![effective step and angular update](effective_lr.png)",
        "![angles](angles.png)",
        "",
    ]
    atomic_write(out / "report.md", "\n".join(text))
    return out / "report.md"
