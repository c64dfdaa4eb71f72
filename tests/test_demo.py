"""``cspace demo`` on the shipped digits models, at a small size."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from cspace.cli import main
from cspace.experiments.demo import (
    ALL_ARMS,
    ARMS,
    TWISTED_NFE,
    DemoSettings,
    format_report,
    largest_shift,
    renormalised_shift,
    run_demo,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(DemoSettings(n=120, steps=20, paths=2, umap=True), out_dir=out)


@pytest.mark.slow  # the module's demo run: about 25 s
def test_report_schema(report):
    assert set(report["arms"]) == set(ALL_ARMS)
    for m in report["arms"].values():
        assert len(m["class_shares"]) == 10
        assert abs(sum(m["class_shares"]) - 1) < 1e-6
        assert 0 <= m["avoided_rate"] <= 1 and 0 <= m["judge_confidence"] <= 1
        assert m["seconds"] > 0
    assert report["arms"]["unguided"]["nfe"] == 20
    for arm in ("guided", "classifier"):  # backtracking re-runs steps: NFE grow with retries
        m = report["arms"][arm]
        assert (m["nfe"] > 20) == (m["backtrack_retries"] > 0) and m["nfe"] >= 20
    rej = report["arms"]["rejection"]  # every discarded draw is paid for
    assert rej["draws"] >= 120 and rej["nfe"] == pytest.approx(rej["draws"] * 20 / 120)
    assert rej["shortfall"] == 0 and 0 < rej["rejected_share"] < 0.5
    # its first round is the unguided arm's samples: the judge's class counts differ from the
    # unguided arm's only by the redrawn samples (an independent set would differ by far more)
    ung, got = report["arms"]["unguided"]["class_shares"], rej["class_shares"]
    assert 0 < rej["redrawn"] < 120 and rej["draws"] >= 120 + rej["redrawn"]
    assert sum(abs(a - b) * 120 for a, b in zip(ung, got, strict=True)) <= 2 * rej["redrawn"] + 1e-6
    # rejection-pu: the same rejection, its membership a region learnt from the 40 examples
    # against the unguided samples (the kernel model's, 0.4 c of Elkan and Noto's c), its first
    # round those samples
    pu = report["arms"]["rejection-pu"]
    assert pu["region"] == "kernel" and "RBF kernel" in pu["rule"]
    assert pu["draws"] >= 120 + pu["redrawn"] and pu["nfe"] == pytest.approx(pu["draws"] * 20 / 120)
    assert pu["shortfall"] == 0 and 0 < pu["redrawn"] < 120 and 0 < pu["rejected_share"] < 0.5
    got = pu["class_shares"]
    assert sum(abs(a - b) * 120 for a, b in zip(ung, got, strict=True)) <= 2 * pu["redrawn"] + 1e-6
    assert 0 < pu["c"] < 1 and 0.5 <= pu["example_recall"] <= 1
    # on the generated samples, by the judge's labels: most of the class, few of the others
    assert pu["judged_recall"] > 0.5 > 0.2 > pu["judged_false_positive"]
    # twisted SMC: one system of 1.5 x n particles, every NFE counted, none returned inside
    tw = report["arms"]["twisted-smc"]
    assert tw["n_particles"] == int(TWISTED_NFE * 20 * 120) // 20 == 180
    assert tw["nfe"] == pytest.approx(tw["n_particles"] * 20 / 120)
    assert tw["nfe"] <= TWISTED_NFE * report["arms"]["unguided"]["nfe"]
    assert tw["inside_radius"] == 0.0 and 1 <= tw["unique"] <= 120
    assert 0 < tw["mass_inside"] < 0.5  # the particle system's estimate, near rejection's
    # the negation arm: one SDE pass (steps NFE) that moves the samples out of the hard radii
    neg = report["arms"]["negation"]
    assert neg["nfe"] == 20
    assert neg["inside_radius"] < rej["rejected_share"] / 2
    assert report["data_scale"] > 0
    mem = report["membership"]
    assert len(mem["inside_radius_by_class"]) == len(mem["inside_q_star_by_class"]) == 10
    assert mem["recall_radius"] == mem["inside_radius_by_class"][0]
    assert mem["recall_radius"] <= mem["recall_q_star"] <= 1  # Q* > radius: a larger ball
    assert mem["false_positive_radius"] <= mem["false_positive_q_star"] < mem["recall_q_star"]
    assert mem["heldout_class"] > 0 and mem["heldout_other"] > 0
    # the rejection-pu region on the same unseen images: most of the class, few of the others
    assert 0.5 < mem["recall_pu"] <= 1 and mem["false_positive_pu"] < 0.2
    assert report["obstacles"]["count"] == 40
    s = DemoSettings()
    auto = report["obstacles"]["auto_q_star"]
    assert report["obstacles"]["q_star"] == pytest.approx(s.q_star_scale * auto)
    assert report["obstacles"]["radius"] == pytest.approx(s.radius_scale * auto)


@pytest.mark.slow  # the module's demo run: about 25 s
def test_guidance_lowers_the_avoided_rate(report):
    # the defaults give about a tenth of the unguided rate at n = 1000 (README); at n = 120 and
    # 20 steps, a half is a loose bound that still fails if the field does nothing
    base = report["arms"]["unguided"]["avoided_rate"]
    assert base > 0.04
    for arm in ("guided", "classifier"):
        assert report["arms"][arm]["avoided_rate"] < base / 2, arm
    # rejection removes only what its membership test catches (recall < 1 on the judge's class)
    assert report["arms"]["rejection"]["avoided_rate"] < base
    assert report["arms"]["rejection-pu"]["avoided_rate"] < base
    assert json.load(open(report["files"]["report"]))["arms"].keys() == report["arms"].keys()


@pytest.mark.slow  # the module's demo run: about 25 s
def test_figures_written(report):
    """The grids: 10 x 10 digits of 8 x 8 pixels with 1-pixel white borders, upscaled 4 x by
    nearest neighbour (364 x 364), with digits in the cells and different samples per arm; the
    UMAP figure (asked for): the figure's size at 110 dpi, not blank."""
    grids = {}
    for arm in ALL_ARMS:
        img = mpimg.imread(report["files"][f"grid_{arm}"])
        assert img.shape[:2] == (364, 364), (arm, img.shape)
        grey = img if img.ndim == 2 else img[..., 0]
        small = grey[::4, ::4]  # undo the 4 x nearest-neighbour upscale
        assert np.array_equal(np.kron(small, np.ones((4, 4), dtype=small.dtype)), grey)
        assert np.all(small[::9, :] == 1.0) and np.all(small[:, ::9] == 1.0)  # white borders
        cells = small[1:, 1:].reshape(10, 9, 10, 9)[:, :8, :, :8]  # (row, y, col, x)
        assert (cells.std(axis=(1, 3)) > 0.05).all()  # every cell holds a digit, not a blank
        grids[arm] = small
    assert not np.array_equal(grids["unguided"], grids["guided"])
    assert not np.array_equal(grids["unguided"], grids["classifier"])
    umap_png = mpimg.imread(report["files"]["umap"])
    assert umap_png.shape[:2] == (round(8.6 * 110), round(8.2 * 110))  # legend below the map
    assert umap_png[..., :3].std() > 0.05  # points and paths drawn, not an empty canvas


def test_renormalised_shift():
    """An arm that removes the avoided class and keeps the others in their proportions shifts
    nothing once the class is taken out (its raw shift is u_k u_c / (1 - u_c)); one that moves
    mass between two other classes shifts them by the renormalised difference."""

    def rep(arm_shares):
        return {"settings": {"avoid_class": 0},
                "arms": {"unguided": {"class_shares": [0.2, 0.4, 0.4] + [0.0] * 7},
                         "arm": {"class_shares": arm_shares}}}  # fmt: skip

    removed = rep([0.0, 0.5, 0.5] + [0.0] * 7)
    assert renormalised_shift(removed, "arm")[0] == pytest.approx(0.0, abs=1e-12)
    assert largest_shift(removed, "arm") == (pytest.approx(10.0), 1)
    moved = rep([0.0, 0.6, 0.4] + [0.0] * 7)
    assert renormalised_shift(moved, "arm") == (pytest.approx(10.0), 1)
    kept = rep([0.1, 0.3, 0.5, 0.1] + [0.0] * 6)  # 0.3 / 0.9 - 0.5: -16.7 pts; +5.6, +11.1
    assert renormalised_shift(kept, "arm") == (pytest.approx(-100 / 6), 1)
    only = rep([1.0] + [0.0] * 9)  # nothing left to renormalise: the others count as 0
    assert renormalised_shift(only, "arm") == (pytest.approx(-50.0), 1)
    assert renormalised_shift(only, "unguided") is None


def test_paths_follow_each_sample():
    """The UMAP figure's paths: sample j's clean estimates at every step, from the records of
    a sampler whose active rows change (a finished sample leaves the batch)."""
    import torch

    from cspace.experiments.demo import _paths_of

    records = [
        (torch.tensor([0, 1, 2]), torch.tensor([[0.0], [10.0], [20.0]])),
        (torch.tensor([1, 2]), torch.tensor([[11.0], [21.0]])),  # sample 0 finished
        (torch.tensor([2]), torch.tensor([[22.0]])),
    ]
    paths = _paths_of(records, 3)
    assert [p.ravel().tolist() for p in paths] == [[0.0], [10.0, 11.0], [20.0, 21.0, 22.0]]


@pytest.mark.slow  # two small demo runs: about 20 s
def test_progress_the_largest_shift_and_umap_only_when_asked(tmp_path, run_cli):
    """The demo says what it is doing and shows a bar per arm on stderr (none with
    --no-progress); its table gives each guided arm's largest shift of another class; without
    --umap it draws no UMAP figure."""
    argv = ["demo", "--n", "30", "--steps", "4", "--out", tmp_path / "d"]
    rc, out, err = run_cli(argv)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "report.json", "samples_classifier.png", "samples_guided.png", "samples_negation.png",
        "samples_rejection-pu.png", "samples_rejection.png", "samples_twisted-smc.png",
        "samples_unguided.png",
    ]  # fmt: skip
    assert "umap:" not in out
    assert "sampling 30 digits, arm rejection (" in err
    assert "sampling 30 digits, arm rejection-pu (" in err
    for arm in (*ARMS, "twisted-smc", "negation"):
        assert f"sampling 30 digits, arm {arm}" in err
        assert f"{arm:<12}: 100%" in err and "4/4" in err  # the arm's bar, finished
    assert "building the obstacle set" in err and "fitting the judge" in err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    for arm in ALL_ARMS[1:]:  # every arm's renormalised shift in the table
        shift, cls = renormalised_shift(report, arm)
        assert f"{arm:<12}" in out and f"{shift:+.1f} pts (class {cls})" in out
        assert cls != report["settings"]["avoid_class"]
    assert "twisted-smc: 45 particles" in out and "0.0% inside a hard radius" in out
    rc, out, err = run_cli([*argv, "--no-progress"])
    assert rc == 0 and err == ""
    rc, _, err = run_cli(["demo", "--umap", "--no-umap"])
    assert rc == 2 and "contradict" in err


@pytest.mark.slow  # a small demo run: about 10 s
def test_json_writes_nothing_without_out(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli(["demo", "--n", "20", "--steps", "3", "--json", "--no-progress"])
    assert rc == 0 and "files" not in json.loads(out)
    rc, out, _ = run_cli(["toy", "--n", "50", "--steps", "3", "--json"])
    assert rc == 0 and "png" not in json.loads(out)
    assert list(tmp_path.iterdir()) == []  # nothing written to the working folder
    rc, _, err = run_cli(["demo", "--json", "--umap"])
    assert rc == 2 and "--out" in err
    rc, out, _ = run_cli(["toy", "--n", "50", "--steps", "3"])  # without --json: the figure
    assert rc == 0 and (tmp_path / "cspace-toy" / "toy.png").is_file()


@pytest.mark.slow  # two small demo runs: about 30 s
def test_your_own_set_and_classifier(tmp_path, run_cli):
    """--obstacles and --classifier take your own set and classifier, with the demo's sampler and
    judge: a set built with the parameters `cspace obstacles build` prints as the demo's gives
    the demo's own guided arm. A set or classifier of another C-space is refused with both
    spaces named."""
    import re

    from cspace.experiments.demo import EXAMPLES

    rc, out, err = run_cli(["obstacles", "build", EXAMPLES / "3", "--out", tmp_path / "auto"])
    assert rc == 0, err
    printed = re.search(r"to build the same: (--q-star \S+ --radius \S+)\)", out)
    assert "the demo's parameters for these images: Q* = 1.5 x auto" in out and printed
    own = tmp_path / "threes"
    rc, out, err = run_cli(["obstacles", "build", EXAMPLES / "3", "--out", own,
                            *printed.group(1).split()])  # fmt: skip
    assert rc == 0, err
    clf = tmp_path / "clf"
    rc, _, err = run_cli(["obstacles", "classifier", "--good", EXAMPLES / "1", EXAMPLES / "7",
                          "--bad", EXAMPLES / "3", "--out", clf])  # fmt: skip
    assert rc == 0, err
    argv = ["demo", "--class", "3", "--n", "60", "--steps", "5", "--no-progress"]
    rc, out, err = run_cli(
        [*argv, "--obstacles", own, "--classifier", clf, "--out", tmp_path / "d"]
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["obstacles"]["set"] == str(own) and "examples" not in report["obstacles"]
    assert report["obstacles"]["count"] == 40 and report["classifier"]["folder"] == str(clf)
    assert f"the obstacle set {own} (40 obstacles)" in out
    rc, _, err = run_cli([*argv, "--out", tmp_path / "demo"])  # the demo's own set
    assert rc == 0, err
    demo = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["arms"]["guided"]["class_shares"] == demo["arms"]["guided"]["class_shares"]
    assert report["obstacles"]["q_star"] == pytest.approx(demo["obstacles"]["q_star"], rel=1e-5)
    plain = tmp_path / "plain"
    rc, _, err = run_cli(["obstacles", "build", EXAMPLES / "3", "--out", plain,
                          "--encoder", "digits-plain"])  # fmt: skip
    assert rc == 0, err
    rc, _, err = run_cli([*argv, "--obstacles", plain])
    assert rc == 2 and "different C-spaces" in err and "vf=0," in err and "vf=0.1" in err
    rc, _, err = run_cli([*argv, "--encoder", "digits-plain", "--classifier", clf])
    assert rc == 2 and "different C-spaces" in err and "the classifier" in err


def test_cli_json_and_bad_class(tmp_path, capsys):
    rc = main(["demo", "--n", "40", "--steps", "5", "--no-umap", "--json", "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["arms"]) == set(ALL_ARMS)
    with pytest.raises(SystemExit):
        main(["demo", "--class", "11"])
    with pytest.raises(SystemExit):
        main(["demo", "--strength", "-1"])
    with pytest.raises(SystemExit):
        main(["demo", "--q-star-scale", "0"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "euler"}, "backtracking re-draws noise"),
        ({"method": "rk4", "backtrack": False}, "unknown sampler method"),
        ({"q_star_scale": 0.0}, "q_star_scale"),
        ({"strength": float("nan")}, "strength"),
        ({"n": 0}, "n >= 1"),
        ({"pu_region": "quadratic"}, r"pu_region must be one of \('kernel', 'linear'\)"),
    ],
)
def test_bad_settings(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_demo(DemoSettings(**kwargs), out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_rejection_pu_is_skipped_with_a_reason_when_it_cannot_be_fit():
    """Fewer than 2 samples: no positive-unlabelled fit; the demo finishes, says why, and the
    other arms are there."""
    report = run_demo(DemoSettings(n=1, steps=2, backtrack=False), out_dir=None)
    assert "rejection-pu" not in report["arms"] and "rejection" in report["arms"]
    assert "at least 2 examples and 2 samples; got 40 and 1" in report["skipped"]["rejection-pu"]
    assert "rejection-pu: skipped (" in format_report(report)


def test_rejection_pu_with_the_linear_region():
    """``pu_region="linear"``: the half-space of the linear positive-unlabelled fit, recorded
    as such, with the same accounting as the kernel region, and said while it runs."""
    lines = []
    report = run_demo(DemoSettings(n=60, steps=10, backtrack=False, pu_region="linear"),
                      out_dir=None, log=lines.append)  # fmt: skip
    pu = report["arms"]["rejection-pu"]
    assert pu["region"] == "linear" and pu["shortfall"] == 0 and "kernel" not in pu["rule"]
    assert pu["draws"] >= 60 + pu["redrawn"] and 0 < pu["c"] < 1
    assert any("a linear classifier of the 40 examples" in line for line in lines)
