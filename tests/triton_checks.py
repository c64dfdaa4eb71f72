"""Checks of the Triton kernel against the float64 reference; run by tests/test_triton_kernel.py
in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported), and on a GPU
with ``python tests/triton_checks.py`` (no variable). Exits with a non-zero code and a message
on the first failure; prints one line per case.

With ``precision="tf32"`` the kernel rounds the product operands to tf32 itself, so the
interpreter's float32 products see the same operands as the GPU's tensor cores and the tf32
bound (1e-3) is tested against the rounding it is meant for.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1"
if ON_GPU and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with TRITON_INTERPRET=1 for the CPU interpreter")

from guidance import RepulsiveField  # noqa: E402
from guidance.kernels.repulsive import pair_sums  # noqa: E402
from obstacles import ObstacleSet  # noqa: E402

torch.set_num_threads(1)
DEV = torch.device("cuda" if ON_GPU else "cpu")
TOL = {"tf32": 1e-3, "ieee": 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def compare(name, out, ref, tol, oset, x64):
    """Relative errors of potential, force and nearest; ``active`` may differ only by pairs
    whose distance is within the product rounding of their Q* (0.1%)."""
    errs = {
        "potential": rel(out.potential, ref.potential),
        "force": rel(out.force, ref.force),
        "nearest": rel(out.nearest, ref.nearest),
    }
    o = torch.from_numpy(oset.embeddings.astype(np.float64))
    q = torch.from_numpy(oset.q_star.astype(np.float64))
    dist = torch.cdist(x64, o, compute_mode="donot_use_mm_for_euclid_dist")
    borderline = ((dist - q).abs() <= 1e-3 * q).sum(dim=1)
    gap = (out.active.cpu() - ref.active).abs()
    print(
        f"{name:<44} "
        + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
        + f" active diff {int(gap.sum())} (borderline pairs {int(borderline.sum())})"
    )
    if bool((gap > borderline).any()):
        sys.exit(f"{name}: active counts differ beyond the borderline pairs")
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        sys.exit(f"{name}: relative error above {tol}: {bad}")


def case(name, o, x, q, eta, radius, dtype=torch.float32, precision="tf32", prune=None):
    oset = ObstacleSet.from_embeddings(o, q_star=q, eta=eta, radius=radius)
    x64 = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype).double()  # as the kernel sees
    ref = RepulsiveField(oset, backend="torch").evaluate(x64)
    ker = RepulsiveField(oset, backend="triton", precision=precision, prune=prune)
    ker.kernel.poison = True  # NaN / -1 in every output buffer before the run
    out = ker.evaluate(x64.to(dtype).to(DEV))
    assert all(bool(torch.isfinite(v).all()) for v in (out.potential, out.force, out.nearest))
    assert bool((out.active >= 0).all()), f"{name}: active unwritten"
    compare(name, out, ref, TOL[dtype if dtype == torch.bfloat16 else precision], oset, x64)
    return oset, x64


def direct(name, x, o, q, tol, seen=None, **kw):
    """:func:`pair_sums` itself (no centring, no caps) with poisoned outputs against the
    reference on the obstacles ``seen`` (default all): every per-state output written, for
    every split, and the sums right."""
    ones = torch.ones(o.shape[0], device=o.device)
    raw = pair_sums(x, o, q * ones, ones, 0.1 * ones, 0.05, 1e30, 1e30, poison=True, **kw)
    assert all(bool(torch.isfinite(v).all()) for v in raw[:4]), f"{name}: unwritten outputs"
    assert bool((raw[4] >= 0).all()), f"{name}: active unwritten"
    o = o if seen is None else o[seen]
    oset = ObstacleSet.from_embeddings(o.double().cpu().numpy(), q_star=q, radius=0.1)
    ref = RepulsiveField(oset, backend="torch", max_force=1e30).evaluate(x.double().cpu())
    errs = [rel(raw[0], ref.potential), rel(raw[1], ref.force), rel(raw[2], ref.nearest)]
    print(f"{name:<44} potential {errs[0]:.1e} force {errs[1]:.1e} nearest {errs[2]:.1e}")
    if not max(errs) <= tol:
        sys.exit(f"{name}: relative error above {tol}: {errs}")


def main():
    rng = np.random.default_rng(int(os.environ.get("SEED", "0")))
    # fresh random inputs; B = 1, N = 1, sizes that are not multiples of the tiles
    for b, n, d in [(1, 1, 3), (5, 19, 13), (17, 33, 70), (3, 50, 16)]:
        o = rng.normal(size=(n, d))
        x = o[rng.integers(0, n, b)] + rng.normal(scale=0.6 / np.sqrt(d), size=(b, d))
        case(f"B={b} N={n} d={d}", o, x, rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n), 0.1)
    # dense: Q* near the median distance, far pairs in range (matrix-product force), tf32 and ieee
    for precision in ("tf32", "ieee"):
        b, n, d = 9, 70, 40
        o = rng.normal(size=(n, d))
        x = rng.normal(size=(b, d))
        q = float(np.median(np.linalg.norm(x[:, None] - o[None], axis=2)))
        case(f"dense, Q* = median, {precision}", o, x, q, 1.0, 0.1, precision=precision)
    # d = 4096 (the largest dimension the kernel supports): a near state and far ones in range
    o = rng.normal(size=(20, 4096))
    x = np.concatenate([o[:1] + rng.normal(scale=0.01, size=(1, 4096)), rng.normal(size=(2, 4096))])
    q = float(np.median(np.linalg.norm(x[:, None] - o[None], axis=2)))
    case("d = 4096, near and dense", o, x, q, 1.0, 0.1)
    # a state exactly on an obstacle (as stored, float32)
    o = rng.normal(size=(6, 9))
    oset = ObstacleSet.from_embeddings(o, q_star=1.0)
    case("state on an obstacle", o, oset.embeddings[[0, 3]], 1.0, 1.0, 0.2)
    # all obstacles beyond Q*
    case("all beyond Q*", o, o[:2] + 100.0, 1.0, 1.0, 0.0)
    # near pairs (D << |x|) with a large common offset, in tiles that mix near and far pairs
    d = 24
    o = np.concatenate([rng.normal(size=(12, d)), rng.normal(scale=8.0, size=(20, d))]) + 1e3
    rng.shuffle(o)
    oset = ObstacleSet.from_embeddings(o, q_star=12.0)
    base = oset.embeddings.astype(np.float64)[rng.integers(0, 32, 8)]
    x = (base + rng.normal(scale=0.01, size=base.shape)).astype(np.float32)
    case("near and far pairs, offset 1e3", o, x, 12.0, 1.0, 0.05)
    # the same without the field's centring: every pair is near, the differences path alone
    o32 = torch.from_numpy(oset.embeddings).to(DEV)
    x32 = torch.from_numpy(x).to(DEV)
    direct("offset 1e3, not centred (all pairs near)", x32, o32, 12.0, 1e-3)
    # the CUDA tile sizes (64 states, 64 obstacles, 32 dims, 2-wide differences), 3 splits
    o = rng.normal(size=(150, 40))
    x = np.concatenate([o[:3] + rng.normal(scale=0.05, size=(3, 40)), rng.normal(size=(4, 40))])
    o32 = torch.from_numpy(o).float().to(DEV)
    x32 = torch.from_numpy(x).float().to(DEV)
    gpu_blocks = dict(block_b=64, block_n=64, block_d=32, near_d=2)
    direct("CUDA tiles, 3 splits, near + far", x32, o32, 9.0, 1e-3, blocks=gpu_blocks, splits=3)
    direct("splits=5, float32 products", x32, o32, 9.0, 1e-5, splits=5, precision="ieee")
    # segments and visits: the block visits segments 0 and 2 only (what pruning hands it)
    segs = torch.tensor([[0, 40], [40, 100], [100, 150]])
    seen = torch.cat([torch.arange(0, 40), torch.arange(100, 150)]).to(DEV)
    direct("segments 0 and 2 of 3, 2 splits", x32, o32, 9.0, 1e-3, seen=seen, segments=segs,
           visits=[torch.tensor([0, 2])], splits=2)  # fmt: skip
    # bfloat16 inputs, float32 accumulation: the bf16 bound
    o = rng.normal(size=(20, 32))
    x = o[:6] + rng.normal(scale=0.3, size=(6, 32))
    ob = torch.from_numpy(o).to(torch.bfloat16).double().numpy()
    case("bfloat16", ob, x, 1.5, 1.0, 0.1, dtype=torch.bfloat16)
    # pruned: the kernel over the clusters alive for each block of states
    centres = rng.normal(scale=6.0, size=(8, 20))
    o = centres[rng.integers(0, 8, 120)] + rng.normal(scale=0.5, size=(120, 20))
    x = o[rng.integers(0, 120, 21)] + rng.normal(scale=0.3, size=(21, 20))
    case("pruned (11 clusters)", o, x, 2.0, 1.0, 0.3, prune=11)
    # outside the kernel's float32-safe range (RepulsiveField.KERNEL_RANGE): the reference, finite
    o = rng.normal(size=(5, 6))
    for name, x, q, eta in (
        ("states at 1e20", o[:2] * 1e20, 1.0, 1.0),
        ("Q* = 1e-20", o[:2] + 1e-21, 1e-20, 1.0),
        ("eta = 1e35 (float32 sums would overflow)", o[:2] + 0.01, 1.0, 1e35),
    ):
        oset = ObstacleSet.from_embeddings(o, q_star=q, eta=eta)
        ker = RepulsiveField(oset, backend="triton")
        xs = torch.from_numpy(x).float().to(DEV)
        assert not ker.kernel.usable(xs.double(), torch.float32), name
        out = ker.evaluate(xs)
        ref = RepulsiveField(oset, backend="torch").evaluate(xs.cpu())  # float32 out, held finite
        assert all(bool(torch.isfinite(v).all()) for v in (out.potential, out.force, out.nearest))
        assert torch.equal(out.force.cpu(), ref.force), name
        print(f"{name:<44} reference used, finite")
    print("all kernel checks passed")


if __name__ == "__main__":
    main()
