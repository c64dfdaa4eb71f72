"""Exact pruning (``RepulsiveField(..., prune=...)``) against the unpruned reference, float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import RepulsiveField
from obstacles import ObstacleSet
from obstacles.clusters import ClusteredObstacles

torch.set_num_threads(1)


def _blobs(n_blobs=20, per=50, d=16, q=0.4, offset=0.0, seed=0):
    """Obstacles in tight blobs spread far apart, sharing a large common offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(n_blobs, d))
    emb = (centres[:, None] + rng.normal(scale=0.3, size=(n_blobs, per, d))).reshape(-1, d)
    emb = emb + offset
    qs = rng.uniform(0.5 * q, q, size=emb.shape[0])
    return ObstacleSet.from_embeddings(emb, q_star=qs, eta=rng.uniform(0.5, 2, emb.shape[0]),
                                       radius=0.5 * qs)  # fmt: skip


def _states(oset, b=64, seed=1):
    rng = np.random.default_rng(seed)
    emb = oset.embeddings.astype(np.float64)
    near = emb[rng.integers(0, len(emb), b // 2)] + rng.normal(scale=0.2, size=(b // 2, oset.dim))
    far = emb.mean(0) + rng.normal(scale=10.0, size=(b - b // 2, oset.dim))
    return torch.from_numpy(np.concatenate([near, far]))


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("k", [True, 7, 1])
def test_pruned_equals_the_reference(offset, k):
    oset = _blobs(offset=offset)
    x = _states(oset)
    ref = RepulsiveField(oset).evaluate(x)
    fld = RepulsiveField(oset, prune=k)
    out = fld.evaluate(x)
    assert torch.allclose(out.potential, ref.potential, rtol=1e-12, atol=0)
    assert torch.allclose(out.force, ref.force, rtol=1e-12, atol=1e-300)
    assert torch.equal(out.active, ref.active) and torch.equal(out.collided, ref.collided)
    assert bool((out.nearest <= ref.nearest * (1 + 1e-12)).all())
    within = ref.active > 0  # an obstacle in range: its cluster survives, nearest is exact
    assert torch.allclose(out.nearest[within], ref.nearest[within], rtol=1e-12)
    # the point: states near one blob evaluate a few clusters, not the 1000 obstacles
    one_blob = x[:1] + 0.01 * torch.randn(
        8, oset.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    fld.evaluate(one_blob)
    if k is True:
        assert fld.last_evaluated <= 150, fld.last_evaluated


def test_noisy_mode_and_nothing_in_reach():
    oset = _blobs()
    x = _states(oset)
    t = torch.linspace(0.05, 0.9, x.shape[0], dtype=torch.float64)
    ref = RepulsiveField(oset).evaluate(x, t)
    out = RepulsiveField(oset, prune=True).evaluate(x, t)
    assert torch.allclose(out.force, ref.force, rtol=1e-12, atol=1e-300)
    assert torch.allclose(out.potential, ref.potential, rtol=1e-12, atol=0)
    far = torch.full((3, oset.dim), 1e6, dtype=torch.float64)
    fld = RepulsiveField(oset, prune=True)
    res = fld.evaluate(far)
    assert fld.last_evaluated == 0 and bool((res.force == 0).all())
    assert bool((res.nearest > 0).all()) and bool(torch.isfinite(res.nearest).all())


def test_cluster_bounds_hold():
    oset = _blobs(n_blobs=5, per=30)
    cl = ClusteredObstacles(oset, n_clusters=5)
    emb = torch.from_numpy(oset.embeddings.astype(np.float64))
    d = (emb - cl.centres[cl.assign]).norm(dim=1)
    assert bool((d <= cl.radii[cl.assign]).all())
    with pytest.raises(ValueError, match="n_clusters"):
        ClusteredObstacles(oset, n_clusters=0)
