"""Fuzz the fields: random problems over scales, dtypes, sizes and parameters; every evaluation
must be finite or a clear ValueError (:mod:`cspace.experiments.field_fuzz`).

    python benchmarks/field_fuzz.py --cases 10000 --seed 0 [--out benchmarks/results/field_fuzz.json]

Prints a markdown summary (cases by field kind and by dtype: ok, clear error, failure; the most
frequent errors; every failure; the slowest case) and writes the full report as JSON. Exits 1
when a case failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cspace.experiments.field_fuzz import format_report, fuzz

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "field_fuzz.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error(f"--cases must be >= 1; got {args.cases}")
    torch.set_num_threads(args.threads)
    rep = fuzz(args.cases, args.seed)
    rep["command"] = " ".join(["python benchmarks/field_fuzz.py", *sys.argv[1:]])
    print(format_report(rep))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1) + "\n")
    print(f"\nreport: {args.out}")
    return 1 if rep["outcomes"].get("failure", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
