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


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_the_reference_in_the_interpreter(seed):
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEED": str(seed), "OMP_NUM_THREADS": "1"}
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
    assert proc.stdout.count("\n") >= 8  # every case ran


def test_backend_argument():
    import numpy as np

    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    oset = ObstacleSet.from_embeddings(np.zeros((1, 2)), q_star=1.0)
    with pytest.raises(ValueError, match="backend must be"):
        RepulsiveField(oset, backend="cuda")
    import torch

    # auto on CPU states: the reference
    assert RepulsiveField(oset)._use_kernel(torch.zeros(1, 2)) is False
