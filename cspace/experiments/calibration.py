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

import numpy as np
import torch

__all__ = ["digits_evaluator", "toy_evaluator", "toy_set"]


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


def toy_evaluator(n: int = 512, steps: int = 50, seed: int = 0):
    """``evaluate(set) -> {"hit", "loss", "nfe"}`` on the exact 2-D toy (module docstring)."""
    from cspace.models.metrics import energy_distance
    from cspace.models.toy import BallObstacles, default_toy
    from guidance import Guided, RepulsiveField, sample

    mix, _ = default_toy()
    noise = torch.randn(
        (n, mix.dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    targets: dict[bytes, torch.Tensor] = {}

    def evaluate(oset) -> dict:
        if oset.dim != mix.dim:
            raise ValueError(f"--model toy needs a set of dimension {mix.dim}; got {oset.dim}")
        if not np.all(oset.radius > 0):
            raise ValueError("--model toy needs hard radii > 0 (the balls); rebuild with --init")
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

    return evaluate


def digits_evaluator(avoid_class: int, n: int = 1000, steps: int = 50, seed: int = 0):
    """``evaluate(set) -> {"hit", "loss", "nfe", ...}`` on the digits latent flow (module
    docstring); extras: ``avoided_ratio`` (to unguided), ``class_shift`` and ``confidence_drop``
    (points)."""
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
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))

    arm = DemoSettings(steps=steps, seed=seed)  # the demo's sampler: SDE + backtracking

    def run(field=None):
        out = sample_arm(flow, noise, arm, field, strength=1.0)
        rep = judge.report(encoder.decode(out.samples))
        return np.asarray(rep["class_shares"]), float(rep["confidence"]), int(out.nfe)

    base, base_conf, _ = run()

    def evaluate(oset) -> dict:
        if oset.dim != int(np.prod(shape)):
            raise ValueError(
                f"--model digits needs a set built with the digits encoder (d={np.prod(shape)}); "
                f"got d={oset.dim}"
            )
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
    return evaluate
