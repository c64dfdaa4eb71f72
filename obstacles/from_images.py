"""Obstacles from images: read image files, encode them into the C-space, add them to a set.

:func:`build_from_images` reads PNG/JPEG files and folders with :func:`cspace.io.images.load_images`
(all-or-nothing: one bad file raises :class:`cspace.io.images.ImageFolderError` naming it before
anything is encoded), encodes them with an :class:`cspace.models.encoders.Encoder` (posterior mean,
normalised latents), embeds them (flatten, ``Encoder.embed``) and returns a new
:class:`~obstacles.ObstacleSet` whose sources are the file paths as given (a folder's files as
``folder/name``, never resolved to absolute paths) and whose ``space`` is the encoder's C-space at ``size``
(:meth:`cspace.models.encoders.Encoder.space`). :func:`add_images` grows an existing set the same
way, and refuses an encoder of another space (an error naming both spaces); bad input adds
nothing. A set of unknown space (saved before spaces were recorded) takes the encoder's space.

Default parameters (documented rules, both overridable):

* ``q_star="auto"``: the **median over the examples of the distance to their k-th nearest other
  example**, ``k = min(5, N - 1)``, times ``AUTO_Q_STAR_FACTOR = 1.0``. It is the typical spacing
  of the examples in the C-space: the union of the influence balls covers the region the examples
  sample (each ball reaches about 5 neighbours), and the field does not reach much further than
  the examples' own spread. It needs at least 2 examples (with one image there is no spacing to
  measure: pass a number). When images are added to an existing set the neighbours are searched
  among the set's obstacles and the new examples together, so one image can be added with "auto".
  Distances are computed exactly, from differences in float64 (O(N^2 d), chunked).
* ``radius=None``: the hard collision radius is ``RADIUS_FRACTION = 0.5`` of Q*: a state counts as
  a collision when it is closer to an example than half the examples' typical spacing, i.e. it is
  nearer to that example than to the midpoint towards its k-th neighbour (a near copy).
* ``label=None``: each image is labelled with the name of the folder that holds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from obstacles.classifier import ClassifierError, PreferenceClassifier
from obstacles.obstacle_set import ObstacleSet, ObstacleSetError

__all__ = [
    "AUTO_K",
    "AUTO_Q_STAR_FACTOR",
    "RADIUS_FRACTION",
    "add_images",
    "auto_q_star",
    "build_from_images",
    "classifier_from_images",
    "encode_images",
    "image_size_for",
    "kth_neighbour_distance",
]

AUTO_K = 5
AUTO_Q_STAR_FACTOR = 1.0
RADIUS_FRACTION = 0.5
_CHUNK_ELEMENTS = 1 << 22  # largest (rows x cols x d) float64 difference block formed at once

PathLike = str | os.PathLike


def kth_neighbour_distance(
    embeddings, k: int, reference=None, *, chunk_elements: int = _CHUNK_ELEMENTS
) -> np.ndarray:
    """For each row of ``embeddings`` (N, d), the distance to its k-th nearest *other* example.

    The candidates are the other rows of ``embeddings`` plus every row of ``reference`` (M, d)
    (optional). A duplicate counts as a neighbour at distance 0; a row never counts as its own
    neighbour. Exact Euclidean distances from differences in float64; returns (N,) float64.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ObstacleSetError(f"embeddings must be (N, d); got shape {e.shape}")
    n, d = e.shape
    ref = np.zeros((0, d)) if reference is None else np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != d:
        raise ObstacleSetError(f"reference must be (M, {d}); got shape {ref.shape}")
    cand = np.concatenate([e, ref])  # rows 0..n-1 are the examples themselves
    m = cand.shape[0]
    k = int(k)
    if not 1 <= k <= m - 1:
        raise ObstacleSetError(f"k must be in 1..{m - 1} for {m} examples; got {k}")
    cols = max(1, min(m, chunk_elements // max(1, d)))
    rows = max(1, chunk_elements // max(1, cols * d))
    out = np.empty(n)
    for r0 in range(0, n, rows):
        block = e[r0 : r0 + rows]
        best = np.full((block.shape[0], 0), np.inf)
        for c0 in range(0, m, cols):
            diff = block[:, None, :] - cand[None, c0 : c0 + cols]
            dist = np.sqrt(np.einsum("rcd,rcd->rc", diff, diff))
            ri = np.arange(block.shape[0])
            ci = r0 + ri - c0  # position of each row's own column in this block
            own = (ci >= 0) & (ci < dist.shape[1])
            dist[ri[own], ci[own]] = np.inf
            both = np.concatenate([best, dist], axis=1)
            keep = min(k, both.shape[1])
            best = np.partition(both, keep - 1, axis=1)[:, :keep]
        out[r0 : r0 + rows] = np.max(best, axis=1)
    return out


def auto_q_star(
    embeddings, *, reference=None, k: int = AUTO_K, factor: float = AUTO_Q_STAR_FACTOR
) -> float:
    """The "auto" Q*: ``factor`` x median over examples of the distance to the k-th nearest other
    example, with ``k = min(k, N_candidates - 1)``; see the module docstring.

    ``reference`` (M, d): obstacles already in a set, searched as neighbours too.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    n_ref = 0 if reference is None else int(np.asarray(reference).shape[0])
    total = e.shape[0] + n_ref
    if e.shape[0] < 1 or total < 2:
        raise ObstacleSetError(
            f"q_star='auto' needs at least 2 examples to measure their spacing; got {total}. "
            "Pass a number instead (q_star=FLOAT, or --q-star FLOAT on the command line)"
        )
    if not (np.isfinite(factor) and factor > 0):
        raise ObstacleSetError(f"the auto Q* factor must be a finite number > 0; got {factor}")
    kk = min(int(k), total - 1)
    q = float(factor) * float(np.median(kth_neighbour_distance(e, kk, reference)))
    if not (np.isfinite(q) and q > 0):
        raise ObstacleSetError(
            f"q_star='auto' gave {q}: most examples embed to identical points (duplicate images?). "
            "Pass a number instead (q_star=FLOAT, or --q-star FLOAT)"
        )
    return q


def encode_images(
    inputs: Iterable[PathLike],
    encoder,
    *,
    size: tuple[int, int] = (8, 8),
    batch_size: int = 256,
    resize: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, list[Path]]:
    """Read images (files and folders), encode and embed them: ((N, d) float32, files).

    Every file is checked before anything is encoded (:func:`cspace.io.images.load_images`); the
    channel count comes from the encoder, the size (H, W) from the caller. ``resize``: images of
    another size are resized to ``size`` (said in an ``ImagesResizedNote``) instead of refused.
    ``progress``: a tqdm bar (stderr) over the images when they take more than one batch.
    """
    from cspace.io.images import load_images

    size = _size(size)
    name = getattr(encoder, "name", "")
    images, files = load_images(
        inputs,
        size=size,
        channels=int(encoder.channels),
        resize=resize,
        size_source=f"the size the set is built at with the encoder {name!r}",
    )
    latents = _encode(encoder, images, int(batch_size), progress)
    emb = encoder.embed(latents).detach().to("cpu").float().numpy()
    if not np.all(np.isfinite(emb)):
        bad = [str(f) for f, ok in zip(files, np.isfinite(emb).all(1), strict=True) if not ok]
        raise ObstacleSetError(
            f"the encoder {getattr(encoder, 'name', '')!r} returned NaN or Inf for {bad[:5]}; "
            "check the encoder weights"
        )
    return np.ascontiguousarray(emb, dtype=np.float32), files


def _encode(encoder, images: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """``encoder.encode`` batch by batch, with a tqdm bar over the images (stderr) when
    ``progress`` and there is more than one batch."""
    from tqdm.auto import tqdm

    n = images.shape[0]
    if not progress or n <= batch_size:
        return encoder.encode(images, batch_size=batch_size)
    out = []
    with tqdm(total=n, desc="encoding", unit="image", dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            out.append(encoder.encode(images[start : start + batch_size], batch_size=batch_size))
            bar.update(min(batch_size, n - start))
    return torch.cat(out)


def image_size_for(encoder, size=None) -> tuple[tuple[int, int], str | None]:
    """The image size (H, W) to build at with ``encoder``, and a note to show the user (or None).

    ``size`` None: the encoder's own size (``encoder.image_size``, its config's ``sample_size``).
    A ``size`` that differs from it is refused for an encoder that works at its size only (a
    cspace VAE, ``encoder.size_fixed``: the digits VAEs take 8 x 8 images; at 64 x 64 they
    would embed into a C-space, d = 2048, that no model samples), with both sizes named; for a
    diffusers VAE, whose convolutions take any multiple of its downsampling, it is used, and the
    note says that the set then belongs to images of that size.

    Raises:
        ObstacleSetError: no size given and the encoder declares none; or a size the encoder
            does not take.
    """
    name = getattr(encoder, "name", "the encoder")
    own = getattr(encoder, "image_size", None)
    if size is None:
        if own is None:
            raise ObstacleSetError(
                f"the encoder {name!r} declares no image size (no sample_size in its config); "
                "pass the size of your images (--size N or HxW)"
            )
        return own, None
    size = _size(size)
    if own is None or size == tuple(own):
        return size, None
    want = f"{size[0]}x{size[1]}" if size[0] != size[1] else f"{size[0]}"
    sizes = f"--size {want} ({size[1]}x{size[0]}) differs from the encoder {name!r}'s image size, {own[1]}x{own[0]}"
    if getattr(encoder, "size_fixed", False):
        dim = _expected_dim(encoder, size)
        raise ObstacleSetError(
            f"{sizes}: it was trained at that size only, and {want} images would embed into a "
            f"C-space (d = {dim}) that no model samples. Drop --size (the images are then read at "
            f"{own[1]}x{own[0]}; --resize resizes images of another size), or use an encoder "
            f"made for {size[1]}x{size[0]} images"
        )
    return size, (
        f"{sizes} (its config's sample_size); the set belongs to {size[1]}x{size[0]} images: "
        "sample the pipeline at that size"
    )


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ObstacleSetError(f"size must be an int or (H, W); got {size!r}") from None
    if h < 1 or w < 1:
        raise ObstacleSetError(f"size must be positive; got {size!r}")
    return h, w


def _expected_dim(encoder, size: tuple[int, int]) -> int | None:
    shape = getattr(encoder, "latent_shape", None)
    if shape is None:
        return None
    return int(np.prod(shape(size)))


def _space(encoder, size: tuple[int, int]):
    """The encoder's C-space at ``size`` (None for an encoder without ``space``)."""
    space = getattr(encoder, "space", None)
    return space(size) if callable(space) else None


def _labels(label: str | Sequence[str] | None, files: list[Path]) -> list[str]:
    if label is None:
        return [f.resolve().parent.name for f in files]
    if isinstance(label, str):
        return [label] * len(files)
    out = [str(s) for s in label]
    if len(out) != len(files):
        raise ObstacleSetError(f"label must be a string or {len(files)} strings; got {len(out)}")
    return out


def _parameters(q_star, radius, emb: np.ndarray, reference) -> tuple[object, object]:
    if isinstance(q_star, str):
        if q_star != "auto":
            raise ObstacleSetError(
                f"q_star must be a number > 0 or 'auto'; got {q_star!r} (fix: --q-star 1.5)"
            )
        q_star = auto_q_star(emb, reference=reference)
    if radius is None:
        radius = RADIUS_FRACTION * np.asarray(q_star, dtype=np.float64)
    return q_star, radius


def build_from_images(
    inputs: Iterable[PathLike] | PathLike,
    encoder,
    *,
    q_star: float | str = "auto",
    eta: float = 1.0,
    radius: float | None = None,
    label: str | Sequence[str] | None = None,
    size: tuple[int, int] | int = (8, 8),
    batch_size: int = 256,
    resize: bool = False,
    progress: bool = False,
) -> ObstacleSet:
    """A new :class:`ObstacleSet` from image files and folders of them.

    Args:
        inputs: image files and/or folders (a folder contributes its regular files, sorted; the
            entries it skips are reported as a :class:`cspace.io.images.SkippedFilesWarning`).
        encoder: a :class:`cspace.models.encoders.Encoder` (``channels``, ``encode``, ``embed``).
        q_star: Q* (> 0) for every obstacle, or ``"auto"`` (see the module docstring).
        eta: strength (>= 0).
        radius: hard collision radius (>= 0); default ``RADIUS_FRACTION * q_star``.
        label: one label for all, one per image, or None (the name of each image's folder).
        size: (H, W) the images must have (an int for square images); see
            :func:`image_size_for` for the encoder's own.
        batch_size: images encoded per batch.
        resize: resize images of another size to ``size`` instead of refusing them.
        progress: a bar over the images while they are encoded (more than one batch).

    Raises:
        cspace.io.images.ImageFolderError: a missing path, an empty folder, an unreadable or
            non-image file, a wrong size or channel count (before anything is encoded).
        ObstacleSetError: bad parameters, or "auto" with a single image.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    emb, files = encode_images(inputs, encoder, size=size, batch_size=batch_size, resize=resize,
                               progress=progress)  # fmt: skip
    q, r = _parameters(q_star, radius, emb, None)
    return ObstacleSet.from_embeddings(
        emb,
        q_star=q,
        eta=eta,
        radius=r,
        labels=_labels(label, files),
        sources=[str(f) for f in files],
        space=_space(encoder, _size(size)),
    )


def add_images(
    obstacles: ObstacleSet,
    inputs: Iterable[PathLike] | PathLike,
    encoder,
    *,
    q_star: float | str = "auto",
    eta: float = 1.0,
    radius: float | None = None,
    label: str | Sequence[str] | None = None,
    size: tuple[int, int] | int = (8, 8),
    batch_size: int = 256,
    resize: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Add images to an existing set (in memory; save it yourself); returns the new ids.

    Same arguments as :func:`build_from_images`; ``"auto"`` measures the new examples' spacing
    among the set's obstacles and the new examples together. All-or-nothing: on any error the
    set is unchanged.

    Raises:
        cspace.models.space.SpaceMismatchError: the encoder (at ``size``) is not in the set's
            C-space; the message names both. A set of unknown space takes the encoder's.
    """
    if not isinstance(obstacles, ObstacleSet):
        raise TypeError(f"add_images needs an ObstacleSet; got {type(obstacles).__name__}")
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    space = _space(encoder, _size(size))
    obstacles.check_space(  # first: it names both spaces, image size included
        space,
        f"the encoder {getattr(encoder, 'name', '')!r} at {_size(size)[0]}x{_size(size)[1]}",
        fix="add images with the encoder (and --size) the set was built with, or build a new "
        "set with this encoder",
    )
    want = _expected_dim(encoder, _size(size))
    if want is not None and want != obstacles.dim:  # a set of unknown space
        raise ObstacleSetError(
            f"dimension mismatch: {getattr(encoder, 'name', 'the encoder')} embeds {size} images "
            f"to d={want} but the obstacle set has d={obstacles.dim}; use the encoder (and --size) "
            "the set was built with"
        )
    emb, files = encode_images(inputs, encoder, size=size, batch_size=batch_size, resize=resize,
                               progress=progress)  # fmt: skip
    ref = obstacles.embeddings if len(obstacles) else None
    q, r = _parameters(q_star, radius, emb, ref)
    ids = obstacles.add(
        emb,
        q_star=q,
        eta=eta,
        radius=r,
        labels=_labels(label, files),
        sources=[str(f) for f in files],
    )
    if obstacles.space is None and space is not None:
        obstacles.space = space  # a set of unknown space takes the encoder's (the migration)
    return ids


def classifier_from_images(
    good: Iterable[PathLike] | PathLike | None,
    bad: Iterable[PathLike] | PathLike,
    encoder,
    *,
    unlabelled: Iterable[PathLike] | PathLike | None = None,
    size: tuple[int, int] | int = (8, 8),
    batch_size: int = 256,
    resize: bool = False,
    progress: bool = False,
    **fit,
) -> PreferenceClassifier:
    """A :class:`~obstacles.classifier.PreferenceClassifier` trained on the C-space embeddings of
    image files and folders: ``good`` (wanted) and ``bad`` (to avoid), or, with ``good=None``,
    ``bad`` against ``unlabelled`` images (say, the model's own samples: positive-unlabelled,
    :meth:`PreferenceClassifier.fit_positive_unlabelled`).

    Every image is read and checked before anything is encoded
    (:func:`cspace.io.images.load_images`); a file given as both bad and good (or unlabelled)
    raises :class:`~obstacles.classifier.ClassifierError`, and so does giving both ``good`` and
    ``unlabelled``, or neither. ``fit`` takes the keywords of :meth:`PreferenceClassifier.fit`
    (``C``, ``seed``, ``holdout``, ``threshold``, ``q_star``, ``eta``), or of
    :meth:`PreferenceClassifier.fit_positive_unlabelled` with ``unlabelled`` (``C``, ``seed``,
    ``folds``, ``q_star``, ``eta``). The classifier records the encoder's C-space at ``size``
    and, in ``info``, the image size. ``resize``: images of another size are resized to ``size``
    instead of refused; ``progress``: a bar over the images while they are encoded (more than
    one batch).
    """
    from cspace.io.images import load_images

    if (good is None) == (unlabelled is None):
        raise ClassifierError(
            "give the wanted images (good) or unlabelled images (positive-unlabelled), one of "
            f"the two; got {'both' if good is not None else 'neither'}"
        )
    pu = unlabelled is not None
    size = _size(size)
    good = unlabelled if pu else good
    other = "unlabelled" if pu else "good"
    good = [good] if isinstance(good, str | os.PathLike) else list(good)
    bad = [bad] if isinstance(bad, str | os.PathLike) else list(bad)
    kw = dict(
        size=size,
        channels=int(encoder.channels),
        resize=resize,
        size_source=f"the size the classifier is built at with the encoder "
        f"{getattr(encoder, 'name', '')!r}",
    )
    good_images, good_files = load_images(good, **kw)
    bad_images, bad_files = load_images(bad, **kw)
    overlap = {f.resolve() for f in good_files} & {f.resolve() for f in bad_files}
    if overlap:
        raise ClassifierError(
            f"{len(overlap)} files are both {other} and bad (--{other} and --bad), e.g. "
            f"{sorted(overlap)[0]}"
        )

    def embed(images):
        with torch.no_grad():
            latents = _encode(encoder, images, int(batch_size), progress)
        return encoder.embed(latents).cpu().double().numpy()

    if pu:
        clf = PreferenceClassifier.fit_positive_unlabelled(
            embed(bad_images), embed(good_images), space=_space(encoder, size), **fit
        )
    else:
        clf = PreferenceClassifier.fit(
            embed(good_images), embed(bad_images), space=_space(encoder, size), **fit
        )
    clf.info["image_size"] = list(size)
    return clf
