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

``--problem digits`` searches the latent flow of the shipped aligned C-space with the demo's task:
keep digit ``--avoid-class`` (default 0) out, with the demo's obstacle set (40 example images,
:func:`cspace.demo.demo_obstacles`) as the field of ``smc-guided`` and ``backtrack``. Its
verifiers score latents: ``clearance`` (default; the obstacle set's clearance, capped at 0, minus a
penalty inside a hard radius) or ``judge`` (log of the judge's top-class probability of the decoded
digit: a quality search). The truth is the independent pixel-space judge's figures on the decoded
samples: the avoided class's share (``avoided_rate``), the mean ``judge_confidence``, and in the
scaling experiment the largest shift of another class's share against unguided samples
(``class_shift``, points of share).
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
TOY_VERIFIERS = ("oracle", "clearance")
DIGITS_VERIFIERS = ("clearance", "judge")
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
    if not (WEIGHTS / "flow_aligned").is_dir():
        raise RuntimeError(
            "--problem digits needs the digits models "
            f"({WEIGHTS / 'flow_aligned'} is missing); reinstall cspace or use --problem toy"
        )
    if verifier not in DIGITS_VERIFIERS:
        raise ValueError(f"unknown digits verifier {verifier!r}; choose one of {DIGITS_VERIFIERS}")
    from cspace.data import digits
    from cspace.demo import DemoSettings, demo_obstacles
    from cspace.encoders import Encoder
    from cspace.flow import load_flow
    from cspace.judge import default_judge
    from guidance import RepulsiveField
    from guidance.search import CallableVerifier, ClearanceVerifier

    encoder = Encoder.from_aligned()
    flow = load_flow(WEIGHTS / "flow_aligned").to(device)
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


def build_problem(args) -> SearchProblem:
    verifier = _verifier(args)
    if args.problem == "toy":
        return build_toy_problem(args.dim, args.coverage, args.seed, verifier)
    return build_digits_problem(verifier, args.avoid_class)


def _verifier(args) -> str:
    allowed = TOY_VERIFIERS if args.problem == "toy" else DIGITS_VERIFIERS
    verifier = args.verifier or allowed[0]
    if verifier not in allowed:
        raise ValueError(
            f"--verifier {verifier} does not apply to --problem {args.problem}; choose one of "
            f"{allowed}"
        )
    return verifier


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
    if problem.truth is not None:
        out.update(problem.truth(res.samples))
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
    rep.update({"problem": problem.name, **problem.info})
    if args.json:
        print(json.dumps(rep))
        return 0
    for key, val in rep.items():
        if isinstance(val, list):
            val = " ".join(f"{v:.3f}" for v in val)
        print(f"{key:>22}: {val:.6g}" if isinstance(val, float) else f"{key:>22}: {val}")
    return 0


# ---------------------------------------------------------------------- experiment scaling
@dataclass
class ScalingSettings:
    """Settings of ``cspace experiment scaling`` (``quick()`` for the tests)."""

    problem: str = "toy"  # "toy" or "digits"
    dim: int = 2
    coverage: float = 0.75
    verifier: str = "oracle"  # toy: oracle | clearance; digits: clearance | judge
    avoid_class: int = 0  # digits
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


METRICS = (
    "nfe_per_sample",
    "score",
    "hit_rate",
    "energy_distance",
    "diversity",
    "avoided_rate",
    "judge_confidence",
    "class_shift",
)


def run_scaling(s: ScalingSettings, out_dir: str | Path, log=print) -> dict:
    """Run the scaling experiment; writes the CSVs and the PNG into ``out_dir``."""
    from guidance.search import BudgetExceeded

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if s.problem == "toy":
        problem = build_toy_problem(s.dim, s.coverage, 0, s.verifier)
    elif s.problem == "digits":
        problem = build_digits_problem(s.verifier, s.avoid_class)
    else:
        raise ValueError(f"unknown problem {s.problem!r}; choose 'toy' or 'digits'")
    rows = []
    t_start = time.perf_counter()
    for seed in range(s.seeds):
        target = target2 = None
        if problem.mixture is not None:
            g = torch.Generator().manual_seed(10_000 + seed)
            target, target2 = problem.target(s.n, g), problem.target(s.n, g)
            rows.append(_exact_row(problem, s, seed, target, target2))
        else:
            rows.append(_unguided_row(problem, s, seed))
        ref = rows[-1].get("class_shares")
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
                if ref is not None:
                    row["class_shift"] = _class_shift(rep["class_shares"], ref, s.avoid_class)
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
        "avoided_rate",
        "judge_confidence",
        "class_shift",
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


def _exact_row(problem: SearchProblem, s: ScalingSettings, seed: int, target, target2) -> dict:
    """The toy's reference: exact rejection sampling of the obstacle-free target."""
    from cspace.metrics import energy_distance

    return {
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


def _unguided_row(problem: SearchProblem, s: ScalingSettings, seed: int) -> dict:
    """The digits reference: ``n`` unguided ODE samples (``steps`` NFE each, no search)."""
    from guidance import sample

    gen = torch.Generator().manual_seed(20_000 + seed)
    noise = torch.randn((s.n, *problem.shape), generator=gen, dtype=torch.float64)
    t0 = time.perf_counter()
    x = sample(problem.velocity, noise, steps=s.steps, progress=False).samples
    secs = time.perf_counter() - t0
    return {
        "algo": "unguided",
        "seed": seed,
        "multiple": 1,
        "budget": s.n * s.steps,
        "n": s.n,
        "steps": s.steps,
        "nfe": s.n * s.steps,
        "nfe_per_sample": float(s.steps),
        "score": float(problem.verifier.score(x).mean()),
        "diversity": diversity(x),
        **problem.truth(x),
        "class_shift": 0.0,
        "verifier_calls": 0,
        "seconds": secs,
        "status": "reference (unguided, no search)",
    }


def _class_shift(shares, ref, avoid: int) -> float:
    """Largest |share - reference share| over the classes other than ``avoid``, in points."""
    return 100 * max(
        abs(a - b) for k, (a, b) in enumerate(zip(shares, ref, strict=True)) if k != avoid
    )


def _title(s: ScalingSettings, problem: SearchProblem) -> str:
    if s.problem == "digits":
        return (
            f"digits (aligned C-space, avoid class {s.avoid_class}), verifier {s.verifier}, "
            f"n={s.n}, steps={s.steps}, {s.seeds} seeds"
        )
    return (
        f"toy d={s.dim}, coverage {problem.coverage:.2f}, verifier {s.verifier}, "
        f"n={s.n}, steps={s.steps}, {s.seeds} seeds"
    )


def _number(v) -> float:
    """A metric from a row or a CSV cell: missing or empty is NaN."""
    return math.nan if v is None or v == "" else float(v)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (algo, multiple); skipped runs left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not str(r.get("status", "ok")).startswith(("ok", "rejection", "reference")):
            continue
        groups.setdefault((r["algo"], r["multiple"]), []).append(r)
    out = []
    for (algo, mult), rs in groups.items():
        rec = {"algo": algo, "multiple": mult, "seeds": len(rs)}
        for m in (*METRICS, "energy_distance_floor"):
            vals = [_number(r.get(m)) for r in rs]
            vals = [v for v in vals if not math.isnan(v)]
            rec[f"{m}_mean"] = statistics.fmean(vals) if vals else math.nan
            rec[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(rec)
    return out


def plot_scaling(summary: list[dict], path: str | Path, title: str = "") -> None:
    """Against NFE per sample (mean +- std): score, hit rate, energy distance and diversity on
    the toy; score, avoided rate, class shift and diversity on digits."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    digits_run = any(r["algo"] == "unguided" for r in summary)
    panels = [
        ("score", "verifier score (mean)", False),
        ("hit_rate", "hit rate", False),
        ("energy_distance", "energy distance to exact target", True),
        ("diversity", "diversity (mean pairwise distance)", False),
    ]
    if digits_run:
        panels[1] = ("avoided_rate", "avoided class share (judge)", False)
        panels[2] = ("class_shift", "largest other-class shift vs unguided (points)", False)
    ref_name = "unguided" if digits_run else "exact"
    algos = [a for a in dict.fromkeys(r["algo"] for r in summary) if a != ref_name]
    exact = [r for r in summary if r["algo"] == ref_name]
    for ax, (m, label, logy) in zip(axes.flat, panels, strict=True):
        for a in algos:
            rs = sorted((r for r in summary if r["algo"] == a), key=lambda r: r["multiple"])
            xs = [r["nfe_per_sample_mean"] for r in rs]
            ys = [r[f"{m}_mean"] for r in rs]
            es = [r[f"{m}_std"] for r in rs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=a)
        if exact:
            ref_label = "unguided (no search)" if digits_run else "exact (rejection)"
            ax.axhline(exact[0][f"{m}_mean"], color="k", ls="--", lw=1, label=ref_label)
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


def format_summary(summary: list[dict]) -> str:
    """The summary as a text table (toy or digits columns, from the rows present)."""
    digits_run = any(r["algo"] == "unguided" for r in summary)
    if digits_run:
        cols = [("avoided_rate", "avoided", ".3f"), ("class_shift", "class shift", ".2f")]
        cols.append(("judge_confidence", "judge conf", ".3f"))
    else:
        cols = [("hit_rate", "hit rate", ".4f"), ("energy_distance", "energy dist", ".4f")]
    cols = [("score", "score", ".2f"), *cols, ("diversity", "diversity", ".3f")]
    head = f"{'algo':<11} {'x steps':>7} {'NFE/sample':>10} " + " ".join(
        f"{name:>17}" for _, name, _ in cols
    )
    lines = [head, "-" * len(head)]
    for r in sorted(summary, key=lambda r: (r["algo"], r["nfe_per_sample_mean"])):

        def ms(m, fmt, r=r):
            return f"{r[f'{m}_mean']:{fmt}}+-{r[f'{m}_std']:{fmt}}"

        mult = "-" if r["algo"] in ("exact", "unguided") else f"{r['multiple']:g}"
        lines.append(
            f"{r['algo']:<11} {mult:>7} {r['nfe_per_sample_mean']:>10.1f} "
            + " ".join(f"{ms(m, fmt):>17}" for m, _, fmt in cols)
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
        help="digits: the class kept out by the obstacle set (default 0)",
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
