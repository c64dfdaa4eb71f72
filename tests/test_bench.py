"""``cspace bench field`` at a small size: every backend agrees with the reference."""

from __future__ import annotations

import json

from cspace.cli import main
from cspace.cli_bench import bench_field


def test_bench_field_small():
    rep = bench_field(n=2000, d=8, b=8, q_quantile=0.01, repeats=1)
    names = [r["backend"] for r in rep["rows"]]
    assert names == ["reference", "pruned", "faiss-range", "torch-eager"]
    for r in rep["rows"]:
        exact = r["backend"] != "torch-eager"  # float32 and the expansion: approximate
        assert r["seconds"] > 0 and r["x_floor"] > 0
        assert r["force_rel_error"] < (1e-10 if exact else 1e-2), r
    assert rep["floor"]["seconds"] > 0 and rep["q_star"] > 0


def test_bench_cli_json_and_errors(capsys):
    assert main(["bench", "field", "--n", "500", "--d", "4", "--b", "4", "--repeats", "1",
                 "--json"]) == 0  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 500 and len(rep["rows"]) == 4
    assert main(["bench", "field", "--n", "500", "--q-star-quantile", "2"]) == 2
    assert "quantile" in capsys.readouterr().err
