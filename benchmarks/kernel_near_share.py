"""The share of pairs the kernel's near-pair rule sends to the differences path.

    python benchmarks/kernel_near_share.py                       # the BENCHMARKS grid, CPU
    python benchmarks/kernel_near_share.py --b 256 --n 100000 --d 256 --q 0.5

For the blob problems of ``cspace bench field`` (B states, N obstacles, d, Q* the given quantile
of the state-obstacle distances: 0.5 dense, 0.0005 sparse) the rule of
:mod:`guidance.kernels.repulsive` is applied on the CPU to the same operands the kernel forms
(float32 inputs centred on the obstacles' mean in float32, rounded to tf32 for ``tf32``;
bfloat16 inputs as given), with float32 products (on a GPU the tensor cores' accumulation
differs in its last bits, not in the share): a pair takes the differences when
``s^ <= tau_near S`` or when it is neither certainly out of range nor within the bound's
``rho_max``. Printed per case and precision: that share, the share the old rule
(``s^ <= tau S``, tau = 1/4 tf32, 2^-6 otherwise) sent, and the share of pairs truly within Q*.
"""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cspace.experiments.bench import blob_problem
from guidance.kernels.bounds import kernel_rule

OLD_TAU = {"tf32": 0.25, "ieee": 2.0**-6, "bfloat16": 2.0**-6}
TAU_NEAR = {"tf32": 0.25, "ieee": 2.0**-6, "bfloat16": 2.0**-6}


def _tf32(v: torch.Tensor) -> torch.Tensor:
    return ((v.contiguous().view(torch.int32) + 4096) & -8192).view(torch.float32)


def shares(b: int, n: int, d: int, q_quantile: float, kind: str) -> tuple[float, float, float]:
    """(new rule's share, old rule's share, share within Q*) for one problem and precision."""
    emb, x, q = blob_problem(n, d, b, q_quantile)
    o = torch.from_numpy(emb)
    x = torch.from_numpy(x).float()
    if kind == "bfloat16":
        o, x = o.to(torch.bfloat16).float(), x.to(torch.bfloat16).float()
        oc, xc = o, x
    else:
        c = o.double().mean(dim=0).float()
        oc, xc = o - c, x - c
        if kind == "tf32":
            oc, xc = _tf32(oc), _tf32(xc)
    rule = kernel_rule("tf32" if kind == "bfloat16" else kind, d, bf16=kind == "bfloat16")
    xn = xc.double().pow(2).sum(1).float()
    on = oc.double().pow(2).sum(1).float()
    new = old = inside = 0
    for s in range(0, n, 8192):
        blk, onb = oc[s : s + 8192], on[s : s + 8192]
        norms = xn[:, None] + onb[None, :]
        sq = torch.clamp(norms - 2 * (xc @ blk.T), min=0)
        shift = rule.u_op * (1 + 2 * rule.u_op) * (xn.sqrt()[:, None] + onb.sqrt()[None, :])
        lower = torch.sqrt(torch.clamp(sq - rule.gamma * norms, min=0)) * (1 - 1e-6) - shift
        out_sure = lower > q * (1 + 1e-6)
        accurate = sq * (1 / rule.tau) >= norms
        close = (sq <= TAU_NEAR[kind] * norms) | (~out_sure & ~accurate)
        new += int(close.sum())
        old += int((sq <= OLD_TAU[kind] * norms).sum())
        exact = torch.cdist(x.double(), o[s : s + 8192].double())
        inside += int((exact <= q).sum())
    total = b * n
    return new / total, old / total, inside / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--b", default="16,64")
    p.add_argument("--n", default="20000,100000")
    p.add_argument("--d", default="64,256")
    p.add_argument("--q", default="0.5,0.0005")
    p.add_argument("--kinds", default="tf32,ieee,bfloat16")
    args = p.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    print("| B | N | d | Q* quantile | precision | differences (new rule) | old rule | in range |")
    print("|---|---|---|---|---|---|---|---|")
    last = ""
    for b, n, d, qq, kind in product(ints(args.b), ints(args.n), ints(args.d),
                                     [float(v) for v in args.q.split(",")],
                                     args.kinds.split(",")):  # fmt: skip
        new, old, inside = shares(b, n, d, qq, kind)
        last = f"{kind}: {100 * new:.1f}% of pairs to differences ({100 * inside:.1f}% in range)"
        print(f"| {b} | {n:,} | {d} | {qq} | {kind} | {100 * new:.2f}% | {100 * old:.2f}% | "
              f"{100 * inside:.2f}% |", flush=True)  # fmt: skip
    print(last)


if __name__ == "__main__":
    main()
