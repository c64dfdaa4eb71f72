"""The data sets: the embedded digits and their fixed splits; Fashion-MNIST.

The embedded default is scikit-learn's digits (1,797 real 8x8 grey images, 0..16, shipped inside
scikit-learn). It is split once, stratified by class with a fixed seed, into three disjoint parts:

* ``train`` (50%): the teacher, the VAEs and the latent flow models are trained on it;
* ``judge`` (25%): only the independent judge classifier is trained on it;
* ``heldout`` (25%): evaluation, and the example images shipped under ``examples/``.

Images are float32 ``(N, 1, 8, 8)`` in [-1, 1] (:mod:`cspace.io.images` reads and writes files).

**Fashion-MNIST** (Zalando Research, MIT licence: 60,000 train and 10,000 test grey 28x28
images of ten clothing classes, :data:`FASHION_CLASSES`) is read from its IDX files, never
downloaded: :func:`find_fashion_mnist` looks in Debian's package folder
(:data:`DEBIAN_FASHION_DIR`, package ``dataset-fashion-mnist``), in a folder given with
``--data DIR`` or in torchvision's layout under it (``DIR/FashionMNIST/raw/``), each file plain or
gzip; :func:`fashion_mnist` returns float32 ``(N, 1, 28, 28)`` images in [-1, 1] and labels.
The package ships what needs no download (``scripts/make_fashion_data.py`` regenerates both
from the IDX files, deterministically):

* :func:`fashion_heldout`: 2,000 images of the *test* split (200 per class), uint8 in
  ``cspace/weights/fashion_heldout`` (an image-set folder, :data:`IMAGES_KIND`), for the judge's
  test and the membership figures;
* ``examples/fashion/<slug>/``: 50 PNG images per class of the *train* split
  (:data:`FASHION_SLUGS`), for obstacle sets.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cspace.io.errors import DataFileError, FolderError, MissingDataError
from cspace.io.folder import FolderKind, check_int, read_folder, write_folder
from cspace.io.idx import IDX_IMAGES_U8, IDX_LABELS_U8, read_idx
from cspace.io.untrusted import FormatError, check_safetensors
from cspace.models.shipped import shipped

__all__ = [
    "DEBIAN_FASHION_DIR",
    "FASHION_CLASSES",
    "FASHION_FILES",
    "FASHION_SLUGS",
    "FASHION_SPLITS",
    "IMAGES_KIND",
    "SPLITS",
    "ImageSetError",
    "digits",
    "fashion_heldout",
    "fashion_mnist",
    "fashion_mnist_uint8",
    "find_fashion_mnist",
    "read_image_set",
    "shift_images",
    "stratified_indices",
    "uint8_to_images",
    "write_fashion_examples",
    "write_fashion_heldout",
    "write_image_set",
]

SPLITS = ("train", "judge", "heldout")
_SPLIT_SEED = 20250117


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_SPLIT_SEED)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        a, b = n // 2, n // 2 + n // 4
        out["train"] += idx[:a].tolist()
        out["judge"] += idx[a:b].tolist()
        out["heldout"] += idx[b:].tolist()
    return {s: np.sort(np.asarray(v)) for s, v in out.items()}


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of one split: images (N, 1, 8, 8) float32 in [-1, 1] and labels (N,) int64."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = _split_indices(data.target)[split]
    images = torch.from_numpy(data.images[idx].astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, torch.from_numpy(data.target[idx].astype(np.int64))


def shift_images(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels (background -1 fills in)."""
    b, c, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    return pad[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


# ---------------------------------------------------------------------- Fashion-MNIST
#: the ten Fashion-MNIST classes, in label order (Zalando's names)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: the same classes as folder names (``examples/fashion/<slug>/``)
FASHION_SLUGS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
FASHION_SPLITS = ("train", "test")
FASHION_IMAGE_SHAPE = (28, 28)
#: where Debian's package ``dataset-fashion-mnist`` installs the IDX files
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: the sub-folder of a torchvision root (``torchvision.datasets.FashionMNIST(root)``)
TORCHVISION_FASHION_SUBDIR = Path("FashionMNIST") / "raw"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_HELDOUT_PER_CLASS = 200
FASHION_EXAMPLES_PER_CLASS = 50
_HELDOUT_SEED = 20261130
_EXAMPLES_SEED = 20261131


def _check_split(split: str) -> None:
    if split not in FASHION_SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose one of {FASHION_SPLITS}")


def _fashion_candidates(data: str | os.PathLike | None) -> list[Path]:
    if data is None:
        return [DEBIAN_FASHION_DIR]
    root = Path(data)
    return [root, root / TORCHVISION_FASHION_SUBDIR]


def _file_in(folder: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``folder`` (the plain file first: no decompression)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(
    split: str = "train", data: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """The (images, labels) IDX files of a Fashion-MNIST split (``"train"``: 60,000 images,
    ``"test"``: 10,000).

    Looked for, each file plain or ``.gz``: with ``data=None`` in :data:`DEBIAN_FASHION_DIR`
    (Debian's ``dataset-fashion-mnist``); with ``data=DIR`` in ``DIR`` itself and then in
    torchvision's layout ``DIR/FashionMNIST/raw/``. Raises
    :class:`~cspace.io.errors.MissingDataError` naming every folder looked in, the files missing
    there, and the three ways to supply them.
    """
    _check_split(split)
    names = FASHION_FILES[split]
    looked = []
    for folder in _fashion_candidates(data):
        found = [_file_in(folder, n) for n in names]
        if all(f is not None for f in found):
            return found[0], found[1]
        missing = [n for n, f in zip(names, found, strict=True) if f is None]
        state = "does not exist" if not folder.is_dir() else f"lacks {' and '.join(missing)}"
        looked.append(f"{folder} {state}")
    raise MissingDataError(
        f"Fashion-MNIST ({split} split) not found: {'; '.join(looked)}. Nothing is downloaded; "
        "supply the IDX files (plain or .gz) in one of three ways: (1) install Debian's package "
        f"dataset-fashion-mnist (`apt install dataset-fashion-mnist`, files in "
        f"{DEBIAN_FASHION_DIR}); (2) pass the folder that holds "
        f"{', '.join(n for s in FASHION_SPLITS for n in FASHION_FILES[s])} (data=DIR in Python; "
        "on the command line --data-dir DIR for `cspace train teacher/vae/pipeline --data "
        "fashion`, --data DIR for `cspace train judge` and the scripts); (3) pass the ROOT "
        "of a torchvision download the same way (torchvision.datasets.FashionMNIST(ROOT, download=True) on "
        f"a machine with network access puts them in ROOT/{TORCHVISION_FASHION_SUBDIR.as_posix()})"
    )


def fashion_mnist_uint8(
    split: str = "train", data: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A Fashion-MNIST split as stored: images uint8 (N, 28, 28) (0 black .. 255 white) and
    labels uint8 (N,) in 0..9, read safely from the IDX files :func:`find_fashion_mnist` finds
    (:func:`cspace.io.idx.read_idx`: magic numbers, declared sizes against the files).

    Raises :class:`~cspace.io.errors.DataFileError` when the images are not 28x28, the label
    count differs from the image count, or a label lies outside 0..9.
    """
    images_path, labels_path = find_fashion_mnist(split, data)
    images = read_idx(images_path, IDX_IMAGES_U8)
    labels = read_idx(labels_path, IDX_LABELS_U8)
    if tuple(images.shape[1:]) != FASHION_IMAGE_SHAPE:
        raise DataFileError(
            f"{images_path} holds images of {images.shape[1]}x{images.shape[2]} pixels; "
            "Fashion-MNIST's are 28x28 (another data set?)",
            images_path,
        )
    if images.shape[0] == 0:
        raise DataFileError(f"{images_path} holds no images", images_path)
    if labels.shape[0] != images.shape[0]:
        raise DataFileError(
            f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds "
            f"{images.shape[0]} images: the files do not belong together",
            labels_path,
        )
    bad = np.flatnonzero(labels >= len(FASHION_CLASSES))
    if bad.size:
        raise DataFileError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} ({bad.size} "
            f"labels in all) is outside 0..{len(FASHION_CLASSES) - 1}",
            labels_path,
        )
    return images, labels


def uint8_to_images(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, 1, H, W) -> float32 (N, 1, H, W) in [-1, 1]:
    ``x = v / 127.5 - 1`` (what :mod:`cspace.io.images` does for a PNG file)."""
    t = torch.as_tensor(np.asarray(pixels))
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels; got {t.dtype}")
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W) pixels; got {tuple(t.shape)}")
    return t.float() / 127.5 - 1.0


def fashion_mnist(
    split: str = "train", data: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split: images float32 (N, 1, 28, 28) in [-1, 1] and labels (N,) int64.

    The files are found by :func:`find_fashion_mnist` (Debian's folder, ``data=DIR`` or a
    torchvision root) and read by :func:`fashion_mnist_uint8`. Use :func:`fashion_heldout` for
    the 2,000 test images shipped inside the package (no files needed).
    """
    images, labels = fashion_mnist_uint8(split, data)
    return uint8_to_images(images), torch.from_numpy(labels.astype(np.int64))


def stratified_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` items of every class of ``labels`` (N,), drawn without
    replacement by a permutation per class from ``seed``; deterministic. Raises ValueError when
    a class has fewer than ``per_class`` items."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(FASHION_CLASSES)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} items, fewer than {per_class}")
        out.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(out))


class ImageSetError(FolderError):
    """A shipped image-set folder (``cspace.images``) that cannot be used."""


_IMAGES_FILE = "images.safetensors"
#: the folder kind of a set of uint8 images with labels (the shipped Fashion-MNIST held-out slice)
IMAGES_KIND = FolderKind(
    format="cspace.images",
    version=3,
    what="image-set",
    a_what="a cspace image-set folder",
    error=ImageSetError,
    files=(_IMAGES_FILE,),
    fix="regenerate it with `python scripts/make_fashion_data.py` or restore it from a copy",
)


def write_image_set(
    out: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    fields: dict[str, Any],
    indices: np.ndarray | None = None,
) -> Path:
    """Write uint8 ``images`` (N, 1, H, W), uint8 ``labels`` (N,) and optionally int64
    ``indices`` (N,) (where they come from) as an image-set folder (:data:`IMAGES_KIND`, tensors
    ``images``, ``labels``, ``indices`` in ``images.safetensors``; ``fields`` in the manifest)."""
    from safetensors.numpy import save

    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"expected images (N, 1, H, W) and labels (N,); got {images.shape}, {labels.shape}"
        )
    tensors = {"images": images, "labels": labels}
    if indices is not None:
        tensors["indices"] = np.ascontiguousarray(indices, dtype=np.int64)
    body = {"count": int(images.shape[0]), "size": list(images.shape[2:]), **fields}
    return write_folder(out, IMAGES_KIND, body, {_IMAGES_FILE: save(tensors)})


def read_image_set(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """An image-set folder: images float32 (N, 1, H, W) in [-1, 1], labels int64 (N,) and the
    manifest's fields (with ``indices``, a list, when stored). Untrusted: the manifest's count
    and size are checked against the safetensors header, which is checked against the file's
    size, before any tensor is read; labels must lie in 0..9."""
    from safetensors.numpy import load

    read = read_folder(path, IMAGES_KIND)
    where = read.file(_IMAGES_FILE)
    n = check_int(read.get("count"), "count", read.mpath, IMAGES_KIND, 1, 1 << 24)
    size = read.get("size")
    if not (isinstance(size, list) and len(size) == 2):
        raise IMAGES_KIND.fail(f"{read.mpath}: size must be [H, W]; got {size!r:.80}", read.mpath)
    h, w = (check_int(v, "size", read.mpath, IMAGES_KIND, 1, 4096) for v in size)
    expected = {"images": ("U8", (n, 1, h, w)), "labels": ("U8", (n,))}
    data = read.files[_IMAGES_FILE]
    try:
        header = check_safetensors(data)
        if "indices" in header:
            expected["indices"] = ("I64", (n,))
        check_safetensors(data, expected)
    except FormatError as err:
        raise IMAGES_KIND.fail(f"{where} does not hold the images its manifest describes: {err}",
                               where) from None  # fmt: skip
    arrays = load(data)
    labels = arrays["labels"]
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise IMAGES_KIND.fail(f"{where}: a label is {int(labels.max())}, outside 0..9", where)
    fields = dict(read.fields)
    if "indices" in arrays:
        fields["indices"] = arrays["indices"].tolist()
    return uint8_to_images(arrays["images"]), torch.from_numpy(labels.astype(np.int64)), fields


@functools.lru_cache(maxsize=1)
def _heldout_cached() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = read_image_set(shipped("fashion_heldout"))
    return images, labels


def fashion_heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out slice of the Fashion-MNIST test split shipped in the package
    (``cspace/weights/fashion_heldout``): 2,000 images float32 (2000, 1, 28, 28) in [-1, 1]
    (200 per class, drawn by :func:`stratified_indices` with a fixed seed) and labels (2000,)
    int64. Made by ``scripts/make_fashion_data.py`` (:func:`write_fashion_heldout`)."""
    images, labels = _heldout_cached()
    return images.clone(), labels.clone()


def write_fashion_heldout(
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    per_class: int = FASHION_HELDOUT_PER_CLASS,
) -> Path:
    """Write the held-out slice: ``per_class`` images of every class of the *test* split, drawn
    with a fixed seed, as an image-set folder (with their indices in the test split)."""
    images, labels = fashion_mnist_uint8("test", data)
    idx = stratified_indices(labels, per_class, _HELDOUT_SEED)
    fields = {
        "source": "Fashion-MNIST test split (t10k-*-idx*-ubyte), Zalando Research, MIT licence",
        "classes": list(FASHION_CLASSES),
        "per_class": int(per_class),
        "seed": _HELDOUT_SEED,
    }
    return write_image_set(out, images[idx][:, None], labels[idx], fields, idx)


def write_fashion_examples(
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    per_class: int = FASHION_EXAMPLES_PER_CLASS,
) -> list[Path]:
    """Write ``per_class`` example images of every class of the *train* split, drawn with a
    fixed seed, as 8-bit grey PNG files ``out/<slug>/<slug>_<k>.png`` (:data:`FASHION_SLUGS`;
    ``k`` = 00, 01, ... in train-split order). Existing PNG files of a class folder are
    replaced (the folder then holds exactly the new set). Returns the files written."""
    from PIL import Image

    images, labels = fashion_mnist_uint8("train", data)
    idx = stratified_indices(labels, per_class, _EXAMPLES_SEED)
    out = Path(out)
    written = []
    for c, slug in enumerate(FASHION_SLUGS):
        folder = out / slug
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for k, i in enumerate(i for i in idx if labels[i] == c):
            path = folder / f"{slug}_{k:02d}.png"
            Image.fromarray(images[i]).save(path)
            written.append(path)
    return written
