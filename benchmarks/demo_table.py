"""The demo's figures over classes, C-spaces and seeds, or over a grid of field settings.

Every figure about ``cspace demo`` in the README comes from this script::

    # every class, both C-spaces, three seeds (about 15 min on 2 CPU cores)
    python benchmarks/demo_table.py --classes 0-9 --encoders digits,digits-plain --seeds 0,1,2 \\
        --out benchmarks/results/demo_classes.json
    # the field alone (Euler, no backtracking) on class 0
    python benchmarks/demo_table.py --classes 0 --field-only --q-star-scales 1.5,2 \\
        --strengths 5,10,15 --out benchmarks/results/demo_field_only.json
    # every arm against rejection: 10 classes x 3 seeds, the shift renormalised without the
    # avoided class, NFE per sample against 1.5 x unguided (about 30 demo runs)
    python benchmarks/demo_table.py --classes 0-9 --seeds 0,1,2 --shift renormalised \\
        --arms guided,classifier,rejection,rejection-pu,twisted-smc,negation \\
        --out benchmarks/results/demo_avoidance.json
    # the same on Fashion-MNIST (--data fashion: its default n and steps), docs/fashion.md;
    # one run per seed (S = 0, 1, 2); benchmarks/results/demo_fashion.json holds all three
    python benchmarks/demo_table.py --encoders fashion --classes 0-9 --seeds S \\
        --shift renormalised --arms guided,classifier,rejection,rejection-pu,twisted-smc,negation \\
        --out benchmarks/results/demo_fashion_seedS.json
    # a run split over two processes (--classes 0-4 and 5-9, one core each), summarised and
    # written as one file
    python benchmarks/demo_table.py --summarise A.json B.json --out ALL.json

A run passes the demo's targets when the arm's avoided rate is <= 10% of the unguided one,
every other class's share is within 3 points of unguided and the mean judge confidence drops by
<= 2 points. With ``--shift renormalised`` the other classes' shares are compared once the
avoided class is taken out of both arms (:func:`cspace.experiments.demo.renormalised_shift`), and
a run also needs NFE per sample <= ``--max-nfe`` x the unguided arm's (1.5). The script prints
one markdown row per (encoder, class, q* scale, strength, arm) with the figures of each seed,
then (``--shift renormalised``) one row per arm: on how many classes it passes on every seed,
which fail and why, and each failing class's membership recall (the share of its unseen images
inside a hard radius); it writes every report to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from cspace.experiments.demo import (
    DemoSettings,
    data_of,
    renormalised_shift,
    run_demo,
    settings_for,
)
from guidance.search.rejection_pu import REGIONS


def _ints(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


#: the demo's targets: avoided rate <= 10% of unguided, shift <= 3 points, confidence drop <= 2
#: points (and, with the renormalised shift, NFE per sample <= MAX_NFE x unguided)
RATIO, SHIFT, DROP, MAX_NFE = 0.1, 3.0, 2.0, 1.5


def verdict(report: dict, arm: str, shift: str = "raw", max_nfe: float = MAX_NFE) -> dict:
    """The demo's target figures for one arm of one report: ``ratio`` (avoided rate over
    unguided), ``max_dev`` (the largest raw change of another class's share, points),
    ``renorm_shift`` and ``renorm_class`` (the largest renormalised one, signed, and its class),
    ``conf_drop`` (points), ``nfe`` and ``nfe_ratio`` (NFE per sample, over unguided) and
    ``pass``: the three targets with the raw shift (``shift="raw"``), or with the renormalised
    shift and ``nfe_ratio <= max_nfe`` (``shift="renormalised"``)."""
    c = report["settings"]["avoid_class"]
    base, armr = report["arms"]["unguided"], report["arms"][arm]
    dev = [abs(a - b) for a, b in zip(armr["class_shares"], base["class_shares"], strict=True)]
    dev[c] = 0.0
    ratio = armr["avoided_rate"] / max(base["avoided_rate"], 1e-12)
    drop = base["judge_confidence"] - armr["judge_confidence"]
    renorm, renorm_class = renormalised_shift(report, arm)
    nfe_ratio = armr["nfe"] / base["nfe"]
    if shift == "raw":
        passed = ratio <= RATIO and 100 * max(dev) <= SHIFT and 100 * drop <= DROP
    elif shift == "renormalised":
        passed = (ratio <= RATIO and abs(renorm) <= SHIFT and 100 * drop <= DROP
                  and nfe_ratio <= max_nfe)  # fmt: skip
    else:
        raise ValueError(f"shift must be 'raw' or 'renormalised'; got {shift!r}")
    return {
        "ratio": ratio,
        "max_dev": 100 * max(dev),
        "renorm_shift": renorm,
        "renorm_class": renorm_class,
        "conf_drop": 100 * drop,
        "nfe": armr["nfe"],
        "nfe_ratio": nfe_ratio,
        "pass": passed,
    }


def why(v: dict, max_nfe: float = MAX_NFE) -> str:
    """The targets one renormalised verdict misses, in words ("" when it passes)."""
    miss = []
    if v["ratio"] > RATIO:
        miss.append(f"ratio {v['ratio']:.2f}")
    if abs(v["renorm_shift"]) > SHIFT:
        miss.append(f"shift {v['renorm_shift']:+.1f} (class {v['renorm_class']})")
    if v["conf_drop"] > DROP:
        miss.append(f"conf -{v['conf_drop']:.1f}")
    if v["nfe_ratio"] > max_nfe:
        miss.append(f"NFE {v['nfe_ratio']:.2f} x")
    return ", ".join(miss)


def unpaired_floor(unguided_shares, avoid_class: int, n: int, draws: int = 4000, seed: int = 0):
    """What the shift target measures for an arm whose noise is not the unguided arm's
    (rejection, twisted SMC): the largest renormalised shift between the unguided arm and an
    *exact* sampler of the unguided law without the avoided class, both of ``n`` samples drawn
    independently (multinomial, ``draws`` repetitions, the unguided shares taken as the truth).
    Returns ``(median, p_pass)``: the median largest shift (points) and the share of repetitions
    within the target (<= 3 points)."""
    rng = np.random.default_rng(seed)
    u = np.asarray(unguided_shares, dtype=np.float64)
    u = u / u.sum()
    rest = u.copy()
    rest[avoid_class] = 0.0
    rest /= rest.sum()
    a = rng.multinomial(n, u, size=draws) / n
    b = rng.multinomial(n, rest, size=draws) / n
    a_rest = a / np.maximum(1 - a[:, [avoid_class]], 1e-12)
    a_rest[:, avoid_class] = 0.0
    shift = 100 * np.abs(b - a_rest).max(1)
    return float(np.median(shift)), float(np.mean(shift <= SHIFT))


def floors(reports: list[dict]) -> list[str]:
    """One markdown row per class: the unguided share of the class and its hard-radius recall
    (the most an arm that tests membership with the hard radius can remove), and the chance that
    an exact sampler with independent noise passes the shift target (:func:`unpaired_floor`),
    per seed and on every seed of the class."""
    out = [
        "| class | unguided share (seeds) | hard-radius recall (unseen images) | exact unpaired "
        "sampler: median largest shift (pts) | P(shift <= 3 pts), one seed | on every seed |",
        "|---|---|---|---|---|---|",
    ]
    by_class: dict[int, list[dict]] = {}
    for r in reports:
        by_class.setdefault(r["settings"]["avoid_class"], []).append(r)
    for c, reps in sorted(by_class.items()):
        fl = [
            unpaired_floor(r["arms"]["unguided"]["class_shares"], c, r["settings"]["n"], seed=i)
            for i, r in enumerate(reps)
        ]
        share = " / ".join(f"{100 * r['arms']['unguided']['avoided_rate']:.1f}%" for r in reps)
        rec = reps[0].get("membership", {}).get("recall_radius")
        out.append(
            f"| {c} | {share} | {'-' if rec is None else f'{100 * rec:.1f}%'} | "
            f"{np.mean([f[0] for f in fl]):.1f} | {np.mean([f[1] for f in fl]):.2f} | "
            f"{np.prod([f[1] for f in fl]):.2f} |"
        )
    return out


def summary(rows: list[dict], reports: list[dict], max_nfe: float = MAX_NFE) -> list[str]:
    """One markdown row per arm: the classes on which it passes on every seed, the runs it
    passes, and each failing class with the targets it misses (over its seeds) and its
    membership recall (the share of the class's unseen images inside a hard radius; for
    rejection-pu inside its own region, per seed)."""
    recall = {r["settings"]["avoid_class"]: r["membership"]["recall_radius"] for r in reports
              if "membership" in r}  # fmt: skip
    # rejection-pu tests membership with its own region: its recall, per run (it is refit on
    # every seed's unguided samples)
    recall_pu: dict[int, list[float]] = {}
    for r in reports:
        if "recall_pu" in r.get("membership", {}):
            recall_pu.setdefault(r["settings"]["avoid_class"], []).append(
                r["membership"]["recall_pu"]
            )
    out = [
        "| arm | classes passing on every seed | runs passing | failing classes: what they miss "
        "(over the seeds; recall of the class's membership test on unseen images) |",
        "|---|---|---|---|",
    ]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        good = [r["class"] for r in mine if all(v["pass"] for v in r["verdicts"])]
        runs = sum(v["pass"] for r in mine for v in r["verdicts"])
        total = sum(len(r["verdicts"]) for r in mine)
        bad = []
        for r in mine:
            if r["class"] in good:
                continue
            misses = " / ".join(why(v, max_nfe) or "pass" for v in r["verdicts"])
            if arm == "rejection-pu" and r["class"] in recall_pu:
                rec_text = "/".join(f"{100 * v:.0f}" for v in recall_pu[r["class"]]) + "%"
            else:
                rec = recall.get(r["class"])
                rec_text = None if rec is None else f"{100 * rec:.0f}%"
            bad.append(f"{r['class']}: {misses}" + ("" if rec_text is None else f" ({rec_text})"))
        out.append(
            f"| {arm} | {len(good)} of {len(mine)} ({', '.join(map(str, good)) or 'none'}) | "
            f"{runs}/{total} | {'; '.join(bad) or '-'} |"
        )
    return out


def _write_json(path: str, body: dict) -> None:
    """``--out``: the JSON through a temporary sibling and ``os.replace`` (no half-written file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=_ints, default=[0])
    p.add_argument("--encoders", default="digits")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--q-star-scales", type=_floats, default=[DemoSettings.q_star_scale])
    p.add_argument("--strengths", type=_floats, default=[DemoSettings.strength])
    p.add_argument("--n", type=int, default=None, help="default: the demo's (digits 1000)")
    p.add_argument("--steps", type=int, default=None, help="default: the demo's (digits 50)")
    p.add_argument(
        "--field-only",
        action="store_true",
        help="the field alone: Euler sampler, no collision backtracking",
    )
    p.add_argument(
        "--arms",
        default="guided,classifier",
        help="the arms of the table, comma-separated (default guided,classifier; also "
        "rejection, rejection-pu, twisted-smc, negation)",
    )
    p.add_argument(
        "--shift",
        choices=("raw", "renormalised"),
        default="raw",
        help="the other classes' shift: raw shares (default) or renormalised without the "
        "avoided class, with the NFE target (--max-nfe) and a summary per arm",
    )
    p.add_argument("--max-nfe", type=float, default=MAX_NFE,
                   help="NFE per sample target, x unguided (default 1.5; --shift renormalised)")  # fmt: skip
    p.add_argument(
        "--pu-region",
        choices=REGIONS,
        default="kernel",
        help="the rejection-pu arm's learnt region: kernel, an RBF kernel model's, or linear, "
        "the half-space of the linear positive-unlabelled fit (default kernel)",
    )
    p.add_argument("--out", default=None, help="JSON file for every report")
    p.add_argument(
        "--summarise",
        default=None,
        nargs="+",
        metavar="JSON",
        help="print the summary of finished --shift renormalised runs' JSON files (no "
        "sampling); several files, e.g. the halves of a run split by --classes over two "
        "processes, are summarised together, and with --out written as one file",
    )
    args = p.parse_args()
    if args.summarise:
        parts = [json.loads(Path(f).read_text()) for f in args.summarise]
        for f, part in zip(args.summarise, parts, strict=True):
            if "summary" not in part:
                p.error(f"--summarise {f}: not a --shift renormalised run (no summary in it)")
        done = {
            "argv": [part["argv"] for part in parts] if len(parts) > 1 else parts[0]["argv"],
            "rows": [r for part in parts for r in part["rows"]],
            "reports": [r for part in parts for r in part["reports"]],
        }
        done["summary"] = summary(done["rows"], done["reports"], args.max_nfe)
        print("\n".join(done["summary"]))
        print()
        print("\n".join(floors(done["reports"])))
        if args.out:
            _write_json(args.out, done)
        return
    arms = args.arms.split(",")
    torch.set_num_threads(1)
    rows, reports = [], []
    renorm = args.shift == "renormalised"
    if renorm:
        print(
            "| C-space | class | q* scale | strength | arm | avoided/unguided | renormalised shift "
            "(pts) | confidence drop (pts) | NFE / sample | pass |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print(
            "| C-space | class | q* scale | strength | arm | avoided/unguided | max other-class shift (pts) | confidence drop (pts) | pass |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    for enc, c, q, s in itertools.product(
        args.encoders.split(","), args.classes, args.q_star_scales, args.strengths
    ):
        per_seed = []
        for seed in args.seeds:
            st = settings_for(
                data_of(enc).name,
                avoid_class=c,
                n=args.n,
                steps=args.steps,
                seed=seed,
                encoder=enc,
                umap=False,
                q_star_scale=q,
                strength=s,
                method="euler" if args.field_only else "sde",
                backtrack=not args.field_only,
                pu_region=args.pu_region,
            )
            rep = run_demo(st, out_dir=None)
            reports.append(rep)
            per_seed.append(rep)
        for arm in arms:
            v = [verdict(r, arm, args.shift, args.max_nfe) for r in per_seed]
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

            shown = fmt("renorm_shift", "{:+.1f}") if renorm else fmt("max_dev", "{:.1f}")
            nfe = f" {fmt('nfe', '{:.1f}')} |" if renorm else ""
            print(
                f"| {enc} | {c} | {q:g} | {s:g} | {arm} | {fmt('ratio', '{:.2f}')} | "
                f"{shown} | {fmt('conf_drop', '{:.1f}')} |{nfe} "
                f"{sum(x['pass'] for x in v)}/{len(v)} |",
                flush=True,
            )
    table = summary(rows, reports, args.max_nfe) if renorm else []
    if args.out:
        body = {"rows": rows, "reports": reports}
        if renorm:
            body = {"argv": sys.argv[1:], "summary": table, **body}
        _write_json(args.out, body)
    passed = np.mean([x["pass"] for r in rows for x in r["verdicts"]])
    print(f"\npassing runs: {100 * passed:.0f}%")
    if renorm:
        print()
        print("\n".join(table))
        print()
        print("\n".join(floors(reports)))


if __name__ == "__main__":
    main()
