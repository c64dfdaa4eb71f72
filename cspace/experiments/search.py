"""Search problems with exact truth, and one search run scored against it.

* :func:`build_toy_problem`: the exact Gaussian-mixture toy
  (:func:`cspace.models.toy.toy_with_coverage`) with ball obstacles covering a share of the mass,
  their field and a verifier; the truth is exact: the hit rate (share of returned samples inside an
  obstacle) and the energy distance to exact samples of the obstacle-free target (rejection
  sampling of the exact mixture) beside the floor that two exact sets of the same size show.
* :func:`build_digits_problem`: the latent flow of the shipped aligned C-space with the demo's
  task: keep digit ``avoid_class`` out, with the demo's obstacle set
  (:func:`cspace.experiments.demo.demo_obstacles`) as the field of ``smc-guided`` and
  ``backtrack``. Its verifiers score latents: ``clearance`` (the obstacle set's clearance, capped
  at 0, minus a penalty inside a hard radius) or ``judge`` (log of the judge's top-class
  probability of the decoded digit: a quality search). The truth is the independent pixel-space
  judge's figures on the decoded samples: the avoided class's share (``avoided_rate``) and the
  mean ``judge_confidence``.
* :func:`run_search`: one algorithm of :data:`guidance.search.ALGORITHMS` on a total NFE budget
  (the budget per returned sample is ``budget / n``), and its report;
  :func:`run_search_blocks`: the same split into independent blocks shared among the ranks of a
  ``torchrun`` job (data-parallel search).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from cspace.io.errors import MissingWeightsError
from cspace.models.metrics import diversity, energy_distance
from cspace.models.shipped import shipped
from guidance.search import ALGORITHMS

__all__ = [
    "ALGOS",
    "DIGITS_VERIFIERS",
    "TOY_VERIFIERS",
    "SearchProblem",
    "build_digits_problem",
    "build_problem",
    "build_toy_problem",
    "exact_targets",
    "run_search",
    "run_search_blocks",
    "search_job",
]

ALGOS = tuple(ALGORITHMS)
TOY_VERIFIERS = ("oracle", "clearance")
DIGITS_VERIFIERS = ("clearance", "judge")


@dataclass
class SearchProblem:
    """What a search needs, and the truth to score it against (toy only)."""

    name: str
    velocity: object
    shape: tuple[int, ...]
    verifier: object
    field: object = None
    data_scale: float = 1.0
    mixture: object = None
    obstacles: object = None
    coverage: float | None = None
    truth: object = None  # digits: x0 (B, ...) -> the judge's figures
    info: dict = dataclasses.field(default_factory=dict)

    def target(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact samples of the obstacle-free target (toy)."""
        return self.mixture.sample_outside(n, self.obstacles, generator)


def build_toy_problem(
    dim: int = 2, coverage: float = 0.75, seed: int = 0, verifier: str = "oracle"
) -> SearchProblem:
    """The exact toy with obstacles covering ``coverage`` of the mass, its field and a verifier
    (``"oracle"``: log p0 outside the obstacles; ``"clearance"``: feasibility, cap 0)."""
    from cspace.experiments.toy import toy_obstacle_set
    from cspace.models.toy import toy_with_coverage
    from guidance import RepulsiveField
    from guidance.search import ClearanceVerifier, OracleVerifier

    mix, balls, measured = toy_with_coverage(dim, coverage, seed=0)
    fld = RepulsiveField(toy_obstacle_set(balls))
    if verifier == "oracle":
        ver = OracleVerifier(mix, balls)
    elif verifier == "clearance":
        ver = ClearanceVerifier(fld)
    else:
        raise ValueError(f"unknown verifier {verifier!r}; choose 'oracle' or 'clearance'")
    return SearchProblem(
        name="toy",
        velocity=mix.velocity,
        shape=(dim,),
        verifier=ver,
        field=fld,
        data_scale=float(mix.stds[0]),
        mixture=mix,
        obstacles=balls,
        coverage=measured,
        info={
            "verifier": verifier,
            "dim": dim,
            "coverage": measured,
            "obstacles": int(balls.radii.numel()),
        },
    )


def build_digits_problem(
    verifier: str = "clearance", avoid_class: int = 0, device: str = "cpu"
) -> SearchProblem:
    """The digits problem (see the module docstring): the aligned C-space's latent flow, the
    demo's obstacle set for ``avoid_class`` and its field, a latent verifier and the judge.

    ``data_scale`` (the guided SMC's local data scale) is the root mean within-class variance
    of the train split's latents, per coordinate.
    """
    if not shipped("flow_aligned").is_dir():
        raise MissingWeightsError(
            "the digits problem needs the digits models "
            f"({shipped('flow_aligned')} is missing); reinstall cspace or use the toy problem"
        )
    if verifier not in DIGITS_VERIFIERS:
        raise ValueError(f"unknown digits verifier {verifier!r}; choose one of {DIGITS_VERIFIERS}")
    from cspace.experiments.demo import DemoSettings, demo_obstacles
    from cspace.models.data import digits
    from cspace.models.encoders import Encoder
    from cspace.models.flow import load_flow
    from cspace.models.judge import default_judge
    from guidance import RepulsiveField
    from guidance.search import CallableVerifier, ClearanceVerifier

    encoder = Encoder.from_aligned()
    flow = load_flow(shipped("flow_aligned")).to(device)
    judge = default_judge()
    shape = tuple(flow.latent_shape)
    oset, _ = demo_obstacles(encoder, DemoSettings(avoid_class=avoid_class))
    fld = RepulsiveField(oset)
    images, labels = digits("train")
    lat = encoder.embed(encoder.encode(images)).double()
    within = torch.stack([lat[labels == c].var(0).mean() for c in labels.unique()]).mean()

    def velocity(x, t):
        return flow(x.to(device), t.to(device)).to(x)

    def confidence(x0):
        """log of the judge's top class probability of the decoded digit."""
        probs = torch.as_tensor(judge.predict_proba(encoder.decode(x0.float())))
        return torch.log(probs.max(dim=1).values.double().clamp(min=1e-300))

    def truth(x0) -> dict:
        rep = judge.report(encoder.decode(x0.float()))
        return {
            "avoided_rate": float(rep["class_shares"][avoid_class]),
            "judge_confidence": float(rep["confidence"]),
            "class_shares": [float(v) for v in rep["class_shares"]],
        }

    if verifier == "clearance":
        ver = ClearanceVerifier(fld)
    else:
        ver = CallableVerifier(confidence, name="digits-judge")
    return SearchProblem(
        name="digits",
        velocity=velocity,
        shape=shape,
        verifier=ver,
        field=fld,
        data_scale=float(within.sqrt()),
        truth=truth,
        info={"verifier": verifier, "avoid_class": avoid_class, "obstacles": len(oset)},
    )


def build_problem(
    problem: str,
    verifier: str | None = None,
    *,
    dim: int = 2,
    coverage: float = 0.75,
    avoid_class: int = 0,
) -> SearchProblem:
    """The ``"toy"`` or ``"digits"`` problem with ``verifier`` (None: the problem's first, the
    oracle on the toy and the clearance on digits)."""
    allowed = {"toy": TOY_VERIFIERS, "digits": DIGITS_VERIFIERS}.get(problem)
    if allowed is None:
        raise ValueError(f"unknown problem {problem!r}; choose 'toy' or 'digits'")
    verifier = verifier or allowed[0]
    if verifier not in allowed:
        raise ValueError(
            f"verifier {verifier!r} does not apply to the {problem} problem; choose one of "
            f"{allowed}"
        )
    if problem == "toy":
        return build_toy_problem(dim, coverage, verifier=verifier)
    return build_digits_problem(verifier, avoid_class)


def exact_targets(problem: SearchProblem, n: int, seed: int):
    """Two independent sets of ``n`` exact samples of the toy's obstacle-free target (the
    reference and the floor's second set), from seed ``10_000 + seed``; ``(None, None)`` on
    digits."""
    if problem.mixture is None:
        return None, None
    g = torch.Generator().manual_seed(10_000 + int(seed))
    return problem.target(n, g), problem.target(n, g)


def _algo_kwargs(algo: str, problem: SearchProblem) -> dict:
    """The problem's settings that ``algo`` takes (the registry entry picks them): the field for
    the algorithms that need it, the guided SMC's data scale, the FK potential's temperature
    (a collision, the verifier's penalty, costs 10 nats of log-weight), backtracking's revert and
    retries."""
    penalty = getattr(problem.verifier, "collision_penalty", None)
    if penalty is None:
        penalty = -getattr(problem.verifier, "inside_score", -10.0)
    return ALGORITHMS[algo].keywords(
        field=problem.field,
        data_scale=problem.data_scale,
        lam=10.0 / max(float(penalty), 1e-12),
        revert=10,
        max_retries=20,
    )


def run_search(
    problem: SearchProblem,
    algo: str,
    budget: int,
    n: int,
    steps: int,
    seed: int,
    target: torch.Tensor | None = None,
    target2: torch.Tensor | None = None,
) -> dict:
    """One search and its report (truth metrics when ``target`` samples are given)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    gen = torch.Generator().manual_seed(int(seed) + 1)
    t0 = time.perf_counter()
    res = _search(problem, algo, budget, n, steps, gen)
    secs = time.perf_counter() - t0
    return _report(
        problem, algo, budget, steps, res.samples, res.scores, res.nfe, res.verifier_calls,
        secs, target, target2,
    )  # fmt: skip


def _search(problem: SearchProblem, algo: str, budget: int, n: int, steps: int, gen):
    return ALGORITHMS[algo](
        problem.velocity,
        problem.shape,
        problem.verifier,
        int(budget),
        n_return=n,
        steps=steps,
        generator=gen,
        **_algo_kwargs(algo, problem),
    )


def _report(
    problem, algo, budget, steps, samples, scores, nfe, verifier_calls, secs, target, target2
) -> dict:
    out = {
        "algo": algo,
        "n": int(samples.shape[0]),
        "steps": steps,
        "budget": int(budget),
        "nfe": int(nfe),
        "nfe_per_sample": nfe / samples.shape[0],
        "score": float(scores.mean()),
        "diversity": diversity(samples),
        "verifier_calls": verifier_calls,
        "seconds": secs,
    }
    if problem.truth is not None:
        out.update(problem.truth(samples))
    if problem.obstacles is not None:
        x = samples.reshape(samples.shape[0], -1)
        out["hit_rate"] = float(problem.obstacles.inside(x).double().mean())
        if target is not None:
            out["energy_distance"] = energy_distance(x, target)
        if target is not None and target2 is not None:
            out["energy_distance_floor"] = energy_distance(target2, target)
    return out


def run_search_blocks(
    problem: SearchProblem,
    algo: str,
    budget: int,
    n: int,
    steps: int,
    seed: int,
    blocks: int,
    target: torch.Tensor | None = None,
    target2: torch.Tensor | None = None,
    group=None,
) -> dict:
    """:func:`run_search` split into ``blocks`` independent blocks of the n returned samples,
    the blocks shared among the ranks of a process group (data-parallel ``cspace search`` under
    ``torchrun``; :mod:`guidance.distributed.search` has the seeding rule).

    Block k returns samples ``[start_k, stop_k)`` (``split_blocks(n, blocks)``) from a search
    on ``budget x n_k // n`` NFE with a generator seeded ``block_seed(seed + 1, k)``; rank r
    runs blocks ``split_blocks(blocks, W)[r]``. The union of the blocks in block order, and so
    the report, is the same for every number of ranks, and with ``blocks=1`` it is
    :func:`run_search`'s. The report (on every rank) adds ``blocks`` and ``ranks``;
    ``nfe`` and ``verifier_calls`` are summed over the blocks, ``seconds`` is the slowest
    rank's wall time.
    """
    from guidance.distributed import all_gather_cat, all_reduce, check_same, check_world, current
    from guidance.distributed.search import block_seed, split_blocks

    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    g = current(group)
    check_world(int(n), "samples", g, "start at most --samples processes")
    ranges = split_blocks(n, blocks)
    check_same(
        dict(problem=problem.name, info=problem.info, algo=algo, budget=int(budget), n=int(n),
             steps=int(steps), seed=int(seed), blocks=int(blocks)),
        "search settings", g,
    )  # fmt: skip
    check_world(len(ranges), "blocks of samples", g, "pass --blocks >= the number of processes")
    first, last = split_blocks(len(ranges), g.world)[g.rank]
    t0 = time.perf_counter()
    samples, scores, counts = [], [], torch.zeros(2, dtype=torch.long)
    for k in range(first, last):
        start, stop = ranges[k]
        gen = torch.Generator().manual_seed(block_seed(int(seed) + 1, k))
        res = _search(
            problem, algo, int(budget) * (stop - start) // int(n), stop - start, steps, gen
        )
        samples.append(res.samples)
        scores.append(res.scores)
        counts += torch.tensor([res.nfe, res.verifier_calls])
    secs = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    samples = all_gather_cat(torch.cat(samples), g, "gathering the samples")
    scores = all_gather_cat(torch.cat(scores), g, "gathering the scores")
    counts = all_reduce(counts, "sum", g, "summing the NFE")
    secs = float(all_reduce(secs, "max", g)[0])
    rep = _report(
        problem, algo, budget, steps, samples, scores, int(counts[0]), int(counts[1]), secs,
        target, target2,
    )  # fmt: skip
    rep.update(blocks=int(blocks), ranks=g.world)
    return rep


def search_job(
    problem_name: str,
    verifier: str,
    algo: str,
    budget: int,
    n: int,
    steps: int,
    seed: int,
    *,
    dim: int = 2,
    coverage: float = 0.75,
    avoid_class: int = 0,
    blocks: int | None = None,
    out: str | None = None,
) -> tuple[dict, bool]:
    """``cspace search``: one process, or every rank of a ``torchrun`` job (joined here, with
    the group's timeout). Runs :func:`run_search`, or :func:`run_search_blocks` when ``blocks``
    is given or the job has several ranks (default ``blocks`` = the number of ranks). Rank 0
    writes the report to ``out`` (JSON, atomically: a temporary file renamed) after every rank
    finished. Returns the report and whether this process is rank 0 (the one that prints)."""
    from cspace.io.files import write_json_atomic
    from guidance.distributed import barrier, init_from_env

    g = init_from_env()
    problem = build_problem(
        problem_name, verifier, dim=dim, coverage=coverage, avoid_class=avoid_class
    )
    target, target2 = exact_targets(problem, n, seed)
    if blocks is None and g.world == 1:
        rep = run_search(problem, algo, budget, n, steps, seed, target, target2)
    else:
        rep = run_search_blocks(
            problem, algo, budget, n, steps, seed, blocks or g.world, target, target2, g
        )
    rep.update({"problem": problem.name, **problem.info})
    barrier(g, "the barrier before writing the report")
    if out is not None and g.rank == 0:
        write_json_atomic(out, rep)
    return rep, g.rank == 0
