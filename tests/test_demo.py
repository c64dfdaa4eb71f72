"""``cspace demo`` on the shipped digits models, at a small size."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from cspace.cli import main
from cspace.demo import ARMS, DemoSettings, run_demo


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(DemoSettings(n=120, steps=20, paths=2), out_dir=out)


def test_report_schema(report):
    assert set(report["arms"]) == set(ARMS)
    for m in report["arms"].values():
        assert len(m["class_shares"]) == 10
        assert abs(sum(m["class_shares"]) - 1) < 1e-6
        assert 0 <= m["avoided_rate"] <= 1 and 0 <= m["judge_confidence"] <= 1
        assert m["nfe"] == 20 and m["seconds"] > 0
    assert report["obstacles"]["count"] == 40
    assert json.load(open(report["files"]["report"]))["arms"].keys() == report["arms"].keys()


def test_figures_written(report):
    for key in ("grid_unguided", "grid_guided", "grid_classifier", "umap"):
        img = mpimg.imread(report["files"][key])
        assert img.ndim in (2, 3) and img.shape[0] > 100


def test_cli_json_and_bad_class(tmp_path, capsys):
    rc = main(["demo", "--n", "40", "--steps", "5", "--no-umap", "--json", "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["arms"]) == set(ARMS)
    with pytest.raises(SystemExit):
        main(["demo", "--class", "11"])
