"""Verifiers: score batches of *clean* estimates, higher is better.

A verifier never sees a noisy state: search algorithms hand it ``x0_hat = x_t - t v`` (or the
final sample, t = 0). Every verifier has the same interface,

    verifier.score(x0) -> (B,) float64          for x0 (B, ...),

counts its calls and the samples it scored (``calls``, ``samples``; search results report them
beside the NFE), and raises :class:`VerifierError` when asked to score an empty batch or when a
score comes back NaN or Inf (a silent NaN would win or lose every comparison at random).

Kinds:

* :class:`ClearanceVerifier` - distance to obstacles from a field's ``evaluate()``:
  ``score = min(clearance, cap)`` for a free sample and ``clearance - collision_penalty`` for a
  collided one (clearance < 0 there), so every collision scores below every free sample and a
  deeper collision scores lower. With the default ``cap = 0`` all free samples tie at 0: a pure
  feasibility verifier (ties keep the first candidate, so best-of-N is rejection sampling with at
  most N tries); a positive cap asks for a margin.
* :class:`PreferenceVerifier` - a preference classifier, duck-typed: ``signed_distance(emb)``
  (positive on the good side, :class:`obstacles.classifier.PreferenceClassifier`), else
  ``prob_bad(emb)`` (score ``log(1 - p_bad)``), else a scikit-learn ``predict_proba``
  (score ``log p(good_class)``).
* :class:`OracleVerifier` - the toy's exact answer: ``log p0(x)`` of the data distribution outside
  the obstacles, a large finite negative ``inside_score`` inside them.
* :class:`CallableVerifier` - any function ``x0 -> (B,)`` (e.g. a digits judge).
* :class:`EnsembleVerifier` - mean rank of several verifiers, rescaled to [0, 1]. Ranks are
  relative to the batch scored, so compare ensemble scores only within one call (the search
  algorithms score everything they compare in one call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "CallableVerifier",
    "ClearanceVerifier",
    "EnsembleVerifier",
    "OracleVerifier",
    "PreferenceVerifier",
    "Verifier",
    "VerifierError",
]


class VerifierError(ValueError):
    """A verifier was given nothing to score, or returned NaN / Inf or the wrong shape."""


class Verifier:
    """Base class: subclasses implement :meth:`_score`; call :meth:`score`."""

    name = "verifier"

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0

    def _score(self, x0: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, x0: torch.Tensor) -> torch.Tensor:
        """Scores (B,) float64 of clean samples ``x0`` (B, ...); higher is better."""
        if not isinstance(x0, torch.Tensor) or x0.ndim < 1:
            raise VerifierError(f"{self.name}: expected a tensor (B, ...) of clean samples")
        b = x0.shape[0]
        if b == 0:
            raise VerifierError(f"{self.name}: empty candidate set (0 samples to score)")
        self.calls += 1
        self.samples += b
        s = self._score(x0)
        s = torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s)
        s = s.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if s.shape != (b,):
            raise VerifierError(f"{self.name}: returned {tuple(s.shape)} scores for {b} samples")
        bad = ~torch.isfinite(s)
        if bool(bad.any()):
            raise VerifierError(
                f"{self.name}: returned NaN or Inf for {int(bad.sum())} of {b} samples (first at "
                f"index {int(torch.nonzero(bad)[0])}); a verifier must return finite scores"
            )
        return s

    __call__ = score

    def __repr__(self) -> str:
        return f"{type(self).__name__}(calls={self.calls}, samples={self.samples})"


def _flat(x0: torch.Tensor) -> torch.Tensor:
    return x0.reshape(x0.shape[0], -1)


class ClearanceVerifier(Verifier):
    """Obstacle clearance from ``field.evaluate(x0).clearance`` (distance to the nearest hard
    radius, negative inside).

    Args:
        field: a :class:`~guidance.RepulsiveField` (anything whose ``evaluate(x, need_force=False)``
            returns ``clearance`` (B,)), or anything with ``clearance(x) -> (B,)``.
        cap: free samples score ``min(clearance, cap)`` (default 0: feasibility only).
        collision_penalty: collided samples score ``clearance - collision_penalty`` (> cap).
    """

    name = "clearance"

    def __init__(self, field, cap: float = 0.0, collision_penalty: float = 100.0) -> None:
        super().__init__()
        if not (hasattr(field, "evaluate") or hasattr(field, "clearance")):
            raise TypeError("ClearanceVerifier needs a field with evaluate() or clearance()")
        if not (math.isfinite(cap) and math.isfinite(collision_penalty)):
            raise ValueError("cap and collision_penalty must be finite")
        if collision_penalty <= max(cap, 0.0):
            raise ValueError(
                f"collision_penalty ({collision_penalty}) must exceed cap ({cap}) so that every "
                "collision scores below every free sample"
            )
        self.field = field
        self.cap = float(cap)
        self.collision_penalty = float(collision_penalty)

    def clearance(self, x0: torch.Tensor) -> torch.Tensor:
        if hasattr(self.field, "evaluate"):
            c = self.field.evaluate(x0, need_force=False).clearance
        else:
            c = self.field.clearance(x0)
        return torch.as_tensor(c).to(torch.float64).reshape(-1)

    def _score(self, x0: torch.Tensor) -> torch.Tensor:
        c = self.clearance(x0)
        return torch.where(c < 0, c - self.collision_penalty, torch.clamp(c, max=self.cap))


class PreferenceVerifier(Verifier):
    """A preference classifier on embeddings of the clean samples (duck-typed, see module doc).

    Args:
        classifier: has ``signed_distance(emb)``, or ``prob_bad(emb)``, or ``predict_proba(emb)``.
        embed: maps clean samples (B, ...) to the classifier's embeddings (B, d); default flatten.
        cap: optional upper bound on the score (a margin beyond which all are equally good).
        good_class: the column of ``predict_proba`` that is "good" (default 0).
    """

    name = "preference"

    def __init__(
        self,
        classifier,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cap: float | None = None,
        good_class: int = 0,
    ) -> None:
        super().__init__()
        if not any(
            hasattr(classifier, a) for a in ("signed_distance", "prob_bad", "predict_proba")
        ):
            raise TypeError(
                "PreferenceVerifier needs a classifier with signed_distance(), prob_bad() or "
                f"predict_proba(); got {type(classifier).__name__}"
            )
        self.classifier = classifier
        self.embed = embed
        self.cap = cap
        self.good_class = int(good_class)

    def _score(self, x0: torch.Tensor) -> torch.Tensor:
        emb = self.embed(x0) if self.embed is not None else _flat(x0)
        clf = self.classifier
        if hasattr(clf, "signed_distance"):
            s = torch.as_tensor(np.asarray(clf.signed_distance(emb.detach().cpu().double())))
        elif hasattr(clf, "prob_bad"):
            p = torch.as_tensor(np.asarray(clf.prob_bad(emb.detach().cpu().double().numpy())))
            s = torch.log1p(-p.clamp(max=1 - 1e-300))
        else:
            p = np.asarray(clf.predict_proba(emb.detach().cpu().double().numpy()))
            s = torch.log(torch.as_tensor(p[:, self.good_class]).clamp(min=1e-300))
        s = s.to(torch.float64)
        return s if self.cap is None else torch.clamp(s, max=float(self.cap))


class OracleVerifier(Verifier):
    """The toy's exact verifier: ``log p0(x)`` outside the obstacles, ``inside_score`` inside.

    Args:
        mixture: has ``log_prob(x)`` (B, d) -> (B,) (``cspace.models.toy.GaussianMixture``).
        obstacles: has ``inside(x)`` (B, d) -> (B,) bool (``cspace.models.toy.BallObstacles``).
        inside_score: the (large, finite, negative) score of a sample inside an obstacle.
    """

    name = "oracle"

    def __init__(self, mixture, obstacles, inside_score: float = -1e3) -> None:
        super().__init__()
        if not math.isfinite(inside_score):
            raise ValueError("inside_score must be finite")
        self.mixture = mixture
        self.obstacles = obstacles
        self.inside_score = float(inside_score)

    def _score(self, x0: torch.Tensor) -> torch.Tensor:
        x = _flat(x0).to(torch.float64)
        lp = self.mixture.log_prob(x).to(torch.float64)
        inside = self.obstacles.inside(x)
        return torch.where(inside, torch.full_like(lp, self.inside_score), lp)


class CallableVerifier(Verifier):
    """Wraps any ``fn(x0) -> (B,)`` (tensor, array or list) as a verifier."""

    def __init__(self, fn: Callable[[torch.Tensor], object], name: str = "callable") -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError("CallableVerifier needs a callable")
        self.fn = fn
        self.name = name

    def _score(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.fn(x0), dtype=np.float64))


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    """Ranks 0..B-1 of ``s`` (B,) with ties given their average rank."""
    order = torch.argsort(s, stable=True)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(s.numel(), dtype=s.dtype)
    uniq, inv = torch.unique(s, return_inverse=True)
    if uniq.numel() < s.numel():  # average the ranks of tied values
        sums = torch.zeros(uniq.numel(), dtype=s.dtype).index_add_(0, inv, ranks)
        counts = torch.zeros(uniq.numel(), dtype=s.dtype).index_add_(0, inv, torch.ones_like(s))
        ranks = (sums / counts)[inv]
    return ranks


class EnsembleVerifier(Verifier):
    """Mean rank of several verifiers, in [0, 1] (1 = best in the batch on every verifier).

    Args:
        verifiers: the members (each scores the same clean samples).
        weights: optional non-negative weights of the members (default equal).
    """

    name = "ensemble"

    def __init__(self, verifiers: Sequence[Verifier], weights: Sequence[float] | None = None):
        super().__init__()
        verifiers = list(verifiers)
        if not verifiers:
            raise ValueError("EnsembleVerifier needs at least one verifier")
        w = torch.ones(len(verifiers), dtype=torch.float64)
        if weights is not None:
            w = torch.as_tensor(list(weights), dtype=torch.float64)
            if w.shape != (len(verifiers),) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
                raise ValueError("weights must be one non-negative number per verifier, sum > 0")
        self.verifiers = verifiers
        self.weights = w / w.sum()

    def _score(self, x0: torch.Tensor) -> torch.Tensor:
        b = x0.shape[0]
        denom = max(b - 1, 1)
        total = torch.zeros(b, dtype=torch.float64)
        for w, v in zip(self.weights, self.verifiers, strict=True):
            r = _average_ranks(v.score(x0)) / denom if b > 1 else torch.full((1,), 0.5)
            total += w * r
        return total
