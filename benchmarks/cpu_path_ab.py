"""The fast CPU path of two checkouts, timed in turns on the same problems (an A/B that the CPU's
changing speed cannot bias: each round runs every case once per checkout, one after the other).

    python benchmarks/cpu_path_ab.py --before /path/to/old/checkout [--after .] [--rounds 3]
        [--cases 16,20000,64,0.0005 16,100000,256,0.5 ...]

Each run is a fresh process (``OMP_NUM_THREADS=1``, one torch thread) with ``PYTHONPATH`` set to
the checkout: it builds the benchmark's blob problem (:func:`cspace.experiments.bench.blob_problem`,
seed 0), the field with ``backend="cpu"``, and prints the median of 7 evaluations after a warm-up,
with the floor measured in the same process. Prints one table: per case, the median over the
rounds of each checkout's time and of its multiple of the floor, and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np, torch
from cspace.experiments.bench import blob_problem, measure_floor
from guidance import RepulsiveField
from obstacles import ObstacleSet
torch.set_num_threads(1)
b, n, d, q = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
emb, x, qs = blob_problem(n, d, b, q, 0)
oset = ObstacleSet.from_embeddings(emb, q_star=qs, radius=0.5 * qs)
x = torch.from_numpy(x).float()
field = RepulsiveField(oset, backend="cpu")
field.evaluate(x)
times = []
for _ in range(7):
    t0 = time.perf_counter(); field.evaluate(x); times.append(time.perf_counter() - t0)
floor = measure_floor(torch.from_numpy(oset.embeddings).float(), b, 5, lambda: None)["seconds"]
print(json.dumps({"seconds": float(np.median(times)), "floor": floor}))
"""

DEFAULT = ["16,20000,64,0.5", "16,20000,64,0.0005", "16,100000,256,0.5", "16,100000,256,0.0005",
           "64,20000,64,0.5", "64,20000,256,0.5", "64,100000,64,0.0005"]  # fmt: skip


def run(tree: Path, case: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree.resolve())}
    out = subprocess.run([sys.executable, "-c", CHILD, *case.split(",")], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="the old checkout")
    p.add_argument("--after", default=Path("."), type=Path, help="the new checkout (default: .)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=DEFAULT, help="B,N,d,Q*-quantile each")
    args = p.parse_args()
    for tree in (args.before, args.after):
        if not (tree / "guidance" / "kernels" / "cpu.py").is_file():
            p.error(
                f"{tree} is not a cspace checkout with the fast CPU path (no guidance/kernels/cpu.py)"
            )
    rows = {c: {"before": [], "after": []} for c in args.cases}
    for _ in range(args.rounds):
        for c in args.cases:
            for side in ("before", "after"):
                rows[c][side].append(run(getattr(args, side), c))
    print("| B | N | d | Q* quantile | before ms (x floor) | after ms (x floor) | after / before |")
    print("|---|---|---|---|---|---|---|")
    for c, r in rows.items():
        b, n, d, q = c.split(",")
        med = {s: statistics.median(v["seconds"] for v in r[s]) * 1e3 for s in r}
        xf = {s: statistics.median(v["seconds"] / v["floor"] for v in r[s]) for s in r}
        print(f"| {b} | {int(n):,} | {d} | {q} | {med['before']:.2f} ({xf['before']:.1f} x) | "
              f"{med['after']:.2f} ({xf['after']:.1f} x) | {med['after'] / med['before']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
