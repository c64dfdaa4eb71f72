"""Checks of the Triton kernel against the float64 reference; run by tests/test_triton_kernel.py
in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported). Exits with a
non-zero code and a message on the first failure; prints one line per case."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from guidance import RepulsiveField  # noqa: E402
from guidance.kernels.repulsive import pair_sums  # noqa: E402
from obstacles import ObstacleSet  # noqa: E402

torch.set_num_threads(1)


def case(name, o, x, q, eta, radius, dtype=torch.float32, tol=1e-3):
    oset = ObstacleSet.from_embeddings(o, q_star=q, eta=eta, radius=radius)
    o32 = oset.embeddings.astype(np.float64)  # what the set stores
    xs = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype)
    ref_f = RepulsiveField(oset, backend="torch").evaluate(xs.double())
    ker = RepulsiveField(oset, backend="triton")
    out = ker.evaluate(xs)
    # every per-state output written: poisoned buffers come back finite
    raw = pair_sums(xs, torch.from_numpy(o32).to(dtype), ker._q, ker._eta, ker._radius,
                    ker.rho_min, 1e30, 1e30, poison=True)  # fmt: skip
    assert all(bool(torch.isfinite(v.double()).all()) for v in raw[:4]), f"{name}: unwritten"
    assert bool((raw[4] >= 0).all()), f"{name}: active unwritten"

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / max(float(b.norm()), 1e-30))

    errs = {
        "potential": rel(out.potential, ref_f.potential),
        "force": rel(out.force, ref_f.force),
        "nearest": rel(out.nearest, ref_f.nearest),
    }
    same_active = bool(torch.equal(out.active, ref_f.active))
    print(
        f"{name:<40} "
        + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
        + f" active {same_active}"
    )
    if dtype == torch.float32 and not same_active:
        sys.exit(f"{name}: active counts differ")
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        sys.exit(f"{name}: relative error above {tol}: {bad}")


def main():
    rng = np.random.default_rng(int(os.environ.get("SEED", "0")))
    # fresh random inputs, sizes that are not multiples of the tiles
    for b, n, d in [(1, 1, 3), (5, 19, 13), (17, 33, 70), (3, 50, 16)]:
        o = rng.normal(size=(n, d))
        x = o[rng.integers(0, n, b)] + rng.normal(scale=0.6 / np.sqrt(d), size=(b, d))
        case(f"B={b} N={n} d={d}", o, x, rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n), 0.1)
    # a state exactly on an obstacle (as stored, float32)
    o = rng.normal(size=(6, 9))
    oset = ObstacleSet.from_embeddings(o, q_star=1.0)
    x = oset.embeddings[[0, 3]].astype(np.float64)
    case("state on an obstacle", o, x, 1.0, 1.0, 0.2)
    # all obstacles beyond Q*
    case("all beyond Q*", o, o[:2] + 100.0, 1.0, 1.0, 0.0)
    # near pairs (D << |x|) with a large common offset: cancellation in |x|^2+|o|^2-2x.o
    d = 24
    o = rng.normal(size=(12, d)) + 1e3
    oset = ObstacleSet.from_embeddings(o, q_star=0.5)
    base = oset.embeddings.astype(np.float64)[rng.integers(0, 12, 8)]
    x = (base + rng.normal(scale=0.01, size=base.shape)).astype(np.float32).astype(np.float64)
    case("near pairs, offset 1e3", o, x, 0.5, 1.0, 0.05)
    # bfloat16 inputs, float32 accumulation: the bf16 bound
    o = rng.normal(size=(20, 32))
    x = o[:6] + rng.normal(scale=0.3, size=(6, 32))
    xb = torch.from_numpy(x).to(torch.bfloat16).double().numpy()
    ob = torch.from_numpy(o).to(torch.bfloat16).double().numpy()
    case("bfloat16", ob, xb, 1.5, 1.0, 0.1, dtype=torch.bfloat16, tol=1e-2)
    print("all kernel checks passed")


if __name__ == "__main__":
    main()
