"""The demo's twisted SMC arm with a hard radius calibrated on the examples by leave-one-out.

The demo's hard radius is the auto rule's distance (the median distance of an example to its
5th nearest other example), one value for the set. Calibrated instead as a conformal radius on
the examples alone: with ``d_i`` the distance of example ``i`` to its nearest *other* example
(leave-one-out), the radius is the ``ceil((1 - alpha)(m + 1))``-th smallest ``d_i`` of the ``m``
examples, so that a new image of the class exchangeable with the examples falls within it of
some example with probability >= ``1 - alpha`` (split-conformal argument on the LOO scores).
It needs no example of another class.

The script reruns only the twisted SMC arm of each run of a finished table
(``benchmarks/demo_table.py --shift renormalised``, whose unguided arms it reuses: same seeds,
same settings) with that radius, judges it the same way and prints the table's summary for it,
with the membership (recall and false positives on unseen digits) of the calibrated radius::

    python benchmarks/demo_membership_loo.py benchmarks/results/demo_avoidance.json \\
        --alpha 0.1 --out benchmarks/results/demo_avoidance_loo.json
    # the examples' leave-one-out recall at the auto radius against the unseen images' recall
    python benchmarks/demo_membership_loo.py --recall-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from demo_table import MAX_NFE, summary, verdict  # the script folder is on sys.path

from cspace.experiments.demo import (
    DemoSettings,
    _judged,
    _space,
    demo_obstacles,
    example_files,
    membership_quality,
    twisted_arm,
    within_class_scale,
)


def loo_radius(embeddings: np.ndarray, alpha: float) -> float:
    """The conformal radius of the module docstring for ``embeddings`` (m, d): the
    ``ceil((1 - alpha)(m + 1))``-th smallest leave-one-out nearest-neighbour distance (the
    largest when that index exceeds m)."""
    e = torch.from_numpy(np.asarray(embeddings, dtype=np.float64))
    d = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    nn1 = np.sort(d.min(1).values.numpy())
    k = min(len(nn1), math.ceil((1 - alpha) * (len(nn1) + 1)))
    return float(np.nextafter(nn1[k - 1], np.inf))  # "within": strictly inside the radius


def loo_recall(embeddings: np.ndarray, radius: float) -> float:
    """The share of the examples (m, d) within ``radius`` of some *other* example: the recall a
    set of the others would have on each, left out in turn."""
    e = torch.from_numpy(np.asarray(embeddings, dtype=np.float64))
    d = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    return float((d.min(1).values < radius).double().mean())


def recall_only() -> None:
    """Per class: the examples' leave-one-out recall at the demo's hard radius (the auto rule)
    against the recall on unseen images (:func:`cspace.experiments.demo.membership_quality`)."""
    from cspace.io.images import load_images

    encoder, _ = _space("digits")
    print(
        "| class | hard radius | leave-one-out recall of the examples | recall on unseen images |"
    )
    print("|---|---|---|---|")
    for c in range(10):
        s = DemoSettings(avoid_class=c)
        oset, _ = demo_obstacles(encoder, s)
        r = float(np.median(oset.radius))
        own = load_images(example_files(c, s.max_examples))[0]
        unseen = membership_quality(encoder, oset, c, own)["recall_radius"]
        print(f"| {c} | {r:.3f} | {100 * loo_recall(oset.embeddings, r):.1f}% | "
              f"{100 * unseen:.1f}% |", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", nargs="?", help="JSON of benchmarks/demo_table.py --shift renormalised")
    p.add_argument(
        "--recall-only",
        action="store_true",
        help="only the examples' leave-one-out recall at the auto radius against the unseen "
        "images' recall, per class (no sampling)",
    )
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.recall_only:
        recall_only()
        return
    if args.table is None:
        p.error("give the table's JSON (or --recall-only)")
    from cspace.io.images import load_images
    from cspace.models.judge import Judge
    from guidance import RepulsiveField

    done = json.loads(Path(args.table).read_text())
    arm = "twisted-smc/loo"
    rows: dict[int, dict] = {}
    reports = []
    spaces: dict = {}
    for rep in done["reports"]:
        s = DemoSettings(**rep["settings"])
        if s.encoder not in spaces:
            spaces[s.encoder] = _space(s.encoder)
        encoder, flow = spaces[s.encoder]
        torch.manual_seed(s.seed)
        judge = Judge.fit(seed=s.seed)
        oset, _ = demo_obstacles(encoder, s)
        r = loo_radius(oset.embeddings, args.alpha)
        auto_r = float(np.median(oset.radius))
        oset.set_parameters(
            q_star=np.maximum(oset.q_star, r), radius=np.full(len(oset), r), note="loo radius"
        )
        t0 = time.perf_counter()
        shape = encoder.latent_shape((8, 8))
        scale = within_class_scale(encoder)
        tw = twisted_arm(flow, shape, s, RepulsiveField(oset), scale,
                         rep["arms"]["unguided"]["nfe"], "cpu")  # fmt: skip
        images = encoder.decode(tw.samples).cpu()
        own = load_images(example_files(s.avoid_class, s.max_examples))[0]
        new = {
            "settings": rep["settings"],
            "arms": {
                "unguided": rep["arms"]["unguided"],
                arm: {
                    **_judged(judge, images, s.avoid_class),
                    "nfe": tw.nfe_per_sample,
                    "unique": int(tw.records["unique"]),
                    "seconds": time.perf_counter() - t0,
                },
            },
            "radius": r,
            "auto_radius": auto_r,
            "membership": membership_quality(encoder, oset, s.avoid_class, own),
        }
        reports.append(new)
        v = verdict(new, arm, "renormalised", MAX_NFE)
        row = rows.setdefault(s.avoid_class, {"class": s.avoid_class, "arm": arm, "verdicts": []})
        row["verdicts"].append(v)
        print(
            f"class {s.avoid_class} seed {s.seed}: radius {r:.3f} (auto {auto_r:.3f}), recall "
            f"{100 * new['membership']['recall_radius']:.1f}%, ratio {v['ratio']:.2f}, shift "
            f"{v['renorm_shift']:+.1f} (class {v['renorm_class']}), conf drop "
            f"{v['conf_drop']:.1f}, pass {v['pass']}",
            flush=True,
        )
    table = summary(list(rows.values()), reports, MAX_NFE)
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"alpha": args.alpha, "summary": table,
                                   "rows": list(rows.values()), "reports": reports}, indent=1))  # fmt: skip
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
