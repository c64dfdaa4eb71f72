"""``cspace search`` and ``cspace experiment scaling``: inference-time search on one NFE budget.

``register(subparsers)`` adds both commands to the ``cspace`` parser.

* ``cspace search --problem toy --algo ALGO --budget NFE``: one search on the exact toy
  (:func:`cspace.toy.toy_with_coverage`), scored against exact truth: the verifier's mean score,
  the hit rate (share of returned samples inside an obstacle), the energy distance to exact
  samples of the obstacle-free target (rejection sampling of the exact mixture) beside the floor
  that two exact sets of the same size show, and the diversity (mean pairwise distance) of what is
  returned.
* ``cspace experiment scaling``: every algorithm at budgets on a log scale (multiples of one
  sample's NFE), over several seeds; writes ``scaling.csv`` (one row per run),
  ``scaling_summary.csv`` (mean and std over seeds) and ``scaling.png``.

``--budget`` is the total NFE of the call; the budget per returned sample is ``budget / n``.
``--problem digits`` needs the digits models (``cspace/weights/flow_aligned``);
:func:`build_digits_problem` is the hook.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cspace.cli import _positive_int

__all__ = [
    "ALGOS",
    "ScalingSettings",
    "SearchProblem",
    "build_digits_problem",
    "build_toy_problem",
    "diversity",
    "register",
    "run_scaling",
    "run_search",
]

ALGOS = ("best-of-n", "zero-order", "paths", "smc", "smc-guided", "backtrack")
WEIGHTS = Path(__file__).resolve().parent / "weights"


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
    info: dict = dataclasses.field(default_factory=dict)

    def target(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact samples of the obstacle-free target (toy)."""
        return self.mixture.sample_outside(n, self.obstacles, generator)


def build_toy_problem(
    dim: int = 2, coverage: float = 0.75, seed: int = 0, verifier: str = "oracle"
) -> SearchProblem:
    """The exact toy with obstacles covering ``coverage`` of the mass, its field and a verifier
    (``"oracle"``: log p0 outside the obstacles; ``"clearance"``: feasibility, cap 0)."""
    from cspace.toy import toy_with_coverage
    from cspace.toy_experiment import toy_obstacle_set
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
        info={"dim": dim, "coverage": measured, "obstacles": int(balls.radii.numel())},
    )


def build_digits_problem(verifier: str = "judge", device: str = "cpu") -> SearchProblem:
    """The digits problem: the latent flow of the aligned VAE, judged by the digits judge.

    Raises RuntimeError "not available yet" until the digits models exist
    (``cspace/weights/flow_aligned``, ``cspace.flow.load_flow``, ``cspace.judge.Judge``).
    """
    if not (WEIGHTS / "flow_aligned").is_dir():
        raise RuntimeError(
            "--problem digits is not available yet: needs the digits models "
            f"({WEIGHTS / 'flow_aligned'} is missing); use --problem toy"
        )
    try:
        from cspace.encoders import Encoder
        from cspace.flow import load_flow
        from cspace.judge import default_judge
    except ImportError as err:
        raise RuntimeError(
            f"--problem digits is not available yet: needs the digits models ({err})"
        ) from err
    from guidance.search import CallableVerifier

    encoder = Encoder.from_aligned()
    flow = load_flow(WEIGHTS / "flow_aligned").to(device)
    judge = default_judge()
    shape = tuple(flow.latent_shape)

    def velocity(x, t):
        return flow(x.to(device), t.to(device)).to(x)

    def score(x0):
        """log of the judge's top class probability of the decoded digit (confidence)."""
        probs = torch.as_tensor(judge.predict_proba(encoder.decode(x0.float())))
        return torch.log(probs.max(dim=1).values.double().clamp(min=1e-300))

    return SearchProblem(
        name="digits",
        velocity=velocity,
        shape=shape,
        verifier=CallableVerifier(score, name="digits-judge"),
        info={"verifier": verifier},
    )


def build_problem(args) -> SearchProblem:
    if args.problem == "toy":
        return build_toy_problem(args.dim, args.coverage, args.seed, args.verifier)
    return build_digits_problem()


def diversity(x: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between distinct returned samples (0 for one sample)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)[:4096]
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    return float(d.sum() / (n * (n - 1)))


def _algo_kwargs(algo: str, problem: SearchProblem) -> dict:
    if algo == "smc":
        # temperature: a collision (the verifier's penalty) costs 10 nats of log-weight
        penalty = getattr(problem.verifier, "collision_penalty", None)
        if penalty is None:
            penalty = -getattr(problem.verifier, "inside_score", -10.0)
        return {"lam": 10.0 / max(float(penalty), 1e-12)}
    if algo == "smc-guided":
        return {"field": problem.field, "data_scale": problem.data_scale}
    if algo == "backtrack":
        return {"field": problem.field, "revert": 10, "max_retries": 20}
    return {}


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
    from cspace.metrics import energy_distance
    from guidance.search import ALGORITHMS

    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    gen = torch.Generator().manual_seed(int(seed) + 1)
    t0 = time.perf_counter()
    res = ALGORITHMS[algo](
        problem.velocity,
        problem.shape,
        problem.verifier,
        int(budget),
        n_return=n,
        steps=steps,
        generator=gen,
        **_algo_kwargs(algo, problem),
    )
    secs = time.perf_counter() - t0
    out = {
        "algo": algo,
        "n": int(res.samples.shape[0]),
        "steps": steps,
        "budget": int(budget),
        "nfe": int(res.nfe),
        "nfe_per_sample": res.nfe_per_sample,
        "score": float(res.scores.mean()),
        "diversity": diversity(res.samples),
        "verifier_calls": res.verifier_calls,
        "seconds": secs,
    }
    if problem.obstacles is not None:
        x = res.samples.reshape(res.samples.shape[0], -1)
        out["hit_rate"] = float(problem.obstacles.inside(x).double().mean())
        if target is not None:
            out["energy_distance"] = energy_distance(x, target)
        if target is not None and target2 is not None:
            out["energy_distance_floor"] = energy_distance(target2, target)
    return out


# ---------------------------------------------------------------------- cspace search
def _cmd_search(args: argparse.Namespace) -> int:
    problem = build_problem(args)
    target = target2 = None
    if problem.mixture is not None:
        g = torch.Generator().manual_seed(10_000 + args.seed)
        target, target2 = problem.target(args.n, g), problem.target(args.n, g)
    rep = run_search(
        problem, args.algo, args.budget, args.n, args.steps, args.seed, target, target2
    )
    rep.update({"problem": problem.name, "verifier": args.verifier, **problem.info})
    if args.json:
        print(json.dumps(rep))
        return 0
    for key, val in rep.items():
        print(f"{key:>22}: {val:.6g}" if isinstance(val, float) else f"{key:>22}: {val}")
    return 0


# ---------------------------------------------------------------------- experiment scaling
@dataclass
class ScalingSettings:
    """Settings of ``cspace experiment scaling`` (``quick()`` for the tests)."""

    dim: int = 2
    coverage: float = 0.75
    verifier: str = "oracle"
    n: int = 256
    steps: int = 50
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # budget per sample / steps
    seeds: int = 3
    algos: tuple[str, ...] = ALGOS

    @classmethod
    def quick(cls, **kw) -> ScalingSettings:
        base = {"n": 32, "steps": 10, "multiples": (2, 8, 32), "seeds": 3}
        base.update(kw)
        return cls(**base)


METRICS = ("nfe_per_sample", "score", "hit_rate", "energy_distance", "diversity")


def run_scaling(s: ScalingSettings, out_dir: str | Path, log=print) -> dict:
    """Run the scaling experiment; writes the CSVs and the PNG into ``out_dir``."""
    from guidance.search import BudgetExceeded

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problem = build_toy_problem(s.dim, s.coverage, 0, s.verifier)
    rows = []
    t_start = time.perf_counter()
    for seed in range(s.seeds):
        g = torch.Generator().manual_seed(10_000 + seed)
        target, target2 = problem.target(s.n, g), problem.target(s.n, g)
        from cspace.metrics import energy_distance

        exact = {
            "algo": "exact",
            "seed": seed,
            "multiple": math.nan,
            "budget": math.nan,
            "n": s.n,
            "steps": s.steps,
            "nfe": math.nan,
            "nfe_per_sample": s.steps / (1 - problem.coverage),
            "score": float(problem.verifier.score(target2).mean()),
            "hit_rate": 0.0,
            "energy_distance": energy_distance(target2, target),
            "energy_distance_floor": energy_distance(target2, target),
            "diversity": diversity(target2),
            "verifier_calls": 0,
            "seconds": 0.0,
            "status": "rejection sampling (exact)",
        }
        rows.append(exact)
        for algo in s.algos:
            for mult in s.multiples:
                budget = int(mult) * s.steps * s.n
                row = {"algo": algo, "seed": seed, "multiple": mult, "status": "ok"}
                try:
                    rep = run_search(problem, algo, budget, s.n, s.steps, seed, target, target2)
                except BudgetExceeded as err:
                    row.update({"budget": budget, "n": s.n, "steps": s.steps})
                    row.update({k: math.nan for k in (*METRICS, "nfe", "energy_distance_floor")})
                    row.update({"verifier_calls": 0, "seconds": 0.0, "status": f"skipped: {err}"})
                    rows.append(row)
                    continue
                row.update(rep)
                rows.append(row)
        log(f"seed {seed} done ({time.perf_counter() - t_start:.1f} s)")
    fields = [
        "algo",
        "seed",
        "multiple",
        "budget",
        "n",
        "steps",
        "nfe",
        "nfe_per_sample",
        "score",
        "hit_rate",
        "energy_distance",
        "energy_distance_floor",
        "diversity",
        "verifier_calls",
        "seconds",
        "status",
    ]
    csv_path = out / "scaling.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows)
    sum_path = out / "scaling_summary.csv"
    with sum_path.open("w", newline="") as f:
        keys = list(summary[0])
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(summary)
    png = out / "scaling.png"
    plot_scaling(summary, png, title=_title(s, problem))
    return {
        "csv": str(csv_path),
        "summary_csv": str(sum_path),
        "png": str(png),
        "rows": len(rows),
        "seconds": time.perf_counter() - t_start,
        "coverage": problem.coverage,
        "summary": summary,
    }


def _title(s: ScalingSettings, problem: SearchProblem) -> str:
    return (
        f"toy d={s.dim}, coverage {problem.coverage:.2f}, verifier {s.verifier}, "
        f"n={s.n}, steps={s.steps}, {s.seeds} seeds"
    )


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (algo, multiple); skipped runs left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not str(r.get("status", "ok")).startswith(("ok", "rejection")):
            continue
        groups.setdefault((r["algo"], r["multiple"]), []).append(r)
    out = []
    for (algo, mult), rs in groups.items():
        rec = {"algo": algo, "multiple": mult, "seeds": len(rs)}
        for m in (*METRICS, "energy_distance_floor"):
            vals = [float(r[m]) for r in rs if not math.isnan(float(r[m]))]
            rec[f"{m}_mean"] = statistics.fmean(vals) if vals else math.nan
            rec[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(rec)
    return out


def plot_scaling(summary: list[dict], path: str | Path, title: str = "") -> None:
    """Score, hit rate, energy distance and diversity against NFE per sample (mean +- std)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [
        ("score", "verifier score (mean)", False),
        ("hit_rate", "hit rate", False),
        ("energy_distance", "energy distance to exact target", True),
        ("diversity", "diversity (mean pairwise distance)", False),
    ]
    algos = [a for a in dict.fromkeys(r["algo"] for r in summary) if a != "exact"]
    exact = [r for r in summary if r["algo"] == "exact"]
    for ax, (m, label, logy) in zip(axes.flat, panels, strict=True):
        for a in algos:
            rs = sorted((r for r in summary if r["algo"] == a), key=lambda r: r["multiple"])
            xs = [r["nfe_per_sample_mean"] for r in rs]
            ys = [r[f"{m}_mean"] for r in rs]
            es = [r[f"{m}_std"] for r in rs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=a)
        if exact:
            ax.axhline(exact[0][f"{m}_mean"], color="k", ls="--", lw=1, label="exact (rejection)")
            ax.axvline(exact[0]["nfe_per_sample_mean"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("NFE per returned sample")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _cmd_scaling(args: argparse.Namespace) -> int:
    if args.problem != "toy":
        build_digits_problem()  # raises "not available yet" until the digits models exist
        raise RuntimeError("experiment scaling runs on --problem toy only for now")
    kw = {"dim": args.dim, "coverage": args.coverage, "seeds": args.seeds}
    kw["verifier"] = args.verifier
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


def format_summary(summary: list[dict]) -> str:
    head = (
        f"{'algo':<11} {'x steps':>7} {'NFE/sample':>10} {'score':>16} {'hit rate':>15} "
        f"{'energy dist':>17} {'diversity':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(summary, key=lambda r: (r["algo"], r["nfe_per_sample_mean"])):

        def ms(m, fmt, r=r):
            return f"{r[f'{m}_mean']:{fmt}}+-{r[f'{m}_std']:{fmt}}"

        mult = "-" if r["algo"] == "exact" else f"{r['multiple']:g}"
        lines.append(
            f"{r['algo']:<11} {mult:>7} {r['nfe_per_sample_mean']:>10.1f} {ms('score', '.2f'):>16} "
            f"{ms('hit_rate', '.4f'):>15} {ms('energy_distance', '.4f'):>17} "
            f"{ms('diversity', '.3f'):>15}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- registration
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def _dim(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"the toy needs --dim >= 2, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem", choices=("toy", "digits"), default="toy", help="default toy")
    p.add_argument("--dim", type=_dim, default=2, help="toy dimension (default 2)")
    p.add_argument(
        "--coverage",
        type=_fraction,
        default=0.75,
        help="toy: share of the mass inside obstacles (default 0.75)",
    )
    p.add_argument(
        "--verifier",
        choices=("oracle", "clearance"),
        default="oracle",
        help="toy verifier: exact log p0 outside obstacles, or feasibility (default oracle)",
    )


def register(subparsers) -> None:
    """Add ``search`` and ``experiment`` to the ``cspace`` command's subparsers."""
    p = subparsers.add_parser(
        "search",
        help="inference-time search on an NFE budget",
        description="Run one search algorithm on an NFE budget and score what it returns "
        "against exact truth (toy).",
    )
    p.add_argument("--algo", choices=ALGOS, required=True, help="search algorithm")
    p.add_argument("--budget", type=_positive_int, required=True, help="total NFE of the call")
    p.add_argument("--n", type=_positive_int, default=256, help="samples returned (default 256)")
    p.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
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
    sc.add_argument("--seeds", type=_positive_int, default=3, help="seeds (default 3)")
    sc.add_argument("--n", type=_positive_int, default=None, help="samples returned per run")
    sc.add_argument("--steps", type=_positive_int, default=None, help="sampler steps")
    _common(sc)
    sc.set_defaults(func=_cmd_scaling)
