r"""The repulsive potential field of obstacles (torch reference implementation).

For a state embedding ``x`` (d,) and obstacles ``o_j`` with influence ranges ``Q_j`` (Q*) and
strengths ``eta_j``, the seed's potential (Khatib's artificial potential field) is

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

Distances are taken from the differences ``x - o`` in float64 (never from the expansion
``|x|^2 + |o|^2 - 2 x.o``, which cancels catastrophically near an obstacle), over chunks of
obstacles so that no (B, N, d) tensor larger than ``chunk_elements`` is formed. Outputs come back
in the dtype and on the device of the input. This is the reference that faster kernels must match.

States of any shape (B, ...) are mapped to embeddings (B, d) by a ``projection`` (default: flatten).
For another projection P the force on the state is the pull-back ``J_P(x)^T F(P(x))`` (autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from obstacles import ObstacleSet

__all__ = ["FieldOutput", "RepulsiveField", "safe_norm"]

Projection = Callable[[torch.Tensor], torch.Tensor]


def safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm along ``dim`` that does not overflow (scaled by the largest |entry|)."""
    scale = x.abs().amax(dim=dim, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.linalg.vector_norm(x / safe, dim=dim, keepdim=True) * scale).squeeze(dim)


@dataclass
class FieldOutput:
    """Everything one pass over the obstacles gives, for B states.

    Attributes:
        potential: (B,) total potential U.
        force: (B, ...) total force -grad U on the state (same shape as the input state).
        nearest: (B,) distance to the nearest obstacle (embedding space).
        clearance: (B,) ``min_j (D_j - radius_j)``: negative inside a hard collision radius.
        active: (B,) number of obstacles within their Q* of the state.
    """

    potential: torch.Tensor
    force: torch.Tensor
    nearest: torch.Tensor
    clearance: torch.Tensor
    active: torch.Tensor

    @property
    def collided(self) -> torch.Tensor:
        """(B,) bool: inside some obstacle's hard collision radius."""
        return self.clearance < 0


class RepulsiveField:
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
            distances for far pairs, differences for near ones, float32 accumulation) or
            ``"auto"`` (the kernel for float32/bfloat16 CUDA states when Triton is installed,
            the reference otherwise). The kernel serves the clean mode, with or without
            pruning (then over the surviving clusters); the noisy mode, and inputs outside the
            kernel's float32-safe range (:attr:`KERNEL_RANGE`), use the reference.
        precision: the kernel's product precision for float32 states: ``"tf32"`` (tensor
            cores; relative error <= 1e-3 against the reference, tested), ``"tf32x3"`` or
            ``"ieee"`` (float32 products; about 1e-6). With ``"tf32"`` the kernel rounds the
            operands to tf32 itself, so Triton's CPU interpreter reproduces the GPU's rounding.
    """

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
    ) -> None:
        if not isinstance(obstacles, ObstacleSet):
            raise TypeError(
                f"RepulsiveField needs an obstacles.ObstacleSet; got {type(obstacles).__name__} "
                "(build one with ObstacleSet.from_embeddings(array, q_star=...))"
            )
        if len(obstacles) == 0:
            raise ValueError("empty obstacle set: add obstacles before building a RepulsiveField")
        if not 0 < min_distance_ratio < 1:
            raise ValueError(f"min_distance_ratio must be in (0, 1); got {min_distance_ratio}")
        for name, val in (("max_force", max_force), ("max_potential", max_potential)):
            if val is not None and not (np.isfinite(val) and val > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None; got {val}")
        self.obstacles = obstacles
        self.projection = projection
        self.rho_min = float(min_distance_ratio)
        self.chunk_elements = int(chunk_elements)
        self._emb = torch.from_numpy(obstacles.embeddings.astype(np.float64))
        self._q = torch.from_numpy(obstacles.q_star.astype(np.float64))
        self._eta = torch.from_numpy(obstacles.eta.astype(np.float64))
        self._radius = torch.from_numpy(obstacles.radius.astype(np.float64))
        rho = self.rho_min
        with np.errstate(over="ignore", divide="ignore"):
            per = obstacles.eta / obstacles.q_star**3 * (1 / rho - 1) / rho**2
        default_cap = float(np.max(per)) if np.all(np.isfinite(per)) else np.inf
        self.max_force = float(max_force) if max_force is not None else default_cap
        self.max_potential = float(max_potential) if max_potential is not None else np.inf
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {backend!r}")
        self.backend = backend
        if precision not in ("tf32", "tf32x3", "ieee"):
            raise ValueError(f"precision must be 'tf32', 'tf32x3' or 'ieee'; got {precision!r}")
        self.precision = precision
        self._kernel_cache: dict = {}
        self._poison_kernel_outputs = False  # tests: the kernel fills its outputs with NaN first
        self._kernel_limits: dict | None = None  # see KERNEL_RANGE, computed on first use
        self.clusters = None
        self.last_evaluated = float(len(obstacles))  # obstacles per state in the last evaluate
        if prune:
            from obstacles.clusters import ClusteredObstacles

            k = None if prune is True else int(prune)
            self.clusters = ClusteredObstacles(obstacles, n_clusters=k)

    @property
    def dim(self) -> int:
        return self.obstacles.dim

    @property
    def max_q_star(self) -> float:
        return float(self._q.max())

    # ------------------------------------------------------------------ public API
    def potential(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """U(x) for states (B, ...); (B,)."""
        return self.evaluate(x, t, need_force=False).potential

    def force(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """F(x) = -grad U(x) for states (B, ...); same shape as ``x``."""
        return self.evaluate(x, t).force

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        """``min_j (D_j - radius_j)`` for states (B, ...); (B,). Negative means a collision."""
        return self.evaluate(x, need_force=False).clearance

    def evaluate(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | None = None,
        *,
        need_force: bool = True,
    ) -> FieldOutput:
        """One pass over all obstacles for states ``x`` (B, ...).

        ``t`` (optional, float or (B,)) evaluates the field of the obstacles *noised to level t*:
        their centres move to ``(1 - t) o_j`` (the mean of the noised obstacle under
        ``x_t = (1-t) x0 + t eps``); used by the sampler's "noisy" mode.
        """
        if not torch.is_floating_point(x) or x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(
                f"states must be a floating tensor (B, ...) with B >= 1; got {x.dtype} {tuple(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                "states contain NaN or Inf; the field is defined for finite states only"
            )
        b = x.shape[0]
        if self.projection is None:
            emb = x.reshape(b, -1)
            xr = None
        else:
            xr = x.detach().requires_grad_(need_force)
            with torch.enable_grad() if need_force else torch.no_grad():
                emb = self.projection(xr)
            if emb.ndim != 2 or emb.shape[0] != b:
                raise ValueError(
                    f"projection must return (B, d) = ({b}, d); got {tuple(emb.shape)}"
                )
        if emb.shape[1] != self.dim:
            raise ValueError(
                f"dimension mismatch: states embed to d={emb.shape[1]} but the obstacles have d={self.dim} "
                "(pass a projection= that maps states to the obstacles' embedding space)"
            )
        scale = None
        if t is not None:
            tt = torch.as_tensor(t, dtype=torch.float64, device=x.device)
            scale = (1 - (tt.expand(b) if tt.ndim == 0 else tt.reshape(b)))[:, None]
        e64 = emb.detach().to(torch.float64)
        if scale is None and self._use_kernel(e64, emb.dtype):
            pot, f_emb, nearest, clear, active = self._kernel(emb.detach())
        elif self.clusters is None:
            pot, f_emb, nearest, clear, active = self._pairwise(e64, scale, need_force)
        else:
            pot, f_emb, nearest, clear, active = self._pruned(e64, scale, need_force)
        pot, f_emb = self._cap(pot, f_emb, need_force)
        if need_force:
            if xr is None:
                force = f_emb.reshape(x.shape)
            else:
                (g,) = torch.autograd.grad(emb, xr, grad_outputs=f_emb.to(emb.dtype))
                force = g.to(torch.float64)
            force = self._finite(force.reshape(b, -1), x.dtype, norm=True).reshape(x.shape)
        else:
            force = torch.zeros_like(x)
        out_dtype = x.dtype
        return FieldOutput(
            potential=self._finite(pot, out_dtype),
            force=force.to(out_dtype),
            nearest=self._finite(nearest, out_dtype),
            clearance=self._finite(clear, out_dtype),
            active=active,
        )

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _finite(v: torch.Tensor, dtype: torch.dtype, norm: bool = False) -> torch.Tensor:
        """Hold float64 values within finfo(dtype).max / 2 (by norm for vectors)."""
        big = float(torch.finfo(dtype).max) / 2
        if norm:
            n = safe_norm(v)
            factor = torch.where(n > big, big / n, torch.ones_like(n))
            return (v * factor[:, None]).to(dtype)
        return v.clamp(-big, big).to(dtype)

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
        n_total = emb_all.shape[0]  # the caps below hold for the whole set
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
            ratio = torch.clamp(dist / q[None], min=rho)  # D_eff / Q, in [rho, inf)
            gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))  # Q (1/D_eff - 1/Q)
            u_pref = torch.nan_to_num(eta / q**2, posinf=pot_cap)  # eta / Q^2
            pot_pair = torch.clamp(0.5 * u_pref[None] * gap**2, max=pot_cap)
            pot += torch.where(inside, pot_pair, torch.zeros_like(pot_pair)).sum(dim=1)
            if need_force:
                f_pref = torch.nan_to_num(eta / q**3, posinf=pair_cap)  # eta / Q^3
                mag = torch.clamp(f_pref[None] * gap / ratio**2, max=pair_cap)  # |F_j|
                mag = torch.where(inside, mag, torch.zeros_like(mag))
                dn = dist / 2 if halve else dist  # the norm of `diff` itself
                safe = torch.where(dn > 0, dn, torch.ones_like(dn))
                unit = torch.where((dn > 0)[..., None], diff / safe[..., None], default_dir)
                force += (mag[..., None] * unit).sum(dim=1)
        return pot, force, nearest, clear, active

    KERNEL_RANGE = 1e15
    """The kernel's float32-safe range: coordinates (centred for float32) up to this magnitude,
    so that squared norms stay below 4e33 at d = 4096; Q* within [1/KERNEL_RANGE, KERNEL_RANGE];
    N times the largest per-pair force and potential (at the clamp distance, after the caps)
    below KERNEL_RANGE^2, so that no float32 sum overflows. Outside it the reference is used,
    so that no NaN or Inf comes out of float32 arithmetic."""

    def _kernel_range_ok(self, e: torch.Tensor, x_dtype: torch.dtype) -> bool:
        big = self.KERNEL_RANGE
        if self._kernel_limits is None:
            q, eta, rho, n = self._q, self._eta, self.rho_min, len(self.obstacles)
            with np.errstate(over="ignore", divide="ignore"):
                per_f = torch.clamp(eta / q**3 * (1 / rho - 1) / rho**2, max=self.max_force)
                per_u = torch.clamp(0.5 * eta / q**2 * (1 / rho - 1) ** 2, max=self.max_potential)
            params_ok = bool((q >= 1 / big).all() and (q <= big).all()) and bool(
                n * float(per_f.max()) < big * big and n * float(per_u.max()) < big * big
            )
            centre = self._emb.mean(dim=0)
            self._kernel_limits = dict(
                params_ok=params_ok,
                centre=centre,
                centred_max=float((self._emb - centre).abs().max()),
                raw_max=float(self._emb.abs().max()),
            )
        lim = self._kernel_limits
        if not lim["params_ok"]:
            return False
        if x_dtype == torch.bfloat16:  # used as given, not centred
            return max(lim["raw_max"], float(e.abs().max())) <= big
        states = float((e - lim["centre"].to(e.device)).abs().max())
        return max(lim["centred_max"], states) <= big

    def _use_kernel(self, e: torch.Tensor, x_dtype: torch.dtype = torch.float32) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            return self._kernel_range_ok(e, x_dtype)
        if x_dtype == torch.float64 or e.device.type != "cuda":
            return False  # float64 states ask for the float64 reference
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return self._kernel_range_ok(e, x_dtype)

    def _kernel_inputs(self, dev: torch.device, dtype: torch.dtype) -> dict:
        """Obstacles for the kernel on ``dev`` in ``dtype``, cached: centred on their float64
        mean for float32 (a common offset would make every pair 'near'), sorted by cluster
        when pruning, with their squared norms and per-obstacle parameters in the same order."""
        from guidance.kernels.repulsive import sq_norms

        key = (str(dev), dtype)
        if key not in self._kernel_cache:
            # float32: centred in float64 first. bfloat16: used as given (rounding a centred copy
            # to bf16 would move the points by 2^-9 |x - c|); an offset sends pairs to the
            # kernel's exact differences path instead
            centre = self._kernel_limits["centre"]
            if dtype != torch.float32:
                centre = torch.zeros_like(centre)
            if self.clusters is None:
                order = torch.arange(len(self.obstacles))
                bounds = None
            else:
                order, sizes = self.clusters.order, self.clusters.sizes
                hi = sizes.cumsum(0)
                bounds = torch.stack([hi - sizes, hi], dim=1)  # cluster k's range in `order`
            oc = (self._emb[order] - centre).to(dtype)
            self._kernel_cache[key] = dict(
                centre=centre.to(dev),
                o=oc.to(dev),
                o_sqnorm=sq_norms(oc, self.precision).to(dev),
                q=self._q[order].float().to(dev),
                eta=self._eta[order].float().to(dev),
                radius=self._radius[order].float().to(dev),
                clusters=bounds,
            )
        return self._kernel_cache[key]

    def _kernel(self, e: torch.Tensor):
        """The fused kernel's pair sums, as float64 (the caps are applied after); over the
        surviving clusters when pruning (every block of states visits the clusters alive for
        any of its states)."""
        from guidance.kernels.repulsive import default_blocks, pair_sums

        dev = e.device
        n = len(self.obstacles)
        dtype = e.dtype if e.dtype in (torch.float32, torch.bfloat16) else torch.float32
        kin = self._kernel_inputs(dev, dtype)
        x = (e.double() - kin["centre"]).to(dtype)
        blocks = default_blocks(e.shape[0], e.shape[1], dtype, dev)
        extra: dict = {}
        if self.clusters is not None:
            alive, near_lb, clear_lb = self.clusters.bounds(e.double())
            bb = blocks["block_b"]
            pad = -e.shape[0] % bb
            per_block = torch.nn.functional.pad(alive, (0, 0, 0, pad)).reshape(
                -1, bb, alive.shape[1]
            )
            visited = per_block.any(dim=1).cpu()  # (blocks, K)
            extra = dict(
                segments=kin["clusters"],
                visits=[row.nonzero().flatten() for row in visited],
            )
            sizes = self.clusters.sizes.double()
            rows = torch.full((visited.shape[0],), float(bb), dtype=torch.float64)
            rows[-1] = bb - pad
            self.last_evaluated = float((visited.double() @ sizes * rows).sum()) / e.shape[0]
        else:
            self.last_evaluated = float(n)
        pot, force, near, clear, active = pair_sums(
            x, kin["o"], kin["q"], kin["eta"], kin["radius"],
            self.rho_min, min(self.max_force, 1e300 / n), min(self.max_potential, 1e300 / n),
            o_sqnorm=kin["o_sqnorm"], precision=self.precision, blocks=blocks,
            poison=self._poison_kernel_outputs, **extra,
        )  # fmt: skip
        if self.clusters is not None:
            near = torch.minimum(near, near_lb.to(near.device))
            clear = torch.minimum(clear, clear_lb.to(clear.device))
        return pot, force, near, clear, active

    def _cap(self, pot: torch.Tensor, force: torch.Tensor, need_force: bool):
        """The total potential and force held to ``max_potential`` and ``max_force``."""
        pot = torch.clamp(pot, max=self.max_potential)
        if need_force and np.isfinite(self.max_force):
            n = safe_norm(force)
            factor = torch.where(n > self.max_force, self.max_force / n, torch.ones_like(n))
            force = force * factor[:, None]
        return pot, force

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
