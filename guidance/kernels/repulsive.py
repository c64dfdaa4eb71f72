r"""The repulsive field's pair sums in one Triton kernel (a first, exact-differences version).

For states ``x`` (B, d) and obstacles ``o`` (N, d) with per-obstacle ``q`` (Q*), ``eta`` and hard
``radius``, one pass computes per state the sums that :meth:`guidance.RepulsiveField._pairwise`
computes in torch: the potential ``sum_j 1/2 eta_j (1/D_eff - 1/Q_j)^2``, the force
``sum_j |F_j| (x - o_j) / D_j`` (the same distance clamp ``D_eff = max(D, rho Q)`` and per-pair cap),
the nearest distance, the least clearance ``min_j (D_j - radius_j)`` and the count of obstacles
within range, never forming the (B, N) matrix in memory.

Each program owns ``BLOCK_B`` states and walks over the obstacles in tiles of ``BLOCK_N``. The
squared distances of a tile are accumulated over ``BLOCK_D``-wide slices of the dimension from
the differences ``x - o`` (not from ``|x|^2 + |o|^2 - 2 x.o``, which cancels when D is much
smaller than |x|, as it is near an obstacle or with a large common offset); the force is
accumulated from the same differences, slice by slice, into the program's own rows of the
output, and only for tiles with at least one pair within range (the sparse case skips it). Accumulation is in float32 (inputs float32 or bfloat16). The matrix-product fast path
(tf32 tiles for far pairs, differences only for near ones) is the next step; this version is the
correctness baseline, tested with ``TRITON_INTERPRET=1`` on the CPU against the float64 reference.

The final caps (``max_force`` on the total, ``max_potential``) are applied by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pair_sums"]


@triton.jit
def _diff_slice(x_ptr, o_ptr, rows, cols, row_ok, col_ok, d0, D, BLOCK_D: tl.constexpr):
    """``x - o`` (BLOCK_B, BLOCK_N, BLOCK_D) in float32 for the dimensions d0 .. d0 + BLOCK_D."""
    dims = d0 + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    xs = tl.load(x_ptr + rows[:, None] * D + dims[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    os_ = tl.load(o_ptr + cols[:, None] * D + dims[None, :],
                  mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    return xs[:, None, :] - os_[None, :, :]


@triton.jit
def _pair_sums_kernel(
    x_ptr, o_ptr, q_ptr, eta_ptr, rad_ptr,
    pot_ptr, force_ptr, near_ptr, clear_ptr, active_ptr,
    B, N, D, rho, pair_cap, pot_cap,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    pot = tl.zeros((BLOCK_B,), dtype=tl.float32)
    near = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    clear = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    active = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        sq = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            diff = _diff_slice(x_ptr, o_ptr, rows, cols, row_ok, col_ok, d0, D, BLOCK_D)
            sq += tl.sum(diff * diff, axis=2)
        dist = tl.sqrt(sq)
        q = tl.load(q_ptr + cols, mask=col_ok, other=1.0)
        eta = tl.load(eta_ptr + cols, mask=col_ok, other=0.0)
        rad = tl.load(rad_ptr + cols, mask=col_ok, other=0.0)
        valid = row_ok[:, None] & col_ok[None, :]
        big = tl.full((BLOCK_B, BLOCK_N), float("inf"), dtype=tl.float32)
        near = tl.minimum(near, tl.min(tl.where(valid, dist, big), axis=1))
        clear = tl.minimum(clear, tl.min(tl.where(valid, dist - rad[None, :], big), axis=1))
        inside = valid & (dist <= q[None, :])
        active += tl.sum(inside.to(tl.int32), axis=1)
        ratio = tl.maximum(dist / q[None, :], rho)
        gap = tl.where(inside, 1.0 / ratio - 1.0, 0.0)
        u_pref = eta / (q * q)
        pot += tl.sum(
            tl.where(inside, tl.minimum(0.5 * u_pref[None, :] * gap * gap, pot_cap), 0.0), axis=1
        )
        f_pref = u_pref / q
        mag = tl.where(inside, tl.minimum(f_pref[None, :] * gap / (ratio * ratio), pair_cap), 0.0)
        # unit vectors (x - o)/D; exactly on an obstacle the fixed direction (1, ..., 1)/sqrt(d)
        on = dist == 0.0
        coef = tl.where(on, 0.0, mag / tl.where(on, 1.0, dist))
        fixed = tl.sum(tl.where(on, mag, 0.0), axis=1) / tl.sqrt(D * 1.0)
        if tl.sum(inside.to(tl.int32)) > 0:  # the force pass only for tiles with a pair in range
            for d0 in range(0, D, BLOCK_D):
                diff = _diff_slice(x_ptr, o_ptr, rows, cols, row_ok, col_ok, d0, D, BLOCK_D)
                part = tl.sum(coef[:, :, None] * diff, axis=1) + fixed[:, None]
                dims = d0 + tl.arange(0, BLOCK_D)
                d_ok = dims < D
                ptrs = force_ptr + rows[:, None] * D + dims[None, :]
                m2 = row_ok[:, None] & d_ok[None, :]
                acc = tl.load(ptrs, mask=m2, other=0.0)
                tl.store(ptrs, acc + part, mask=m2)
    tl.store(pot_ptr + rows, pot, mask=row_ok)
    tl.store(near_ptr + rows, near, mask=row_ok)
    tl.store(clear_ptr + rows, clear, mask=row_ok)
    tl.store(active_ptr + rows, active, mask=row_ok)


def pair_sums(
    x: torch.Tensor,
    o: torch.Tensor,
    q: torch.Tensor,
    eta: torch.Tensor,
    radius: torch.Tensor,
    rho: float,
    pair_cap: float,
    pot_cap: float,
    block_b: int = 16,
    block_n: int = 16,
    block_d: int = 16,
    poison: bool = False,
):
    """(potential (B,), force (B, d), nearest (B,), clearance (B,), active (B,)) in float32 for
    states ``x`` (B, d) and obstacles ``o`` (N, d), float32 or bfloat16, on one device.
    ``poison`` fills the per-state outputs with NaN / -1 first (tests: every entry is written)."""
    b, d = x.shape
    n = o.shape[0]
    dev = x.device
    x, o = x.contiguous(), o.contiguous()
    q, eta, radius = (v.to(device=dev, dtype=torch.float32).contiguous() for v in (q, eta, radius))
    pot = torch.empty(b, dtype=torch.float32, device=dev)
    force = torch.zeros(b, d, dtype=torch.float32, device=dev)  # accumulated in place
    near = torch.empty(b, dtype=torch.float32, device=dev)
    clear = torch.empty(b, dtype=torch.float32, device=dev)
    active = torch.empty(b, dtype=torch.int32, device=dev)
    if poison:
        for v in (pot, near, clear):
            v.fill_(float("nan"))
        active.fill_(-1)
    cap = min(float(pair_cap), 3e38)
    pcap = min(float(pot_cap), 3e38)
    grid = (triton.cdiv(b, block_b),)
    _pair_sums_kernel[grid](
        x, o, q, eta, radius, pot, force, near, clear, active,
        b, n, d, float(rho), cap, pcap,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return pot, force, near, clear, active.long()
