r"""When and how :class:`guidance.RepulsiveField` runs the fused kernel of
:mod:`guidance.kernels.repulsive`.

:class:`KernelPath` holds, for one field, everything the kernel needs that does not depend on the
states: the float32-safe range check (:data:`KERNEL_RANGE`), the obstacles on each device and
dtype (centred, sorted by cluster when pruning, with their squared norms) and the per-block visit
lists of the pruned path. The field asks :meth:`KernelPath.usable` for each evaluation and calls
the path when it says yes; otherwise the float64 reference runs. Triton is imported only when
the kernel runs, so this module loads on machines without it.

The range check is computed without a spurious overflow (:func:`guidance.numerics.over_power`
for ``eta / Q^k``) and a parameter it cannot bound (a non-finite per-pair value) sends the field
to the reference. The kernel's float32 arithmetic can still overflow for some states the check
cannot see (a direction ``|F_j| / D_j`` for a state within ``|F_j| / 3.4e38`` of an obstacle):
:meth:`KernelPath.unsound` names the rows whose sums came back NaN or Inf, and the field
recomputes those rows with the float64 reference.
"""

from __future__ import annotations

import torch

from guidance.numerics import over_power

__all__ = ["AUTO_CPU_MIN", "BACKENDS", "KERNEL_RANGE", "PRECISIONS", "KernelPath"]

AUTO_CPU_MIN = 1 << 16
"""``backend="auto"`` takes the fast CPU path for sets of at least this many values (``N d``:
1,000 obstacles at d = 3,072, or 1,024 at d = 64); smaller sets keep the float64 reference (a
millisecond or so per state at most, bit for bit the results of earlier versions)."""

BACKENDS = ("auto", "torch", "triton", "cpu")
PRECISIONS = ("tf32", "tf32x3", "ieee")

KERNEL_RANGE = 1e15
"""The kernel's float32-safe range: coordinates (centred for float32) up to this magnitude, so
that squared norms stay below 4e33 at d = 4096; Q* within [1/KERNEL_RANGE, KERNEL_RANGE]; N times
the largest per-pair force and potential (at the clamp distance, after the caps) below
KERNEL_RANGE^2, so that no float32 sum overflows; ``eta``, ``eta / Q*^2`` and ``eta / Q*^3`` at
most KERNEL_RANGE^2 and ``rho_min`` at least 1/KERNEL_RANGE, so that the kernel's float32
prefactors are finite and its clamp ratio is not 0. Outside it the reference is used, so that
no NaN or Inf comes out of float32 arithmetic."""


class KernelPath:
    """The kernel side of one :class:`~guidance.RepulsiveField` (module docstring).

    Attributes:
        poison: tests set it to fill the kernel's output buffers with NaN first, so that an
            entry the kernel forgets to write shows up.
    """

    def __init__(self, field) -> None:
        self.field = field
        self.poison = False
        self._cache: dict = {}
        self._limits: dict | None = None

    # ------------------------------------------------------------------ selection
    def limits(self) -> dict:
        """The state-independent part of the range check (computed once)."""
        if self._limits is None:
            f = self.field
            q, eta, rho, n = f._q, f._eta, f.rho_min, len(f.obstacles)
            big = KERNEL_RANGE
            u_pref, f_pref = over_power(eta, q, 2), over_power(eta, q, 3)  # inf or finite
            prefactors_ok = rho >= 1 / big and bool(
                (eta <= big * big).all() and (u_pref <= big * big).all()
                and (f_pref <= big * big).all()
            )  # fmt: skip
            params_ok = False
            if prefactors_ok and bool((q >= 1 / big).all() and (q <= big).all()):
                # rho >= 1e-15 and prefactors <= 1e30: these are finite float64 values
                per_f = torch.clamp(f_pref * (1 / rho - 1) / rho**2, max=f.max_force)
                per_u = torch.clamp(0.5 * u_pref * (1 / rho - 1) ** 2, max=f.max_potential)
                params_ok = bool(
                    n * float(per_f.max()) < big * big and n * float(per_u.max()) < big * big
                )
            from guidance.kernels.cpu import extent

            centre, centred_max, raw_max = extent(f._emb)
            self._limits = dict(
                params_ok=params_ok,
                centre=centre,
                centred_max=centred_max,
                raw_max=raw_max,
            )
        return self._limits

    def in_range(self, e: torch.Tensor, x_dtype: torch.dtype) -> bool:
        """Whether states ``e`` (B, d) float64 and the obstacles lie in :data:`KERNEL_RANGE`."""
        lim = self.limits()
        if not lim["params_ok"]:
            return False
        if x_dtype == torch.bfloat16:  # used as given, not centred
            return max(lim["raw_max"], float(e.abs().max())) <= KERNEL_RANGE
        states = float((e - lim["centre"].to(e.device)).abs().max())
        raw = max(lim["raw_max"], float(e.abs().max()))  # the differences path takes raw values
        return max(lim["centred_max"], states) <= KERNEL_RANGE and raw <= KERNEL_RANGE**2

    @staticmethod
    def unsound(sums: tuple) -> torch.Tensor:
        """(B,) bool: the rows of the kernel's sums ``(potential, force, nearest, clearance,
        active)`` with a NaN anywhere or an infinite potential or force (the field recomputes
        them with the reference)."""
        pot, force, near, clear, _ = sums
        bad = ~torch.isfinite(pot) | torch.isnan(near) | torch.isnan(clear)
        if force is not None:
            bad |= ~torch.isfinite(force).all(dim=1)
        return bad

    def usable(self, e: torch.Tensor, x_dtype: torch.dtype = torch.float32) -> bool:
        """Whether this evaluation runs the kernel: ``backend="triton"`` always (in range);
        ``"auto"`` for float32/bfloat16 CUDA states when Triton is installed (in range)."""
        backend = self.field.backend
        if backend in ("torch", "cpu"):
            return False
        if backend == "triton":
            return self.in_range(e, x_dtype)
        if x_dtype == torch.float64 or e.device.type != "cuda":
            return False  # float64 states ask for the float64 reference
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return self.in_range(e, x_dtype)

    def cpu_usable(self, e: torch.Tensor, x_dtype: torch.dtype) -> bool:
        """Whether this evaluation runs the fast CPU path (:mod:`guidance.kernels.cpu`):
        ``backend="cpu"`` always (in range; a ``ValueError`` for states on another device);
        ``"auto"`` for CPU states of sets of at least :data:`AUTO_CPU_MIN` values ``N d`` (in
        range). Any floating dtype: float64 states are summed in float64, the others in float32
        (bfloat16 and float16 convert exactly)."""
        backend = self.field.backend
        if backend == "cpu":
            if e.device.type != "cpu":
                raise ValueError(
                    f"backend='cpu' needs CPU states; got {e.device.type} tensors (move them with "
                    ".cpu(), or use backend='auto', which picks the kernel on CUDA)"
                )
            return self.in_range(e, torch.float32)
        if backend != "auto" or e.device.type != "cpu":
            return False
        if len(self.field.obstacles) * self.field.dim < AUTO_CPU_MIN:
            return False
        return self.in_range(e, torch.float32)

    def cpu(self, e: torch.Tensor, x_dtype: torch.dtype):
        """The fast CPU path's pair sums for embeddings ``e`` (B, d) float64 (the states' exact
        values), as float64; over the clusters alive for each group of states when pruning.
        Float32 work for states of other dtypes than float64, unless torch's float32 matmul
        precision is not ``"highest"`` (then float64 work: that setting lets the CPU take float32
        products in bfloat16, beyond the bounds). Sets the field's ``last_evaluated``."""
        from guidance.kernels.cpu import _GROUP, cpu_pair_sums, prepare, threads_of

        f = self.field
        n = len(f.obstacles)
        # float32 work relies on IEEE float32 products (the screening's and the force's bounds);
        # with torch.set_float32_matmul_precision("high" or "medium") the CPU may take them in
        # bfloat16 (oneDNN, AMX), so the sums are then taken in float64 (slower, as accurate)
        ieee = torch.get_float32_matmul_precision() == "highest"
        work = torch.float32 if x_dtype != torch.float64 and ieee else torch.float64
        key = ("cpu", work)
        if key not in self._cache:
            lim = self.limits()
            self._cache[key] = prepare(
                f._emb, f._q, over_power(f._eta, f._q, 2), over_power(f._eta, f._q, 3),
                f._radius, work, extent_=(lim["centre"], lim["centred_max"], lim["raw_max"]),
            )  # fmt: skip
        cache = self._cache[key]
        e = e.to(torch.float64)
        groups, near_lb, clear_lb = None, None, None
        f.last_evaluated = float(n)
        if f.clusters is not None:
            alive, near_lb, clear_lb = f.clusters.bounds(e)
            pairs = [0]  # pairs evaluated, counted as the groups are made

            def pruned_groups():
                """One group at a time (so that one list of member positions is alive at once):
                the rows and the positions of the obstacles alive for any of them, or None
                (every obstacle) where those are more than half of the set."""
                for r0 in range(0, e.shape[0], _GROUP):
                    rows = torch.arange(r0, min(e.shape[0], r0 + _GROUP))
                    ks = alive[rows].any(dim=0).nonzero().flatten().tolist()
                    size = int(f.clusters.sizes[ks].sum()) if ks else 0
                    members = None  # cheaper as one dense pass
                    if size <= n // 2:
                        members = (
                            torch.cat([f.clusters.members(k) for k in ks])
                            if ks
                            else torch.zeros(0, dtype=torch.long)
                        )
                    pairs[0] += rows.numel() * (n if members is None else size)
                    yield rows, members

            groups = pruned_groups()
        with threads_of(f.threads):
            pot, force, near, clear, active = cpu_pair_sums(
                e, cache, f.rho_min, min(f.max_force, 1e300 / n),
                min(f.max_potential, 1e300 / n), block=f.block, groups=groups,
            )  # fmt: skip
        if f.clusters is not None:
            f.last_evaluated = pairs[0] / e.shape[0]
        if near_lb is not None:
            near = torch.minimum(near, near_lb)
            clear = torch.minimum(clear, clear_lb)
        return pot, force, near, clear, active

    # ------------------------------------------------------------------ the run
    def inputs(self, dev: torch.device, dtype: torch.dtype) -> dict:
        """Obstacles for the kernel on ``dev`` in ``dtype``, cached: as stored (the kernel's
        differences path takes them as they are), with the centre the kernel subtracts before
        its products (their mean rounded to float32, for float32; a common offset would inflate
        every pair's rho), sorted by cluster when pruning, with the squared norms of the centred
        values and the per-obstacle parameters in the same order."""
        from guidance.kernels.repulsive import centred, sq_norms

        key = (str(dev), dtype)
        if key not in self._cache:
            f = self.field
            # float32: centred by the kernel itself, in float32. bfloat16: used as given (rounding
            # a centred copy to bf16 would move the points by 2^-9 |x - c|); an offset sends
            # pairs to the kernel's exact differences path instead
            centre = self.limits()["centre"]
            if dtype != torch.float32:
                centre = torch.zeros_like(centre)
            if f.clusters is None:
                order = torch.arange(len(f.obstacles))
                bounds = None
            else:
                order, sizes = f.clusters.order, f.clusters.sizes
                hi = sizes.cumsum(0)
                bounds = torch.stack([hi - sizes, hi], dim=1)  # cluster k's range in `order`
            o = f._emb[order].to(dtype)  # the stored float32 values (or bf16 roundings), exact
            c32 = centre.to(torch.float32)
            self._cache[key] = dict(
                centre=c32.to(dev),
                o=o.to(dev),
                o_sqnorm=sq_norms(centred(o, c32), f.precision).to(dev),
                q=f._q[order].float().to(dev),
                eta=f._eta[order].float().to(dev),
                radius=f._radius[order].float().to(dev),
                clusters=bounds,
            )
        return self._cache[key]

    def __call__(self, e: torch.Tensor):
        """The fused kernel's pair sums for embeddings ``e`` (B, d), as float64 (the caps are
        applied by the field after); over the surviving clusters when pruning (every block of
        states visits the clusters alive for any of its states). Sets the field's
        ``last_evaluated``."""
        from guidance.kernels.repulsive import default_blocks, pair_sums

        f = self.field
        dev = e.device
        n = len(f.obstacles)
        dtype = e.dtype if e.dtype in (torch.float32, torch.bfloat16) else torch.float32
        kin = self.inputs(dev, dtype)
        x = e.to(dtype).contiguous()
        blocks = default_blocks(e.shape[0], e.shape[1], dtype, dev)
        extra: dict = {}
        if f.clusters is not None:
            alive, near_lb, clear_lb = f.clusters.bounds(e.double())
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
            sizes = f.clusters.sizes.double()
            rows = torch.full((visited.shape[0],), float(bb), dtype=torch.float64)
            rows[-1] = bb - pad
            f.last_evaluated = float((visited.double() @ sizes * rows).sum()) / e.shape[0]
        else:
            f.last_evaluated = float(n)
        pot, force, near, clear, active = pair_sums(
            x, kin["o"], kin["q"], kin["eta"], kin["radius"],
            f.rho_min, min(f.max_force, 1e300 / n), min(f.max_potential, 1e300 / n),
            centre=kin["centre"], o_sqnorm=kin["o_sqnorm"], precision=f.precision, blocks=blocks,
            poison=self.poison, **extra,
        )  # fmt: skip
        if f.clusters is not None:
            near = torch.minimum(near, near_lb.to(near.device))
            clear = torch.minimum(clear, clear_lb.to(clear.device))
        return pot, force, near, clear, active
