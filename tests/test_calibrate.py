"""``guidance.calibrate`` and ``cspace calibrate``: the search, its front, resuming, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cspace.cli import main
from cspace.experiments import calibration
from cspace.experiments.calibration import digits_evaluator, toy_evaluator, toy_set
from guidance.calibrate import (
    CalibrationError,
    CalibrationSettings,
    apply_parameters,
    calibrate,
    group_index,
    pareto_front,
)
from obstacles import ObstacleSet
from tests.folders import stored

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_eval():
    return toy_evaluator(n=192, steps=20, seed=0)


def _settings(**kw) -> CalibrationSettings:
    oset = toy_set()
    base = {
        "q_star_range": (0.5 * oset.q_star.min(), 3 * oset.q_star.max()),
        "eta_range": (0.01, 100.0),
        "max_hit": 0.01,
        "trials": 6,
    }
    base.update(kw)
    return CalibrationSettings(**base)


class Counting:
    """An evaluator wrapper that counts calls and can fail at a given call."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, oset):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(oset)


def test_pareto_front():
    pts = [(0.0, 5.0), (0.1, 3.0), (0.1, 4.0), (0.2, 3.5), (0.3, 1.0), (0.05, 6.0)]
    trials = [{"number": i, "hit": h, "loss": lo} for i, (h, lo) in enumerate(pts)]
    front = pareto_front(trials)
    assert [t["number"] for t in front] == [0, 1, 4]
    for t in trials:  # every trial off the front is dominated by a front point
        if t not in front:
            assert any(f["hit"] <= t["hit"] and f["loss"] <= t["loss"] for f in front)


def test_group_index():
    oset = toy_set()
    g, names = group_index(oset, "global")
    assert g.tolist() == [0, 0, 0] and names == ["all"]
    g, names = group_index(oset, "label")
    assert g.tolist() == [0, 0, 1] and names == ["wide", "narrow"]
    g, names = group_index(oset, "obstacle")
    assert g.tolist() == [0, 1, 2] and len(set(names)) == 3
    with pytest.raises(CalibrationError, match="per must be one of"):
        group_index(oset, "class")


def test_calibrate_toy_chooses_the_best_feasible_trial(toy_eval, tmp_path):
    oset = toy_set()
    before = (oset.q_star.copy(), oset.eta.copy())
    res = calibrate(oset, toy_eval, _settings(trials=8), tmp_path, progress=False)
    assert len(res.trials) == 8 and res.nfe == sum(t["nfe"] for t in res.trials)
    assert res.feasible and res.chosen["hit"] <= 0.01
    feasible = [t for t in res.trials if t["hit"] <= 0.01]
    assert res.chosen["loss"] == min(t["loss"] for t in feasible)
    # the first trial is the set's own values (one pair: their medians)
    assert res.trials[0]["q_star"] == pytest.approx([np.median(oset.q_star)] * 3)
    # the chosen values reproduce the chosen figures (common random numbers)
    again = toy_eval(apply_parameters(oset, np.array(res.chosen["q_star"]), res.chosen["eta"]))
    assert again["loss"] == pytest.approx(res.chosen["loss"]) and again["hit"] == res.chosen["hit"]
    # the set itself is untouched
    assert np.array_equal(oset.q_star, before[0]) and np.array_equal(oset.eta, before[1])
    with open(res.files["trials"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"hit", "loss", "nfe", "q_star[all]", "eta[all]"} <= set(rows[0])
    saved = json.loads(open(res.files["result"]).read())
    assert saved["chosen"]["number"] == res.chosen["number"]
    import matplotlib.image as mpimg

    assert mpimg.imread(res.files["front"]).shape[0] > 200


@pytest.mark.slow
def test_per_label_beats_one_global_pair(toy_eval):
    # the wide and the narrow obstacles want different (Q*, eta): one pair for both pays in ED
    oset = toy_set()
    s = _settings()
    grid = []
    for q in np.geomspace(*s.q_star_range, 5):
        for e in np.geomspace(*s.eta_range, 5):
            f = toy_eval(apply_parameters(oset, q, e))
            if f["hit"] <= s.max_hit:
                grid.append(f["loss"])
    res = calibrate(oset, toy_eval, _settings(per="label", trials=16), None, progress=False)
    assert res.feasible and res.chosen["loss"] < 0.8 * min(grid)


def test_resume_does_not_repeat_finished_trials(toy_eval, tmp_path):
    oset = toy_set()
    first = Counting(toy_eval, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate(oset, first, _settings(trials=6), tmp_path, progress=False)
    assert first.calls == 4  # 3 finished, the 4th interrupted
    second = Counting(toy_eval)
    res = calibrate(oset, second, _settings(trials=6), tmp_path, progress=False)
    assert second.calls == 3 and len(res.trials) == 6
    assert len({t["number"] for t in res.trials}) == 6
    # more trials later: only the new ones run
    third = Counting(toy_eval)
    res = calibrate(oset, third, _settings(trials=8), tmp_path, progress=False)
    assert third.calls == 2 and len(res.trials) == 8
    with pytest.raises(CalibrationError, match="another obstacle set or with other settings"):
        calibrate(oset, toy_eval, _settings(trials=8, max_hit=0.2), tmp_path, progress=False)


def test_unreachable_constraint_says_so(toy_eval):
    # eta this small cannot keep samples out: no trial meets hit <= 0
    s = _settings(eta_range=(1e-9, 2e-9), max_hit=0.0, trials=4)
    res = calibrate(toy_set(), toy_eval, s, None, progress=False)
    assert not res.feasible and "no trial met" in res.message
    assert res.chosen["hit"] == min(t["hit"] for t in res.trials) > 0


def test_budget_stops_before_exceeding(toy_eval):
    per_trial = toy_eval(toy_set())["nfe"]
    res = calibrate(toy_set(), toy_eval, _settings(trials=10, budget=3 * per_trial + 10), None,
                    progress=False)  # fmt: skip
    assert len(res.trials) == 3 and res.nfe <= 3 * per_trial + 10
    assert "budget" in res.message


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"per": "class"}, "per must be one of"),
        ({"q_star_range": (2.0, 1.0)}, "q_star_range"),
        ({"eta_range": (0.0, 1.0)}, "eta_range"),
        ({"max_hit": float("nan")}, "max_hit"),
        ({"trials": 0}, "trials"),
        ({"sampler": "grid"}, "sampler"),
    ],
)
def test_bad_settings(kw, match, toy_eval):
    with pytest.raises(CalibrationError, match=match):
        calibrate(toy_set(), toy_eval, _settings(**kw), None, progress=False)


def test_cli_toy_writes_a_new_revision(tmp_path, capsys):
    path = tmp_path / "toyset"
    rc = main(["calibrate", str(path), "--model", "toy", "--init", "--trials", "5", "--n", "128",
               "--steps", "10", "--json"])  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["feasible"] and rep["written"]
    loaded = ObstacleSet.load(path)
    assert loaded.q_star.tolist() == pytest.approx(rep["chosen"]["q_star"])
    assert loaded.eta.tolist() == pytest.approx(rep["chosen"]["eta"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["revision"] == 1
    records = json.loads(stored(path, "records.json").read_text())  # labels, sources, history
    assert records["history"][0]["q_star"] == pytest.approx(toy_set().q_star.tolist())
    assert len(loaded.history) == 1
    assert loaded.history[-1]["note"].startswith("cspace calibrate (toy, per global): trial ")
    assert (tmp_path / "toyset-calibration" / "study.log").is_file()
    # the same command with more trials resumes the study (ranges from it, not from the
    # written-back values) and writes revision 2
    rc = main(["calibrate", str(path), "--model", "toy", "--trials", "7", "--n", "128",
               "--steps", "10", "--json"])  # fmt: skip
    rep2 = json.loads(capsys.readouterr().out)
    assert (
        rc == 0
        and rep2["trials"] == 7
        and rep2["settings"]["q_star_range"] == rep["settings"]["q_star_range"]
    )
    assert json.loads((path / "manifest.json").read_text())["revision"] == 2


def test_cli_infeasible_leaves_the_set_alone(tmp_path, capsys):
    path = tmp_path / "toyset"
    toy_set().save(path)
    before = (path / "manifest.json").read_bytes()
    rc = main(["calibrate", str(path), "--model", "toy", "--trials", "3", "--n", "64", "--steps",
               "10", "--max-hit", "0", "--eta-range", "1e-9", "2e-9"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 3 and "no trial met" in out and "left unchanged" in out
    assert (path / "manifest.json").read_bytes() == before


def test_cli_bad_input(tmp_path, monkeypatch, capsys):
    assert main(["calibrate", str(tmp_path / "missing"), "--model", "toy"]) == 2
    assert "--init" in capsys.readouterr().err
    path = tmp_path / "toyset"
    toy_set().save(path)
    assert main(["calibrate", str(path), "--model", "toy", "--verifier", "judge"]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["calibrate", str(path), "--model", "toy", "--init"]) == 2
    assert "exists" in capsys.readouterr().err
    # no write permission (root ignores chmod, so the check itself is made to fail)
    real_access = calibration.os.access
    monkeypatch.setattr(
        calibration.os,
        "access",
        lambda p, mode: False if str(p) == str(path) else real_access(p, mode),
    )
    assert main(["calibrate", str(path), "--model", "toy", "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "no write permission" in err and "--no-write" in err
    monkeypatch.undo()
    # a digits set is 32-dimensional: the toy refuses it with a clear message
    wrong = ObstacleSet.from_embeddings(np.zeros((2, 32)), q_star=1.0, radius=0.5)
    wrong.save(tmp_path / "wrong")
    assert main(["calibrate", str(tmp_path / "wrong"), "--model", "toy", "--no-write"]) == 2
    assert "dimension 2" in capsys.readouterr().err


def test_digits_evaluator_small():
    from cspace.experiments.demo import DemoSettings, demo_obstacles
    from cspace.models.encoders import Encoder

    ev = digits_evaluator(0, n=64, steps=5)
    oset, _ = demo_obstacles(Encoder.from_aligned(), DemoSettings())
    figs = ev(oset)
    assert 0 <= figs["hit"] <= 1 and figs["loss"] >= 0 and figs["nfe"] >= 64 * 5
    assert figs["unguided_rate"] == pytest.approx(ev.unguided_rate)
    assert figs["loss"] == pytest.approx(max(figs["class_shift"], figs["confidence_drop"]))
    with pytest.raises(ValueError, match="digits encoder"):
        ev(toy_set())


def test_cli_digits_reads_the_class_from_the_labels(tmp_path, capsys):
    from cspace.experiments.demo import DemoSettings, demo_obstacles
    from cspace.models.encoders import Encoder

    oset, _ = demo_obstacles(Encoder.from_aligned(), DemoSettings(avoid_class=3))
    oset.save(tmp_path / "three")  # labels "digit-3"
    before = (tmp_path / "three" / "manifest.json").read_bytes()
    rc = main(["calibrate", str(tmp_path / "three"), "--model", "digits", "--trials", "2",
               "--n", "64", "--steps", "4", "--max-hit", "1", "--no-write", "--json"])  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["trials"] == 2 and not rep["written"]
    assert "unguided_rate" in rep["chosen"]["extras"]
    assert (tmp_path / "three" / "manifest.json").read_bytes() == before  # --no-write
    ObstacleSet.from_embeddings(np.zeros((2, 32)), q_star=1.0, labels="cats").save(tmp_path / "c")
    assert main(["calibrate", str(tmp_path / "c"), "--model", "digits", "--no-write"]) == 2
    assert "--avoid-class" in capsys.readouterr().err
