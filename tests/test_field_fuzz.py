"""The field fuzz harness (cspace.experiments.field_fuzz): a few hundred seeded cases through the
benchmark command, in a subprocess (a FAISS abort must fail the test, not end pytest), and the
harness's own judgement of broken fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cspace.experiments.field_fuzz import KINDS, make_case, run_case

ROOT = Path(__file__).resolve().parent.parent


def test_fuzz_cases_are_finite_or_clear_errors(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/field_fuzz.py", "--cases", "400", "--seed", "7",
         "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    )
    rep = json.loads(out.read_text())
    assert rep["cases"] == 400 and rep["failures"] == []
    assert rep["outcomes"].get("failure", 0) == 0
    assert set(rep["by_kind"]) == set(KINDS)
    assert all(sum(c.values()) >= 50 for c in rep["by_kind"].values())
    assert all(sum(c.values()) >= 20 for c in rep["by_dtype"].values())
    # not vacuous: most cases evaluate, and most of those with an obstacle in range
    ok = rep["outcomes"]["ok"]
    assert ok >= 0.8 * 400 and rep["ok_with_obstacles_in_range"] >= 0.5 * ok
    assert rep["seconds"] < 30
    assert "| **all** | 400 |" in proc.stdout and "Slowest case" in proc.stdout


def test_cases_are_reproducible_and_cover_the_extremes():
    assert make_case(3, 17) == make_case(3, 17) and make_case(3, 17) != make_case(3, 18)
    cases = [make_case(0, i) for i in range(600)]
    assert {c["dtype"] for c in cases} == {"float64", "float32", "bfloat16", "float16"}
    assert min(c["d"] for c in cases) == 1 and max(c["d"] for c in cases) > 5000
    assert sum(c["n"] == 1 for c in cases) > 50
    assert min(c["scale"] for c in cases if c["scale"] > 0) < 1e-38
    assert max(c["q_star"] for c in cases) >= 1e300 and min(c["q_star"] for c in cases) < 1e-300
    assert {5e-324, 1e-315, 0.0, 1.7e308} <= {c["eta"] for c in cases}
    assert {"on", "near", "zero", "extreme", "random"} <= {s for c in cases for s in c["states"]}
    assert {"none", "linear", "tanh"} == {c["projection"] for c in cases}
    assert {"none", "number", "per-state", "zero", "one"} == {c["t"] for c in cases}


def _ok_case(kind: str) -> dict:
    for i in range(200):
        case = make_case(0, i)
        if case["kind"] == kind and case["projection"] == "none" and case["need_force"]:
            if run_case(case)["outcome"] == "ok" and run_case(case)["acting"]:
                return case
    raise AssertionError(f"no ok {kind} case in the first 200")


def test_the_harness_flags_nan_wrong_exceptions_and_silent_errors(monkeypatch):
    from guidance.fields.base import Field
    from guidance.fields.repulsive import RepulsiveField

    case = _ok_case("repulsive")
    real_cap = Field._cap

    def nan_cap(self, pot, force, need_force):
        pot, force = real_cap(self, pot, force, need_force)
        return pot, force * torch.nan

    monkeypatch.setattr(Field, "_cap", nan_cap)
    res = run_case(case)
    assert res["outcome"] == "failure" and "not finite" in res["message"]
    monkeypatch.setattr(Field, "_cap", real_cap)

    def raises(exc):
        def sums(self, *a, **k):
            raise exc

        return sums

    monkeypatch.setattr(RepulsiveField, "_sums", raises(ZeroDivisionError("float division")))
    res = run_case(case)
    assert res["outcome"] == "failure" and res["message"].startswith("ZeroDivisionError")
    monkeypatch.setattr(RepulsiveField, "_sums", raises(ValueError("")))
    assert run_case(case)["outcome"] == "failure"
    monkeypatch.setattr(RepulsiveField, "_sums", raises(ValueError("states are bad: fix them")))
    assert run_case(case) | {"seconds": 0} == {
        "outcome": "error",
        "message": "states are bad: fix them",
        "seconds": 0,
        "acting": False,
    }


@pytest.mark.parametrize("kind", ["pruned", "combined"])
def test_the_harness_checks_pruning_and_caps(monkeypatch, kind):
    """A pruned field that drops an obstacle, or a cap that is not applied, is a failure."""
    from guidance.fields.base import Field
    from obstacles.clusters import ClusteredObstacles

    case = _ok_case(kind)
    if kind == "pruned":
        real = ClusteredObstacles.bounds

        def nothing_alive(self, e, scale=None):
            alive, near, clear = real(self, e, scale)
            return torch.zeros_like(alive), near, clear

        monkeypatch.setattr(ClusteredObstacles, "bounds", nothing_alive)
        assert "pruned active" in run_case(case)["message"]
    else:
        monkeypatch.setattr(Field, "_cap", lambda self, pot, force, need: (pot, force * 1e3))
        res = run_case(case)
        assert res["outcome"] == "failure" and "above max_" in res["message"], res
