"""Relative error of the fused kernel against the float64 reference on random dense problems.

    python benchmarks/kernel_accuracy.py [--device cpu|cuda] [--dims 8,16,64,256,1024]
                                         [--seeds 12] [--b 16] [--n 64] [--precision tf32]

Each problem: B states and N obstacles drawn from N(0, I_d), Q* = the median state-obstacle
distance (dense: every state sees half the obstacles, most pairs close to their threshold,
where the potential is most sensitive to a distance error). Prints, per d, the median and the
largest of ``max(potential error, force error)`` over the seeds (relative, in norm). On
``--device cpu`` the kernel runs in Triton's interpreter (set here, before triton is imported),
with the tf32 operand rounding the GPU uses.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dims", default="8,16,64,256,1024")
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--b", type=int, default=16)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--precision", default="tf32", choices=["tf32", "tf32x3", "ieee"])
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch

    from guidance import RepulsiveField
    from obstacles import ObstacleSet

    torch.set_num_threads(1)

    def rel(a, b):
        return float((a.double().cpu() - b).norm() / b.norm())

    print(f"kernel vs float64 reference, {args.precision}, B={args.b}, N={args.n}, "
          f"Q* = median distance, {args.seeds} seeds, device {args.device}")  # fmt: skip
    print("| d | median error | largest error |")
    print("|---|---|---|")
    for d in (int(v) for v in args.dims.split(",")):
        errs = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(100 + seed)
            o, x = rng.normal(size=(args.n, d)), rng.normal(size=(args.b, d))
            q = float(np.median(np.linalg.norm(x[:, None] - o[None], axis=2)))
            oset = ObstacleSet.from_embeddings(o, q_star=q)
            xt = torch.from_numpy(x)
            ref = RepulsiveField(oset, backend="torch").evaluate(xt)
            ker = RepulsiveField(oset, backend="triton", precision=args.precision)
            out = ker.evaluate(xt.float().to(args.device))
            errs.append(max(rel(out.potential, ref.potential), rel(out.force, ref.force)))
        print(f"| {d} | {np.median(errs):.1e} | {max(errs):.1e} |")


if __name__ == "__main__":
    main()
