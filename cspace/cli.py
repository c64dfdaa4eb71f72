"""The ``cspace`` command line."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _cmd_toy(args: argparse.Namespace) -> int:
    from cspace.toy_experiment import ToySettings, format_table, run_toy

    if args.dim < 2:
        raise SystemExit(f"cspace toy: --dim must be >= 2 (got {args.dim})")
    settings = ToySettings(
        dim=args.dim, seed=args.seed, steps=args.steps, n=args.n, strength=args.strength
    )
    report = run_toy(settings, out_dir=None if args.no_plot else args.out)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
        if "png" in report:
            print(f"figure: {report['png']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cspace",
        description="Steer diffusion and flow-matching samplers through a configuration space.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    toy = sub.add_parser(
        "toy",
        help="unguided vs guided vs backtracking on an exact Gaussian-mixture flow",
        description="Unguided vs guided vs backtracking sampling on an exact Gaussian mixture with "
        "ball obstacles; prints hit rate, energy distance to the exact obstacle-free target and NFE.",
    )
    toy.add_argument("--dim", type=_positive_int, default=2, help="dimension (>= 2; default 2)")
    toy.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    toy.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default 50)")
    toy.add_argument(
        "--n", type=_positive_int, default=2000, help="samples per method (default 2000)"
    )
    toy.add_argument(
        "--strength", type=_nonneg_float, default=3.0, help="guidance strength (default 3)"
    )
    toy.add_argument(
        "--out", default="cspace-toy", help="folder for the 2-D figure (default cspace-toy)"
    )
    toy.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    toy.add_argument("--json", action="store_true", help="print the report as JSON")
    toy.set_defaults(func=_cmd_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:
        print(f"cspace {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
