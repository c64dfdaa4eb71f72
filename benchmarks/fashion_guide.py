"""``guide`` on the shipped Fashion-MNIST pipeline: the judge's share of one class, plain and
guided by that class's obstacle set, over strengths and seeds (docs/fashion.md, "`guide` on the
shipped pipeline").

    python benchmarks/fashion_guide.py --class 2 --strengths 2,5,20,50,150 --seeds 0,1 \
        --out benchmarks/results/fashion_guide_class2.json

The obstacle set is the demo's (:func:`cspace.experiments.demo.demo_obstacles`: the class's 50
shipped examples in the aligned VAE's C-space); each run samples ``--n`` images with the
pipeline's own loop (``--steps``; its Euler scheduler, or ``--scheduler heun``), plain and
through ``guide(pipe, RepulsiveField(set), strength=s)``, from the same generator seed, and
prints one markdown row per strength; ``--out`` writes the shares (percent, per seed) as JSON.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--class", dest="cls", type=int, default=2,
                    help="the class to avoid, 0-9 (default 2, Pullover)")  # fmt: skip
    ap.add_argument("--strengths", default="2,5,20,50,150",
                    help="guide's strengths, comma-separated (default 2,5,20,50,150)")  # fmt: skip
    ap.add_argument("--seeds", default="0,1", help="generator seeds, comma-separated")
    ap.add_argument("--n", type=int, default=200, help="images per run (default 200)")
    ap.add_argument("--steps", type=int, default=10,
                    help="the pipeline's steps (default 10)")  # fmt: skip
    ap.add_argument("--scheduler", choices=("euler", "heun"), default="euler",
                    help="the pipeline's own FlowMatchEulerDiscreteScheduler (default) or diffusers' "
                    "FlowMatchHeunDiscreteScheduler from its config (2 x --steps - 1 NFE)")  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON file for the shares (written atomically)")
    args = ap.parse_args()
    if not 0 <= args.cls <= 9:
        ap.error(f"--class {args.cls}: Fashion-MNIST has classes 0-9")
    torch.set_num_threads(1)
    from cspace.experiments.demo import demo_obstacles, settings_for
    from cspace.models.encoders import Encoder
    from cspace.models.fashion_judge import default_fashion_judge
    from cspace.models.latent_pipeline import load_latent_pipeline
    from cspace.models.shipped import shipped
    from guidance import RepulsiveField
    from guidance.integrations.diffusers import guide

    pipe = load_latent_pipeline(shipped("fashion_pipeline"))
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler == "heun":
        from guidance.integrations.pipelines import heun_scheduler

        pipe.scheduler = heun_scheduler(pipe.scheduler)
    enc = Encoder.from_aligned(shipped("fashion_vae_aligned"))
    judge = default_fashion_judge()
    oset, _ = demo_obstacles(enc, settings_for("fashion", avoid_class=args.cls))
    seeds = [int(v) for v in args.seeds.split(",")]

    def share(p, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        x = p(batch_size=args.n, num_inference_steps=args.steps, generator=g).images
        return 100 * judge.report(x * 2 - 1)["class_shares"][args.cls]

    plain = {seed: share(pipe, seed) for seed in seeds}
    print("| strength | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    rows = []
    for strength in (float(v) for v in args.strengths.split(",")):
        guided_pipe = guide(pipe, RepulsiveField(oset), strength=strength)
        guided = {s: share(guided_pipe, s) for s in seeds}
        rows.append({"strength": strength, "guided_share_pct": guided})
        cells = [f"{plain[s]:.1f}% -> {guided[s]:.1f}%" for s in seeds]
        print(f"| {strength:g} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        from cspace.io.files import write_json_atomic

        write_json_atomic(args.out, {
            "class": args.cls, "n": args.n, "steps": args.steps, "seeds": seeds,
            "scheduler": args.scheduler,
            "plain_share_pct": plain, "rows": rows,
        })  # fmt: skip


if __name__ == "__main__":
    main()
