"""Wall-time overhead of ``guidance.integrations.diffusers.guide`` over the plain pipeline.

    python benchmarks/guide_overhead.py [--preset small|sd15] [--device cpu|cuda]
                                        [--repeats 7] [--steps 25] [--batch 4]
                                        [--obstacles 1000,100000] [--prune]
                                        [--backend auto|torch|triton|cpu]

Presets (random weights built from configs: a step's cost does not depend on them):

* ``small`` (CPU): DDIM with a UNet2DModel (6.8M parameters) on 3x32x32 images (d = 3,072).
* ``sd15`` (CUDA): Stable Diffusion 1.5's UNet (UNet2DConditionModel, 860M parameters, float16
  on CUDA)
  on 4x64x64 latents (d = 16,384), DDIM, classifier-free guidance (two UNet passes per step),
  ``prompt_embeds`` (B, 77, 768) and ``output_type="latent"`` (no text encoder, no VAE decode):
  the realistic denoiser step the field has to hide behind.

Runs: plain, ``guide`` with strength 0 (the wrapper only), and ``guide`` with each count of
``--obstacles`` out of reach (the field evaluated at every step by ``--backend``, no
displacement; ``auto`` is the fast CPU path on the CPU, the kernel on CUDA; ``--prune`` adds the
exact cluster pruning, whose k-means runs once, before the timing). Target on the CPU (``small``):
1,000 obstacles at d = 3,072 cost at most 5% of the plain pipeline's wall time.
Median wall time of ``--repeats`` runs each, interleaved, after one warm-up run; outputs are
checked to be identical (bit for bit on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from guidance import RepulsiveField
from guidance.integrations.diffusers import guide
from obstacles import ObstacleSet


def small_pipeline(device):
    unet = UNet2DModel(
        sample_size=32,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
    ).eval()
    pipe = DDIMPipeline(unet, DDIMScheduler()).to(device)

    def call(p, batch, steps):
        return p(batch_size=batch, num_inference_steps=steps, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    return pipe, call, unet, 3 * 32 * 32


def sd15_pipeline(device):
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), latent_channels=4, norm_num_groups=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip  # not run
    text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=100))  # fmt: skip
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    half = torch.float16 if device.type == "cuda" else torch.float32
    pipe = pipe.to(device, half)
    g = torch.Generator().manual_seed(1)
    embeds = {}

    def call(p, batch, steps):
        if batch not in embeds:
            embeds[batch] = [torch.randn(batch, 77, 768, generator=g).to(device, half)
                             for _ in range(2)]  # fmt: skip
        pos, neg = embeds[batch]
        return p(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=7.5,
                 num_inference_steps=steps, height=512, width=512, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    return pipe, call, unet, 4 * 64 * 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["small", "sd15"], default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--obstacles", default="1000,100000", help="comma-separated counts")
    p.add_argument("--prune", action="store_true", help="exact cluster pruning (k-means first)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cpu"])
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    build = small_pipeline if args.preset == "small" else sd15_pipeline
    pipe, call_, unet, d = build(dev)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    runs = {"plain": pipe, "guide, strength 0": guide(pipe, None, strength=0.0)}
    builds = {}
    for count in (int(v) for v in args.obstacles.split(",")):
        far = np.empty((count, d), dtype=np.float32)
        for s in range(0, count, 10_000):  # in chunks: 100k x 16,384 is 6.5 GB
            m = min(count, s + 10_000) - s
            far[s : s + m] = rng.standard_normal(size=(m, d), dtype=np.float32) + np.float32(1e3)
        t0 = time.perf_counter()
        field = RepulsiveField(
            ObstacleSet.from_embeddings(far, q_star=1.0), backend=args.backend,
            prune=True if args.prune else None,
        )  # fmt: skip
        builds[count] = time.perf_counter() - t0
        del far
        pruned = ", pruned" if args.prune else ""
        runs[f"guide, {count:,} obstacles out of reach ({args.backend}{pruned})"] = guide(
            pipe, field
        )

    def call(p_):
        out = call_(p_, args.batch, args.steps)
        sync()
        return out

    ref = call(pipe)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, p_ in runs.items():
        out = call(p_)  # warm-up (and the kernel's compilation)
        same = np.array_equal(np.asarray(out.cpu() if torch.is_tensor(out) else out),
                              np.asarray(ref.cpu() if torch.is_tensor(ref) else ref))  # fmt: skip
        assert same, f"{name}: output differs from the plain pipeline"
    for _ in range(args.repeats):
        for name, p_ in runs.items():
            t0 = time.perf_counter()
            call(p_)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    params = sum(x.numel() for x in unet.parameters()) / 1e6
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{args.preset}: UNet {params:.1f}M params, batch {args.batch}, {args.steps} DDIM steps, "
          f"d = {d}, {args.repeats} repeats, {where}, torch threads {torch.get_num_threads()}")  # fmt: skip
    for count, secs in builds.items():
        print(f"building the field of {count:,} obstacles (not timed below): {secs:.1f} s")
    print("| run | median s | per step ms | overhead |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {med:.3f} | {1e3 * med / args.steps:.2f} | {100 * (med / base - 1):+.2f}% |"
        )


if __name__ == "__main__":
    main()
