"""``normmatters precision``: the low-precision stability map (and, with ``--train``, training evidence)."""

from __future__ import annotations

import argparse
import time

from . import default_out
from .checks import UsageError, check_out_folder, int_in, names_in, number, one_of, out_folder, via

#: log2 bounds of the sweep's reduction sizes (2^22 values per row already takes seconds per cell)
_LOG2_N = (1, 22)
#: log2 bounds of the input scales (float64, the reference, spans about 2^-1074 .. 2^1023)
_LOG2_SCALE = (-1000, 1000)


def _format(name: str) -> None:
    from ..precision.formats import get_format

    get_format(name)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("precision", help="stability map of emulated low-precision normalization "
                                         "(relative error vs float64, usable dynamic range)",
                       description="Normalize inputs of many scales and sizes in emulated low-precision formats, "
                       "measure the error against float64, and print the usable dynamic range per norm and "
                       "format; write precision.csv and heatmaps. With --train: train a small MLP per norm and "
                       "precision instead.")
    p.add_argument("--formats", nargs="+", type=via(_format, "a number format: fp32, bf16, fp16, fp8_e4m3, "
                                                                "fp8_e5m2 or int4 .. int16"),
                   default=["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"],
                   help="number formats to emulate")
    p.add_argument("--norms", nargs="+", type=one_of(names_in("normmatters.estimators", "available_norms")),
                   default=["l2", "l1", "linf", "range"], help="norms to test")
    p.add_argument("--dists", nargs="+", type=one_of(names_in("normmatters.precision.sweep", "DISTRIBUTIONS")),
                   default=["gaussian", "relu", "student_t3"],
                   help="input distributions (the range table takes the worst)")
    p.add_argument("--scale-min", type=int_in(*_LOG2_SCALE), default=-24, help="log2 of the smallest input scale")
    p.add_argument("--scale-max", type=int_in(*_LOG2_SCALE), default=24, help="log2 of the largest input scale")
    p.add_argument("--scale-step", type=int_in(1, 2000), default=4, help="log2 step between scales")
    p.add_argument("--n-min", type=int_in(*_LOG2_N), default=6, help="log2 of the smallest reduction size")
    p.add_argument("--n-max", type=int_in(*_LOG2_N), default=20, help="log2 of the largest reduction size")
    p.add_argument("--n-step", type=int_in(1, _LOG2_N[1]), default=2, help="log2 step between reduction sizes")
    p.add_argument("--order", default="pairwise", choices=["sequential", "pairwise", "blocked"],
                   help="summation order of the emulated reductions")
    p.add_argument("--eps", type=number(0), default=0.0, help="eps of the normalization")
    p.add_argument("--threshold", type=number(0, lo_open=True), default=0.01, help="error bound of the usable range")
    p.add_argument("--quick", action="store_true", help="n = 2^6, 2^10, 2^14 only, scale step 8 (seconds)")
    p.add_argument("--out", type=out_folder, default=None, help="folder for precision.csv and the heatmaps "
                                               "(default: runs/precision-<date>-<time>)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of the random inputs")
    p.add_argument("--train", action="store_true",
                   help="instead of the sweep: train an MLP on sklearn digits per norm and precision")
    p.add_argument("--epochs", type=int_in(1, 100_000), default=8, help="--train: epochs per run")
    p.set_defaults(func=run, check=check)


def check(args: argparse.Namespace) -> None:
    """Constraints between flags, then the output folder (the sweep writes into it)."""
    for lo, hi in (("scale_min", "scale_max"), ("n_min", "n_max")):
        if getattr(args, lo) > getattr(args, hi):
            flag = "--" + lo.replace("_", "-")
            raise UsageError(flag, getattr(args, lo), f"at most --{hi.replace('_', '-')} = {getattr(args, hi)}")
    if not args.train:
        args.out = check_out_folder("--out", args.out or default_out("precision"))


def run(args: argparse.Namespace) -> int:
    if args.train:
        from ..experiments.train_evidence import evidence_table, run_evidence
        from ..progress import elapsed_bar

        t = time.time()
        with elapsed_bar("precision --train (a few minutes)"):
            res = run_evidence(norms=tuple(args.norms), epochs=args.epochs, seed=args.seed)
        print(evidence_table(res))
        print(f"\n(test accuracy of an MLP 64-128-128-10 on sklearn digits, {args.epochs} epochs; "
              f"{time.time() - t:.0f} s)")
        return 0
    from ..precision.sweep import plot_heatmaps, range_table, run_sweep, write_csv

    if args.quick:
        ns, step = (6, 10, 14), 8
    else:
        ns, step = tuple(range(args.n_min, args.n_max + 1, args.n_step)), args.scale_step
    scales = tuple(range(args.scale_min, args.scale_max + 1, step))
    t = time.time()
    rec = run_sweep(args.formats, args.norms, args.dists, scales, ns, eps=args.eps, order=args.order,
                    seed=args.seed)
    out = args.out
    csv_path = write_csv(rec, out / "precision.csv")
    pngs = plot_heatmaps(rec, out, threshold=args.threshold)
    print(f"Usable dynamic range: input scales (log2, step {step}) where the output error vs float64, "
          f"worst over {', '.join(args.dists)}, stays < {args.threshold:.0%} ({args.order} sums, "
          f"eps={args.eps:g})\n")
    print(range_table(rec, "err_out", args.threshold))
    print("\nSame, for the statistics alone (error of μ and 1/σ̂; the informative one for fp8):\n")
    print(range_table(rec, "err_stat", args.threshold))
    print(f"\nCSV: {csv_path}\nheatmaps: {', '.join(map(str, pngs))}\n({time.time() - t:.0f} s)")
    return 0
