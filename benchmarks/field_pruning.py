"""CPU wall time of the torch reference field with and without exact cluster pruning.

    python benchmarks/field_pruning.py [--n 100000] [--d 64] [--b 64] [--repeats 5]

Obstacles in 1,000 tight blobs (a sparse case: Q* about the blob size, so a state sees a few
blobs), states near a few of them; the pruned result is checked against the reference (force to
1e-12 relative). Prints the median time of each and the share of obstacles evaluated.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from guidance import RepulsiveField
from obstacles import ObstacleSet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--b", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    blobs = 1000
    centres = rng.normal(scale=10.0, size=(blobs, args.d))
    emb = centres[rng.integers(0, blobs, args.n)] + rng.normal(scale=0.3, size=(args.n, args.d))
    oset = ObstacleSet.from_embeddings(emb, q_star=1.0, radius=0.5)
    near = emb[rng.integers(0, args.n, args.b)] + rng.normal(scale=0.3, size=(args.b, args.d))
    x = torch.from_numpy(near)
    t0 = time.perf_counter()
    pruned = RepulsiveField(oset, prune=True)
    build = time.perf_counter() - t0
    full = RepulsiveField(oset)
    ref = full.evaluate(x)
    out = pruned.evaluate(x)
    assert torch.allclose(out.force, ref.force, rtol=1e-12, atol=1e-300)
    times = {"reference": [], "pruned": []}
    for _ in range(args.repeats):
        for name, f in (("reference", full), ("pruned", pruned)):
            t0 = time.perf_counter()
            f.evaluate(x)
            times[name].append(time.perf_counter() - t0)
    ref_t, pr_t = statistics.median(times["reference"]), statistics.median(times["pruned"])
    print(f"N={args.n}, d={args.d}, B={args.b}, {pruned.clusters.k} clusters (built in {build:.1f} s), "
          f"1 thread, float64")  # fmt: skip
    print("| field | median s per evaluate | obstacles evaluated |")
    print("|---|---|---|")
    print(f"| reference | {ref_t:.3f} | {args.n} |")
    print(
        f"| pruned | {pr_t:.3f} | {pruned.last_evaluated:.0f} per state ({100 * pruned.last_evaluated / args.n:.2f}%) |"
    )
    print(f"speed-up {ref_t / pr_t:.1f}x; force equal to the reference within 1e-12 (relative)")


if __name__ == "__main__":
    main()
