"""``normmatters reproduce``: the paper's experiments, each writing a report folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import default_out
from .checks import (
    UsageError,
    check_out_folder,
    dataset,
    estimator_norms,
    increasing,
    int_in,
    names_in,
    number,
    one_of,
    out_folder,
    text_folder,
    via,
)

_SEED = int_in(0, 2**32 - 1)
#: the layer-norm study's largest context and batch (the attention matrix is batch × heads × context²)
MAX_CONTEXT, MAX_BATCH = 8192, 4096


#: flags only some studies read → those studies; given to another of these studies, a flag is refused (not ignored).
#: A study not named in :data:`_STUDIES` is not restricted (it declares its flags here when it wants them checked).
_STUDIES = ("weight-decay", "weight-norm", "layer-norm", "swap")
_ONLY = {
    **dict.fromkeys(("epochs", "model"), ("weight-decay", "weight-norm")),
    "dataset": ("weight-decay", "weight-norm", "swap"),
    "corpus": ("layer-norm", "swap"),
    "norms": ("swap",),
    **dict.fromkeys(("milestones", "optimizer", "lr", "weight_decay"), ("weight-decay",)),
    **dict.fromkeys(("steps", "variants", "precision", "scale", "emulate", "emulated_seeds", "eval_every",
                     "context", "batch"), ("layer-norm",)),
}
#: flags whose default is not None (given = differs from it)
_DEFAULTS = {"dataset": "digits"}


def _variant(name: str) -> None:
    from ..experiments.layer_norm_study import parse_variant

    parse_variant(name)

#: the help of flags whose default depends on the study (set after the flags are added)
_HELP = {
    "seeds": "seeds (default: 0 1 2; --quick: 0)",
    "epochs": "epochs per run (default: weight-decay 100; weight-norm 6 for the CNN, 10 for the LSTM, 3 for the "
              "batch-size runs; --quick: fewer)",
    "model": "CNN model (default: weight-decay resnet8, weight-norm resnet20; --quick: resnet8)",
    "out": "output folder (default: runs/<study>-<date>-<time>)",
    "quick": "1 seed, few epochs: a smoke test",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run one of the paper's studies and write a report",
        description="Run one of the paper's studies on a small model and write report.md, results.csv and plots. "
        "weight-decay: weight decay before a normalization only changes the effective step size (Hoffer et al. "
        "2018, sec. 5); weight-norm: (bounded) weight norm against batch norm (sec. 6); layer-norm: nn.LayerNorm / "
        "nn.RMSNorm against their Lp versions in a small character-level transformer; swap: Lp norms swapped into a "
        "trained transformer and ResNet (no retraining, calibrated, fine-tuned, from scratch).")
    p.add_argument("study", choices=["weight-decay", "weight-norm", "layer-norm", "swap"], help="which study")
    p.add_argument("--seeds", type=_SEED, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int_in(1, 100_000), default=None, help="epochs per run")
    p.add_argument("--dataset", default="digits", type=dataset,
                   help="digits (embedded), or a folder / idx:/cifar:/folder: path")
    p.add_argument("--model", default=None, type=one_of(names_in("normmatters.experiments.models", "MODEL_NAMES")),
                   help="model name (default resnet8)")
    p.add_argument("--out", type=out_folder, default=None, help="output folder (default ./normmatters-<study>-<time>)")
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs")
    p.add_argument("--milestones", type=int_in(1, 100_000), nargs="+", default=None,
                   help="weight-decay: epochs where the rate drops ×0.1 (default 40 90)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="weight-decay: sgd (default; lr 0.005, λ 0.1) or adamw (decoupled decay)")
    p.add_argument("--lr", type=number(0, lo_open=True), default=None,
                   help="weight-decay: learning rate (default 0.005)")
    p.add_argument("--weight-decay", type=number(0), default=None,
                   help="weight-decay: λ of the decay run (default 0.1)")
    p.add_argument("--corpus", type=text_folder, default=None,
                   help="layer-norm: folder of text files (default: the Python standard library's .py files)")
    p.add_argument("--steps", type=int_in(1, 10**7), default=None,
                   help="layer-norm: training steps per run (default 400)")
    p.add_argument("--variants", nargs="+", default=None,
                   type=via(_variant, "a variant name as in the table, e.g. 'nn.LayerNorm' or 'LpLayerNorm l1'"),
                   help="layer-norm: the plain (native) variants to run (default: all seven; names as in the table)")
    p.add_argument("--precision", nargs="+", default=None, metavar="FORMAT",
                   choices=["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"],
                   help="layer-norm: also run the --emulate layers with their forward emulated in these formats "
                        "(default: none, native variants only)")
    p.add_argument("--scale", type=number(0, lo_open=True), nargs="+", default=None,
                   help="layer-norm: factors the emulated normalizations' input is multiplied by (default 1)")
    p.add_argument("--emulate", nargs="+", default=None,
                   type=one_of(names_in("normmatters.experiments.layer_norm_study", "EMULATED")), metavar="LAYER",
                   help="layer-norm: the Lp layers run emulated, e.g. 'LpLayerNorm l1' (default: LpLayerNorm "
                        "l2 l1 linf range, LpRMSNorm l2 l1)")
    p.add_argument("--emulated-seeds", type=_SEED, nargs="+", default=None,
                   help="layer-norm: seeds of the emulated variants (default: all seeds)")
    p.add_argument("--eval-every", type=int_in(1, 10**7), default=None,
                   help="layer-norm: steps between validation-curve points (default 25)")
    p.add_argument("--context", type=int_in(2, MAX_CONTEXT), default=None,
                   help="layer-norm: context length (default 128)")
    p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=None, help="layer-norm: batch size (default 32)")
    p.add_argument("--norms", nargs="+", default=None, type=one_of(estimator_norms),
                   help="swap: the Lp norms swapped in (default l2 l1 linf topk range; --quick: l1 linf)")
    p.set_defaults(func=run, check=check)

    for action in p._actions:
        action.help = _HELP.get(action.dest, action.help)


def _check_attention_fits(args: argparse.Namespace) -> None:
    """--batch × --context together: the attention scores (batch × heads × context² float32, per layer) must fit
    in the memory at hand."""
    from ..experiments.data import available_memory
    from ..experiments.layer_norm_study import LayerNormStudy

    study = LayerNormStudy()
    batch = args.batch or (16 if args.quick else study.batch)
    context = args.context or (64 if args.quick else study.context)
    need = batch * study.heads * context**2 * 4 * study.layers * 3  # scores, softmax and gradient per layer
    avail = available_memory()
    if avail is not None and need > avail:
        raise UsageError("--context", context, f"a context whose attention (batch {batch} × {study.heads} heads × "
                         f"context², about {need / 2**30:.1f} GiB) fits in the {avail / 2**30:.1f} GiB of memory "
                         "available")


def check(args: argparse.Namespace) -> None:
    """Constraints between flags, then the output folder (the study writes its report into it)."""
    if args.study in _STUDIES:
        for dest, studies in _ONLY.items():
            value = getattr(args, dest)
            if args.study not in studies and value is not None and value != _DEFAULTS.get(dest):
                shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
                raise UsageError("--" + dest.replace("_", "-"), shown,
                                 f"no value with {args.study}: only {' and '.join(studies)} read it")
    increasing("--milestones", args.milestones)
    if args.study == "layer-norm" and (args.context or args.batch):
        _check_attention_fits(args)
    if args.study == "swap":
        if args.seeds and len(args.seeds) > 1:
            raise UsageError("--seeds", " ".join(map(str, args.seeds)), "one seed with swap (the trained model's)")
        try:
            _swap_study(args).check()
        except ValueError as e:
            raise UsageError("--norms", " ".join(args.norms or ()), str(e).removeprefix("swap study: ")) from None
    args.out = check_out_folder("--out", args.out or default_out(args.study))


def run(args: argparse.Namespace) -> int:
    out = args.out or default_out(args.study)
    print(f"normmatters reproduce {args.study}: writing to {out}/", flush=True)
    t0 = time.perf_counter()
    if args.study == "weight-norm":
        report, table = _weight_norm(args, out)
    elif args.study == "layer-norm":
        report, table = _layer_norm(args, out)
    elif args.study == "swap":
        report, table = _swap(args, out, t0)
    else:
        report, table = _weight_decay(args, out)
    print(table)
    print(f"\nreport: {report} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _weight_norm(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    from ..experiments.weight_norm_study import (
        WeightNormStudy,
        format_weight_norm_tables,
        run_weight_norm_study,
        write_weight_norm_report,
    )

    study = WeightNormStudy(dataset=args.dataset)
    if args.quick:
        study.seeds, study.cnn_model, study.cnn_epochs, study.lstm_epochs, study.batch_epochs = (0,), "resnet8", 2, 2, 1
    if args.seeds:
        study.seeds = tuple(args.seeds)
    if args.epochs:
        study.cnn_epochs = study.lstm_epochs = study.batch_epochs = args.epochs
    if args.model:
        study.cnn_model = args.model
    results = run_weight_norm_study(study)
    return write_weight_norm_report(study, results, out), format_weight_norm_tables(results)


def _weight_decay(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    import shlex
    import sys

    from ..experiments.weight_decay import WeightDecayStudy, run_weight_decay_study
    from ..experiments.weight_decay_report import format_weight_decay_table, write_weight_decay_report

    study = WeightDecayStudy(dataset=args.dataset, optimizer=args.optimizer or "sgd")
    if args.quick:
        study.seeds, study.epochs, study.milestones = (0,), 4, (2, 3)
    if args.seeds:
        study.seeds = tuple(args.seeds)
    if args.epochs:
        study.epochs = args.epochs
        study.milestones = tuple(m for m in study.milestones if m < args.epochs) or (max(1, args.epochs // 2),)
    if args.milestones:
        study.milestones = tuple(args.milestones)
    if args.model:
        study.model = args.model
    if args.lr is not None:
        study.lr = args.lr
    if args.weight_decay is not None:
        study.weight_decay = args.weight_decay
    results = run_weight_decay_study(study)
    command = "normmatters " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else None
    return write_weight_decay_report(study, results, out, command), format_weight_decay_table(results)


def _layer_norm(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    import shlex
    import sys

    from ..experiments.layer_norm_study import (
        LayerNormStudy,
        format_layer_norm_table,
        run_layer_norm_study,
        write_layer_norm_report,
    )

    study = LayerNormStudy(corpus=args.corpus)
    if args.quick:
        study.seeds, study.steps, study.width, study.context, study.batch = (0,), 30, 64, 64, 16
        study.eval_batches, study.max_chars = 4, 300_000
    if args.seeds:
        study.seeds = tuple(args.seeds)
    if args.steps:
        study.steps = args.steps
        study.eval_every = min(study.eval_every, args.steps)
    if args.quick:
        study.eval_every = 10
    for name in ("variants", "emulate", "emulated_seeds", "eval_every", "context", "batch"):
        value = getattr(args, name)
        if value is not None:
            setattr(study, "emulated" if name == "emulate" else name, tuple(value) if isinstance(value, list)
                    else value)
    if args.precision:
        study.precisions = tuple(args.precision)
    if args.scale:
        study.scales = tuple(args.scale)
    rows = run_layer_norm_study(study)
    command = "normmatters " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else None
    return write_layer_norm_report(study, rows, out, command), format_layer_norm_table(rows)


def _swap_study(args: argparse.Namespace):
    """The swap study's settings from the flags (``--quick``: the smallest that still runs every stage)."""
    from ..experiments.swap_study import SwapStudy

    study = SwapStudy(corpus=args.corpus, dataset=args.dataset)
    if args.quick:
        study.norms, study.max_chars, study.calib_batches, study.bn_impl = ("l1", "linf"), 300_000, 2, "eager"
        study.lm_width, study.lm_context, study.lm_batch, study.lm_eval_batches = 32, 32, 16, 4
        study.lm_steps, study.lm_finetune_steps, study.cnn_steps, study.cnn_finetune_steps = 60, 20, 40, 20
        study.finetune_points = (0, 5, 10, 20)
    if args.seeds:
        study.seed = args.seeds[0]
    if args.norms:
        study.norms = tuple(args.norms)
    return study


def _swap(args: argparse.Namespace, out: Path, t0: float) -> tuple[Path, str]:
    import shlex
    import sys

    from ..experiments.swap_report import format_swap_table, write_swap_report
    from ..experiments.swap_study import run_swap_study

    study = _swap_study(args)  # its settings were checked with the flags (check)
    result = run_swap_study(study)
    command = "normmatters " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else None
    report = write_swap_report(study, result, out, command, time.perf_counter() - t0)
    return report, format_swap_table(result)
