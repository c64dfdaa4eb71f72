"""The field benchmark behind ``cspace bench field``: the field's backends against each other and
against a measured floor.

::

    cspace bench field [--n 100000] [--d 64] [--b 64] [--q-star-quantile 0.5] [--repeats 5]
                       [--dtype float32|bfloat16] [--backends reference,pruned,...]
                       [--device cpu|cuda] [--json] [--out report.json]

Obstacles are ``n`` points in 1,000 blobs (d dimensions), states near some of them; Q* is the
given quantile of the state-obstacle distances (0.5: dense, every state sees half the obstacles;
0.0005: sparse, a state sees about half of its own blob, since each blob holds 0.1% of the
obstacles). Each backend computes the same field, and its
potential, force and nearest distance are compared with the float64 reference:

* ``reference``: the torch float64 reference (:class:`guidance.RepulsiveField`, ``backend="torch"``);
* ``pruned``: the reference with exact cluster pruning (``prune=True``);
* ``cpu``: the fast CPU path (:mod:`guidance.kernels.cpu`, ``backend="cpu"``: float64 product
  distances, float32 work for float32 states, exact differences for near pairs);
* ``cpu-pruned``: the same with exact cluster pruning;
* ``faiss-range``: FAISS range search (CPU) for the pairs within Q* (:meth:`ObstacleSet.within`,
  exact distances recomputed), then the pair sums on those pairs only;
* ``torch-eager``: what a user writes by hand in torch, in the input dtype: the (B, N) distance
  matrix from matrix products, the thresholded weights, the force as ``x sum_j c_j - c @ o``;
  fast, but it cancels near an obstacle (its error is reported);
* ``torch-compile``: the same through ``torch.compile`` (the first call compiles, not timed);
* ``triton``: the fused kernel (:mod:`guidance.kernels.repulsive`; CUDA);
* ``triton-pruned``: the kernel over the clusters that survive the exact bound (CUDA).

Default backends: reference, cpu, cpu-pruned, pruned, faiss-range, torch-eager on the CPU; torch-eager,
torch-compile, triton, triton-pruned on CUDA.

**Floor.** What the hardware needs at least for the kernel's work, from two rates measured in the
same run: the matrix-product rate ``R`` (a 4096^3 product in the input dtype, tf32 allowed for
float32 on CUDA; 1024^3 on the CPU) and the copy bandwidth ``W`` (a copy of the obstacles into
a preallocated buffer: bytes read + written over its time). The field needs two products of
B x N x d (distances and force) and one read of the obstacles::

    floor = max(4 B N d / R,  N d bytes / W).

Every row gives its median time over ``--repeats`` runs (after a warm-up) and its multiple of
the floor.
"""

from __future__ import annotations

import datetime
import statistics
import time

import numpy as np
import torch

from cspace.io.checks import check_memory
from cspace.models.devices import resolve_device

__all__ = [
    "BACKENDS",
    "DTYPES",
    "bench_field",
    "blob_problem",
    "dense_field",
    "format_report",
    "measure_floor",
]

BACKENDS = (
    "reference",
    "pruned",
    "cpu",
    "cpu-pruned",
    "faiss-range",
    "torch-eager",
    "torch-compile",
    "triton",
    "triton-pruned",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    """The hand-written dense field in the inputs' dtype (B x N matrix): (potential (B,),
    force (B, d)), with the reference's distance clamp and total-force cap."""
    sq = (x * x).sum(1)[:, None] + (o * o).sum(1)[None] - 2 * (x @ o.T)  # expansion
    dist = torch.clamp(sq, min=0).sqrt()
    inside = dist <= q
    ratio = torch.clamp(dist / q, min=rho)
    gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))
    pot = (0.5 * eta / q**2 * gap**2).sum(dim=1)
    coef = eta / q**3 * gap / ratio**2 / torch.clamp(dist, min=1e-30)
    force = x * coef.sum(dim=1, keepdim=True) - coef @ o
    norm = force.norm(dim=1, keepdim=True)
    return pot, force * torch.clamp(max_force / torch.clamp(norm, min=1e-30), max=1.0)


def blob_problem(
    n: int, d: int, b: int, q_quantile: float, seed: int = 0, blobs: int = 1000
) -> tuple[np.ndarray, np.ndarray, float]:
    """``n`` float32 obstacles (n, d) in ``blobs`` Gaussian blobs (centres with scale 10, width
    0.3; generated in chunks so that 10M x 256 fits), ``b`` float64 states (b, d) near random
    obstacles, and Q* = the ``q_quantile`` of the state-obstacle distances."""
    if not 0 < q_quantile < 1:
        raise ValueError(f"--q-star-quantile must be in (0, 1); got {q_quantile}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(blobs, d)).astype(np.float32)
    emb = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 20):
        m = min(n, s + (1 << 20)) - s
        noise = rng.standard_normal(size=(m, d), dtype=np.float32) * np.float32(0.3)
        emb[s : s + m] = centres[rng.integers(0, blobs, m)] + noise
    x = emb[rng.integers(0, n, b)].astype(np.float64) + rng.normal(scale=0.3, size=(b, d))
    sample = emb[rng.integers(0, n, min(n, 20_000))].astype(np.float64)
    dists = np.linalg.norm(x[:64, None] - sample[None], axis=2).ravel()
    return emb, x, float(np.quantile(dists, q_quantile))


def measure_floor(o: torch.Tensor, b: int, repeats: int, sync) -> dict:
    """The floor of the module docstring for obstacles ``o`` (N, d) and ``b`` states, from a
    product rate and a copy bandwidth measured now."""
    dev, dtype = o.device, o.dtype
    n, d = o.shape
    size = 4096 if dev.type == "cuda" else 1024
    a = torch.randn(size, size, device=dev).to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the kernel's products are tf32
    try:
        mm = _median_time(lambda: a @ a, repeats, sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    rate = 2 * size**3 / mm
    buf = torch.empty_like(o)  # preallocated: a fresh allocation would time page faults
    copy = _median_time(lambda: buf.copy_(o), repeats, sync)
    nbytes = o.numel() * o.element_size()
    bandwidth = 2 * nbytes / copy
    compute, memory = 4 * b * n * d / rate, nbytes / bandwidth
    return {
        "seconds": max(compute, memory),
        "compute_seconds": compute,
        "memory_seconds": memory,
        "matmul_flops_per_s": rate,
        "copy_bytes_per_s": bandwidth,
        "bound": "compute" if compute >= memory else "memory",
    }


def bench_field(
    n: int = 100_000,
    d: int = 64,
    b: int = 64,
    q_quantile: float = 0.5,
    repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
    dtype: str = "float32",
    backends: list[str] | None = None,
) -> dict:
    """Run the benchmark (module docstring); returns a JSON-serialisable report."""
    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    dev = resolve_device(device)
    # the obstacles (float32, a float64 copy for the reference, the backends' copies), the
    # differences that set Q* (64 states x 20,000 obstacles x d, float64), the states
    n, d, b = int(n), int(d), int(b)
    check_memory(
        4 * n * d * 4 + 8 * 64 * min(n, 20_000) * d + 8 * b * d * 4,
        f"{n:,} obstacles of dimension {d:,} and {b:,} states",
        "lower --n, --d or --b",
    )
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if backends is None:
        backends = (
            ["torch-eager", "torch-compile", "triton", "triton-pruned"]
            if dev.type == "cuda"
            else ["reference", "cpu", "cpu-pruned", "pruned", "faiss-range", "torch-eager"]
        )
    bad = [x for x in backends if x not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backends {bad}; choose from {', '.join(BACKENDS)}")
    if dev.type != "cuda" and any(x.startswith("triton") for x in backends):
        raise ValueError("the triton backends need --device cuda (on the CPU, Triton runs only "
                         "in its interpreter: see tests/triton_checks.py)")  # fmt: skip
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tdt = DTYPES[dtype]
    emb, x_np, q = blob_problem(n, d, b, q_quantile, seed)
    oset = ObstacleSet.from_embeddings(emb, q_star=q, radius=0.5 * q)
    del emb
    x = torch.from_numpy(x_np).to(dev)
    xin = x.to(tdt)  # the states every low-precision backend gets
    ref_field = RepulsiveField(oset, backend="torch")
    ref = ref_field.evaluate(xin.double())  # the truth for the values the backends see
    rows = []

    def rel(a, r):
        a, r = a.double().to(r.device), r.double()
        return float((a - r).norm() / max(float(r.norm()), 1e-300))

    def record(name, fn):
        secs = _median_time(fn, repeats, sync)
        out = fn()
        rows.append({
            "backend": name,
            "seconds": secs,
            "force_rel_error": rel(out[1], ref.force),
            "potential_rel_error": rel(out[0], ref.potential),
            "nearest_rel_error": None if out[2] is None else rel(out[2], ref.nearest),
        })  # fmt: skip

    def field_fn(field, states):
        def run():
            r = field.evaluate(states)
            return r.potential, r.force, r.nearest

        return run

    o_dev = torch.from_numpy(oset.embeddings).to(dev).to(tdt)
    cap = ref_field.max_force
    for name in backends:
        if name == "reference":
            record(name, field_fn(ref_field, xin.double()))
        elif name == "pruned":
            record(name, field_fn(RepulsiveField(oset, prune=True, backend="torch"), xin.double()))
        elif name in ("cpu", "cpu-pruned"):
            fast = RepulsiveField(oset, backend="cpu", prune=name == "cpu-pruned" or None)
            record(name, field_fn(fast, xin.cpu()))
            rows[-1]["evaluated_per_state"] = fast.last_evaluated
        elif name == "faiss-range":
            x_cpu = xin.double().cpu()

            def faiss_range(x_cpu=x_cpu):
                hits = oset.within(x_cpu.numpy(), q)  # [(ids, distances)] per state
                idx = sorted({int(i) for ids, _ in hits for i in ids})
                if not idx:  # nothing in range: zero potential and force
                    zero = torch.zeros(b, dtype=torch.float64)
                    return zero, torch.zeros(b, d, dtype=torch.float64), None
                pos = np.searchsorted(oset.ids, idx)
                sub = ObstacleSet.from_embeddings(oset.embeddings[pos], q_star=q, radius=0.5 * q)
                r = RepulsiveField(sub, backend="torch").evaluate(x_cpu)
                return r.potential, r.force, None  # nearest: only within Q*

            record(name, faiss_range)
        elif name in ("torch-eager", "torch-compile"):
            fn = dense_field if name == "torch-eager" else torch.compile(dense_field)
            record(name, lambda fn=fn: (*fn(xin, o_dev, q, 1.0, cap), None))
        elif name == "triton":
            record(name, field_fn(RepulsiveField(oset, backend="triton"), xin))
        elif name == "triton-pruned":
            pruned = RepulsiveField(oset, prune=True, backend="triton")
            record(name, field_fn(pruned, xin))
            rows[-1]["evaluated_per_state"] = pruned.last_evaluated
    floor = measure_floor(o_dev, b, repeats, sync)
    for r in rows:
        r["x_floor"] = r["seconds"] / floor["seconds"]
    return {
        "n": n,
        "d": d,
        "b": b,
        "dtype": dtype,
        "q_star": q,
        "q_star_quantile": q_quantile,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "eager_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "date": datetime.date.today().isoformat(),
        "floor": floor,
        "rows": rows,
    }


def format_report(rep: dict) -> str:
    """The report as a short header and a markdown table."""
    f = rep["floor"]
    lines = [
        f"field: N={rep['n']}, d={rep['d']}, B={rep['b']}, {rep['dtype']}, Q* = "
        f"{rep['q_star']:.3g} (quantile {rep['q_star_quantile']}), {rep['device']}, "
        f"{rep['torch_threads']} threads",
        f"floor {f['seconds'] * 1e3:.3f} ms ({f['bound']}-bound; products "
        f"{f['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s, copy {f['copy_bytes_per_s'] / 1e9:.1f} GB/s)",
        "| backend | median ms | x floor | force rel. error | potential rel. error |",
        "|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        lines.append(
            f"| {r['backend']} | {r['seconds'] * 1e3:.3f} | {r['x_floor']:.2f} | "
            f"{r['force_rel_error']:.1e} | {r['potential_rel_error']:.1e} |"
        )
    return "\n".join(lines)
