"""Execute every notebook in notebooks/ (small settings) and check they are stored without outputs.

Each notebook runs in a fresh ``python3`` kernel whose working directory is a temporary folder (so
nothing is written to the repository), with ``CSPACE_NB_SMALL=1`` in its environment: notebooks
read it to shrink their sample sizes and grids.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}: the notebook tests would test nothing"


def _read(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stored_without_outputs(path: Path) -> None:
    nb = _read(path)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} are stored with outputs or execution counts; clear them "
        f"(e.g. jupyter nbconvert --clear-output --inplace {path.name})"
    )
    assert not any(cell.get("attachments") for cell in nb.cells), f"{path.name}: cell attachments"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_its_takeaway(path: Path) -> None:
    last = _read(path).cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith(
        "## What to take from this notebook"
    ), f"{path.name}: the last cell must say what the reader should take from the notebook"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSPACE_NB_SMALL", "1")  # inherited by the kernel process
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell raises
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    # no warnings in what a reader sees (tqdm's "IProgress not found", deprecations, ...)
    stderr = [
        o.text
        for cell in nb.cells
        for o in cell.get("outputs", [])
        if o.output_type == "stream" and o.name == "stderr"
    ]
    warned = [t for t in stderr if "warn" in t.lower() or "IProgress" in t]
    assert not warned, f"{path.name}: warnings in the output: {warned[0][:300]}"
