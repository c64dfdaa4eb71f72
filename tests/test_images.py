"""Reading untrusted image files (cspace.io.images): the pixel limit from the header before any
decoding, every image mode converted exactly or refused, folders that report what they skip.

The crafted files are tiny: a PNG whose header claims 20000 x 20000 pixels is under 100 bytes.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cspace.io.images import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_ENV,
    ImageFolderError,
    SkippedFilesWarning,
    load_images,
    max_image_pixels,
)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG file whose header claims ``width x height`` 8-bit grey pixels, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture
def decodes(monkeypatch):
    """The sizes of the images Pillow decodes during a test (one entry per ``ImageFile.load``
    call; Pillow calls it again, as a no-op, on every access to a loaded image)."""
    seen: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV, raising=False)
    return seen


# ---------------------------------------------------------------------- the pixel limit
def test_a_header_claiming_20000_squared_is_refused_without_decoding(tmp_path, decodes):
    bomb = png_claiming(tmp_path / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageFolderError) as err:
        load_images([bomb])
    msg = str(err.value)
    assert "20000x20000 = 400,000,000 pixels" in msg and f"{MAX_IMAGE_PIXELS:,}" in msg
    assert MAX_IMAGE_PIXELS_ENV in msg and "max_pixels" in msg and "not decoded" in msg
    assert decodes == []


def test_an_image_over_the_limit_is_never_decoded(tmp_path, decodes):
    """12000 x 12000 is under Pillow's own bomb limit: it used to be decoded whole first."""
    big = png_claiming(tmp_path / "big.png", 12_000, 12_000)
    with pytest.raises(ImageFolderError, match="144,000,000 pixels, more than the limit"):
        load_images([big])
    assert decodes == []


def test_the_size_is_checked_before_decoding(tmp_path, decodes):
    Image.new("L", (16, 16), 7).save(tmp_path / "a.png")
    with pytest.raises(ImageFolderError, match="16x16 pixels, expected 8x8"):
        load_images([tmp_path / "a.png"])
    assert decodes == []


def test_a_folder_all_of_one_other_size_is_one_line_naming_the_encoder_first(tmp_path):
    """28x28 clothes given to the 8x8 digits space: one line, not one per file, and the likelier
    fix (another C-space's encoder) before resizing; mixed problems keep the list per file."""
    for i in range(25):
        Image.new("L", (28, 28), i).save(tmp_path / f"c{i:02d}.png")
    with pytest.raises(ImageFolderError) as err:
        load_images([tmp_path], size_source="the encoder's size")
    msg = str(err.value)
    assert msg.startswith("all 25 files are 28x28 pixels, expected 8x8, the encoder's size.")
    assert "\n" not in msg and msg.index("--encoder") < msg.index("--resize")
    Image.new("L", (16, 16), 0).save(tmp_path / "a.png")  # two sizes: listed per file
    with pytest.raises(ImageFolderError, match="26 of 26 files cannot be used") as err:
        load_images([tmp_path])
    assert "16x16 pixels, expected 8x8" in str(err.value) and "... and 6 more" in str(err.value)


def test_the_limit_is_raised_by_argument_or_environment(tmp_path, decodes, monkeypatch):
    Image.new("L", (8, 8), 200).save(tmp_path / "a.png")
    with pytest.raises(ImageFolderError, match="64 pixels, more than the limit of 63"):
        load_images([tmp_path / "a.png"], max_pixels=63)
    assert load_images([tmp_path / "a.png"], max_pixels=64)[0].shape == (1, 1, 8, 8)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "63")
    assert max_image_pixels() == 63
    with pytest.raises(ImageFolderError, match="more than the limit of 63"):
        load_images([tmp_path / "a.png"])
    assert load_images([tmp_path / "a.png"], max_pixels=64)[0].shape == (1, 1, 8, 8)  # wins
    # a raised limit lets the 20000^2 header through to the size check (still not decoded)
    bomb = png_claiming(tmp_path / "bomb.png", 20_000, 20_000)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(20_000 * 20_000))
    with pytest.raises(ImageFolderError, match="20000x20000 pixels, expected 8x8"):
        load_images([bomb])
    assert set(decodes) == {(8, 8)}  # only the 8 x 8 file was ever decoded
    for bad in ("0", "-5", "many", "1.5"):
        monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_IMAGE_PIXELS_ENV):
            load_images([tmp_path / "a.png"])
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        load_images([tmp_path / "a.png"], max_pixels=0)


def test_only_png_and_jpeg_content_is_opened(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.tif")
    os.rename(tmp_path / "a.tif", tmp_path / "a.png")  # a TIFF named .png
    Image.new("L", (8, 8)).save(tmp_path / "b.bmp")
    os.rename(tmp_path / "b.bmp", tmp_path / "b.jpg")
    with pytest.raises(ImageFolderError) as err:
        load_images([tmp_path])
    assert "a.png: unreadable or not an image" in str(err.value)
    assert "b.jpg: unreadable or not an image" in str(err.value)


# ---------------------------------------------------------------------- modes
def _grey_ramp() -> np.ndarray:
    return (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)


def test_16_bit_grey_keeps_every_value(tmp_path):
    """A 16-bit PNG used to be clipped at 255 (every value above it white)."""
    values = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)  # 0 .. 65520
    values[0, 0], values[0, 1] = 65535, 0
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    x, _ = load_images([tmp_path / "a.png"])
    want = torch.from_numpy(values.astype(np.float32) / 32767.5 - 1.0)
    assert torch.equal(x[0, 0], want)
    assert float(x[0, 0, 0, 0]) == 1.0 and float(x[0, 0, 0, 1]) == -1.0
    assert len(torch.unique(x)) == 64  # nothing clipped: every distinct value stays distinct
    x3, _ = load_images([tmp_path / "a.png"], channels=3)
    assert torch.equal(x3, want.expand(1, 3, 8, 8))


def test_8_bit_grey_is_unchanged(tmp_path):
    Image.fromarray(_grey_ramp()).save(tmp_path / "a.png")
    x, _ = load_images([tmp_path / "a.png"])
    assert torch.equal(x[0, 0], torch.from_numpy(_grey_ramp().astype(np.float32) / 127.5 - 1.0))


def test_grey_saved_as_rgb_is_grey(tmp_path):
    grey = _grey_ramp()
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    x, _ = load_images([tmp_path / "l.png", tmp_path / "rgb.png"])
    assert torch.equal(x[0], x[1])
    colour = np.stack([grey, grey, grey], axis=-1)
    colour[3, 3, 2] += 1
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    with pytest.raises(ImageFolderError, match=r"rgb\.png: is a RGB image with colour"):
        load_images([tmp_path / "rgb.png"])
    assert load_images([tmp_path / "rgb.png"], channels=3)[0].shape == (1, 3, 8, 8)


def test_alpha_is_dropped_only_when_opaque(tmp_path):
    grey = _grey_ramp()
    alpha = np.full((8, 8), 255, np.uint8)
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.stack([grey, grey, grey, alpha], -1), mode="RGBA").save(tmp_path / "c.png")
    Image.fromarray(grey).save(tmp_path / "l.png")
    x, _ = load_images([tmp_path / "l.png", tmp_path / "la.png", tmp_path / "c.png"])
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    alpha[0, :3] = 0
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.stack([grey, grey, grey, alpha], -1), mode="RGBA").save(tmp_path / "c.png")
    for f, channels in (("la.png", 1), ("c.png", 3)):
        with pytest.raises(ImageFolderError, match=f"{f}: has 3 transparent or translucent"):
            load_images([tmp_path / f], channels=channels)


def test_palette_one_bit_and_cmyk(tmp_path):
    grey = _grey_ramp()
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")  # a grey palette
    x, _ = load_images([tmp_path / "p.png"])
    assert torch.equal(x[0, 0], torch.from_numpy(grey.astype(np.float32) / 127.5 - 1.0))
    transparent = Image.fromarray(grey).convert("P")
    transparent.info["transparency"] = int(np.asarray(transparent)[0, 0])
    transparent.save(tmp_path / "pt.png")
    with pytest.raises(ImageFolderError, match=r"pt\.png: has .* transparent"):
        load_images([tmp_path / "pt.png"])
    bits = grey > 100
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    x, _ = load_images([tmp_path / "b.png"])
    assert torch.equal(x[0, 0], torch.where(torch.from_numpy(bits), 1.0, -1.0))
    Image.new("CMYK", (8, 8)).save(tmp_path / "c.jpg")
    with pytest.raises(ImageFolderError, match=r"c\.jpg: is a CMYK image.*save it as RGB"):
        load_images([tmp_path / "c.jpg"], channels=3)


# ---------------------------------------------------------------------- folders
def test_a_folder_reports_what_it_skips(tmp_path):
    for i in range(2):
        Image.fromarray(_grey_ramp()).save(tmp_path / f"{i}.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_grey_ramp()).save(tmp_path / "sub" / "x.png")
    (tmp_path / ".hidden.png").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    os.symlink(tmp_path / "sub", tmp_path / "linked")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load_images([tmp_path])  # never opens the FIFO: no hang
    images, files = got
    assert images.shape == (2, 1, 8, 8) and [f.name for f in files] == ["0.png", "1.png"]
    reasons = {p.name: why for p, why in got.skipped}
    assert reasons == {
        ".hidden.png": "a hidden file",
        "broken.png": "a broken symlink",
        "linked": "a subfolder (folders are not read recursively)",
        "loop.png": "a symlink loop",
        "pipe.png": "a FIFO",
        "sub": "a subfolder (folders are not read recursively)",
    }
    lines = [str(w.message) for w in caught if issubclass(w.category, SkippedFilesWarning)]
    assert len(lines) == 1 and "skipped 6 entries" in lines[0] and "pipe.png (a FIFO)" in lines[0]


def test_a_fifo_given_as_a_file_is_named_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageFolderError, match=r"pipe\.png is a FIFO, not an image file"):
        load_images([tmp_path / "pipe.png"])
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "p.png")
    with pytest.raises(ImageFolderError, match=r"no image files to read \(1 entries skipped"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedFilesWarning)
            load_images([tmp_path / "d"])


def test_the_command_prints_what_a_folder_skipped(tmp_path, run_cli, monkeypatch):
    import cspace.models.encoders as enc_mod
    from cspace.models.encoders import Encoder
    from cspace.models.tiny_pipelines import tiny_digits_vae

    tiny = Encoder(tiny_digits_vae(), scaling_factor=1.0, shift_factor=0.0, name="tiny")
    monkeypatch.setattr(enc_mod, "load_encoder", lambda spec: tiny)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_grey_ramp() + i).save(imgs / f"{i}.png")
    rc, out, err = run_cli(["obstacles", "build", imgs, "--out", tmp_path / "set"])
    assert rc == 0 and "added 3 obstacles" in out
    assert err.strip().splitlines() == [
        f"cspace obstacles: warning: {imgs}: skipped 1 entries that are not image files: sub "
        "(a subfolder (folders are not read recursively))"
    ]
