"""Fashion-MNIST: the IDX reader (untrusted files), finding the files, the shipped held-out
slice and example images, and the script that makes them. Everything runs on tiny synthetic
IDX files and what the repository ships; the checks against the real files run only where
Debian's package is installed (each feature also has a test without it)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from cspace.io.errors import DataFileError, MissingDataError
from cspace.io.idx import IDX_IMAGES_U8, IDX_LABELS_U8, read_idx
from cspace.io.images import load_images
from cspace.models import data as data_mod
from cspace.models.data import (
    DEBIAN_FASHION_DIR,
    FASHION_CLASSES,
    FASHION_SLUGS,
    ImageSetError,
    fashion_heldout,
    fashion_mnist,
    fashion_mnist_uint8,
    find_fashion_mnist,
    read_image_set,
    stratified_indices,
    write_fashion_examples,
    write_fashion_heldout,
    write_image_set,
)
from cspace.models.shipped import shipped
from tests.fashion_idx import idx_bytes, synthetic_split, write_fashion, write_idx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "fashion"
HAVE_DEBIAN = all(
    (DEBIAN_FASHION_DIR / f"{n}.gz").is_file() or (DEBIAN_FASHION_DIR / n).is_file()
    for s in data_mod.FASHION_FILES.values()
    for n in s
)
needs_debian = pytest.mark.skipif(
    not HAVE_DEBIAN, reason=f"the full Fashion-MNIST files are not in {DEBIAN_FASHION_DIR}"
)


# ---------------------------------------------------------------------- the IDX reader
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i2", "f4"])
def test_read_idx_round_trip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == "u1":
        arr = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "a", arr, gz)
    back = read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)
    back[0, 0, 0] = 1  # a writable array: torch takes it without a warning


def test_read_idx_checks_the_magic_number(tmp_path):
    labels = write_idx(tmp_path / "labels", np.zeros(4, np.uint8), magic=IDX_LABELS_U8)
    with pytest.raises(DataFileError, match=r"0x00000801.*expected 0x00000803.*swapped"):
        read_idx(labels, IDX_IMAGES_U8)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DataFileError, match=r"x\.png.*not that of an IDX file"):
        read_idx(png, IDX_IMAGES_U8)
    (tmp_path / "short").write_bytes(b"\0\0")
    with pytest.raises(DataFileError, match="too short for an IDX file"):
        read_idx(tmp_path / "short")


def test_read_idx_truncated_and_padded(tmp_path):
    images, _ = synthetic_split(10, 0)
    data = idx_bytes(images, IDX_IMAGES_U8)
    cases = {
        "data": (data[:-100], r"truncated.*\(10, 28, 28\).*7856 bytes with the header.*7756"),
        "header": (data[:10], r"shorter than the 16-byte header of 3 dimensions \(truncated\)"),
        "longer": (data + b"\0", "longer than its header says"),
    }
    for name, (blob, pattern) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataFileError, match=pattern) as err:
            read_idx(tmp_path / name, IDX_IMAGES_U8)
        assert err.value.path == tmp_path / name
    # gzip: the stream cut short, a stream holding less than declared, bytes after the data
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data, mtime=0)[:-30])
    with pytest.raises(DataFileError, match=r"cut\.gz (is truncated|is not a readable gzip)"):
        read_idx(tmp_path / "cut.gz", IDX_IMAGES_U8)
    (tmp_path / "less.gz").write_bytes(gzip.compress(data[:-100], mtime=0))
    with pytest.raises(DataFileError, match=r"less\.gz is truncated.*only 7740 are there"):
        read_idx(tmp_path / "less.gz", IDX_IMAGES_U8)
    (tmp_path / "more.gz").write_bytes(gzip.compress(data + b"x", mtime=0))
    with pytest.raises(DataFileError, match=r"more\.gz is longer than its header says"):
        read_idx(tmp_path / "more.gz", IDX_IMAGES_U8)
    bad = bytearray(gzip.compress(data, mtime=0))
    bad[-8] ^= 0xFF  # the CRC
    (tmp_path / "crc.gz").write_bytes(bytes(bad))
    with pytest.raises(DataFileError, match=r"crc\.gz is not a readable gzip file"):
        read_idx(tmp_path / "crc.gz", IDX_IMAGES_U8)


def test_read_idx_bounds_the_declared_size_before_allocating(tmp_path):
    """A header declaring 4e9 images is refused after reading its 16 bytes: nothing of that
    size is allocated, plain or gzip (where the file's size bounds what it may hold)."""
    head = IDX_IMAGES_U8.to_bytes(4, "big") + b"".join(
        v.to_bytes(4, "big") for v in (4_000_000_000, 28, 28)
    )
    (tmp_path / "huge").write_bytes(head + b"\0" * 64)
    (tmp_path / "huge.gz").write_bytes(gzip.compress(head + b"\0" * 64, mtime=0))
    # within the 1 GiB limit but far more than a small gzip file can hold
    small = IDX_IMAGES_U8.to_bytes(4, "big") + b"".join(
        v.to_bytes(4, "big") for v in (50_000, 28, 28)
    )
    (tmp_path / "bomb.gz").write_bytes(gzip.compress(small + b"\0" * 64, mtime=0))
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError, match=r"4000000000, 28, 28\).*more than the 1073741824"):
            read_idx(tmp_path / "huge", IDX_IMAGES_U8)
        with pytest.raises(DataFileError, match="more than the 1073741824"):
            read_idx(tmp_path / "huge.gz", IDX_IMAGES_U8)
        with pytest.raises(DataFileError, match=r"more than a gzip file of \d+ bytes can hold"):
            read_idx(tmp_path / "bomb.gz", IDX_IMAGES_U8)
        with pytest.raises(DataFileError, match="more than the 1000 an IDX file may have"):
            read_idx(write_idx(tmp_path / "ok", np.zeros((2, 28, 28), np.uint8)), max_bytes=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_read_idx_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        read_idx(tmp_path / "nope")
    with pytest.raises(DataFileError, match="not a regular file"):
        read_idx(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DataFileError, match="not a regular file"):  # returns, never hangs
        read_idx(fifo)


# ---------------------------------------------------------------------- the two files together
def test_labels_must_match_the_images(tmp_path):
    images, labels = synthetic_split(20, 0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, magic=IDX_IMAGES_U8)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:19], magic=IDX_LABELS_U8)
    with pytest.raises(DataFileError, match=r"holds 19 labels but .*t10k-images.* holds 20 images"):
        fashion_mnist_uint8("test", tmp_path)
    bad = labels.copy()
    bad[7] = 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", bad, magic=IDX_LABELS_U8)
    with pytest.raises(
        DataFileError, match=r"label 10 at index 7 \(1 labels in all\) is outside 0..9"
    ):
        fashion_mnist_uint8("test", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, magic=IDX_LABELS_U8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:, :8, :8].copy(), magic=IDX_IMAGES_U8)
    with pytest.raises(DataFileError, match="8x8 pixels; Fashion-MNIST's are 28x28"):
        fashion_mnist_uint8("test", tmp_path)
    # images and labels swapped
    write_idx(tmp_path / "t10k-images-idx3-ubyte", labels, magic=IDX_LABELS_U8)
    with pytest.raises(DataFileError, match="images and labels swapped"):
        fashion_mnist_uint8("test", tmp_path)


# ---------------------------------------------------------------------- finding the files
@pytest.mark.parametrize("gz", [False, True])
def test_found_in_a_folder_and_in_the_torchvision_layout(tmp_path, gz):
    plain = write_fashion(tmp_path / "plain", gz=gz)
    tv = write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=gz)
    x, y = fashion_mnist("train", plain)
    x2, y2 = fashion_mnist("train", tmp_path / "tv")
    images, labels = synthetic_split(200, 1)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images).float()[:, None] / 127.5 - 1)
    assert torch.equal(y, torch.from_numpy(labels).long()) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert find_fashion_mnist("test", tv.parents[1])[0].parent == tv
    assert fashion_mnist("test", plain)[0].shape == (100, 1, 28, 28)


def test_the_plain_file_is_read_before_its_gzip(tmp_path):
    write_fashion(tmp_path, gz=True)
    write_fashion(tmp_path, n_train=30, gz=False)  # torchvision keeps both
    images, _ = find_fashion_mnist("train", tmp_path)
    assert images.name == "train-images-idx3-ubyte"
    assert fashion_mnist("train", tmp_path)[0].shape[0] == 30


def test_the_debian_folder_is_the_default(tmp_path, monkeypatch):
    write_fashion(tmp_path / "debian")
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_DIR", tmp_path / "debian")
    assert find_fashion_mnist("test")[0] == tmp_path / "debian" / "t10k-images-idx3-ubyte.gz"
    assert fashion_mnist("test")[0].shape == (100, 1, 28, 28)


def test_not_found_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")
    for data, looked in ((None, [tmp_path / "no-debian"]),
                         (tmp_path / "root", [tmp_path / "root", tmp_path / "root" / "FashionMNIST" / "raw"])):  # fmt: skip
        with pytest.raises(MissingDataError) as err:
            fashion_mnist("train", data)
        msg = str(err.value)
        for folder in looked:
            assert f"{folder} does not exist" in msg
        assert "dataset-fashion-mnist" in msg  # (1) Debian's package
        assert "train-images-idx3-ubyte" in msg  # (2) a folder, with each command's flag
        assert "--data-dir DIR for `cspace train teacher/vae/pipeline" in msg
        assert "--data DIR for `cspace train judge`" in msg
        assert "FashionMNIST/raw" in msg and "torchvision" in msg  # (3) torchvision's layout
        assert isinstance(err.value, FileNotFoundError)
    # a folder holding some files: the missing ones are named
    write_idx(tmp_path / "part" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(MissingDataError, match=r"part lacks train-labels-idx1-ubyte;"):
        fashion_mnist("train", tmp_path / "part")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        fashion_mnist("val", tmp_path)


def test_the_command_line_says_where_to_get_the_data(tmp_path, capsys):
    from cspace.cli import main

    rc = main(["train", "judge", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "j")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cspace train: error:" in err and "dataset-fashion-mnist" in err and "--data" in err
    assert not (tmp_path / "j").exists()  # nothing half-written


# ---------------------------------------------------------------------- what is shipped
def test_stratified_indices():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    idx = stratified_indices(labels, 7, seed=3)
    assert len(idx) == 70 and len(set(idx.tolist())) == 70 and np.all(np.diff(idx) > 0)
    assert np.array_equal(np.bincount(labels[idx]), np.full(10, 7))
    assert np.array_equal(idx, stratified_indices(labels, 7, seed=3))
    assert not np.array_equal(idx, stratified_indices(labels, 7, seed=4))
    with pytest.raises(ValueError, match="class 0 has 30 items, fewer than 31"):
        stratified_indices(labels, 31, seed=3)


def test_writing_the_shipped_data_from_idx_files(tmp_path):
    src = write_fashion(tmp_path / "src", n_train=300, n_test=200)
    held = write_fashion_heldout(tmp_path / "held", src, per_class=5)
    files = write_fashion_examples(tmp_path / "ex", src, per_class=4)
    test_images, test_labels = synthetic_split(200, 2)
    x, y, fields = read_image_set(held)
    idx = np.asarray(fields["indices"])
    assert x.shape == (50, 1, 28, 28) and np.array_equal(np.bincount(y.numpy()), np.full(10, 5))
    assert torch.equal(x, torch.from_numpy(test_images[idx]).float()[:, None] / 127.5 - 1)
    assert np.array_equal(y.numpy(), test_labels[idx])
    assert fields["classes"] == list(FASHION_CLASSES)
    # examples: 4 per class, grey 28x28 PNG, pixels exactly those of train images of the class
    train_images, train_labels = synthetic_split(300, 1)
    by_bytes = {img.tobytes(): int(c) for img, c in zip(train_images, train_labels, strict=True)}
    assert len(files) == 40
    for c, slug in enumerate(FASHION_SLUGS):
        pngs = sorted((tmp_path / "ex" / slug).glob("*.png"))
        assert [p.name for p in pngs] == [f"{slug}_{k:02d}.png" for k in range(4)]
        imgs, _ = load_images(pngs, size=(28, 28))
        assert imgs.shape == (4, 1, 28, 28)
        for img in imgs:
            raw = ((img[0] + 1) * 127.5).round().to(torch.uint8).numpy()
            assert by_bytes[raw.tobytes()] == c
    # deterministic, byte for byte; a rerun replaces a class folder's PNG files
    (tmp_path / "ex" / "bag" / "stray.png").write_bytes(b"x")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    write_fashion_heldout(tmp_path / "held2", src, per_class=5)
    files2 = write_fashion_examples(tmp_path / "ex", src, per_class=4)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files2} == digest
    assert not (tmp_path / "ex" / "bag" / "stray.png").exists()
    a = read_image_set(held)
    b = read_image_set(tmp_path / "held2")
    assert torch.equal(a[0], b[0]) and a[2]["indices"] == b[2]["indices"]


def test_the_script_regenerates_the_shipped_data(tmp_path):
    src = write_fashion(tmp_path / "src", n_train=600, n_test=2000)
    out = subprocess.run(
        [sys.executable, "scripts/make_fashion_data.py", "--data", str(src),
         "--heldout", str(tmp_path / "held"), "--examples", str(tmp_path / "ex")],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "2000 images" in out.stdout and "500 PNG files" in out.stdout
    assert read_image_set(tmp_path / "held")[0].shape == (2000, 1, 28, 28)
    assert len(list((tmp_path / "ex").glob("*/*.png"))) == 500


def test_image_set_folders_are_checked(tmp_path):
    images = np.zeros((4, 1, 28, 28), np.uint8)
    labels = np.array([0, 1, 2, 3], np.uint8)
    write_image_set(tmp_path / "s", images, labels, {"note": "x"})
    x, _, fields = read_image_set(tmp_path / "s")
    assert x.shape == (4, 1, 28, 28) and float(x.max()) == -1.0 and fields["note"] == "x"
    mpath = tmp_path / "s" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for field, value, pattern in (("count", 5, r"expected U8 of shape \(5, 1, 28, 28\)"),
                                  ("count", 10**9, "count"),
                                  ("size", [8, 8], r"shape \(4, 1, 8, 8\)"),
                                  ("size", "28", "size must be")):  # fmt: skip
        mpath.write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(ImageSetError, match=pattern):
            read_image_set(tmp_path / "s")
    mpath.write_text(json.dumps(manifest))
    write_image_set(tmp_path / "s", images, np.array([0, 1, 2, 11], np.uint8), {})
    with pytest.raises(ImageSetError, match=r"a label is 11, outside 0\.\.9"):
        read_image_set(tmp_path / "s")
    with pytest.raises(ValueError, match="expected images"):
        write_image_set(tmp_path / "t", images[:, 0], labels, {})


def test_the_shipped_heldout_slice():
    x, y = fashion_heldout()
    assert x.shape == (2000, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(np.bincount(y.numpy()), np.full(10, 200))
    _, _, fields = read_image_set(shipped("fashion_heldout"))
    idx = np.asarray(fields["indices"])
    assert len(set(idx.tolist())) == 2000 and idx.min() >= 0 and idx.max() < 10_000
    x[0] = 0  # a copy: the cached slice is not changed
    assert not torch.equal(fashion_heldout()[0][0], x[0])
    size = sum(f.stat().st_size for f in shipped("fashion_heldout").iterdir() if f.is_file())
    assert size < 1.7e6


def test_the_shipped_examples():
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(FASHION_SLUGS)
    total = 0
    for slug in FASHION_SLUGS:
        pngs = sorted((EXAMPLES / slug).iterdir())
        assert [p.name for p in pngs] == [f"{slug}_{k:02d}.png" for k in range(50)]
        x, _ = load_images([EXAMPLES / slug], size=(28, 28))
        assert x.shape == (50, 1, 28, 28)
        total += sum(p.stat().st_size for p in pngs)
    assert total < 400_000


def test_shipped_weights_and_data_stay_under_the_40_mb_budget():
    # everything the repository ships for the models and the data: weights, the held-out slice,
    # the example images (the Fashion-MNIST issue's limit on the repository's size)
    # (a symbolic link is its own few bytes: the pipelines' VAE files, stored once)
    weights = shipped("fashion_pipeline").parent
    roots = (weights, EXAMPLES.parent)
    files = [f for r in roots for f in r.rglob("*") if not f.is_symlink() and f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert 1e6 < total < 40e6, total


@pytest.mark.parametrize(
    ("pipeline", "vae"),
    [("fashion_pipeline", "fashion_vae_aligned"), ("fashion_pipeline_plain", "fashion_vae_plain")],
)
def test_the_shipped_pipelines_vae_is_their_vae_folders_file(pipeline, vae):
    """Each shipped pipeline's ``vae/diffusion_pytorch_model.safetensors`` is a relative link to
    its VAE folder's ``vae-<hash>.safetensors`` (scripts/link_shipped_vaes.py), inside the
    package, and the pipeline's VAE is that folder's VAE, weight for weight."""
    from cspace.io.folder import read_folder
    from cspace.models.latent_pipeline import load_latent_pipeline
    from cspace.models.vae import VAE_KIND, load_aligned_vae

    link = shipped(pipeline) / "vae" / "diffusion_pytorch_model.safetensors"
    target = read_folder(shipped(vae), VAE_KIND).stored["vae.safetensors"]
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "..", vae, target)
    assert link.resolve() == (shipped(vae) / target).resolve()
    assert link.resolve().is_relative_to(shipped(vae).parent.resolve())
    mine = load_latent_pipeline(shipped(pipeline)).vae.state_dict()
    theirs = load_aligned_vae(shipped(vae))[0].state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@needs_debian
def test_the_shipped_data_is_what_the_script_makes_from_the_real_files(tmp_path):
    images, labels = fashion_mnist_uint8("test")
    assert images.shape == (10_000, 28, 28)
    x, y, fields = read_image_set(shipped("fashion_heldout"))
    idx = np.asarray(fields["indices"])
    assert torch.equal(x, torch.from_numpy(images[idx]).float()[:, None] / 127.5 - 1)
    assert np.array_equal(y.numpy(), labels[idx])
    files = write_fashion_examples(tmp_path / "ex")
    for p in files:
        assert p.read_bytes() == (EXAMPLES / p.parent.name / p.name).read_bytes(), p
