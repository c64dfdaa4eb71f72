"""The Fashion-MNIST judge's accuracy on the full test split and on the shipped held-out slice.

    python benchmarks/fashion_judge.py --out benchmarks/results/fashion_judge.json
    python benchmarks/fashion_judge.py --judge FOLDER --data DIR   # another judge, other files

Prints, per class and overall, accuracy and mean confidence (largest class probability) on
the 10,000 test images (needs the IDX files: Debian's ``dataset-fashion-mnist`` or ``--data``)
and on the 2,000 shipped ones; ``--out`` writes them as JSON. ``docs/fashion.md`` quotes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cspace.models.data import FASHION_CLASSES, fashion_heldout, fashion_mnist
from cspace.models.fashion_judge import FashionJudge, evaluate_judge


def per_class(judge: FashionJudge, x: torch.Tensor, y: torch.Tensor) -> dict:
    out = {"all": evaluate_judge(judge, x, y)}
    for c, name in enumerate(FASHION_CLASSES):
        out[name] = evaluate_judge(judge, x[y == c], y[y == c])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", default=None, help="judge folder (default: the shipped one)")
    ap.add_argument("--data", default=None, help="folder of the IDX files (default: Debian's)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    judge = FashionJudge.load(args.judge)
    t0 = time.perf_counter()
    results = {
        "test": per_class(judge, *fashion_mnist("test", args.data)),
        "heldout": per_class(judge, *fashion_heldout()),
    }
    results["eval_s"] = round(time.perf_counter() - t0, 1)
    results["judge"] = str(args.judge or "shipped")
    print("| class | test accuracy | test confidence | held-out accuracy | held-out confidence |")
    print("|---|---|---|---|---|")
    for name in ("all", *FASHION_CLASSES):
        t, h = results["test"][name], results["heldout"][name]
        print(f"| {name} | {100 * t['accuracy']:.2f}% | {100 * t['confidence']:.2f}% | "
              f"{100 * h['accuracy']:.2f}% | {100 * h['confidence']:.2f}% |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
