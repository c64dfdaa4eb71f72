"""The search-scaling experiment: every search algorithm at budgets on a log scale, over seeds.

:func:`run_scaling` runs each algorithm at budgets that are multiples of one sample's NFE
(``multiple x steps x n``), over several seeds, on a :mod:`cspace.experiments.search` problem;
it writes ``scaling.csv`` (one row per run), ``scaling_summary.csv`` (mean and std over seeds)
and ``scaling.png``. On the toy each seed also gets an ``exact`` row (exact rejection sampling of
the obstacle-free target); on digits an ``unguided`` row (plain ODE samples), against which
``class_shift`` (the largest shift of another class's share, points) is measured.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cspace.experiments.search import (
    SearchProblem,
    algos_for,
    build_problem,
    exact_targets,
    run_search,
)
from cspace.io.checks import check_output_folder
from cspace.models.metrics import diversity

__all__ = [
    "METRICS",
    "ScalingSettings",
    "format_summary",
    "plot_scaling",
    "run_scaling",
    "summarise",
]


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
    #: None: every registered algorithm that applies to the problem (search.algos_for)
    algos: tuple[str, ...] | None = None

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
    from guidance.search import BudgetExceeded, SearchError

    out = check_output_folder(out_dir, "the output folder (--out)")
    out.mkdir(parents=True, exist_ok=True)
    problem = build_problem(
        s.problem, s.verifier, dim=s.dim, coverage=s.coverage, avoid_class=s.avoid_class
    )
    rows = []
    t_start = time.perf_counter()
    for seed in range(s.seeds):
        target, target2 = exact_targets(problem, s.n, seed)
        if target is not None:
            rows.append(_exact_row(problem, s, seed, target, target2))
        else:
            rows.append(_unguided_row(problem, s, seed))
        ref = rows[-1].get("class_shares")
        for algo in algos_for(s.problem) if s.algos is None else s.algos:
            for mult in s.multiples:
                budget = int(mult) * s.steps * s.n
                row = {"algo": algo, "seed": seed, "multiple": mult, "status": "ok"}
                try:
                    rep = run_search(problem, algo, budget, s.n, s.steps, seed, target, target2)
                except (BudgetExceeded, SearchError) as err:  # this budget, or this algorithm
                    what = "skipped" if isinstance(err, BudgetExceeded) else "failed"
                    row.update({"budget": budget, "n": s.n, "steps": s.steps})
                    row.update({k: math.nan for k in (*METRICS, "nfe", "energy_distance_floor")})
                    row.update({"verifier_calls": 0, "seconds": 0.0, "status": f"{what}: {err}"})
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
    from cspace.models.metrics import energy_distance

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
        mult = _number(r["multiple"])
        # one key for every "no budget" row: each NaN read back from a CSV is its own object,
        # and NaN != NaN would put every seed's exact row in a group of its own
        key = math.nan if math.isnan(mult) else r["multiple"]
        groups.setdefault((r["algo"], key), []).append(r)
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
