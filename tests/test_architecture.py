"""The layers hold, and the contract that says so can fail.

Layers, lowest first: ``cspace.io`` < ``cspace.models`` < ``obstacles`` < ``guidance`` <
``cspace.experiments`` < ``cspace.cli``; a module never imports a higher layer (lazy imports
count) and no sibling packages or modules import each other in a cycle. The contracts live in
pyproject.toml (import-linter) and run here on the package and on copies of it with an upward
import, a lazy upward import and a cycle planted in them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cspace", "obstacles", "guidance")
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", LINT, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "weights", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def test_the_layer_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("where", "code", "expect"),
    [
        ("obstacles/_probe.py", "from guidance import sample\n", "obstacles._probe -> guidance"),
        (
            "cspace/models/_probe.py",
            "def f():\n    from cspace.experiments import demo\n    return demo\n",
            "cspace.models._probe -> cspace.experiments.demo",
        ),
        ("cspace/io/_probe.py", "import obstacles.obstacle_set\n", "cspace.io._probe -> obstacles"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, where, code, expect):
    root = _copy(tmp_path)
    (root / where).write_text(code)
    out = _lint(root)
    assert out.returncode != 0, out.stdout
    assert "0 broken" not in out.stdout and expect in out.stdout


def test_a_cycle_breaks_the_contract(tmp_path):
    root = _copy(tmp_path)
    (root / "guidance" / "_a.py").write_text("from guidance import _b\n")
    (root / "guidance" / "_b.py").write_text("def f():\n    from guidance import _a\n")
    out = _lint(root)
    assert out.returncode != 0, out.stdout
    assert "no import cycles" in out.stdout and "BROKEN" in out.stdout


def test_the_command_line_holds_no_library_code():
    """Nothing imports cspace.cli but its own modules; its modules export only ``register``
    (the package: ``main``, ``build_parser``); benchmarks, scripts and notebooks use the library."""
    import cspace.cli as cli

    assert set(cli.__all__) == {"build_parser", "main"}
    for module in cli.COMMANDS:
        assert module.__all__ == ["register"], module.__name__
    pattern = re.compile(
        r"^\s*(from cspace\.cli\b|import cspace\.cli\b|from cspace import cli)", re.M
    )
    scripts = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py")]
    for path in [*scripts, *ROOT.glob("notebooks/*.ipynb")]:
        text = path.read_text()
        if path.suffix == ".ipynb":
            cells = json.loads(text)["cells"]
            text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert not pattern.search(text), f"{path.name} imports the command line"


def test_the_command_line_parses_without_torch():
    """Parsing (``cspace --help``, argument errors) imports no torch: the library is imported
    inside each command."""
    code = "import sys, cspace.cli; print(sorted(m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_command_line_names_are_the_library_names():
    """The CLI keeps the library's names as constants (so that parsing needs no torch); they
    must be the library's."""
    from cspace.cli import bench as cli_bench
    from cspace.cli import search as cli_search
    from cspace.experiments import bench, search
    from guidance.search import ALGORITHMS

    assert cli_search.ALGOS == tuple(ALGORITHMS) == search.ALGOS
    from guidance.search.rejection_pu import REGIONS

    assert cli_search.PU_REGIONS == REGIONS
    assert cli_search.TOY_VERIFIERS == search.TOY_VERIFIERS
    assert cli_search.DIGITS_VERIFIERS == search.DIGITS_VERIFIERS
    from guidance.sampling import STEPS
    from guidance.search.twisted import PROPOSALS

    assert cli_search.METHODS == tuple(STEPS)
    assert cli_search.PROPOSALS == PROPOSALS
    assert cli_bench.BACKENDS == bench.BACKENDS
    assert set(cli_bench.DTYPES) == set(bench.DTYPES)
