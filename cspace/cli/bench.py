"""``cspace bench field``: argument parsing and printing for :mod:`cspace.experiments.bench`
(the backends, the floor and the report are documented there)."""

from __future__ import annotations

import argparse
import json

from cspace.cli.args import positive_float, positive_int

__all__ = ["register"]

# the library's names, kept here so that parsing needs no torch (tests/test_cli.py checks them)
BACKENDS = (
    "reference",
    "pruned",
    "cpu",
    "cpu-pruned",
    "faiss-range",
    "torch-eager",
    "torch-compile",
    "triton",
    "triton-pruned",
)
DTYPES = ("bfloat16", "float32")
_DESCRIPTION = (
    "Obstacles are N points in 1,000 blobs (d dimensions), states near some of them; Q* is the "
    "given quantile of the state-obstacle distances (0.5: dense; 0.0005: sparse). Each backend "
    "computes the same field; its time is compared with a floor measured in the same run and "
    "its potential, force and nearest distance with the float64 reference."
)


def _cmd_bench(args: argparse.Namespace) -> int:
    from cspace.experiments.bench import bench_field, format_report
    from cspace.io.checks import check_output_file
    from cspace.io.files import write_file_atomic

    if args.out:
        check_output_file(args.out, "--out")  # before the benchmark, not after
    backends = None if args.backends is None else [s for s in args.backends.split(",") if s]
    rep = bench_field(args.n, args.d, args.b, args.q_star_quantile, args.repeats, args.device,
                      dtype=args.dtype, backends=backends)  # fmt: skip
    if args.out:
        write_file_atomic(args.out, json.dumps(rep, indent=1).encode())
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (field backends against a measured floor)")
    sub = p.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True
    f = sub.add_parser("field", help="the field's backends on one synthetic obstacle set",
                       description=_DESCRIPTION)  # fmt: skip
    f.add_argument("--n", type=positive_int, default=100_000, help="obstacles (default 100000)")
    f.add_argument("--d", type=positive_int, default=64, help="dimension (default 64)")
    f.add_argument("--b", type=positive_int, default=64, help="states (default 64)")
    f.add_argument("--q-star-quantile", type=positive_float, default=0.5,
                   help="Q* as a quantile of state-obstacle distances: 0.5 dense, 0.0005 sparse "
                   "(default 0.5)")  # fmt: skip
    f.add_argument("--repeats", type=positive_int, default=5,
                   help="timed runs per backend; the median is reported (default 5)")  # fmt: skip
    f.add_argument("--device", default="cpu", help="torch device (default cpu)")
    f.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the states the low-precision backends get (default float32)")  # fmt: skip
    f.add_argument("--backends", default=None,
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default: by device)")  # fmt: skip
    f.add_argument("--json", action="store_true", help="print the JSON report")
    f.add_argument("--out", default=None, help="also write the JSON report to this file")
    f.set_defaults(func=_cmd_bench)
