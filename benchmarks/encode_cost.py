"""Encode cost per image on this machine: what building a large obstacle set costs.

    python benchmarks/encode_cost.py [--images 4] [--repeats 2] [--threads 1]
        [--out benchmarks/results/encode_cost_cpu.json]

Two encoders, CPU, ``--threads`` torch threads, batch = ``--images``, median of ``--repeats``
after one warm-up:

* an ``AutoencoderKL`` with Stable Diffusion 1.x's VAE configuration (block channels 128, 256,
  512, 512, two layers per block, 4 latent channels; random weights: the same operations and
  cost as the trained VAE, which this offline machine does not have), 3 x 512 x 512 images ->
  4 x 64 x 64 latents (the mean of the posterior, as ``cspace obstacles build`` uses);
* the shipped digits encoder (``load_encoder("digits")``), 1 x 8 x 8 images -> 32 numbers.

Prints seconds per image and the projected time for 1,000,000 images on W workers
(``1e6 x s / W``, W = 1, 8, 64: encoding is embarrassingly parallel across shards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ).eval()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rep = dict(threads=args.threads, batch=args.images, repeats=args.repeats)
    vae = sd_vae()
    x = torch.rand(args.images, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        lat_shape = tuple(vae.encode(x[:1]).latent_dist.mean.shape[1:])
        times = timed(lambda: vae.encode(x).latent_dist.mean, args.repeats)
    s = statistics.median(times) / args.images
    rep["sd_vae"] = dict(
        image="3 x 512 x 512", latent=list(lat_shape), seconds_per_image=s, times_s=times,
        projected_hours_1m_images={w: 1e6 * s / w / 3600 for w in (1, 8, 64)},
    )  # fmt: skip
    from cspace.models.encoders import load_encoder

    enc = load_encoder("digits")
    xd = torch.rand(1024, 1, 8, 8) * 2 - 1
    times = timed(lambda: enc.embed(enc.encode(xd, batch_size=256)), args.repeats)
    s = statistics.median(times) / 1024
    rep["digits"] = dict(
        image="1 x 8 x 8", seconds_per_image=s, times_s=times, batch=1024,
        projected_hours_1m_images={w: 1e6 * s / w / 3600 for w in (1, 8, 64)},
    )  # fmt: skip
    rep.update(
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        load_average_at_end=os.getloadavg(),
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(rep, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")


if __name__ == "__main__":
    main()
