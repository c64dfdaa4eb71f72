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
    "REPORTED_RECORDS",
    "TOY_VERIFIERS",
    "SearchProblem",
    "algos_for",
    "build_digits_problem",
    "build_problem",
    "build_toy_problem",
    "check_applies",
    "check_options",
    "exact_targets",
    "run_search",
    "run_search_blocks",
    "save_run",
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
    (``"oracle"``: log p0 outside the obstacles; ``"clearance"``: feasibility, cap 0).

    ``seed`` is the problem's seed (``cspace search --problem-seed``): it picks which modes the
    obstacles cover (:func:`cspace.models.toy.toy_with_coverage`) and seeds the measurement of
    the coverage; the random streams of a search are its own seed's."""
    from cspace.experiments.toy import toy_obstacle_set
    from cspace.models.toy import toy_with_coverage
    from guidance import RepulsiveField
    from guidance.search import ClearanceVerifier, OracleVerifier

    mix, balls, measured = toy_with_coverage(dim, coverage, seed=int(seed))
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
    from cspace.experiments.demo import DemoSettings, demo_obstacles, within_class_scale
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
        data_scale=within_class_scale(encoder),
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
    problem_seed: int = 0,
) -> SearchProblem:
    """The ``"toy"`` or ``"digits"`` problem with ``verifier`` (None: the problem's first, the
    oracle on the toy and the clearance on digits); ``problem_seed`` sets the toy's geometry
    (:func:`build_toy_problem`; the digits problem has none to change)."""
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
        return build_toy_problem(dim, coverage, int(problem_seed), verifier=verifier)
    return build_digits_problem(verifier, avoid_class)


def exact_targets(problem: SearchProblem, n: int, seed: int):
    """Two independent sets of ``n`` exact samples of the toy's obstacle-free target (the
    reference and the floor's second set), from seed ``10_000 + seed``; ``(None, None)`` on
    digits."""
    if problem.mixture is None:
        return None, None
    g = torch.Generator().manual_seed(10_000 + int(seed))
    return problem.target(n, g), problem.target(n, g)


#: the algorithms' own keyword options a user may set (``cspace search`` flags)
USER_OPTIONS = ("method", "shift", "proposal", "threshold", "region")


def check_options(algo: str, options: dict | None) -> dict:
    """The user's algorithm options (``cspace search --method/--time-shift/--proposal/
    --ess-threshold/--pu-region``), checked
    against what ``algo`` accepts; a :class:`ValueError` names the option and the algorithms that
    take it."""
    options = dict(options or {})
    for key in options:
        if key not in USER_OPTIONS:
            raise ValueError(
                f"unknown search option {key!r}; the options a user sets are {USER_OPTIONS}"
            )
        if key not in ALGORITHMS[algo].options:
            takers = sorted(a for a, entry in ALGORITHMS.items() if key in entry.options)
            flag = {"shift": "--time-shift", "threshold": "--ess-threshold",
                    "region": "--pu-region"}.get(key, f"--{key}")  # fmt: skip
            raise ValueError(
                f"{flag} does not apply to --algo {algo}; it applies to {', '.join(takers)}"
            )
    return options


def check_applies(algo: str, problem: SearchProblem | str) -> None:
    """Raise :class:`ValueError` when ``algo`` does not apply to ``problem`` (a problem or its
    name): an algorithm that learns the obstacles' membership from examples of a class
    (rejection-pu) on the toy, whose balls are the exact test (they lie on several modes, not
    one class)."""
    name = problem if isinstance(problem, str) else problem.name
    if not _applies(algo, name):
        raise ValueError(
            f"--algo {algo} learns the obstacles from examples of a class; the toy's balls lie "
            "on several modes and are an exact test: use --algo rejection on the toy, and "
            f"{algo} on --problem digits"
        )


def algos_for(problem: str, algos=None) -> tuple[str, ...]:
    """The algorithms of ``algos`` (default every registered one) that apply to ``problem``
    (``"toy"`` or ``"digits"``; :func:`check_applies`)."""
    names = tuple(ALGORITHMS) if algos is None else tuple(algos)
    return tuple(a for a in names if _applies(a, problem))


def _applies(algo: str, problem: str) -> bool:
    """Whether ``algo`` applies to the problem named ``problem``: one that learns the obstacles'
    membership from examples of a class does not apply to the toy (:func:`check_applies`)."""
    return not (ALGORITHMS[algo].learns_membership and problem == "toy")


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
    reference=None,
    floor: dict | None = None,
    keep: dict | None = None,
    options: dict | None = None,
) -> dict:
    """One search and its report (truth metrics when ``target`` samples are given).

    ``reference`` (a :class:`cspace.experiments.measure.ExactReference` of the toy) adds
    ``energy_distance_ref`` and ``mode_tv`` against it, and ``floor`` (its
    :meth:`~cspace.experiments.measure.ExactReference.floor` at the same n) the floor's mean and
    sd (``floor_energy_distance_mean``/``_sd``, ``floor_mode_tv_mean``/``_sd``). The algorithms'
    own figures listed in :data:`REPORTED_RECORDS` are added under ``records``. When ``keep`` is
    a dict, the returned samples are stored in it under ``"samples"`` (for ``--out``).
    ``options`` are the algorithm's own keyword options chosen by the user (``method``,
    ``shift``, ``proposal``: :func:`check_options`), reported under ``"options"``.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    check_applies(algo, problem)
    options = check_options(algo, options)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    t0 = time.perf_counter()
    res = _search(problem, algo, budget, n, steps, gen, options)
    secs = time.perf_counter() - t0
    out = _report(
        problem, algo, budget, steps, res.samples, res.scores, res.nfe, res.verifier_calls,
        secs, target, target2, reference=reference, floor=floor,
    )  # fmt: skip
    names = REPORTED_RECORDS.get(algo, ())
    if names:
        out["records"] = {k: _plain(res.records[k]) for k in names if k in res.records}
    if options:
        out["options"] = options
    if keep is not None:
        keep["samples"] = res.samples
    return out


def _search(problem: SearchProblem, algo: str, budget: int, n: int, steps: int, gen, options=None):
    return ALGORITHMS[algo](
        problem.velocity,
        problem.shape,
        problem.verifier,
        int(budget),
        n_return=n,
        steps=steps,
        generator=gen,
        **{**_algo_kwargs(algo, problem), **(options or {})},
    )


def _report(
    problem, algo, budget, steps, samples, scores, nfe, verifier_calls, secs, target, target2,
    *, reference=None, floor=None,
) -> dict:  # fmt: skip
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
        if reference is not None:
            sc = reference.score(x)
            out["energy_distance_ref"] = sc["energy_distance_ref"]
            out["mode_tv"] = sc["mode_tv"]
            out["reference_size"] = reference.size
        if floor is not None:
            for key in ("energy_distance", "mode_tv"):
                out[f"floor_{key}_mean"] = floor[key]["mean"]
                out[f"floor_{key}_sd"] = floor[key]["sd"]
            out["floor_draws"] = floor["energy_distance"]["n"]
    return out


#: the records of each algorithm that ``run_search`` reports (numbers and names only)
REPORTED_RECORDS = {
    "rejection": ("draws", "accepted", "acceptance", "inside_estimate", "nfe_needed",
                  "shortfall", "rounds"),
    "rejection-pu": ("draws", "accepted", "acceptance", "inside_estimate", "nfe_needed",
                     "shortfall", "rounds", "c", "example_recall", "examples", "first_inside",
                     "region"),
    "twisted-smc": ("n_particles", "groups", "resamplings", "mass_inside", "free_fraction",
                    "unique", "proposal"),
    "auto": ("choice", "inside_estimate", "inside_interval", "pilot", "pilot_nfe"),
    "negation": ("inside",),
    "safety-filter": ("inside",),
}  # fmt: skip


def _plain(value):
    """A record as JSON: numbers, strings and tuples of numbers."""
    if isinstance(value, tuple | list):
        return [float(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def save_run(out_dir, report: dict, samples: torch.Tensor) -> dict:
    """Write ``samples.safetensors`` (key ``samples``, float64, (n, ...)) and ``report.json`` into
    ``out_dir``, each through a temporary file and ``os.replace``; the report is written last
    and names the samples' SHA-256, so a folder with a report holds the samples it describes.
    Returns the paths."""
    from pathlib import Path

    from cspace.io.files import save_safetensors_atomic, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_safetensors_atomic(
        out / "samples.safetensors", {"samples": samples.detach().double().contiguous()}
    )
    write_json_atomic(out / "report.json", {**report, "samples_sha256": sha})
    return {"samples": str(out / "samples.safetensors"), "report": str(out / "report.json")}


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
    reference=None,
    floor: dict | None = None,
    keep: dict | None = None,
    options: dict | None = None,
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
    rank's wall time. ``reference``, ``floor``, ``keep`` and ``options`` as in
    :func:`run_search` (the algorithms' own ``records`` are per block and not reported).
    """
    from guidance.distributed import all_gather_cat, all_reduce, check_same, check_world, current
    from guidance.distributed.search import block_seed, split_blocks

    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    check_applies(algo, problem)
    options = check_options(algo, options)
    g = current(group)
    check_world(int(n), "samples", g, "start at most --samples processes")
    ranges = split_blocks(n, blocks)
    check_same(
        dict(problem=problem.name, info=problem.info, algo=algo, budget=int(budget), n=int(n),
             steps=int(steps), seed=int(seed), blocks=int(blocks), options=options),
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
            problem, algo, int(budget) * (stop - start) // int(n), stop - start, steps, gen,
            options,
        )  # fmt: skip
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
        target, target2, reference=reference, floor=floor,
    )  # fmt: skip
    rep.update(blocks=int(blocks), ranks=g.world)
    if options:
        rep["options"] = options
    if keep is not None:
        keep["samples"] = samples
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
    problem_seed: int = 0,
    reference: int = 0,
    floor_draws: int = 20,
    blocks: int | None = None,
    out: str | None = None,
    say=None,
    options: dict | None = None,
) -> tuple[dict, bool]:
    """``cspace search``: one process, or every rank of a ``torchrun`` job (joined here, with
    the group's timeout). Runs :func:`run_search`, or :func:`run_search_blocks` when ``blocks``
    is given or the job has several ranks (default ``blocks`` = the number of ranks).

    ``reference`` > 0 (toy only) also scores against that many exact samples and reports the
    floor over ``floor_draws`` exact n-sets (:class:`~cspace.experiments.measure.ExactReference`,
    seeded by ``problem_seed``). Rank 0 writes ``out/samples.safetensors`` and
    ``out/report.json`` (:func:`save_run`) after every rank finished; ``say`` (rank 0 only) is
    called with a line for each stage. Returns the report and whether this process is rank 0
    (the one that prints). ``options``: the algorithm's own options (:func:`run_search`),
    checked before anything is built."""
    from cspace.experiments.measure import ExactReference
    from guidance.distributed import barrier, init_from_env

    if reference and problem_name != "toy":
        raise ValueError("--reference needs exact truth: use it with --problem toy")
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    check_applies(algo, problem_name)
    options = check_options(algo, options)
    g = init_from_env()
    tell = say if (say is not None and g.rank == 0) else (lambda message: None)
    tell(f"building the {problem_name} problem (models, obstacles, verifier)")
    problem = build_problem(
        problem_name,
        verifier,
        dim=dim,
        coverage=coverage,
        avoid_class=avoid_class,
        problem_seed=problem_seed,
    )
    if problem_name == "toy":
        tell(f"drawing 2 x {n} exact samples of the target (rejection sampling)")
    target, target2 = exact_targets(problem, n, seed)
    ref = floor = None
    if reference:
        tell(f"drawing {reference:,} exact reference samples and {floor_draws} floor sets")
        ref = ExactReference.build(problem, reference, seed=problem_seed)
        floor = ref.floor(n, floor_draws, seed=problem_seed)
    tell(f"searching: {algo}, {budget:,} NFE for {n} samples")
    keep: dict = {}
    if blocks is None and g.world == 1:
        rep = run_search(
            problem, algo, budget, n, steps, seed, target, target2,
            reference=ref, floor=floor, keep=keep, options=options,
        )  # fmt: skip
    else:
        rep = run_search_blocks(
            problem, algo, budget, n, steps, seed, blocks or g.world, target, target2, g,
            reference=ref, floor=floor, keep=keep, options=options,
        )  # fmt: skip
    rep.update({"problem": problem.name, **problem.info})
    if problem_seed:
        rep["problem_seed"] = problem_seed
    barrier(g, "the barrier before writing the outputs")
    if out is not None and g.rank == 0:
        rep["files"] = save_run(out, rep, keep["samples"])
    return rep, g.rank == 0
