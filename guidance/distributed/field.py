r"""The repulsive field of an obstacle set sharded over the ranks of a process group.

The field is a sum over obstacles and the nearest obstacle a minimum, so sharding the obstacles
is exact. Rank r holds shard ``S_r`` (a contiguous block of the set, or a shard loaded from a
sharded set on disk) and every rank evaluates the same states ``x`` (B, ...):

    U(x) = sum_r U_r(x),   F(x) = sum_r F_r(x),   active(x) = sum_r active_r(x)   (all-reduce SUM)
    nearest(x) = min_r nearest_r(x),   clearance(x) = min_r clearance_r(x)        (all-reduce MIN)

with ``U_r, F_r, ...`` the float64 sums of :class:`~guidance.fields.repulsive.RepulsiveField`
over ``S_r`` before the caps. The caps that belong to the whole set are the whole set's: the
default ``max_force`` is the largest single-obstacle clamp force over every shard (all-reduce
MAX), the per-pair caps divide by the whole set's N, and the total cap, the pull-back and the
finite range run once, after the reduction (:class:`~guidance.fields.base.Field`). So the result
is the single-process field's, up to the order of the float64 sums (tested to 1e-12 with 2
gloo processes). Every backend of the field runs per shard: the float64 reference, pruning by
clusters (``prune=``: each shard clusters its own obstacles; potential, force and ``active`` stay
exact, ``nearest`` a lower bound exactly as for one process) and the fused kernel.

:meth:`ShardedRepulsiveField.nearest_obstacle` gives the distance to the nearest obstacle and
its id in the whole set (an all-gather of each rank's ``(distance, id)``; ties go to the
smallest id).

The states must be the same on every rank (or broadcast first); the two collectives of one
evaluation are a SUM of ``(B, d + 2)`` float64 numbers and a MIN of ``(B, 2)``.
``comm_seconds`` and ``evaluations`` count the time spent in them.

At construction the ranks check, by a SHA-256 digest all-gathered at start, that they were given
the same settings and the same set (or, for shards, the same dimension and the same
``set_digest``), that no rank's shard is empty, and that there are not more ranks than
obstacles: each failure is a :class:`~guidance.distributed.comm.DistributedError` on every rank.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cspace.models.space import space_of
from guidance.distributed.comm import (
    DistributedError,
    Group,
    all_gather_cat,
    all_reduce,
    check_same,
    check_world,
    current,
)
from guidance.fields.base import Field, Projection, check_states, safe_norm
from guidance.fields.repulsive import RepulsiveField
from obstacles import ObstacleSet
from obstacles.sharded import set_fingerprint, shard_of

__all__ = ["ShardedRepulsiveField", "from_sharded_set"]


class ShardedRepulsiveField(Field):
    """:class:`~guidance.fields.repulsive.RepulsiveField` over the obstacles of every rank.

    Args:
        obstacles: the whole set (each rank takes its contiguous block, ``numpy.array_split``
            order), or with ``sharded=True`` this rank's shard.
        group: a :class:`~guidance.distributed.comm.Group` or torch process group (default: the
            default group; one process without one).
        sharded: ``obstacles`` is this rank's shard already (loaded shard-per-rank).
        ids: with ``sharded=True``, the shard's ids in the whole set (N_r,); default: the ranks'
            shards in rank order, ids ``offset_r + local id``.
        set_digest: with ``sharded=True``, a digest naming the whole set (a sharded set's
            manifest gives one); compared across ranks at start.
        projection, min_distance_ratio, max_force, max_potential, chunk_elements, prune,
        backend, precision: as for :class:`~guidance.fields.repulsive.RepulsiveField`
            (``prune`` and ``chunk_elements`` per shard).
    """

    _what = "the obstacles"

    def __init__(
        self,
        obstacles: ObstacleSet,
        *,
        group=None,
        sharded: bool = False,
        ids=None,
        set_digest: str | None = None,
        projection: Projection | None = None,
        min_distance_ratio: float = 0.05,
        max_force: float | None = None,
        max_potential: float | None = None,
        chunk_elements: int = 1 << 24,
        prune: bool | int | None = None,
        backend: str = "auto",
        precision: str = "tf32",
    ) -> None:
        if not isinstance(obstacles, ObstacleSet):
            raise TypeError(
                f"ShardedRepulsiveField needs an obstacles.ObstacleSet; got "
                f"{type(obstacles).__name__}"
            )
        super().__init__(
            projection=projection,
            min_distance_ratio=min_distance_ratio,
            max_force=max_force,
            max_potential=max_potential,
        )
        g = current(group)
        self.group: Group = g
        settings = dict(
            dim=obstacles.dim,
            min_distance_ratio=float(min_distance_ratio),
            max_force=max_force,
            max_potential=max_potential,
            prune=prune,
            backend=backend,
            precision=precision,
            projection=projection is not None,
            sharded=bool(sharded),
        )
        if sharded:
            settings["set"] = set_digest
            check_same(settings, "field settings and obstacle set", g)
            shard = obstacles
            sizes = all_gather_cat(torch.tensor([len(shard)], dtype=torch.long), g)
            if bool((sizes == 0).any()):
                empty = (sizes == 0).nonzero().flatten().tolist()
                raise DistributedError(
                    f"rank {g.rank} of {g.world}: ranks {empty} hold no obstacles; give every "
                    "rank a non-empty shard (fewer ranks, or re-shard the set)"
                )
            offset = int(sizes[: g.rank].sum())
            n_total = int(sizes.sum())
            if ids is None:
                self.ids = torch.from_numpy(shard.ids.astype(np.int64)) + offset
            else:
                self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
                if self.ids.shape != (len(shard),):
                    raise ValueError(f"ids must have shape ({len(shard)},); got {self.ids.shape}")
        else:
            settings["set"] = set_fingerprint(obstacles) if g.distributed else None
            check_same(settings, "field settings and obstacle set", g)
            n_total = len(obstacles)
            check_world(n_total, "obstacles", g, "use fewer processes than obstacles")
            start, stop = g.block(n_total)
            shard = obstacles if not g.distributed else shard_of(obstacles, start, stop)
            self.ids = torch.from_numpy(obstacles.ids[start:stop].astype(np.int64))
        self.n_total = n_total
        self.local = RepulsiveField(
            shard,
            min_distance_ratio=min_distance_ratio,
            max_force=max_force,
            max_potential=max_potential,
            chunk_elements=chunk_elements,
            prune=prune,
            backend=backend,
            precision=precision,
        )
        self.local.cap_count = n_total
        if max_force is None:  # the whole set's strongest obstacle at its clamp distance
            mf = all_reduce(torch.tensor([self.local.max_force], dtype=torch.float64), "max", g)
            self.local.max_force = float(mf[0])
        self.max_force = self.local.max_force
        q = all_reduce(torch.tensor([self.local.max_q_star], dtype=torch.float64), "max", g)
        self._max_q_star = float(q[0])
        self.obstacles = shard
        self.space = space_of(shard) if projection is None else None
        self.comm_seconds = 0.0
        self.evaluations = 0

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def max_q_star(self) -> float:
        return self._max_q_star

    def _sums(self, x: torch.Tensor, emb: torch.Tensor, t, need_force: bool):
        pot, force, near, clear, active = self.local._sums(x, emb, t, need_force)
        b, d = emb.shape
        if force is None:
            force = torch.zeros(b, d, dtype=torch.float64, device=emb.device)
        t0 = time.perf_counter()
        # counts travel as float64: exact below 2^53 obstacles
        summed = torch.cat(
            [pot.to(torch.float64)[:, None], active.to(torch.float64)[:, None], force.double()],
            dim=1,
        )
        summed = all_reduce(summed, "sum", self.group, "the sharded field's sum")
        mins = torch.stack([near.double(), clear.double()], dim=1)
        mins = all_reduce(mins, "min", self.group, "the sharded field's minimum")
        self.comm_seconds += time.perf_counter() - t0
        self.evaluations += 1
        return (
            summed[:, 0],
            summed[:, 2:],
            mins[:, 0],
            mins[:, 1],
            summed[:, 1].round().to(torch.long),
        )

    def nearest_obstacle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distance (B,) float64 to the nearest obstacle of the whole set and its id (B,)
        int64, for states ``x`` (B, ...) (the smallest id among equally near obstacles).

        Each rank takes ``min_j |P(x) - o_j|`` over its shard from float64 differences (chunks
        of ``chunk_elements``), and the ranks' ``(distance, id)`` pairs are all-gathered."""
        check_states(x)
        emb = self._embed(x, False)[0].detach().to(torch.float64)
        b, d = emb.shape
        o = self.local._emb.to(emb.device)
        best = torch.full((b,), math.inf, dtype=torch.float64, device=emb.device)
        arg = torch.zeros(b, dtype=torch.long, device=emb.device)
        chunk = max(1, self.local.chunk_elements // max(1, b * d))
        for s in range(0, o.shape[0], chunk):
            dist = safe_norm(emb[:, None, :] - o[None, s : s + chunk])  # (B, n)
            val, idx = dist.min(dim=1)  # the first of equal minima: the smallest local index
            better = val < best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + s, arg)
        gid = self.ids.to(emb.device)[arg]
        pairs = torch.stack([best, gid.to(torch.float64)], dim=1)  # ids < 2^53: exact
        every = all_gather_cat(pairs, self.group, "the nearest obstacle's all-gather")
        every = every.reshape(self.group.world, b, 2)
        dmin = every[:, :, 0].min(dim=0).values
        cand = torch.where(every[:, :, 0] == dmin[None], every[:, :, 1], math.inf)
        return dmin, cand.min(dim=0).values.to(torch.long)


def from_sharded_set(path, group=None, **field_kwargs) -> ShardedRepulsiveField:
    """The sharded field of a set kept sharded on disk (:mod:`obstacles.sharded`): each rank
    loads only its shards (``load_shard(path, rank, world)``) and the ranks check that they
    loaded the same set (its ``set_digest``)."""
    from obstacles.sharded import load_shard

    g = current(group)
    shard, ids, digest = load_shard(path, g.rank, g.world)
    return ShardedRepulsiveField(
        shard, group=g, sharded=True, ids=ids, set_digest=digest, **field_kwargs
    )
