"""``benchmarks/membership_frontier.py``: the filter's two figures and the frontier on labels
whose answers are known, and one small run of the script on digits."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "membership_frontier.py"


def _module():
    spec = importlib.util.spec_from_file_location("membership_frontier", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=2000)


def test_filtered_removing_exactly_the_class_leaves_nothing_and_shifts_nothing():
    m = _module()
    labels = _labels()
    left, shift = m.filtered(labels == 2, labels, 2, 4)
    assert left == 0.0 and abs(shift) < 1e-12  # the demo's formula, in floating point


def test_filtered_removing_another_class_too_is_its_renormalised_shift():
    m = _module()
    labels = _labels()
    flag = (labels == 2) | (labels == 1)
    left, shift = m.filtered(flag, labels, 2, 4)
    share_1 = np.mean(labels[labels != 2] == 1)
    assert left == 0.0
    # class 1 is gone from the kept samples: its renormalised share falls from share_1 to 0
    assert np.isclose(shift, -100 * share_1)


def test_filtered_keeping_everything_leaves_the_whole_share():
    m = _module()
    labels = _labels()
    left, shift = m.filtered(np.zeros(len(labels), bool), labels, 1, 4)
    assert left == 1.0 and shift == 0.0


def test_frontier_of_a_perfect_score_and_of_one_that_ties_the_class_with_another():
    m = _module()
    labels = _labels()
    f = m.frontier((labels == 3).astype(float), labels, 3, 4)
    assert f["at_left_0.10"][0] == 0.0 and abs(f["at_left_0.10"][1]) < 1e-12
    # a score that cannot tell class 3 from class 0: every threshold that removes class 3
    # removes class 0 as well (about a third of the rest), and none stays within 3 points
    tied = np.isin(labels, (0, 3)).astype(float)
    g = m.frontier(tied, labels, 3, 4)
    assert g["at_shift_3"] is None
    assert abs(g["at_left_0.10"][1]) > 25


def test_the_script_runs_on_digits_and_writes_every_score(tmp_path):
    out = tmp_path / "frontier.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", "digits", "--seeds", "0", "--classes", "1-1",
         "--n", "150", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["class"] for r in rows] == [1]
    for name in ("pu", "pu-c/(2-c)", "pu-kernel", "pu-kernel-c/2", "supervised", "supervised-knn"):
        rule = rows[0][name]["rule"]
        assert 0.0 <= rule["left"] <= 1.0 and 0.0 <= rule["inside"] <= 1.0
        assert np.isfinite(rule["shift"])
    assert "classes passing at the rule" in proc.stdout


def test_bad_classes_and_sizes_are_named_before_any_work():
    m = _module()
    for argv, message in (
        (["--classes", "9-12"], r"--classes '9-12': values must be in 0..9; got \[10, 11, 12\]"),
        (["--classes", "a"], "give integers, a range a-b or a list a,b,c"),
        (["--n", "10"], "--n 10: give at least 50"),
    ):
        with pytest.raises(SystemExit, match=message):
            m.main(argv)
    assert m._ints("0,3-4", "--classes", 0, 9) == [0, 3, 4]
