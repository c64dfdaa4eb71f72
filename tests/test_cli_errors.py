"""No input ends in a traceback: every ``cspace`` path with an adversarial value gives one line
``cspace COMMAND: error: ...`` naming the culprit, exit code 2 (1 for an unexpected error), and
``--debug`` shows the traceback instead.

Every case fails at validation, before any heavy work (no model is trained, no large sample is
drawn): the table is fast.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from cspace.cli import main


def run(argv, capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``cspace argv``; argparse's usage errors included."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def paths(tmp_path):
    """``FILE`` (a file), ``DIR`` (an empty folder), ``NEW`` (a path that does not exist yet),
    ``SET5`` (an obstacle set of dimension 5)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir").mkdir()
    from obstacles import ObstacleSet

    ObstacleSet.from_embeddings(np.zeros((2, 5)), q_star=1.0).save(tmp_path / "set5")
    return {
        "FILE": tmp_path / "afile",
        "DIR": tmp_path / "dir",
        "NEW": tmp_path / "new",
        "SET5": tmp_path / "set5",
    }


def _fill(argv, paths):
    out = []
    for a in argv:
        for key, val in paths.items():
            a = a.replace(key, str(val))
        out.append(a)
    return out


HUGE = "1e20"  # beyond any budget (2**63 - 1 NFE)
SEARCH = ["search", "--n", "4", "--steps", "5"]
CASES = [
    # toy
    (["toy", "--dim", "1"], "argument --dim: the toy needs --dim >= 2"),
    (["toy", "--dim", "1e15", "--no-plot"], "lower the dimension (--dim)"),
    (["toy", "--n", "1e12", "--no-plot"], "more than max_draws=50,000,000"),
    (["toy", "--steps", "1e12", "--n", "10", "--no-plot"], "a time grid of 1,000,000,000,000"),
    (["toy", "--seed", "-1"], "argument --seed: expected a seed in 0..4294967295"),
    (["toy", "--seed", "1e30"], "argument --seed: expected a seed in 0..4294967295"),
    (["toy", "--strength", "inf"], "argument --strength: expected a finite number"),
    (["toy", "--out", "FILE/x", "--n", "10", "--steps", "2"], "which is a file, not a folder"),
    (["toy", "--out", "FILE", "--n", "10", "--steps", "2"], "afile is a file, not a folder"),
    # search: budgets beyond 64 bits, plans beyond memory, values that used to name no culprit
    *[
        ([*SEARCH, "--algo", a, "--budget", HUGE], "budget is a whole number of NFE in 0..")
        for a in ("best-of-n", "zero-order", "paths", "smc", "smc-guided", "backtrack")
    ],
    *[
        ([*SEARCH, "--algo", a, "--budget", "1e18"], "more than this machine's memory")
        for a in ("best-of-n", "paths", "smc", "smc-guided")
    ],
    ([*SEARCH, "--algo", "smc", "--budget", "1e3", "--n", "1e12"], "more than max_draws"),
    ([*SEARCH, "--algo", "smc", "--budget", "1e3", "--coverage", "1e-6"], "raise the coverage"),
    ([*SEARCH, "--algo", "smc", "--budget", "1e3", "--dim", "1e15"], "lower the dimension"),
    ([*SEARCH, "--algo", "smc", "--budget", "10"], "raise the budget"),
    (["experiment", "scaling", "--quick", "--out", "FILE/x"], "which is a file, not a folder"),
    # calibrate: a budget below one trial's cost is refused before anything runs
    (["calibrate", "NEW", "--model", "toy", "--init", "--budget", "1"], "25,600 NFE"),
    (
        ["calibrate", "NEW", "--model", "toy", "--init", "--budget", "999", "--n", "100"],
        "less than one trial costs: 5,000 NFE (100 samples x 50 steps)",
    ),
    (["calibrate", "NEW", "--model", "toy", "--init", "--out", "FILE/x"], "study folder (--out)"),
    (["calibrate", "FILE/x", "--model", "toy", "--init"], "which is a file, not a folder"),
    (["calibrate", "NEW", "--model", "toy", "--seed", "-1"], "argument --seed"),
    (["calibrate", "FILE", "--model", "toy"], "is not an obstacle set"),
    (["calibrate", "SET5", "--model", "toy", "--no-write"], "needs a set of dimension 2; got 5"),
    (["calibrate", "SET5", "--model", "toy", "--max-hit", "2"], "--max-hit is a share"),
    # bench
    (["bench", "field", "--n", "1e12"], "more than this machine's memory"),
    (["bench", "field", "--d", "1e12"], "more than this machine's memory"),
    (["bench", "field", "--n", "100", "--device", "foo"], "--device 'foo' is not a torch device"),
    (["bench", "field", "--n", "100", "--out", "DIR"], "is a folder, not a file"),
    (["bench", "field", "--n", "100", "--out", "FILE/x"], "afile is a file, not a folder"),
    # train: output paths checked before training
    (["train", "teacher", "--out", "FILE/x"], "which is a file, not a folder"),
    (["train", "vae", "--out", "FILE/x"], "which is a file, not a folder"),
    (["train", "flow", "--out", "FILE/x", "--no-eval"], "which is a file, not a folder"),
    (["train", "flow", "--out", "NEW", "--checkpoint", "DIR"], "is a folder, not a file"),
    (["train", "flow", "--seed", "4294967296"], "argument --seed"),
    (["train", "judge", "--out", "FILE/x"], "which is a file, not a folder"),
    (["train", "judge", "--epochs", "0"], "argument --epochs"),
    (["train", "judge", "--data", "DIR", "--out", "NEW"], "dir/FashionMNIST/raw does not exist"),
    (
        [
            "train",
            "vae",
            "--out",
            "NEW",
            "--teacher",
            "vit_large_patch14_dinov2.lvd142m",
            "--teacher-weights",
            "FILE",
        ],
        "expected a .safetensors file",
    ),
    # demo: checked before any model is loaded
    (["demo", "--out", "FILE/x"], "which is a file, not a folder"),
    (["demo", "--device", "foo", "--out", "NEW"], "--device 'foo' is not a torch device"),
    (["demo", "--n", "1e14", "--out", "NEW"], "lower --n"),
    (["demo", "--seed", "-1"], "argument --seed"),
    # obstacles
    (["obstacles", "build", "DIR", "--out", "FILE/x"], "which is a file, not a folder"),
    (
        ["obstacles", "build", "DIR", "--out", "NEW", "--batch-size", "0"],
        "expected an integer >= 1",
    ),
    (
        [
            "obstacles",
            "classifier",
            "--good",
            "DIR",
            "--bad",
            "DIR",
            "--out",
            "NEW",
            "--seed",
            "-1",
        ],
        "argument --seed",
    ),
    (["obstacles", "info", "FILE"], "neither an obstacle set nor a classifier"),
    # sample
    (["sample", "--pipeline", "DIR", "--device", "foo"], "--device 'foo' is not a torch device"),
    (["sample", "--pipeline", "DIR", "--out", "FILE/x"], "which is a file, not a folder"),
    (["sample", "--pipeline", "FILE"], "no diffusers pipeline"),
]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(argv, fragment, paths, capsys):
    rc, _, err = run(_fill(argv, paths), capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    line = [s for s in err.splitlines() if "error:" in s]
    assert len(line) == 1 and line[0].startswith(f"cspace {argv[0]}"), err
    assert fragment in err, err
    assert not paths["NEW"].exists()  # nothing was written


def test_integers_may_be_written_in_scientific_notation(capsys):
    from cspace.cli.args import positive_int

    assert positive_int("1e6") == 1_000_000 and positive_int("2.5e3") == 2500
    for bad in ("2.5", "nan", "inf", "1e99999"):
        rc, _, err = run(["toy", "--n", bad], capsys)
        assert rc == 2 and "argument --n: expected an integer" in err


# ---------------------------------------------------------------------- the top-level handler
def _raising(monkeypatch, err: BaseException) -> None:
    """``cspace toy`` raises ``err``."""
    import cspace.experiments.toy as toy_mod

    def boom(*a, **k):
        raise err

    monkeypatch.setattr(toy_mod, "run_toy", boom)


@pytest.mark.parametrize(
    "err, code, fragment",
    [
        (OverflowError("cannot convert float infinity to integer"), 2, "float infinity"),
        (RecursionError("maximum recursion depth exceeded"), 2, "nested too deeply"),
        (MemoryError("Unable to allocate 233. TiB"), 2, "out of memory (Unable to allocate 233."),
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                "3200000000000 bytes. Error code 12"
            ),
            2,
            "out of memory (tried to allocate 2.9 TiB)",
        ),
        (FileNotFoundError(2, "No such file or directory", "/x/y"), 2, "directory: /x/y"),
        (PermissionError(13, "Permission denied", "/root/z"), 2, "Permission denied: /root/z"),
        (json.JSONDecodeError("Expecting value", "{", 1), 2, "Expecting value"),
        (TypeError("unsupported operand"), 1, "unexpected error: TypeError: unsupported"),
        (KeyError("q_star"), 1, "unexpected error: KeyError"),
        (AssertionError("Torch not compiled with CUDA enabled"), 1, "unexpected error"),
    ],
)
def test_every_error_is_one_line(err, code, fragment, monkeypatch, capsys):
    _raising(monkeypatch, err)
    rc, _, text = run(["toy", "--no-plot"], capsys)
    assert rc == code
    assert text.count("\n") == 1 and text.startswith("cspace toy: error: ") and fragment in text
    if code == 1:
        assert "--debug" in text


def test_project_errors_that_are_not_value_errors_are_user_errors(monkeypatch, capsys):
    from cspace.models.toy import RejectionSamplingError
    from guidance.search import BudgetExceeded

    for err in (BudgetExceeded("needs 5 NFE"), RejectionSamplingError("cover almost all")):
        _raising(monkeypatch, err)
        rc, _, text = run(["toy"], capsys)
        assert rc == 2 and text == f"cspace toy: error: {err}\n"


def test_debug_shows_the_traceback(monkeypatch, capsys):
    _raising(monkeypatch, TypeError("boom"))
    for argv in (["--debug", "toy"], ["toy", "--debug", "--no-plot"]):
        with pytest.raises(TypeError, match="boom"):
            main(argv)
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0 and "--debug" in out


def test_interrupt_is_one_line(monkeypatch, capsys):
    _raising(monkeypatch, KeyboardInterrupt())
    try:
        rc, _, err = run(["toy"], capsys)
    except KeyboardInterrupt:  # must not stop the test session when it fails
        pytest.fail("the interrupt escaped main()")
    assert rc == 130 and err == "cspace toy: interrupted\n"


def test_library_warnings_are_one_line(monkeypatch, capsys):
    import cspace.experiments.toy as toy_mod
    from cspace.io.images import SkippedFilesWarning

    def warn(*a, **k):
        warnings.warn("folder: skipped 1 entries", SkippedFilesWarning, stacklevel=1)
        return {"methods": {}, "problem": {}}

    monkeypatch.setattr(toy_mod, "run_toy", warn)
    monkeypatch.setattr(toy_mod, "format_table", lambda rep: "table")
    rc, out, err = run(["toy"], capsys)
    assert rc == 0 and out == "table\n"
    assert err == "cspace toy: warning: folder: skipped 1 entries\n"


def test_a_manifest_count_of_infinity_is_one_line(tmp_path, capsys):
    """A crafted manifest (``"count": Infinity``) used to end in a raw OverflowError."""
    from obstacles import ObstacleSet

    path = tmp_path / "set"
    ObstacleSet.from_embeddings(np.zeros((2, 3)), q_star=1.0).save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["count"] = float("inf")
    (path / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run(["obstacles", "info", path], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("cspace obstacles: error: ") and err.count("\n") == 1
