"""``cspace search`` and ``cspace experiment scaling`` through an argparse harness."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import time

import matplotlib.image as mpimg
import pytest
import torch

from cspace.cli import search as cli_search
from cspace.experiments import search as search_problems
from cspace.io.errors import MissingWeightsError

torch.set_num_threads(1)


def run(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="cspace")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    cli_search.register(sub)
    args = parser.parse_args(argv)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    return buf.getvalue()


@pytest.mark.parametrize("algo", [a for a in cli_search.ALGOS if a != "rejection-pu"])
def test_search_json(algo):
    budget = 16 * 10 * 8 if algo != "paths" else 16 * 10 * 8 * 4
    out = run(["search", "--algo", algo, "--budget", str(budget), "--n", "16", "--steps", "10",
               "--coverage", "0.25", "--json"])  # fmt: skip
    rep = json.loads(out)  # exactly one JSON object
    for key in ("algo", "n", "steps", "nfe", "score", "diversity", "hit_rate", "energy_distance",
                "energy_distance_floor"):  # fmt: skip
        assert key in rep, key
    assert rep["algo"] == algo and rep["n"] == 16 and rep["steps"] == 10
    assert 0 < rep["nfe"] <= budget
    assert 0 <= rep["hit_rate"] <= 1 and rep["energy_distance_floor"] >= 0
    assert rep["diversity"] > 0


def test_rejection_pu_is_refused_on_the_toy_and_runs_on_digits():
    """rejection-pu learns a region from examples of a class: refused on the toy (its balls
    are the exact test) before anything is built, with the way out; on digits it returns the
    judge's figures and its own records, every draw within the budget."""
    with pytest.raises(ValueError, match=r"learns the obstacles from examples.*--algo rejection"):
        run(["search", "--algo", "rejection-pu", "--budget", "2000", "--n", "16", "--steps",
             "10", "--json"])  # fmt: skip
    out = run(["search", "--problem", "digits", "--algo", "rejection-pu", "--budget", "4000",
               "--n", "64", "--steps", "20", "--avoid-class", "0", "--json"])  # fmt: skip
    rep = json.loads(out)
    rec = rep["records"]
    assert rep["algo"] == "rejection-pu" and rep["n"] == 64 and 0 < rep["nfe"] <= 4000
    assert rep["nfe"] == rec["draws"] * 20 and rec["examples"] == 40 and 0 < rec["c"] < 1
    assert rec["draws"] >= 64 and 0 <= rep["avoided_rate"] <= 1
    assert rec["region"] == "kernel"  # the default region
    out = run(["search", "--problem", "digits", "--algo", "rejection-pu", "--budget", "4000",
               "--n", "64", "--steps", "20", "--avoid-class", "0", "--pu-region", "linear",
               "--json"])  # fmt: skip
    assert json.loads(out)["records"]["region"] == "linear"
    with pytest.raises(ValueError, match=r"--pu-region does not apply to --algo rejection;"):
        run(["search", "--problem", "digits", "--algo", "rejection", "--budget", "4000",
             "--n", "64", "--steps", "20", "--pu-region", "linear", "--json"])  # fmt: skip


def test_a_budget_that_runs_out_is_said_on_stderr(capsys):
    """Rejection returns what the budget paid for; the command says how many are missing."""
    rep = json.loads(run(["search", "--algo", "rejection", "--budget", "1700", "--n", "160",
                          "--steps", "10", "--coverage", "0.75", "--json"]))  # fmt: skip
    err = capsys.readouterr().err
    assert rep["n"] < 160 and rep["records"]["shortfall"] == 160 - rep["n"]
    assert f"returned {rep['n']} of the 160 samples asked for ({160 - rep['n']} short)" in err


def test_search_table_and_verifier_option():
    out = run(["search", "--algo", "best-of-n", "--budget", "400", "--n", "8", "--steps", "10",
               "--verifier", "clearance", "--dim", "3"])  # fmt: skip
    assert "hit_rate" in out and "energy_distance" in out


def test_search_errors():
    with pytest.raises(SystemExit):
        run(["search", "--algo", "smc", "--budget", "100", "--coverage", "1.5"])
    with pytest.raises(SystemExit):
        run(["search", "--algo", "nope", "--budget", "100"])
    from guidance.search import BudgetExceeded

    with pytest.raises(BudgetExceeded, match="less than one sample"):
        run(["search", "--algo", "best-of-n", "--budget", "10", "--n", "4", "--steps", "10"])


def test_search_algorithm_options_reach_the_algorithm_and_the_report():
    """--method/--time-shift/--proposal/--ess-threshold are the algorithm's own options: they change
    what it does (the NFE per sample of the stochastic Heun step), appear in the report, and are
    refused, naming the flag and the algorithms that take it, where they do not apply."""
    base = ["search", "--algo", "twisted-smc", "--budget", "4000", "--n", "20", "--steps", "10",
            "--coverage", "0.5", "--json", "--no-progress"]  # fmt: skip
    plain = json.loads(run(base))
    assert "options" not in plain and plain["nfe"] == 4000  # 20 particles x 10 steps x 20
    heun = json.loads(run([*base, "--method", "sde-heun", "--time-shift", "2"]))
    assert heun["options"] == {"method": "sde-heun", "shift": 2.0}
    assert heun["nfe"] == 4000 // 19 * 19 and heun["hit_rate"] == 0  # 2 x 10 - 1 NFE each
    tds = json.loads(run([*base, "--method", "dpm-sde", "--proposal", "twist"]))
    assert tds["options"] == {"method": "dpm-sde", "proposal": "twist"} and tds["hit_rate"] == 0
    with pytest.raises(ValueError, match="--proposal does not apply to --algo rejection; it "
                       "applies to twisted-smc"):  # fmt: skip
        run(["search", "--algo", "rejection", "--budget", "4000", "--proposal", "twist"])
    with pytest.raises(ValueError, match="--time-shift does not apply to --algo best-of-n"):
        run(["search", "--algo", "best-of-n", "--budget", "4000", "--time-shift", "2"])
    with pytest.raises(SystemExit):
        run(["search", "--algo", "twisted-smc", "--budget", "4000", "--time-shift", "0"])
    # --ess-threshold: how often the particles are resampled (coverage 0.9: the weights move)
    high = [*base[:-3], "0.9", "--json", "--no-progress"]
    every = json.loads(run([*high, "--ess-threshold", "1"]))
    rare = json.loads(run([*high, "--ess-threshold", "0.3"]))
    assert every["options"] == {"threshold": 1.0} and rare["options"] == {"threshold": 0.3}
    assert every["records"]["resamplings"] == 9 > rare["records"]["resamplings"]  # 10 steps
    assert every["hit_rate"] == rare["hit_rate"] == 0
    with pytest.raises(ValueError, match="--ess-threshold does not apply to --algo rejection"):
        run(["search", "--algo", "rejection", "--budget", "4000", "--ess-threshold", "0.3"])
    with pytest.raises(SystemExit):
        run(["search", "--algo", "twisted-smc", "--budget", "4000", "--ess-threshold", "0"])


@pytest.mark.parametrize("algo", cli_search.ALGOS)
def test_digits_search_json(algo):
    budget = 8 * 5 * 8 if algo != "paths" else 8 * 5 * 8 * 4
    out = run(["search", "--problem", "digits", "--algo", algo, "--budget", str(budget),
               "--n", "8", "--steps", "5", "--json"])  # fmt: skip
    rep = json.loads(out)
    assert rep["problem"] == "digits" and rep["verifier"] == "clearance" and rep["n"] == 8
    assert 0 < rep["nfe"] <= budget
    assert len(rep["class_shares"]) == 10 and abs(sum(rep["class_shares"]) - 1) < 1e-9
    assert rep["avoided_rate"] == rep["class_shares"][0]
    assert 0.1 <= rep["judge_confidence"] <= 1 and rep["diversity"] > 0


def test_digits_judge_verifier_scores_are_log_probabilities():
    problem = search_problems.build_digits_problem("judge")
    x = torch.randn(6, *problem.shape, generator=torch.Generator().manual_seed(0))
    scores = problem.verifier.score(x)
    assert scores.shape == (6,) and bool((scores <= 0).all())
    assert bool((scores >= torch.log(torch.tensor(0.1, dtype=scores.dtype))).all())  # top of 10


def test_digits_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="does not apply to --problem digits"):
        run(["search", "--problem", "digits", "--verifier", "oracle", "--algo", "best-of-n",
             "--budget", "100"])  # fmt: skip
    with pytest.raises(ValueError, match="does not apply to --problem toy"):
        run(["search", "--verifier", "judge", "--algo", "best-of-n", "--budget", "100"])
    monkeypatch.setattr(search_problems, "shipped", lambda name: tmp_path / name)
    with pytest.raises(MissingWeightsError, match="needs the digits models"):
        run(["search", "--problem", "digits", "--algo", "best-of-n", "--budget", "100"])


def test_experiment_scaling_digits_quick(tmp_path):
    out = run(["experiment", "scaling", "--problem", "digits", "--quick", "--seeds", "1",
               "--n", "16", "--out", str(tmp_path)])  # fmt: skip
    assert "class shift" in out
    with (tmp_path / "scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["algo"] for r in rows} == {*cli_search.ALGOS, "unguided"}
    ref = next(r for r in rows if r["algo"] == "unguided")
    assert float(ref["class_shift"]) == 0 and float(ref["nfe_per_sample"]) == 10
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["algo"] for r in ok} == set(cli_search.ALGOS)  # every algorithm ran
    for r in ok:
        assert float(r["nfe"]) <= float(r["budget"])
        assert 0 <= float(r["avoided_rate"]) <= 1 and 0 <= float(r["class_shift"]) <= 100
    assert mpimg.imread(tmp_path / "scaling.png").shape[0] > 300


def test_experiment_scaling_quick(tmp_path):
    t0 = time.perf_counter()
    out = run(["experiment", "scaling", "--quick", "--out", str(tmp_path)])
    secs = time.perf_counter() - t0
    assert "scaling.csv" in out
    with (tmp_path / "scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    for key in ("algo", "seed", "nfe_per_sample", "score", "hit_rate", "energy_distance",
                "energy_distance_floor", "diversity"):  # fmt: skip
        assert key in rows[0]
    algos = {r["algo"] for r in rows}
    # every algorithm that applies to the toy (rejection-pu learns a class from examples)
    assert algos == {*cli_search.ALGOS, "exact"} - {"rejection-pu"}
    assert {r["seed"] for r in rows} == {"0", "1", "2"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok  # the loop below checks rows that exist
    assert {r["algo"] for r in ok} == set(cli_search.ALGOS) - {"rejection-pu"}  # each ran
    for r in ok:
        assert float(r["nfe"]) <= float(r["budget"])
    with (tmp_path / "scaling_summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert {"score_mean", "score_std", "energy_distance_mean", "diversity_std"} <= set(summary[0])
    img = mpimg.imread(tmp_path / "scaling.png")
    assert img.ndim == 3 and img.shape[0] > 300
    assert secs < 120  # < 60 s on an idle 2-core machine


def test_summarise_groups_the_exact_rows_of_every_seed_read_back_from_csv():
    """Read back from a CSV, each exact row's ``multiple`` is its own NaN; NaN != NaN used to put
    every seed's exact row in a group of its own (three "exact" rows with std 0)."""
    from cspace.experiments.scaling import summarise

    rows = [
        {"algo": "exact", "seed": float(s), "multiple": float("nan"), "score": v, "status": "rejection sampling (exact)"}
        for s, v in enumerate((1.0, 2.0, 4.0))
    ] + [
        {"algo": "smc", "seed": float(s), "multiple": 2.0, "score": v, "status": "ok"}
        for s, v in enumerate((0.0, 1.0))
    ]  # fmt: skip
    summary = summarise(rows)
    exact = [r for r in summary if r["algo"] == "exact"]
    assert len(summary) == 2 and len(exact) == 1
    assert exact[0]["seeds"] == 3 and exact[0]["score_mean"] == pytest.approx(7 / 3)
    assert exact[0]["score_std"] == pytest.approx(1.5275252, rel=1e-6)


def test_search_reference_out_and_problem_seed(tmp_path):
    """--reference adds the distance to a large exact reference and the floor's mean and sd;
    --out writes the samples (safetensors) and the report, which name each other; --problem-seed
    changes the geometry, --seed only the random streams."""
    from safetensors.torch import load_file

    out_dir = tmp_path / "run"
    argv = ["search", "--algo", "rejection", "--budget", "20000", "--n", "32", "--steps", "10",
            "--coverage", "0.5", "--reference", "2000", "--floor-draws", "5", "--json"]  # fmt: skip
    rep = json.loads(run([*argv, "--out", str(out_dir)]))
    for key in ("energy_distance_ref", "mode_tv", "floor_energy_distance_mean",
                "floor_energy_distance_sd", "floor_mode_tv_mean", "floor_mode_tv_sd"):  # fmt: skip
        assert rep[key] >= 0, key
    assert rep["reference_size"] == 2000 and rep["floor_draws"] == 5
    assert rep["records"]["draws"] * 10 == rep["nfe"] and rep["hit_rate"] == 0
    saved = json.loads((out_dir / "report.json").read_text())
    samples = load_file(str(out_dir / "samples.safetensors"))["samples"]
    assert samples.shape == (32, 2) and samples.dtype == torch.float64
    assert saved["energy_distance_ref"] == rep["energy_distance_ref"]
    assert len(saved["samples_sha256"]) == 64
    # the same seeds again: the same samples; another problem seed: another geometry
    again = json.loads(run(argv))
    assert again["energy_distance_ref"] == rep["energy_distance_ref"]
    other = json.loads(run([*argv, "--problem-seed", "3"]))
    assert other["problem_seed"] == 3 and other["energy_distance_ref"] != rep["energy_distance_ref"]
    with pytest.raises(ValueError, match="--reference needs exact truth"):
        run(["search", "--problem", "digits", "--algo", "rejection", "--budget", "100",
             "--reference", "100"])  # fmt: skip
    with pytest.raises(NotADirectoryError, match="--out"):
        (tmp_path / "file").write_text("x")
        run([*argv, "--out", str(tmp_path / "file")])


def test_rejection_budget_below_one_draw_from_the_cli():
    from guidance.search import BudgetExceeded

    with pytest.raises(BudgetExceeded, match="less than one draw per returned sample"):
        run(["search", "--algo", "rejection", "--budget", "99", "--n", "10", "--steps", "10"])
