r"""Searching each obstacle's strength eta and range Q*: the engine behind ``cspace calibrate``.

The thresholded potential ``U = 1/2 eta (1/D - 1/Q*)^2`` (``D <= Q*``) has two numbers per
obstacle that nothing in its definition fixes. Calibration searches them against two measured objectives, both to minimise:

* **avoidance** ``hit``: what still gets through (the toy: share of samples inside a hard radius;
  digits: the judge's share of the avoided class);
* **fidelity loss** ``loss``: how far the guided samples are from the unguided/target
  distribution on the rest of the space (the toy: energy distance to exact samples of the
  obstacle-free target; digits: the largest shift of another class's share or drop of judge
  confidence, in points).

An *evaluator* maps an :class:`~obstacles.ObstacleSet` (with candidate parameters) to
``{"hit": float, "loss": float, "nfe": int, ...}``; it should use the same noises for every call
(common random numbers), so that trials differ only by their parameters. Parameters are searched
log-uniformly in absolute ranges (Q* raised to each obstacle's hard radius where it falls
below it), with one (Q*, eta) pair for the whole set (``per="global"``),
per label (``"label"``) or per obstacle (``"obstacle"``), by Optuna's Gaussian-process sampler
(``GPSampler``, constrained expected hypervolume improvement) or its multi-objective TPE sampler,
seeded, the current values as the first trial, with the constraint ``hit <= max_hit``.

The chosen point is the feasible trial (``hit <= max_hit``) with the least ``loss``; when no
trial is feasible the result says so and names the closest (least ``hit``). Every trial is kept
in an Optuna journal file (``study.log``: an interrupted run resumes without repeating finished
trials) and in ``trials.csv``; the budget counts NFE (denoiser evaluations) over all trials.
A budget below the cost of one trial (``evaluate.trial_nfe``, e.g. samples x steps) is refused
before anything runs, and no trial is started that the budget left cannot pay.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cspace.io.files import write_file_atomic
from obstacles import ObstacleSet

__all__ = [
    "GROUPINGS",
    "CalibrationError",
    "CalibrationResult",
    "CalibrationSettings",
    "apply_parameters",
    "calibrate",
    "check_budget",
    "group_index",
    "pareto_front",
    "plot_front",
]

GROUPINGS = ("global", "label", "obstacle")
Evaluator = Callable[[ObstacleSet], dict]


class CalibrationError(ValueError):
    """Bad calibration input (ranges, grouping, a resumed run with other settings, ...)."""


@dataclass
class CalibrationSettings:
    """What ``calibrate`` searches and under which constraint.

    Attributes:
        per: ``"global"`` (one pair), ``"label"`` (one pair per label) or ``"obstacle"``.
        q_star_range: (lo, hi), absolute, 0 < lo < hi: Q* is searched log-uniformly in it.
        eta_range: (lo, hi), absolute, 0 < lo < hi: eta is searched log-uniformly in it.
        max_hit: the avoidance constraint, ``hit <= max_hit``.
        trials: number of trials (finished ones of a resumed run count).
        budget: total NFE over all trials (None: no limit); a trial is not started when the
            NFE left are fewer than the largest trial so far needed.
        seed: the sampler's seed.
        sampler: ``"gp"`` (Optuna's GPSampler: Gaussian-process Bayesian optimisation with
            constrained expected hypervolume improvement; few trials) or ``"tpe"``
            (multi-objective TPE; cheaper per trial when trials are many).
    """

    per: str = "global"
    q_star_range: tuple[float, float] = (0.5, 4.0)
    eta_range: tuple[float, float] = (0.01, 100.0)
    max_hit: float = 0.01
    trials: int = 24
    budget: int | None = None
    seed: int = 0
    sampler: str = "gp"

    def check(self) -> None:
        if self.per not in GROUPINGS:
            raise CalibrationError(f"per must be one of {GROUPINGS}; got {self.per!r}")
        for name in ("q_star_range", "eta_range"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not (0 < lo < hi < math.inf):
                raise CalibrationError(f"{name} must be (lo, hi) with 0 < lo < hi; got {lo, hi}")
        if not (math.isfinite(self.max_hit) and self.max_hit >= 0):
            raise CalibrationError(f"max_hit must be a number >= 0; got {self.max_hit}")
        if self.sampler not in ("gp", "tpe"):
            raise CalibrationError(f"sampler must be 'gp' or 'tpe'; got {self.sampler!r}")
        if int(self.trials) < 1:
            raise CalibrationError(f"trials must be >= 1; got {self.trials}")
        if self.budget is not None and int(self.budget) < 1:
            raise CalibrationError(f"budget must be >= 1 NFE; got {self.budget}")


@dataclass
class CalibrationResult:
    """What ``calibrate`` returns (also written to ``out_dir/calibration.json``).

    Attributes:
        feasible: whether some trial met ``hit <= max_hit``.
        chosen: the chosen trial (least loss among feasible ones; else the least hit), a dict
            with ``number``, ``hit``, ``loss``, ``nfe``, ``q_star`` and ``eta`` (N,) lists,
            ``params`` and the evaluator's extras.
        front: the Pareto front (non-dominated trials in (hit, loss)), sorted by hit.
        trials: every finished trial, in order.
        nfe: NFE spent by all finished trials (this run and resumed ones).
        message: a sentence for the user (what was chosen, or why nothing met the constraint).
        files: paths written.
    """

    feasible: bool
    chosen: dict
    front: list[dict]
    trials: list[dict]
    nfe: int
    message: str
    settings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- parameters
def group_index(oset: ObstacleSet, per: str) -> tuple[np.ndarray, list[str]]:
    """Group id (N,) of every obstacle and the group names, for a grouping in ``GROUPINGS``."""
    n = len(oset)
    if per == "global":
        return np.zeros(n, dtype=np.int64), ["all"]
    if per == "obstacle":
        return np.arange(n, dtype=np.int64), [f"obstacle-{int(i)}" for i in oset.ids]
    if per == "label":
        names = list(dict.fromkeys(oset.labels))
        lookup = {name: k for k, name in enumerate(names)}
        return np.array([lookup[lab] for lab in oset.labels], dtype=np.int64), names
    raise CalibrationError(f"per must be one of {GROUPINGS}; got {per!r}")


def _values(params: dict, groups: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    q = np.array([params[f"q_star[{names[g]}]"] for g in groups], dtype=np.float64)
    eta = np.array([params[f"eta[{names[g]}]"] for g in groups], dtype=np.float64)
    return q, eta


def apply_parameters(oset: ObstacleSet, q_star, eta) -> ObstacleSet:
    """A copy of ``oset`` with new Q* and eta ((N,) or numbers); ``oset`` is unchanged.

    Q* is raised to each obstacle's hard radius where it is smaller: a range inside the
    collision radius would let the field act only on states that already collide.
    """
    q = np.maximum(np.broadcast_to(np.asarray(q_star, dtype=np.float64), (len(oset),)), oset.radius)
    return ObstacleSet.from_embeddings(
        oset.embeddings,
        q_star=q,
        eta=eta,
        radius=oset.radius,
        labels=oset.labels,
        sources=oset.sources,
        space=oset.space,
    )


# ---------------------------------------------------------------------- the front
def pareto_front(trials: list[dict]) -> list[dict]:
    """The trials that no other trial beats on both hit and loss (ties kept once), by hit."""
    pts = sorted(trials, key=lambda r: (r["hit"], r["loss"]))
    front, best_loss = [], math.inf
    for r in pts:
        if r["loss"] < best_loss:
            front.append(r)
            best_loss = r["loss"]
    return front


def _choose(trials: list[dict], max_hit: float) -> tuple[bool, dict]:
    feasible = [r for r in trials if r["hit"] <= max_hit]
    if feasible:
        return True, min(feasible, key=lambda r: (r["loss"], r["hit"]))
    return False, min(trials, key=lambda r: (r["hit"], r["loss"]))


# ---------------------------------------------------------------------- files
def _trials_csv(trials: list[dict]) -> str:
    keys = ["number", "hit", "loss", "nfe", "seconds"]
    params = sorted({k for r in trials for k in r["params"]})
    extras = sorted({k for r in trials for k in r.get("extras", {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys + params + extras)
    for r in trials:
        w.writerow(
            [r[k] for k in keys]
            + [r["params"].get(k, "") for k in params]
            + [r.get("extras", {}).get(k, "") for k in extras]
        )
    return buf.getvalue()


def plot_front(result: CalibrationResult, path: str | Path, title: str = "") -> None:
    """Every trial in (hit, loss), the Pareto front, the constraint and the chosen point."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.subplots()
    hits = [r["hit"] for r in result.trials]
    losses = [r["loss"] for r in result.trials]
    ax.scatter(hits, losses, s=18, color="tab:gray", alpha=0.7, label="trials")
    fr = result.front
    ax.plot([r["hit"] for r in fr], [r["loss"] for r in fr], "o-", color="tab:blue", ms=5,
            label="Pareto front")  # fmt: skip
    ax.axvline(result.settings["max_hit"], color="tab:red", ls="--", lw=1, label="max hit")
    c = result.chosen
    ax.scatter([c["hit"]], [c["loss"]], marker="*", s=220, color="tab:orange", edgecolor="black",
               zorder=4, label="chosen" if result.feasible else "closest (infeasible)")  # fmt: skip
    ax.set_xlabel("avoidance: hit rate (lower is better)")
    ax.set_ylabel("fidelity loss (lower is better)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_file_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------- the search
def _fingerprint(oset: ObstacleSet, settings: CalibrationSettings, tag: str) -> str:
    emb = np.ascontiguousarray(oset.embeddings, dtype=np.float64)
    from cspace.io.files import sha256_hex

    s = asdict(settings)
    s.pop("trials")
    s.pop("budget")
    return sha256_hex(emb.tobytes() + json.dumps([s, tag], sort_keys=True).encode())


def check_budget(budget: int | None, trial_nfe: int | None, what: str = "") -> None:
    """Refuse an NFE ``budget`` smaller than one trial's cost ``trial_nfe`` (None: unknown or
    no limit): such a budget would either run a trial it cannot pay or run nothing.

    Raises:
        CalibrationError: naming the budget, the cost of a trial (``what`` says how it is made
            up, e.g. ``"512 samples x 50 steps"``) and the budget that pays one.
    """
    if budget is None or trial_nfe is None:
        return
    if int(budget) < int(trial_nfe):
        how = f" ({what})" if what else ""
        raise CalibrationError(
            f"a budget of {int(budget):,} NFE is less than one trial costs: {int(trial_nfe):,} "
            f"NFE{how}; raise the budget to at least {int(trial_nfe):,} per trial, or lower the "
            "samples or steps per trial"
        )


def calibrate(
    oset: ObstacleSet,
    evaluate: Evaluator,
    settings: CalibrationSettings | None = None,
    out_dir: str | Path | None = None,
    *,
    tag: str = "",
    progress: bool = True,
    trial_nfe: int | None = None,
) -> CalibrationResult:
    """Search Q* and eta for ``oset`` (see the module docstring).

    Args:
        oset: the obstacle set; not modified (see :func:`apply_parameters` to use the result).
        evaluate: ``evaluate(candidate_set) -> {"hit", "loss", "nfe", ...}`` (extras: numbers).
        settings: :class:`CalibrationSettings`.
        out_dir: folder for ``study.log`` (resumable), ``trials.csv``, ``calibration.json``
            and ``front.png``; None keeps the study in memory.
        tag: a string naming the evaluator's problem, part of the resume check.
        progress: a tqdm bar over trials.
        trial_nfe: the NFE one trial costs at least (default: ``evaluate.trial_nfe`` when the
            evaluator has it); a budget below it is refused (:func:`check_budget`), and no
            trial is started that the budget left cannot pay.

    Raises:
        CalibrationError: bad settings, an empty set, or ``out_dir`` holding a study of another
            set or other settings.
    """
    import optuna
    from tqdm import tqdm

    s = settings or CalibrationSettings()
    s.check()
    if trial_nfe is None:
        trial_nfe = getattr(evaluate, "trial_nfe", None)
    check_budget(s.budget, trial_nfe)
    if len(oset) == 0:
        raise CalibrationError("the obstacle set is empty: nothing to calibrate")
    groups, names = group_index(oset, s.per)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own messages say what happened
    out = Path(out_dir) if out_dir is not None else None
    storage = None
    fingerprint = _fingerprint(oset, s, tag)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(out / "study.log")))
    startup = max(4, min(10, s.trials // 4))
    # the constraint hit - max_hit <= 0 is set on each trial (Trial.set_constraint)
    if s.sampler == "gp":
        with warnings.catch_warnings():  # deterministic_objective is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.GPSampler(
                seed=s.seed,
                n_startup_trials=startup,
                deterministic_objective=True,  # common random numbers: a trial is repeatable
            )
    else:
        sampler = optuna.samplers.TPESampler(
            seed=s.seed, multivariate=True, n_startup_trials=startup
        )
    study = optuna.create_study(
        study_name="cspace-calibrate",
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("settings", asdict(s))
    elif old != fingerprint:
        raise CalibrationError(
            f"{out} holds a calibration of another obstacle set or with other settings "
            f"(per, ranges, max_hit, seed, problem); use another --out or remove {out}"
        )
    q_lo, q_hi = (float(v) for v in s.q_star_range)
    e_lo, e_hi = (float(v) for v in s.eta_range)

    def finished() -> list:
        return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]

    if not study.get_trials(deepcopy=False):  # start from the set's own values, when in range
        first = {}
        for g, name in enumerate(names):
            q0 = float(np.median(oset.q_star[groups == g]))
            e0 = float(np.median(oset.eta[groups == g]))
            first[f"q_star[{name}]"] = min(max(q0, q_lo), q_hi)
            first[f"eta[{name}]"] = min(max(e0, e_lo), e_hi)
        study.enqueue_trial(first)

    done = finished()
    spent = sum(int(t.user_attrs["nfe"]) for t in done)
    largest = max((int(t.user_attrs["nfe"]) for t in done), default=int(trial_nfe or 0))
    stopped = ""
    bar = tqdm(total=s.trials, initial=min(len(done), s.trials), desc="calibrate",
               disable=not progress, unit="trial")  # fmt: skip
    while len(done) < s.trials:
        if s.budget is not None and spent + largest > int(s.budget):
            stopped = f"budget: {spent} of {s.budget} NFE spent, a trial needs about {largest}"
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = study.ask()
        params = {}
        for name in names:
            params[f"q_star[{name}]"] = trial.suggest_float(f"q_star[{name}]", q_lo, q_hi, log=True)
            params[f"eta[{name}]"] = trial.suggest_float(f"eta[{name}]", e_lo, e_hi, log=True)
        q, eta = _values(params, groups, names)
        t0 = time.perf_counter()
        try:
            figs = evaluate(apply_parameters(oset, q, eta))
            hit, loss, nfe = float(figs["hit"]), float(figs["loss"]), int(figs["nfe"])
            if not (math.isfinite(hit) and math.isfinite(loss)):
                raise CalibrationError(f"the evaluator returned hit={hit}, loss={loss}")
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        trial.set_constraint("hit", hit - s.max_hit)
        trial.set_user_attr("hit", hit)
        trial.set_user_attr("nfe", nfe)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        extras = {k: float(v) for k, v in figs.items() if k not in ("hit", "loss", "nfe")}
        trial.set_user_attr("extras", extras)
        study.tell(trial, [hit, loss])
        spent += nfe
        largest = max(largest, nfe)
        done = finished()
        bar.update(1)
        bar.set_postfix(hit=f"{hit:.3g}", loss=f"{loss:.3g}", nfe=spent)
        if out is not None:
            write_file_atomic(
                out / "trials.csv", _trials_csv(_records(done, groups, names, oset.radius))
            )
    bar.close()
    records = _records(done, groups, names, oset.radius)
    if not records:
        raise CalibrationError(f"no trial finished ({stopped or 'trials = 0'})")
    ok, chosen = _choose(records, s.max_hit)
    if ok:
        message = (
            f"chosen trial {chosen['number']}: hit {chosen['hit']:.4g} <= {s.max_hit:g} with the "
            f"least fidelity loss {chosen['loss']:.4g} of {len(records)} trials"
        )
    else:
        message = (
            f"no trial met hit <= {s.max_hit:g} (the constraint may be out of reach in these "
            f"ranges); the closest is trial {chosen['number']} with hit {chosen['hit']:.4g}, "
            f"loss {chosen['loss']:.4g}; widen --q-star-range/--eta-range or relax --max-hit"
        )
    if stopped:
        message += f" (stopped early by the {stopped})"
    result = CalibrationResult(
        feasible=ok,
        chosen=chosen,
        front=pareto_front(records),
        trials=records,
        nfe=spent,
        message=message,
        settings=asdict(s),
    )
    if out is not None:
        files = {
            "study": str(out / "study.log"),
            "trials": str(out / "trials.csv"),
            "result": str(out / "calibration.json"),
            "front": str(out / "front.png"),
        }
        result.files = files
        write_file_atomic(out / "trials.csv", _trials_csv(records))
        plot_front(result, out / "front.png", title=f"calibration ({s.per}), {tag}".strip(", "))
        write_file_atomic(out / "calibration.json", json.dumps(asdict(result), indent=1))
    return result


def _records(trials: list, groups: np.ndarray, names: list[str], radius) -> list[dict]:
    out = []
    for t in trials:
        q, eta = _values(t.params, groups, names)
        q = np.maximum(q, radius)  # as apply_parameters
        out.append(
            {
                "number": t.number,
                "hit": float(t.user_attrs["hit"]),
                "loss": float(t.values[1]),
                "nfe": int(t.user_attrs["nfe"]),
                "seconds": float(t.user_attrs.get("seconds", 0.0)),
                "params": dict(t.params),
                "q_star": q.tolist(),
                "eta": eta.tolist(),
                "extras": dict(t.user_attrs.get("extras", {})),
            }
        )
    return out
