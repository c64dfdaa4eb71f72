r"""Exact pruning of obstacle sets by clusters (``RepulsiveField(..., prune=True)``).

The obstacles are grouped by FAISS k-means into K clusters. For each cluster k the centre
``c_k`` is the mean of its members and the radius ``r_k = max_{j in k} |o_j - c_k|`` is computed
in float64 from the differences, so that by the triangle inequality every member satisfies

    |x - o_j| >= |x - c_k| - r_k.

A cluster whose lower bound exceeds the largest Q* among its members,
``|x - c_k| - r_k > max_{j in k} Q*_j``, holds no obstacle within its range of ``x``: its
potential and force are exactly zero and it is skipped. In the sampler's noisy mode the centres
are ``(1 - t) o_j``, and the clusters scale with them (``(1 - t) c_k``, ``(1 - t) r_k``).

Each surviving cluster is evaluated for the states it survives for: with the torch reference
(exact), or with the fused kernel, which sorts the obstacles by cluster and lets every block of
states visit the clusters alive for any of its states (the kernel's own tolerances). The result
is the unpruned one for potential, force and ``active``.
For ``nearest`` and ``clearance`` the skipped clusters contribute their lower bounds
(``|x - c_k| - r_k`` and that minus the largest hard radius in the cluster), so both are exact
when the nearest obstacle was evaluated and lower bounds otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from obstacles import ObstacleSet

__all__ = ["ClusteredObstacles"]


class ClusteredObstacles:
    """K-means clusters of an obstacle set with exact float64 centres, radii and bounds.

    Args:
        obstacles: the set.
        n_clusters: K (1 <= K <= N); default ``round(sqrt(N))``.
        seed: the k-means seed.
    """

    def __init__(self, obstacles: ObstacleSet, n_clusters: int | None = None, seed: int = 0):
        import faiss

        n, d = len(obstacles), obstacles.dim
        if n == 0:
            raise ValueError("cannot cluster an empty obstacle set")
        k = round(math.sqrt(n)) if n_clusters is None else int(n_clusters)
        if not 1 <= k <= n:
            raise ValueError(f"n_clusters must be in [1, N={n}]; got {n_clusters}")
        emb = obstacles.embeddings.astype(np.float64)
        if k == 1:
            assign = np.zeros(n, dtype=np.int64)
        else:
            km = faiss.Kmeans(d, k, niter=20, seed=seed, verbose=False)
            km.train(np.ascontiguousarray(emb, dtype=np.float32))
            _, a = km.index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
            assign = a[:, 0].astype(np.int64)
        used = np.unique(assign)  # k-means may leave clusters empty
        remap = np.full(k, -1, dtype=np.int64)
        remap[used] = np.arange(used.size)
        assign = remap[assign]
        self.k = int(used.size)
        self.assign = idx = torch.from_numpy(assign)
        self.sizes = torch.bincount(idx, minlength=self.k)  # (K,) members per cluster
        self.order = torch.argsort(idx, stable=True)  # positions sorted by cluster
        emb_t = torch.from_numpy(emb)
        centres = torch.zeros(self.k, d, dtype=torch.float64).index_add_(0, idx, emb_t)
        centres /= self.sizes.to(torch.float64)[:, None]
        dist = (emb_t - centres[idx]).norm(dim=1)  # from the differences, float64
        self.centres = centres
        self.radii = torch.zeros(self.k, dtype=torch.float64).scatter_reduce_(
            0, self.assign, dist, reduce="amax", include_self=False
        )
        self.radii = self.radii * (1 + 4 * np.finfo(np.float64).eps) + 1e-300  # rounding margin
        q = torch.from_numpy(obstacles.q_star.astype(np.float64))
        rad = torch.from_numpy(obstacles.radius.astype(np.float64))
        self.q_max = torch.zeros(self.k, dtype=torch.float64).scatter_reduce_(
            0, self.assign, q, reduce="amax", include_self=False
        )
        self.radius_max = torch.zeros(self.k, dtype=torch.float64).scatter_reduce_(
            0, self.assign, rad, reduce="amax", include_self=False
        )
        self._members = torch.split(self.order, self.sizes.tolist())

    def members(self, k: int) -> torch.Tensor:
        """Positions (in the set) of the obstacles of cluster ``k``."""
        return self._members[k]

    def bounds(
        self, e: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For embeddings ``e`` (B, d) float64 (``scale`` (B, 1): noisy mode's ``1 - t``):
        ``alive`` (B, K), the clusters that may hold an obstacle within its Q* of each state,
        and the lower bounds (B,) on ``nearest`` and ``clearance`` from the skipped clusters
        (+inf where none is skipped)."""
        dev = e.device
        c, r = self.centres.to(dev), self.radii.to(dev)
        qm, rm = self.q_max.to(dev), self.radius_max.to(dev)
        if scale is None:
            # from differences (the matrix-product expansion cancels near a centre)
            lb = torch.cdist(e, c, compute_mode="donot_use_mm_for_euclid_dist") - r[None]
        else:
            s = scale.reshape(-1, 1, 1)
            lb = (e[:, None, :] - s * c[None]).norm(dim=2) - s[:, :, 0] * r[None]
        alive = lb <= qm[None]  # (B, K)
        inf = torch.full_like(lb, torch.inf)
        near_lb = torch.where(alive, inf, lb).min(dim=1).values
        clear_lb = torch.where(alive, inf, lb - rm[None]).min(dim=1).values
        return alive, near_lb, clear_lb
