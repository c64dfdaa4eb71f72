"""``cspace demo`` on the shipped digits models, at a small size."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from cspace.cli import main
from cspace.experiments.demo import ALL_ARMS, DemoSettings, run_demo


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(DemoSettings(n=120, steps=20, paths=2), out_dir=out)


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
    mem = report["membership"]
    assert len(mem["inside_radius_by_class"]) == len(mem["inside_q_star_by_class"]) == 10
    assert mem["recall_radius"] == mem["inside_radius_by_class"][0]
    assert mem["recall_radius"] <= mem["recall_q_star"] <= 1  # Q* > radius: a larger ball
    assert mem["false_positive_radius"] <= mem["false_positive_q_star"] < mem["recall_q_star"]
    assert mem["heldout_class"] > 0 and mem["heldout_other"] > 0
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
    assert json.load(open(report["files"]["report"]))["arms"].keys() == report["arms"].keys()


@pytest.mark.slow  # the module's demo run: about 25 s
def test_figures_written(report):
    """The grids: 10 x 10 digits of 8 x 8 pixels with 1-pixel white borders, upscaled 4 x by
    nearest neighbour (364 x 364), with digits in the cells and different samples per arm; the
    UMAP figure: the figure's size at 110 dpi, not blank."""
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
    assert umap_png.shape[:2] == (round(6.5 * 110), round(7.5 * 110))
    assert umap_png[..., :3].std() > 0.05  # points and paths drawn, not an empty canvas


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
    ],
)
def test_bad_settings(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_demo(DemoSettings(**kwargs), out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
