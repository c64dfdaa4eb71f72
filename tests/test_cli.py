"""The ``cspace`` command line: the toy's claims in the README hold, bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

from cspace.cli import main


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["toy", "--json", "--out", str(out)])
    assert rc == 0
    return json.loads(buf.getvalue())


def test_toy_json_schema(toy_report):
    methods = toy_report["methods"]
    assert "unguided" in methods and "guided" in methods and "guided-backtrack" in methods
    for m in methods.values():
        assert set(m) >= {"hit_rate", "energy_distance", "nfe"}
        assert 0.0 <= m["hit_rate"] <= 1.0
        assert m["energy_distance"] >= 0.0


def test_toy_readme_claims(toy_report):
    """The numbers the README states for the default ``cspace toy``."""
    m = toy_report["methods"]
    assert 0.20 <= m["unguided"]["hit_rate"] <= 0.30  # about 25% of the mass is inside obstacles
    assert m["guided"]["hit_rate"] <= 0.01
    assert m["guided"]["nfe"] == m["unguided"]["nfe"]  # the field costs no NFE
    best = min(v["energy_distance"] for v in m.values())
    assert best <= 0.5 * m["unguided"]["energy_distance"]
    # pure repulsion piles mass at the obstacles' edges: it stays far from the exact target
    assert m["guided"]["energy_distance"] > 5 * toy_report["energy_distance_floor"]
    assert m["guided-backtrack"]["nfe"] > m["unguided"]["nfe"]  # backtracking pays in NFE


def test_toy_png_written(toy_report):
    img = mpimg.imread(toy_report["png"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 400


def test_toy_table_and_options(capsys):
    rc = main(["toy", "--n", "200", "--steps", "10", "--dim", "3", "--seed", "3", "--no-plot"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "unguided" in text and "energy dist" in text and "dim=3" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["toy", "--n", "0"],
        ["toy", "--steps", "-3"],
        ["toy", "--strength", "nan"],
        ["toy", "--dim", "x"],
    ],
)
def test_toy_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_toy_dim_one_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["toy", "--dim", "1"])
    assert exc.value.code == 2
    assert (
        "cspace toy: error: argument --dim: the toy needs --dim >= 2, got 1"
        in capsys.readouterr().err
    )


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "cspace.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "toy" in out.stdout
