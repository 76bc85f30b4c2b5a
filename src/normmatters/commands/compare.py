"""``normmatters compare``: train one small model with nn.BatchNorm2d and each Lp norm; print the table."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import default_out
from .checks import check_out_folder, dataset, device, int_in, names_in, number, one_of, out_folder, train_norms


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare bn and the Lp norms on a small model and dataset (minutes, CPU)",
        description="Train the same model with nn.BatchNorm2d (bn) and each norm for a few seeds; "
        "print accuracy, loss, time and memory ratios; write report.md, CSV/JSONL "
        "and plots.",
    )
    p.add_argument("--norms", nargs="+", type=one_of(train_norms), default=None,
                   help="norms to compare (default: bn l2 l1 linf topk range)")
    p.add_argument("--seeds", type=int_in(1, 1000), default=None, help="number of seeds (default 3; --quick: 1)")
    p.add_argument("--epochs", type=int_in(1, 100_000), default=None, help="epochs per run (default 8; --quick: 2)")
    p.add_argument(
        "--dataset",
        default="digits",
        type=dataset,
        help="'digits' (embedded), or idx:DIR, cifar:DIR, folder:DIR, or a DIR (format detected)",
    )
    p.add_argument("--model", default="resnet8", type=one_of(names_in("normmatters.experiments.models", "MODEL_NAMES")),
                   help="resnet8|resnet20|resnet32|resnet56|vgg11|vgg16|mlp")
    p.add_argument("--batch-size", type=int_in(1, 2**20), default=64, help="batch size")
    p.add_argument("--lr", type=number(0, lo_open=True), default=0.1,
                   help="peak learning rate (SGD, Nesterov, cosine schedule)")
    p.add_argument(
        "--threads",
        type=int_in(1, 4096),
        default=1,
        help="torch CPU threads (default 1: small models run fastest and steadiest single-threaded)",
    )
    p.add_argument(
        "--out", type=out_folder, default=None, help="output folder (default: runs/compare-<date>-<time>)"
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs: a smoke test")
    p.add_argument("--device", default="cpu", type=device, help="cpu or cuda[:N]")
    p.set_defaults(func=run, check=check)


def check(args: argparse.Namespace) -> None:
    """The last check before training: the output folder takes a file."""
    args.out = check_out_folder("--out", args.out or default_out("compare"))


def run(args: argparse.Namespace) -> int:
    from ..experiments.compare import DEFAULT_NORMS, CompareConfig, RunResult, run_compare
    from ..experiments.data import DataError
    from ..experiments.report import format_table, summarize, write_report

    if not getattr(args, "verbose", False):  # per-epoch log lines would drown the per-run summary
        logging.getLogger("normmatters.experiments").setLevel(logging.WARNING)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 8)
    out = args.out or default_out("compare")
    cfg = CompareConfig(
        norms=tuple(args.norms or DEFAULT_NORMS),
        seeds=tuple(range(seeds)),
        epochs=epochs,
        dataset=args.dataset,
        model=args.model,
        device=args.device,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
    )
    print(
        f"normmatters compare: {args.model} on {args.dataset}, norms {' '.join(cfg.norms)}, "
        f"{seeds} seed(s) × "
        f"{epochs} epoch(s), device {args.device}; writing to {out}/",
        flush=True,
    )
    t0 = time.perf_counter()
    total = len(cfg.norms) * seeds

    done = [0]

    def on_run(r: RunResult) -> None:
        done[0] += 1
        print(
            f"  [{done[0]}/{total}] {r.norm:6s} seed {r.seed}: test acc {100 * r.test_acc:.2f} %, "
            f"final loss {r.final_loss:.4f}, {1e3 * r.median_step_time:.2f} ms/step ({r.step_ratio:.2f}× the "
            "baseline, timed side by side)",
            flush=True,
        )

    try:
        results = run_compare(cfg, on_run=on_run)
    except (DataError, ValueError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    files = write_report(
        results,
        out,
        {
            "model": args.model,
            "dataset": args.dataset,
            "seeds": seeds,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "device": args.device,
            "threads": args.threads,
        },
        wall,
    )
    print()
    print(format_table(summarize(results)))
    print()
    print(f"wall time {wall:.1f} s; wrote {', '.join(str(p) for p in files.values())}")
    return 0
