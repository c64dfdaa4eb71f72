"""``cspace search`` and ``cspace experiment scaling``: argument parsing and printing only.

The problems and the search run are :mod:`cspace.experiments.search`; the scaling experiment is
:mod:`cspace.experiments.scaling`. ``--budget`` is the total NFE of the call; the budget per
returned sample is ``budget / n``.
"""

from __future__ import annotations

import argparse
import json
import sys

from cspace.cli.args import (
    fraction,
    fraction_to_one,
    nonnegative_int,
    positive_float,
    positive_int,
    seed,
    toy_dim,
)

__all__ = ["register"]

# the library's names, kept here so that parsing needs no torch (tests/test_cli.py checks them)
ALGOS = (
    "best-of-n",
    "zero-order",
    "paths",
    "smc",
    "smc-guided",
    "backtrack",
    "rejection",
    "rejection-pu",
    "twisted-smc",
    "negation",
    "safety-filter",
    "auto",
)
TOY_VERIFIERS = ("oracle", "clearance")
DIGITS_VERIFIERS = ("clearance", "judge")
#: guidance.sampling.STEPS and guidance.search.twisted.PROPOSALS
METHODS = ("euler", "heun", "sde", "sde-heun", "dpm-sde")
PROPOSALS = ("model", "field", "negation", "twist")
#: guidance.search.rejection_pu.REGIONS
PU_REGIONS = ("kernel", "linear")


def _options(args: argparse.Namespace) -> dict:
    """The algorithm's own options the user set (none: the algorithm's defaults)."""
    given = {
        "method": args.method,
        "shift": args.time_shift,
        "proposal": args.proposal,
        "threshold": args.ess_threshold,
        "region": args.pu_region,
    }
    return {k: v for k, v in given.items() if v is not None}


def _verifier(args: argparse.Namespace) -> str:
    """``--verifier``, checked against ``--problem`` (default: the problem's first)."""
    allowed = TOY_VERIFIERS if args.problem == "toy" else DIGITS_VERIFIERS
    verifier = args.verifier or allowed[0]
    if verifier not in allowed:
        raise ValueError(
            f"--verifier {verifier} does not apply to --problem {args.problem}; choose one of "
            f"{allowed}"
        )
    return verifier


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(f"cspace search: {message}", file=sys.stderr, flush=True)


def _cmd_search(args: argparse.Namespace) -> int:
    from cspace.io.checks import check_output_folder

    if args.out is not None:
        check_output_folder(args.out, "--out")
    from cspace.experiments.search import search_job

    rep, printer = search_job(
        args.problem, _verifier(args), args.algo, args.budget, args.n, args.steps, args.seed,
        dim=args.dim, coverage=args.coverage, avoid_class=args.avoid_class,
        problem_seed=args.problem_seed, reference=args.reference, floor_draws=args.floor_draws,
        blocks=args.blocks, out=args.out, say=lambda message: _say(args, message),
        options=_options(args),
    )  # fmt: skip
    if not printer:  # under torchrun, rank 0 prints
        return 0
    short = int(args.n) - int(rep.get("n", args.n))
    if short > 0:  # the budget ran out (rejection's draws): say so where it is seen
        print(
            f"cspace search: note: the budget of {args.budget:,} NFE returned {rep['n']} of the "
            f"{args.n} samples asked for ({short} short); raise --budget",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(rep))
        return 0
    for key, val in rep.items():
        if isinstance(val, list):
            val = " ".join(f"{v:.3f}" for v in val)
        print(f"{key:>22}: {val:.6g}" if isinstance(val, float) else f"{key:>22}: {val}")
    return 0


def _cmd_scaling(args: argparse.Namespace) -> int:
    from cspace.experiments.scaling import ScalingSettings, format_summary, run_scaling

    kw = {"problem": args.problem, "dim": args.dim, "coverage": args.coverage}
    kw.update({"seeds": args.seeds, "verifier": _verifier(args), "avoid_class": args.avoid_class})
    if args.n is not None:
        kw["n"] = args.n
    if args.steps is not None:
        kw["steps"] = args.steps
    s = ScalingSettings.quick(**kw) if args.quick else ScalingSettings(**kw)
    rep = run_scaling(s, args.out, log=lambda m: print(m, flush=True))
    print(format_summary(rep["summary"]))
    for k in ("csv", "summary_csv", "png"):
        print(f"{k}: {rep[k]}")
    print(f"seconds: {rep['seconds']:.1f}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--problem",
        choices=("toy", "digits"),
        default="toy",
        help="toy: the exact Gaussian mixture with ball obstacles; digits: the shipped digits flow "
        "avoiding one class (default toy)",
    )
    p.add_argument("--dim", type=toy_dim, default=2, help="toy dimension (default 2)")
    p.add_argument(
        "--coverage",
        type=fraction,
        default=0.75,
        help="toy: share of the mass inside obstacles (default 0.75)",
    )
    p.add_argument(
        "--verifier",
        choices=sorted({*TOY_VERIFIERS, *DIGITS_VERIFIERS}),
        default=None,
        help="toy: oracle (exact log p0 outside obstacles; default) or clearance; digits: "
        "clearance (the obstacle set's; default) or judge (log top-class probability)",
    )
    p.add_argument(
        "--avoid-class",
        type=int,
        choices=range(10),
        default=0,
        metavar="C",
        help="digits: the class kept out by the obstacle set, 0..9 (default 0)",
    )


def register(subparsers) -> None:
    """Add ``search`` and ``experiment`` to the ``cspace`` command's subparsers."""
    p = subparsers.add_parser(
        "search",
        help="inference-time search on an NFE budget",
        description="Run one search algorithm on an NFE budget and score what it returns "
        "against exact truth (toy).",
    )
    p.add_argument(
        "--algo",
        choices=ALGOS,
        required=True,
        help="search algorithm (rejection-pu learns the obstacles from the examples of a class: "
        "--problem digits only)",
    )
    p.add_argument("--budget", type=positive_int, required=True, help="total NFE of the call")
    p.add_argument(
        "--n",
        "--samples",
        dest="n",
        type=positive_int,
        default=256,
        help="samples returned (default 256; under torchrun write --samples: torchrun reads --n "
        "as an abbreviation of its own options)",
    )
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument(
        "--seed", type=seed, default=0, help="seed of the search's random streams (default 0)"
    )
    p.add_argument(
        "--problem-seed",
        type=seed,
        default=0,
        help="toy: seed of the geometry (which modes the obstacles cover) and of the exact "
        "reference (default 0)",
    )
    p.add_argument(
        "--reference",
        type=nonnegative_int,
        default=0,
        metavar="SIZE",
        help="toy: also score against SIZE exact samples (10000 or more separates methods) and "
        "print the floor as mean and sd of --floor-draws exact n-sets (default 0: off)",
    )
    p.add_argument(
        "--floor-draws",
        type=positive_int,
        default=20,
        help="exact n-sets behind the floor with --reference (default 20)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the returned samples (samples.safetensors) and the report (report.json) "
        "into this folder (under torchrun: rank 0; default: write nothing)",
    )
    _common(p)
    p.add_argument(
        "--blocks",
        type=positive_int,
        default=None,
        help="split the n samples into this many independent blocks (block k seeded by the "
        "rule of docs/scaling-out.md); under torchrun the ranks share the blocks (default: one "
        "per rank) and the result does not depend on the number of ranks",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="the sampler's step, for the algorithms that take one (rejection: euler by default; "
        "twisted-smc: sde by default; sde-heun and dpm-sde are second order; default: the "
        "algorithm's own)",
    )
    p.add_argument(
        "--time-shift",
        type=positive_float,
        default=None,
        metavar="S",
        help="shift of the time grid, t = S u / (1 + (S-1) u) as in diffusers (rejection, "
        "twisted-smc; default: the algorithm's own, 1 = uniform)",
    )
    p.add_argument(
        "--proposal",
        choices=PROPOSALS,
        default=None,
        help="twisted-smc's proposal: model, field, negation or twist (TDS's gradient of the "
        "twist; needs --method sde or dpm-sde; default: the algorithm's own, model)",
    )
    p.add_argument(
        "--ess-threshold",
        type=fraction_to_one,
        default=None,
        metavar="F",
        help="resample when the effective sample size falls below F x the particles, F in "
        "(0, 1] (smc, smc-guided, twisted-smc; default: the algorithm's own, 0.5; 0.3 with "
        "--method dpm-sde --proposal twist --time-shift 0.5 is the measured high-coverage "
        "setting, docs/noise-vs-trajectory.md)",
    )
    p.add_argument(
        "--pu-region",
        choices=PU_REGIONS,
        default=None,
        help="rejection-pu's learnt region, where g is a classifier's probability that a draw "
        "is one of the examples and c the examples' mean g: kernel, an RBF kernel classifier, "
        "g >= 0.4 c, or linear, a linear one's half-space, g >= c / 2 (default: the "
        "algorithm's own, kernel)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--no-progress", action="store_true", help="do not say on stderr what it is doing"
    )
    p.set_defaults(func=_cmd_search)

    e = subparsers.add_parser("experiment", help="experiments (scaling)")
    esub = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    esub.required = True
    sc = esub.add_parser(
        "scaling",
        help="every search algorithm at budgets on a log scale, over seeds",
        description="Verifier score, hit rate, energy distance to the exact target and diversity "
        "against NFE per returned sample, for every search algorithm (mean and std over seeds).",
    )
    sc.add_argument("--quick", action="store_true", help="small sizes (< 60 s; for the tests)")
    sc.add_argument(
        "--out", default="cspace-scaling", help="output folder (default cspace-scaling)"
    )
    sc.add_argument("--seeds", type=positive_int, default=3, help="seeds (default 3)")
    sc.add_argument(
        "--n", type=positive_int, default=None,
        help="samples returned per run: 256, or 32 with --quick",
    )  # fmt: skip
    sc.add_argument(
        "--steps", type=positive_int, default=None, help="sampler steps: 50, or 10 with --quick"
    )
    _common(sc)
    sc.set_defaults(func=_cmd_scaling)
