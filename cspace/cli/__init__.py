"""The ``cspace`` command line: argument parsing and printing only.

Each subcommand lives in its own module with a ``register(subparsers)`` function; the work is
done by the library (:mod:`cspace.experiments` and the layers below), imported inside each
command so that parsing stays cheap.

No input ends in a traceback. :func:`main` prints every error as one line,
``cspace COMMAND: error: MESSAGE``, and returns

* **2** for bad input: ``ValueError`` and its subclasses (every error type of cspace's own,
  ``json`` and Unicode decoding errors), ``OSError`` (a missing file, no permission, a folder
  under a file, ...), cspace's own error types that are not ValueErrors (an NFE budget
  exceeded, ...), ``OverflowError`` and ``RecursionError`` (a number
  or a nesting too large, from an argument or a file) and running out of memory (a size too
  large for the machine);
* **1** for anything else, an unexpected error (a bug: please report it with the traceback);
* **130** when interrupted (Ctrl-C).

``--debug`` (anywhere on the command line) shows the full traceback instead. Warnings of the
library (e.g. the entries a folder of images skipped) are printed as
``cspace COMMAND: warning: MESSAGE``, notes (images resized as ``--resize`` asked) as
``cspace COMMAND: note: MESSAGE``.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from cspace.cli import bench, calibrate, demo, obstacles, sample, search, toy, train
from cspace.io.checks import format_bytes

__all__ = ["build_parser", "main"]

#: the subcommand modules, in the order ``cspace --help`` lists them
COMMANDS = (toy, demo, obstacles, search, train, calibrate, sample, bench)

_LIBRARIES = ("cspace", "obstacles", "guidance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cspace",
        description="Steer diffusion and flow-matching samplers through a configuration space.",
        epilog="Errors are printed as one line (exit code 2 for bad input, 1 for an unexpected "
        "error); --debug shows the traceback.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (accepted anywhere on the command line)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def _out_of_memory(err: BaseException) -> str | None:
    """A message for an allocation that failed, or None when ``err`` is not one."""
    text = str(err)
    if isinstance(err, MemoryError):
        detail = text or "an allocation failed"
    elif type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError)
        and ("can't allocate memory" in text or "not enough memory" in text)
    ):
        m = re.search(r"allocate (\d+) bytes", text)
        detail = f"tried to allocate {format_bytes(int(m.group(1)))}" if m else text
    else:
        return None
    return (
        f"out of memory ({detail}): a size asked for (samples, dimension, steps, budget, batch) "
        "is too large for this machine; lower it"
    )


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, ValueError | OSError | OverflowError | RecursionError):
        return True
    # cspace's own error types that are not ValueErrors (an NFE budget exceeded, obstacles that
    # leave no mass to sample): every one is about the input
    return any(c.__module__.startswith(_LIBRARIES) for c in type(err).__mro__)


def _describe_error(err: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an error a command raised (see the module
    docstring)."""
    oom = _out_of_memory(err)
    if oom is not None:
        return 2, oom
    if isinstance(err, OSError) and err.strerror:
        names = [str(f) for f in (err.filename, err.filename2) if f is not None]
        msg = err.strerror + (f": {' -> '.join(names)}" if names else "")
        if isinstance(err, BrokenPipeError):
            return 1, msg
        return 2, msg
    if isinstance(err, RecursionError):
        return 2, f"input nested too deeply to read ({err})"
    if _is_user_error(err):
        return 2, str(err) or type(err).__name__
    return 1, (
        f"unexpected error: {type(err).__name__}: {err} (this is a bug; run again with --debug "
        "for the traceback and report it)"
    )


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``--debug`` flags (before a ``--``), and whether there was one."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    return head + argv[end:], len(head) < end


def main(argv: list[str] | None = None) -> int:
    """Run the ``cspace`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit
    code (argparse's usage errors exit with 2 through ``SystemExit``)."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = debug or args.debug
    name = f"cspace {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith(_LIBRARIES):
            label = getattr(category, "cli_label", "warning")
            print(f"{name}: {label}: {message}", file=sys.stderr)
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return args.func(args)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            if debug:
                raise
            code, message = _describe_error(err)
            print(f"{name}: error: {message}", file=sys.stderr)
            return code
