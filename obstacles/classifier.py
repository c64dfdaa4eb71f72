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

**Positive-unlabelled** (:meth:`PreferenceClassifier.fit_positive_unlabelled`): a user who has
examples of what to avoid and nothing labelled good still has unlabelled states, such as the
model's own samples, a mixture ``f_U = (1 - pi) f_0 + pi f_1`` with an unknown share ``pi`` of bad
ones. A classifier ``g`` of the examples (drawn from ``f_1``) against the unlabelled states, with
balanced class weights, estimates ``g / (1 - g) = f_1 / f_U``, so the posterior of the class
under the model's mixture is ``q(x) = pi g / (1 - g)``. ``c`` is the mean of ``g`` over the
examples, each scored out of fold (Elkan and Noto's 2008 constant, "Learning classifiers from
only positive and unlabeled data"); where the classes do not overlap ``g = 1 / (1 + pi)`` on
the class, so ``pi ~ 1/c - 1``. The bad region is ``g(x) >= c / 2``, which in these terms is
``q(x) >= (1 - c) / (2 - c)``, 0.14 to 0.22 for the c of 0.72-0.84 of the digits demo: an
inclusive region, since what avoidance misses counts against it (<= 10% of the class may be left)
and what it takes of other classes costs a little shift and NFE. It is not Elkan and Noto's
``p(bad | x) >= 1/2``: their ``p = g / c`` holds when the examples are a random part of one
pooled sample, not for two samples drawn apart as here; the rule for ``q >= 1/2`` would be
``threshold = c / (2 - c)``, a smaller region (about 0.7 instead of 0.4). Caveats: ``c`` comes
from the fold models, fit on ``(folds - 1) / folds`` of the data with the same ``C`` (so slightly
more regularised than the model thresholded: their ``c`` is lower, the region larger); the
examples are real images and the unlabelled states generated ones, so ``g`` may also learn
"real against generated" (the demo measures the region on generated samples too); duplicated
rows would leak across the folds; the default ``C`` assumes embeddings of unit-order scale (the
C-spaces' normalised latents).

``C``
defaults to ``PU_CN / n`` (:data:`PU_CN` = 31.2, ``n`` the examples and unlabelled states
together: 0.03 at the digits demo's 40 + 1,000), a strong L2 penalty for 40-50 examples in
d = 32 to 196, the same per sample whatever n: on the digits demo's unguided samples (scratch
runs, seeds 0-2, half fit and half scored) C = 0.03 left the least of the class at shifts under 3
points among 0.01, 0.03 and 0.1, while scikit-learn's cross-validated log loss (grid 1e-3 to 10)
picked C of 1 to 10, which keeps too little of the class inside; with 20 examples and 60
unlabelled digits a fixed C of 0.03 put 63% of the unlabelled states inside, C = 31.2 / 80 = 0.39
the threes and 2% of the rest.

``q_star="auto"``: the median signed distance of the good training examples that lie on the good
side, times 1 (``AUTO_Q_STAR_FACTOR``): the field acts on the half of the good region that is
nearest to the boundary, where states are at risk, and leaves the typical good example alone.

A classifier records the C-space of the embeddings it was trained on (:attr:`space`, a
:class:`cspace.models.space.Space`; None: unknown, as for classifiers saved before spaces were
recorded); :meth:`PreferenceClassifier.check_space` refuses another space.

On disk a classifier is a folder in cspace's safe-folder format (:mod:`cspace.io.folder`:
crash-safe, serialised with other writers; verified on load, every field's type and range and
the tensor header checked; never unpickled)::

    manifest.json              format "cspace.classifier", format_version 3, d, threshold, q_star,
                               eta, accuracy, classes, counts, training settings, space, stored
                               name, size and SHA-256 of the tensor file
    classifier.safetensors     w (d,) float64, b (1,) float64 (stored as
                               classifier-<hash>.safetensors)

Classifiers of format_version 2 and 1 (no space) still load, v1 with ``space = None``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from cspace.io.errors import FolderError
from cspace.io.folder import (
    FolderKind,
    check_int,
    check_number,
    is_folder_of,
    read_folder,
    write_folder,
)
from cspace.io.legacy import CLASSIFIER_V1, manifest_v2
from cspace.io.untrusted import MAX_DIM, FormatError, check_safetensors
from cspace.models.space import Space, check_same_space

__all__ = [
    "AUTO_Q_STAR_FACTOR",
    "CLASSES",
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_FORMAT_VERSION",
    "CLASSIFIER_KIND",
    "PU_CN",
    "ClassifierError",
    "PreferenceClassifier",
    "is_classifier_folder",
    "signed_distance_torch",
]

CLASSIFIER_FORMAT = "cspace.classifier"
CLASSIFIER_FORMAT_VERSION = 3
CLASSES = ("good", "bad")  # label 0, label 1
AUTO_Q_STAR_FACTOR = 1.0
#: ``C x n`` of :meth:`PreferenceClassifier.fit_positive_unlabelled` by default (module
#: docstring): ``C = PU_CN / n`` for ``n`` examples and unlabelled states together, the same L2
#: penalty per sample whatever n (0.03 at the digits demo's 40 + 1,000)
PU_CN = 31.2
_TENSORS = "classifier.safetensors"


class ClassifierError(FolderError):
    """A bad preference classifier: invalid input, or a file that is corrupt, foreign or
    mismatched."""


#: the classifier's folder kind (:mod:`cspace.io.folder`)
CLASSIFIER_KIND = FolderKind(
    format=CLASSIFIER_FORMAT,
    version=CLASSIFIER_FORMAT_VERSION,
    what="classifier",
    a_what="a cspace classifier",
    error=ClassifierError,
    files=(_TENSORS,),
    fix="retrain it (cspace obstacles classifier) or restore the folder from a copy",
    legacy=(CLASSIFIER_V1, manifest_v2((_TENSORS,))),
)


def is_classifier_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a manifest.json written by :meth:`PreferenceClassifier.save` (any
    version; not verified)."""
    return is_folder_of(path, CLASSIFIER_KIND)


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


def _same_d(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    """Raise :class:`ClassifierError` unless the (N, d) matrices ``a`` and ``b`` share d."""
    if a.shape[1] != b.shape[1]:
        raise ClassifierError(
            f"dimension mismatch: {a_name} have d={a.shape[1]}, {b_name} d={b.shape[1]}"
        )


def _logistic(C: float, balanced: bool, max_iter: int, seed: int):
    """The scikit-learn model both fits use: L2 logistic regression (lbfgs), inverse strength
    ``C``, balanced class weights or none."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C,
        class_weight="balanced" if balanced else None,
        max_iter=int(max_iter),
        random_state=int(seed),
    )


def _pu_inputs(examples, unlabelled, C, folds, seed, cn: float):
    """The checked inputs of a positive-unlabelled fit: ``(examples, unlabelled, C, folds)``
    with the examples and unlabelled states as float64 (M, d) and (N, d) matrices and ``C``
    ``cn / (M + N)`` when None. Raises :class:`ClassifierError` naming the bad value."""
    bad = _as_matrix(examples, "examples")
    rest = _as_matrix(unlabelled, "unlabelled states")
    _same_d(bad, rest, "the examples", "the unlabelled states")
    if isinstance(C, bool):
        raise ClassifierError(f"C must be a finite number > 0; got {C!r}")
    c_reg = cn / (len(bad) + len(rest)) if C is None else _check_positive(C, "C", strict=True)
    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
        raise ClassifierError(f"folds must be an integer >= 2; got {folds!r}")
    k = int(folds)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ClassifierError(f"seed must be an integer in 0 .. 2**32 - 1; got {seed!r}")
    if min(len(bad), len(rest)) < k:
        raise ClassifierError(
            f"{k}-fold estimation of Elkan and Noto's c needs at least {k} examples and {k} "
            f"unlabelled states; got {len(bad)} and {len(rest)} (add some, or lower folds, --folds)"
        )
    return bad, rest, c_reg, k


def _pu_constant(model, x: np.ndarray, y: np.ndarray, folds: int, seed: int):
    """Out-of-fold probabilities ``g`` of the rows ``x`` (labels ``y``, 1 = example) from a
    stratified ``folds``-fold split, and Elkan and Noto's ``c``, their mean over the examples.
    Raises :class:`ClassifierError` when ``c`` is not > 1e-9 (nothing told apart)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed))
    oof = cross_val_predict(model(), x, y, cv=split, method="predict_proba")[:, 1]
    c = float(np.mean(oof[y == 1]))
    if not (math.isfinite(c) and c > 1e-9):
        raise ClassifierError(
            f"Elkan and Noto's c = {c:.3g}: the classifier does not tell the examples from the "
            "unlabelled states (check that both are embeddings of the same C-space)"
        )
    return oof, c


def _pu_region_check(inside: float, rule: str, c: float, hint: str = "a larger C") -> None:
    """Refuse a learnt region that holds half of the unlabelled states or more; ``hint``: the
    fit's settings that would narrow it."""
    if inside >= 0.5:
        raise ClassifierError(
            f"the region {rule} (c = {c:.3f}) holds {100 * inside:.0f}% of the unlabelled "
            f"states: the examples are not told apart from them. Give more examples, {hint}, "
            "or embeddings that separate them (a class that is most of the unlabelled states is "
            "not what this rule is for)"
        )


def _q_star(q_star, good: np.ndarray, w: np.ndarray, b: float, p0: float, info: dict,
            what: str = "good example") -> float:  # fmt: skip
    """``q_star`` as given, or for ``"auto"`` (module docstring) the median signed distance of
    the ``good`` rows on the good side of ``w . x + b = logit(p0)``, times
    :data:`AUTO_Q_STAR_FACTOR` (recorded in ``info``)."""
    if not isinstance(q_star, str):
        return q_star
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
            f"q_star='auto' is undefined: no {what} lies on the good side of the "
            "boundary. Pass a number (--q-star FLOAT) or check the examples"
        )
    info["q_star_rule"] = f"auto: median signed distance of the {what}s on the good side (> 0)"
    return AUTO_Q_STAR_FACTOR * float(np.median(pos))


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
        space: the C-space of the embeddings (:class:`cspace.models.space.Space`; None:
            unknown).
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
        space: Space | None = None,
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
        self.space = space

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
        space: Space | None = None,
    ) -> PreferenceClassifier:
        """Train on good (class 0) and bad (class 1) embeddings (N, d) each.

        A stratified ``holdout`` fraction (0 <= holdout < 1; 0 skips it and leaves ``accuracy``
        None) is held out to measure the accuracy at ``threshold``, then the model is refit on
        all examples. ``q_star="auto"``: see the module docstring. ``space``: the C-space of
        the embeddings (recorded with the classifier).
        """
        from sklearn.model_selection import train_test_split

        good = _as_matrix(good_embeddings, "good embeddings")
        bad = _as_matrix(bad_embeddings, "bad embeddings")
        if good.shape[0] == 0 or bad.shape[0] == 0:
            missing = "good" if good.shape[0] == 0 else "bad"
            raise ClassifierError(
                f"no {missing} examples: a preference classifier needs examples of both classes "
                f"(got {good.shape[0]} good, {bad.shape[0]} bad)"
            )
        _same_d(good, bad, "good embeddings", "bad")
        c = _check_positive(C, "C", strict=True)
        p0 = _check_threshold(threshold)
        h = float(holdout)
        if not 0 <= h < 1:
            raise ClassifierError(f"holdout must be in [0, 1); got {holdout}")
        x = np.concatenate([good, bad])
        y = np.concatenate([np.zeros(len(good), np.int64), np.ones(len(bad), np.int64)])
        n = len(y)

        def model():
            return _logistic(c, balanced, max_iter, seed)

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
        q_star = _q_star(q_star, good, w, b, p0, info)
        out = cls(
            w, b, threshold=p0, q_star=q_star, eta=eta, accuracy=accuracy, info=info, space=space
        )
        out.train_accuracy = acc(full, x, y)
        return out

    @classmethod
    def fit_positive_unlabelled(
        cls,
        examples,
        unlabelled,
        *,
        C: float | None = None,
        folds: int = 5,
        seed: int = 0,
        q_star: float | str = "auto",
        eta: float = 1.0,
        max_iter: int = 5000,
        space: Space | None = None,
    ) -> PreferenceClassifier:
        r"""Train from examples of what is not wanted alone, with unlabelled states as the rest
        (module docstring, **Positive-unlabelled**): ``examples`` (M, d) are labelled bad,
        ``unlabelled`` (N, d) (say, the model's own samples, a mixture that includes some
        bad ones) are the other class.

        ``g(x) = sigmoid(w . x + b)`` is fit with balanced class weights and scikit-learn's
        inverse L2 strength ``C`` (None: ``PU_CN / n``, :data:`PU_CN`, ``n`` the examples and
        unlabelled states together: scikit-learn sums the loss over the samples, so a fixed C
        would regularise 100 states ten times as much as 1,000);
        ``c = mean g`` over the examples, each scored by the model of the ``folds``-fold
        stratified split that did not see it (Elkan and Noto's constant, out of fold); the bad
        region is ``g(x) >= c / 2`` (``threshold = c / 2``; module docstring: the posterior of
        the class under the unlabelled mixture at least ``(1 - c) / (2 - c)``).

        ``accuracy`` stays None (there are no labelled good examples); ``info`` records ``c``,
        the examples' out-of-fold recall at the threshold (``example_recall``) and the share of
        the unlabelled states inside the region (``unlabelled_inside``).

        Raises:
            ClassifierError: fewer than ``folds`` examples or unlabelled states, ``folds < 2``,
                ``C <= 0``, a dimension mismatch, non-finite input, a ``c`` so small (<= 1e-9)
                that the examples are not told apart from the unlabelled states, or a region
                that holds half of the unlabelled states or more (the same failure, seen from
                the other side).
        """
        bad, rest, c_reg, k = _pu_inputs(examples, unlabelled, C, folds, seed, PU_CN)
        x = np.concatenate([rest, bad])
        y = np.concatenate([np.zeros(len(rest), np.int64), np.ones(len(bad), np.int64)])

        def model():
            return _logistic(c_reg, True, max_iter, seed)

        oof, c = _pu_constant(model, x, y, k, seed)
        p0 = c / 2
        full = model().fit(x, y)
        w, b = full.coef_[0].astype(np.float64), float(full.intercept_[0])
        info = {
            "rule": "positive-unlabelled: g(x) >= c / 2, c = out-of-fold mean g of the examples",
            "counts": {"unlabelled": len(rest), "examples": len(bad)},
            "C": c_reg,
            "folds": k,
            "seed": int(seed),
            "c": c,
            "example_recall": float(np.mean(oof[y == 1] >= p0)),
            "unlabelled_inside": float(np.mean(_prob_bad(full, rest) >= p0)),
            "class_weight": "balanced",
        }
        _pu_region_check(info["unlabelled_inside"], "p(bad | x) >= c / 2", c)
        q_star = _q_star(q_star, rest, w, b, p0, info, what="unlabelled state")
        return cls(w, b, threshold=p0, q_star=q_star, eta=eta, info=info, space=space)

    # ------------------------------------------------------------------ the model
    @property
    def dim(self) -> int:
        return int(self.w.size)

    @property
    def space(self) -> Space | None:
        """The C-space of the embeddings (None: unknown); settable, its d must be the
        classifier's."""
        return self._space

    @space.setter
    def space(self, value: Space | None) -> None:
        if value is not None:
            if not isinstance(value, Space):
                raise ClassifierError(
                    f"space must be a cspace.models.space.Space or None; got {type(value).__name__}"
                )
            if value.dim != self.dim:
                raise ClassifierError(
                    f"dimension mismatch: the space {value.describe()} has d={value.dim} but "
                    f"the classifier has d={self.dim}"
                )
        self._space = value

    def check_space(self, other: Space | None, what: str, fix: str = "") -> None:
        """Raise :class:`cspace.models.space.SpaceMismatchError` (naming both spaces) when
        ``other`` (the space of ``what``) is not the classifier's; None on either side passes."""
        check_same_space(self.space, other, "the classifier", what, fix)

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
        """Write the classifier to the folder ``path`` (crash-safe, serialised with other
        writers: :func:`cspace.io.folder.write_folder`); returns the path.

        An existing folder is replaced only if it is a saved classifier or empty.
        """
        blob = _st_save({"w": self.w.astype(np.float64), "b": np.array([self.b], np.float64)})
        fields = {
            "dim": self.dim,
            "threshold": self.threshold,
            "q_star": self.q_star,
            "eta": self.eta,
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "classes": list(CLASSES),
            "info": self.info,
            "space": None if self.space is None else self.space.to_json(),
        }
        return write_folder(path, CLASSIFIER_KIND, fields, {_TENSORS: blob})

    @classmethod
    def load(cls, path: str | os.PathLike, expected_dim: int | None = None) -> PreferenceClassifier:
        """Read a classifier written by :meth:`save` (or a version-1 one), verifying format,
        version, size, SHA-256, shapes and values; raises :class:`ClassifierError` naming the
        problem."""
        folder = read_folder(path, CLASSIFIER_KIND)
        path, mpath, manifest = folder.path, folder.mpath, folder.manifest
        kind = CLASSIFIER_KIND
        dim = check_int(folder.get("dim"), "dim", mpath, kind, 1, MAX_DIM)
        threshold = check_number(folder.get("threshold"), "threshold", mpath, kind, 0.0, 1.0)
        q_star = check_number(folder.get("q_star"), "q_star", mpath, kind)
        eta = check_number(folder.get("eta"), "eta", mpath, kind)
        for name in ("accuracy", "train_accuracy"):
            check_number(manifest.get(name), name, mpath, kind, 0.0, 1.0, none=True)
        if manifest.get("classes", list(CLASSES)) != list(CLASSES):
            raise ClassifierError(
                f"{mpath}: classes {manifest.get('classes')!r:.80}, expected {list(CLASSES)}",
                mpath,
            )
        if expected_dim is not None and dim != int(expected_dim):
            raise ClassifierError(
                f"dimension mismatch: {path} is a d={dim} classifier but d={expected_dim} was "
                "expected (use the encoder it was trained with)",
                path,
            )
        try:
            space = Space.from_json(manifest.get("space"))
        except ValueError as err:
            raise ClassifierError(f"{mpath}: bad space record: {err}", mpath) from err
        tpath = folder.file(_TENSORS)
        try:
            check_safetensors(folder.files[_TENSORS], {"w": ("F64", (dim,)), "b": ("F64", (1,))})
            tensors = _st_load(folder.files[_TENSORS])
        except FormatError as err:
            raise ClassifierError(
                f"{tpath} is not a readable safetensors file of this classifier: {err}", tpath
            ) from None
        except Exception as err:  # pragma: no cover - safetensors' own checks, after ours
            raise ClassifierError(
                f"{tpath} is not a readable safetensors file: {err}", tpath
            ) from err
        w, b = tensors["w"], tensors["b"]
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
            space=space,
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
