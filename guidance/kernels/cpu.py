r"""The repulsive field's pair sums on the CPU: matrix products for far pairs, exact differences
for near ones, blocked over the obstacles (:class:`guidance.RepulsiveField` with
``backend="cpu"``, and ``backend="auto"`` for CPU states).

For states ``x`` (B, d) and obstacles ``o`` (N, d) (both centred on the obstacles' float64 mean
``c`` when that mean lies farther out than they spread, a common offset; as given otherwise),
each block of ``nb`` obstacles costs:

0. **screening** (float32 work, one hard radius for all): one float32 product of the inputs'
   own float32 values (with an offset: centred in float64, then rounded to float32); when at
   most 1/32 of the block's pairs may be within Q* or be their row's nearest (its error bounded
   by ``a |x~||o~| + b |x~|^2 + c |o~|^2``, :func:`guidance.kernels.bounds.screen_bound`:
   ``a`` about ``2 d 2^-24``, ``b`` and ``c`` a few ``2^-24``), those pairs take
   the differences below and the block is done (sparse sets); otherwise the block, and the
   rest of the group, go on (a group's first screened block is a small one, 1,024 obstacles, so
   that a dense group finds out cheaply);
1. **distances**: one float64 product, ``g = x'.o'`` (``x' = x - c``; with an offset each block
   of obstacles is centred in float64 when it is used; without one, the block's cached float32
   values are widened, the same numbers read at half the bytes), and ``s^ = |x'|^2 + |o'|^2 -
   2 g``;
2. **one fused pass** (:func:`guidance.kernels.cpu_loops.far_pairs`, numba, float64, rows on
   numba's threads) over the block: **the rule** (:func:`guidance.kernels.bounds.cpu_rule`, the
   same derivation as the kernel's): a pair with ``s^ <= tau S`` (``S = |x'|^2 + |o'|^2``) that
   may be within its Q* is *near*: its distance and force come from the differences ``x - o``
   of the inputs, in float64, exactly as the reference computes them (one pass over all of a
   group's near pairs at the end); so is a pair with ``s^ <= tau S`` beyond its Q* that may be
   its row's nearest or give its clearance (its expanded squared distance may be off by
   ``gamma S``). ``tau`` is about 4.7e-4 for float32 work (rho_max = 46) and 2.5e-4 (d = 64)
   to 0.015 (d = 4096) for float64. Every other pair gets its distance (the block's nearest and
   clearance), and, within range, its potential and force coefficient
   ``c_ij = |F_ij| / D_ij`` (float32 for float32, bfloat16 and float16 states; float64 for
   float64 states);
3. **the force** as one more product, ``F += (sum_j c_ij) x' - c @ o'`` (the block's obstacles
   in the work dtype, float32 products over chunks of 256 obstacles summed in float64); a block
   with no pair in range skips it.

Each block's sums are added in float64. With ``float32`` work, the per-pair error is within the
rule's ``eps = 1e-5`` of the pair's scale (:mod:`guidance.kernels.bounds`); the float32 sums
within a block add at most ``nb`` roundings of the sum of the terms (``sqrt(nb)`` typically), the
float64 sums between blocks nothing measurable. Float64 work keeps ``eps = 1e-10``.

**Memory.** The path caches the obstacles in float32 for float32 work (``4 N d`` bytes, the
inputs' own values; none for float64 work) and per-obstacle numbers (about ``72 N`` bytes: a
(6, N) float64 array of norms and parameters, eta/Q^2 and eta/Q^3, two float32 vectors); the
field keeps its float64 copy (``8 N d``). Its working
memory does not grow with N: states are taken ``rows`` at a time (at most 4,096) and obstacles
``nb`` at a time (default: ``2^18 / d`` obstacles, so that a block's float64 copy is 2 MiB,
and ``rows * nb <= 2^20``, from 256 to 8,192; the float32 screening takes ``nbs =
min(8192, 2^20 / rows)`` at a time), so a block's temporaries are about ``30 rows nb`` bytes
(the products, distances and coefficients) or ``12 rows nbs`` (the screening), 30 MiB at most,
plus the block of obstacles in float64 or gathered (``12 nb d`` bytes); near pairs are taken
``2^18 / d`` at a time (their float64 differences and a few arrays of that size: at most
``16 * 2^20`` bytes); the outputs are ``(B, d)`` float64. With
pruning, a group's list of member positions adds at most ``8 N`` bytes (half the set, as int64,
and its concatenation): the one term that grows with N, 8 MiB at N = 1M. Measured at N = 1M: ``benchmarks/field_memory.py``.

**Threads.** Products and elementwise work run on torch's intra-op threads
(``torch.get_num_threads()``, or ``threads`` for the call), the fused pass on as many of numba's
(at most ``numba.config.NUMBA_NUM_THREADS``, the CPUs numba saw when it was imported).

**Pruning.** With clusters (``prune=True``), states are taken 16 at a time; each group evaluates
the members of the clusters alive for any of its states (the exact bound of
:mod:`obstacles.clusters`), or every obstacle when those cover more than half of the set.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from guidance.kernels.bounds import cpu_rule, screen_bound

__all__ = [
    "MAX_BLOCK",
    "check_block",
    "check_threads",
    "cpu_pair_sums",
    "extent",
    "prepare",
    "screen_values",
    "threads_of",
]

MAX_BLOCK = 1 << 24
"""The largest block (obstacles at a time) the CPU path accepts."""
_ROWS = 4096
_GROUP = 16  # states per group when pruning
_PROBE = 1024  # obstacles in a group's first screened block


def check_block(block) -> int | None:
    """``block`` (obstacles per block) as an int, or None for the default; ``ValueError`` for
    anything that cannot work (not an integer, below 1, above :data:`MAX_BLOCK`)."""
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, int):
        raise ValueError(
            f"block must be a whole number of obstacles per block (or None for the default); "
            f"got {block!r}"
        )
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(
            f"block must be in [1, {MAX_BLOCK}] obstacles; got {block} (None picks one that keeps "
            "the temporaries under 30 MiB)"
        )
    return block


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """``threads`` as an int, or None (torch's current setting); ``ValueError`` unless it is an
    integer from 1 to the CPUs this process may use."""
    if threads is None:
        return None
    cpus = _available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise ValueError(
            f"threads must be an integer from 1 to {cpus} (the CPUs this process may use), or "
            f"None for torch's setting ({torch.get_num_threads()}); got {threads!r}"
        )
    return threads


@contextmanager
def threads_of(threads: int | None):
    """Run the block with ``threads`` torch threads (None: unchanged), restoring the setting."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Out:
    """Float64 accumulators of one evaluation."""

    def __init__(self, b: int, d: int):
        f64 = torch.float64
        self.pot = torch.zeros(b, dtype=f64)
        self.force = torch.zeros(b, d, dtype=f64)
        self.near = torch.full((b,), torch.inf, dtype=f64)
        self.clear = torch.full((b,), torch.inf, dtype=f64)
        self.active = torch.zeros(b, dtype=torch.long)


def cpu_pair_sums(
    e: torch.Tensor,
    cache: dict,
    rho: float,
    pair_cap: float,
    pot_cap: float,
    *,
    block: int | None = None,
    groups: list | None = None,
):
    """Pair sums of the field for states ``e`` (B, d) float64 (the inputs' exact values).

    Args:
        cache: from :func:`prepare` (obstacles, centred copy, parameters, the rule).
        rho, pair_cap, pot_cap: the reference's clamp ratio and per-pair caps.
        block: obstacles per block (default: ``min(2^18 / d, 2^20 / rows)``, from 256 to
            8,192: a block's float64 copy is at most 2 MiB, its temporaries at most 28 MiB).
        groups: for pruning, an iterable of ``(rows (b,), obstacle positions (n,) or None for
            every obstacle)``, taken one at a time; default: every state against every obstacle.

    Returns:
        (potential (B,), force (B, d), nearest (B,), clearance (B,), active (B,)), float64 sums
        (active int64); the caller applies the total caps.
    """
    import numba

    b, d = e.shape
    out = _Out(b, d)
    n = cache["o64"].shape[0]
    # numba's OpenMP layer shares the OpenMP runtime's thread count with torch: its first launch
    # and numba.set_num_threads both change what torch.get_num_threads() reports. Both counts
    # are read before numba is touched and restored after the call (the caller's torch setting
    # survives the call, the first one in the process included)
    torch_threads = torch.get_num_threads()
    numba_threads = numba.get_num_threads()  # may start numba's threads, changing torch's count
    numba.set_num_threads(min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(torch_threads)  # the products of this call run on the caller's count
    try:
        if groups is None:
            for r0 in range(0, b, _ROWS):
                rows = torch.arange(r0, min(b, r0 + _ROWS))
                _sums(e, rows, None, cache, rho, pair_cap, pot_cap, block, out)
        else:
            for rows, members in groups:
                every = members is None or members.numel() == n
                _sums(e, rows, None if every else members, cache, rho, pair_cap, pot_cap, block,
                      out)  # fmt: skip
    finally:
        numba.set_num_threads(numba_threads)
        torch.set_num_threads(torch_threads)
    return out.pot, out.force, out.near, out.clear, out.active


def extent(emb: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``(mean, max |emb - mean|, max |emb|)`` of obstacles ``emb`` (N, d) float64: the mean (d,)
    and the largest coordinate of the set centred on it and as given, from per-coordinate
    minima and maxima (rounding is monotone, so ``max_i fl(e_ik - c_k) = fl(max_i e_ik - c_k)``:
    the same numbers as the centred copy would give, without an (N, d) temporary)."""
    mean = emb.mean(dim=0)
    lo, hi = emb.amin(dim=0), emb.amax(dim=0)  # (torch.aminmax is 5x slower along dim 0)
    centred = max(float((hi - mean).max()), float((mean - lo).max()))
    return mean, centred, max(float(hi.abs().max()), float(lo.abs().max()))


def prepare(emb: torch.Tensor, q, eta_q2, eta_q3, radius, work: torch.dtype, extent_=None) -> dict:
    """The state-independent inputs of :func:`cpu_pair_sums` for obstacles ``emb`` (N, d)
    float64 with per-obstacle ``q``, ``eta/Q^2``, ``eta/Q^3`` and ``radius`` (float64), for work
    in ``work`` (float32 or float64); ``extent_``: :func:`extent` of ``emb`` when the caller has
    it.

    The obstacles are centred on their mean only when that mean lies farther from the origin
    than they spread around it (a common offset, which would inflate every pair's rho); then
    each block is centred when it is used. Otherwise the products take the obstacles as they
    are. Cached: the obstacles in float32 for float32 work (the inputs' own values, centred and
    rounded with an offset), and per-obstacle numbers (squared norms, parameters). One pass over
    the set, 16,384 obstacles at a time (no (N, d) float64 temporary)."""
    mean, spread, _ = extent_ if extent_ is not None else extent(emb)
    offset = float(mean.abs().max()) > spread
    centre = mean if offset else torch.zeros_like(mean)
    # the (6, N) per-obstacle numbers of cpu_loops.far_pairs, written once: |o'|^2, Q*,
    # (Q (1 + 1e-6))^2, then eta/(2 Q^2) and eta/Q^3 for the call's caps (_parameters), and the
    # hard radius; the cache's squared norms, Q*, ... are views of its rows
    par = torch.empty(6, emb.shape[0], dtype=torch.float64)
    on = par[0]
    par[1] = q
    torch.square(q * (1 + 1e-6), out=par[2])
    par[5] = radius
    # float32 screening for float32 work (bounds.screen_bound): the obstacles' float32 values
    # (exact copies of the set's), centred in float64 and rounded to float32 with an offset
    screen = None
    o32 = raw = None
    if work == torch.float32:
        try:
            screen = screen_bound(emb.shape[1])
        except ValueError:  # d >= 2^23: the bound does not hold; no screening (screen stays None)
            pass
    if screen is not None:
        o32 = torch.empty(emb.shape, dtype=torch.float32)
        raw = torch.empty(emb.shape[0], dtype=torch.float64)  # |o~|^2 of the float32 values
    for s in range(0, emb.shape[0], 1 << 14):
        block = emb[s : s + (1 << 14)] - centre if offset else emb[s : s + (1 << 14)]
        on[s : s + (1 << 14)] = torch.einsum("ij,ij->i", block, block)  # 5x .pow(2).sum(1)
        if o32 is not None:
            o32[s : s + (1 << 14)] = block
            wide = o32[s : s + (1 << 14)].double()
            raw[s : s + (1 << 14)] = torch.einsum("ij,ij->i", wide, wide)
    on32 = reach32 = None
    omax32 = 0.0
    if screen is not None:
        on32 = raw.to(torch.float32)
        omax32 = float(raw.max()) ** 0.5
        reach32 = ((q.square() * (1 + 8e-6) + screen[2] * raw) * (1 + 1e-6)).to(torch.float32)

    def one(v):  # a scalar when every obstacle has the same value (a cheaper broadcast)
        return float(v[0]) if bool((v == v[0]).all()) else None

    return dict(
        work=work,
        centre=centre,
        offset=offset,
        o32=o32,  # the float32 values the screening takes (centred with an offset)
        on32=on32,
        omax32=omax32,
        reach32=reach32,
        screen=screen,  # (a, b, c) of bounds.screen_bound, or None: no screening
        o64=emb,
        par=par,
        caps=None,  # the caps par's rows 3 and 4 hold
        on=on,  # float64 squared norms of the centred obstacles
        on_max=float(on.max()),
        q64=par[1],
        qq=par[2],
        rad0=one(radius),
        rad64=par[5],
        eta_q2=eta_q2,
        eta_q3=eta_q3,
        rule=cpu_rule(emb.shape[1], work == torch.float64),
    )


def _sums(e, rows, members, cache, rho, pair_cap, pot_cap, block, out):
    """One group: states ``e[rows]`` against the obstacles at ``members`` (None: all)."""
    from guidance.kernels.cpu_loops import close_extremes, far_pairs

    work = cache["work"]
    d = e.shape[1]
    m = rows.numel()
    xc = e[rows] - cache["centre"]
    xn = xc.pow(2).sum(dim=1)
    n = cache["o64"].shape[0] if members is None else members.numel()
    nb = block or max(256, min(8192, (1 << 18) // d, (1 << 20) // max(1, m)))
    rule = cache["rule"]
    # the rounding of s^ (gamma S) and of float32 thresholds, allowed in "maybe in range"
    slack = rule.gamma * (float(xn.max()) + cache["on_max"])
    acc = dict(
        pot=torch.zeros(m, dtype=torch.float64),
        force=torch.zeros(m, d, dtype=torch.float64),
        active=torch.zeros(m, dtype=torch.long),
    )
    rowsum = torch.zeros(m, dtype=torch.float64)
    xn_np = xn.numpy()
    dist = coef = None
    par = _parameters(cache, pair_cap, pot_cap)
    near_g = torch.full((m,), torch.inf, dtype=torch.float64)
    clear_g = torch.full((m,), torch.inf, dtype=torch.float64)
    near_pairs = []
    # float32 screening (float32 work, one hard radius): the float32 values of prepare(); a
    # group whose first screened block is dense stops screening (it would only add work)
    screen = cache["screen"] is not None and cache["rad0"] is not None
    if screen:
        # the states centred like the obstacles, in float64, rounded to float32 (exact without
        # an offset: the states are float32, or half, values); the bound of
        # bounds.screen_bound, err <= a |x~||o~| + b |x~|^2 + c |o~|^2, with max |o~| for |o~|
        # in the rows' parts
        x32 = xc.to(torch.float32)
        xn64 = x32.double().pow(2).sum(dim=1)
        a, b, c = cache["screen"]
        err = a * xn64.sqrt() * cache["omax32"] + b * xn64  # per row, c |o~|^2 in reach32
        row_thr = (err * (1 + 1e-6)).to(torch.float32)
        near_slack = (2 * (err + c * cache["omax32"] ** 2) * (1 + 1e-6)).to(torch.float32)
        xn32 = xn64.to(torch.float32)
    # screened blocks are long (float32 products only: nbs obstacles, the first one _PROBE); the
    # block where the screen fails (a dense group) and the rest of the group take the float64
    # path, nb obstacles at a time
    nbs = nb if block else max(nb, min(8192, (1 << 20) // max(1, m)))
    s, first = 0, True
    while s < n:
        if screen:
            stop = min(n, s + (min(nbs, _PROBE) if first else nbs))
            first = False
            at = slice(s, stop) if members is None else members[s:stop]
            pairs = _screen(x32, xn32, row_thr, near_slack, at, cache, m * (stop - s))
            if pairs is not None:  # every pair that may matter, few: exact differences
                i, j = pairs
                if i.numel():
                    near_pairs.append((i, j + s if members is None else at[j]))
                s = stop
                continue
            screen = False
        stop = min(n, s + nb)
        at = slice(s, stop) if members is None else members[s:stop]
        o32 = None if cache["o32"] is None or cache["offset"] else cache["o32"][at]  # exact
        if cache["offset"]:
            occ = cache["o64"][at] - cache["centre"]  # this block, centred (float64)
        elif o32 is not None:
            occ = o32.double()  # the same values, read at half the bytes
        else:
            occ = cache["o64"][at]
        g = xc @ occ.T  # x'.o', float64 (m, width)
        width = g.shape[1]
        if dist is None or dist.shape[1] != width:
            dist = torch.empty(m, width, dtype=torch.float64)
            coef = torch.empty(m, width, dtype=work)
        par_b, base = (par, s) if members is None else (par[:, at].contiguous(), 0)
        n_near, n_in = far_pairs(
            g.numpy(), dist.numpy(), coef.numpy(), xn_np, par_b.numpy(), base, rule.tau, slack,
            rho, pair_cap, pot_cap, acc["pot"].numpy(), rowsum.numpy(), acc["active"].numpy(),
        )  # fmt: skip
        dmin = dist.amin(dim=1)  # the far pairs' nearest (+inf where all are near)
        # rows that may have a close pair beyond range (s^ <= tau S, not near): its expanded
        # distance may be off by gamma S / s^, so those that may be the row's nearest or give
        # its clearance are marked near too (cpu_loops' docstring)
        close = (dmin.square() <= rule.tau * (xn + cache["on_max"])).nonzero().flatten()
        if close.numel():
            marked = close_extremes(
                g.numpy(), dist.numpy(), xn_np, par_b.numpy(), base, rule.tau, slack,
                close.numpy(),
            )  # fmt: skip
            if marked:
                n_near += marked
                dmin = dist.amin(dim=1)
        torch.minimum(near_g, dmin, out=near_g)
        if cache["rad0"] is not None:
            torch.minimum(clear_g, dmin - cache["rad0"], out=clear_g)
        else:
            torch.minimum(clear_g, (dist - cache["rad64"][at]).amin(dim=1), out=clear_g)
        if n_near:
            i, j = torch.isinf(dist).nonzero(as_tuple=True)
            near_pairs.append((i, j + s if members is None else at[j]))
        if n_in:
            # the cached float32 values (the same numbers), else the block in the work dtype
            ow = o32 if o32 is not None else occ.to(work)
            acc["force"] -= _chunked_product(coef, ow)
        s = stop
    acc["force"] += xc * rowsum[:, None]  # (sum_j c_ij) x'_i, for every block at once
    out.pot.index_add_(0, rows, acc["pot"])
    out.force.index_add_(0, rows, acc["force"])
    out.active.index_add_(0, rows, acc["active"])
    out.near[rows] = torch.minimum(out.near[rows], near_g)
    out.clear[rows] = torch.minimum(out.clear[rows], clear_g)
    if near_pairs:  # one pass over all of them (each call has a fixed cost)
        i = torch.cat([p[0] for p in near_pairs])
        j = torch.cat([p[1] for p in near_pairs])
        _near(e, rows[i], j, cache, rho, pair_cap, pot_cap, out, d)


def _screen(x32, xn32, row_thr, near_slack, at, cache, size):
    """Float32 screening of one block: the pairs ``(i, j)`` that may be within Q* or may be
    the nearest of their row, when they are at most 1/32 of the block (else None: the block
    takes the float64 path).

    The float32 expansion ``s32`` is within ``err_ij = a |x~_i||o~_j| + b |x~_i|^2 + c |o~_j|^2``
    of D^2 (:func:`guidance.kernels.bounds.screen_bound`); a pair with ``s32 > Q^2 (1 + 8e-6) +
    err_ij`` is certainly out of range, and one with ``s32 > min_row(s32) + 2 max_j err_ij`` is
    certainly not its row's nearest (``row_thr`` and ``reach32`` hold the row's and the
    obstacle's parts of ``err``, ``near_slack`` twice its row maximum)."""
    s32 = screen_values(x32, xn32, cache["o32"][at], cache["on32"][at])
    maybe = s32 <= cache["reach32"][at][None, :] + row_thr[:, None]
    rowmin = s32.amin(dim=1)
    maybe |= s32 <= (rowmin + near_slack)[:, None]
    count = int(maybe.sum())
    if count > max(64, size // 32):
        return None
    return maybe.nonzero(as_tuple=True)


def screen_values(x32, xn32, o32, on32) -> torch.Tensor:
    """The screening's float32 squared distances ``(|o~|^2 - 2 x~.o~) + |x~|^2`` (m, n) of
    float32 vectors ``x32`` (m, d), ``o32`` (n, d) with their float32 squared norms ``xn32``
    (m,), ``on32`` (n,), in the order :func:`guidance.kernels.bounds.screen_bound` bounds.

    The product is taken alone, not as ``addmm(on32, x32, o32.T)``: BLAS adds a product into
    its output block by block over d, so each partial sum would be rounded at the size of
    ``|o~|^2`` (an error ``gamma_d |o~|^2``, the very term the bound keeps out)."""
    return (x32 @ o32.T).mul_(-2).add_(on32[None, :]).add_(xn32[:, None])


_K = 256  # the longest float32 summation chain of the force product


def _chunked_product(c: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``c @ o`` (m, n) x (n, d) as float64, from products over chunks of at most :data:`_K`
    obstacles summed in float64 (a BLAS product sums its whole length in one float32 chain:
    3,000 obstacles gave 3.6e-5 of the force scale, chunks of 256 keep it at about 5e-6)."""
    m, n = c.shape
    full = n - n % _K
    out = torch.zeros(m, o.shape[1], dtype=torch.float64)
    if full:
        k = full // _K
        cc = c[:, :full].reshape(m, k, _K).transpose(0, 1)  # (k, m, K), a strided view
        out += torch.bmm(cc, o[:full].reshape(k, _K, -1)).sum(dim=0, dtype=torch.float64)
    if full < n:
        out += (c[:, full:] @ o[full:]).double()
    return out


def _parameters(cache: dict, pair_cap: float, pot_cap: float) -> torch.Tensor:
    """The (6, N) float64 per-obstacle numbers of :func:`guidance.kernels.cpu_loops.far_pairs`
    (written by :func:`prepare`): ``|o'|^2``, Q*, ``(Q (1 + 1e-6))^2``, ``eta/(2 Q^2)``,
    ``eta/Q^3`` (an infinite prefactor replaced by its cap as the reference does; rows 3 and 4
    rewritten when the caps change, which they do not for one field) and the hard radius."""
    par = cache["par"]
    if cache["caps"] != (pair_cap, pot_cap):
        torch.nan_to_num(0.5 * cache["eta_q2"], posinf=pot_cap, out=par[3])
        torch.nan_to_num(cache["eta_q3"], posinf=pair_cap, out=par[4])
        cache["caps"] = (pair_cap, pot_cap)
    return par


def _near(e, rows, cols, cache, rho, pair_cap, pot_cap, out, d):
    """Near pairs ``(rows[k], cols[k])`` from the differences of the inputs, in float64, as the
    reference computes them (chunks of ``2^18 / d`` pairs)."""
    step = max(1, (1 << 18) // max(1, d))
    default_dir = torch.full((d,), d**-0.5, dtype=torch.float64)
    for s in range(0, rows.numel(), step):
        r, c = rows[s : s + step], cols[s : s + step]
        diff = e[r] - cache["o64"][c]
        dist = torch.linalg.vector_norm(diff, dim=1)
        q = cache["q64"][c]
        _scatter_min(out.near, r, dist)
        _scatter_min(out.clear, r, dist - cache["rad64"][c])
        inside = dist <= q
        out.active.index_add_(0, r, inside.long())
        ratio = torch.clamp(dist / q, min=rho)
        gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))
        u_half = 0.5 * cache["eta_q2"][c]
        pot = torch.clamp(u_half * gap**2, max=pot_cap)
        pot = torch.where((u_half == 0) | ~inside, 0.0, pot)
        out.pot.index_add_(0, r, pot)
        f_pref = cache["eta_q3"][c]
        mag = torch.clamp(f_pref * gap / ratio**2, max=pair_cap)
        mag = torch.where((f_pref == 0) | ~inside, 0.0, mag)
        safe = torch.where(dist > 0, dist, torch.ones_like(dist))
        unit = torch.where((dist > 0)[:, None], diff / safe[:, None], default_dir)
        out.force.index_add_(0, r, mag[:, None] * unit)


def _scatter_min(dst: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
    dst.scatter_reduce_(0, idx, v, reduce="amin", include_self=True)
