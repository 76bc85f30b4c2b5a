"""``normmatters constants``: the Gaussian-consistency constants and σ̂/σ of the published ones."""

from __future__ import annotations

import argparse

from .checks import int_in

#: the largest reduction size: the Monte Carlo column draws max(2**22 // n, 2048) rows of n float64 values
#: (2**31 draws at 2**20, minutes; more would run for hours)
MAX_N = 2**20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("constants", help="print c(n) per norm and the published constants' error",
                       description="Print the Gaussian-consistency constant c(n) of every norm at the given "
                       "reduction sizes, E[σ̂]/σ with our constant and with the published one, and a Monte Carlo "
                       "check of the implementation.")
    p.add_argument("--n", type=int_in(2, MAX_N), nargs="+", default=[64, 1024, 65536],
                   help=f"reduction sizes (2 .. {MAX_N})")
    p.add_argument("--k", type=int_in(1), default=10, help="k of norm='topk' (at most n: min(k, n) is used)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report_constants import constants_table

    print(constants_table(args.n, k=args.k))
    return 0
