"""``guide`` on the shipped Fashion-MNIST pipeline against rejection sampling given up to 1.5 x
its NFE (at equal NFE rejection cannot draw again): the judge's share of one class, plain,
rejected and guided by that class's obstacle set, over classes, strengths and seeds
(docs/fashion.md, "`guide` on the shipped pipeline").

    python benchmarks/fashion_guide.py --classes 2 --strengths 2,5,20,50,150 --seeds 0,1 \\
        --rejection 0                                    # guide alone, the shares
    python benchmarks/fashion_guide.py --classes 0-4 --strengths 50,150 --seeds 0,1,2 \\
        --steps 10 --scheduler heun \\
        --out benchmarks/results/fashion_guide_vs_rejection_heun10_0-4.json   # and 5-9
    python benchmarks/fashion_guide.py --summarize benchmarks/results/fashion_guide_vs_rejection_heun10_*.json

The obstacle set is the demo's (:func:`cspace.experiments.demo.demo_obstacles`: the class's 50
shipped examples in the aligned VAE's C-space, which is the pipeline's latent space). For each
class and seed, with the pipeline's own loop (``--steps``; its Euler scheduler, or ``--scheduler
heun``) and one seed's noises:

* ``unguided``: ``--n`` plain images;
* ``rejection``: ``--rejection`` x ``--n`` plain draws (the first ``--n`` are the unguided arm's
  noises), each tested by the set's exact membership test (inside an obstacle's hard radius:
  :func:`guidance.fields.regions.hard_regions`, the demo's rejection arm) on its final latents;
  the first ``--n`` outside are returned and decoded. Every draw is paid for, so its NFE per
  returned sample is ``--rejection`` x the unguided arm's; ``needed`` is what a one-at-a-time
  sampler would have spent to reach the n-th success;
* ``guided s``: ``guide(pipe, RepulsiveField(set), strength=s)`` on the same noises, at the
  unguided arm's NFE (the field costs no model call).

Each arm is scored by the judge (never used for guidance) with the demo's targets
(``benchmarks/demo_table.py``'s ``verdict``, renormalised shift): the class's share <= 10% of
unguided, no other class's share moved by more than 3 points once the class is taken out of
both, mean confidence down by <= 2 points, NFE per sample <= 1.5 x unguided. The script prints
one markdown row per class, seed and arm, then per arm the classes on which it passes on every
seed; ``--out`` writes every figure as JSON (atomically), and ``--summarize A.json B.json``
prints the summary of several such files (a run split by ``--classes`` over two processes).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from demo_table import (  # the script folder is on sys.path
    MAX_NFE,
    _floats,
    _ints,
    unpaired_floor,
    verdict,
    why,
)


def summary(reports: list[dict]) -> list[str]:
    """Per arm (markdown rows): the classes on which it passes on every seed, the runs it
    passes, and each class's share (mean over its seeds, unguided -> the arm)."""
    classes = list(dict.fromkeys(r["settings"]["avoid_class"] for r in reports))
    out = ["| arm | classes passing on every seed | runs passing | class share, mean over seeds "
           "(unguided -> arm) |", "|---|---|---|---|"]  # fmt: skip

    def order(arm: str) -> tuple[bool, float]:  # rejection, then guide by strength
        return (arm != "rejection", float(arm.split()[1]) if arm.startswith("guided") else 0.0)

    for arm in sorted((a for a in reports[0]["arms"] if a != "unguided"), key=order):
        good, shares = [], []
        for c in classes:
            mine = [r for r in reports if r["settings"]["avoid_class"] == c]
            if all(r["arms"][arm]["verdict"]["pass"] for r in mine):
                good.append(c)
            u = sum(r["arms"]["unguided"]["avoided_rate"] for r in mine) / len(mine)
            a = sum(r["arms"][arm]["avoided_rate"] for r in mine) / len(mine)
            shares.append(f"{c}: {100 * u:.1f} -> {100 * a:.1f}%")
        runs = sum(r["arms"][arm]["verdict"]["pass"] for r in reports)
        out.append(f"| {arm} | {len(good)} of {len(classes)} ({', '.join(map(str, good)) or 'none'})"
                   f" | {runs}/{len(reports)} | {'; '.join(shares)} |")  # fmt: skip
    # what the shift target can read at this n for an arm with its own noise
    floors = [unpaired_floor(r["arms"]["unguided"]["class_shares"], r["settings"]["avoid_class"],
                             r["arms"]["unguided"]["n"]) for r in reports]  # fmt: skip
    med, p = [f[0] for f in floors], [100 * f[1] for f in floors]
    out.append(
        f"\nAn exact sampler of the unguided law without the class, with its own noise and "
        f"{reports[0]['arms']['unguided']['n']} images: median largest renormalised shift "
        f"{min(med):.1f}-{max(med):.1f} points, within 3 points {min(p):.0f}-{max(p):.0f}% of the "
        "time (demo_table.unpaired_floor, per run)."
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=_ints, default=[2],
                    help="the classes to avoid, one at a time: 2, 0,4,6 or 0-9 (default 2, "
                    "Pullover)")  # fmt: skip
    ap.add_argument("--strengths", type=_floats, default=[2.0, 5.0, 20.0, 50.0, 150.0],
                    help="guide's strengths, comma-separated (default 2,5,20,50,150)")  # fmt: skip
    ap.add_argument("--seeds", type=_ints, default=[0, 1],
                    help="generator seeds, comma-separated (default 0,1)")  # fmt: skip
    ap.add_argument("--n", type=int, default=200, help="images per arm (default 200)")
    ap.add_argument("--steps", type=int, default=10,
                    help="the pipeline's steps (default 10)")  # fmt: skip
    ap.add_argument("--scheduler", choices=("euler", "heun"), default="euler",
                    help="the pipeline's own FlowMatchEulerDiscreteScheduler (default) or diffusers' "
                    "FlowMatchHeunDiscreteScheduler from its config (2 x --steps - 1 NFE)")  # fmt: skip
    ap.add_argument("--rejection", type=float, default=MAX_NFE,
                    help=f"rejection's draws per returned image, its NFE over unguided "
                    f"(default {MAX_NFE}, the targets' limit; 0: no rejection arm)")  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON file for the figures (written atomically)")
    ap.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                    help="print the per-arm summary of these --out files (e.g. the halves of a run "
                    "split by --classes) and exit")  # fmt: skip
    args = ap.parse_args()
    if args.summarize:
        import json
        from pathlib import Path

        reports = [r for f in args.summarize for r in json.loads(Path(f).read_text())["reports"]]
        print("\n".join(summary(reports)))
        return
    if bad := [c for c in args.classes if not 0 <= c <= 9]:
        ap.error(f"--classes {bad}: Fashion-MNIST has classes 0-9")
    if args.n < 1 or args.steps < 1:
        ap.error(f"--n {args.n} and --steps {args.steps} must be >= 1")
    if args.rejection != 0 and args.rejection < 1:
        ap.error(f"--rejection {args.rejection}: at least 1 draw per returned image, or 0 for none")
    if any(s < 0 for s in args.strengths):
        ap.error(f"--strengths {args.strengths}: guide's strength must be >= 0")
    torch.set_num_threads(1)
    from cspace.experiments.demo import demo_obstacles, settings_for
    from cspace.models.encoders import Encoder
    from cspace.models.fashion_judge import default_fashion_judge
    from cspace.models.latent_pipeline import load_latent_pipeline
    from cspace.models.shipped import shipped
    from guidance import RepulsiveField
    from guidance.fields.regions import hard_regions
    from guidance.integrations.diffusers import guide

    pipe = load_latent_pipeline(shipped("fashion_pipeline"))
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler == "heun":
        from guidance.integrations.pipelines import heun_scheduler

        pipe.scheduler = heun_scheduler(pipe.scheduler)
    nfe = 2 * args.steps - 1 if args.scheduler == "heun" else args.steps
    enc = Encoder.from_aligned(shipped("fashion_vae_aligned"))
    judge = default_fashion_judge()
    n = args.n
    cfg = pipe.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def judged(images: torch.Tensor, c: int, nfe_per_sample: float) -> dict:
        r = judge.report(images * 2 - 1)
        return {"avoided_rate": r["class_shares"][c], "class_shares": r["class_shares"],
                "judge_confidence": r["confidence"], "nfe": nfe_per_sample,
                "n": r["n"]}  # fmt: skip

    reports = []
    t0 = time.perf_counter()
    print("| class | seed | arm | NFE per image | class share | confidence | renormalised "
          "shift | passes (misses) |\n|---|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
    for c in args.classes:
        oset, _ = demo_obstacles(enc, settings_for("fashion", avoid_class=c))
        field = RepulsiveField(oset)
        inside = hard_regions(field)
        for seed in args.seeds:
            m = max(n, math.floor(args.rejection * n))  # rejection's draws; the first n: plain
            noise = torch.randn((m, *shape), generator=torch.Generator().manual_seed(seed))
            lat = pipe(batch_size=m, num_inference_steps=args.steps, latents=noise,
                       output_type="latent").images  # fmt: skip
            arms = {"unguided": judged(pipe.decode_latents(lat[:n]), c, nfe)}
            extra = {}
            if args.rejection:
                free = torch.nonzero(~inside.inside(lat.reshape(m, -1))).flatten()
                kept = free[:n]
                if kept.numel() == 0:
                    raise SystemExit(f"class {c}, seed {seed}: none of {m} draws is outside the "
                                     "set; raise --rejection")  # fmt: skip
                # every draw is paid for, over the images returned (fewer than n when short)
                per_image = m * nfe / int(kept.numel())
                arms["rejection"] = judged(pipe.decode_latents(lat[kept]), c, per_image)
                extra["rejection"] = {
                    "draws": m, "accepted": int(free.numel()), "shortfall": n - int(kept.numel()),
                    "inside_first_n": int(n - (free < n).sum()),
                    "needed_nfe_per_image": (int(kept[-1]) + 1) * nfe / n
                    if kept.numel() == n else None,
                }  # fmt: skip
            for s in args.strengths:
                x = guide(pipe, field, strength=s)(batch_size=n, num_inference_steps=args.steps,
                                                   latents=noise[:n]).images  # fmt: skip
                arms[f"guided {s:g}"] = judged(x, c, nfe)
            report = {"settings": {"avoid_class": c, "seed": seed}, "arms": arms, "extra": extra}
            for arm, a in arms.items():
                v = None if arm == "unguided" else verdict(report, arm, "renormalised")
                if v is not None:
                    a["verdict"] = v
                print(
                    f"| {c} | {seed} | {arm} | {a['nfe']:.1f} | {100 * a['avoided_rate']:.1f}% | "
                    f"{100 * a['judge_confidence']:.2f}% | "
                    + ("-" if v is None else f"{v['renorm_shift']:+.1f} ({v['renorm_class']})")
                    + " | "
                    + ("-" if v is None else ("yes" if v["pass"] else f"no ({why(v)})"))
                    + " |",
                    flush=True,
                )
            reports.append(report)
    print(f"\n({time.perf_counter() - t0:.0f} s)\n")
    print("\n".join(summary(reports)))
    if args.out:
        from cspace.io.files import write_json_atomic

        write_json_atomic(args.out, {
            "n": n, "steps": args.steps, "scheduler": args.scheduler, "nfe_per_image": nfe,
            "rejection_draws_per_image": args.rejection, "seeds": args.seeds,
            "classes": args.classes, "strengths": args.strengths, "reports": reports,
        })  # fmt: skip


if __name__ == "__main__":
    main()
