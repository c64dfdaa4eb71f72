"""``cspace bench field`` at a small size: every backend agrees with the reference, the floor is
measured, bad input is refused, and the JSON report is written."""

from __future__ import annotations

import json

import pytest

from cspace.cli import main
from cspace.experiments.bench import bench_field, blob_problem


def test_bench_field_small():
    rep = bench_field(n=2000, d=8, b=8, q_quantile=0.01, repeats=1)
    names = [r["backend"] for r in rep["rows"]]
    assert names == ["reference", "cpu", "cpu-pruned", "pruned", "faiss-range", "torch-eager"]
    for r in rep["rows"]:
        # float32 work (the CPU path: within its 1e-5 bound) and the plain expansion
        tol = {"torch-eager": 1e-2, "cpu": 1e-5, "cpu-pruned": 1e-5}.get(r["backend"], 1e-10)
        assert r["seconds"] > 0 and r["x_floor"] > 0
        assert r["force_rel_error"] < tol, r
        assert r["potential_rel_error"] < tol, r
    f = rep["floor"]
    assert f["seconds"] == max(f["compute_seconds"], f["memory_seconds"]) > 0
    # the compute part is 4 B N d flops at the measured product rate
    assert f["compute_seconds"] == pytest.approx(4 * 8 * 2000 * 8 / f["matmul_flops_per_s"])
    assert rep["q_star"] > 0 and rep["dtype"] == "float32"


def test_blob_problem_quantile_sets_the_density():
    emb, x, q_dense = blob_problem(3000, 6, 5, 0.5)
    assert emb.dtype.name == "float32" and emb.shape == (3000, 6) and x.shape == (5, 6)
    _, _, q_sparse = blob_problem(3000, 6, 5, 0.01)
    assert q_sparse < q_dense


def test_bench_cli_json_out_and_errors(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "field", "--n", "500", "--d", "4", "--b", "4", "--repeats", "1",
                 "--backends", "reference,torch-eager", "--json", "--out", str(out)]) == 0  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 500 and [r["backend"] for r in rep["rows"]] == ["reference", "torch-eager"]
    assert json.loads(out.read_text()) == rep
    assert main(["bench", "field", "--n", "500", "--q-star-quantile", "2"]) == 2
    assert "quantile" in capsys.readouterr().err
    assert main(["bench", "field", "--n", "500", "--backends", "fast"]) == 2
    assert "unknown backends" in capsys.readouterr().err
    assert main(["bench", "field", "--n", "500", "--backends", "triton"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def _sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "field_sweep.py"
    spec = importlib.util.spec_from_file_location("field_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_targets_need_speed_and_accuracy():
    sweep = _sweep_module()
    rep = {"dtype": "float32", "rows": [
        {"backend": "triton", "seconds": 0.8e-3, "x_floor": 1.1, "force_rel_error": 5e-4,
         "potential_rel_error": 2e-4},
        {"backend": "triton-pruned", "seconds": 0.1e-3, "x_floor": 0.2, "force_rel_error": 5e-4,
         "potential_rel_error": 2e-4},
    ]}  # fmt: skip
    assert sweep.check(rep, ("triton", "ms", 1.0)) == (pytest.approx(0.8), True)
    assert sweep.check(rep, ("triton", "ms", 0.5))[1] is False
    assert sweep.check(rep, ("triton", "x_floor", 1.15))[1] is True
    assert sweep.check(rep, ("triton-pruned", "speedup_over:triton", 5.0)) == (
        pytest.approx(8.0), True)  # fmt: skip
    rep["rows"][0]["force_rel_error"] = 2e-3  # fast but beyond the tf32 bound: not met
    assert sweep.check(rep, ("triton", "ms", 1.0))[1] is False
    assert sweep.check(rep, None) is None
    # every preset names only known backends; the speed-target cases carry their targets
    from cspace.experiments.bench import BACKENDS

    for name in ("targets", "scaling", "cpu"):
        for dev in ("cpu", "cuda"):
            for case in sweep.preset(name, 10_000_000, dev):
                assert set(case["backends"]) <= set(BACKENDS)
    targets = [c.get("target") for c in sweep.preset("targets", 10_000_000, "cuda")]
    assert ("triton", "ms", 1.0) in targets and ("triton", "x_floor", 1.15) in targets


def test_sweep_runs_a_small_grid(tmp_path, monkeypatch, capsys):
    sweep = _sweep_module()
    out = tmp_path / "s.json"
    monkeypatch.setattr("sys.argv", ["field_sweep.py", "--b", "4", "--n", "300", "--d", "6",
                                     "--q", "0.5,0.01", "--repeats", "1", "--backends",
                                     "reference,faiss-range", "--out", str(out)])  # fmt: skip
    assert sweep.main() == 0
    reps = json.loads(out.read_text())
    assert [r["q_star_quantile"] for r in reps] == [0.5, 0.01]
    assert all(r["rows"][1]["force_rel_error"] < 1e-10 for r in reps)
    assert capsys.readouterr().out.count("| faiss-range |") == 2
