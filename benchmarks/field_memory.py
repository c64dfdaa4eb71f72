"""Peak memory of one evaluation of the fast CPU path, against its stated bound.

    python benchmarks/field_memory.py [--n 1000000] [--d 64] [--b 64]

Builds blob obstacles (as ``cspace bench field``), the field (``backend="cpu"``) and its caches
(one evaluation first), then resets the process's peak resident memory (Linux:
``/proc/self/clear_refs``; the script runs with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` and
``MALLOC_TRIM_THRESHOLD_=0``, so that freed blocks leave resident memory instead of being
reused unseen) and evaluates B float32 states, dense (Q* = the median distance) and
sparse (the 0.0005 quantile), with and without pruning. Prints the peak growth of resident memory
during each evaluation next to the bound of :mod:`guidance.kernels.cpu` (temporaries of about
``30 rows nb`` bytes on the float64 path and ``12 rows nbs`` on the float32 screening's longer
blocks, a block of obstacles gathered, widened or centred ``12 nb d``, near pairs
``16 * 2^20`` bytes, outputs ``8 B d``; with pruning also the member index lists of a group of
states, at most ``8 N`` bytes), and the memory the field holds (its float64 copy and
the float32 cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cspace.experiments.bench import blob_problem
from guidance import RepulsiveField
from obstacles import ObstacleSet


def _rss() -> tuple[int, int]:
    """(current, peak) resident memory in bytes."""
    now = peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return now, peak


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
        # glibc keeps freed memory resident and reuses it, which would hide the temporaries:
        # with every allocation above 128 KiB mapped and unmapped, resident memory tracks them
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--b", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    n, d, b = args.n, args.d, args.b
    nb = max(256, min(8192, (1 << 18) // d, (1 << 20) // b))  # the path's default blocks
    nbs = max(nb, min(8192, (1 << 20) // b))  # its float32 screening blocks
    bound = max(30 * b * nb, 12 * b * nbs) + 12 * nb * d + 16 * (1 << 20) + 8 * b * d
    print(f"N = {n:,}, d = {d}, B = {b}: stated working-memory bound {bound / 2**20:.1f} MiB "
          f"(max(30 B nb, 12 B nbs) + 12 nb d + 16 MiB + 8 B d, nb = {nb}, nbs = {nbs})")  # fmt: skip
    print("| Q* | pruning | seconds | peak growth MiB | within the bound (MiB) |")
    print("|---|---|---|---|---|")
    for qq in (0.5, 0.0005):
        emb, x, q = blob_problem(n, d, b, qq)
        oset = ObstacleSet.from_embeddings(emb, q_star=q, radius=0.5 * q)
        del emb
        for prune in (None, True):
            field = RepulsiveField(oset, backend="cpu", prune=prune)
            xs = torch.from_numpy(x).float()
            field.evaluate(xs[:1])  # the caches (float32 copy, norms) are built here
            before, _ = _rss()
            _reset_peak()
            t0 = time.perf_counter()
            out = field.evaluate(xs)
            secs = time.perf_counter() - t0
            _, peak = _rss()
            growth = peak - before
            assert bool(torch.isfinite(out.force).all())
            limit = bound + (8 * n if prune else 0)  # pruning: the groups' member index lists
            print(f"| {qq} | {'yes' if prune else 'no'} | {secs:.2f} | {growth / 2**20:.1f} | "
                  f"{'yes' if growth <= limit else 'NO'} ({limit / 2**20:.1f}) |", flush=True)  # fmt: skip
            del field
    held = 8 * n * d + 4 * n * d
    print(
        f"held by the field: float64 copy + float32 cache = {held / 2**20:.0f} MiB "
        f"(the set itself: float32 embeddings and the FAISS index, {8 * n * d / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
