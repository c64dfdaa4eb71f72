"""The embedded digits data set and its fixed splits.

The embedded default is scikit-learn's digits (1,797 real 8x8 grey images, 0..16, shipped inside
scikit-learn). It is split once, stratified by class with a fixed seed, into three disjoint parts:

* ``train`` (50%): the teacher, the VAEs and the latent flow models are trained on it;
* ``judge`` (25%): only the independent judge classifier is trained on it;
* ``heldout`` (25%): evaluation, and the example images shipped under ``examples/``.

Images are float32 ``(N, 1, 8, 8)`` in [-1, 1] (:mod:`cspace.io.images` reads and writes files).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SPLITS", "digits", "shift_images"]

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
