"""The swap study's files (:mod:`.swap_study`): results.csv, finetune.csv, calibration.csv, swap.png
(:mod:`.swap_plots`) and report.md, each written atomically, the Markdown table the command prints, and
:func:`read_swap_result`, which rebuilds a run's result from its CSVs (to redraw the plot)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..atomic_write import atomic_write
from .run_folder import check_output_folder
from .swap_study import RESULT_COLUMNS, STAGES, STOCK, SwapResult, SwapStudy

__all__ = ["write_swap_report", "format_swap_table", "read_swap_result"]



def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _csv_text(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = list(columns)
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c, "")) for c in columns])
    return buf.getvalue()


def format_swap_table(result: SwapResult) -> str:
    """A markdown table of every row (one per model, norm and stage)."""
    lines = ["| model | norm | stage | steps with norm / total | val loss | bits/char | accuracy | drift "
             "| drift (train mode) | KL to original | agreement |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        bpc = "" if math.isnan(r["bpc"]) else f"{r['bpc']:.3f}"
        lines.append(f"| {r['model']} | {r['norm']} | {r['stage']} | {r['steps_with_norm']} / {r['steps_total']} | "
                     f"{r['val_loss']:.4f} | {bpc} | {r['accuracy']:.4f} | {r['drift']:.3g} | "
                     f"{r['drift_train']:.3g} | {r['kl']:.3g} | {r['agreement']:.4f} |")
    return "\n".join(lines)


def _findings(result: SwapResult) -> list[str]:
    """Sentences read off the numbers (no judgement beyond thresholds stated in the sentence)."""
    out = []
    by = {(r["model"], r["norm"], r["stage"]): r for r in result.rows}
    for model in dict.fromkeys(r["model"] for r in result.rows):
        orig = by[model, STOCK, "original"]
        ft = by.get((model, STOCK, "finetuned"))
        norms = [n for n in dict.fromkeys(r["norm"] for r in result.rows if r["model"] == model) if n != STOCK]
        for n in norms:
            parts = [f"{s} {by[model, n, s]['val_loss']:.3f} (drift {by[model, n, s]['drift']:.2g}, KL "
                     f"{by[model, n, s]['kl']:.2g})"
                     for s in STAGES if (model, n, s) in by]
            out.append(f"- {model}, {n}: val loss " + ", ".join(parts) + f"; original {orig['val_loss']:.3f}"
                       + (f", original fine-tuned {ft['val_loss']:.3f}" if ft else "") + ".")
    return out


def write_swap_report(study: SwapStudy, result: SwapResult, out: Path, command: str | None = None,
                      seconds: float | None = None) -> Path:
    """results.csv, finetune.csv, calibration.csv, swap.png (:mod:`normmatters.experiments.swap_plots`) and
    report.md in ``out`` (each written atomically); returns report.md's path."""
    from .swap_plots import plot_swap

    out = check_output_folder(out)
    atomic_write(out / "results.csv", _csv_text(result.rows, RESULT_COLUMNS))
    atomic_write(out / "finetune.csv", _csv_text(result.curves, ("model", "norm", "step", "val_loss", "accuracy",
                                                                 "drift", "kl")))
    atomic_write(out / "calibration.csv", _csv_text(result.calibration, ("model", "norm", "layer", "class", "factor",
                                                                         "drift_before", "drift_after",
                                                                         "calibrated")))
    plot = plot_swap(result, out / "swap.png")
    corpus = "the Python standard library's .py files" if study.corpus is None else f"`{study.corpus}`"
    text = ["# Swapping an Lp norm into a trained network", ""]
    if command:
        text += [f"Command: `{command}`" + (f" ({seconds:.0f} s)" if seconds is not None else ""), ""]
    text += ["Settings:", ""]
    if "transformer" in study.models:
        text.append(
            f"- transformer: byte-level, {study.lm_layers} layers, width {study.lm_width}, {study.lm_heads} heads, "
            f"context {study.lm_context}, batch {study.lm_batch}; nn.LayerNorm, AdamW lr {study.lm_lr:g} (warm-up "
            f"10 % + cosine), {study.lm_steps} steps (took {result.base_seconds.get('transformer', 0):.0f} s), on "
            f"{corpus} (≤ {study.max_chars} bytes, last 10 % held out; {study.lm_eval_batches} held-out batches); "
            f"fine-tune: {study.lm_finetune_steps} steps at peak lr {study.lm_finetune_lr:g}; scratch: "
            f"{study.lm_steps + study.lm_finetune_steps} steps.")
    if "resnet" in study.models:
        text.append(
            f"- resnet: {study.cnn_model} with nn.BatchNorm2d on {study.dataset} (standardized, no augmentation), "
            f"batch {study.cnn_batch}, SGD Nesterov momentum 0.9, lr {study.cnn_lr:g}, weight decay "
            f"{study.cnn_weight_decay:g} (warm-up 10 % + cosine), {study.cnn_steps} steps (took "
            f"{result.base_seconds.get('resnet', 0):.0f} s), held-out: the test split; fine-tune: "
            f"{study.cnn_finetune_steps} steps at peak lr {study.cnn_finetune_lr:g}; scratch: "
            f"{study.cnn_steps + study.cnn_finetune_steps} steps.")
    text += [f"- calibration: `normmatters.calibrate_norms(model, batches)` (defaults: least-squares factor, per "
             f"layer for layer norm, per channel for batch norm) on {study.calib_batches} training batches; the "
             f"fitted factors and each layer's drift before / after: `calibration.csv`. Seed {study.seed}.",
             "",
             "Stages: `none` = converted, nothing else; `calibrated` = then calibrated; `finetuned` = then "
             "fine-tuned; `scratch` = trained with the Lp norm from the same initial weights for base + fine-tune "
             "steps. Rows with norm `torch`: the original model and the original fine-tuned with the same recipe "
             "(the reference for `finetuned`). `drift` = ‖f(x) − f₀(x)‖/‖f₀(x)‖ over the held-out logits, f₀ the "
             "original, in eval mode; `drift (train mode)` the same with batch statistics (batch norm); `KL to "
             "original`: mean KL(p₀ ‖ p) of the predicted distributions in nats; `agreement`: share of held-out "
             "argmax predictions equal to the original's.", "",
             format_swap_table(result), "", "Read off the numbers:", "", *_findings(result), "",
             "Fine-tuning curves: `finetune.csv` (held-out loss, accuracy and drift at the fine-tuning steps "
             f"{sorted(set(study.finetune_points))}).", "", f"![swap]({plot.name})", ""]
    return atomic_write(out / "report.md", "\n".join(text))


def _parse(value: str) -> Any:
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value) if value != "" else math.nan
    except ValueError:
        return value


def read_swap_result(folder: str | Path) -> SwapResult:
    """The :class:`SwapResult` a run wrote into ``folder`` (results.csv, finetune.csv, calibration.csv), e.g. to
    redraw its plot: ``plot_swap(read_swap_result(d), d / "swap.png")``. Numbers as written (6 significant
    digits); ``base_seconds`` from the ``original`` rows."""
    folder = Path(folder)
    tables = {}
    for name in ("results", "finetune", "calibration"):
        path = folder / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"read_swap_result: {path} is missing; expected the files of a swap-study run")
        with open(path, newline="") as fh:
            tables[name] = [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    missing = [c for c in RESULT_COLUMNS if tables["results"] and c not in tables["results"][0]]
    if missing or not tables["results"]:
        raise ValueError(f"read_swap_result: {folder / 'results.csv'} lacks the columns {missing} (or has no rows); "
                         f"expected {list(RESULT_COLUMNS)}")
    base = {r["model"]: r["seconds"] for r in tables["results"] if r["stage"] == "original"}
    return SwapResult(tables["results"], tables["finetune"], base, tables["calibration"])
