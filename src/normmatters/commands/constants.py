"""``normmatters constants``: the Gaussian-consistency constants and σ̂/σ of the published ones."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("constants", help="print c(n) per norm and the published constants' error",
                       description="Print the Gaussian-consistency constant c(n) of every norm at the given "
                       "reduction sizes, E[σ̂]/σ with our constant and with the published one, and a Monte Carlo "
                       "check of the implementation.")
    p.add_argument("--n", type=int, nargs="+", default=[64, 1024, 65536], help="reduction sizes")
    p.add_argument("--k", type=int, default=10, help="k of norm='topk'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report_constants import constants_table

    print(constants_table(args.n, k=args.k))
    return 0
