r"""The repulsive potential field of obstacles (torch reference implementation).

For a state embedding ``x`` (d,) and obstacles ``o_j`` with influence ranges ``Q_j`` (Q*) and
strengths ``eta_j``, the repulsive potential (Khatib's artificial potential field, 1986) is

    U(x) = sum_j 1/2 eta_j (1/D_j - 1/Q_j)^2   for D_j = |x - o_j| <= Q_j, else 0,

and the force is its negative gradient, in closed form

    F(x) = -grad U(x) = sum_{j: D_j <= Q_j} eta_j (1/D_j - 1/Q_j) (1/D_j^2) (x - o_j) / D_j.

**Bounds.** U and F are singular at D = 0. This implementation keeps every output finite for
every finite input, with these documented bounds:

1. Distance clamp. Each pair uses ``D_eff = max(D_j, rho_min Q_j)`` with
   ``rho_min = min_distance_ratio`` (default 0.05): closer than that, U and |F| of that pair stay
   at their value at ``rho_min Q_j``. The direction stays ``(x - o_j)/D_j``; for a state exactly on
   an obstacle (D = 0) it is the fixed unit vector ``(1, ..., 1)/sqrt(d)``.
2. Force cap. The total force norm is at most ``max_force``, by default the force one obstacle
   exerts at its clamp distance, ``max_j eta_j/Q_j^3 (1/rho_min - 1)/rho_min^2``: no state is
   pushed harder than by the strongest single obstacle at its clamp distance (the cap is applied
   in float64; a float32 output can exceed it by the cast's rounding, a few float32 eps). The potential is at
   most ``max_potential`` (default: unbounded but finite).
3. Finite range. Both outputs are finally held within ``finfo(dtype).max / 2`` of the output
   dtype (norm-preserving for the force); distances are computed with a scaled norm, so inputs
   up to the dtype's largest finite values do not overflow.

**Subnormal and huge parameters** (any ``Q* > 0``, ``eta >= 0``, ``0 < rho_min < 1`` the set and
the field accept; :mod:`guidance.numerics`):

* the prefactors ``eta/Q^2`` and ``eta/Q^3`` (and the default cap) are the plain quotients where
  ``Q^k`` is a normal float64 number, else ``k`` successive divisions by Q, so ``Q = 1e200`` with
  ``eta = 1e300`` gives ``eta/Q^3 = 1e-300``, not 0 (``Q^3 = inf``), and ``Q = 1e-110`` with
  ``eta = 1e-300`` gives 1e30, not the cap (``Q^3 = 0``); a prefactor that truly overflows is
  held at the per-pair cap;
* a zero prefactor (``eta = 0``, or a quotient below the subnormals) gives a zero pair term even
  where ``1/D_eff`` or ``1/D_eff^2`` overflows (``rho_min`` below 1e-154): never ``0 * inf``;
* the force cap scales by ``max_force / |F|`` without the reciprocal of a subnormal ``|F|`` (two
  obstacles with ``eta = 1e-315`` push with a subnormal 7.6e-312 each; their sum is held at that
  force, not at ``[inf, nan]``); a subnormal cap holds to the spacing of the subnormals;
* the noise level ``t`` must be finite and in [0, 1] (``ValueError`` otherwise), so the noised
  centres ``(1 - t) o_j`` stay within the obstacles' range;
* with ``prune``, the clusters' bounds stay exact for states beyond 1e154 (where squared
  distances overflow) and k-means never sees values FAISS cannot handle
  (:mod:`obstacles.clusters`); on the kernel path, rows whose float32 sums come back NaN or Inf
  are recomputed by this reference (:mod:`guidance.kernels.dispatch`).

Distances are taken from the differences ``x - o`` in float64 (never from the expansion
``|x|^2 + |o|^2 - 2 x.o``, which cancels catastrophically near an obstacle), over chunks of
obstacles so that no (B, N, d) tensor larger than ``chunk_elements`` is formed. Outputs come back
in the dtype and on the device of the input. This is the reference that faster kernels must match.

States of any shape (B, ...) are mapped to embeddings (B, d) by a ``projection`` (default: flatten).
For another projection P the force on the state is the pull-back ``J_P(x)^T F(P(x))`` (autograd);
the checks, the caps, the pull-back and the finite range are :class:`guidance.fields.base.Field`'s.
The fused GPU kernel runs instead of the reference when :mod:`guidance.kernels.dispatch` says so.
"""

from __future__ import annotations

import numpy as np
import torch

from cspace.models.space import space_of
from guidance.fields.base import Field, Projection, safe_norm
from guidance.kernels.cpu import check_block, check_threads
from guidance.kernels.dispatch import BACKENDS, KERNEL_RANGE, PRECISIONS, KernelPath
from guidance.numerics import over_power, over_power_np
from obstacles import ObstacleSet
from obstacles.clusters import ClusteredObstacles

__all__ = ["RepulsiveField"]


class RepulsiveField(Field):
    """The thresholded repulsive field of an :class:`~obstacles.ObstacleSet`.

    Args:
        obstacles: the obstacle set (embeddings, per-obstacle ``q_star``, ``eta``, ``radius``).
            The field copies them at construction; build a new field after changing the set.
        projection: maps states (B, ...) to embeddings (B, d); default flattens.
        min_distance_ratio: ``rho_min`` of the distance clamp (0 < rho_min < 1).
        max_force: cap on the total force norm (> 0); default see the module docstring.
        max_potential: cap on the total potential (> 0); default none beyond finiteness.
        chunk_elements: largest (B x chunk x d) difference tensor formed at once.
        prune: exact pruning for large sets with small Q* (see :mod:`obstacles.clusters`): ``True``
            (about sqrt(N) clusters), a number of clusters, or None/False (every obstacle).
            Potential, force, ``active`` and ``collided`` (when every hard radius <= its Q*)
            are exactly the unpruned values; ``nearest`` and ``clearance`` are exact when the
            nearest obstacle lies in a surviving cluster, else lower bounds beyond every pruned
            cluster's Q*.
        backend: ``"torch"`` (this float64 reference), ``"triton"`` (the fused kernel of
            :mod:`guidance.kernels.repulsive`: float32 or bfloat16 inputs, matrix-product
            distances for far pairs, differences for near ones, float32 accumulation), ``"cpu"``
            (the fast CPU path of :mod:`guidance.kernels.cpu`: float64 products for the
            distances, float32 or float64 work for the rest, exact differences for near
            pairs, blocked over the obstacles; half-precision states are summed in float32) or
            ``"auto"``: the kernel for float32/bfloat16 CUDA states when Triton is installed,
            the CPU path for CPU states of sets of at least
            :data:`~guidance.kernels.dispatch.AUTO_CPU_MIN` values (N d >= 65,536), the
            reference otherwise. Both serve the clean mode, with or without pruning (then over the
            surviving clusters); the noisy mode, and inputs outside the float32-safe range
            (:attr:`KERNEL_RANGE`), use the reference. Each keeps the bound of
            :mod:`guidance.kernels.bounds` (per state, against the pairs' scales).
        precision: the kernel's product precision for float32 states: ``"tf32"`` (tensor
            cores; relative error <= 1e-3 against the reference, tested), ``"tf32x3"`` or
            ``"ieee"`` (float32 products; about 1e-6). With ``"tf32"`` the kernel rounds the
            operands to tf32 itself, so Triton's CPU interpreter reproduces the GPU's rounding.
        block: the CPU path's obstacles per block (1 to 2^24; default: ``min(2^18 / d,
            2^20 / B)``, from 256 to 8,192, which keeps its temporaries under 30 MiB whatever N
            is).
        threads: torch threads for the CPU path's calls (1 to the CPUs this process may use;
            default: torch's setting).
    """

    _what = "the obstacles"
    #: the kernel's float32-safe range (:data:`guidance.kernels.dispatch.KERNEL_RANGE`)
    KERNEL_RANGE = KERNEL_RANGE

    def __init__(
        self,
        obstacles: ObstacleSet,
        *,
        projection: Projection | None = None,
        min_distance_ratio: float = 0.05,
        max_force: float | None = None,
        max_potential: float | None = None,
        chunk_elements: int = 1 << 24,
        prune: bool | int | None = None,
        backend: str = "auto",
        precision: str = "tf32",
        block: int | None = None,
        threads: int | None = None,
    ) -> None:
        if not isinstance(obstacles, ObstacleSet):
            raise TypeError(
                f"RepulsiveField needs an obstacles.ObstacleSet; got {type(obstacles).__name__} "
                "(build one with ObstacleSet.from_embeddings(array, q_star=...))"
            )
        if len(obstacles) == 0:
            raise ValueError("empty obstacle set: add obstacles before building a RepulsiveField")
        super().__init__(
            projection=projection,
            min_distance_ratio=min_distance_ratio,
            max_force=max_force,
            max_potential=max_potential,
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        self.obstacles = obstacles
        # with a projection the states live in another space, which the field cannot name
        self.space = space_of(obstacles) if projection is None else None
        self.chunk_elements = int(chunk_elements)
        self._emb = torch.from_numpy(obstacles.embeddings.astype(np.float64))
        self._q = torch.from_numpy(obstacles.q_star.astype(np.float64))
        self._eta = torch.from_numpy(obstacles.eta.astype(np.float64))
        self._radius = torch.from_numpy(obstacles.radius.astype(np.float64))
        if max_force is None:  # the strongest single obstacle at its clamp distance
            rho = self.rho_min
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                per = over_power_np(obstacles.eta, obstacles.q_star, 3) * (1 / rho - 1) / rho**2
            self.max_force = float(np.max(per)) if np.all(np.isfinite(per)) else np.inf
        self.backend = backend
        self.precision = precision
        self.block = check_block(block)
        self.threads = check_threads(threads)
        self.kernel = KernelPath(self)
        self.clusters = None
        self._o_max = None  # the largest |coordinate| of the obstacles (the reference's scaling)
        self.last_evaluated = float(len(obstacles))  # obstacles per state in the last evaluate
        #: the obstacle count the per-pair caps divide by (``1e300 / count``, so that no sum
        #: over the whole set overflows); a shard of a larger set sets the whole set's count
        self.cap_count = len(obstacles)
        if prune:
            k = None if prune is True else int(prune)
            self.clusters = ClusteredObstacles(obstacles, n_clusters=k)

    @property
    def dim(self) -> int:
        return self.obstacles.dim

    @property
    def max_q_star(self) -> float:
        return float(self._q.max())

    def _sums(self, x: torch.Tensor, emb: torch.Tensor, t, need_force: bool):
        """The pair sums: the kernel (clean mode, when :class:`KernelPath` says so), else the
        float64 reference over every obstacle or over the surviving clusters."""
        scale = self._levels(t, x.shape[0], x.device)
        e64 = emb.to(torch.float64)
        fast = None
        if scale is None:
            if self.kernel.usable(e64, emb.dtype):
                fast = self.kernel
            elif self.kernel.cpu_usable(e64, emb.dtype):
                fast = lambda v: self.kernel.cpu(v.to(torch.float64), emb.dtype)  # noqa: E731
        if fast is not None:
            out = fast(emb)
            bad = self.kernel.unsound(out)
            if not bool(bad.any()):
                return out
            # rows the float32 kernel could not hold (e.g. a direction mag / D that overflows
            # for a state within mag / 3.4e38 of an obstacle): the reference recomputes them
            rows = bad.nonzero().flatten()
            ref = (
                self._pairwise(e64[rows], None, need_force)
                if self.clusters is None
                else self._pruned(e64[rows], None, need_force)
            )
            out = tuple(v.clone() if v is not None else v for v in out)
            for v, r in zip(out, ref, strict=True):
                if v is not None and r is not None:
                    v[rows.to(v.device)] = r.to(device=v.device, dtype=v.dtype)
            return out
        scale = None if scale is None else scale[:, None]
        if self.clusters is None:
            return self._pairwise(e64, scale, need_force)
        return self._pruned(e64, scale, need_force)

    def _pairwise(
        self,
        e: torch.Tensor,
        scale: torch.Tensor | None,
        need_force: bool,
        index: torch.Tensor | None = None,
    ):
        """Sum over obstacle chunks (all, or those at ``index``) for embeddings ``e`` (B, d) in
        float64."""
        b, d = e.shape
        dev = e.device
        emb_all, q_all = self._emb.to(dev), self._q.to(dev)
        eta_all, rad_all = self._eta.to(dev), self._radius.to(dev)
        n_total = self.cap_count  # the caps below hold for the whole set (all shards)
        if index is not None:
            idx = index.to(dev)
            emb_all, q_all, eta_all, rad_all = emb_all[idx], q_all[idx], eta_all[idx], rad_all[idx]
        pot = torch.zeros(b, dtype=torch.float64, device=dev)
        force = torch.zeros(b, d, dtype=torch.float64, device=dev)
        nearest = torch.full((b,), torch.inf, dtype=torch.float64, device=dev)
        clear = torch.full((b,), torch.inf, dtype=torch.float64, device=dev)
        active = torch.zeros(b, dtype=torch.long, device=dev)
        # per-pair magnitudes are capped so that the sum over all obstacles cannot overflow
        pair_cap = min(self.max_force, 1e300 / n_total)
        pot_cap = min(self.max_potential, 1e300 / n_total)
        default_dir = torch.full((d,), d**-0.5, dtype=torch.float64, device=dev)
        rho = self.rho_min
        if index is None:  # state-independent: once per field, not at every sampler step
            if self._o_max is None:
                self._o_max = float(emb_all.abs().max())
            o_max = self._o_max
        else:
            o_max = float(emb_all.abs().max()) if emb_all.numel() else 0.0
        halve = max(float(e.abs().max()), o_max) > 1e300
        chunk = max(1, self.chunk_elements // max(1, b * d))
        for s in range(0, emb_all.shape[0], chunk):
            o = emb_all[s : s + chunk]  # (n, d)
            q, eta, rad = q_all[s : s + chunk], eta_all[s : s + chunk], rad_all[s : s + chunk]
            centres = o[None] if scale is None else scale[:, :, None] * o[None]  # (1|B, n, d)
            if halve:  # differences of values near the float64 limit would overflow
                diff = e[:, None, :] / 2 - centres / 2
                dist = 2 * safe_norm(diff)
            else:
                diff = e[:, None, :] - centres  # (B, n, d)
                dist = safe_norm(diff)  # (B, n)
            nearest = torch.minimum(nearest, dist.min(dim=1).values)
            clear = torch.minimum(clear, (dist - rad[None]).min(dim=1).values)
            inside = dist <= q[None]
            active += inside.sum(dim=1)
            if not bool(inside.any()):
                continue
            ratio = torch.clamp(dist / q[None], min=rho)  # D_eff / Q, in [rho, inf]
            gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))  # Q (1/D_eff - 1/Q)
            # eta / Q^k without a spurious over- or underflow (inf only when it is: then the cap)
            u_half = 0.5 * torch.nan_to_num(over_power(eta, q, 2), posinf=pot_cap)  # eta/(2Q^2)
            pot_pair = torch.clamp(u_half[None] * gap**2, max=pot_cap)
            # a zero prefactor (eta = 0, or one below the subnormals) wins over gap^2 = inf
            # (rho_min < 1e-154), which would otherwise make 0 * inf = NaN
            pot_pair = torch.where((u_half == 0)[None] | ~inside, 0.0, pot_pair)
            pot += pot_pair.sum(dim=1)
            if need_force:
                f_pref = torch.nan_to_num(over_power(eta, q, 3), posinf=pair_cap)  # eta / Q^3
                mag = torch.clamp(f_pref[None] * gap / ratio**2, max=pair_cap)  # |F_j|
                mag = torch.where((f_pref == 0)[None] | ~inside, 0.0, mag)
                dn = dist / 2 if halve else dist  # the norm of `diff` itself
                safe = torch.where(dn > 0, dn, torch.ones_like(dn))
                unit = torch.where((dn > 0)[..., None], diff / safe[..., None], default_dir)
                force += (mag[..., None] * unit).sum(dim=1)
        return pot, force, nearest, clear, active

    def _pruned(self, e: torch.Tensor, scale: torch.Tensor | None, need_force: bool):
        """``_pairwise`` over each surviving cluster for the states it survives for."""
        b, d = e.shape
        alive, near_lb, clear_lb = self.clusters.bounds(e, scale)  # (B, K), (B,), (B,)
        pot = torch.zeros(b, dtype=torch.float64, device=e.device)
        force = torch.zeros(b, d, dtype=torch.float64, device=e.device)
        nearest, clear = near_lb.clone(), clear_lb.clone()
        active = torch.zeros(b, dtype=torch.long, device=e.device)
        evaluated = 0
        for k in alive.any(dim=0).nonzero().flatten().tolist():
            rows = alive[:, k].nonzero().flatten()
            members = self.clusters.members(k)
            evaluated += rows.numel() * members.numel()
            sc = None if scale is None else scale[rows]
            p_k, f_k, n_k, c_k, a_k = self._pairwise(e[rows], sc, need_force, members)
            pot.index_add_(0, rows, p_k)
            force.index_add_(0, rows, f_k)
            nearest[rows] = torch.minimum(nearest[rows], n_k)
            clear[rows] = torch.minimum(clear[rows], c_k)
            active.index_add_(0, rows, a_k)
        self.last_evaluated = evaluated / b  # obstacles per state
        return pot, force, nearest, clear, active
