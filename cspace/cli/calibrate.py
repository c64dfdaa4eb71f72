"""``cspace calibrate``: search Q* and eta of an obstacle set, and write the chosen values into it.

::

    cspace calibrate SET --model toy|digits [--per global|label|obstacle] [--max-hit H]
                     [--trials T] [--budget NFE] [--n N] [--steps S] [--seed S]
                     [--q-star-range LO HI] [--eta-range LO HI] [--avoid-class C]
                     [--out DIR] [--no-write] [--init] [--json]

Models and their objectives (both minimised; see :mod:`guidance.calibrate` and
:mod:`cspace.experiments.calibration`):

* ``--model toy``: the exact 2-D Gaussian mixture of ``cspace toy`` (:func:`cspace.models.toy.default_toy`),
  Euler, strength 1. The obstacles are balls: centre = embedding, radius = the set's hard radius.
  ``hit`` = share of samples inside a ball; ``loss`` = energy distance to exact samples of the
  mixture restricted to the outside of the balls. ``--init`` writes the toy's three obstacles
  (two wide ones on modes, a narrow one between modes; Q* 1.5 x radius, eta 1) to SET first.
* ``--model digits``: the latent flow of the shipped aligned C-space, the demo's sampler (SDE +
  collision backtracking, strength 1: eta carries the strength). ``hit`` = the judge's share of
  ``--avoid-class``; ``loss`` = the largest of (shift of another class's share, drop of judge
  confidence) against unguided samples from the same noises, in points. Build SET with
  ``cspace obstacles build examples/digits/0 --out SET``.

A ``--budget`` below one trial's cost (``n x steps`` NFE) is refused before anything is written
or sampled. Every evaluation uses the same noises (common random numbers). Default ranges: Q* in
[0.5 x min Q*, 3 x max Q*] and eta in [0.01 x min eta, 100 x max eta] of the set's current values.
The chosen values are written into SET (``ObstacleSet.set_parameters`` + atomic ``save``: a new
revision, the old values kept in the manifest's history) unless ``--no-write`` or no trial met
the constraint. The study, the trial table, the result and the front's figure go to ``--out``
(default ``SET-calibration``); running the same command again resumes the study.
"""

from __future__ import annotations

import argparse
import json

from cspace.cli.args import nonneg_float, positive_float, positive_int, seed

__all__ = ["register"]


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from cspace.experiments.calibration import calibrate_set

    wanted = {"toy": "collisions", "digits": "judge"}[args.model]
    if args.verifier not in ("auto", wanted):
        raise ValueError(
            f"--verifier {args.verifier} does not apply to --model {args.model}; use {wanted}"
        )
    report = calibrate_set(
        args.set, args.model, per=args.per, max_hit=args.max_hit, trials=args.trials,
        budget=args.budget, n=args.n, steps=args.steps, seed=args.seed,
        q_star_range=args.q_star_range, eta_range=args.eta_range, avoid_class=args.avoid_class,
        out=args.out, write=not args.no_write, init=args.init,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        c = report["chosen"]
        print(report["message"])
        print(f"Q* = {np.round(c['q_star'], 4).tolist()}\neta = {np.round(c['eta'], 4).tolist()}")
        print(
            f"{report['trials']} trials, {report['nfe']} NFE; front: {len(report['front'])} points"
        )
        print(f"written into {args.set}" if report["written"] else f"{args.set} left unchanged")
        for k, v in report["files"].items():
            print(f"{k}: {v}")
    return 0 if report["feasible"] else 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="search Q* and eta of an obstacle set (Pareto front, chosen point written back)",
        description="Search each obstacle's range Q* and strength eta against avoidance and "
        "fidelity, with Optuna's Gaussian-process sampler (constrained, seeded); resumable; writes the chosen values into "
        "the set. Exit code 3 when no trial meets --max-hit.",
    )
    p.add_argument("set", help="obstacle set folder")
    p.add_argument("--model", choices=("toy", "digits"), required=True, help="flow model")
    p.add_argument(
        "--verifier",
        choices=("auto", "collisions", "judge"),
        default="auto",
        help="avoidance measure: collisions with the balls (toy) or the judge's share of the "
        "avoided class (digits); auto picks the model's (default auto)",
    )
    p.add_argument(
        "--per",
        choices=("global", "label", "obstacle"),
        default="global",
        help="one (Q*, eta) pair for the whole set, one per label, or one per obstacle "
        "(default global)",
    )
    p.add_argument("--max-hit", type=nonneg_float, default=None,
                   help="constraint on hit: 0.01 on the toy, 0.1 x the unguided rate on digits, unless "
                   "given")  # fmt: skip
    p.add_argument("--trials", type=positive_int, default=24, help="trials (default 24)")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="total NFE of all trials; at least one trial's cost, n x steps (the toy's "
                   "default: 512 x 50 = 25,600)")  # fmt: skip
    p.add_argument(
        "--n",
        type=positive_int,
        default=None,
        help="samples per trial: 512 for toy, 1000 for digits",
    )
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument(
        "--seed", type=seed, default=0, help="seed of the noises and of the sampler (default 0)"
    )
    p.add_argument(
        "--q-star-range",
        type=positive_float,
        nargs=2,
        metavar=("LO", "HI"),
        help="range searched for Q* (default: 0.5 x the set's smallest Q* to 3 x its largest; "
        "a resumed study keeps its own)",
    )
    p.add_argument(
        "--eta-range",
        type=positive_float,
        nargs=2,
        metavar=("LO", "HI"),
        help="range searched for eta (default: 0.01 x the set's smallest eta to 100 x its largest; "
        "a resumed study keeps its own)",
    )
    p.add_argument("--avoid-class", type=int, choices=range(10), default=None, metavar="C",
                   help="digits: the class the set stands for, 0..9 (default: from its labels)")  # fmt: skip
    p.add_argument("--out", default=None, help="study folder (default SET-calibration)")
    p.add_argument("--no-write", action="store_true", help="report only; leave SET unchanged")
    p.add_argument("--init", action="store_true", help="toy: write the toy's set to SET first")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (the study folder and the set are written as without it)",
    )
    p.set_defaults(func=_cmd_calibrate)
