"""The fast CPU path of the repulsive field (guidance/kernels/cpu.py) against the float64
reference: the bound of guidance/kernels/bounds.py per state, dense and sparse, pruned, near
pairs with a common offset, states on obstacles, caps; the choice of ``backend="auto"``; bad
block sizes, thread counts and dtypes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guidance import RepulsiveField
from guidance.kernels.dispatch import AUTO_CPU_MIN
from obstacles import ObstacleSet

RHO = 0.05


def _scales(x64, oset, eps):
    """Per state: sum_j (U_ij + eta/(2Q^2)) and sum_j (|F_ij| + eta/Q^3) over the pairs within
    (1 + eps) Q* (the bound's scales, float64)."""
    o = torch.from_numpy(oset.embeddings.astype(np.float64))
    q = torch.from_numpy(oset.q_star)
    eta = torch.from_numpy(oset.eta)
    dist = torch.cdist(x64, o, compute_mode="donot_use_mm_for_euclid_dist")
    inside = dist <= q * (1 + eps)
    r = torch.clamp(dist / q, min=RHO)
    g = torch.clamp(1 / r - 1, min=0)
    u = 0.5 * eta / q**2 * (g**2 + 1)
    f = eta / q**3 * (g / r**2 + 1)
    return torch.where(inside, u, 0).sum(1), torch.where(inside, f, 0).sum(1)


def _check(oset, x64, dtype, eps, **kw):
    ref = RepulsiveField(oset, backend="torch", **kw).evaluate(x64)
    field = RepulsiveField(oset, backend="cpu", **kw)
    out = field.evaluate(x64.to(dtype))
    for v in (out.potential, out.force, out.nearest, out.clearance):
        assert v.dtype == dtype and bool(torch.isfinite(v).all())
    u_s, f_s = _scales(x64, oset, eps)
    du = (out.potential.double() - ref.potential).abs()
    df = (out.force.double() - ref.force).norm(dim=1)
    assert bool((du <= eps * u_s).all()), (du / u_s).max()
    assert bool((df <= eps * f_s).all()), (df / f_s).max()
    assert torch.allclose(out.nearest.double(), ref.nearest, rtol=1e-6, atol=0)
    assert torch.allclose(out.clearance.double(), ref.clearance, rtol=1e-5, atol=1e-6)
    return field, out, ref


def _blobs(rng, n, d, b, offset=0.0):
    centres = rng.normal(scale=10.0, size=(20, d))
    o = centres[rng.integers(0, 20, n)] + rng.normal(scale=0.3, size=(n, d)) + offset
    x = o[rng.integers(0, n, b)] + rng.normal(scale=0.3, size=(b, d))
    return o, x


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("quantile", [0.5, 0.01])
def test_cpu_path_keeps_the_bound(dtype, eps, quantile):
    rng = np.random.default_rng(0)
    o, x = _blobs(rng, 3000, 24, 37)
    dist = np.linalg.norm(x[:, None] - o[None], axis=2)
    q = np.quantile(dist, quantile) * rng.uniform(0.8, 1.2, len(o))
    oset = ObstacleSet.from_embeddings(o, q_star=q, eta=rng.uniform(0.5, 2, len(o)), radius=0.1)
    x64 = torch.from_numpy(x).to(dtype).double()
    _check(oset, x64, dtype, eps, max_force=1e30)
    # odd block sizes (a block of one obstacle included) give the same sums
    _check(oset, x64, dtype, eps, max_force=1e30, block=7)


def test_cpu_path_near_pairs_with_a_common_offset_and_states_on_obstacles():
    """With an offset of 1e3 the expansion cancels for near pairs: they take the differences;
    a state exactly on an obstacle gets the fixed direction, as in the reference."""
    rng = np.random.default_rng(1)
    o, x = _blobs(rng, 2000, 16, 20, offset=1e3)
    oset = ObstacleSet.from_embeddings(o, q_star=0.8, radius=np.linspace(0.0, 0.2, len(o)))
    x[:4] = oset.embeddings[:4]  # exactly on obstacles (float32 values)
    x[4:8] = oset.embeddings[4:8] + 1e-4
    for dtype, eps in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        x64 = torch.from_numpy(x).to(dtype).double()
        _check(oset, x64, dtype, eps, max_force=1e30)


def test_cpu_path_with_pruning_and_caps():
    rng = np.random.default_rng(2)
    o, x = _blobs(rng, 4000, 12, 70)
    oset = ObstacleSet.from_embeddings(o, q_star=1.0, eta=rng.uniform(0.1, 3, len(o)))
    x64 = torch.from_numpy(x).float().double()
    field, out, ref = _check(oset, x64, torch.float32, 1e-5, prune=True, max_force=1e30)
    assert field.last_evaluated < len(oset)  # pruning skipped clusters
    assert torch.equal(out.active, ref.active)
    # per-pair and total caps: a small potential cap and a force cap bind
    _check(oset, x64, torch.float32, 1e-5, max_force=5.0, max_potential=2.0)


def test_auto_picks_the_cpu_path_for_large_sets_only():
    big = ObstacleSet.from_embeddings(
        np.random.default_rng(3).normal(size=(AUTO_CPU_MIN, 4)), q_star=1.0
    )
    small = ObstacleSet.from_embeddings(np.zeros((3, 4)), q_star=1.0)
    x = torch.zeros(2, 4, dtype=torch.float64)
    assert RepulsiveField(big).kernel.cpu_usable(x, torch.float32)
    assert RepulsiveField(big).kernel.cpu_usable(x, torch.float64)
    assert not RepulsiveField(small).kernel.cpu_usable(x, torch.float32)  # the reference
    fewer = ObstacleSet.from_embeddings(np.zeros((AUTO_CPU_MIN // 4 - 1, 4)), q_star=1.0)
    assert not RepulsiveField(fewer).kernel.cpu_usable(x, torch.float32)
    assert not RepulsiveField(big, backend="torch").kernel.cpu_usable(x, torch.float32)
    # auto on a large set gives the CPU path's values, within the bound of the reference
    xs = torch.randn(5, 4)
    auto = RepulsiveField(big).evaluate(xs)
    cpu = RepulsiveField(big, backend="cpu").evaluate(xs)
    assert torch.equal(auto.force, cpu.force)


def test_half_precision_states_are_summed_in_float32():
    """The documented fallback: bfloat16 and float16 states convert exactly to float32."""
    rng = np.random.default_rng(4)
    o, x = _blobs(rng, 1500, 8, 9)
    oset = ObstacleSet.from_embeddings(o, q_star=2.0)
    field = RepulsiveField(oset, backend="cpu")
    for half in (torch.bfloat16, torch.float16):
        xh = torch.from_numpy(x).to(half)
        out = field.evaluate(xh)
        same = field.evaluate(xh.float())
        assert out.force.dtype == half
        assert torch.equal(out.force, same.force.to(half))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(block=0), "block must be in"),
        (dict(block=-3), "block must be in"),
        (dict(block=2.5), "block must be a whole number"),
        (dict(block=True), "block must be a whole number"),
        (dict(threads=0), "threads must be an integer"),
        (dict(threads=10**6), "threads must be an integer"),
        (dict(threads="2"), "threads must be an integer"),
        (dict(backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_block_threads_backend(kw, match):
    oset = ObstacleSet.from_embeddings(np.zeros((2, 3)), q_star=1.0)
    with pytest.raises(ValueError, match=match):
        RepulsiveField(oset, **kw)


def test_threads_are_set_for_the_call_and_restored():
    import numba

    oset = ObstacleSet.from_embeddings(np.random.default_rng(5).normal(size=(1200, 6)), q_star=1.0)
    # read numba's count first: its first read starts numba's threads, which may change what
    # torch reports (the next test checks that the field's own first start does not)
    numba_before = numba.get_num_threads()
    before = torch.get_num_threads()
    x = torch.randn(3, 6)
    one = RepulsiveField(oset, backend="cpu", threads=1).evaluate(x)
    assert torch.get_num_threads() == before
    # numba's count (the fused loop's threads) too: it stayed at 1 for the rest of the process
    assert numba.get_num_threads() == numba_before
    assert torch.allclose(one.force, RepulsiveField(oset, backend="cpu").evaluate(x).force)


def test_the_first_call_in_a_process_keeps_torchs_thread_count():
    """numba's OpenMP layer shares the OpenMP thread count with torch: the first start of its
    threads set torch's count to numba's (every CPU), so a process that had asked torch for one
    thread ran on all of them after its first field evaluation. A fresh process, one torch
    thread, the fast path's first call (with and without ``threads``): torch's count during the
    call's products and after it."""
    code = (
        "import numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "from guidance import RepulsiveField\n"
        "import guidance.kernels.cpu as cpu\n"
        "from obstacles import ObstacleSet\n"
        "during, inner = [], cpu._sums\n"
        "def spy(*a, **k):\n"
        "    during.append(torch.get_num_threads())\n"
        "    return inner(*a, **k)\n"
        "cpu._sums = spy\n"
        "o = ObstacleSet.from_embeddings(np.random.default_rng(5).normal(size=(1200, 6)), "
        "q_star=1.0)\n"
        "RepulsiveField(o, backend='cpu').evaluate(torch.randn(3, 6))\n"
        "a = torch.get_num_threads()\n"
        "RepulsiveField(o, backend='cpu', threads=1).evaluate(torch.randn(3, 6))\n"
        "print('threads', a, torch.get_num_threads(), 'during', sorted(set(during)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env["NUMBA_NUM_THREADS"] = "2"  # more than the one thread torch is asked for
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "threads 1 1 during [1]" in run.stdout, run.stdout  # the products ran on 1 too


def test_outside_the_range_the_reference_runs():
    """States beyond the float32-safe range (centred coordinates above 1e15): the reference,
    finite outputs."""
    oset = ObstacleSet.from_embeddings(np.random.default_rng(6).normal(size=(1100, 3)), q_star=1.0)
    field = RepulsiveField(oset, backend="cpu")
    x = torch.tensor([[1e20, 0.0, 0.0]], dtype=torch.float64)
    assert not field.kernel.cpu_usable(x, torch.float64)
    out = field.evaluate(x)
    assert bool(torch.isfinite(out.nearest).all())


def test_long_blocks_keep_the_bound():
    """3,000 obstacles in one block, dense: one float32 product over the whole block summed its
    3,000 terms in one chain (3.6e-5 of the force scale); chunks of 256 keep the bound."""
    rng = np.random.default_rng(7)
    o, x = _blobs(rng, 3000, 8, 5)
    dist = np.linalg.norm(x[:, None] - o[None], axis=2)
    q = np.median(dist) * rng.uniform(0.8, 1.2, len(o))
    oset = ObstacleSet.from_embeddings(o, q_star=q, eta=rng.uniform(0.5, 2, len(o)), radius=0.5)
    x64 = torch.from_numpy(x).float().double()
    _check(oset, x64, torch.float32, 1e-5, max_force=1e30, block=4096)


def test_threads_calling_at_once_on_numbas_workqueue_layer():
    """numba's workqueue layer (what numba falls back to without OpenMP or TBB) aborts the process
    when two threads launch parallel loops at once: the fused pass takes turns there, and every
    thread gets the one-thread answer."""
    code = """
import threading, numpy as np, torch
from guidance import RepulsiveField
from obstacles import ObstacleSet
o = np.random.default_rng(0).normal(size=(20000, 8)).astype(np.float32)
f = RepulsiveField(ObstacleSet.from_embeddings(o, q_star=4.0), backend="cpu")
x = torch.from_numpy(o[:32]).float() + 0.1
ref = f.evaluate(x).force
bad = []
def work():
    for _ in range(5):
        bad.append(not torch.equal(f.evaluate(x).force, ref))
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
import numba
print(numba.threading_layer(), sum(bad), len(bad))
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["workqueue", "0", "20"]


def test_cpu_path_runs_where_numba_has_no_writable_cache_folder():
    """A read-only install with a read-only home (or NUMBA_CACHE_DIR): numba finds no folder
    for ``cache=True`` and raised RuntimeError("no locator available") on importing the loop;
    the loop is then compiled without the disk cache. Simulated in a fresh process by making
    every cache folder refuse writing, as a read-only file system does."""
    code = (
        "import numba.core.caching as c\n"
        "def refuse(self):\n"
        "    raise OSError(30, 'Read-only file system')\n"
        "c._CacheLocator.ensure_cache_path = refuse\n"
        "import numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "from guidance import RepulsiveField\n"
        "from obstacles import ObstacleSet\n"
        "o = np.random.default_rng(0).normal(size=(1100, 3))\n"
        "oset = ObstacleSet.from_embeddings(o, q_star=1.0)\n"
        "x = torch.from_numpy(o[:2] + 0.1)\n"
        "cpu = RepulsiveField(oset, backend='cpu').evaluate(x)\n"
        "ref = RepulsiveField(oset, backend='torch').evaluate(x)\n"
        "assert torch.allclose(cpu.force, ref.force, rtol=1e-9), (cpu.force, ref.force)\n"
        "print('evaluated')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0 and "evaluated" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("per_obstacle_radius", [False, True])
def test_nearest_of_a_close_obstacle_beyond_its_range(per_obstacle_radius):
    """A state 1e-3 from an obstacle whose Q* is 1e-6, at coordinates of 1e3 (spread, no common
    offset): the pair is close (``s^ <= tau S``) but out of range, so it adds nothing to the
    sums; its distance from the expansion was off by 1.25e-4 (relative), far beyond the stated
    rtol 1e-6 of ``nearest`` (float64 states, or any states with per-obstacle radii, where no
    float32 screening picks the row's nearest). Such pairs that may be the nearest or give the
    clearance now take the differences."""
    rng = np.random.default_rng(8)
    o = rng.uniform(-1000, 1000, size=(2000, 16))
    u = np.eye(16)[0] * 3e-3
    x = o[1990:1995] + u  # 3e-3 from obstacles 1990..1994
    o[1995:] = x + np.eye(16)[1] * 4e-3  # 4e-3 from obstacles 1995..1999
    radius = 0.0
    if per_obstacle_radius:  # the farther ones (radius 2e-3) give the clearance
        radius = np.where(np.arange(len(o)) >= 1995, 2e-3, 0.0)
    oset = ObstacleSet.from_embeddings(o, q_star=1e-6, radius=radius)
    for dtype, eps in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        x64 = torch.from_numpy(x).to(dtype).double()
        _, out, ref = _check(oset, x64, dtype, eps)
        # the clearance too, without _check's absolute tolerance (clearances near 3e-3 here)
        assert torch.allclose(out.clearance.double(), ref.clearance, rtol=1e-6, atol=0)


def test_the_fused_loop_itself_takes_the_caps_for_infinite_prefactors():
    """The field sends a set with eta / Q^3 beyond 1e30 to the reference (outside the path's
    range), so the test above never runs the fused loop; here its pair sums are called directly
    (float64 work) on such a set and match the reference's own sums."""
    from guidance.kernels.cpu import cpu_pair_sums, prepare
    from guidance.numerics import over_power

    rng = np.random.default_rng(9)
    o = rng.normal(size=(600, 5)) * 1e-3  # pairs within Q* are far pairs (s^ > tau S)
    eta = np.where(np.arange(len(o)) % 2 == 0, 1e300, 1.0)
    oset = ObstacleSet.from_embeddings(o, q_star=1e-3, eta=eta)
    field = RepulsiveField(oset, backend="torch")
    e = torch.from_numpy(oset.embeddings[:6].astype(np.float64)) + 2e-4
    e[0, :] = field._emb[10] + torch.tensor([2**-10, 0, 0, 0, 0], dtype=torch.float64)
    f_q3 = over_power(field._eta, field._q, 3)
    assert bool(torch.isinf(f_q3).any())  # the case of interest
    cache = prepare(
        field._emb, field._q, over_power(field._eta, field._q, 2), f_q3, field._radius,
        torch.float64,
    )  # fmt: skip
    n = len(oset)
    caps = min(field.max_force, 1e300 / n), min(field.max_potential, 1e300 / n)
    got = cpu_pair_sums(e, cache, field.rho_min, *caps)
    ref = field._pairwise(e, None, True)
    for g, r in zip(got, ref, strict=True):
        assert bool(torch.isfinite(g.double()).all())
        assert torch.allclose(g.double(), r.double(), rtol=1e-9, atol=0), (g, r)


def _screen_values(x, o, centre):
    """The screening's float32 squared distances (guidance/kernels/cpu.py's own function) of
    states ``x`` (B, d) and obstacles ``o`` (N, d), float64, centred on ``centre`` (float64)
    and rounded to float32 as the path does, and the norms of the float32 vectors."""
    from guidance.kernels.cpu import screen_values

    x32, o32 = (x - centre).float(), (o - centre).float()
    xn, on = x32.double().pow(2).sum(1), o32.double().pow(2).sum(1)
    s32 = screen_values(x32, xn.float(), o32, on.float())
    return s32.double(), xn.sqrt(), on.sqrt()


@pytest.mark.parametrize("seed", range(6))
def test_the_screening_bound_holds_and_is_tight_for_far_states(seed):
    """bounds.screen_bound: |s32 - D^2| <= a |x~||o~| + b |x~|^2 + c |o~|^2 on random problems
    (d from 1 to 3,000; norms from 1e-3 to 1e4; common offsets and none; states far from and
    on the obstacles). The true D^2 is taken from float64 differences of the float32 values."""
    from guidance.kernels.bounds import screen_bound

    rng = np.random.default_rng(100 + seed)
    worst = 0.0
    for _ in range(40):
        d = int(rng.choice([1, 2, 3, 7, 64, 300, 3000]))
        scale, off = 10.0 ** rng.uniform(-3, 2), 10.0 ** rng.uniform(-3, 4) * rng.integers(0, 2)
        o = torch.from_numpy(rng.normal(scale=scale, size=(50, d)) + off).float().double()
        far = 10.0 ** rng.uniform(-3, 4)
        x = torch.cat([o[:3], torch.from_numpy(rng.normal(scale=far, size=(5, d)))]).float()
        x = x.double()
        centre = o.mean(0) if rng.integers(0, 2) else torch.zeros(d, dtype=torch.float64)
        s32, nx, no = _screen_values(x, o, centre)
        true = (x[:, None, :] - o[None]).pow(2).sum(-1)
        a, b, c = screen_bound(d)
        bound = a * nx[:, None] * no[None] + b * nx[:, None] ** 2 + c * no[None] ** 2
        ratio = float(((s32 - true).abs() / bound.clamp(min=1e-300)).max())
        worst = max(worst, ratio)
        assert ratio <= 1.0, (d, scale, off, far, ratio)
    assert worst > 1e-3  # the errors are of the bound's order somewhere (it is not vacuous)


def test_the_screening_separates_obstacles_seen_from_afar():
    """Obstacles with a common offset of 1e3 (spread 1) seen from states near the origin,
    d = 3,072 (the latents of a 4x32x32 pipeline): the obstacles that may be a row's nearest under the bound (within twice it of the
    row's smallest value) are a handful; under the earlier ``(d + 4) u (|x|^2 + |o|^2)`` they
    were more than the 1/32 of a block that the screening takes."""
    from guidance.kernels.bounds import U32, screen_bound

    rng = np.random.default_rng(7)
    d = 3072
    o = torch.from_numpy(rng.normal(size=(500, d)) + 1e3).float().double()
    x = torch.from_numpy(rng.normal(size=(4, d))).float().double()
    s32, nx, no = _screen_values(x, o, o.mean(0))
    a, b, c = screen_bound(d)
    slack = 2 * (a * nx * no.max() + b * nx**2 + c * no.max() ** 2)
    rowmin = s32.min(dim=1).values
    kept = (s32 <= (rowmin + slack)[:, None]).sum(dim=1)
    assert bool((kept <= 5).all()), kept
    old = 2 * (d + 4) * U32 * (x.pow(2).sum(1) + o.pow(2).sum(1).max())  # uncentred, as before
    s_raw, _, _ = _screen_values(x, o, torch.zeros(d, dtype=torch.float64))
    kept_old = (s_raw <= (s_raw.min(dim=1).values + old)[:, None]).sum(dim=1)
    assert bool((kept_old > len(o) // 32).all()), kept_old


def test_offset_obstacles_out_of_reach_take_the_screening_alone(monkeypatch):
    """A set with a common offset, out of every state's reach, states near the origin: every
    block is settled by the float32 screening (the float64 products' loop never runs), the
    few pairs that may be a row's nearest take the exact differences, and the results are the
    reference's."""
    import guidance.kernels.cpu_loops as loops

    rng = np.random.default_rng(11)
    o = rng.normal(size=(20000, 96)) + 1e3
    oset = ObstacleSet.from_embeddings(o, q_star=1.0)
    x64 = torch.from_numpy(rng.normal(size=(6, 96))).float().double()

    def refuse(*args, **kwargs):
        raise AssertionError("a block took the float64 products")

    monkeypatch.setattr(loops, "far_pairs", refuse)
    _, out, ref = _check(oset, x64, torch.float32, 1e-5)
    assert torch.equal(out.nearest, ref.nearest.float())  # the exact differences, rounded
    assert float(out.force.abs().max()) == 0.0 and float(out.potential.abs().max()) == 0.0


def test_float32_states_take_float64_work_unless_matmul_precision_is_highest():
    """``torch.set_float32_matmul_precision("medium")`` lets the CPU take float32 products in
    bfloat16 (oneDNN), beyond the screening's and the force's bounds: float32 states are then
    summed in float64 (the documented fallback), within the float32 bound all the same."""
    rng = np.random.default_rng(12)
    o, x = _blobs(rng, 3000, 24, 9)
    oset = ObstacleSet.from_embeddings(o, q_star=2.0)
    x64 = torch.from_numpy(x).float().double()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        field, _, _ = _check(oset, x64, torch.float32, 1e-5, max_force=1e30)
        assert ("cpu", torch.float64) in field.kernel._cache
        assert ("cpu", torch.float32) not in field.kernel._cache
    finally:
        torch.set_float32_matmul_precision(before)
    field, _, _ = _check(oset, x64, torch.float32, 1e-5, max_force=1e30)
    assert ("cpu", torch.float32) in field.kernel._cache
