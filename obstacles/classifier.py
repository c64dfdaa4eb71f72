r"""Preference classifiers as obstacles: a linear "bad" region of the C-space.

A :class:`PreferenceClassifier` is a logistic regression on C-space embeddings, trained on
examples of what is wanted ("good", class 0) and what is not ("bad", class 1):

    p(bad | x) = sigmoid(w . x + b).

Its obstacle is the half-space ``{x : p(bad | x) >= p0}`` for a probability threshold ``p0``
(default 0.5), bounded by the hyperplane ``w . x + b = logit(p0)``. The signed distance to it,

    D(x) = (logit(p0) - (w . x + b)) / |w|,

is positive on the good side and negative inside the bad region; :class:`guidance.ClassifierField`
turns it into the same thresholded potential as the obstacle sets'.

Training (:meth:`PreferenceClassifier.fit`): scikit-learn's ``LogisticRegression`` (L2, lbfgs) with
balanced class weights by default, so ``p(bad | x)`` is the posterior under *equal* class priors
and the boundary does not drift towards the smaller class. A stratified hold-out split
(``holdout`` of the examples, default 25%) measures the accuracy at ``p0`` on examples the model
has not seen; the model is then refit on all examples.

``q_star="auto"``: the median signed distance of the good training examples that lie on the good
side, times 1 (``AUTO_Q_STAR_FACTOR``): the field acts on the half of the good region that is
nearest to the boundary, where states are at risk, and leaves the typical good example alone.

On disk a classifier is a folder (written to a temporary folder and swapped in with
``os.replace``; verified on load, never unpickled)::

    manifest.json              format, version, d, threshold, q_star, eta, accuracy, classes,
                               counts, training settings, size and SHA-256 of the tensor file
    classifier.safetensors     w (d,) float64, b (1,) float64
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from cspace.io.files import sha256_hex, write_folder_atomic

__all__ = [
    "AUTO_Q_STAR_FACTOR",
    "CLASSES",
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_FORMAT_VERSION",
    "ClassifierError",
    "PreferenceClassifier",
    "is_classifier_folder",
    "signed_distance_torch",
]

CLASSIFIER_FORMAT = "cspace.classifier"
CLASSIFIER_FORMAT_VERSION = 1
CLASSES = ("good", "bad")  # label 0, label 1
AUTO_Q_STAR_FACTOR = 1.0
_MANIFEST = "manifest.json"
_TENSORS = "classifier.safetensors"


class ClassifierError(ValueError):
    """A bad preference classifier: invalid input, or a file that is corrupt, foreign or
    mismatched."""


def is_classifier_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a manifest.json written by :meth:`PreferenceClassifier.save`."""
    try:
        manifest = json.loads((Path(path) / _MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == CLASSIFIER_FORMAT


def _check_threshold(p0) -> float:
    try:
        p = float(p0)
    except (TypeError, ValueError):
        raise ClassifierError(f"threshold must be a probability in (0, 1); got {p0!r}") from None
    if not 0 < p < 1:
        raise ClassifierError(
            f"threshold must be a probability strictly between 0 and 1; got {p0!r} (e.g. 0.5)"
        )
    return p


def _check_positive(value, name: str, *, strict: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ClassifierError(f"{name} must be a number; got {value!r}") from None
    ok = v > 0 if strict else v >= 0
    if not (math.isfinite(v) and ok):
        rel = "> 0" if strict else ">= 0"
        raise ClassifierError(f"{name} must be a finite number {rel}; got {value!r}")
    return v


def _as_matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 2:
        raise ClassifierError(f"{name} must be a 2-D array (N, d); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ClassifierError(f"{name} must be real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ClassifierError(f"{name} contain NaN or Inf; remove or fix those rows")
    return arr


class PreferenceClassifier:
    """A linear preference classifier ``p(bad | x) = sigmoid(w . x + b)`` with its obstacle
    parameters.

    Args:
        w: the normal (d,), not zero.
        b: the bias.
        threshold: ``p0`` in (0, 1): the bad region is ``p(bad | x) >= p0``.
        q_star: Q* (> 0), the influence range of the field, in distance to the boundary.
        eta: strength (>= 0) of the field.
        accuracy: held-out accuracy at ``p0`` (None when not measured).
        train_accuracy: accuracy at ``p0`` on all training examples (None if unknown).
        info: extra JSON-serialisable metadata (counts, training settings, encoder name).
    """

    def __init__(
        self,
        w,
        b: float,
        *,
        threshold: float = 0.5,
        q_star: float = 1.0,
        eta: float = 1.0,
        accuracy: float | None = None,
        train_accuracy: float | None = None,
        info: dict | None = None,
    ) -> None:
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        if w.size < 1 or not np.all(np.isfinite(w)):
            raise ClassifierError(f"w must be a finite vector of length >= 1; got {w[:5]}")
        norm = float(np.linalg.norm(w))
        if not (norm > 0 and math.isfinite(norm)):
            raise ClassifierError(
                f"the classifier's normal w has norm {norm}: it does not separate anything "
                "(too few or identical examples, or C too small)"
            )
        b = float(np.asarray(b, dtype=np.float64).reshape(-1)[0])
        if not math.isfinite(b):
            raise ClassifierError(f"b must be finite; got {b}")
        self.w = w
        self.b = b
        self.threshold = _check_threshold(threshold)
        self.q_star = _check_positive(q_star, "q_star", strict=True)
        self.eta = _check_positive(eta, "eta", strict=False)
        self.accuracy = None if accuracy is None else float(accuracy)
        self.train_accuracy = None if train_accuracy is None else float(train_accuracy)
        self.info = dict(info or {})

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(
        cls,
        good_embeddings,
        bad_embeddings,
        *,
        C: float = 1.0,
        seed: int = 0,
        holdout: float = 0.25,
        threshold: float = 0.5,
        q_star: float | str = "auto",
        eta: float = 1.0,
        balanced: bool = True,
        max_iter: int = 5000,
    ) -> PreferenceClassifier:
        """Train on good (class 0) and bad (class 1) embeddings (N, d) each.

        A stratified ``holdout`` fraction (0 <= holdout < 1; 0 skips it and leaves ``accuracy``
        None) is held out to measure the accuracy at ``threshold``, then the model is refit on
        all examples. ``q_star="auto"``: see the module docstring.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        good = _as_matrix(good_embeddings, "good embeddings")
        bad = _as_matrix(bad_embeddings, "bad embeddings")
        if good.shape[0] == 0 or bad.shape[0] == 0:
            missing = "good" if good.shape[0] == 0 else "bad"
            raise ClassifierError(
                f"no {missing} examples: a preference classifier needs examples of both classes "
                f"(got {good.shape[0]} good, {bad.shape[0]} bad)"
            )
        if good.shape[1] != bad.shape[1]:
            raise ClassifierError(
                f"dimension mismatch: good embeddings have d={good.shape[1]}, bad d={bad.shape[1]}"
            )
        c = _check_positive(C, "C", strict=True)
        p0 = _check_threshold(threshold)
        h = float(holdout)
        if not 0 <= h < 1:
            raise ClassifierError(f"holdout must be in [0, 1); got {holdout}")
        x = np.concatenate([good, bad])
        y = np.concatenate([np.zeros(len(good), np.int64), np.ones(len(bad), np.int64)])
        n = len(y)

        def model():
            return LogisticRegression(
                C=c,
                class_weight="balanced" if balanced else None,
                max_iter=int(max_iter),
                random_state=int(seed),
            )

        def acc(m, xs, ys) -> float:
            return float(np.mean((_prob_bad(m, xs) >= p0).astype(np.int64) == ys))

        accuracy = None
        n_test = 0
        if h > 0:
            n_test = math.ceil(h * n)
            if min(len(good), len(bad)) < 2 or n_test < 2 or n - n_test < 2:
                raise ClassifierError(
                    f"too few examples for a held-out split ({len(good)} good, {len(bad)} bad, "
                    f"holdout={h}): a stratified split needs at least 2 examples of each class "
                    "in training and 1 in the hold-out. Add examples, or pass holdout=0 "
                    "(--holdout 0) to skip measuring the held-out accuracy"
                )
            x_tr, x_te, y_tr, y_te = train_test_split(
                x, y, test_size=n_test, stratify=y, random_state=int(seed)
            )
            accuracy = acc(model().fit(x_tr, y_tr), x_te, y_te)
        full = model().fit(x, y)
        w, b = full.coef_[0].astype(np.float64), float(full.intercept_[0])
        info = {
            "counts": {"good": len(good), "bad": len(bad)},
            "C": c,
            "seed": int(seed),
            "holdout": h,
            "holdout_count": int(n_test),
            "class_weight": "balanced" if balanced else "none",
        }
        if isinstance(q_star, str):
            if q_star != "auto":
                raise ClassifierError(f"q_star must be a number > 0 or 'auto'; got {q_star!r}")
            norm = float(np.linalg.norm(w))
            if not norm > 0:
                raise ClassifierError(
                    "the fitted normal w is zero: the classifier does not separate the examples"
                )
            dist = (_logit(p0) - (good @ w + b)) / norm
            pos = dist[dist > 0]
            if pos.size == 0:
                raise ClassifierError(
                    "q_star='auto' is undefined: no good example lies on the good side of the "
                    "boundary. Pass a number (--q-star FLOAT) or check the examples"
                )
            q_star = AUTO_Q_STAR_FACTOR * float(np.median(pos))
            info["q_star_rule"] = "auto: median signed distance of the good examples (> 0)"
        out = cls(w, b, threshold=p0, q_star=q_star, eta=eta, accuracy=accuracy, info=info)
        out.train_accuracy = acc(full, x, y)
        return out

    # ------------------------------------------------------------------ the model
    @property
    def dim(self) -> int:
        return int(self.w.size)

    @property
    def offset(self) -> float:
        """``(logit(p0) - b) / |w|``: the signed distance of the origin to the boundary."""
        return (_logit(self.threshold) - self.b) / float(np.linalg.norm(self.w))

    @property
    def unit_normal(self) -> np.ndarray:
        """``w / |w|`` (d,): points into the bad region."""
        return self.w / float(np.linalg.norm(self.w))

    def _check_dim(self, x: np.ndarray | torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ClassifierError(
                f"dimension mismatch: embeddings have shape {tuple(x.shape)} but the classifier "
                f"has d={self.dim}"
            )

    def signed_distance(self, embeddings):
        """``D = (logit(p0) - (w . x + b)) / |w|`` for embeddings (B, d) or (d,); positive on the
        good side. Float64; a torch tensor for a tensor input (on its device), else numpy."""
        is_torch = isinstance(embeddings, torch.Tensor)
        x = embeddings if is_torch else torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
        if x.ndim == 1:
            x = x[None]
        self._check_dim(x)
        d = signed_distance_torch(x.to(torch.float64), self.unit_normal, self.offset)
        return d if is_torch else d.numpy()

    def prob_bad(self, embeddings) -> np.ndarray:
        """``p(bad | x)`` for embeddings (B, d); (B,) float64 numpy."""
        x = _as_matrix(np.atleast_2d(np.asarray(embeddings)), "embeddings")
        self._check_dim(x)
        z = x @ self.w + self.b
        return np.exp(-np.logaddexp(0.0, -z))

    def is_bad(self, embeddings) -> np.ndarray:
        """Whether each embedding lies in the bad region (``D < 0``); (B,) bool."""
        return np.asarray(self.signed_distance(np.asarray(embeddings, dtype=np.float64))) < 0

    def __repr__(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.3f}"
        return (
            f"PreferenceClassifier(d={self.dim}, threshold={self.threshold}, "
            f"q_star={self.q_star:.4g}, eta={self.eta:.4g}, heldout_accuracy={acc})"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier to the folder ``path`` atomically; returns the path.

        An existing folder is replaced only if it is a saved classifier or empty.
        """
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise ClassifierError(f"{path} exists and is not a folder; choose another --out")
            if any(path.iterdir()) and not is_classifier_folder(path):
                raise ClassifierError(
                    f"{path} is a non-empty folder that is not a cspace classifier; refusing to "
                    "overwrite it (choose another --out)"
                )
        parent = path.parent if str(path.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise ClassifierError(f"no write permission in {parent}")
        blob = _st_save({"w": self.w.astype(np.float64), "b": np.array([self.b], np.float64)})
        manifest = {
            "format": CLASSIFIER_FORMAT,
            "format_version": CLASSIFIER_FORMAT_VERSION,
            "dim": self.dim,
            "threshold": self.threshold,
            "q_star": self.q_star,
            "eta": self.eta,
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "classes": list(CLASSES),
            "info": self.info,
            "files": {_TENSORS: {"bytes": len(blob), "sha256": sha256_hex(blob)}},
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        }
        files = {_TENSORS: blob, _MANIFEST: json.dumps(manifest, indent=1).encode()}
        return write_folder_atomic(path, files)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_dim: int | None = None) -> PreferenceClassifier:
        """Read a classifier written by :meth:`save`, verifying format, version, size, SHA-256,
        shapes and values; raises :class:`ClassifierError` naming the problem."""
        path = Path(path)
        mpath = path / _MANIFEST
        if not mpath.is_file():
            raise ClassifierError(f"{path} is not a cspace classifier: {_MANIFEST} is missing")
        try:
            manifest = json.loads(mpath.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ClassifierError(f"{mpath} is corrupt or not JSON: {err}") from err
        if not isinstance(manifest, dict) or manifest.get("format") != CLASSIFIER_FORMAT:
            raise ClassifierError(
                f"{mpath} is not a cspace classifier manifest (format != {CLASSIFIER_FORMAT!r})"
            )
        version = manifest.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= CLASSIFIER_FORMAT_VERSION:
            raise ClassifierError(
                f"{path} has format_version {version!r}; this cspace reads versions "
                f"1..{CLASSIFIER_FORMAT_VERSION} (upgrade cspace to read newer classifiers)"
            )
        try:
            dim = int(manifest["dim"])
            want = manifest["files"][_TENSORS]
            threshold, q_star, eta = manifest["threshold"], manifest["q_star"], manifest["eta"]
            nbytes, digest = want["bytes"], want["sha256"]
        except (KeyError, TypeError, ValueError) as err:
            raise ClassifierError(f"{mpath} lacks a required field: {err}") from err
        if manifest.get("classes", list(CLASSES)) != list(CLASSES):
            raise ClassifierError(
                f"{mpath}: classes {manifest.get('classes')!r}, expected {list(CLASSES)}"
            )
        if expected_dim is not None and dim != int(expected_dim):
            raise ClassifierError(
                f"dimension mismatch: {path} is a d={dim} classifier but d={expected_dim} was "
                "expected (use the encoder it was trained with)"
            )
        tpath = path / _TENSORS
        if not tpath.is_file():
            raise ClassifierError(f"{tpath} is missing")
        data = tpath.read_bytes()
        if len(data) != nbytes:
            raise ClassifierError(
                f"{tpath} has {len(data)} bytes but the manifest says {nbytes}: truncated or "
                "replaced"
            )
        if sha256_hex(data) != digest:
            raise ClassifierError(
                f"checksum mismatch for {tpath}: the file changed after it was saved"
            )
        try:
            tensors = _st_load(data)
        except Exception as err:  # safetensors raises its own error type
            raise ClassifierError(f"{tpath} is not a readable safetensors file: {err}") from err
        w, b = tensors.get("w"), tensors.get("b")
        if w is None or w.shape != (dim,) or b is None or b.shape != (1,):
            raise ClassifierError(
                f"{tpath}: expected w of shape ({dim},) and b of shape (1,); got "
                f"{None if w is None else w.shape} and {None if b is None else b.shape}"
            )
        info = manifest.get("info", {})
        return cls(
            w,
            b[0],
            threshold=threshold,
            q_star=q_star,
            eta=eta,
            accuracy=manifest.get("accuracy"),
            train_accuracy=manifest.get("train_accuracy"),
            info=info if isinstance(info, dict) else {},
        )


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _prob_bad(model, x: np.ndarray) -> np.ndarray:
    z = x @ model.coef_[0] + model.intercept_[0]
    return np.exp(-np.logaddexp(0.0, -z))


def signed_distance_torch(
    x: torch.Tensor, unit_normal, offset: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``D = scale * offset - u . x`` for embeddings ``x`` (B, d) float64, ``u`` the unit normal
    (into the bad region), ``offset = (logit(p0) - b)/|w|`` and an optional per-row ``scale``
    (B,) of the offset (noised boundaries). Finite for every finite input: for rows with
    ``max|x| > 1`` the product is taken on ``x / max|x|`` and rescaled, and the result is held
    within +-finfo(float64).max / 2."""
    u = torch.as_tensor(unit_normal, dtype=torch.float64, device=x.device)
    big = float(torch.finfo(torch.float64).max) / 2
    s = x.abs().amax(dim=1)
    s = torch.where(s > 1, s, torch.ones_like(s))
    off = torch.full_like(s, float(offset)) if scale is None else scale * float(offset)
    d = s * (off / s - (x / s[:, None]) @ u)
    return d.clamp(-big, big)
