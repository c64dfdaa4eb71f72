"""The demo's figures over classes, C-spaces and seeds, or over a grid of field settings.

Every figure about ``cspace demo`` in the README comes from this script::

    # every class, both C-spaces, three seeds (about 15 min on 2 CPU cores)
    python benchmarks/demo_table.py --classes 0-9 --encoders digits,digits-plain --seeds 0,1,2 \\
        --out benchmarks/results/demo_classes.json
    # the field alone (Euler, no backtracking) on class 0
    python benchmarks/demo_table.py --classes 0 --field-only --q-star-scales 1.5,2 \\
        --strengths 5,10,15 --out benchmarks/results/demo_field_only.json

A run passes the demo's targets when the guided avoided rate is <= 10% of the unguided one,
every other class's share is within 3 points of unguided and the mean judge confidence drops by
<= 2 points. The script prints one markdown row per (encoder, class, q* scale, strength) with
the figures of each seed, and writes every report to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from cspace.experiments.demo import DemoSettings, run_demo


def _ints(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def verdict(report: dict, arm: str) -> dict:
    """The demo's three target figures for one arm of one report."""
    c = report["settings"]["avoid_class"]
    base, armr = report["arms"]["unguided"], report["arms"][arm]
    dev = [abs(a - b) for a, b in zip(armr["class_shares"], base["class_shares"], strict=True)]
    dev[c] = 0.0
    ratio = armr["avoided_rate"] / max(base["avoided_rate"], 1e-12)
    drop = base["judge_confidence"] - armr["judge_confidence"]
    return {
        "ratio": ratio,
        "max_dev": 100 * max(dev),
        "conf_drop": 100 * drop,
        "pass": ratio <= 0.1 and 100 * max(dev) <= 3 and 100 * drop <= 2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=_ints, default=[0])
    p.add_argument("--encoders", default="digits")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--q-star-scales", type=_floats, default=[DemoSettings.q_star_scale])
    p.add_argument("--strengths", type=_floats, default=[DemoSettings.strength])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument(
        "--field-only",
        action="store_true",
        help="the field alone: Euler sampler, no collision backtracking",
    )
    p.add_argument("--out", default=None, help="JSON file for every report")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, reports = [], []
    print(
        "| C-space | class | q* scale | strength | arm | avoided/unguided | max other-class shift (pts) | confidence drop (pts) | pass |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for enc, c, q, s in itertools.product(
        args.encoders.split(","), args.classes, args.q_star_scales, args.strengths
    ):
        per_seed = []
        for seed in args.seeds:
            st = DemoSettings(
                avoid_class=c,
                n=args.n,
                seed=seed,
                encoder=enc,
                umap=False,
                q_star_scale=q,
                strength=s,
                method="euler" if args.field_only else "sde",
                backtrack=not args.field_only,
            )
            rep = run_demo(st, out_dir=None)
            reports.append(rep)
            per_seed.append(rep)
        for arm in ("guided", "classifier"):
            v = [verdict(r, arm) for r in per_seed]
            row = {
                "encoder": enc,
                "class": c,
                "q_star_scale": q,
                "strength": s,
                "arm": arm,
                "seeds": args.seeds,
                "verdicts": v,
            }
            rows.append(row)

            def fmt(key: str, f: str, v=v) -> str:
                return " / ".join(f.format(x[key]) for x in v)

            print(
                f"| {enc} | {c} | {q:g} | {s:g} | {arm} | {fmt('ratio', '{:.2f}')} | "
                f"{fmt('max_dev', '{:.1f}')} | {fmt('conf_drop', '{:.1f}')} | "
                f"{sum(x['pass'] for x in v)}/{len(v)} |",
                flush=True,
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, "reports": reports}, indent=1))
        os.replace(tmp, out)
    passed = np.mean([x["pass"] for r in rows for x in r["verdicts"]])
    print(f"\npassing runs: {100 * passed:.0f}%")


if __name__ == "__main__":
    main()
