"""``normmatters bench``: Lp batch norm vs nn.BatchNorm (``--layers``: the per-sample Lp layers vs nn.LayerNorm,
nn.RMSNorm, nn.GroupNorm), ratios measured side by side in one run."""

from __future__ import annotations

import argparse
import json

from .checks import UsageError, device, estimator_norms, int_in, one_of, out_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time and memory of the Lp layers vs nn.BatchNorm (ratios, one run)",
                       description="Time forward+backward of every Lp layer and of nn.BatchNorm side by side "
                       "(interleaved rounds on the same tensors) and print the ratios with the machine's copy "
                       "bandwidth; also one ResNet-20 training step per norm. Prints only; --json FILE keeps it.")
    p.add_argument("--quick", action="store_true",
                   help="one shape, float32, contiguous; in-place and ResNet-20 rows for l1 and range only "
                        "(under a minute)")
    p.add_argument("--json", metavar="FILE", type=out_file, help="also write all results to FILE (default: print only)")
    p.add_argument("--device", default="cpu", type=device, help="torch device (default: cpu)")
    p.add_argument("--norms", nargs="+", type=one_of(estimator_norms), default=None,
                   help="subset of norms (default: all)")
    p.add_argument("--rounds", type=int_in(1, 100_000), default=None, help="interleaved rounds per measurement "
                        "(default: the benchmark's own, fewer with --quick)")
    p.add_argument("--sync", action="store_true",
                   help="instead: SyncLpBatchNorm2d on 2 gloo CPU ranks — step time vs the unsynced layer and vs "
                        "synced l2, collectives and bytes per layer per step")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-20 training-step comparison")
    p.add_argument("--layers", action="store_true",
                   help="instead: LpLayerNorm / LpRMSNorm / LpGroupNorm vs nn.LayerNorm / nn.RMSNorm / nn.GroupNorm, "
                        "fwd and fwd+bwd, eager and compiled (8192x768, 4096x4096 float32/bfloat16; 16x256x32x32, "
                        "32 groups); --quick: small shapes, float32")
    p.add_argument("--eager-only", action="store_true", help="with --layers: skip the torch.compile columns")
    p.set_defaults(func=run, check=check)


def check(args: argparse.Namespace) -> None:
    """Constraints between flags: --layers times a subset of the norms; --sync and --layers exclude each other."""
    if args.sync and args.layers:
        raise UsageError("--layers", "given with --sync", "one of --sync and --layers")
    if args.layers and args.norms:
        from ..bench_layers import NORMS

        for n in args.norms:
            if n not in NORMS:
                raise UsageError("--norms", n, f"with --layers, one of {', '.join(NORMS)}")
    if (args.sync or args.layers) and args.device != "cpu":
        raise UsageError("--device", args.device, "cpu with --sync and --layers (they run on the CPU)")


def run(args: argparse.Namespace) -> int:
    if args.sync:
        return _run_sync(args)
    if args.layers:
        return _run_layers(args)
    from ..bench import NORMS, run_benchmark
    from ..progress import elapsed_bar

    # the benchmark has no steps to count from outside kernels/: a line that counts the seconds meanwhile
    with elapsed_bar("bench (about a minute with --quick, several without)"):
        res = run_benchmark(quick=args.quick, device=args.device, norms=args.norms or NORMS, rounds=args.rounds,
                            resnet=not args.no_resnet)
    readings = "/".join(f"{b:.1f}" for b in res["copy_bandwidth_samples_GBps"])
    print(f"device {res['device']}, torch {res['torch']}, {res['threads']} threads, memory copy bandwidth "
          f"{res['copy_bandwidth_GBps']:.1f} GB/s (readings before/after: {readings}); ratios are medians of "
          "per-round ratios "
          "(bn: nn.BatchNorm eager, bnc: nn.BatchNorm under torch.compile, naive: reference path)")
    print(res["table"])
    if res["resnet20_step_ratio"]:
        r = res["resnet20_step_ratio"]
        print(f"ResNet-20 (CIFAR, batch 128) SGD step vs nn.BatchNorm2d ({r['bn_ms']:.0f} ms); "
              "wn+mean / bwn+mean: (bounded) weight norm + mean-only batch norm")
        print("| model | step time /bn | activations saved /bn |\n|---|---|---|")
        for k in r["step"]:
            print(f"| {k} | {r['step'][k]:.2f} | {r['saved'][k]:.2f} |")
    if res.get("native_first_call"):
        secs, how = res["native_first_call"]
        print(f"native kernels: library {how} and loaded in {secs:.2f} s at first use")
    if res["compile_seconds"]:
        print("first-call (compile) seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                          res["compile_seconds"].items()))
    print(f"benchmark took {res['seconds']:.0f} s")
    if args.json:
        from ..atomic_write import atomic_write

        atomic_write(args.json, json.dumps(res, indent=1, default=str))
    return 0


def _run_sync(args: argparse.Namespace) -> int:
    from ..sync_bench import NORMS, format_sync_table, run_sync_benchmark

    res = run_sync_benchmark(norms=tuple(args.norms or NORMS), rounds=args.rounds or (10 if args.quick else 30))
    print(format_sync_table(res))
    if args.json:
        from ..atomic_write import atomic_write

        atomic_write(args.json, json.dumps(res, indent=1, default=str))
    return 0


def _run_layers(args: argparse.Namespace) -> int:
    from ..bench_layers import NORMS, run_layer_benchmark
    from ..progress import elapsed_bar

    with elapsed_bar("bench --layers (a minute or two with --quick, many without)"):
        res = run_layer_benchmark(quick=args.quick, norms=tuple(args.norms or NORMS), rounds=args.rounds,
                                  compiled=not args.eager_only)
    print(f"torch {res['torch']}, {res['threads']} threads, native row kernels: {'yes' if res['native'] else 'no'}; "
          f"time ratios are medians over {res['rounds']} interleaved rounds of (Lp layer / stock layer); compiled: "
          "both under torch.compile(fullgraph=True); saved: bytes kept for backward / the stock layer's")
    print(res["table"])
    print(f"benchmark took {res['seconds']:.0f} s")
    if args.json:
        from ..atomic_write import atomic_write

        atomic_write(args.json, json.dumps(res, indent=1, default=str))
    return 0
