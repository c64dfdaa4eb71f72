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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from cspace.demo import DemoSettings, format_report, run_demo

    settings = DemoSettings(
        avoid_class=args.avoid_class,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        device=args.device,
        encoder=args.encoder,
        strength=args.strength,
        classifier_strength=args.classifier_strength,
        q_star_scale=args.q_star_scale,
        backtrack=not args.no_backtrack,
        umap=not args.no_umap,
    )
    report = run_demo(settings, out_dir=args.out)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
        for name, path in report.get("files", {}).items():
            print(f"{name}: {path}")
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

    demo = sub.add_parser(
        "demo",
        help="keep a digit class out of generated digits, from a few example images",
        description="On the embedded digits: build obstacles from the shipped example images of one "
        "class, sample unguided, guided by the obstacle set and guided by a classifier obstacle, and "
        "judge the samples with an independent classifier.",
    )
    demo.add_argument(
        "--class",
        dest="avoid_class",
        type=int,
        default=0,
        choices=range(10),
        metavar="C",
        help="digit class to avoid, 0..9 (default 0)",
    )
    demo.add_argument(
        "--n", type=_positive_int, default=1000, help="samples per arm (default 1000)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default 50)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument(
        "--encoder",
        default="digits",
        choices=("digits", "digits-plain"),
        help="C-space: the aligned VAE (digits) or the same VAE without VF loss (digits-plain)",
    )
    demo.add_argument(
        "--strength",
        type=_nonneg_float,
        default=5.0,
        help="strength of the obstacle-set field (default 5)",
    )
    demo.add_argument(
        "--classifier-strength",
        type=_nonneg_float,
        default=0.3,
        help="strength of the classifier obstacle's field (default 0.3)",
    )
    demo.add_argument(
        "--q-star-scale",
        type=_positive_float,
        default=1.5,
        help="Q* as a multiple of the auto rule, the median k-th-NN distance (default 1.5)",
    )
    demo.add_argument(
        "--no-backtrack",
        action="store_true",
        help="no collision backtracking in the guided arms (the field alone)",
    )
    demo.add_argument("--out", default="cspace-demo", help="output folder (default cspace-demo)")
    demo.add_argument("--no-umap", action="store_true", help="skip the UMAP figure")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(func=_cmd_demo)

    for module in (
        "cspace.cli_obstacles",
        "cspace.cli_search",
        "cspace.cli_train",
        "cspace.cli_calibrate",
        "cspace.cli_sample",
        "cspace.cli_bench",
    ):
        _register(module, sub)
    return parser


def _register(module: str, sub) -> None:
    """Add the subcommands that ``module.register(subparsers)`` defines."""
    import importlib

    importlib.import_module(module).register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"cspace {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
