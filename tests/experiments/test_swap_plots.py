"""The swap plot from a hand-made result: every model gets a column, batch norm's train-mode drift is drawn,
the KL row is filled."""

import math

from normmatters.experiments.swap_plots import plot_swap
from normmatters.experiments.swap_study import STAGES, STOCK, SwapResult


def _row(model, norm, stage, loss, drift, drift_train=None):
    return {"model": model, "norm": norm, "stage": stage, "val_loss": loss, "drift": drift,
            "drift_train": drift if drift_train is None else drift_train, "kl": drift / 10, "bpc": math.nan}


def test_plot_swap(tmp_path):
    rows = [_row(m, STOCK, "original", 1.0, 0.0) for m in ("transformer", "resnet")]
    rows += [_row("transformer", "l1", s, 1.0 + i / 10, 0.1 / (i + 1)) for i, s in enumerate(STAGES)]
    rows += [_row("resnet", "l1", s, 0.1, 0.0 if s == "none" else 0.1, 0.05) for s in STAGES]
    curves = [{"model": "transformer", "norm": n, "step": s, "val_loss": 1.0 - s / 100} for n in (STOCK, "l1")
              for s in (0, 5, 10)]
    path = plot_swap(SwapResult(rows, curves, {}, []), tmp_path / "swap.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))
