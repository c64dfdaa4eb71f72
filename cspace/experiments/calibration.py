"""The objectives ``cspace calibrate`` searches over: evaluators of an obstacle set on the exact
toy and on the digits latent flow.

Both return ``evaluate(set) -> {"hit", "loss", "nfe", ...}`` (both minimised; see
:mod:`guidance.calibrate`), on the same noises at every call (common random numbers):

* :func:`toy_evaluator`: the exact 2-D Gaussian mixture of ``cspace toy``
  (:func:`cspace.models.toy.default_toy`), Euler, strength 1. The obstacles are balls: centre =
  embedding, radius = the set's hard radius. ``hit`` = share of samples inside a ball; ``loss`` =
  energy distance to exact samples of the mixture restricted to the outside of the balls.
  :func:`toy_set` is the toy's three obstacles (two wide ones on modes, a narrow one between
  modes; Q* 1.5 x radius, eta 1).
* :func:`digits_evaluator`: the latent flow of the shipped aligned C-space, the demo's sampler
  (SDE + collision backtracking, strength 1: eta carries the strength). ``hit`` = the judge's
  share of ``avoid_class``; ``loss`` = the largest of (shift of another class's share, drop of
  judge confidence) against unguided samples from the same noises, in points.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from cspace.io.checks import check_memory, check_output_folder

__all__ = [
    "avoid_class_of",
    "calibrate_set",
    "check_toy_set",
    "digits_evaluator",
    "toy_evaluator",
    "toy_set",
    "trial_nfe",
]


def toy_set():
    """The toy's obstacles as a set: two wide balls on modes 0 and 3, a narrow one between modes
    5 and 6; hard radius = ball radius, Q* = 1.5 x radius, eta = 1 (one pair would not fit both)."""
    from cspace.models.toy import default_toy
    from obstacles import ObstacleSet

    _, balls = default_toy()
    r = balls.radii.double().numpy()
    return ObstacleSet.from_embeddings(
        balls.centers.double().numpy(),
        q_star=1.5 * r,
        eta=1.0,
        radius=r,
        labels=["wide", "wide", "narrow"],
        sources="cspace.models.toy.default_toy",
    )


def check_toy_set(oset) -> None:
    """Raise ValueError unless ``oset`` can stand for balls of the 2-D toy (d = 2, radii > 0)."""
    if oset.dim != 2:
        raise ValueError(f"--model toy needs a set of dimension 2; got {oset.dim}")
    if not np.all(oset.radius > 0):
        raise ValueError("--model toy needs hard radii > 0 (the balls); rebuild with --init")


def _check_digits_set(oset, shape) -> None:
    if oset.dim != int(np.prod(shape)):
        raise ValueError(
            f"--model digits needs a set built with the digits encoder (d={np.prod(shape)}); "
            f"got d={oset.dim}"
        )


def toy_evaluator(n: int = 512, steps: int = 50, seed: int = 0):
    """``evaluate(set) -> {"hit", "loss", "nfe"}`` on the exact 2-D toy (module docstring)."""
    from cspace.models.metrics import energy_distance
    from cspace.models.toy import BallObstacles, default_toy
    from guidance import Guided, RepulsiveField, sample
    from guidance.sampling import time_grid

    mix, _ = default_toy()
    check_memory(8 * int(n) * mix.dim * 8, f"{int(n):,} toy samples per trial", "lower --n")
    time_grid(steps)  # a grid too large for memory is refused now, not in the first trial
    noise = torch.randn(
        (n, mix.dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    targets: dict[bytes, torch.Tensor] = {}

    def evaluate(oset) -> dict:
        check_toy_set(oset)
        balls = BallObstacles(
            torch.as_tensor(oset.embeddings, dtype=torch.float64),
            torch.as_tensor(oset.radius, dtype=torch.float64),
        )
        key = np.concatenate([oset.embeddings.ravel(), oset.radius]).tobytes()
        if key not in targets:
            g = torch.Generator().manual_seed(10_000 + seed)
            targets[key] = mix.sample_outside(n, balls, g)
        guided = Guided(mix.velocity, RepulsiveField(oset), strength=1.0)
        out = sample(guided, noise, steps=steps, progress=False)
        return {
            "hit": float(balls.inside(out.samples).double().mean()),
            "loss": energy_distance(out.samples, targets[key]),
            "nfe": int(out.nfe),
        }

    evaluate.trial_nfe = trial_nfe("toy", n, steps)
    return evaluate


def digits_evaluator(avoid_class: int, n: int = 1000, steps: int = 50, seed: int = 0, oset=None):
    """``evaluate(set) -> {"hit", "loss", "nfe", ...}`` on the digits latent flow (module
    docstring); extras: ``avoided_ratio`` (to unguided), ``class_shift`` and ``confidence_drop``
    (points). ``oset``: a set to check against the digits' C-space before the unguided
    baseline is sampled."""
    from cspace.experiments.demo import DemoSettings, sample_arm
    from cspace.models.encoders import Encoder
    from cspace.models.flow import load_flow
    from cspace.models.judge import default_judge
    from cspace.models.shipped import shipped
    from guidance import RepulsiveField

    if not 0 <= int(avoid_class) <= 9:
        raise ValueError(f"--avoid-class must be a digit 0..9; got {avoid_class}")
    encoder, flow, judge = (
        Encoder.from_aligned(),
        load_flow(shipped("flow_aligned")),
        default_judge(),
    )
    shape = encoder.latent_shape((8, 8))
    if oset is not None:
        _check_digits_set(oset, shape)
    check_memory(
        8 * int(n) * int(np.prod(shape)) * 4, f"{int(n):,} digit samples per trial", "lower --n"
    )
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))

    arm = DemoSettings(steps=steps, seed=seed)  # the demo's sampler: SDE + backtracking

    def run(field=None):
        out = sample_arm(flow, noise, arm, field, strength=1.0)
        rep = judge.report(encoder.decode(out.samples))
        return np.asarray(rep["class_shares"]), float(rep["confidence"]), int(out.nfe)

    base, base_conf, _ = run()

    def evaluate(oset) -> dict:
        _check_digits_set(oset, shape)
        shares, conf, nfe = run(RepulsiveField(oset))
        shift = np.abs(shares - base) * 100
        shift[avoid_class] = 0.0
        drop = 100 * (base_conf - conf)
        return {
            "hit": float(shares[avoid_class]),
            "loss": float(max(shift.max(), drop)),
            "nfe": nfe,
            "avoided_ratio": float(shares[avoid_class] / max(base[avoid_class], 1e-12)),
            "class_shift": float(shift.max()),
            "confidence_drop": float(drop),
            "unguided_rate": float(base[avoid_class]),
        }

    evaluate.unguided_rate = float(base[avoid_class])
    evaluate.trial_nfe = trial_nfe("digits", n, steps)
    return evaluate


#: samples per trial of each model when ``n`` is not given
DEFAULT_N = {"toy": 512, "digits": 1000}


def trial_nfe(model: str, n: int | None, steps: int) -> int:
    """The NFE one trial of ``model`` costs at least: ``n x steps`` (the toy's Euler sampler
    costs exactly that, the field none; the digits' SDE sampler with backtracking at least that,
    plus the retries)."""
    return int(n or DEFAULT_N[model]) * int(steps)


def _check_writable(path: Path) -> None:
    """Raise PermissionError unless the set and its folder are writable."""
    parent = path.parent if str(path.parent) else Path(".")
    for where in (path, parent):
        if not os.access(where, os.W_OK):
            raise PermissionError(
                f"no write permission for {where}: calibrate writes the chosen values into the "
                "set (a new revision, saved atomically next to it); pass --no-write to only "
                "report them, or copy the set somewhere writable"
            )


def avoid_class_of(oset) -> int:
    """The digit class an obstacle set stands for, from its labels (``digit-3`` or ``3``)."""
    labels = set(oset.labels)
    digits_ = {lab.removeprefix("digit-") for lab in labels}
    if len(digits_) == 1 and (c := digits_.pop()).isdigit() and 0 <= int(c) <= 9:
        return int(c)
    raise ValueError(
        f"cannot tell the avoided class from the set's labels {sorted(labels)[:5]}; pass "
        "avoid_class (--avoid-class C)"
    )


def calibrate_set(
    path: str | os.PathLike,
    model: str,
    *,
    per: str = "global",
    max_hit: float | None = None,
    trials: int = 24,
    budget: int | None = None,
    n: int | None = None,
    steps: int = 50,
    seed: int = 0,
    q_star_range: tuple[float, float] | None = None,
    eta_range: tuple[float, float] | None = None,
    avoid_class: int | None = None,
    out: str | os.PathLike | None = None,
    write: bool = True,
    init: bool = False,
) -> dict:
    """``cspace calibrate``: search Q* and eta of the obstacle set at ``path`` against the
    ``model``'s objectives (``"toy"`` or ``"digits"``, module docstring) with
    :func:`guidance.calibrate.calibrate`, and write the chosen values into the set (a new
    revision; the old values stay in its history) unless ``write`` is False or no trial met
    ``max_hit``.

    Defaults: ``max_hit`` 0.01 on the toy and 0.1 x the unguided rate of the avoided class on
    digits; ``n`` 512 (toy) or 1000 (digits); ranges Q* in [0.5 x min Q*, 3 x max Q*] and eta in
    [0.01 x min eta, 100 x max eta] of the set's values, or the stored study's when resuming
    after a write-back; ``avoid_class`` from the set's labels; ``out`` = ``SET-calibration``
    (the study, resumable). ``init`` (toy only) writes the toy's set to ``path`` first.

    Returns the report: ``feasible``, ``message``, ``chosen``, ``front``, ``trials``, ``nfe``,
    ``written``, ``files``, ``settings``.
    """
    from guidance.calibrate import CalibrationSettings, calibrate, check_budget
    from obstacles import ObstacleSet, is_obstacle_set

    if model not in ("toy", "digits"):
        raise ValueError(f"unknown model {model!r}; choose 'toy' or 'digits'")
    # before anything is written or sampled: the budget pays a trial, the study folder can be made
    n_trial = int(n or DEFAULT_N[model])
    check_budget(
        budget,
        trial_nfe(model, n_trial, steps),
        f"{n_trial:,} samples x {int(steps):,} steps"
        + (", plus the retries of backtracking" if model == "digits" else ""),
    )
    path = Path(path)
    out = Path(out) if out else path.with_name(path.name + "-calibration")
    check_output_folder(out, "the study folder (--out)")
    if init:
        if model != "toy":
            raise ValueError("init writes the toy's obstacle set; it needs the toy model")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists; --init only writes a new set")
        check_output_folder(path, "the obstacle set")
        toy_set().save(path)
    if not is_obstacle_set(path):
        hint = (
            f"`cspace calibrate {path} --model toy --init` writes the toy's set"
            if model == "toy"
            else f"build one with `cspace obstacles build examples/digits/0 --out {path}`"
        )
        raise FileNotFoundError(f"{path} is not an obstacle set; {hint}")
    oset = ObstacleSet.load(path)
    if write:
        _check_writable(path)
    # default ranges from the set's values; when resuming after a write-back, those of the study
    prev = out / "calibration.json"
    stored = json.loads(prev.read_text()).get("settings", {}) if prev.is_file() else {}
    q_default = stored.get("q_star_range") or (0.5 * oset.q_star.min(), 3 * oset.q_star.max())
    eta_lo = 0.01 * oset.eta.min() if oset.eta.min() > 0 else 1e-3
    e_default = stored.get("eta_range") or (eta_lo, 100 * max(oset.eta.max(), eta_lo))
    q_range = tuple(float(v) for v in (q_star_range or q_default))
    e_range = tuple(float(v) for v in (eta_range or e_default))
    if max_hit is not None and not 0 <= max_hit <= 1:
        raise ValueError(f"--max-hit is a share of samples in [0, 1]; got {max_hit}")
    if model == "toy":
        check_toy_set(oset)
        evaluate = toy_evaluator(n=n or 512, steps=steps, seed=seed)
        max_hit = 0.01 if max_hit is None else max_hit
        tag = "toy"
    else:
        c = avoid_class_of(oset) if avoid_class is None else int(avoid_class)
        evaluate = digits_evaluator(c, n=n or 1000, steps=steps, seed=seed, oset=oset)
        # default: the demo's target, <= 10% of the unguided rate of the avoided class
        max_hit = 0.1 * evaluate.unguided_rate if max_hit is None else max_hit
        tag = f"digits, avoid {c}"
    settings = CalibrationSettings(
        per=per,
        q_star_range=q_range,
        eta_range=e_range,
        max_hit=max_hit,
        trials=trials,
        budget=budget,
        seed=seed,
    )
    res = calibrate(oset, evaluate, settings, out, tag=f"{tag}, n={n}, steps={steps}")
    written = False
    if res.feasible and write:
        oset.set_parameters(
            q_star=np.asarray(res.chosen["q_star"]),
            eta=np.asarray(res.chosen["eta"]),
            note=f"cspace calibrate ({tag}, per {per}): trial {res.chosen['number']}, "
            f"hit {res.chosen['hit']:.4g}, loss {res.chosen['loss']:.4g}",
        )
        oset.save(path)
        written = True
    return {
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
