"""Distribution metrics used to compare samplers with exact truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["class_report", "diversity", "embedding_accuracy", "energy_distance"]


def energy_distance(x: torch.Tensor, y: torch.Tensor, max_points: int = 4096) -> float:
    r"""Energy distance between the samples ``x`` (n, d) and ``y`` (m, d) (V-statistic):

        E(x, y) = 2 mean|x_i - y_j| - mean|x_i - x_k| - mean|y_j - y_l|,

    zero only for equal distributions. Computed in float64 from differences; at most
    ``max_points`` points of each set are used (the first ones).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"energy_distance needs (n, d) and (m, d); got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("energy_distance needs non-empty sample sets")
    x = x[:max_points].to(torch.float64)
    y = y[:max_points].to(torch.float64)

    def mean_dist(a, b):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").mean()

    return float(2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y))


def diversity(x: torch.Tensor, block: int = 1024) -> float:
    r"""Mean Euclidean distance between two different samples of ``x`` (B, ...), flattened:

        diversity(x) = 1 / (B (B - 1)) sum_{i != j} |x_i - x_j|,

    in float64 from differences, ``block`` rows at a time (memory ``block x B``). Zero for a
    single sample (no spread to measure). Used on pixels (the demo's images) and on latents (the
    samples a search returns) alike.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"diversity needs a tensor (B, ...); got {type(x).__name__}")
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    n = flat.shape[0]
    if n < 2:
        return 0.0
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("diversity: the samples contain NaN or Inf")
    total = 0.0
    for s in range(0, n, int(block)):
        d = torch.cdist(flat[s : s + block], flat, compute_mode="donot_use_mm_for_euclid_dist")
        total += float(d.sum())
    return total / (n * (n - 1))


def class_report(p: torch.Tensor, confident: float) -> dict:
    """A classifier's judgement of a set from its class probabilities ``p`` (B, K):
    ``class_shares`` (K floats, sum 1: the share predicted as each class), ``confidence`` (mean
    largest probability), ``confident_share`` (share whose largest probability is > ``confident``),
    ``predicted`` (B,) classes, ``max_prob`` (B,) largest probabilities, ``n`` = B. The one report
    of every judge (:class:`cspace.models.judge.Judge`,
    :class:`cspace.models.fashion_judge.FashionJudge`)."""
    top, pred = p.max(1)
    shares = torch.bincount(pred, minlength=p.shape[1]).double() / p.shape[0]
    return {
        "class_shares": [float(s) for s in shares],
        "confidence": float(top.mean()),
        "confident_share": float((top > confident).double().mean()),
        "predicted": pred,
        "max_prob": top,
        "n": int(p.shape[0]),
    }


def embedding_accuracy(
    train: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    tests: dict[str, tuple[Any, Any]],
    k: int = 5,
    probe: bool = True,
) -> dict[str, float]:
    """kNN and linear-probe accuracy of embeddings.

    ``train`` (N, d) with labels (N,) fit a ``k``-nearest-neighbour classifier (Euclidean, on
    the embeddings as they are) and a logistic regression (lbfgs, C = 1, ``max_iter`` 2000, on
    the embeddings standardised with the train mean and std); each ``tests[name] = (emb, labels)``
    gives ``{name}_knn_accuracy`` and ``{name}_linear_probe_accuracy``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    xt = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    yt = np.asarray(train_labels)
    if not np.isfinite(xt).all():
        raise ValueError("the train embeddings hold NaN or Inf")
    knn = KNeighborsClassifier(n_neighbors=k).fit(xt, yt)
    mu, sd = xt.mean(0), xt.std(0) + 1e-8
    lr = LogisticRegression(max_iter=2000).fit((xt - mu) / sd, yt) if probe else None
    out: dict[str, float] = {}
    for name, (emb, labels) in tests.items():
        xe = np.asarray(emb, dtype=np.float64).reshape(len(emb), -1)
        ye = np.asarray(labels)
        out[f"{name}_knn_accuracy"] = float(knn.score(xe, ye))
        if lr is not None:
            out[f"{name}_linear_probe_accuracy"] = float(lr.score((xe - mu) / sd, ye))
    return out
