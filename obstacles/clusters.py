r"""Exact pruning of obstacle sets by clusters (``RepulsiveField(..., prune=True)``).

The obstacles are grouped by FAISS k-means into K clusters. FAISS runs in float32 and aborts the
process (uncatchable, from inside OpenMP) when its squared distances overflow, which valid
float32 obstacles of magnitude 1e19 already cause (and puts every obstacle of a set at 1e-30
into one cluster, its squares underflowing); so k-means sees the obstacles scaled by a power of
two into [-1, 1], centred on their float64 mean first when that mean lies farther from the
origin than they spread around it (a common offset). The scaling is exact: for a set FAISS
could already handle, and which needs no centring, the partition is the one it gave before. A
set whose obstacles all coincide is one cluster without FAISS. The clusters are only a
partition: the bounds below are computed from the original float64 embeddings, whatever
k-means returns. For each cluster k the centre
``c_k`` is the mean of its members and the radius ``r_k = max_{j in k} |o_j - c_k|`` is computed
in float64 from the differences, so that by the triangle inequality every member satisfies

    |x - o_j| >= |x - c_k| - r_k.

A cluster whose lower bound exceeds the largest Q* among its members,
``|x - c_k| - r_k > max_{j in k} Q*_j``, holds no obstacle within its range of ``x``: its
potential and force are exactly zero and it is skipped. The test allows for the rounding of the
two computed distances (``|x - c_k|`` here and ``|x - o_j|`` in the field): a cluster is kept
when ``|x - c_k| - r_k <= max Q*_j + (d + 8) eps (|x - c_k| + r_k)``. ``|x - c_k|`` is taken from
the differences, scaled by their largest entry where their squares would overflow (states
beyond 1e154), so that a huge Q* prunes nothing it should not. In the sampler's noisy mode the centres
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
        points = _kmeans_input(emb)  # (N, d) float32 in [-1, 1], or None when all coincide
        if k == 1 or points is None:
            assign = np.zeros(n, dtype=np.int64)
        else:
            # min_points_per_centroid only sets when FAISS warns that clusters are small: exact
            # pruning needs a partition, not good centroids
            km = faiss.Kmeans(d, k, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
            km.train(points)
            _, a = km.index.search(points, 1)
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
            dc = torch.cdist(e, c, compute_mode="donot_use_mm_for_euclid_dist")
            rs = r[None].expand_as(dc)
        else:
            s = scale.reshape(-1, 1, 1)
            dc = (e[:, None, :] - s * c[None]).norm(dim=2)
            rs = s[:, :, 0] * r[None]
        over = ~torch.isfinite(dc)  # the squares overflowed: |x - c| > 1e154
        if bool(over.any()):
            rows = over.any(dim=1).nonzero().flatten()
            centres = c[None] if scale is None else s[rows] * c[None]
            diff = e[rows, None, :] - centres  # (b', K, d), finite: |e| and |c| are
            top = diff.abs().amax(dim=2, keepdim=True)
            unit = diff / torch.where(top > 0, top, torch.ones_like(top))
            dc[rows] = torch.linalg.vector_norm(unit, dim=2) * top[..., 0]  # inf only beyond max
        lb = dc - rs
        tol = (e.shape[1] + 8) * float(torch.finfo(torch.float64).eps)
        alive = lb <= qm[None] + tol * (dc + rs)  # (B, K); rounding of both distances allowed
        inf = torch.full_like(lb, torch.inf)
        near_lb = torch.where(alive, inf, lb).min(dim=1).values
        clear_lb = torch.where(alive, inf, lb - rm[None]).min(dim=1).values
        return alive, near_lb, clear_lb


def _kmeans_input(emb: np.ndarray) -> np.ndarray | None:
    """The obstacles (N, d) float64 as FAISS k-means sees them: ``(o - c) 2^-e`` in float32, with
    ``2^e`` the smallest power of two at least the largest ``|o - c|`` (an exact scaling into
    [-1, 1], where float32 squared distances cannot overflow or underflow as a whole). ``c`` is
    the mean when it lies farther from the origin than the obstacles spread around it (a
    common offset, which float32 would keep at the cost of the differences), else 0 (then
    FAISS sees an exact power-of-two copy of the obstacles and returns what it returned for
    them unscaled wherever it could handle them). None when every obstacle is at one point."""
    mean = emb.mean(axis=0)
    centred = emb - mean
    spread = float(np.abs(centred).max())
    if not spread > 0:
        return None
    if float(np.abs(mean).max()) <= spread:
        centred = emb
    _, exponent = math.frexp(float(np.abs(centred).max()))  # top = m 2^exponent, 0.5 <= m < 1
    return np.ascontiguousarray(np.ldexp(centred, -exponent), dtype=np.float32)
