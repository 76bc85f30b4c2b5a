"""Validation curves of the layer-norm study: ``curves.csv`` and the PNG plots next to ``results.csv``.

Input: the study's rows (:func:`normmatters.experiments.layer_norm_study.run_layer_norm_study`), each with
``variant``, ``seed``, ``precision``, ``scale`` and ``curve`` = [(step, val bits/char), ...].

Plots (matplotlib, Agg): per variant the mean curve over seeds with a min–max band over seeds (no band with one
seed). ``curves-native.png``: every variant run without emulation, one panel per kind (layer norm, RMS norm).
``curves-<base>.png`` (e.g. ``curves-LpLayerNorm-l1.png``), for each Lp layer that also ran emulated: its native
curve (when run) and one curve per precision and scale.
"""

from __future__ import annotations

import csv
import logging
import re
import statistics
from pathlib import Path
from typing import Any

from ..atomic_write import atomic_open, atomic_savefig

log = logging.getLogger(__name__)

__all__ = ["write_curves_csv", "read_curves_csv", "curve_bands", "plot_curves"]


def write_curves_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """One line per (variant, seed, step): variant, seed, step, val_bpc."""
    with atomic_open(path) as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seed", "step", "val_bpc"])
        for r in rows:
            for step, bpc in r.get("curve", ()):
                w.writerow([r["variant"], r["seed"], step, f"{bpc:.6f}"])
    return path


def read_curves_csv(path: Path) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """(variant, seed) → [(step, bpc)] from a ``curves.csv``."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            out.setdefault((r["variant"], int(r["seed"])), []).append((int(r["step"]), float(r["val_bpc"])))
    return out


def curve_bands(rows: list[dict[str, Any]], variant: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the seeds of ``variant`` at the steps every seed recorded."""
    curves = [dict(r["curve"]) for r in rows if r["variant"] == variant and r.get("curve")]
    if not curves:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    vals = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _base(row: dict[str, Any]) -> str:
    """The variant name without its precision and scale (``LpLayerNorm l1 fp16 x256`` → ``LpLayerNorm l1``)."""
    if row["precision"] == "native":
        return row["variant"]
    return row["variant"].split(f" {row['precision']}")[0]


def _panel(ax, rows: list[dict[str, Any]], variants: list[str], title: str) -> None:
    for v in variants:
        steps, mean, lo, hi = curve_bands(rows, v)
        if not steps:
            continue
        seeds = len({r["seed"] for r in rows if r["variant"] == v})
        (line,) = ax.plot(steps, mean, label=f"{v} ({seeds} seed{'s' if seeds > 1 else ''})", lw=1.4)
        if seeds > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits/char")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write the PNGs (module docstring) into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    order = list(dict.fromkeys(r["variant"] for r in rows))
    native = [v for v in order if any(r["variant"] == v and r["precision"] == "native" for r in rows)]
    kinds = list(dict.fromkeys(r["kind"] for r in rows if r["variant"] in native))
    if native:
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            _panel(ax, rows, [v for v in native if any(r["variant"] == v and r["kind"] == kind for r in rows)],
                   f"native {'layer norm' if kind == 'layer' else 'RMS norm'}: mean, min–max band over seeds")
        fig.tight_layout()
        written.append(out / "curves-native.png")
        atomic_savefig(fig, written[-1], dpi=110)
        plt.close(fig)
    emulated_bases = list(dict.fromkeys(_base(r) for r in rows if r["precision"] != "native"))
    for base in emulated_bases:
        variants = [v for v in order if any(r["variant"] == v and _base(r) == base for r in rows)]
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        _panel(ax, rows, variants, f"{base}: forward emulated per precision (xS: input scaled by S)")
        fig.tight_layout()
        written.append(out / f"curves-{re.sub(r'[^A-Za-z0-9]+', '-', base).strip('-')}.png")
        atomic_savefig(fig, written[-1], dpi=110)
        plt.close(fig)
    log.info("layer-norm study: wrote %d plots to %s", len(written), out)
    return written
