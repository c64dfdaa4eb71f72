"""The README is a user's guide that cannot rot: every shell command and Python block in it runs
here, in order, in a fresh folder, at a small size; the sections of :data:`GROUPS` (your own
diffusers pipeline, Fashion-MNIST) each in a folder of their own, as separate tests that
pytest-xdist can run beside the rest.

* Each ```bash and ```python block of README.md runs as written, with ``cspace`` and
  ``.venv/bin/`` meaning this environment's, except:

  - the blocks in ``NOT_RUN`` (they need the network: the CPU-only torch install, a 5 GB
    download); the test fails when the README gains a block that neither runs nor is listed;
  - the two install commands at the top: their ``python3 -m venv`` and ``pip install`` parts
    need the network and are what ``.ci/run`` runs (checked below, character for character);
    the command after them runs (``cspace demo``; the test suite itself is not run inside
    itself);
  - sizes: every ``cspace`` command gets the options of ``SMALL`` appended (argparse keeps the
    last value of an option), and Python blocks get the replacements of ``SMALL_PY``, each of
    which must match.

* "Your own images" runs on a copy of the shipped threes (the README's own ``cp``), and "your own
  diffusers pipeline" on a folder ``my-images/`` of 64 x 64 RGB PNG images made here, through a
  tiny Stable Diffusion pipeline built from a config and saved by the README's Python block:
  build the set with the pipeline's VAE, check it, sample plain, guided and searched, calibrate.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)

INSTALL_DEMO = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/cspace demo"
INSTALL_TESTS = (
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
)
NOT_RUN = {
    "--index-url https://download.pytorch.org/whl/cpu": "installs torch from the network",
    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5": "downloads about 5 GB",
}
SMALL = {
    "demo": "--n 48 --steps 6 --no-progress",
    "toy": "--n 200 --steps 10 --no-progress",
    "search": "--n 16 --steps 8 --budget 512 --no-progress",
    "sample": "--n 2 --steps 3 --no-progress",
    # --max-hit 1: at 48 samples a tenth of the unguided share of a class is under one sample,
    # and the point here is that the command runs and writes the chosen values back
    "calibrate": "--trials 2 --n 48 --steps 6 --max-hit 1",
}
SMALL_PY = {
    "n, steps, trials = 8, 20, 12": "n, steps, trials = 2, 3, 2",
}
SMALL_BUDGET = "--budget 24"  # sample --search: 2 images x 3 steps x 4 particles


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]


def test_ci_runs_the_readme_test_command_verbatim():
    blocks = [code.strip() for _, code in _blocks()]
    assert INSTALL_DEMO in blocks and INSTALL_TESTS in blocks
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert INSTALL_TESTS in ci, (
        ".ci/run must run the README's test command, character for character"
    )


def test_every_block_is_run_or_said_why_not():
    for lang, code in _blocks():
        skipped = [k for k in NOT_RUN if k in code]
        if lang == "bash" and skipped:
            assert len(skipped) == 1
    assert sum(any(k in code for k in NOT_RUN) for _, code in _blocks()) == len(NOT_RUN)


def _small(line: str) -> str:
    """A README shell line at the test's size (see the module docstring)."""
    if line.startswith("python3 -m venv .venv && "):
        assert line in (INSTALL_DEMO, INSTALL_TESTS), line
        if line == INSTALL_TESTS:
            return ""  # the test suite: this very run
        line = line.rsplit(" && ", 1)[1]
    line = line.replace(".venv/bin/", "")
    words = shlex.split(line, comments=True)
    if words and words[0] == "cspace":
        sub = words[1]
        extra = SMALL.get(sub, "")
        if sub == "sample" and "--search" in words:
            extra += " " + SMALL_BUDGET
        # the command without its comment: options appended after a `#` would be comment too
        line = f"{shlex.join(words)} {extra}" if sub in SMALL else line
    return line


def test_small_sizes_are_appended_before_a_comment():
    line = "cspace demo --data fashion --out d      # or --class 2"
    assert _small(line) == f"cspace demo --data fashion --out d {SMALL['demo']}"
    assert _small("cspace toy") == f"cspace toy {SMALL['toy']}"
    assert _small("ls -l  # not cspace") == "ls -l  # not cspace"


def _my_images(folder: Path, n: int = 6) -> None:
    """A user's own folder of 64 x 64 RGB images: coloured discs on gradients."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) * rng.uniform(0.3, 1.0, 3)
        cy, cx, r = [*rng.integers(16, 48, 2).tolist(), int(rng.integers(6, 16))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        base[disc] = rng.integers(0, 256, 3)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").save(folder / f"{i}.png")


#: README sections whose blocks run in a folder of their own, in parallel with the rest (each
#: needs only what the repository ships and its own earlier blocks); "digits" is every other
#: section, in order
GROUPS = {"pipeline": "## Your own diffusers pipeline", "fashion": "## Fashion-MNIST"}


def _grouped_blocks() -> dict[str, list[tuple[str, str]]]:
    """The README's blocks by group (:data:`GROUPS`), each in the README's order."""
    text = README.read_text()
    heads = [(m.start(), m.group(0)) for m in re.finditer(r"^## .*$", text, re.M)]
    groups: dict[str, list[tuple[str, str]]] = {"digits": [], **{g: [] for g in GROUPS}}
    for m in BLOCK.finditer(text):
        head = [h for pos, h in heads if pos < m.start()][-1]
        group = next((g for g, prefix in GROUPS.items() if head.startswith(prefix)), "digits")
        groups[group].append((m.group(1), m.group(2)))
    return groups


def test_the_groups_cover_every_block_and_every_size_replacement():
    groups = _grouped_blocks()
    assert sum(len(b) for b in groups.values()) == len(_blocks())
    assert all(groups.values()), {g: len(b) for g, b in groups.items()}
    run = [code for _, code in _blocks() if not any(k in code for k in NOT_RUN)]
    for old in SMALL_PY:  # each replacement matches a block that runs
        assert any(old in code for code in run), f"a size replacement that no longer matches: {old}"


def _run_blocks(work: Path, blocks: list[tuple[str, str]]) -> tuple[str, dict, int]:
    """Run ``blocks`` in ``work`` (module docstring); returns (stdout of all, env, blocks run)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env["MPLBACKEND"] = "Agg"
    outputs = []
    ran = 0
    for lang, code in blocks:
        if any(k in code for k in NOT_RUN):
            continue
        if lang == "python":
            for old, new in SMALL_PY.items():
                code = code.replace(old, new)
            cmd = [sys.executable, "-c", code]
        else:
            lines = [_small(x) for x in code.strip().splitlines()]
            script = "\n".join(x for x in lines if x)
            if not script:
                continue
            cmd = ["bash", "-euo", "pipefail", "-c", script]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        print(f"{time.perf_counter() - t0:6.1f} s  {code.strip().splitlines()[0][:70]}")
        assert proc.returncode == 0, (
            f"README block failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
        )
        outputs.append(proc.stdout)
        ran += 1
    return "\n".join(outputs), env, ran


def _info(name: str, work: Path, env: dict) -> dict:
    """``cspace obstacles info NAME --json`` in ``work``."""
    info = subprocess.run(["cspace", "obstacles", "info", name, "--json"], cwd=work, env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(info.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["digits", *GROUPS])
def test_every_readme_command_and_block_runs(tmp_path, group):
    work = tmp_path / "clone"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "cspace").symlink_to(ROOT / "cspace")  # cspace/weights/..., as from the repo root
    if group == "pipeline":
        _my_images(work / "my-images")
    out, env, ran = _run_blocks(work, _grouped_blocks()[group])
    if group == "digits":
        assert ran >= 6
        # the demo's table, the toy, the tour's set and search, the Python API's toy
        assert "class 0" in out and "guided" in out and "inside an obstacle" in out
        assert (work / "cspace-demo" / "report.json").is_file()
        assert (work / "cspace-demo" / "cspace_umap.png").is_file()
        assert (work / "cspace-toy" / "toy.png").is_file()
        # your own images: the set was calibrated (a history entry) after the demo used it
        mine = _info("my-set", work, env)
        assert mine["count"] == 40 and mine["labels"] == {"3": 40}
        assert mine["history"] == 1 and (work / "my-set-calibration" / "trials.csv").is_file()
    elif group == "pipeline":
        assert ran >= 4 and "chosen trial" in out
        # the set is in the tiny pipeline's space, built from the 64 x 64 images
        piped = _info("my-pipeline-set", work, env)
        assert piped["count"] == 6 and piped["dim"] == 4 * 32 * 32
        assert piped["space"]["image_size"] == [64, 64] and piped["space"]["channels"] == 3
        assert piped["history"] == 1  # calibrated by the README's Python block
        for folder in ("plain", "guided", "searched"):
            record = json.loads((work / folder / "record.json").read_text())
            assert sorted(p.name for p in (work / folder).glob("*.png")) == [
                "grid.png",
                "image_000.png",
                "image_001.png",
            ]
            assert (folder == "plain") == ("per_image" not in record)
        assert json.loads((work / "searched" / "record.json").read_text())["nfe"] <= 24
    else:
        assert ran >= 1
        # the demo on the clothes, a set in the shipped pipeline's space, a guided run
        fashion = json.loads((work / "fashion-demo" / "report.json").read_text())
        settings = fashion["settings"]
        assert settings["encoder"] == "fashion" and settings["avoid_class"] == 2
        assert (settings["n"], settings["steps"]) == (48, 6)  # at SMALL's size
        pullovers = _info("pullovers", work, env)
        assert pullovers["count"] == 50 and pullovers["dim"] == 4 * 7 * 7
        assert len(list((work / "no-pullovers").glob("image_*.png"))) == 2
        record = json.loads((work / "no-pullovers" / "record.json").read_text())
        assert record["settings"]["scheduler"] == "heun" and record["nfe"] == 2 * (2 * 3 - 1)
