"""The field's backends over B, N, d, dtype and Q* (dense and sparse), with the kernel's speed targets.

    python benchmarks/field_sweep.py --preset targets --device cuda --out results/field_targets.json
    python benchmarks/field_sweep.py --preset scaling --device cuda --out results/field_scaling.json
    python benchmarks/field_sweep.py --preset cpu     --out benchmarks/results/field_cpu.json
    python benchmarks/field_sweep.py --b 16,64 --n 100000 --d 64,256 --dtype float32 --q 0.5,0.0005

Every case is one :func:`cspace.experiments.bench.bench_field` run (blob obstacles, Q* a quantile of the
state-obstacle distances, floor measured in the same run, errors against the float64
reference). Presets:

* ``targets`` (CUDA): the kernel's speed targets for the ``triton`` row, with the
  accuracy bounds (relative error <= 1e-3 float32/tf32, <= 1e-2 bfloat16): B=256, N=1M, d=256 in
  <= 1.0 ms; B=64, N=1M, d=64 in <= 0.2 ms; B=16, N=4M, d=256 within 1.15 x the floor; the first
  case in bf16 within 1.5 x its floor; d = 4096 and a sparse case for coverage.
* ``scaling``: N = 100k .. 10M (``--max-n``), d = 64, B = 64, sparse Q* (quantile 0.0005). CUDA:
  the dense kernel against the pruned kernel; target: pruning >= 5 x faster at N = 10M. CPU:
  the exact CPU routes, pruned reference and FAISS range search.
* ``cpu``: what runs on a CPU in minutes (reference only up to N = 20,000).
* ``cpu-fast``: the same grid for the fast CPU path (``cpu``, ``cpu-pruned``) against
  ``torch-compile``; target: the ``cpu`` row within 3 x the floor, faster than torch.compile,
  force error <= 1e-5 (float32 inputs).

Prints a markdown table (target and pass/fail where the case has one) and writes all reports as
one JSON list (``--out``); ``--summarize FILE`` prints a saved sweep as one row per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import product

from cspace.experiments.bench import bench_field
from cspace.io.files import write_file_atomic

GPU = ["torch-eager", "torch-compile", "triton"]


def preset(name: str, max_n: int, device: str) -> list[dict]:
    """Cases: bench_field keyword arguments plus optional ``target`` (backend, kind, value)."""
    if name == "targets":
        return [
            dict(b=256, n=1_000_000, d=256, q_quantile=0.5, backends=GPU,
                 target=("triton", "ms", 1.0)),
            dict(b=64, n=1_000_000, d=64, q_quantile=0.5, backends=GPU,
                 target=("triton", "ms", 0.2)),
            dict(b=16, n=4_000_000, d=256, q_quantile=0.5, backends=GPU,
                 target=("triton", "x_floor", 1.15)),
            dict(b=256, n=1_000_000, d=256, q_quantile=0.5, dtype="bfloat16", backends=GPU,
                 target=("triton", "x_floor", 1.5)),
            dict(b=64, n=100_000, d=4096, q_quantile=0.5, backends=GPU),
            dict(b=64, n=1_000_000, d=64, q_quantile=0.0005,
                 backends=[*GPU, "triton-pruned", "faiss-range"]),
        ]  # fmt: skip
    if name == "scaling":
        ns = [n for n in (100_000, 1_000_000, 3_000_000, 10_000_000) if n <= max_n]
        if device == "cpu":  # the exact CPU routes (the dense reference is hours at 10M)
            return [dict(b=64, n=n, d=64, q_quantile=0.0005, backends=["pruned", "faiss-range"])
                    for n in ns]  # fmt: skip
        return [
            dict(b=64, n=n, d=64, q_quantile=0.0005, backends=["triton", "triton-pruned"],
                 target=("triton-pruned", "speedup_over:triton", 5.0) if n >= 10_000_000 else None)
            for n in ns
        ]  # fmt: skip
    if name == "cpu":
        cases = []
        for b, n, d, q in product((16, 64), (20_000, 100_000), (64, 256), (0.5, 0.0005)):
            backends = ["pruned", "torch-eager", "torch-compile"]
            if q < 0.5:  # range search only where the range holds few obstacles
                backends.insert(1, "faiss-range")
            if n <= 20_000:
                backends = ["reference", *backends]
            cases.append(dict(b=b, n=n, d=d, q_quantile=q, backends=backends))
        return cases
    if name == "cpu-fast":  # the fast CPU path against the floor and torch.compile
        return [
            dict(b=b, n=n, d=d, q_quantile=q, backends=["cpu", "cpu-pruned", "torch-compile"],
                 target=("cpu", "cpu", 3.0))
            for b, n, d, q in product((16, 64), (20_000, 100_000), (64, 256), (0.5, 0.0005))
        ]  # fmt: skip
    raise ValueError(f"unknown preset {name!r}: targets, scaling, cpu or cpu-fast")


def check(rep: dict, target) -> tuple[float, bool] | None:
    """(measured value, met) for a case's target, or None."""
    if not target:
        return None
    backend, kind, value = target
    row = next(r for r in rep["rows"] if r["backend"] == backend)
    if kind == "cpu":  # within `value` x the floor, faster than torch.compile, error <= 1e-5
        other = next(r for r in rep["rows"] if r["backend"] == "torch-compile")
        ok = row["x_floor"] <= value and row["seconds"] < other["seconds"]
        return row["x_floor"], ok and row["force_rel_error"] <= 1e-5
    bound = 1e-2 if rep["dtype"] == "bfloat16" else 1e-3
    accurate = max(row["force_rel_error"], row["potential_rel_error"]) <= bound
    if kind == "ms":
        got = row["seconds"] * 1e3
        return got, accurate and got <= value
    if kind == "x_floor":
        return row["x_floor"], accurate and row["x_floor"] <= value
    other = next(r for r in rep["rows"] if r["backend"] == kind.split(":")[1])
    got = other["seconds"] / row["seconds"]
    return got, accurate and got >= value


def summarize(reports: list[dict]) -> str:
    """One row per case: the floor and every backend's multiple of it (largest error noted)."""
    names = list(dict.fromkeys(r["backend"] for rep in reports for r in rep["rows"]))
    lines = [
        "| B | N | d | dtype | Q* quantile | floor ms | " + " | ".join(names) + " |",
        "|---" * (6 + len(names)) + "|",
    ]
    for rep in reports:
        by = {r["backend"]: r for r in rep["rows"]}
        cells = []
        for name in names:
            r = by.get(name)
            cells.append("" if r is None else f"{r['x_floor']:.1f} x ({r['force_rel_error']:.0e})")
        lines.append(
            f"| {rep['b']} | {rep['n']:,} | {rep['d']} | {rep['dtype']} | {rep['q_star_quantile']} "
            f"| {rep['floor']['seconds'] * 1e3:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["targets", "scaling", "cpu", "cpu-fast"], default=None)
    p.add_argument("--b", default="64")
    p.add_argument("--n", default="100000")
    p.add_argument("--d", default="64")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--q", default="0.5,0.0005", help="Q* quantiles (0.5 dense, 0.0005 sparse)")
    p.add_argument("--backends", default=None, help="comma-separated (default: by device)")
    p.add_argument("--max-n", type=int, default=10_000_000, help="scaling preset: largest N")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the reports as one JSON list")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="print the summary table of a saved sweep (x floor, force error) and stop")  # fmt: skip
    args = p.parse_args()
    if args.summarize:
        with open(args.summarize) as fh:
            print(summarize(json.load(fh)))
        return 0
    if args.preset:
        cases = preset(args.preset, args.max_n, args.device)
    else:
        ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
        backends = args.backends.split(",") if args.backends else None
        cases = [
            dict(b=b, n=n, d=d, dtype=dt, q_quantile=float(q), backends=backends)
            for b, n, d, dt, q in product(ints(args.b), ints(args.n), ints(args.d),
                                          args.dtype.split(","), args.q.split(","))
        ]  # fmt: skip
    reports, failed = [], 0
    print("| B | N | d | dtype | Q* quantile | backend | median ms | x floor | force err | "
          "potential err | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        target = case.pop("target", None)
        rep = bench_field(device=args.device, repeats=args.repeats, **case)
        res = check(rep, target)
        rep["target"] = (
            None if res is None else {"spec": list(target), "got": res[0], "met": res[1]}
        )
        failed += res is not None and not res[1]
        reports.append(rep)
        for r in rep["rows"]:
            t = ""
            if res is not None and r["backend"] == target[0]:
                t = f"{target[1]} {target[2]}: {res[0]:.3g} {'met' if res[1] else 'NOT met'}"
            print(f"| {rep['b']} | {rep['n']:,} | {rep['d']} | {rep['dtype']} | "
                  f"{rep['q_star_quantile']} | {r['backend']} | {r['seconds'] * 1e3:.3f} | "
                  f"{r['x_floor']:.2f} | {r['force_rel_error']:.1e} | "
                  f"{r['potential_rel_error']:.1e} | {t} |", flush=True)  # fmt: skip
        if args.out:  # rewritten after every case: an interrupted sweep keeps what it measured
            write_file_atomic(args.out, json.dumps(reports, indent=1).encode())
    f = reports[0]["floor"] if reports else None
    if f:
        print(f"device {reports[0]['device']}; first case's floor: products "
              f"{f['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy {f['copy_bytes_per_s'] / 1e9:.0f} GB/s")  # fmt: skip
    if failed:
        print(f"{failed} target(s) NOT met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
