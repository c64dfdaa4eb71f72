r"""The repulsive field's pair sums in one fused Triton kernel, tiled like flash-attention.

For states ``x`` (B, d) and obstacles ``o`` (N, d) with per-obstacle ``q`` (Q*), ``eta`` and hard
``radius``, one pass computes per state the sums that :meth:`guidance.RepulsiveField._pairwise`
computes in torch, never forming the (B, N) matrix in memory:

* potential ``sum_j 1/2 eta_j (1/D_eff - 1/Q_j)^2`` over ``D_j <= Q_j``, with the reference's clamp
  ``D_eff = max(D, rho Q)`` and per-pair cap;
* force ``sum_j c_ij (x_i - o_j)`` with ``c_ij = |F_ij| / D_ij`` (exactly on an obstacle: the fixed
  direction ``(1, ..., 1)/sqrt(d)``);
* nearest distance, least clearance ``min_j (D_j - radius_j)``, count of obstacles within range.

**Tiles.** A program owns ``BLOCK_B`` states and walks over ``BLOCK_N``-obstacle tiles of the
segments it is given. Per tile, the squared distances come from matrix products
(tensor cores: tf32 for float32 inputs, bf16 for bfloat16, float32 accumulation)::

    D^2_ij = |x_i|^2 + |o_j|^2 - 2 x_i . o_j          (squared norms summed in float64)

and the far pairs' force from one more: ``F_i += (sum_j c_ij) x_i - sum_j c_ij o_j``.

**Near pairs: the rule from the error bound.** The stated bound ``eps`` (tf32 1e-3, float32
products 1e-5, bfloat16 1e-2) holds per state, for any number of pairs, one included, against
each pair's scale (:mod:`guidance.kernels.bounds`)::

    |dU_i| <= eps sum_j (U_ij + eta_j/(2 Q_j^2)),   |dF_i| <= eps sum_j (|F_ij| + eta_j/Q_j^3)

(the sums over the pairs within ``(1 + eps) Q_j``; for one pair deep in its range, the plain
relative error; a bound on ``|dF_i| / |F_i|`` is impossible: forces cancel, and vanish at D = Q).
A relative distance error ``e`` costs at most ``C_F e = 3.32 e`` of a pair's force scale and
``2.5 e`` of its potential scale (the sensitivity ``3 + r/(1 - r)`` of the 1/D^3 law, tamed by the
scale). The error of a distance from the expansion, per pair, with ``S = |x~|^2 + |o~|^2`` and
``rho = sqrt(S) / D >= 1/sqrt(2)``:

* *operands*: the products see the centred values rounded to their format, unit roundoff
  ``u_op``: tf32 ``2^-11 + 2^-24`` (rounded to nearest by :func:`_tf32`, after the float32
  centring), float32 ``2^-24`` (the centring), bfloat16 0 (used as given, exact). Each point moves
  by at most ``u_op`` of its length: ``|D~ - D| <= u_op (|x~| + |o~|) <= sqrt(2) u_op rho D``;
* *accumulation*: float32 sums of a length-d dot product and the rounded norms,
  ``|s^ - D~^2| <= gamma S`` with ``gamma = (d + 4) 2^-23`` (worst case; tensor cores may
  truncate, hence 2^-23), so ``gamma rho^2 / 2`` of D;
* *coefficients and force product*: about 8 float32 roundings in ``|F|/D``; with tf32 the
  coefficients and the obstacles are rounded to tf32 for the force product (``2^-11`` of the
  pair, and ``2^-11 rho`` for the obstacles' part).

So a pair keeps ``eps / 2`` (the other half is left to the float32 sums over pairs and the output's
rounding) when ``C_F (sqrt(2) u_op rho + gamma rho^2 / 2) + e_fixed + e_dir rho <= eps / 2``,
i.e. ``rho <= rho_max``, i.e. ``s^ >= tau S`` with ``tau = 1 / rho_max^2``
(:func:`guidance.kernels.bounds.kernel_rule`). What that gives:

* **tf32**: even the best pair (``rho = 1/sqrt(2)``) has ``3.32 * 2^-11 = 1.6e-3 > eps / 2``: one
  tf32 rounding of the operands moves a point by 2^-11 of its length, and the 1/D^3 law triples
  that. No pair in range may use tf32 distances (``tau = inf``);
* **float32 products**: ``gamma`` grows with d; ``tau`` is 0.26 at d = 1, 0.97 at d = 16, and
  infinite from d = 39 on (worst-case accumulation);
* **bfloat16 inputs** (exact operands): ``tau`` = 3e-4 at d = 3, 3e-3 at d = 64, 0.011 at d = 256,
  0.18 at d = 4096.

The products keep two jobs where ``tau`` is infinite: a pair whose lower bound
``sqrt(s^ - gamma S) - u_op (|x~| + |o~|)`` exceeds its Q* is *certainly out of range* and
contributes exactly 0 (no error at all), whatever its ``rho``; and they give ``nearest`` and
``clearance`` for those pairs (relative error ``e_D(rho)``; pairs with ``s^ <= tau_near S``,
:data:`NEAR_TAU`, the cancellation regime, always take the differences). Every other pair -- in
range, or not certainly out -- is recomputed from the differences of the inputs themselves (the
float32 or bfloat16 values as given, not the centred copies): squared in float64 (exact), its
force direction ``x - o`` in float32 (``2^-24``). So in the dense case every pair in range takes
the differences path with tf32 and with float32 products at d >= 39, and the products serve only
to skip the pairs out of range (the share is reported by ``benchmarks/kernel_near_share.py``).
For float32 inputs the kernel subtracts the centre (the obstacles' mean, rounded to float32) from
both operands itself, in float32, so that a common offset does not inflate ``rho``.

**Segments and splits.** The obstacles are given as segments ``[seg_lo[s], seg_hi[s])`` of the
obstacle array, and each block of states visits a list of segments (CSR: ``visit_ptr``,
``visit_seg``). Dense evaluation: the whole array cut into equal segments, every block visits all.
Pruned evaluation: one segment per cluster (obstacles sorted by cluster), each block visits the
clusters alive for any of its states. Grid ``(blocks, SPLITS)``: program ``(i, s)`` takes every
``SPLITS``-th segment of block i's list and writes partial sums (split-K), which the wrapper
reduces; so small B still fills the GPU.

The final caps (``max_force`` on the total, ``max_potential``) are applied by the caller.
Correctness is tested in Triton's CPU interpreter (``TRITON_INTERPRET=1``), whose products are
plain float32: with tf32 the kernel rounds the operands itself (:func:`_tf32`), so the
interpreter multiplies exactly the values the tensor cores multiply and the tests see the
GPU's tf32 errors.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from guidance.kernels.bounds import kernel_rule

__all__ = ["NEAR_TAU", "centred", "pair_sums", "sq_norms"]

NEAR_TAU = {"tf32": 0.25, "tf32x3": 2.0**-6, "ieee": 2.0**-6}
"""The cancellation threshold that keeps ``nearest`` and ``clearance`` accurate for pairs the
expansion serves (``s^ <= tau_near S`` always takes the differences); bfloat16 inputs use the
float32 value. The force and potential follow the bound's rule
(:func:`guidance.kernels.bounds.kernel_rule`)."""


@triton.jit
def _tf32(v):
    """Round float32 values to the nearest tf32 (10 mantissa bits; ties away from zero).

    Tensor cores read float32 operands as tf32 by dropping the low 13 bits (a truncation, biased
    towards zero, which shifts the distances of the dense case the same way). Rounded
    operands are already tf32, so the hardware drops nothing, the product is the exact float32
    product of the rounded values on the GPU and in the interpreter alike, and the norms of the
    same rounded values (:func:`round_tf32`) make ``|x|^2 + |o|^2 - 2 x.o`` the squared
    distance of the rounded points."""
    return ((v.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)


def round_tf32(v: torch.Tensor) -> torch.Tensor:
    """:func:`_tf32` in torch, for float32 tensors (used for the squared norms)."""
    return ((v.contiguous().view(torch.int32) + 4096) & -8192).view(torch.float32)


@triton.jit
def _load_rows(ptr, idx, ok, d0, D, BLOCK_D: tl.constexpr):
    """(len(idx), BLOCK_D) slice of a row-major (., D) array, zeros outside."""
    dims = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + idx.to(tl.int64)[:, None] * D + dims[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _load_centred(ptr, c_ptr, idx, ok, d0, D, BLOCK_D: tl.constexpr, CENTRE: tl.constexpr):
    """:func:`_load_rows` minus the centre ``c`` (float32, the same subtraction as
    :func:`centred` in torch) when ``CENTRE``; the inputs as given otherwise (bfloat16)."""
    v = _load_rows(ptr, idx, ok, d0, D, BLOCK_D)
    if CENTRE:
        dims = d0 + tl.arange(0, BLOCK_D)
        c = tl.load(c_ptr + dims, mask=dims < D, other=0.0)
        v = tl.where(ok[:, None] & (dims < D)[None, :], v - c[None, :], 0.0)
    return v


@triton.jit
def _add_rows(ptr, idx, ok, d0, D, part, BLOCK_D: tl.constexpr):
    """``ptr[idx, d0:d0+BLOCK_D] += part`` (the program owns these rows: no atomics)."""
    dims = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + idx.to(tl.int64)[:, None] * D + dims[None, :]
    m = ok[:, None] & (dims < D)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + part, mask=m)


def _direct_in_interpreter(fn):
    """``fn`` itself on the GPU; under Triton's CPU interpreter, the body the interpreter runs
    for it (its rewritten function), called directly by the kernel.

    The interpreter patches ``triton.language`` when a launch starts and restores it at the end,
    but a device function called from the kernel patches it again at every call
    (``InterpretedFunction.__call__``, Triton 3.x) and never restores it: a third of a launch's
    time at the test sizes. Called directly, the rewritten body runs the same statements on the
    launch's patch. Anything but an ``InterpretedFunction`` with ``rewrite`` is returned as is."""
    if type(fn).__name__ == "InterpretedFunction" and callable(getattr(fn, "rewrite", None)):
        return fn.rewrite()
    return fn


_tf32 = _direct_in_interpreter(_tf32)
_load_rows = _direct_in_interpreter(_load_rows)
_load_centred = _direct_in_interpreter(_load_centred)
_add_rows = _direct_in_interpreter(_add_rows)


@triton.jit
def _field_kernel(
    x_ptr, o_ptr, c_ptr, xn_ptr, on_ptr, q_ptr, eta_ptr, rad_ptr,
    seg_lo_ptr, seg_hi_ptr, visit_ptr, visit_seg_ptr,
    pot_ptr, force_ptr, near_ptr, clear_ptr, active_ptr,
    B, D, rho, pair_cap, pot_cap, inv_tau, tau_near, u_op, gamma, SPLITS,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NEAR_D: tl.constexpr, PREC_X: tl.constexpr, PREC_C: tl.constexpr, ROUND_X: tl.constexpr,
    ROUND_C: tl.constexpr, UPCAST: tl.constexpr, CENTRE: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    split = tl.program_id(1)
    rows = blk * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    out_rows = split * B + rows  # this split's partial outputs
    xn = tl.load(xn_ptr + rows, mask=row_ok, other=0.0)
    x_len = tl.sqrt(xn)  # |x~|, for the operand-rounding bound
    pot = tl.zeros((BLOCK_B,), dtype=tl.float32)
    near = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    clear = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    active = tl.zeros((BLOCK_B,), dtype=tl.int32)
    big = tl.full((BLOCK_B, BLOCK_N), float("inf"), dtype=tl.float32)
    v_lo = tl.load(visit_ptr + blk)
    v_hi = tl.load(visit_ptr + blk + 1)
    for v in range(v_lo + split, v_hi, SPLITS):
        seg = tl.load(visit_seg_ptr + v)
        lo = tl.load(seg_lo_ptr + seg)
        hi = tl.load(seg_hi_ptr + seg)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < hi
            # squared distances from matrix products (tensor cores) of the centred operands
            dot = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                xs = _load_centred(x_ptr, c_ptr, rows, row_ok, d0, D, BLOCK_D, CENTRE)
                os_ = _load_centred(o_ptr, c_ptr, cols, col_ok, d0, D, BLOCK_D, CENTRE)
                if ROUND_X:  # float32 inputs, tf32 products
                    xs = _tf32(xs)
                    os_ = _tf32(os_)
                if UPCAST:  # the interpreter's bf16 products are wrong; bf16 is exact in float32
                    xs = xs.to(tl.float32)
                    os_ = os_.to(tl.float32)
                dot = tl.dot(xs, tl.trans(os_), dot, input_precision=PREC_X)
            on = tl.load(on_ptr + cols, mask=col_ok, other=0.0)
            q = tl.load(q_ptr + cols, mask=col_ok, other=1.0)
            norms = xn[:, None] + on[None, :]
            sq = tl.maximum(norms - 2.0 * dot, 0.0)
            valid = row_ok[:, None] & col_ok[None, :]
            # the near-pair rule (module docstring): the expansion only where its bound holds
            # (s^ >= tau S), or where the pair is certainly beyond its Q*; the old
            # cancellation rule (tau_near) keeps `nearest` accurate for far pairs
            shift = u_op * (x_len[:, None] + tl.sqrt(on)[None, :])
            lower = tl.sqrt(tl.maximum(sq - gamma * norms, 0.0)) * (1.0 - 1e-6) - shift
            out_sure = lower > q[None, :] * (1.0 + 1e-6)  # 1e-6: the float32 roundings here
            accurate = sq * inv_tau >= norms  # s^ >= tau S; inv_tau = 0 when tau = inf
            close = valid & ((sq <= tau_near * norms) | ((out_sure == 0) & (accurate == 0)))
            if tl.sum(close.to(tl.int32)) > 0:
                # exact squared distances of the inputs themselves: float32 differences,
                # exact in float64, summed in float64
                exact = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float64)
                for d0 in range(0, D, NEAR_D):
                    xs = _load_rows(x_ptr, rows, row_ok, d0, D, NEAR_D).to(tl.float64)
                    os_ = _load_rows(o_ptr, cols, col_ok, d0, D, NEAR_D).to(tl.float64)
                    diff = xs[:, None, :] - os_[None, :, :]
                    exact += tl.sum(diff * diff, axis=2)
                sq = tl.where(close, tl.sqrt(exact).to(tl.float32), tl.sqrt(sq))
            else:
                sq = tl.sqrt(sq)
            dist = sq
            eta = tl.load(eta_ptr + cols, mask=col_ok, other=0.0)
            rad = tl.load(rad_ptr + cols, mask=col_ok, other=0.0)
            near = tl.minimum(near, tl.min(tl.where(valid, dist, big), axis=1))
            clear = tl.minimum(clear, tl.min(tl.where(valid, dist - rad[None, :], big), axis=1))
            inside = valid & (dist <= q[None, :])
            active += tl.sum(inside.to(tl.int32), axis=1)
            ratio = tl.maximum(dist / q[None, :], rho)
            gap = tl.where(inside, 1.0 / ratio - 1.0, 0.0)
            u_pref = eta / (q * q)
            pot_pair = tl.minimum(0.5 * u_pref[None, :] * gap * gap, pot_cap)
            pot += tl.sum(tl.where(inside, pot_pair, 0.0), axis=1)
            f_pref = u_pref / q
            mag = tl.where(
                inside, tl.minimum(f_pref[None, :] * gap / (ratio * ratio), pair_cap), 0.0
            )
            on_obstacle = dist == 0.0
            coef = tl.where(on_obstacle, 0.0, mag / tl.where(on_obstacle, 1.0, dist))
            c_far = tl.where(close, 0.0, coef)
            c_near = tl.where(close, coef, 0.0)
            if tl.sum((inside & (close == 0)).to(tl.int32)) > 0:
                # far pairs: F_i += (sum_j c_ij) x~_i - sum_j c_ij o~_j, one product per slice
                c_dot = _tf32(c_far) if ROUND_C else c_far
                c_row = tl.sum(c_dot, axis=1)  # the same weights as the product's
                for d0 in range(0, D, BLOCK_D):
                    xs = _load_centred(x_ptr, c_ptr, rows, row_ok, d0, D, BLOCK_D, CENTRE)
                    os_ = _load_centred(o_ptr, c_ptr, cols, col_ok, d0, D, BLOCK_D, CENTRE)
                    xs = xs.to(tl.float32)
                    os_ = os_.to(tl.float32)
                    if ROUND_C:
                        os_ = _tf32(os_)
                    part = c_row[:, None] * xs - tl.dot(c_dot, os_, input_precision=PREC_C)
                    _add_rows(force_ptr, out_rows, row_ok, d0, D, part, BLOCK_D)
            if tl.sum((inside & close).to(tl.int32)) > 0:
                # near pairs from the differences of the inputs; on an obstacle the fixed
                # direction
                fixed = tl.sum(tl.where(on_obstacle, mag, 0.0), axis=1) / tl.sqrt(D * 1.0)
                for d0 in range(0, D, NEAR_D):
                    xs = _load_rows(x_ptr, rows, row_ok, d0, D, NEAR_D).to(tl.float32)
                    os_ = _load_rows(o_ptr, cols, col_ok, d0, D, NEAR_D).to(tl.float32)
                    diff = xs[:, None, :] - os_[None, :, :]
                    part = tl.sum(c_near[:, :, None] * diff, axis=1) + fixed[:, None]
                    _add_rows(force_ptr, out_rows, row_ok, d0, D, part, NEAR_D)
    tl.store(pot_ptr + out_rows, pot, mask=row_ok)
    tl.store(near_ptr + out_rows, near, mask=row_ok)
    tl.store(clear_ptr + out_rows, clear, mask=row_ok)
    tl.store(active_ptr + out_rows, active, mask=row_ok)


def _interpreted() -> bool:
    """Running in Triton's CPU interpreter (``TRITON_INTERPRET=1``), whose ``tl.dot`` gives
    garbage for bfloat16 operands (Triton 3.8): there bf16 tiles are multiplied as float32."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


def default_blocks(b: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes: small on the CPU interpreter (its cost is per operation), GPU-sized on CUDA
    (not tuned on a GPU yet)."""
    if device.type != "cuda":
        return dict(block_b=16, block_n=16, block_d=16, near_d=16)
    return dict(
        block_b=_pow2_at_least(b, 16, 64),
        block_n=64,
        block_d=64 if dtype == torch.bfloat16 else 32,
        near_d=2,
    )


def split_segments(n: int, pieces: int, block_n: int) -> torch.Tensor:
    """Cut ``[0, n)`` into at most ``pieces`` segments of whole tiles; (S, 2) int32 (lo, hi)."""
    tiles = triton.cdiv(n, block_n)
    per = triton.cdiv(tiles, max(1, min(pieces, tiles))) * block_n
    lo = torch.arange(0, n, per, dtype=torch.int64)
    return torch.stack([lo, torch.clamp(lo + per, max=n)], dim=1).to(torch.int32)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _layout(segments: torch.Tensor, visits: list, n_blocks: int, dev: torch.device) -> tuple:
    """The kernel's segment bounds and per-block visit lists (CSR) on ``dev``, and the longest
    visit list: (seg_lo (S,), seg_hi (S,), visit_ptr (blocks + 1,), visit_seg, most)."""
    if len(visits) != n_blocks:
        raise ValueError(f"visits must list {n_blocks} blocks of states; got {len(visits)}")
    segments = segments.to(device=dev, dtype=torch.int32)
    counts = torch.tensor([len(v) for v in visits], dtype=torch.int64)
    visit_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    visit_seg = torch.cat(
        [torch.as_tensor(v, dtype=torch.int64).reshape(-1).cpu() for v in visits]
        + [torch.zeros(1, dtype=torch.int64)]  # never read; keeps the buffer non-empty
    )
    return (
        segments[:, 0].contiguous(),
        segments[:, 1].contiguous(),
        visit_ptr.to(device=dev, dtype=torch.int32),
        visit_seg.to(device=dev, dtype=torch.int32),
        int(counts.max()),
    )


@functools.lru_cache(maxsize=64)
def _dense_layout(n: int, n_blocks: int, pieces: int, block_n: int, dev: torch.device) -> tuple:
    """:func:`_layout` of ``[0, n)`` cut into ``pieces`` segments that every block visits
    (cached: the dense evaluation at every sampler step reuses it)."""
    segments = split_segments(n, pieces, block_n)
    return _layout(segments, [torch.arange(segments.shape[0])] * n_blocks, n_blocks, dev)


def centred(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``v - c`` in float32 for float32 ``v`` (the kernel's own subtraction, bit for bit); ``v``
    itself for bfloat16 (never centred)."""
    return v - c.to(v.dtype) if v.dtype == torch.float32 else v


def sq_norms(v: torch.Tensor, precision: str = "tf32") -> torch.Tensor:
    """(n,) float32 squared norms of the rows of ``v`` (n, d) as the kernel's products see them
    (rounded to tf32 for float32 ``v`` and ``precision="tf32"``), summed in float64."""
    if v.dtype == torch.float32 and precision == "tf32":
        v = round_tf32(v)
    return v.double().pow(2).sum(dim=1).float()


def pair_sums(
    x: torch.Tensor,
    o: torch.Tensor,
    q: torch.Tensor,
    eta: torch.Tensor,
    radius: torch.Tensor,
    rho: float,
    pair_cap: float,
    pot_cap: float,
    *,
    centre: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    visits: list[torch.Tensor] | None = None,
    precision: str = "tf32",
    splits: int | None = None,
    blocks: dict | None = None,
    o_sqnorm: torch.Tensor | None = None,
    poison: bool = False,
):
    """Pair sums of the field, reduced over splits.

    Args:
        x: (B, d) states and o: (N, d) obstacles, both float32 or both bfloat16, one device,
            as given (the differences path takes them as they are).
        centre: (d,) float32 subtracted (in float32) from both before the products, so that a
            common offset does not make every pair near (float32 only; default zeros).
        q, eta, radius: (N,) per obstacle.
        rho, pair_cap, pot_cap: the reference's clamp ratio and per-pair caps.
        segments: (S, 2) int (lo, hi) ranges of ``o``; default: ``[0, N)`` cut into splits.
        visits: per block of ``blocks["block_b"]`` states, the segment ids it visits (default:
            all segments, for every block).
        precision: product precision for float32 inputs, ``"tf32"``, ``"tf32x3"`` or ``"ieee"``.
        splits: programs per block of states, a runtime argument (no recompilation); default:
            4 per streaming multiprocessor over all blocks on CUDA, 1 on the interpreter.
        o_sqnorm: (N,) :func:`sq_norms` of ``centred(o, centre)`` with this precision
            (default: computed).
        poison: fill the per-state outputs with NaN / -1 first (tests: every entry is written).

    Returns:
        (potential (B,), force (B, d), nearest (B,), clearance (B,), active (B,)): float32 sums
        reduced in float64 (active: int64).
    """
    if precision not in NEAR_TAU:
        raise ValueError(f"precision must be one of {sorted(NEAR_TAU)}; got {precision!r}")
    if x.dtype != o.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x and o must both be float32 or bfloat16; got {x.dtype}, {o.dtype}")
    b, d = x.shape
    n = o.shape[0]
    dev = x.device
    if dev.type != "cuda" and not _interpreted():
        raise ValueError(
            f"the Triton kernel needs CUDA tensors; got {dev.type} (on the CPU it runs only in "
            "Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported): use "
            "RepulsiveField(..., backend='auto') or backend='torch' on the CPU"
        )
    blk = blocks or default_blocks(b, d, x.dtype, dev)
    n_blocks = triton.cdiv(b, blk["block_b"])
    # programs per block of states that fill the device (4 per SM)
    fill = max(1, 4 * _sm_count(dev) // n_blocks) if dev.type == "cuda" else 1
    if segments is None and visits is None:  # dense: the same layout every call, cached
        layout = _dense_layout(n, n_blocks, splits or fill, blk["block_n"], dev)
    else:
        if segments is None:
            segments = split_segments(n, splits or fill, blk["block_n"])
        if visits is None:
            visits = [torch.arange(segments.shape[0])] * n_blocks
        layout = _layout(segments, visits, n_blocks, dev)
    seg_lo, seg_hi, visit_ptr, visit_seg, most = layout
    # the partial force buffer (splits, B, d) stays below 2^26 floats
    splits = max(1, min(splits or fill, most or 1, (1 << 26) // max(1, b * d)))
    x, o = x.contiguous(), o.contiguous()
    f32 = dict(device=dev, dtype=torch.float32)
    use_centre = x.dtype == torch.float32
    c = torch.zeros(d, **f32) if centre is None or not use_centre else centre.to(**f32)
    c = c.contiguous()
    xn = sq_norms(centred(x, c), precision)
    if o_sqnorm is None:
        o_sqnorm = sq_norms(centred(o, c), precision)
    on = o_sqnorm.to(**f32).contiguous()
    q, eta, radius = (v.to(**f32).contiguous() for v in (q, eta, radius))
    pot = torch.empty(splits, b, **f32)
    force = torch.zeros(splits, b, d, **f32)  # accumulated in place
    near = torch.empty(splits, b, **f32)
    clear = torch.empty(splits, b, **f32)
    active = torch.empty(splits, b, dtype=torch.int32, device=dev)
    if poison:
        for v in (pot, near, clear):
            v.fill_(float("nan"))
        active.fill_(-1)
    round_x = x.dtype == torch.float32 and precision == "tf32"
    tau_near = NEAR_TAU[precision if x.dtype == torch.float32 else "ieee"]  # bf16: exact products
    rule = kernel_rule(precision, d, bf16=x.dtype == torch.bfloat16)
    inv_tau = 1 / rule.tau  # 0 for tau = inf: every pair possibly in range takes differences
    u_op = rule.u_op * (1 + 2 * rule.u_op)  # |x - c| <= |x~| (1 + 2 u_op)
    _field_kernel[(n_blocks, splits)](
        x, o, c, xn, on, q, eta, radius,
        seg_lo, seg_hi, visit_ptr, visit_seg,
        pot, force, near, clear, active,
        b, d, float(rho), min(float(pair_cap), 3e38), min(float(pot_cap), 3e38),
        float(inv_tau), float(tau_near), float(u_op), float(rule.gamma), splits,
        BLOCK_B=blk["block_b"], BLOCK_N=blk["block_n"], BLOCK_D=blk["block_d"],
        NEAR_D=blk["near_d"],
        PREC_X="tf32" if x.dtype == torch.bfloat16 else precision,  # bf16: the default, unused
        PREC_C=precision, ROUND_X=round_x, ROUND_C=precision == "tf32",
        UPCAST=x.dtype == torch.bfloat16 and _interpreted(), CENTRE=use_centre,
    )  # fmt: skip
    return (
        pot.double().sum(0),
        force.double().sum(0),
        near.double().amin(0),
        clear.double().amin(0),
        active.long().sum(0),
    )
