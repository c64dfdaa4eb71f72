"""The ``cspace`` command line: argument parsing and printing only.

Each subcommand lives in its own module with a ``register(subparsers)`` function; the work is
done by the library (:mod:`cspace.experiments` and the layers below), imported inside each
command so that parsing stays cheap. User errors (``ValueError``, missing files, ...) are printed
as one line, ``cspace COMMAND: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from cspace.cli import bench, calibrate, demo, obstacles, sample, search, toy, train

__all__ = ["build_parser", "main"]

#: the subcommand modules, in the order ``cspace --help`` lists them
COMMANDS = (toy, demo, obstacles, search, train, calibrate, sample, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cspace",
        description="Steer diffusion and flow-matching samplers through a configuration space.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"cspace {args.command}: error: {err}", file=sys.stderr)
        return 2
