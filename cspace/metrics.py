"""Distribution metrics used to compare samplers with exact truth."""

from __future__ import annotations

import torch

__all__ = ["energy_distance"]


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
