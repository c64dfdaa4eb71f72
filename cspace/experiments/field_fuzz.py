r"""A fuzz harness for the fields: random problems at every scale, each evaluation either finite or
a clear ``ValueError``.

::

    python benchmarks/field_fuzz.py --cases 10000 --seed 0      # the full run (a few minutes)

Each case (:func:`make_case`, reproducible from ``(seed, index)`` alone) draws:

* a field kind: ``repulsive`` (:class:`guidance.RepulsiveField`), ``pruned`` (the same with exact
  pruning, ``prune=True`` or a number of clusters), ``classifier``
  (:class:`guidance.ClassifierField`) or ``combined`` (:class:`guidance.CombinedField` of a
  repulsive and a classifier field, with a total cap);
* the states' dtype: float64, float32, bfloat16 or float16 (all run on the CPU reference);
* sizes: N = 1 .. 200 obstacles (N = 1 often), d = 1 .. 10,000 (log-uniform), B = 1 .. 8 states,
  with B N d <= 400,000;
* obstacles at a scale from the float32 subnormals (1e-45) to 1e37, around an offset, with
  duplicated rows or all rows at one point; states on obstacles (exactly), next to them, at
  the origin, at the dtype's extremes (its largest and smallest subnormal values) and at random
  scales from 1e-300 to 1e300 (within the dtype);
* ``Q*`` relative to the obstacles' scale, or anywhere in 1e-300 .. 1.7e308, or subnormal;
  ``eta`` in {0, 1, 1e-315, 5e-324, 1e300, 1.7e308} or log-uniform in 1e-300 .. 1e300; hard
  radii; ``min_distance_ratio`` from 1e-320 to 0.999999; caps ``max_force``/``max_potential``
  from subnormal to 1.7e308;
* a projection (none, a linear map with a gain of 1e-150 .. 1e150, or ``tanh``), states of
  shape (B, d) or (B, 1, d), the noisy mode (``t`` a number, one per state, or exactly 0 or 1)
  and ``need_force`` false now and then.

:func:`run_case` builds the field and evaluates it. The outcome is ``ok`` when every output is
finite with the right shape and dtype, ``U >= 0``, ``|F| <= max_force`` and ``U <= max_potential``
(without a projection, to the output dtype's rounding) and, for ``pruned``, ``active`` and ``U``
equal the unpruned field's; ``error`` when a ``ValueError`` with a message is raised (bad input
named: e.g. embeddings beyond float32, states that overflow their dtype, a projection that
overflows); ``failure`` for anything else: NaN or Inf, a broken bound, another exception type.
:func:`fuzz` runs many cases and reports counts by kind and outcome, the failures, the most
frequent error messages and the slowest case.
"""

from __future__ import annotations

import collections
import datetime
import math
import os
import platform
import time
import traceback

import numpy as np
import torch

__all__ = ["KINDS", "format_report", "fuzz", "make_case", "run_case"]

KINDS = ("repulsive", "pruned", "classifier", "combined")
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_MAX_WORK = 400_000  # B * N * d per case
_SUBNORMAL = (5e-324, 1e-315, 1e-310)
_HUGE = (1e300, 1.7e308)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """10^U(lo, hi) for exponents lo < hi."""
    return float(10.0 ** rng.uniform(lo, hi))


def _pick(rng: np.random.Generator, options: list, weights: list[float]):
    w = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _param(rng: np.random.Generator, kind: str, scale: float) -> float:
    """A positive parameter (Q*, eta, a cap): relative to ``scale`` or extreme."""
    if kind == "q_star":
        mode = _pick(rng, ["relative", "wide", "subnormal", "huge"], [60, 25, 5, 10])
        if mode == "relative":
            return scale * _log_uniform(rng, -2, 1) if scale > 0 else _log_uniform(rng, -3, 1)
    elif kind == "eta":
        mode = _pick(rng, ["one", "zero", "wide", "subnormal", "huge"], [30, 10, 40, 10, 10])
        if mode == "one":
            return 1.0
        if mode == "zero":
            return 0.0
    else:  # a cap
        mode = _pick(rng, ["moderate", "wide", "subnormal", "huge"], [40, 40, 10, 10])
        if mode == "moderate":
            return _log_uniform(rng, -3, 6)
    if mode == "wide":
        return _log_uniform(rng, -300, 300)
    if mode == "subnormal":
        return float(rng.choice(_SUBNORMAL))
    return float(rng.choice(_HUGE))


def make_case(seed: int, index: int) -> dict:
    """The parameters of case ``index`` of run ``seed`` (a JSON-serialisable dict)."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[int(rng.integers(len(KINDS)))]
    dtype = _pick(rng, list(DTYPES), [40, 30, 18, 12])
    d = round(float(10.0 ** rng.uniform(0, 4)))
    n = 1 if rng.random() < 0.2 else round(float(10.0 ** rng.uniform(0.3, 2.3)))
    n = max(1, min(n, _MAX_WORK // (8 * d) or 1))
    b = max(1, min(int(rng.integers(1, 9)), _MAX_WORK // max(1, n * d)))
    top = 3 if dtype == "float16" else 36  # obstacle scales the states' dtype can hold
    scale = _pick(
        rng,
        [1.0, _log_uniform(rng, -45, -1), _log_uniform(rng, 1, top), 0.0],
        [30, 30, 30, 10],
    )
    case = dict(
        seed=seed,
        index=index,
        kind=kind,
        dtype=dtype,
        n=n,
        d=d,
        b=b,
        scale=scale,
        # a common offset of up to 1e6 times the spread, within the states' dtype
        offset=float(_pick(rng, [0.0, scale * _log_uniform(rng, 0, 6)], [70, 30])),
        duplicates=_pick(rng, ["none", "some", "all"], [60, 30, 10]),
        q_star=_param(rng, "q_star", scale),
        per_obstacle_q=bool(rng.random() < 0.3),
        eta=_param(rng, "eta", scale),
        radius=_pick(rng, ["zero", "relative", "wide"], [50, 40, 10]),
        rho=float(
            _pick(
                rng,
                [0.05, _log_uniform(rng, -300, -1), 1e-320, 0.999999, 0.5],
                [70, 15, 5, 5, 5],
            )
        ),
        max_force=_param(rng, "cap", scale) if rng.random() < 0.4 else None,
        max_potential=_param(rng, "cap", scale) if rng.random() < 0.3 else None,
        total_cap=_param(rng, "cap", scale),  # the combined field's max_force
        states=[
            _pick(rng, ["on", "near", "zero", "extreme", "random"], [25, 30, 10, 10, 25])
            for _ in range(b)
        ],
        state_scale_exp=float(rng.uniform(-300, 300)),
        projection=_pick(rng, ["none", "linear", "tanh"], [70, 20, 10]),
        gain_exp=float(rng.uniform(-150, 150) if dtype == "float64" else rng.uniform(-3, 3)),
        shape=_pick(rng, ["flat", "channel"], [80, 20]),
        t=_pick(rng, ["none", "number", "per-state", "zero", "one"], [55, 15, 15, 7, 8]),
        need_force=bool(rng.random() < 0.9),
        prune=_pick(rng, [True, int(rng.integers(1, n + 1))], [50, 50]),
        chunk_elements=_pick(rng, [1 << 24, int(rng.integers(1, 64))], [85, 15]),
        classifier_w_exp=float(rng.uniform(-100, 100)),
        classifier_b=float(
            _pick(rng, [0.0, rng.normal() * _log_uniform(rng, -300, 300)], [50, 50])
        ),
        threshold=float(rng.uniform(0.01, 0.99)),
        data_seed=int(rng.integers(2**31)),
    )
    return case


# ------------------------------------------------------------------------------ building a case
def _obstacles(case: dict, rng: np.random.Generator) -> np.ndarray:
    n, d, s = case["n"], case["d"], case["scale"]
    top = 1e3 if case["dtype"] == "float16" else 1e36
    centre = min(case["offset"], top) * rng.standard_normal(d)
    emb = centre + s * rng.standard_normal((n, d))
    if case["duplicates"] == "some" and n > 1:
        src = rng.integers(0, n, size=max(1, n // 2))
        emb[rng.integers(0, n, size=src.size)] = emb[src]
    elif case["duplicates"] == "all":
        emb[:] = emb[0]
    return emb


def _per_obstacle(case: dict, rng: np.random.Generator, value: float) -> np.ndarray | float:
    if not case["per_obstacle_q"] or value == 0:
        return value
    with np.errstate(over="ignore"):
        spread = value * 10.0 ** rng.uniform(-1, 1, size=case["n"])
    return np.where(np.isfinite(spread) & (spread > 0), spread, value)


def _top_exponent(dtype: torch.dtype) -> float:
    """The largest e with 10^e * N(0, 1) samples (|z| < 30) within ``dtype``."""
    return math.log10(float(torch.finfo(dtype).max)) - 1.5


def _states(case: dict, emb: np.ndarray, rng: np.random.Generator, dtype: torch.dtype):
    """States (B, d) float64 in the range of ``dtype`` (the projection's input when there is
    one: then random, of dimension m)."""
    fin = torch.finfo(dtype)
    d = emb.shape[1]
    top = _top_exponent(dtype)
    rows = []
    for kind in case["states"]:
        o = emb[rng.integers(0, emb.shape[0])]
        if kind == "on":
            row = o.copy()
        elif kind == "near":
            step = max(abs(case["scale"]), float(fin.tiny)) * _log_uniform(rng, -8, 0)
            row = o + step * rng.standard_normal(d)
        elif kind == "zero":
            row = np.zeros(d)
        elif kind == "extreme":
            pick = rng.choice([float(fin.max), float(fin.smallest_normal) * 2.0**-8, 1.0])
            row = pick * rng.choice([-1.0, 1.0], size=d) * rng.uniform(0.5, 1.0, size=d)
        else:
            e = float(np.clip(case["state_scale_exp"], -300, top))
            row = 10.0**e * rng.standard_normal(d)
        rows.append(row)
    return np.stack(rows)


def _projection(case: dict, d: int, dtype: torch.dtype, rng: np.random.Generator):
    """(projection, input dimension m) for the case: None, a linear map (m -> d) with a gain,
    or ``tanh(x) * scale`` (m = d)."""
    kind = case["projection"]
    if kind == "none":
        return None, d
    if kind == "tanh":
        s = max(case["scale"], 1e-30)

        def tanh(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x.reshape(x.shape[0], -1)) * s

        return tanh, d
    m = int(rng.integers(1, min(d, 64) + 1))
    gain = 10.0 ** case["gain_exp"]
    w = torch.from_numpy(rng.standard_normal((d, m)) * gain)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ w.to(x.dtype).T

    return linear, m


def _classifier(case: dict, rng: np.random.Generator, d: int, q: float, eta: float):
    from obstacles import PreferenceClassifier

    w = rng.standard_normal(d) * 10.0 ** case["classifier_w_exp"]
    return PreferenceClassifier(
        w, case["classifier_b"], threshold=case["threshold"], q_star=q, eta=eta
    )


def build(case: dict):
    """(field, states, t, reference field or None) for a case; raises what the library raises
    for invalid input."""
    from guidance import ClassifierField, CombinedField, RepulsiveField
    from obstacles import ObstacleSet

    rng = np.random.default_rng(case["data_seed"])
    dtype = DTYPES[case["dtype"]]
    emb = _obstacles(case, rng)
    projection, m = _projection(case, case["d"], dtype, rng)
    q = _per_obstacle(case, rng, case["q_star"])
    eta = _per_obstacle(case, rng, case["eta"])
    radius = {
        "zero": 0.0,
        "relative": 0.5 * np.asarray(q, dtype=np.float64),
        "wide": _log_uniform(rng, -300, 300),
    }[case["radius"]]
    caps = dict(max_force=case["max_force"], max_potential=case["max_potential"])
    common = dict(projection=projection, min_distance_ratio=case["rho"], **caps)
    kind = case["kind"]
    reference = None
    if kind in ("repulsive", "pruned", "combined"):
        oset = ObstacleSet.from_embeddings(emb, q_star=q, eta=eta, radius=radius)
        prune = case["prune"] if kind == "pruned" else None
        rep = RepulsiveField(
            oset, prune=prune, chunk_elements=case["chunk_elements"], backend="torch", **common
        )
        if kind == "pruned":
            reference = RepulsiveField(oset, backend="torch", **common)
    if kind in ("classifier", "combined"):
        q1 = float(np.max(q)) if np.ndim(q) else q
        e1 = float(np.max(eta)) if np.ndim(eta) else eta
        clf = ClassifierField(_classifier(case, rng, case["d"], q1, e1), **common)
    field = {
        "repulsive": lambda: rep,
        "pruned": lambda: rep,
        "classifier": lambda: clf,
        "combined": lambda: CombinedField(
            rep, clf, max_force=case["total_cap"], max_potential=case["max_potential"]
        ),
    }[kind]()
    if projection is None:
        x = _states(case, emb, rng, dtype)
    else:
        e = float(np.clip(case["state_scale_exp"], -30, min(30, _top_exponent(dtype))))
        x = 10.0**e * rng.standard_normal((case["b"], m))
    with np.errstate(over="ignore"):
        xt = torch.from_numpy(x).to(dtype)
    if case["shape"] == "channel":
        xt = xt.reshape(xt.shape[0], 1, -1)
    b = xt.shape[0]
    t = {
        "none": None,
        "number": float(rng.uniform(0, 1)),
        "per-state": torch.from_numpy(rng.uniform(0, 1, size=b)),
        "zero": 0.0,
        "one": 1.0,
    }[case["t"]]
    return field, xt, t, reference


# ------------------------------------------------------------------------------ running a case
def _bounds_failure(case: dict, field, x: torch.Tensor, out) -> str | None:
    """What is wrong with a finished evaluation (None: nothing)."""
    for name in ("potential", "force", "nearest", "clearance"):
        v = getattr(out, name)
        if v.dtype != x.dtype:
            return f"{name} has dtype {v.dtype}, states {x.dtype}"
        if not bool(torch.isfinite(v).all()):
            return f"{name} is not finite: {v.reshape(-1)[:4].tolist()}"
    b = x.shape[0]
    if out.potential.shape != (b,) or out.force.shape != x.shape or out.active.shape != (b,):
        return f"shapes {tuple(out.potential.shape)}, {tuple(out.force.shape)} for {tuple(x.shape)}"
    if bool((out.potential < 0).any()):
        return f"negative potential {out.potential.tolist()[:4]}"
    if bool((out.active < 0).any()):
        return f"negative active count {out.active.tolist()[:4]}"
    from guidance import safe_norm

    # the caps hold to the rounding of the result: a few eps of the output dtype relative (the
    # norm's own rounding grows with log2 of its length) and the spacing of its subnormals
    fin = torch.finfo(x.dtype)
    k = out.force[0].numel()
    step = float(fin.tiny) * float(fin.eps)  # the smallest subnormal
    rel = 8 * float(fin.eps) * (1 + math.log2(k + 1))
    if case["projection"] == "none" and math.isfinite(field.max_force):
        norm = safe_norm(out.force.reshape(b, -1).double())
        if bool((norm > field.max_force * (1 + rel) + math.sqrt(k) * step).any()):
            return f"|F| = {norm.max().item():.6g} above max_force = {field.max_force:.6g}"
    if math.isfinite(field.max_potential):
        top = field.max_potential * (1 + 4 * float(fin.eps)) + step
        if bool((out.potential.double() > top).any()):
            return f"U above max_potential = {field.max_potential:.6g}"
    return None


def _pruning_failure(x: torch.Tensor, t, out, reference, need_force: bool) -> str | None:
    ref = reference.evaluate(x, t, need_force=need_force)
    if not torch.equal(out.active, ref.active):
        return f"pruned active {out.active.tolist()} != unpruned {ref.active.tolist()}"
    a, r = out.potential.double(), ref.potential.double()
    tol = 1e-9 if x.dtype == torch.float64 else 4 * float(torch.finfo(x.dtype).eps)
    if bool(((a - r).abs() > tol * r.abs()).any()):
        return f"pruned potential {a.tolist()[:4]} != unpruned {r.tolist()[:4]}"
    return None


def run_case(case: dict) -> dict:
    """Build and evaluate one case: ``{"outcome": "ok"|"error"|"failure", "message", "seconds",
    "acting"}`` (acting: some obstacle within its Q* of some state)."""
    t0 = time.perf_counter()
    acting = False
    try:
        field, x, t, reference = build(case)
        out = field.evaluate(x, t, need_force=case["need_force"])
        problem = _bounds_failure(case, field, x, out)
        if problem is None and reference is not None:
            problem = _pruning_failure(x, t, out, reference, case["need_force"])
        outcome, message = ("ok", "") if problem is None else ("failure", problem)
        acting = bool((out.active > 0).any())
    except ValueError as err:  # a clear error: the bad input named (ObstacleSetError too)
        message = str(err)
        outcome = "error" if message.strip() else "failure"
        if outcome == "failure":
            message = f"{type(err).__name__} without a message"
    except Exception as err:  # any other exception is a finding
        outcome = "failure"
        where = traceback.extract_tb(err.__traceback__)[-1]
        message = f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno})"
    seconds = time.perf_counter() - t0
    return dict(outcome=outcome, message=message, seconds=seconds, acting=acting)


def fuzz(cases: int, seed: int = 0, progress=None) -> dict:
    """Run cases ``0 .. cases - 1`` of run ``seed``; a report (JSON-serialisable).

    ``progress(i, result)``, when given, is called after each case.
    """
    start = time.perf_counter()
    counts: dict = {k: collections.Counter() for k in KINDS}
    by_dtype: dict = {k: collections.Counter() for k in DTYPES}
    errors: collections.Counter = collections.Counter()
    failures = []
    slowest = None
    acting = 0
    for i in range(cases):
        case = make_case(seed, i)
        res = run_case(case)
        counts[case["kind"]][res["outcome"]] += 1
        acting += res["outcome"] == "ok" and res["acting"]
        by_dtype[case["dtype"]][res["outcome"]] += 1
        if res["outcome"] == "error":
            errors[res["message"].split(";")[0].split(":")[0][:90]] += 1
        elif res["outcome"] == "failure":
            failures.append(dict(case=case, message=res["message"]))
        if slowest is None or res["seconds"] > slowest["seconds"]:
            slowest = dict(seconds=res["seconds"], case=case)
        if progress is not None:
            progress(i, res)
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    return dict(
        cases=cases,
        seed=seed,
        seconds=time.perf_counter() - start,
        date=datetime.date.today().isoformat(),
        machine=dict(
            platform=platform.platform(),
            cpus=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            torch=torch.__version__,
        ),
        outcomes=dict(total),
        ok_with_obstacles_in_range=acting,
        by_kind={k: dict(v) for k, v in counts.items()},
        by_dtype={k: dict(v) for k, v in by_dtype.items()},
        failures=failures,
        top_errors=errors.most_common(12),
        slowest=slowest,
    )


def format_report(rep: dict) -> str:
    """A markdown summary: cases by kind and outcome, by dtype, the errors, the slowest case."""
    lines = [
        f"{rep['cases']} cases (seed {rep['seed']}) in {rep['seconds']:.1f} s; "
        f"failures: {rep['outcomes'].get('failure', 0)}; {rep['ok_with_obstacles_in_range']} ok "
        "cases had an obstacle within its Q* of a state",
        "",
        "| kind | cases | ok | clear error | failure |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [*rep["by_kind"].items(), ("**all**", rep["outcomes"])]
    for name, c in rows:
        n = sum(c.values())
        lines.append(
            f"| {name} | {n} | {c.get('ok', 0)} | {c.get('error', 0)} | {c.get('failure', 0)} |"
        )
    lines += ["", "| dtype | cases | ok | clear error | failure |", "|---|---:|---:|---:|---:|"]
    for name, c in rep["by_dtype"].items():
        n = sum(c.values())
        lines.append(
            f"| {name} | {n} | {c.get('ok', 0)} | {c.get('error', 0)} | {c.get('failure', 0)} |"
        )
    if rep["top_errors"]:
        lines += ["", "Most frequent clear errors (ValueError, first words):"]
        lines += [f"- {n} x {msg}" for msg, n in rep["top_errors"]]
    for f in rep["failures"][:20]:
        c = f["case"]
        lines.append(f"FAILURE case {c['index']} ({c['kind']}, {c['dtype']}): {f['message']}")
    s = rep["slowest"]
    if s is not None:
        c = s["case"]
        lines += [
            "",
            f"Slowest case: index {c['index']}, {s['seconds']:.3f} s ({c['kind']}, {c['dtype']}, "
            f"N={c['n']}, d={c['d']}, B={c['b']}, projection={c['projection']}, t={c['t']})",
        ]
    return "\n".join(lines)
