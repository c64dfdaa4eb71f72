"""Every option of every ``cspace`` subcommand has help, and what the help says about defaults and
choices is what the parser does.

The test builds the real parser (:func:`cspace.cli.build_parser`), walks every subcommand and
option, and for each one compares the help's stated default (``(default X)``, ``default: X``) with the option's
actual default, and checks that every allowed choice can be read in its help line.
"""

from __future__ import annotations

import argparse
import re

import pytest

from cspace.cli import build_parser

_STATED = re.compile(r"\bdefault:?\s+([^;,:)]+)")


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(path, parser)`` for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


def _options():
    """``(command, parser, action)`` for every option and positional of every command."""
    for path, parser in _subcommands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            yield " ".join(("cspace", *path)), parser, action


OPTIONS = list(_options())


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as ``--help`` prints it (``%(default)s`` expanded, whitespace joined)."""
    text = parser._get_formatter()._expand_help(action)
    return " ".join(text.split())


def _same_value(stated: str, action: argparse.Action) -> bool:
    default = action.default
    words = stated.strip().strip("'\"`")
    if isinstance(default, bool):
        return False
    if isinstance(default, int | float) or (
        isinstance(default, str) and re.fullmatch(r"[-+0-9.e_]+", default)
    ):
        try:
            return float(words.replace(",", "").replace("_", "")) == float(default)
        except ValueError:
            return False
    return words == str(default)


def test_the_walk_sees_every_command():
    commands = {c for c, _, _ in OPTIONS}
    for name in ("toy", "demo", "obstacles build", "obstacles info", "obstacles classifier",
                 "search", "experiment scaling", "train flow", "train teacher", "train vae",
                 "calibrate", "sample", "bench field"):  # fmt: skip
        assert f"cspace {name}" in commands
    assert len(OPTIONS) > 100


@pytest.mark.parametrize("command,parser,action", OPTIONS, ids=lambda v: getattr(v, "dest", v))
def test_every_option_has_true_help(command, parser, action):
    where = f"{command} {_name(action)}"
    assert action.help and action.help != argparse.SUPPRESS, f"{where}: no help"
    text = _help(parser, action)
    stated = _STATED.findall(text)
    real = action.default
    if real is not None and not isinstance(real, bool) and real != argparse.SUPPRESS:
        assert stated, f"{where}: help {text!r} does not say the default, {real!r}"
    for s in stated:
        if real is None or isinstance(real, bool):
            # a default described in words ("(default: the encoder's size)"), not a value
            assert not re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", s.strip()), (
                f"{where}: help states the default {s!r}, but the parser's default is {real!r}"
            )
        else:
            assert _same_value(s, action), (
                f"{where}: help states the default {s!r}, but the parser's default is {real!r}"
            )
    if action.choices is not None:
        shown = f"{action.metavar or ''} {text}"
        if action.metavar is None:
            shown += " " + ",".join(str(c) for c in action.choices)  # argparse prints them
        choices = list(action.choices)
        if all(isinstance(c, int) for c in choices):
            lo, hi = min(choices), max(choices)
            assert f"{lo}..{hi}" in shown and choices == list(range(lo, hi + 1)), (
                f"{where}: help {text!r} does not give the range of choices {lo}..{hi}"
            )
        else:
            missing = [c for c in choices if str(c) not in shown]
            assert not missing, f"{where}: help {text!r} does not name the choices {missing}"
        if real is not None and not isinstance(real, bool):
            assert real in action.choices, f"{where}: default {real!r} not among its choices"


def test_the_check_catches_a_wrong_default():
    """The comparison above fails on a help that states another default than the parser's."""
    p = argparse.ArgumentParser()
    a = p.add_argument("--n", type=int, default=1000, help="samples (default 100)")
    b = p.add_argument("--out", default="cspace-demo", help="folder (default cspace-demo)")
    assert not _same_value(_STATED.findall(_help(p, a))[0], a)
    assert _same_value(_STATED.findall(_help(p, b))[0], b)


def test_default_outputs_land_in_the_working_folder():
    """Every output option defaults to nothing (write nothing, or next to the input) or to one
    relative folder name: a command run without ``--out`` writes into the working folder, never
    inside the installed package (``cspace train flow`` once defaulted to the shipped weights)."""
    outs = [(c, a) for c, _, a in OPTIONS if a.dest in ("out", "out_dir", "output")]
    assert len(outs) >= 10
    for command, action in outs:
        d = action.default
        assert d is None or (isinstance(d, str) and d and "/" not in d and not d.startswith(".")), (
            f"{command} {_name(action)}: default {d!r} is not a plain folder name"
        )
