"""``cspace toy``: unguided vs guided vs backtracking on the exact Gaussian-mixture flow
(:mod:`cspace.experiments.toy`)."""

from __future__ import annotations

import argparse
import json

from cspace.cli.args import nonneg_float, positive_int, seed, toy_dim

__all__ = ["register"]


def _cmd_toy(args: argparse.Namespace) -> int:
    from cspace.experiments.toy import ToySettings, format_table, run_toy

    settings = ToySettings(
        dim=args.dim, seed=args.seed, steps=args.steps, n=args.n, strength=args.strength
    )
    out = args.out
    if out is None and not args.json:
        out = "cspace-toy"  # with --json nothing is written unless --out is given
    report = run_toy(settings, out_dir=None if args.no_plot else out, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
        if "png" in report:
            print(f"figure: {report['png']}")
    return 0


def register(subparsers) -> None:
    toy = subparsers.add_parser(
        "toy",
        help="unguided vs guided vs backtracking on an exact Gaussian-mixture flow",
        description="Unguided vs guided vs backtracking sampling on an exact Gaussian mixture with "
        "ball obstacles; prints hit rate, energy distance to the exact obstacle-free target and NFE.",
    )
    toy.add_argument("--dim", type=toy_dim, default=2, help="dimension, at least 2 (default 2)")
    toy.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    toy.add_argument("--steps", type=positive_int, default=50, help="sampler steps (default 50)")
    toy.add_argument(
        "--n", type=positive_int, default=2000, help="samples per method (default 2000)"
    )
    toy.add_argument(
        "--strength", type=nonneg_float, default=3.0, help="guidance strength (default 3)"
    )
    toy.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the 2-D figure, toy.png (default: cspace-toy; with --json nothing is "
        "written unless --out is given)",
    )
    toy.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    toy.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    toy.add_argument("--json", action="store_true", help="print the report as JSON")
    toy.set_defaults(func=_cmd_toy)
