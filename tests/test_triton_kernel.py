"""The Triton kernel of the field against the float64 reference, in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the checks run in a fresh
process (tests/triton_checks.py), at small sizes (the interpreter is 15x to 3,300x slower than
torch). On a GPU the same checks run with ``python tests/triton_checks.py`` without the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_kernel_matches_the_reference_in_the_interpreter():
    """The structured cases of tests/triton_checks.py (splits, segments, pruning, offsets, the
    kernel's range) at one seed; random problems are kernel_bounds.py's (the tests below)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_checks.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all kernel checks passed" in proc.stdout
    assert proc.stdout.count("\n") >= 15  # every case ran


def _bounds(cases: int, seed: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            str(HERE / "kernel_bounds.py"),
            "--cases",
            str(cases),
            "--seed",
            str(seed),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=HERE.parent,
    )


def test_kernel_keeps_its_bound_on_small_random_problems():
    """The near-pair rule from the error bound (guidance.kernels.bounds), in the interpreter:
    the reported case (one state, one obstacle, d = 3, Q* = sqrt(3), tf32: relative force error
    3.9e-3 with the old rule tau = 1/4) and 90 random problems (B, N 1..8, d 1..70, Q* from the
    smallest to the largest pair distance, common offsets; tf32, float32 products, bfloat16)."""
    proc = _bounds(90, 0)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "bound held on every case" in proc.stdout
    assert proc.stdout.count("cases: largest error") == 3  # every kind ran


@pytest.mark.slow
def test_kernel_keeps_its_bound_on_a_thousand_problems():
    proc = _bounds(1000, 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "bound held on every case" in proc.stdout


def test_backend_argument():
    import numpy as np

    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    oset = ObstacleSet.from_embeddings(np.zeros((1, 2)), q_star=1.0)
    with pytest.raises(ValueError, match="backend must be"):
        RepulsiveField(oset, backend="cuda")
    with pytest.raises(ValueError, match="precision must be"):
        RepulsiveField(oset, precision="fp16")
    import torch

    # auto on CPU states, or float64 states anywhere: the reference
    assert RepulsiveField(oset).kernel.usable(torch.zeros(1, 2)) is False
    assert RepulsiveField(oset).kernel.usable(torch.zeros(1, 2), torch.float64) is False


def test_tf32_rounding_is_to_nearest():
    import torch

    from guidance.kernels.repulsive import round_tf32, sq_norms

    v = torch.tensor([1 + 2**-11 + 2**-12, 1 + 2**-12, -(1 + 2**-11 + 2**-12), 3.0])
    r = round_tf32(v)
    # 10 mantissa bits kept: 1 + 2^-11 + 2^-12 rounds up to 1 + 2^-10, 1 + 2^-12 down to 1
    assert r.tolist() == [1 + 2**-10, 1.0, -(1 + 2**-10), 3.0]
    x = torch.tensor([[1 + 2**-12, 0.0]])
    assert float(sq_norms(x, "tf32")[0]) == 1.0 and float(sq_norms(x, "ieee")[0]) > 1.0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter set globally")
def test_kernel_on_cpu_tensors_says_how_to_run():
    import numpy as np
    import torch

    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    oset = ObstacleSet.from_embeddings(np.zeros((3, 2)), q_star=1.0)
    with pytest.raises(ValueError, match="backend='torch'"):
        RepulsiveField(oset, backend="triton").evaluate(torch.zeros(2, 2))


_FLOAT32_LIMITS = """
import numpy as np, torch
from guidance import RepulsiveField
from obstacles import ObstacleSet

def one(q, eta, **kw):
    oset = ObstacleSet.from_embeddings(np.zeros((1, 2)), q_star=q, eta=eta)
    return RepulsiveField(oset, backend="triton", **kw)

# a state 1e-22 from an obstacle pushing with 7.6e18: the kernel's direction |F|/D overflows
# float32 (NaN force); the field recomputes that row with the reference
near = one(1e-5, 1.0)
x = torch.tensor([[1e-22, 0.0], [0.5, 0.5]], dtype=torch.float32)
assert near.kernel.usable(x.double(), torch.float32)
out = near.evaluate(x)
assert bool(torch.isfinite(out.force).all()), out.force
cap32 = float(torch.tensor(near.max_force, dtype=torch.float32))  # the reference's, cast
assert out.force[0].tolist() == [cap32, 0.0] and out.force[1].tolist() == [0.0, 0.0]
# eta = 1e40 is inf in float32 (inf * 0 at D = Q*): outside the kernel's range, so the
# reference runs, with U = F = 0 exactly at D = Q*
strong = one(1.0, 1e40, max_force=1.0, max_potential=1.0)
y = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float32)
assert not strong.kernel.usable(y.double(), torch.float32)
res = strong.evaluate(y)
assert res.potential.tolist() == [0.0, 1.0] and res.force.tolist() == [[0.0, 0.0], [1.0, 0.0]]
# rho_min = 1e-46 is 0 in float32: outside the range too
assert not one(1.0, 1.0, min_distance_ratio=1e-46, max_force=1.0).kernel.usable(
    y.double(), torch.float32
)
print("float32 limits ok")
"""


def test_kernel_range_and_rows_it_cannot_hold():
    """In Triton's interpreter: parameters beyond float32 send the field to the reference, and
    rows whose float32 sums come back NaN or Inf are recomputed by the reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FLOAT32_LIMITS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "float32 limits ok" in proc.stdout
