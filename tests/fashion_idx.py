"""Tiny synthetic Fashion-MNIST IDX files for the tests (no download, no Debian package)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from cspace.io.idx import IDX_IMAGES_U8, IDX_LABELS_U8


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of ``arr`` (uint8 unless ``magic`` says otherwise)."""
    arr = np.asarray(arr)
    if magic is None:
        codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
                 np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}  # fmt: skip
        magic = (codes[arr.dtype.newbyteorder("=")] << 8) | arr.ndim
    head = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    data = idx_bytes(arr, magic)
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 images whose class (``i % 10``) is a bright horizontal band at row
    ``2 + 2.4 * class``, over noise: easy to learn, and every class has ``n // 10`` images."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        r = 2 + int(2.4 * c)
        images[i, r : r + 2, 3:25] = 250
    return images, labels


def write_fashion(folder: Path, n_train: int = 200, n_test: int = 100, gz: bool = True) -> Path:
    """The four Fashion-MNIST files (synthetic) in ``folder``; returns the folder."""
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_split(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz, IDX_IMAGES_U8)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz, IDX_LABELS_U8)
    return folder
