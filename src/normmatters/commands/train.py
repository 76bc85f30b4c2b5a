"""``normmatters train``: one run from a config file and/or flags; resumable; torchrun-aware."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .checks import int_in, real

#: flag → config key for the options that map one-to-one (None defaults mean "not given")
_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "resnet20|resnet32|resnet56|resnet8|vgg11|vgg16|mlp|lstm"),
    "dataset": (str, "digits, idx:DIR, cifar:DIR, folder:DIR or a DIR"),
    "norm": (str, "bn|l2|l1|linf|topk|range|mean|none"),
    "width": (int, "channel multiplier"),
    "epochs": (int, "epochs"),
    "batch_size": (int, "global batch size (split across ranks)"),
    "optimizer": (str, "sgd|adam|adamw"),
    "lr": (float, "base learning rate"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "default weight decay"),
    "wd_normalized": (float, "decay of scale-invariant weights (conv/linear before a norm)"),
    "wd_norm": (float, "decay of norm weights/biases"),
    "wd_other": (float, "decay of other parameters"),
    "schedule": (str, "constant|step|multistep|cosine"),
    "step_size": (int, "epochs per step of schedule=step"),
    "gamma": (float, "decay factor of step/multistep"),
    "warmup_epochs": (float, "linear warm-up length in epochs"),
    "crop_padding": (int, "random-crop padding (0: off)"),
    "seed": (int, "seed"),
    "dtype": (str, "fp32|bf16|autocast"),
    "device": (str, "cpu|cuda|cuda:N"),
    "workers": (int, "data-loader worker processes"),
    "threads": (int, "torch CPU threads"),
    "sync_norm": (str, "none|torch|lp|auto: normalization statistics across ranks"),
    "checkpoint_every": (int, "epochs between checkpoints"),
    "log_every": (int, "steps between step-metric records"),
    "weight_norm": (str, "none|wn|bwn: (bounded) weight norm + mean-only batch norm, the paper's form"),
    "weight_norm_p": (float, "p of the weight norm's per-channel norm: 1, 2 or inf"),
    "batch_order": (str, "shuffle|class_sorted (batches of one class: where batch statistics fail)"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one model (config file and/or flags); resumable; torchrun-aware",
        description="Train one run. Settings come from --config (YAML or TOML), then flags. The "
        "full config is written to OUT/config.yaml with metrics and checkpoint.pt. "
        "Under torchrun each process trains a shard (DDP).",
    )
    p.add_argument("--config", type=Path,
                   help="YAML or TOML file of TrainConfig keys (default: none; flags override it)")
    p.add_argument("--out", type=Path, required=True, help="output folder (required)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (config from OUT)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    defaults = _config_defaults()
    # a flag's type says what it parses (one line naming flag and value otherwise); TrainConfig.validate then
    # checks the ranges once for flags and config files alike (ConfigError: "config: lr must be ...")
    types = {int: int_in(), float: real, str: str}
    for key, (typ, help_) in _FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=types[typ],
                       default=None, help=f"{help_} (default: {defaults[key]})")
    p.add_argument("--milestones", type=int_in(), nargs="+", default=None,
                   help="epochs of schedule=multistep (default: none)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum (default: {defaults['nesterov']})")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help=f"random horizontal flip (default: {defaults['hflip']})")
    p.add_argument("--record-norms", dest="record_norms", metavar="FILE", default=None,
                   help="record the scale-invariant weights' per-channel norms before every step (.npz; default: "
                        "not recorded)")
    p.add_argument("--mimic-weight-decay", dest="mimic_weight_decay", metavar="FILE|online", default=None,
                   help="weight decay off on scale-invariant weights, reproduced from a recorded trajectory "
                        "or online (λ = --wd-normalized, else --weight-decay; default: off)")
    p.add_argument("--wd-mimic", dest="wd_mimic", choices=("online", "replay"), default=None,
                   help="weight decay off on scale-invariant weights, reproduced online by the rescale rule "
                        "(online: SGD) or the replay rule (replay: SGD and AdamW); with --mimic-weight-decay FILE, "
                        "the rule used with that trajectory (default: off)")
    p.add_argument("--norm-schedule", dest="norm_schedule", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the scale-invariant weights' norm instead of the learning rate (default: False)")
    p.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=None,
                   help="effective learning rate of scale-invariant weights (default: True)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write the metrics as TensorBoard scalars into OUT/tensorboard (default: False)")
    p.add_argument(
        "--norm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="norm layer option, e.g. k=5, ghost_batch_size=32 (repeatable; default: none)",
    )
    p.set_defaults(func=run, check=check)


def check(args: argparse.Namespace) -> None:
    """Every setting before any work: the flags (and --config) form a valid TrainConfig.

    A resumed run's config comes from OUT/config.yaml and is checked when it is read, and --out when the trainer
    starts (:func:`~normmatters.experiments.run_folder.check_output_folder`), both before any training (run)."""
    from ..experiments.config import TrainConfig, load_config

    overrides = _overrides(args)
    if not args.resume:
        base = load_config(args.config) if args.config else {}
        TrainConfig.from_dict({**base, **overrides}, source=str(args.config) if args.config else "flags")


def _config_defaults() -> dict[str, Any]:
    """TrainConfig's defaults by key, for the help text (config.py imports no torch)."""
    import dataclasses

    from ..experiments.config import TrainConfig

    shown = {"wd_normalized": "same as --weight-decay", "wd_other": "same as --weight-decay",
             "threads": "torch's default"}
    return {f.name: shown.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)}


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [*_FLAGS, "milestones", "nesterov", "hflip", "record_norms", "mimic_weight_decay", "norm_schedule",
            "monitor", "tensorboard"]
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.wd_mimic is not None:
        out["mimic_rule"] = "replay" if args.wd_mimic == "replay" else "rescale"
        out.setdefault("mimic_weight_decay", "online")
    if args.norm_option:
        opts = {}
        for item in args.norm_option:
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"--norm-option expects KEY=VALUE, got {item!r}")
            opts[k] = _parse_value(v)
        out["norm_options"] = opts
    return out


def run(args: argparse.Namespace) -> int:
    from .. import progress
    from ..experiments import distributed as D
    from ..experiments.checkpoint import CheckpointError
    from ..experiments.config import ConfigError, TrainConfig, load_config
    from ..experiments.data import DataError
    from ..experiments.trainer import DivergedError, Trainer

    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        overrides = _overrides(args)
        if args.resume:
            saved = args.out / "config.yaml"
            if not saved.is_file():
                raise CheckpointError(
                    f"cannot resume: {saved} does not exist (nothing was started in {args.out})"
                )
            base = load_config(saved)
            source = str(saved)
        else:
            base = load_config(args.config) if args.config else {}
            source = str(args.config) if args.config else "flags"
        cfg = TrainConfig.from_dict({**base, **overrides}, source=source)
        info = D.init_from_env(cfg.device)
        trainer = Trainer(cfg, args.out, dist_info=info, progress=progress.enabled())  # on in a terminal
        if info.is_main:
            print(
                f"normmatters train: {cfg.model} / {cfg.norm} on {trainer.data.name}, {cfg.epochs} epochs, "
                f"{info.world_size} rank(s); writing to {args.out}/",
                flush=True,
            )
        result = trainer.fit(resume=args.resume, handle_signals=True)
        # every rank past its last collective before any rank tears the group down: a rank that destroys it
        # while another still talks to it can abort that one (gloo: "terminate called without an active exception")
        D.barrier(info)
    except DivergedError as e:  # the run itself failed, not its settings
        print(f"train: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk (DiskFullError says so), a vanished folder, ...
        print(f"train: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if info.is_main:
        _report(args, result, trainer)
    return {"finished": 0, "complete": 0, "stopped": 0, "SIGINT": 130, "SIGTERM": 143}.get(result.status, 1)


def _report(args: argparse.Namespace, result: Any, trainer: Any) -> None:
    from ..experiments.report import plot_run

    if result.status == "complete":
        print(f"{args.out} is already complete: {trainer.epoch} of {trainer.cfg.epochs} epochs trained. To train "
              f"longer: normmatters train --out {args.out} --resume --epochs N (N > {trainer.epoch})")
        return
    try:
        plot_run(args.out)
    except (ValueError, OSError) as e:  # a damaged metrics file must not hide the result
        print(f"train: no plot ({e})", file=sys.stderr)
    f = result.final
    if f:
        print(
            f"epoch {f['epoch']}: train loss {f['train_loss']:.4f}, test loss {f['test_loss']:.4f}, "
            f"test acc {100 * f['test_acc']:.2f} %"
        )
    if result.status != "finished":
        print(
            f"stopped by {result.status}; checkpoint saved: resume with "
            f"normmatters train --out {args.out} --resume",
            flush=True,
        )
