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

Every evaluation uses the same noises (common random numbers). Default ranges: Q* in
[0.5 x min Q*, 3 x max Q*] and eta in [0.01 x min eta, 100 x max eta] of the set's current values.
The chosen values are written into SET (``ObstacleSet.set_parameters`` + atomic ``save``: a new
revision, the old values kept in the manifest's history) unless ``--no-write`` or no trial met
the constraint. The study, the trial table, the result and the front's figure go to ``--out``
(default ``SET-calibration``); running the same command again resumes the study.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cspace.cli.args import nonneg_float, positive_float, positive_int

__all__ = ["register"]


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    for where in (path, parent):
        if not os.access(where, os.W_OK):
            raise PermissionError(
                f"no write permission for {where}: calibrate writes the chosen values into the "
                "set (a new revision, saved atomically next to it); pass --no-write to only "
                "report them, or copy the set somewhere writable"
            )


def _avoid_class(args, oset) -> int:
    if args.avoid_class is not None:
        return args.avoid_class
    labels = set(oset.labels)
    digits_ = {lab.removeprefix("digit-") for lab in labels}
    if len(digits_) == 1 and (c := digits_.pop()).isdigit() and 0 <= int(c) <= 9:
        return int(c)
    raise ValueError(
        f"cannot tell the avoided class from the set's labels {sorted(labels)[:5]}; pass "
        "--avoid-class C"
    )


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from cspace.experiments.calibration import digits_evaluator, toy_evaluator, toy_set
    from guidance.calibrate import CalibrationSettings, calibrate
    from obstacles import ObstacleSet, is_obstacle_set

    path = Path(args.set)
    wanted = {"toy": "collisions", "digits": "judge"}[args.model]
    if args.verifier not in ("auto", wanted):
        raise ValueError(
            f"--verifier {args.verifier} does not apply to --model {args.model}; use {wanted}"
        )
    if args.init:
        if args.model != "toy":
            raise ValueError("--init writes the toy's obstacle set; it needs --model toy")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists; --init only writes a new set")
        toy_set().save(path)
    if not is_obstacle_set(path):
        hint = (
            f"`cspace calibrate {path} --model toy --init` writes the toy's set"
            if args.model == "toy"
            else f"build one with `cspace obstacles build examples/digits/0 --out {path}`"
        )
        raise FileNotFoundError(f"{path} is not an obstacle set; {hint}")
    oset = ObstacleSet.load(path)
    if not args.no_write:
        _check_writable(path)
    out = Path(args.out) if args.out else path.with_name(path.name + "-calibration")
    # default ranges from the set's values; when resuming after a write-back, those of the study
    prev = out / "calibration.json"
    stored = json.loads(prev.read_text()).get("settings", {}) if prev.is_file() else {}
    q_default = stored.get("q_star_range") or (0.5 * oset.q_star.min(), 3 * oset.q_star.max())
    eta_lo = 0.01 * oset.eta.min() if oset.eta.min() > 0 else 1e-3
    e_default = stored.get("eta_range") or (eta_lo, 100 * max(oset.eta.max(), eta_lo))
    q_range = tuple(float(v) for v in (args.q_star_range or q_default))
    e_range = tuple(float(v) for v in (args.eta_range or e_default))
    if args.model == "toy":
        evaluate = toy_evaluator(n=args.n or 512, steps=args.steps, seed=args.seed)
        max_hit = 0.01 if args.max_hit is None else args.max_hit
        tag = "toy"
    else:
        c = _avoid_class(args, oset)
        evaluate = digits_evaluator(c, n=args.n or 1000, steps=args.steps, seed=args.seed)
        # default: the demo's target, <= 10% of the unguided rate of the avoided class
        max_hit = 0.1 * evaluate.unguided_rate if args.max_hit is None else args.max_hit
        tag = f"digits, avoid {c}"
    settings = CalibrationSettings(
        per=args.per,
        q_star_range=q_range,
        eta_range=e_range,
        max_hit=max_hit,
        trials=args.trials,
        budget=args.budget,
        seed=args.seed,
    )
    res = calibrate(oset, evaluate, settings, out, tag=f"{tag}, n={args.n}, steps={args.steps}")
    written = False
    if res.feasible and not args.no_write:
        oset.set_parameters(
            q_star=np.asarray(res.chosen["q_star"]),
            eta=np.asarray(res.chosen["eta"]),
            note=f"cspace calibrate ({tag}, per {args.per}): trial {res.chosen['number']}, "
            f"hit {res.chosen['hit']:.4g}, loss {res.chosen['loss']:.4g}",
        )
        oset.save(path)
        written = True
    report = {
        "feasible": res.feasible,
        "message": res.message,
        "chosen": res.chosen,
        "front": [{k: r[k] for k in ("number", "hit", "loss")} for r in res.front],
        "trials": len(res.trials),
        "nfe": res.nfe,
        "written": written,
        "files": res.files,
        "settings": res.settings,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(res.message)
        c = res.chosen
        print(f"Q* = {np.round(c['q_star'], 4).tolist()}\neta = {np.round(c['eta'], 4).tolist()}")
        print(f"{len(res.trials)} trials, {res.nfe} NFE; front: {len(res.front)} points")
        print(f"written into {path}" if written else f"{path} left unchanged")
        for k, v in res.files.items():
            print(f"{k}: {v}")
    return 0 if res.feasible else 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="search Q* and eta of an obstacle set (Pareto front, chosen point written back)",
        description="Search each obstacle's range Q* and strength eta against avoidance and "
        "fidelity, with Optuna's multi-objective TPE; resumable; writes the chosen values into "
        "the set. Exit code 3 when no trial meets --max-hit.",
    )
    p.add_argument("set", help="obstacle set folder")
    p.add_argument("--model", choices=("toy", "digits"), required=True, help="flow model")
    p.add_argument(
        "--verifier",
        choices=("auto", "collisions", "judge"),
        default="auto",
        help="avoidance measure: collisions with the balls (toy) or the judge's share of the "
        "avoided class (digits); auto picks the model's",
    )
    p.add_argument("--per", choices=("global", "label", "obstacle"), default="global")
    p.add_argument("--max-hit", type=nonneg_float, default=None,
                   help="constraint on hit (toy default 0.01; digits default 0.1 x unguided)")  # fmt: skip
    p.add_argument("--trials", type=positive_int, default=24, help="trials (default 24)")
    p.add_argument("--budget", type=positive_int, default=None, help="total NFE of all trials")
    p.add_argument("--n", type=positive_int, default=None, help="samples per trial")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--q-star-range", type=positive_float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--eta-range", type=positive_float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--avoid-class", type=int, choices=range(10), default=None, metavar="C",
                   help="digits: the class the set stands for (default: from its labels)")  # fmt: skip
    p.add_argument("--out", default=None, help="study folder (default SET-calibration)")
    p.add_argument("--no-write", action="store_true", help="report only; leave SET unchanged")
    p.add_argument("--init", action="store_true", help="toy: write the toy's set to SET first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_calibrate)
