r"""A membership region learnt from examples and unlabelled states with an RBF kernel model:
the nonlinear twin of :meth:`obstacles.PreferenceClassifier.fit_positive_unlabelled`, for a
membership test only (rejection sampling), not a field.

Positive-unlabelled: the user has examples of what to avoid (M, d) and unlabelled states
(N, d), say the model's own samples, which hold an unknown share of the class. A classifier of
the examples against the unlabelled states gives each state ``g``, the probability that it
looks like an example; the class's region is where ``g`` is high compared with the examples'
own ``g``.

The model is the positive-unlabelled one of :mod:`obstacles.classifier` (module docstring,
**Positive-unlabelled**): a balanced logistic regression ``g`` of the examples against the
unlabelled states, ``c`` the examples' out-of-fold mean of ``g`` (Elkan and Noto's constant),
the region ``g(x) >= factor * c``. Here ``g`` is linear in kernel features, not in ``x``:

    phi(x) = N k(x),   k_j(x) = exp(-gamma |x - z_j|^2),   g(x) = sigmoid(w . phi(x) + b)

with ``z_j`` (K, d) landmarks drawn from the fitted rows and ``N`` (K, K) the inverse square
root of their kernel matrix (scikit-learn's ``Nystroem``; K = ``components``, at most the rows
of one fold's fit). ``gamma = width / m``, ``m`` the median squared distance between unlabelled
states (200 of them in a seeded random order), so the kernel's reach scales with the space.
The model works on ``u = (x - mu) / sqrt(m)``, ``mu`` the unlabelled states' mean (stored with
the region), so that a common offset or a scale far from 1 costs no precision (``gamma`` is
``width`` in those units); at most :data:`MAX_FIT_ROWS` unlabelled states (a seeded random
subset) are fitted, which bounds the fit's memory to a few times
``(MAX_FIT_ROWS + M) * K * 8`` bytes whatever N.

**Defaults, and what they rest on.** ``width`` = 2, ``C`` = ``30 * PU_CN / n`` (30 times the
linear fit's penalty per sample: the kernel features need less shrinkage), ``factor`` = 0.4.
They were chosen together on the digits demo's unguided samples, seeds 0-2, among widths 1 and
2, C of 30 and 100 x and factors 0.3, 0.4 and 0.5 (``benchmarks/membership_frontier.py`` shows
the protocol: 1,000 samples fit, 1,000 others judged). The choice passed the demo's avoidance
targets on 9 of 10 classes on every seed, and on seeds 3-4, held out, 9 of 10 too. The linear
region's ``c / 2`` passed 7 of 10 on seeds 0-2 in that protocol (8 of 10 in the demo). The factor is not derived: with ``g / (1 - g)``
the density ratio of the class to the unlabelled mixture (as for the linear fit),
``g >= 0.4 c`` is the posterior ``q >= pi 0.4 c / (1 - 0.4 c)``, ``pi`` the class's share,
an inclusive region. It is larger than the kernel model's ``c / 2`` region, which left more
than 0.10 of classes 3, 5 and 8 on every seed (passing 3 of 10 over seeds 0-4).

It is fitted where it is used (``rejection-pu``, the demo's rejection-pu arm) and not saved
to disk: the fit takes well under a second and needs the model's own samples of the run. The
half-space of :class:`obstacles.PreferenceClassifier` is what a field and a classifier folder
take.

Cost: a fit is ``folds + 1`` scikit-learn fits of K features (about 0.4 s for 1,040 rows at
K = 300, d = 32, on one core, plus scikit-learn's import on first use); a test of m states takes an (m, K) kernel in blocks of 4,096 rows.
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

__all__ = ["KERNEL_C_FACTOR", "MAX_FIT_ROWS", "KernelRegion"]

#: ``C x n / PU_CN`` of :meth:`KernelRegion.fit_positive_unlabelled` by default (module docstring)
KERNEL_C_FACTOR = 30.0
#: the most unlabelled states a fit uses (a seeded random subset beyond it)
MAX_FIT_ROWS = 20_000
_BLOCK = 4096


class KernelRegion:
    """The region ``g(x) >= threshold`` of a positive-unlabelled RBF kernel model (module
    docstring). Build it with :meth:`fit_positive_unlabelled`; test states with
    :meth:`prob_bad`, :meth:`is_bad` (NumPy) or :meth:`inside` (torch, the membership-test
    interface of :func:`guidance.fields.regions.hard_regions`).

    Attributes:
        landmarks: (K, d) float64, the ``z_j`` in the model's units ``u = (x - centre) / scale``.
        normalization: (K, K) float64, ``N``.
        gamma: the kernel's ``gamma`` in those units (``width``).
        centre: (d,) float64; scale: > 0 (``sqrt(m)``, module docstring).
        w, b: (K,) float64 and float, the logistic regression on ``phi``.
        threshold: the region's probability threshold (``factor * c``).
        info: what the fit measured (``c``, ``example_recall``, ``unlabelled_inside``, ...).
    """

    def __init__(self, landmarks, normalization, gamma: float, w, b: float, threshold: float,
                 info: dict | None = None, centre=None, scale: float = 1.0) -> None:  # fmt: skip
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
        mu = np.zeros(z.shape[1]) if centre is None else np.asarray(centre, np.float64).ravel()
        if mu.shape != (z.shape[1],) or not np.all(np.isfinite(mu)):
            raise ClassifierError(
                f"centre must be {z.shape[1]} finite values; got shape {mu.shape}"
            )
        self.centre = mu
        self.scale = _check_positive(scale, "scale", strict=True)
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
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            factor = math.nan
        if not 0 < factor <= 1:
            raise ClassifierError(
                f"factor must be a number in (0, 1]; got {factor!r} (default 0.4)"
            )
        n_unlabelled = len(rest)
        rng = np.random.default_rng(int(seed))
        if len(rest) > MAX_FIT_ROWS:
            rest = rest[np.sort(rng.choice(len(rest), MAX_FIT_ROWS, replace=False))]
        centre = rest.mean(0)
        # the median distance of 200 unlabelled states, from differences of rows divided by
        # their largest entry (no overflow or underflow for any finite states)
        sub = rest[rng.permutation(len(rest))[:200]] - centre
        big = float(np.abs(sub).max())
        i, j = np.triu_indices(len(sub), 1)
        dist = big * np.linalg.norm(sub[i] / big - sub[j] / big, axis=1) if big > 0 else 0.0 * i
        scale = float(np.median(dist)) if dist.size else 0.0
        if not (math.isfinite(scale) and scale > 0):
            raise ClassifierError(
                "the unlabelled states are (nearly) all at one point: no kernel width can be "
                f"set from them (median distance {scale:.3g}); give unlabelled states that vary"
            )
        gamma = width  # in the units u = (x - centre) / scale
        x = (np.concatenate([rest, bad]) - centre) / scale
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
                     float(lr.intercept_[0]), factor * c, centre=centre, scale=scale)  # fmt: skip
        region.info = {
            "rule": f"positive-unlabelled, RBF kernel: g(x) >= {factor:g} c, c = out-of-fold "
            "mean g of the examples",
            "counts": {
                "unlabelled": n_unlabelled,
                "examples": len(bad),
                "unlabelled_fitted": len(rest),
            },
            "C": c_reg,
            "folds": k,
            "seed": int(seed),
            "c": c,
            "factor": factor,
            "width": width,
            "median_distance": scale,
            "components": n_comp,
            "example_recall": float(np.mean(oof[y == 1] >= factor * c)),
            "unlabelled_inside": float(np.mean(region.prob_bad(rest) >= factor * c)),
            "class_weight": "balanced",
        }
        _pu_region_check(
            region.info["unlabelled_inside"],
            f"g(x) >= {factor:g} c",
            c,
            hint="a smaller factor or width, a larger C",
        )
        return region

    @property
    def dim(self) -> int:
        return int(self.landmarks.shape[1])

    def prob_bad(self, embeddings) -> np.ndarray:
        """``g(x)`` (N,) for embeddings (N, d), in float64, in blocks of 4,096 rows:
        ``u = (x - centre) / scale``, ``g = sigmoid(w . N k(u) + b)`` (module docstring).

        Raises:
            ClassifierError: a dimension mismatch, non-finite input, or a region built by hand
                whose features overflow on these states (no NaN or Inf is returned).
        """
        x = _as_matrix(embeddings, "embeddings")
        if x.shape[1] != self.dim:
            raise ClassifierError(
                f"dimension mismatch: the region has d={self.dim}, the embeddings d={x.shape[1]}"
            )
        z = self.landmarks
        zz = (z * z).sum(1)
        out = np.empty(len(x), np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            for s in range(0, len(x), _BLOCK):
                u = (x[s : s + _BLOCK] - self.centre) / self.scale
                # a state whose |u|^2 overflows is far from every landmark: kernel 0
                d2 = (u * u).sum(1)[:, None] + zz[None, :] - 2 * u @ z.T
                d2 = np.where(np.isnan(d2), np.inf, np.maximum(d2, 0.0))
                logit = (np.exp(-self.gamma * d2) @ self.normalization.T) @ self.w + self.b
                if not np.all(np.isfinite(logit)):
                    raise ClassifierError(
                        "the kernel region's features overflow on these states (a region built "
                        "by hand with huge weights?); refit it with fit_positive_unlabelled"
                    )
                out[s : s + _BLOCK] = np.exp(-np.logaddexp(0.0, -logit))
        return out

    def is_bad(self, embeddings) -> np.ndarray:
        """Whether each embedding (N, d) is in the region (N,) bool."""
        return self.prob_bad(embeddings) >= self.threshold

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """The membership test on states (m, ...) flattening to (m, d) (a tensor of any float
        dtype and device, or an array): (m,) bool on ``x``'s device."""
        t = torch.as_tensor(x)
        if t.ndim < 2:
            raise ClassifierError(
                f"inside takes states (m, d) (a batch; one state as x[None]); got shape "
                f"{tuple(t.shape)}"
            )
        flags = self.is_bad(t.detach().reshape(t.shape[0], -1).cpu().double().numpy())
        return torch.from_numpy(flags).to(t.device)

    def __repr__(self) -> str:
        return (
            f"KernelRegion(d={self.dim}, landmarks={len(self.landmarks)}, gamma={self.gamma:.4g}, "
            f"threshold={self.threshold:.4f})"
        )
