"""The digits splits and image-file reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cspace.io.images import ImageFolderError, load_images, save_png
from cspace.models.data import SPLITS, digits


def test_splits_disjoint_stratified_and_complete():
    from sklearn.datasets import load_digits

    full = load_digits()
    seen = []
    for split in SPLITS:
        x, y = digits(split)
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert float(x.min()) >= -1 and float(x.max()) <= 1
        counts = torch.bincount(y, minlength=10)
        assert int(counts.min()) > 0.8 * int(counts.max())  # stratified: every class present
        # identify each image by its bytes to prove the splits are disjoint
        seen.append({bytes(((v.numpy() + 1) * 8).round().astype(np.uint8)) for v in x})
    assert not (seen[0] & seen[1]) or len(seen[0] & seen[1]) < 5  # digits holds a few duplicates
    assert sum(len(digits(s)[0]) for s in SPLITS) == len(full.target)
    x1, _ = digits("train")
    x2, _ = digits("train")
    assert torch.equal(x1, x2)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        digits("test")


def test_png_round_trip(tmp_path):
    x, _ = digits("heldout")
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    save_png(x[:5], paths)
    back, files = load_images([tmp_path])
    assert files == sorted(paths)
    assert back.shape == (5, 1, 8, 8)
    assert float((back - x[:5]).abs().max()) <= 1 / 127.5 + 1e-6


def test_load_images_is_all_or_nothing(tmp_path):
    x, _ = digits("heldout")
    save_png(x[:3], [tmp_path / f"ok{i}.png" for i in range(3)])
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + np.array([255, 0, 0], np.uint8)).save(
        tmp_path / "red.png"
    )
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ImageFolderError) as err:
        load_images([tmp_path])
    msg = str(err.value)
    assert "4 of 7 files" in msg and "nothing was read" in msg
    assert "notes.png" in msg and "unreadable" in msg
    assert "big.png" in msg and "16x16" in msg
    assert "red.png" in msg and "1 channel" in msg
    assert "data.txt" in msg and "not a PNG or JPEG" in msg


def test_truncated_png(tmp_path):
    x, _ = digits("heldout")
    save_png(x[:1], [tmp_path / "a.png"])
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match=r"a\.png"):
        load_images([tmp_path / "a.png"])


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="empty folder"):
        load_images([tmp_path / "empty"])
    with pytest.raises(ImageFolderError, match="does not exist"):
        load_images([tmp_path / "nope"])
    with pytest.raises(ImageFolderError, match="no images"):
        load_images([])


def test_rgb_mode(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "w.png")
    x, _ = load_images([tmp_path], channels=3)
    assert x.shape == (1, 3, 8, 8) and torch.allclose(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="channels"):
        load_images([tmp_path], channels=2)


def test_grid_png_refuses_a_bad_row_length_or_shape(tmp_path):
    from cspace.io.images import save_grid_png

    x = torch.zeros(3, 1, 4, 4)
    for nrow in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nrow must be an integer >= 1"):
            save_grid_png(x, tmp_path / "g.png", nrow=nrow)
    with pytest.raises(ValueError, match=r"images must be \(B >= 1, 1 or 3, H, W\)"):
        save_grid_png(torch.zeros(3, 2, 4, 4), tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()
    save_grid_png(x, tmp_path / "g.png", nrow=3)
