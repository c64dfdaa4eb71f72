r"""A membership region learnt from examples and unlabelled states with an RBF kernel model:
the nonlinear twin of :meth:`obstacles.PreferenceClassifier.fit_positive_unlabelled`, for a
membership test only (rejection sampling), not a field.

The model is the positive-unlabelled one of :mod:`obstacles.classifier` (module docstring,
**Positive-unlabelled**): a balanced logistic regression ``g`` of the examples against the
unlabelled states, ``c`` the examples' out-of-fold mean of ``g`` (Elkan and Noto's constant),
the region ``g(x) >= factor * c``. Here ``g`` is linear in kernel features, not in ``x``:

    phi(x) = N k(x),   k_j(x) = exp(-gamma |x - z_j|^2),   g(x) = sigmoid(w . phi(x) + b)

with ``z_j`` (K, d) landmarks drawn from the fitted rows and ``N`` (K, K) the inverse square
root of their kernel matrix (scikit-learn's ``Nystroem``; K = ``components``, at most the rows
of one fold's fit).
``gamma = width / m``, ``m`` the median squared distance between unlabelled states (the first
200 in a seeded random order), so the kernel's reach scales with the space.

**Defaults, and what they rest on.** ``width`` = 2, ``C`` = ``30 * PU_CN / n`` (30 times the
linear fit's penalty per sample: the kernel features need less shrinkage), ``factor`` = 0.4.
They were chosen together on the digits demo's unguided samples, seeds 0-2, among widths 1 and
2, C of 30 and 100 x and factors 0.3, 0.4 and 0.5 (``benchmarks/membership_frontier.py`` shows
the protocol: 1,000 samples fit, 1,000 others judged). The choice passed the demo's avoidance
targets on 9 of 10 classes on every seed, and on seeds 3-4, held out, 9 of 10 too. The linear
region's ``c / 2`` passed 7 of 10 on seeds 0-2. The factor is not derived: with ``g / (1 - g)``
the density ratio of the class to the unlabelled mixture (as for the linear fit),
``g >= 0.4 c`` is the posterior ``q >= pi 0.4 c / (1 - 0.4 c)``, ``pi`` the class's share,
an inclusive region. It is larger than the kernel model's ``c / 2`` region, which left 0.10-0.16
of three digit classes.

It is fitted where it is used (``rejection-pu``, the demo's rejection-pu arm) and not saved
to disk: the fit takes about a second and needs the model's own samples of the run. The
half-space of :class:`obstacles.PreferenceClassifier` is what a field and a classifier folder
take.

Cost: a fit is ``folds + 1`` scikit-learn fits of K features (about 2 s for 1,040 rows at K =
300, d = 32, on one core); a test of m states takes an (m, K) kernel in blocks of 4,096 rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from obstacles.classifier import (
    PU_CN,
    ClassifierError,
    _as_matrix,
    _check_positive,
    _logistic,
    _pu_constant,
    _pu_inputs,
    _pu_region_check,
)

__all__ = ["KERNEL_C_FACTOR", "KernelRegion"]

#: ``C x n / PU_CN`` of :meth:`KernelRegion.fit_positive_unlabelled` by default (module docstring)
KERNEL_C_FACTOR = 30.0
_BLOCK = 4096


class KernelRegion:
    """The region ``g(x) >= threshold`` of a positive-unlabelled RBF kernel model (module
    docstring). Build it with :meth:`fit_positive_unlabelled`; test states with
    :meth:`prob_bad`, :meth:`is_bad` (NumPy) or :meth:`inside` (torch, the membership-test
    interface of :func:`guidance.fields.regions.hard_regions`).

    Attributes:
        landmarks: (K, d) float64, the ``z_j``.
        normalization: (K, K) float64, ``N``.
        gamma: the kernel's ``gamma``.
        w, b: (K,) float64 and float, the logistic regression on ``phi``.
        threshold: the region's probability threshold (``factor * c``).
        info: what the fit measured (``c``, ``example_recall``, ``unlabelled_inside``, ...).
    """

    def __init__(self, landmarks, normalization, gamma: float, w, b: float, threshold: float,
                 info: dict | None = None) -> None:  # fmt: skip
        z = _as_matrix(landmarks, "landmarks")
        n = _as_matrix(normalization, "normalization")
        w = np.asarray(w, np.float64).reshape(-1)
        if n.shape != (len(z), len(z)) or w.shape != (len(z),):
            raise ClassifierError(
                f"a kernel region of {len(z)} landmarks needs a ({len(z)}, {len(z)}) "
                f"normalization and {len(z)} weights; got {n.shape} and {w.shape}"
            )
        if not np.all(np.isfinite(w)):
            raise ClassifierError("the kernel region's weights contain NaN or Inf")
        self.landmarks, self.normalization, self.w = z, n, w
        self.gamma = _check_positive(gamma, "gamma", strict=True)
        self.b = float(b)
        if not math.isfinite(self.b):
            raise ClassifierError(f"the intercept must be finite; got {b!r}")
        t = float(threshold)
        if not 0 < t < 1:
            raise ClassifierError(f"threshold must be in (0, 1); got {threshold!r}")
        self.threshold = t
        self.info = dict(info or {})

    @classmethod
    def fit_positive_unlabelled(
        cls,
        examples,
        unlabelled,
        *,
        C: float | None = None,
        width: float = 2.0,
        components: int = 300,
        factor: float = 0.4,
        folds: int = 5,
        seed: int = 0,
        max_iter: int = 5000,
    ) -> KernelRegion:
        """Fit the region from ``examples`` (M, d), labelled bad, against ``unlabelled`` (N, d)
        (module docstring). ``C`` None: ``KERNEL_C_FACTOR * PU_CN / (M + N)``.

        Raises:
            ClassifierError: the linear fit's errors (too few rows for ``folds``, a dimension
                mismatch, non-finite input, bad ``C``, ``folds`` or ``seed``, ``c <= 1e-9``, a
                region holding half of the unlabelled states or more); ``width`` not > 0,
                ``components`` not an integer >= 1, ``factor`` not in (0, 1]; unlabelled states
                all at one point (no kernel width).
        """
        from sklearn.kernel_approximation import Nystroem
        from sklearn.pipeline import make_pipeline

        bad, rest, c_reg, k = _pu_inputs(
            examples, unlabelled, C, folds, seed, KERNEL_C_FACTOR * PU_CN
        )
        width = _check_positive(width, "width", strict=True)
        if (
            isinstance(components, bool)
            or not isinstance(components, int | np.integer)
            or components < 1
        ):
            raise ClassifierError(f"components must be an integer >= 1; got {components!r}")
        factor = _check_positive(factor, "factor", strict=True)
        if factor > 1:
            raise ClassifierError(f"factor must be in (0, 1]; got {factor!r} (default 0.4)")
        order = np.random.default_rng(int(seed)).permutation(len(rest))[:200]
        sub = rest[order]
        sq = (sub * sub).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * sub @ sub.T, 0.0)
        scale = float(np.median(d2[np.triu_indices(len(sub), 1)])) if len(sub) > 1 else 0.0
        if not scale > 0:
            raise ClassifierError(
                "the unlabelled states are (nearly) all at one point: no kernel width can be "
                "set from them; give unlabelled states that vary"
            )
        gamma = width / scale
        x = np.concatenate([rest, bad])
        y = np.concatenate([np.zeros(len(rest), np.int64), np.ones(len(bad), np.int64)])
        n_comp = min(int(components), len(x) * (k - 1) // k)  # rows of the smallest fold fit

        def model():
            return make_pipeline(
                Nystroem(gamma=gamma, n_components=n_comp, random_state=int(seed)),
                _logistic(c_reg, True, max_iter, seed),
            )

        oof, c = _pu_constant(model, x, y, k, seed)
        full = model().fit(x, y)
        ny, lr = full[0], full[1]
        region = cls(ny.components_, ny.normalization_, gamma, lr.coef_[0],
                     float(lr.intercept_[0]), factor * c)  # fmt: skip
        region.info = {
            "rule": f"positive-unlabelled, RBF kernel: g(x) >= {factor:g} c, c = out-of-fold "
            "mean g of the examples",
            "counts": {"unlabelled": len(rest), "examples": len(bad)},
            "C": c_reg,
            "folds": k,
            "seed": int(seed),
            "c": c,
            "factor": factor,
            "width": width,
            "gamma": gamma,
            "components": n_comp,
            "example_recall": float(np.mean(oof[y == 1] >= factor * c)),
            "unlabelled_inside": float(np.mean(region.prob_bad(rest) >= factor * c)),
            "class_weight": "balanced",
        }
        _pu_region_check(region.info["unlabelled_inside"], f"g(x) >= {factor:g} c", c)
        return region

    @property
    def dim(self) -> int:
        return int(self.landmarks.shape[1])

    def prob_bad(self, embeddings) -> np.ndarray:
        """``g(x)`` (N,) for embeddings (N, d), in float64, in blocks of 4,096 rows. Finite for
        every finite input: the squared distances are clipped at 0 and the kernel's exponent is
        <= 0; the logit is taken with ``logaddexp``."""
        x = _as_matrix(embeddings, "embeddings")
        if x.shape[1] != self.dim:
            raise ClassifierError(
                f"dimension mismatch: the region has d={self.dim}, the embeddings d={x.shape[1]}"
            )
        z = self.landmarks
        zz = (z * z).sum(1)
        out = np.empty(len(x), np.float64)
        for s in range(0, len(x), _BLOCK):
            xb = x[s : s + _BLOCK]
            # |x|^2 can overflow for huge finite rows: the kernel is then 0 (exp(-inf))
            with np.errstate(over="ignore", invalid="ignore"):
                d2 = (xb * xb).sum(1)[:, None] + zz[None, :] - 2 * xb @ z.T
            d2 = np.where(np.isnan(d2), np.inf, np.maximum(d2, 0.0))
            phi = np.exp(-self.gamma * d2) @ self.normalization.T
            logit = phi @ self.w + self.b
            out[s : s + _BLOCK] = np.exp(-np.logaddexp(0.0, -logit))
        return out

    def is_bad(self, embeddings) -> np.ndarray:
        """Whether each embedding (N, d) is in the region (N,) bool."""
        return self.prob_bad(embeddings) >= self.threshold

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """The membership test on states (m, d) (any float dtype, any device): (m,) bool on
        ``x``'s device."""
        flags = self.is_bad(x.detach().reshape(x.shape[0], -1).cpu().double().numpy())
        return torch.from_numpy(flags).to(x.device)

    def __repr__(self) -> str:
        return (
            f"KernelRegion(d={self.dim}, landmarks={len(self.landmarks)}, gamma={self.gamma:.4g}, "
            f"threshold={self.threshold:.4f})"
        )
