"""``cspace demo``: keep a digit class out of generated digits (:mod:`cspace.experiments.demo`)."""

from __future__ import annotations

import argparse
import json
import sys

from cspace.cli.args import nonneg_float, positive_float, positive_int, seed
from cspace.cli.search import PU_REGIONS

__all__ = ["register"]


def _class_arg(value: str) -> int | str:
    """``--class``: a class number 0..9, or (for --data fashion, resolved in :func:`_cmd_demo`)
    a class name such as ``pullover``, ``ankle-boot`` or ``"T-shirt/top"``."""
    if value.strip().lstrip("-").isdigit():
        c = int(value)
        if not 0 <= c <= 9:
            raise argparse.ArgumentTypeError(f"{value!r}: classes are 0..9")
        return c
    return value.strip().lower()


def _resolve_class(value: int | str, data: str) -> int:
    """The class number of ``--class`` for ``--data``: names are Fashion-MNIST's (the example
    folders' names, or Zalando's, any case)."""
    if isinstance(value, int):
        return value
    if data != "fashion":
        raise ValueError(f"--class {value!r}: the digits' classes are the numbers 0..9")
    from cspace.models.data import FASHION_CLASSES, FASHION_SLUGS

    for c, names in enumerate(zip(FASHION_SLUGS, FASHION_CLASSES, strict=True)):
        if value in {n.lower() for n in names}:
            return c
    raise ValueError(f"--class {value!r}: not a Fashion-MNIST class; use 0..9 or one of "
                     f"{', '.join(FASHION_SLUGS)}")  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> int:
    from cspace.experiments.demo import format_report, run_demo, settings_for

    if args.umap and args.no_umap:
        raise ValueError("--umap and --no-umap contradict each other; pass one")
    out = args.out
    if out is None and not args.json:
        out = "cspace-demo"  # with --json nothing is written unless --out is given
    if args.umap and out is None:
        raise ValueError("--umap draws a figure: pass --out DIR (with --json nothing is written "
                         "without it)")  # fmt: skip
    settings = settings_for(
        args.data,
        avoid_class=_resolve_class(args.avoid_class, args.data),
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        device=args.device,
        encoder=args.encoder,
        strength=args.strength,
        classifier_strength=args.classifier_strength,
        q_star_scale=args.q_star_scale,
        backtrack=not args.no_backtrack,
        umap=args.umap,
        pu_region=args.pu_region,
    )
    quiet = args.no_progress

    def log(message: str) -> None:
        if not quiet:
            print(f"cspace demo: {message}", file=sys.stderr, flush=True)

    report = run_demo(settings, out_dir=out, obstacles=args.obstacles,
                      classifier=args.classifier, progress=not quiet, log=log,
                      membership_spaces=args.membership)  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
        for name, path in report.get("files", {}).items():
            print(f"{name}: {path}")
    return 0


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="keep a class out of generated digits or clothes, from a few example images",
        description="On the embedded digits (or Fashion-MNIST clothes, --data fashion): build obstacles from the shipped example images of one "
        "class (or take your own set, --obstacles), sample unguided, guided by the obstacle set "
        "and guided by a classifier obstacle (or yours, --classifier); draw with rejection "
        "sampling, twisted SMC (1.5 x the unguided NFE) and the negation denoiser, all three with "
        "the obstacle set alone, and with rejection whose test is a classifier of the examples "
        "against the unguided samples (rejection-pu: positive-unlabelled, no other class's "
        "examples); and judge the samples with an independent classifier. Writes sample grids "
        "and report.json to --out.",
    )
    demo.add_argument(
        "--data",
        default="digits",
        choices=("digits", "fashion"),
        help="the data set: the embedded 8x8 digits, or Fashion-MNIST clothes (28x28, the "
        "shipped pipeline, judge and example images; docs/fashion.md) (default digits)",
    )
    demo.add_argument(
        "--class",
        dest="avoid_class",
        type=_class_arg,
        default=0,
        metavar="C",
        help="class to avoid, 0..9 (digits: the digit; fashion: 0 T-shirt/top, 1 Trouser, "
        "2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot, or "
        "the name: pullover, ankle-boot, ...) (default 0)",
    )
    demo.add_argument(
        "--n",
        type=positive_int,
        default=None,
        help="samples per arm (default 1000 for digits, 300 for fashion)",
    )
    demo.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampler steps (default 50 for digits, 20 for fashion)",
    )
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument(
        "--encoder",
        default=None,
        choices=("digits", "digits-plain", "fashion", "fashion-plain"),
        help="C-space: for digits the aligned VAE (digits) or the same VAE without VF loss "
        "(digits-plain); for --data fashion the aligned VAE and its pipeline (fashion) or the "
        "plain twin and the pipeline trained in its latents (fashion-plain) "
        "(default: the data set's aligned one)",
    )
    demo.add_argument(
        "--obstacles",
        default=None,
        metavar="SET",
        help="your obstacle set (built with `cspace obstacles build IMAGES --out SET`, in the "
        "--encoder's C-space; its Q*, eta and radius as stored) instead of the one built from "
        "the examples of --class",
    )
    demo.add_argument(
        "--classifier",
        default=None,
        metavar="DIR",
        help="your preference classifier (`cspace obstacles classifier`, in the --encoder's "
        "C-space) for the classifier arm, instead of the one trained on the examples (the "
        "rejection-pu arm always fits its own region, from the examples and this run's unguided "
        "samples)",
    )
    demo.add_argument(
        "--strength",
        type=nonneg_float,
        default=5.0,
        help="strength of the obstacle-set field (default 5)",
    )
    demo.add_argument(
        "--classifier-strength",
        type=nonneg_float,
        default=0.3,
        help="strength of the classifier obstacle's field (default 0.3)",
    )
    demo.add_argument(
        "--q-star-scale",
        type=positive_float,
        default=1.5,
        help="Q* as a multiple of the auto rule, the median 5th-nearest-example distance "
        "(default 1.5; not used with --obstacles)",
    )
    demo.add_argument(
        "--no-backtrack",
        action="store_true",
        help="no collision backtracking in the guided arms (the field alone)",
    )
    demo.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: cspace-demo; with --json nothing is written unless --out "
        "is given)",
    )
    demo.add_argument(
        "--umap",
        action="store_true",
        help="also draw the UMAP figure of the C-space with paths (about 15 s more)",
    )
    demo.add_argument(
        "--no-umap",
        action="store_true",
        help="no UMAP figure: the default now (accepted for older scripts)",
    )
    demo.add_argument(
        "--membership",
        action="store_true",
        help="--data fashion: also measure every class's obstacle set (its <= 50 examples) in "
        "the aligned and the plain VAE's C-space: the share of held-out images of the class "
        "inside its hard radius and within Q* (recall) and of the other classes (false "
        "positives); printed and in report.json (about 10 to 30 s more)",
    )
    demo.add_argument(
        "--pu-region",
        choices=PU_REGIONS,
        default="kernel",
        help="the rejection-pu arm's region learnt from the examples against the unguided "
        "samples, where g is a classifier's probability that a sample is one of the examples "
        "and c the examples' mean g: kernel, an RBF kernel classifier, g >= 0.4 c, or linear, "
        "a linear one's half-space, g >= c / 2 (default kernel)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(func=_cmd_demo)
