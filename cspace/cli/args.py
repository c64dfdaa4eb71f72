"""Argument types shared by the ``cspace`` subcommands: each turns a bad value into an argparse
error that names it and what is expected. Integers may be written in scientific notation when
the value is exact (``--budget 1e6``)."""

from __future__ import annotations

import argparse
import decimal

__all__ = [
    "MAX_CLASS_LABEL",
    "MAX_SEED",
    "class_labels",
    "fraction",
    "fraction_to_one",
    "nonneg_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "seed",
    "toy_dim",
]

#: the largest seed: every random generator a command seeds (torch, NumPy, scikit-learn,
#: Optuna) takes the seeds 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


def _integer(text: str) -> int | None:
    """``text`` as an exact integer: ``12``, or in scientific notation ``1e6``, ``2.5e3``; None
    when it is not one (``2.5``, ``nan``, ``inf``, a word)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        d = decimal.Decimal(text.strip())
    except (decimal.InvalidOperation, ValueError):
        return None
    if not d.is_finite() or d != d.to_integral_value() or abs(d.adjusted()) > 4300:
        return None
    return int(d)


def positive_int(text: str) -> int:
    value = _integer(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def nonneg_float(text: str) -> float:
    value = _number(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1), both ends excluded."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def fraction_to_one(text: str) -> float:
    """A number in (0, 1], 1 included (an ESS threshold: 1 resamples at every step)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def toy_dim(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"the toy needs --dim >= 2, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in 0 .. 2**32 - 1 (what every generator a command seeds takes)."""
    value = _integer(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


#: the largest class label the argument takes (labels index an embedding table)
MAX_CLASS_LABEL = 2**31 - 1


def class_labels(text: str) -> list[int]:
    """Class labels: integers in 0 .. :data:`MAX_CLASS_LABEL`, comma-separated (``3`` or ``3,7``)."""
    parts = [p.strip() for p in text.split(",")]
    values = [_integer(p) for p in parts]
    if any(v is None or not 0 <= v <= MAX_CLASS_LABEL for v in values):
        raise argparse.ArgumentTypeError(
            f"expected class labels, integers from 0 to {MAX_CLASS_LABEL} separated by commas "
            f"(3 or 3,7); got {text[:80]!r}"
        )
    return values
