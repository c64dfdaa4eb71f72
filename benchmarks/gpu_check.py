"""One command for a machine with a GPU: compile the kernel, check it, time it, one table last.

    python benchmarks/gpu_check.py [--deadline 450] [--cases 1000] [--out gpu_check.json]

Steps, each timed and bounded so that the whole stays under 8 minutes (a deadline of
``--deadline`` seconds, 450 by default: a step that would start after it is reported as skipped,
and every subprocess gets at most the time left):

1. **compile**: the fused kernel's first call for float32 (tf32 and float32 products) and
   bfloat16 states (Triton compiles on first use; the time is reported);
2. **correctness**: ``tests/triton_checks.py`` (seed 0: every case of the CI interpreter run, on
   the GPU) and ``tests/kernel_bounds.py --cases N`` (the stated bound on random small problems);
3. **speed targets** of BENCHMARKS.md (``benchmarks/field_sweep.py --preset targets``: B=256,
   N=1M, d=256 in <= 1.0 ms; B=64, N=1M, d=64 in <= 0.2 ms; B=16, N=4M, d=256 within 1.15 x the
   floor; bf16 within 1.5 x its floor; each with its accuracy bound), skipping the cases the
   deadline cannot hold;
4. **the near-pair share**: the share of pairs the kernel's rule sends to the differences path on
   the first target case (``benchmarks/kernel_near_share.py``).

Prints one markdown table last (step, result, value, target, pass) and writes it as JSON
(``--out``). Exit code 0 when everything passed, 1 when a check or target failed, 2 without a
CUDA device or Triton (a one-line message, nothing run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _no_gpu() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False): run this on a GPU machine"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    return None


def _script(args: list[str], timeout: float) -> tuple[bool, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        tail = tail[0] if tail else f"exit code {proc.returncode}"
    return proc.returncode == 0, tail, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deadline", type=float, default=450.0, help="seconds for everything")
    p.add_argument("--cases", type=int, default=1000, help="random problems for the bound")
    p.add_argument("--out", default=None, help="write the table as JSON")
    args = p.parse_args()
    why = _no_gpu()
    if why:
        print(f"gpu_check: {why}; nothing was run", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from field_sweep import check, preset

    from cspace.experiments.bench import bench_field
    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    start = time.perf_counter()
    rows: list[dict] = []

    def left(most: float) -> float:
        return max(1.0, min(most, args.deadline - (time.perf_counter() - start)))

    def add(step, ok, value, target=""):
        rows.append(dict(step=step, passed=bool(ok), value=value, target=target))
        print(f"{step}: {'pass' if ok else 'FAIL'} ({value})", flush=True)

    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    # 1. compile
    rng = np.random.default_rng(0)
    oset = ObstacleSet.from_embeddings(rng.normal(size=(300, 64)), q_star=8.0)
    for name, dtype, precision in (
        ("compile tf32", torch.float32, "tf32"),
        ("compile float32 products", torch.float32, "ieee"),
        ("compile bfloat16", torch.bfloat16, "tf32"),
    ):
        t0 = time.perf_counter()
        try:
            out = RepulsiveField(oset, backend="triton", precision=precision).evaluate(
                torch.randn(8, 64, device=dev).to(dtype)
            )
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(out.force.float()).all())
            add(name, ok, f"{time.perf_counter() - t0:.1f} s")
        except Exception as err:  # report and go on: the table says what failed
            add(name, False, f"{type(err).__name__}: {err}"[:120])
    # 2. correctness
    ok, tail, secs = _script(["tests/triton_checks.py"], left(120))
    add("triton_checks.py (seed 0)", ok, f"{tail} ({secs:.0f} s)")
    ok, tail, secs = _script(["tests/kernel_bounds.py", "--cases", str(args.cases)], left(120))
    add(f"kernel_bounds.py ({args.cases} problems)", ok, f"{tail} ({secs:.0f} s)")
    # 3. speed targets, while at least 60 s remain for a case and 40 s for step 4
    for case in preset("targets", 10_000_000, "cuda"):
        target = case.pop("target", None)
        if target is None:
            continue
        label = f"B={case['b']} N={case['n']:,} d={case['d']} {case.get('dtype', 'float32')}"
        if args.deadline - (time.perf_counter() - start) < 100:
            add(f"target {label}", False, "skipped: out of time", f"{target[1]} {target[2]}")
            continue
        try:
            rep = bench_field(device="cuda", repeats=5, **case)
            got, met = check(rep, target)
            row = next(r for r in rep["rows"] if r["backend"] == target[0])
            add(f"target {label}", met,
                f"{got:.3g} (x floor {row['x_floor']:.2f}, force err {row['force_rel_error']:.1e})",
                f"{target[1]} <= {target[2]}")  # fmt: skip
        except Exception as err:
            add(f"target {label}", False, f"{type(err).__name__}: {err}"[:120])
        torch.cuda.empty_cache()
    # 4. the share of pairs sent to the differences path
    ok, tail, secs = _script(
        ["benchmarks/kernel_near_share.py", "--n", "100000", "--b", "256", "--d", "256"], left(60)
    )
    add("near-pair share (dense, tf32)", ok, tail)
    total = time.perf_counter() - start
    print(f"\ngpu_check: {total:.0f} s in all")
    print("| step | result | value | target |")
    print("|---|---|---|---|")
    for r in rows:
        result = "pass" if r["passed"] else "FAIL"
        print(f"| {r['step']} | {result} | {r['value']} | {r['target']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(seconds=total, rows=rows), indent=1))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
