"""Wall-time overhead of ``guidance.integrations.diffusers.guide`` over the plain pipeline.

    python benchmarks/guide_overhead.py [--repeats 7] [--steps 25] [--batch 4] [--obstacles 1000]

A DDIM pipeline with a UNet2DModel (6.8M parameters) on 3x32x32 images (random weights; the
cost of a step does not depend on them), run plain, through ``guide`` with strength 0 (the field
off: only the wrapper), and through ``guide`` with ``--obstacles`` obstacles out of reach (the
field evaluated at every step, no displacement). Median wall time of ``--repeats`` runs each,
interleaved, after one warm-up run; outputs are checked to be bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from guidance import RepulsiveField
from guidance.integrations.diffusers import guide
from obstacles import ObstacleSet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--obstacles", type=int, default=1000)
    args = p.parse_args()
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
    ).eval()
    pipe = DDIMPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    d = 3 * 32 * 32
    far = ObstacleSet.from_embeddings(
        np.random.default_rng(0).normal(size=(args.obstacles, d)) + 1e3, q_star=1.0
    )
    runs = {
        "plain": pipe,
        "guide, strength 0": guide(pipe, RepulsiveField(far), strength=0.0),
        f"guide, {args.obstacles} obstacles out of reach": guide(pipe, RepulsiveField(far)),
    }

    def call(p):
        return p(batch_size=args.batch, num_inference_steps=args.steps, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    ref = call(pipe)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, p_ in runs.items():
        assert np.array_equal(call(p_), ref), name  # warm-up, and bit-identical
    for _ in range(args.repeats):
        for name, p_ in runs.items():
            t0 = time.perf_counter()
            call(p_)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    params = sum(x.numel() for x in unet.parameters()) / 1e6
    print(f"UNet {params:.1f}M params, batch {args.batch}, {args.steps} DDIM steps, "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| run | median s | overhead |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {100 * (med / base - 1):+.2f}% |")


if __name__ == "__main__":
    main()
