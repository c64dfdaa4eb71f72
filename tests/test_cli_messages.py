"""What the command line says and where it writes: sizes refused or resized, numbers in JSON,
training into a user folder, the weights advice, and the import names shared with other
distributions."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _rgb_folder(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random RGB PNGs of ``size`` x ``size`` in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder


def _grey_folder(folder: Path, n: int, size: int) -> Path:
    """``n`` grey PNGs of the shipped digit 3 examples, resized to ``size`` x ``size``."""
    folder.mkdir(parents=True)
    for f in sorted((DIGITS / "3").glob("*.png"))[:n]:
        Image.open(f).resize((size, size), Image.NEAREST).save(folder / f.name)
    return folder


def test_a_folder_of_another_size_is_refused_naming_both(tmp_path, run_cli):
    """A 64 x 64 folder with the 8 x 8 digits VAE: refused (it used to give d = 2048 with
    --size 64), with both sizes named; --resize resizes and says so."""
    big = _grey_folder(tmp_path / "big", 6, 64)
    out = tmp_path / "set"
    rc, _, err = run_cli(["obstacles", "build", big, "--out", out])
    assert rc == 2 and "64x64 pixels, expected 8x8" in err and "--resize" in err
    rc, _, err = run_cli(["obstacles", "build", big, "--out", out, "--size", "64"])
    assert rc == 2 and "8x8" in err and "64x64" in err and "d = 2048" in err
    assert not out.exists()
    rc, text, err = run_cli(["obstacles", "build", big, "--out", out, "--resize"])
    assert rc == 0, err
    assert "cspace obstacles: note: resized 6 of 6 images to 8x8 (from 64x64: 6)" in err
    assert "d=32" in text and "images 8x8" in text
    rc, _, err = run_cli(["obstacles", "classifier", "--good", _grey_folder(tmp_path / "g", 6, 16),
                          "--bad", big, "--out", tmp_path / "clf"])  # fmt: skip
    assert rc == 2 and "16x16 pixels, expected 8x8" in err


def test_resize_keeps_values_in_range_and_an_8x8_image_unchanged(tmp_path):
    from cspace.io.images import ImagesResizedNote, load_images

    small = _grey_folder(tmp_path / "small", 3, 8)
    same, _ = load_images([small], size=(8, 8), resize=True)
    plain, _ = load_images([small], size=(8, 8))
    assert np.array_equal(same.numpy(), plain.numpy())  # nothing to resize: bit for bit
    big = _rgb_folder(tmp_path / "big", 2, 20)
    with pytest.warns(ImagesResizedNote, match="resized 2 of 2 images to 8x8"):
        got = load_images([big], size=(8, 8), channels=3, resize=True)
    assert got.images.shape == (2, 3, 8, 8) and len(got.resized) == 2
    assert float(got.images.min()) >= -1 and float(got.images.max()) <= 1


def test_a_diffusers_vae_takes_another_size_with_a_note(tmp_path, run_cli):
    from cspace.models.tiny_pipelines import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")  # RGB, config sample_size 32
    imgs = _rgb_folder(tmp_path / "imgs", 4, 16)
    rc, text, err = run_cli(["obstacles", "build", imgs, "--out", tmp_path / "set",
                             "--encoder", tmp_path / "vae", "--size", "16"])  # fmt: skip
    assert rc == 0, err
    assert "note: --size 16 (16x16) differs from the encoder" in text and "32x32" in text
    rc, _, err = run_cli(["obstacles", "build", imgs, "--out", tmp_path / "s2",
                          "--encoder", tmp_path / "vae"])  # fmt: skip
    assert rc == 2 and "16x16 pixels, expected 32x32" in err


def test_obstacles_info_json_has_numbers(tmp_path, run_cli):
    out = tmp_path / "set"
    assert run_cli(["obstacles", "build", DIGITS / "3", "--out", out])[0] == 0
    rc, text, _ = run_cli(["obstacles", "info", out, "--json"])
    assert rc == 0
    info = json.loads(text)
    for key in ("q_star", "eta", "radius"):
        st = info[key]
        assert set(st) == {"min", "median", "max"}
        assert all(isinstance(v, float) for v in st.values())
        assert st["min"] <= st["median"] <= st["max"]
    assert info["eta"] == {"min": 1.0, "median": 1.0, "max": 1.0}
    assert info["radius"]["max"] == pytest.approx(0.5 * info["q_star"]["max"])
    rc, text, _ = run_cli(["obstacles", "info", out])
    assert rc == 0 and f"q_star: {info['q_star']['min']:.4g}" in text  # the text keeps its form


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_training_writes_to_a_user_folder(tmp_path, run_cli, monkeypatch):
    """`cspace train flow` without --out used to overwrite the shipped weights inside the
    package; now it writes to the working folder and says how to use the result."""
    from cspace.models.flow import load_flow
    from cspace.models.shipped import shipped

    before = _digest(shipped("flow_aligned"))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["train", "flow", "--steps", "20", "--no-eval", "--quiet"])
    assert rc == 0, err
    assert (tmp_path / "cspace-flow-digits" / "manifest.json").is_file()
    assert "load_flow('cspace-flow-digits')" in out
    assert _digest(shipped("flow_aligned")) == before
    assert load_flow(tmp_path / "cspace-flow-digits").meta["training"]["steps"] == 20


def test_weights_advice_names_hf_download(tmp_path):
    from cspace.io.errors import MissingWeightsError
    from cspace.models.encoders import Encoder
    from guidance.integrations.pipelines import load_pipeline

    for call in (lambda: Encoder.from_diffusers(tmp_path), lambda: load_pipeline(tmp_path)):
        with pytest.raises(MissingWeightsError, match="`hf download ") as info:
            call()
        assert "huggingface-cli" not in str(info.value)


# ---------------------------------------------------------------------- shared import names
def _fake_distribution(site: Path, name: str, version: str, top_level: str | None) -> None:
    """A distribution's metadata only (no code), as pip leaves it in site-packages."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if top_level is not None:
        (info / "top_level.txt").write_text(top_level + "\n")


def _import(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_another_distribution_of_a_shared_name_stops_the_import(tmp_path):
    """`guidance` (the LLM library) and `obstacles` are also PyPI distributions: installed beside
    cspace, importing ours fails with a message naming both."""
    site = tmp_path / "site"
    _fake_distribution(site, "guidance", "0.2.1", None)  # claims the name by its own name
    r = _import(site, "import guidance")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "NameClashError" in last and "'guidance'" in last and "guidance 0.2.1" in last
    assert "cspace (this package" in last and "large language models" in last
    assert "pip uninstall guidance" in last
    other = tmp_path / "other"
    _fake_distribution(other, "obstacle-course", "1.0", "obstacles")  # by its top_level.txt
    r = _import(other, "import obstacles")
    assert r.returncode != 0 and "obstacle-course 1.0" in r.stderr.strip().splitlines()[-1]
    r = _import(site, "import obstacles; print('fine')")  # only the name claimed stops
    assert r.returncode == 0 and r.stdout.strip() == "fine", r.stderr


def test_no_clash_in_this_environment():
    from cspace.io.names import claimants

    assert claimants("guidance") == () and claimants("obstacles") == ()
    with pytest.raises(ValueError, match="not one of"):
        claimants("cspace")


def test_the_command_names_the_clash_in_one_line(tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "guidance", "0.2.1", None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "cspace.cli", "toy", "--n", "10", "--no-plot"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("cspace toy: error: the import name 'guidance' is claimed")
    assert len(r.stderr.strip().splitlines()) == 1


def test_progress_on_stderr(tmp_path, run_cli):
    """Commands that can take more than a few seconds show progress on stderr (stdout stays
    the report), and --no-progress turns it off."""
    argv = ["obstacles", "build", DIGITS / "3", "--batch-size", "8", "--out", tmp_path / "s"]
    rc, out, err = run_cli(argv)
    assert rc == 0 and "encoding" in err and "40/40" in err and "encoding" not in out
    rc, _, err = run_cli([*argv[:-1], tmp_path / "s2", "--no-progress"])
    assert rc == 0 and err == ""
    rc, out, err = run_cli(["toy", "--n", "50", "--steps", "3", "--no-plot"])
    assert rc == 0 and "toy" in err and "7/7" in err
    rc, _, err = run_cli(["toy", "--n", "50", "--steps", "3", "--no-plot", "--no-progress"])
    assert rc == 0 and err == ""
    argv = ["search", "--algo", "best-of-n", "--budget", "400", "--n", "4", "--steps", "5"]
    rc, out, err = run_cli(argv)
    assert rc == 0 and "cspace search: searching: best-of-n, 400 NFE for 4 samples" in err
    assert run_cli([*argv, "--no-progress"])[2] == ""
