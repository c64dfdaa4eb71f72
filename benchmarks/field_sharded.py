"""Wall time of the sharded field on W CPU processes (1 thread each) against one process.

    python benchmarks/field_sharded.py [--obstacles 2000000] [--dim 64] [--states 8] [--repeats 3]
        [--world 2] [--out benchmarks/results/field_sharded_cpu.json]

Runs itself as a worker under ``torchrun --nproc-per-node W`` (gloo, ``OMP_NUM_THREADS=1``):
each rank generates only its block of the obstacles (rows generated in blocks of 65,536 from
seeded generators, so every layout holds the same set) and evaluates
``ShardedRepulsiveField(shard, sharded=True)``; rank 0 also holds the whole set in a plain
``RepulsiveField``. The measurements are paired, so that a machine shared with other work
loads both alike: each repeat times the one-process field on rank 0 while the other ranks wait
at a barrier (idle), then the sharded field on every rank. The float64 reference backend, B states near
obstacles, Q* = 4 (standard-normal obstacles in d = 64 are about 11 apart). Reports the median
time per evaluation, the median of the per-repeat speed-ups, and for the sharded run the split of one evaluation into the
local sums, the wait for the slowest rank (a barrier) and the all-reduce itself, each rank's
median; the outputs are checked against the one-process field (potential and force to 1e-12
relative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROWS = 65_536
RANK_KEYS = (
    "rank",
    "obstacles_here",
    "median_s",
    "times_s",
    "local_sums_s",
    "wait_s",
    "all_reduce_s",
)


def rows(n: int, d: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the benchmark's (n, d) standard-normal obstacles."""
    out = []
    for blk in range(start // ROWS, -(-stop // ROWS)):
        lo, hi = blk * ROWS, min(n, (blk + 1) * ROWS)
        a = np.random.default_rng([7, blk]).standard_normal((hi - lo, d))
        out.append(a[max(start, lo) - lo : min(stop, hi) - lo])
    return np.concatenate(out)


def states(n: int, d: int, b: int) -> torch.Tensor:
    g = np.random.default_rng(1)
    idx = np.sort(g.choice(n, b, replace=False))
    near = np.stack([rows(n, d, int(i), int(i) + 1)[0] for i in idx])
    return torch.from_numpy(near + 0.5 * g.standard_normal((b, d)))


def worker(args) -> None:
    import torch.distributed as dist

    from guidance import RepulsiveField
    from guidance.distributed import ShardedRepulsiveField, init_from_env
    from obstacles import ObstacleSet

    torch.set_num_threads(1)
    g = init_from_env(timeout_s=1800)
    lo, hi = g.block(args.n)
    shard = ObstacleSet.from_embeddings(rows(args.n, args.d, lo, hi), q_star=4.0, radius=1.0)
    x = states(args.n, args.d, args.b)
    field = ShardedRepulsiveField(
        shard, sharded=True, set_digest=f"bench-{args.n}-{args.d}", backend="torch"
    )
    whole = None
    if g.rank == 0:  # the one-process field, evaluated while the other ranks wait
        full = ObstacleSet.from_embeddings(rows(args.n, args.d, 0, args.n), q_star=4.0, radius=1.0)
        whole = RepulsiveField(full, backend="torch")
        ref = whole.evaluate(x)  # warm-up
    out = field.evaluate(x)  # warm-up
    one, times, parts = [], [], []
    for _ in range(args.repeats):
        dist.barrier()
        if g.rank == 0:
            t0 = time.perf_counter()
            whole.evaluate(x)
            one.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        field.evaluate(x)
        times.append(time.perf_counter() - t0)
        dist.barrier()  # the same evaluation in its three parts
        emb = x.reshape(x.shape[0], -1)
        t0 = time.perf_counter()
        p, f, near, clear, act = field.local._sums(x, emb, None, True)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        buf = torch.cat([p[:, None], act.double()[:, None], f], dim=1)
        dist.all_reduce(buf)
        dist.all_reduce(torch.stack([near, clear], 1), op=dist.ReduceOp.MIN)
        t3 = time.perf_counter()
        parts.append((t1 - t0, t2 - t1, t3 - t2))
    rep = dict(
        rank=g.rank,
        world=g.world,
        obstacles_here=hi - lo,
        median_s=statistics.median(times),
        times_s=times,
        local_sums_s=statistics.median(p[0] for p in parts),
        wait_s=statistics.median(p[1] for p in parts),
        all_reduce_s=statistics.median(p[2] for p in parts),
    )
    if g.rank == 0:
        for k in ("potential", "force"):
            a, b = ref.__dict__[k], out.__dict__[k]
            err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
            assert err < 1e-12, f"{k}: sharded differs from one process by {err:.2e} (relative)"
            rep[f"{k}_relative_error"] = err
        assert torch.equal(ref.active, out.active) and int(ref.active.sum()) > 0
        rep.update(one_process_times_s=one, active_per_state=float(ref.active.double().mean()))
    Path(f"{args.worker}.rank{g.rank}.json").write_text(json.dumps(rep))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--obstacles", "--n", dest="n", type=int, default=2_000_000)
    p.add_argument("--dim", "--d", dest="d", type=int, default=64)
    p.add_argument("--states", "--b", dest="b", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--obstacles", str(args.n), "--dim", str(args.d), "--states", str(args.b)]
    common += ["--repeats", str(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        me = str(Path(__file__).resolve())
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += ["--nproc-per-node", str(args.world)]
        subprocess.run([*launch, me, *common, "--worker", f"{tmp}/w"], env=env, check=True)
        rs = [json.loads(Path(f"{tmp}/w.rank{r}.json").read_text()) for r in range(args.world)]
    one = rs[0]["one_process_times_s"]
    sharded = [max(r["times_s"][i] for r in rs) for i in range(args.repeats)]
    ratios = [a / b for a, b in zip(one, sharded, strict=True)]
    share = [r["all_reduce_s"] / r["median_s"] for r in rs]
    report = dict(
        n=args.n,
        d=args.d,
        b=args.b,
        repeats=args.repeats,
        world=args.world,
        backend="torch (float64 reference)",
        threads_per_process=1,
        design="paired: each repeat times the one-process field on rank 0 (the other ranks "
        "wait at a barrier), then the sharded field on every rank",
        one_process_s=statistics.median(one),
        one_process_times_s=one,
        sharded_s=statistics.median(sharded),
        sharded_times_s=sharded,
        speedup=statistics.median(ratios),
        speedup_per_repeat=ratios,
        per_rank=[{k: r[k] for k in RANK_KEYS} for r in rs],
        all_reduce_share=max(share),
        relative_error=max(rs[0]["potential_relative_error"], rs[0]["force_relative_error"]),
        active_per_state=rs[0]["active_per_state"],
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        load_average_at_end=os.getloadavg(),
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps({k: v for k, v in report.items() if k != "per_rank"}, indent=1))
    for r in report["per_rank"]:
        print(r)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
