r"""The fast CPU path's fused loop (numba): one pass over a block's float64 products gives every
pair's distance and, for the far pairs, the thresholds, the potential and the force coefficient
(:mod:`guidance.kernels.cpu` calls it between its two matrix products).

For states ``i`` and the block's obstacles ``j`` (both centred on ``c``), with the float64
products ``g_ij = x'_i . o'_j`` and ``S_ij = |x'_i|^2 + |o'_j|^2``::

    s_ij = max(S_ij - 2 g_ij, 0)                                  (squared distance)
    near_ij = s_ij <= tau S_ij  and  s_ij <= Q_j^2 (1 + 1e-6)^2 + slack
    D_ij = sqrt(s_ij),   1/r_ij = min(Q_j / D_ij, 1/rho)          (the distance clamp)
    inside_ij = 1/r_ij >= 1  and not near_ij                       (D <= Q*)
    U_i += min(eta_j / (2 Q_j^2) (1/r_ij - 1)^2, pot_cap)                     (inside pairs)
    c_ij = min(eta_j / Q_j^3 (1/r_ij - 1) / r_ij^2, pair_cap) / D_ij           (inside; else 0)

so that the block's force is ``F_i = (sum_j c_ij) x'_i - sum_j c_ij o'_j``, the second sum one
matrix product of ``c`` with the block (the caller's). Near pairs get ``dist = +inf`` (the caller
finds them there and computes them from the differences); every far pair gets its distance, from
which the caller takes the nearest and the clearance. Every step is float64; ``c`` is rounded
to its buffer's dtype once (float32 for float32 work, within the rule's ``e_fixed``:
:func:`guidance.kernels.bounds.cpu_rule`), and the row sums are those of the rounded values, so
that the two terms of ``F_i`` cancel as they should.

A pair with ``s_ij <= tau S_ij`` but certainly beyond its Q* adds nothing to the sums, but its
``s_ij`` may be wrong by ``slack`` (a relative distance error up to ``slack / s_ij``, 1e-4 for a
state 1e-3 from an obstacle at coordinates of 1e3 in float64). Where a row has such pairs, a
second pass over the row marks near (so taken from the differences) each of them that may be
the row's nearest or give its clearance within the block::

    s_ij <= min_k s_ik + 2 e   or   sqrt(s_ij - e) - R_j <= min_k (sqrt(s_ik + e) - R_k)

(``R`` the hard radii, ``e = 1.5 slack`` a bound of ``|s_ij - D_ij^2|``); the others are
certainly neither. Rows without such pairs (the usual case) skip that pass
(:func:`close_extremes`, which the caller runs for the rows whose smallest far distance is
within ``tau (|x'|^2 + max |o'|^2)``, the only ones that can have such pairs).

The per-obstacle numbers come as one (6, n) float64 array ``par``: ``|o'|^2``, Q*,
``(Q (1 + 1e-6))^2``, ``eta/(2 Q^2)``, ``eta/Q^3`` (infinite prefactors replaced by the caps,
as the reference does) and the hard radius, columns ``base .. base + nb - 1``.

The inner loop is compiled with LLVM's fast-math flags ``reassoc`` (sums in any order, which
lets it use vector registers), ``contract`` (fused multiply-adds) and ``nsz`` (the sign of a
zero); not ``nnan``/``ninf``/``arcp``/``afn``, so infinities, square roots and divisions keep
their IEEE meaning. Compiled on first use and cached on disk (numba's ``cache=True``: next to
this file, or in numba's user cache folder when that is read-only); where numba finds no
writable cache folder at all (a read-only install with a read-only home or ``NUMBA_CACHE_DIR``)
the loop is compiled in each process instead. Rows run on numba's threads
(:func:`numba.set_num_threads`, set by the caller to torch's count).
"""

from __future__ import annotations

import contextlib
import math
import threading

import numba
import numpy as np

__all__ = ["close_extremes", "far_pairs"]

_FLAGS = {"reassoc", "contract", "nsz"}


def _njit(**options):
    """``numba.njit(cache=True, **options)``, or without the disk cache where numba has no
    writable folder for it (it raises ``RuntimeError`` "no locator available" then)."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as exc:
            if "no locator available" not in str(exc):
                raise
            return numba.njit(cache=False, **options)(fn)

    return wrap


@_njit(inline="always", nogil=True, error_model="numpy")
def _squared(xi, on_j, g_j):
    """``(S, s)``: ``S = |x'|^2 + |o'|^2`` and the squared distance from the expansion,
    ``s = max(S - 2 x'.o', 0)`` (module docstring; inlined where it is used, with the caller's
    flags)."""
    sj = xi + on_j
    return sj, max(sj - 2.0 * g_j, 0.0)


@_njit(fastmath=_FLAGS, nogil=True, error_model="numpy", boundscheck=False)
def _row(g, dist, c, xi, par, base, tau, slack, inv_rho, pair_cap, pot_cap):
    """One state's pairs of the block (module docstring): fills ``dist`` and ``c`` (nb,) and
    returns (potential, sum of c, inside pairs, near pairs)."""
    pot = 0.0
    csum = 0.0
    n_in = 0
    n_near = 0
    for j in range(g.shape[0]):
        b = base + j
        sj, s = _squared(xi, par[0, b], g[j])
        near = (s <= tau * sj) & (s <= par[2, b] + slack)
        d = math.sqrt(s)
        inv_d = 1.0 / d  # +inf at d = 0: then near, and nothing below is used
        rinv = min(par[1, b] * inv_d, inv_rho)
        inside = (rinv >= 1.0) & (~near)
        gap = rinv - 1.0
        u = min(par[3, b] * gap * gap, pot_cap)
        f = min(par[4, b] * gap * rinv * rinv, pair_cap) * inv_d
        c[j] = f if inside else 0.0
        csum += c[j]
        pot += u if inside else 0.0
        n_in += inside
        n_near += near
        dist[j] = np.inf if near else d
    return pot, csum, n_in, n_near


@_njit(nogil=True, error_model="numpy")
def close_extremes(g, dist, xn, par, base, tau, slack, rows):
    """:func:`_close_extremes` for the block's ``rows`` (int64, those whose smallest far
    distance is within ``tau (|x'|^2 + max |o'|^2)``: the only ones that can have a close pair
    beyond range); returns how many pairs it marked near."""
    marked = 0
    for k in range(rows.shape[0]):
        i = rows[k]
        marked += _close_extremes(g[i], dist[i], xn[i], par, base, tau, slack)
    return marked


@_njit(nogil=True, error_model="numpy")
def _close_extremes(g, dist, xi, par, base, tau, slack):
    """Marks near (``dist = +inf``) the row's close pairs beyond range that may be its nearest
    or give its clearance (module docstring); returns how many."""
    err = 1.5 * slack  # |s^ - D^2| <= gamma S (+ the centring's rounding, far smaller)
    smin = np.inf
    cmin = np.inf
    for j in range(g.shape[0]):
        b = base + j
        s = _squared(xi, par[0, b], g[j])[1]
        smin = min(smin, s)
        cmin = min(cmin, math.sqrt(s + err) - par[5, b])
    marked = 0
    for j in range(g.shape[0]):
        b = base + j
        sj, s = _squared(xi, par[0, b], g[j])
        if s <= tau * sj and dist[j] != np.inf:
            low = math.sqrt(max(s - err, 0.0)) - par[5, b]
            if s <= smin + 2.0 * err or low <= cmin:
                dist[j] = np.inf
                marked += 1
    return marked


_TURNS = threading.Lock()


def far_pairs(g, dist, c, xn, par, base, tau, slack, rho, pair_cap, pot_cap, pot, rowsum, active):
    """The loop of the module docstring over one block, rows in parallel (arguments: those of
    :func:`_far_pairs`).

    On numba's ``workqueue`` threading layer (where neither OpenMP nor TBB is available), which
    aborts the process when two threads launch parallel loops at once, calls from several
    threads take turns; on ``omp`` and ``tbb`` they run together."""
    try:
        shared = numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel loop has run yet: the layer is not chosen
        shared = False
    with contextlib.nullcontext() if shared else _TURNS:
        return _far_pairs(g, dist, c, xn, par, base, tau, slack, rho, pair_cap, pot_cap, pot,
                          rowsum, active)  # fmt: skip


@_njit(parallel=True, nogil=True, error_model="numpy")
def _far_pairs(g, dist, c, xn, par, base, tau, slack, rho, pair_cap, pot_cap, pot, rowsum, active):
    """The loop of the module docstring over one block, rows in parallel.

    Args:
        g: (m, nb) float64 products ``x' . o'``.
        dist: (m, nb) float64 output: far pairs' distances, +inf for near pairs.
        c: (m, nb) output coefficients (float32 or float64).
        xn: (m,) float64 ``|x'|^2``.
        par: (6, n) float64 per-obstacle numbers (module docstring), columns from ``base``.
        tau, slack: the near-pair rule's threshold and the rounding allowed in "maybe in range".
        rho, pair_cap, pot_cap: the distance clamp and the per-pair caps.
        pot, rowsum: (m,) float64, added to; active: (m,) int64, added to.

    Returns:
        (near pairs, inside pairs) of the block.
    """
    m = g.shape[0]
    inv_rho = 1.0 / rho
    n_near = 0
    n_in = 0
    for i in numba.prange(m):
        p, r, a, k = _row(g[i], dist[i], c[i], xn[i], par, base, tau, slack, inv_rho, pair_cap,
                          pot_cap)  # fmt: skip
        pot[i] += p
        rowsum[i] += r
        active[i] += a
        n_near += k
        n_in += a
    return n_near, n_in
