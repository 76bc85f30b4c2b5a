"""The swap study's plot (``swap.png``): one column per model.

Rows: (1) held-out loss per stage (``none``, ``calibrated``, ``finetuned``, ``scratch``), one line per norm,
the original model (solid) and the original fine-tuned as long (dashed) as horizontal references; (2) drift
‖f − f₀‖/‖f₀‖ per stage on a log scale (floored at 1e-9; dashed: in training mode, where it differs); (3)
KL(p₀ ‖ p) of the predictions per stage, log scale (floored at 1e-12; dashed: the original fine-tuned); (4)
held-out loss during fine-tuning (step 0 = calibrated), per norm and for the original. Input: a
:class:`~normmatters.experiments.swap_study.SwapResult`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic_write import atomic_savefig

if TYPE_CHECKING:
    from .swap_study import SwapResult

__all__ = ["plot_swap"]

log = logging.getLogger(__name__)

_STAGES = ("none", "calibrated", "finetuned", "scratch")


def plot_swap(result: SwapResult, path: Path) -> Path:
    """Draw the three rows (module docstring) for every model of ``result`` into the PNG ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result.rows))
    fig, axes = plt.subplots(4, len(models), figsize=(6 * len(models), 13), squeeze=False)
    for col, model in enumerate(models):
        rows = [r for r in result.rows if r["model"] == model]
        by = {(r["norm"], r["stage"]): r for r in rows}
        stock = next((r["norm"] for r in rows if r["stage"] == "original"), None)  # the original model's rows
        norms = [n for n in dict.fromkeys(r["norm"] for r in rows if r["stage"] in _STAGES) if n != stock]
        ax_loss, ax_drift, ax_kl, ax_ft = axes[0][col], axes[1][col], axes[2][col], axes[3][col]
        for n in norms:
            stages = [s for s in _STAGES if (n, s) in by]
            xs = [_STAGES.index(s) for s in stages]
            ax_loss.plot(xs, [by[n, s]["val_loss"] for s in stages], marker="o", label=n)
            (line,) = ax_drift.plot(xs, [max(by[n, s]["drift"], 1e-9) for s in stages], marker="o", label=n)
            if any(by[n, s]["drift_train"] != by[n, s]["drift"] for s in stages):  # batch norm: batch statistics
                ax_drift.plot(xs, [max(by[n, s]["drift_train"], 1e-9) for s in stages], marker="x", ls="--",
                              color=line.get_color(), label=f"{n}, train mode")
            if all("kl" in by[n, s] for s in stages):
                ax_kl.plot(xs, [max(by[n, s]["kl"], 1e-12) for s in stages], marker="o", label=n)
        if (stock, "finetuned") in by and "kl" in by[stock, "finetuned"]:
            ax_kl.axhline(max(by[stock, "finetuned"]["kl"], 1e-12), color="k", lw=1, ls="--",
                          label="original fine-tuned")
        if (stock, "original") in by:
            ax_loss.axhline(by[stock, "original"]["val_loss"], color="k", lw=1, label="original")
        if (stock, "finetuned") in by:
            ax_loss.axhline(by[stock, "finetuned"]["val_loss"], color="k", lw=1, ls="--",
                            label="original fine-tuned")
        for ax, ylabel in ((ax_loss, "held-out loss (nats)"), (ax_drift, "drift ‖f − f₀‖/‖f₀‖"),
                           (ax_kl, "KL(p₀ ‖ p), nats")):
            ax.set_xticks(range(len(_STAGES)), _STAGES)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        ax_loss.set_title(f"{model}: swapped into the trained model", fontsize=10)
        ax_drift.set_yscale("log")
        ax_kl.set_yscale("log")
        for n in [stock, *norms]:
            pts = sorted((c["step"], c["val_loss"]) for c in result.curves if c["model"] == model and c["norm"] == n)
            if pts:
                ax_ft.plot(*zip(*pts, strict=True), marker=".", label="original" if n == stock else n,
                           color="k" if n == stock else None)
        ax_ft.set_xlabel("fine-tuning step (0: after calibration)")
        ax_ft.set_ylabel("held-out loss (nats)")
        ax_ft.grid(alpha=0.3)
        if ax_ft.lines:
            ax_ft.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    log.info("swap study: wrote %s", path)
    return path
