"""Obstacle sets from images (obstacles.from_images) and the ``cspace obstacles`` command.

A tiny random diffusers AutoencoderKL (8x8 grey -> 2x4x4 latents, d = 32) stands in for the
shipped VAE; the images are copies of the shipped example digits. Bad input of every kind must
raise ImageFolderError naming the file before anything is encoded, and write nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cspace.io.images import ImageFolderError, load_images
from cspace.models.encoders import Encoder, is_aligned_vae_folder, load_encoder
from cspace.models.tiny_pipelines import tiny_digits_vae
from obstacles import ObstacleSet, ObstacleSetError
from obstacles.from_images import (
    RADIUS_FRACTION,
    add_images,
    auto_q_star,
    build_from_images,
    kth_neighbour_distance,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


class SpyEncoder(Encoder):
    """The tiny encoder, counting the images it encodes."""

    encoded = 0

    def encode(self, images, batch_size=256):
        self.encoded += images.shape[0]
        return super().encode(images, batch_size=batch_size)


@pytest.fixture(scope="module")
def vae():
    return tiny_digits_vae()


@pytest.fixture
def encoder(vae):
    return SpyEncoder(vae, scaling_factor=1.0, shift_factor=0.0, name="tiny")


@pytest.fixture
def digits(tmp_path):
    """Copies of 6 example images of classes 3 and 7, in folders named after the class."""
    for c in ("3", "7"):
        (tmp_path / c).mkdir()
        for f in sorted((DIGITS / c).glob("*.png"))[:6]:
            shutil.copy(f, tmp_path / c / f.name)
    return tmp_path


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


# ---------------------------------------------------------------------- building
def test_build_from_folder_and_files(digits, encoder):
    oset = build_from_images([digits / "3"], encoder)
    files = sorted((digits / "3").iterdir())
    assert len(oset) == 6 and oset.dim == 32 == int(np.prod(encoder.latent_shape((8, 8))))
    assert oset.sources == [str(f) for f in files]  # as given (folder / name), not resolved
    assert oset.space == encoder.space((8, 8)) and oset.space.dim == 32
    assert oset.labels == ["3"] * 6  # default label: the folder's name
    images, _ = load_images(files)
    want = encoder.embed(encoder.encode(images)).numpy()
    np.testing.assert_allclose(oset.embeddings, want, rtol=0, atol=1e-6)
    # the same images given as files, with one label, a number for Q*, an explicit radius
    same = build_from_images(files, encoder, q_star=2.0, eta=0.5, radius=0.1, label="three")
    np.testing.assert_array_equal(same.embeddings, oset.embeddings)
    assert same.labels == ["three"] * 6
    assert np.all(same.q_star == 2.0) and np.all(same.eta == 0.5) and np.all(same.radius == 0.1)


def test_auto_q_star_and_default_radius(digits, encoder):
    oset = build_from_images(digits / "3", encoder)
    q = auto_q_star(oset.embeddings)  # k = min(5, 6 - 1) = 5
    d = np.sqrt(((oset.embeddings[:, None].astype(float) - oset.embeddings[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert q == pytest.approx(np.median(np.sort(d, 1)[:, 4]), rel=1e-6)
    np.testing.assert_allclose(oset.q_star, q, rtol=1e-12)
    np.testing.assert_allclose(oset.radius, RADIUS_FRACTION * q, rtol=1e-12)


def test_auto_rule_on_constructed_embeddings():
    line = np.arange(7.0)[:, None] * np.array([[3.0, 4.0]]) / 5  # 0..6 on a unit-speed line
    # 5th nearest other point of 0,1,...,6: 5,4,3,3,3,4,5 -> median 4
    np.testing.assert_allclose(kth_neighbour_distance(line, 5), [5, 4, 3, 3, 3, 4, 5], rtol=1e-12)
    assert auto_q_star(line) == pytest.approx(4.0, rel=1e-12)
    # fewer than 6 points: k = N - 1; [0, 1, 3]: farthest other point 3, 2, 3 -> median 3
    assert auto_q_star(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(3.0)
    # duplicates count as neighbours at distance 0, but a point is never its own neighbour
    dup = np.array([[0.0], [0.0], [2.0]])
    np.testing.assert_allclose(kth_neighbour_distance(dup, 1), [0, 0, 2])
    # neighbours searched among existing obstacles too (one new example is enough)
    # a new point at 10 on the line: distances 4, 5, ..., 10 to the set -> 5th nearest is 8
    assert auto_q_star(np.array([[6.0, 8.0]]), reference=line) == pytest.approx(8.0)
    # chunking does not change the answer
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 6))
    np.testing.assert_allclose(
        kth_neighbour_distance(pts, 5, pts[:7] + 1),
        kth_neighbour_distance(pts, 5, pts[:7] + 1, chunk_elements=13),
        rtol=1e-12,
    )


def test_auto_needs_two_examples(digits, encoder):
    one = sorted((digits / "3").iterdir())[0]
    with pytest.raises(ObstacleSetError, match=r"at least 2 examples.*--q-star FLOAT"):
        build_from_images([one], encoder)
    oset = build_from_images([one], encoder, q_star=1.5)
    assert len(oset) == 1 and oset.radius[0] == pytest.approx(0.75)
    with pytest.raises(ObstacleSetError, match="identical points"):
        auto_q_star(np.zeros((4, 3)))
    with pytest.raises(ObstacleSetError, match="'auto'"):
        build_from_images([one], encoder, q_star="big")


def test_add_images(digits, encoder):
    oset = build_from_images(digits / "3", encoder)
    one = sorted((digits / "7").iterdir())[0]
    ids = add_images(oset, [one], encoder)  # "auto" with one new image: neighbours in the set
    assert ids.tolist() == [6] and len(oset) == 7 and oset.labels[-1] == "7"
    q = auto_q_star(oset.embeddings[-1:], reference=oset.embeddings[:-1])
    assert oset.q_star[-1] == pytest.approx(q)
    with pytest.raises(ObstacleSetError, match=r"dimension mismatch.*d=32"):
        add_images(ObstacleSet.from_embeddings(np.zeros((1, 3)), q_star=1.0), [one], encoder)


# ---------------------------------------------------------------------- bad input
def _make_bad(kind: str, folder: Path) -> tuple[list[Path], str]:
    """Extra inputs (besides the good folder) and the name the error must mention."""
    good_png = next(iter(sorted(folder.iterdir())))
    if kind == "corrupt":
        p = folder / "corrupt.png"
        p.write_bytes(good_png.read_bytes()[:40])
    elif kind == "text":
        p = folder / "notes.png"
        p.write_text("this is not an image\n")
    elif kind == "big":
        p = folder / "big.png"
        Image.new("L", (16, 16), 128).save(p)
    elif kind == "colour":
        p = folder / "colour.png"
        Image.new("RGB", (8, 8), (255, 0, 0)).save(p)
    elif kind == "empty":
        p = folder.parent / "empty"
        p.mkdir()
        return [p], "empty"
    else:
        p = folder.parent / "missing"
        return [p], "missing"
    return [], p.name


BAD = ["corrupt", "text", "big", "colour", "empty", "missing"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_names_the_file_and_encodes_nothing(kind, digits, encoder):
    extra, name = _make_bad(kind, digits / "3")
    with pytest.raises(ImageFolderError, match=name):
        build_from_images([digits / "3", *extra], encoder)
    assert encoder.encoded == 0
    oset = build_from_images(digits / "7", encoder)
    before = (len(oset), oset.embeddings.copy())
    encoder.encoded = 0
    with pytest.raises(ImageFolderError, match=name):
        add_images(oset, [digits / "3", *extra], encoder)
    assert encoder.encoded == 0
    assert len(oset) == before[0] and np.array_equal(oset.embeddings, before[1])


# ---------------------------------------------------------------------- the command
@pytest.fixture
def cli_encoder(monkeypatch, encoder):
    """``--encoder tiny`` resolves to the spy encoder."""
    import cspace.models.encoders as mod

    real = mod.load_encoder
    monkeypatch.setattr(mod, "load_encoder", lambda s: encoder if s == "tiny" else real(s))
    return encoder


def test_cli_build_info_append(digits, cli_encoder, run_cli, tmp_path):
    out = tmp_path / "set"
    rc, text, _ = run_cli(["obstacles", "build", digits / "3", "--out", out, "--encoder", "tiny"])
    assert rc == 0
    assert "added 6 obstacles" in text and "d=32" in text and "(auto)" in text and str(out) in text
    oset = ObstacleSet.load(out)
    assert len(oset) == 6
    rc, text, err = run_cli(["obstacles", "build", digits / "7", "--out", out, "--encoder", "tiny"])
    assert rc == 2 and "--append" in err and "cspace obstacles: error:" in err
    argv = ["obstacles", "build", digits / "7", "--out", out, "--encoder", "tiny", "--append"]
    rc, text, _ = run_cli([*argv, "--label", "seven", "--q-star", "0.5", "--eta", "2"])
    assert rc == 0 and "12 in the set" in text
    rc, text, _ = run_cli(["obstacles", "info", out])
    assert rc == 0
    assert "cspace.obstacles v3" in text and "count: 12" in text and "3: 6, seven: 6" in text
    assert f"space: {cli_encoder.space((8, 8)).describe()}" in text
    assert "eta: 1 .. 2" in text and "history: 0 entries" in text
    rc, text, _ = run_cli(["obstacles", "info", out, "--json"])
    info = json.loads(text)
    assert info["count"] == 12 and info["labels"] == {"3": 6, "seven": 6} and info["dim"] == 32
    assert info["space"] == cli_encoder.space((8, 8)).to_json()


@pytest.mark.parametrize("kind", BAD)
def test_cli_bad_input_writes_nothing(kind, digits, cli_encoder, run_cli, tmp_path):
    extra, name = _make_bad(kind, digits / "3")
    out = tmp_path / "new-set"
    argv = ["obstacles", "build", digits / "3", *extra, "--out", out, "--encoder", "tiny"]
    rc, _, err = run_cli(argv)
    assert rc == 2 and err.startswith("cspace obstacles: error:") and name in err
    assert not out.exists() and cli_encoder.encoded == 0
    # an existing set is left exactly as it was
    keep = tmp_path / "kept"
    build_from_images(digits / "7", cli_encoder).save(keep)
    before = _digest(keep)
    cli_encoder.encoded = 0
    argv = ["obstacles", "build", digits / "3", *extra, "--out", keep, "--encoder", "tiny"]
    rc, _, err = run_cli([*argv, "--append"])
    assert rc == 2 and name in err and cli_encoder.encoded == 0
    assert _digest(keep) == before
    rc, _, err = run_cli([*argv, "--overwrite"])
    assert rc == 2 and _digest(keep) == before


def test_cli_errors(digits, cli_encoder, run_cli, tmp_path):
    one = sorted((digits / "3").iterdir())[0]
    base = ["obstacles", "build", one, "--out", tmp_path / "s", "--encoder", "tiny"]
    for extra, msg in (
        ([], "--q-star FLOAT"),
        (["--q-star", "-1"], "--q-star must be 'auto' or a finite number > 0"),
        (["--q-star", "1", "--eta", "nan"], "--eta must be a finite number >= 0"),
        (["--q-star", "1", "--size", "8x"], "--size expects"),
        (["--q-star", "1", "--append"], "not an obstacle set yet"),
    ):
        rc, _, err = run_cli([*base, *extra])
        assert rc == 2 and msg in err, (extra, err)
        assert not (tmp_path / "s").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("mine")
    rc, _, err = run_cli(
        [
            "obstacles",
            "build",
            one,
            "--out",
            tmp_path / "junk",
            "--encoder",
            "tiny",
            "--q-star",
            "1",
        ]
    )
    assert rc == 2 and "refusing to overwrite" in err
    assert (tmp_path / "junk" / "a.txt").read_text() == "mine"
    rc, _, err = run_cli(["obstacles", "info", tmp_path / "junk"])
    assert rc == 2 and "neither an obstacle set nor a classifier" in err
    rc, _, err = run_cli(["obstacles", "info", tmp_path / "nothing"])
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli([*base[:-1], "no-such-encoder"])
    assert rc == 2 and "unknown encoder 'no-such-encoder'" in err


def test_load_encoder_folders(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    enc = load_encoder(str(tmp_path / "vae"))
    assert enc.channels == 1 and enc.latent_shape((8, 8)) == (2, 4, 4)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    assert load_encoder(str(tmp_path / "pipe")).latent_channels == 2
    assert not is_aligned_vae_folder(tmp_path / "vae")  # a diffusers folder
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    (aligned / "config.json").write_text(json.dumps({"cspace": {"kind": "aligned-vae"}}))
    assert is_aligned_vae_folder(aligned)
    (aligned / "config.json").write_text(json.dumps({"scaling_factor": 1.0}))
    assert not is_aligned_vae_folder(aligned)
    (aligned / "model.safetensors").write_bytes(b"")
    assert is_aligned_vae_folder(aligned)
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_encoder(str(tmp_path / "empty"))  # a folder without any VAE
