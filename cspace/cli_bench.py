"""``cspace bench field``: the field's backends against each other and against a measured floor.

::

    cspace bench field [--n 100000] [--d 64] [--b 64] [--q-star-quantile 0.5] [--repeats 5]
                       [--device cpu|cuda] [--json]

Obstacles are ``n`` points in 1,000 blobs (d dimensions), states near some of them; Q* is the
given quantile of the state-obstacle distances (0.5: dense, every state sees half the obstacles;
0.001: sparse). Each backend computes the same field (checked against the float64 reference):

* ``reference``: the torch float64 reference (:class:`guidance.RepulsiveField`, ``backend="torch"``);
* ``pruned``: the reference with exact cluster pruning (``prune=True``);
* ``faiss-range``: FAISS range search for the pairs within Q* (:meth:`ObstacleSet.within`, exact
  distances recomputed), then the pair sums on those pairs only;
* ``torch-eager``: what a user writes by hand in torch, float32: the (B, N) distance matrix from
  ``torch.cdist`` (matrix products), the thresholded weights, the force as
  ``x sum_j c_j - c @ o``; fast, but it cancels near an obstacle (its error is reported);
* ``torch-compile``: the same through ``torch.compile`` (with ``--compile``; the first call
  compiles and is not timed);
* ``triton``: the fused kernel (CUDA only).

The floor is what the hardware needs at least: the time of one float32 matrix product
(B x d) @ (d x N) and of one read of the obstacles, both measured in the same run; the table
gives each backend's time as a multiple of it. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from cspace.cli import _positive_float, _positive_int

__all__ = ["bench_field", "register"]


def _median_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_field(
    x: torch.Tensor, o: torch.Tensor, q: float, eta: float, max_force: float, rho: float = 0.05
):
    """The hand-written dense field (float32, B x N matrix): (potential (B,), force (B, d)), with
    the reference's distance clamp and total-force cap."""
    dist = torch.cdist(x, o)  # matrix-product expansion
    inside = dist <= q
    ratio = torch.clamp(dist / q, min=rho)
    gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))
    pot = (0.5 * eta / q**2 * gap**2).sum(dim=1)
    coef = eta / q**3 * gap / ratio**2 / torch.clamp(dist, min=1e-30)
    force = x * coef.sum(dim=1, keepdim=True) - coef @ o
    norm = force.norm(dim=1, keepdim=True)
    return pot, force * torch.clamp(max_force / torch.clamp(norm, min=1e-30), max=1.0)


def bench_field(
    n: int = 100_000,
    d: int = 64,
    b: int = 64,
    q_quantile: float = 0.5,
    repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
    compile: bool = False,
) -> dict:
    """Run the benchmark (module docstring); returns a JSON-serialisable report."""
    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    if not 0 < q_quantile < 1:
        raise ValueError(f"--q-star-quantile must be in (0, 1); got {q_quantile}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(1000, d))
    emb = centres[rng.integers(0, 1000, n)] + rng.normal(scale=0.3, size=(n, d))
    x_np = emb[rng.integers(0, n, b)] + rng.normal(scale=0.3, size=(b, d))
    sample = emb[rng.integers(0, n, min(n, 20_000))]
    dists = np.linalg.norm(x_np[:8, None] - sample[None], axis=2).ravel()
    q = float(np.quantile(dists, q_quantile))
    oset = ObstacleSet.from_embeddings(emb, q_star=q, radius=0.5 * q)
    x = torch.from_numpy(x_np).to(dev)
    ref_field = RepulsiveField(oset, backend="torch")
    ref = ref_field.evaluate(x.double())
    rows = []

    def record(name, fn, out_fn):
        secs = _median_time(fn, repeats, sync)
        out = out_fn()
        err = float((out.force.double() - ref.force).norm() / max(float(ref.force.norm()), 1e-300))
        rows.append({"backend": name, "seconds": secs, "force_rel_error": err})

    record("reference", lambda: ref_field.evaluate(x.double()), lambda: ref)
    pruned = RepulsiveField(oset, prune=True, backend="torch")
    record("pruned", lambda: pruned.evaluate(x.double()), lambda: pruned.evaluate(x.double()))

    def faiss_range():
        hits = oset.within(x_np, q)  # [(ids, distances)] per state
        idx = sorted({int(i) for ids, _ in hits for i in ids})
        pos = np.searchsorted(oset.ids, idx)
        sub = (
            ObstacleSet.from_embeddings(oset.embeddings[pos], q_star=q, radius=0.5 * q)
            if idx
            else None
        )
        if sub is None:
            return ref_field.evaluate(x.double() + 1e9)  # nothing in range
        return RepulsiveField(sub, backend="torch").evaluate(x.double())

    record("faiss-range", faiss_range, faiss_range)

    class _Out:  # the dense field's force in the shape record() reads
        def __init__(self, f):
            self.force = f

    o32 = torch.from_numpy(oset.embeddings).float().to(dev)
    x32 = x.float()
    cap = ref_field.max_force
    record("torch-eager", lambda: dense_field(x32, o32, q, 1.0, cap),
           lambda: _Out(dense_field(x32, o32, q, 1.0, cap)[1]))  # fmt: skip
    if compile:
        compiled = torch.compile(dense_field)
        record("torch-compile", lambda: compiled(x32, o32, q, 1.0, cap),
               lambda: _Out(compiled(x32, o32, q, 1.0, cap)[1]))  # fmt: skip
    if dev.type == "cuda":
        ker = RepulsiveField(oset, backend="triton")
        record("triton", lambda: ker.evaluate(x.float()), lambda: ker.evaluate(x.float()))
    mm = _median_time(lambda: x32 @ o32.T, repeats, sync)
    copy = _median_time(lambda: o32.clone(), repeats, sync)
    floor = max(mm, copy / 2)  # a copy reads and writes; the field reads the obstacles once
    for r in rows:
        r["x_floor"] = r["seconds"] / floor
    return {
        "n": n,
        "d": d,
        "b": b,
        "q_star": q,
        "q_star_quantile": q_quantile,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "floor": {"seconds": floor, "matmul_seconds": mm, "copy_seconds": copy},
        "rows": rows,
    }


def _cmd_bench(args: argparse.Namespace) -> int:
    rep = bench_field(args.n, args.d, args.b, args.q_star_quantile, args.repeats, args.device,
                      compile=args.compile)  # fmt: skip
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(
        f"field: N={rep['n']}, d={rep['d']}, B={rep['b']}, Q* = {rep['q_star']:.3g} "
        f"(quantile {rep['q_star_quantile']}), {rep['device']}, {rep['torch_threads']} threads"
    )
    f = rep["floor"]
    print(f"floor {f['seconds'] * 1e3:.2f} ms (matmul {f['matmul_seconds'] * 1e3:.2f} ms, copy "
          f"{f['copy_seconds'] * 1e3:.2f} ms)")  # fmt: skip
    print("| backend | median ms | x floor | force rel. error |")
    print("|---|---|---|---|")
    for r in rep["rows"]:
        print(f"| {r['backend']} | {r['seconds'] * 1e3:.1f} | {r['x_floor']:.1f} | "
              f"{r['force_rel_error']:.1e} |")  # fmt: skip
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (field backends against a measured floor)")
    sub = p.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True
    f = sub.add_parser("field", help="the field's backends on one synthetic obstacle set",
                       description=__doc__.split("\n\n")[2])  # fmt: skip
    f.add_argument("--n", type=_positive_int, default=100_000, help="obstacles")
    f.add_argument("--d", type=_positive_int, default=64, help="dimension")
    f.add_argument("--b", type=_positive_int, default=64, help="states")
    f.add_argument("--q-star-quantile", type=_positive_float, default=0.5,
                   help="Q* as a quantile of state-obstacle distances (0.5 dense, 0.001 sparse)")  # fmt: skip
    f.add_argument("--repeats", type=_positive_int, default=5)
    f.add_argument("--device", default="cpu")
    f.add_argument("--compile", action="store_true", help="also torch.compile the dense field")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_cmd_bench)
