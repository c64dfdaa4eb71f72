"""The import names cspace shares with unrelated distributions on PyPI.

cspace installs three import packages: ``cspace``, ``obstacles`` and ``guidance``. Two of those
names are also the names of other PyPI distributions: ``guidance`` (a widely used library for
steering large language models) and ``obstacles``. Installed into one environment, two
distributions with the same import name write into the same folder and break each other (the
one installed last wins file by file). :func:`check_import_name` runs when ``guidance`` or
``obstacles`` is imported and refuses to go on when another installed distribution claims the
name, with a message naming both.

Which distribution claims a name is read from the environment's metadata
(:mod:`importlib.metadata`): a distribution *named* like the package (``guidance``,
``obstacles``), and any distribution whose ``top_level.txt`` lists it. The scan runs once per
process (about 0.1 s).
"""

from __future__ import annotations

import functools
import re

__all__ = ["OWN_DISTRIBUTION", "NameClashError", "check_import_name", "claimants"]

#: the distribution this package is installed as
OWN_DISTRIBUTION = "cspace"
_SHARED = ("guidance", "obstacles")
_KNOWN = {
    "guidance": "on PyPI, `guidance` is a library for steering large language models",
    "obstacles": "on PyPI, `obstacles` is an unrelated distribution",
}


class NameClashError(ImportError):
    """Another installed distribution claims an import name of cspace's."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _claims() -> dict[str, tuple[tuple[str, str], ...]]:
    """import name -> ((distribution, version), ...) of the other distributions claiming it."""
    from importlib import metadata

    found: dict[str, set[tuple[str, str]]] = {n: set() for n in _SHARED}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"] or ""
        except Exception:  # a broken metadata folder names nothing
            continue
        if _canonical(name) == OWN_DISTRIBUTION:
            continue
        claimed = {n for n in _SHARED if _canonical(name) == n}
        try:
            top = dist.read_text("top_level.txt") or ""
        except (OSError, UnicodeDecodeError):
            top = ""
        claimed |= {n for n in top.split() if n in _SHARED}
        for n in claimed:
            found[n].add((name, dist.version or "?"))
    return {n: tuple(sorted(v)) for n, v in found.items()}


def claimants(name: str) -> tuple[tuple[str, str], ...]:
    """The ``(distribution, version)`` pairs other than cspace that claim the import ``name``
    (one of ``guidance``, ``obstacles``) in this environment."""
    if name not in _SHARED:
        raise ValueError(f"{name!r} is not one of the shared import names {_SHARED}")
    return _claims()[name]


def check_import_name(name: str, where: str) -> None:
    """Raise :class:`NameClashError` when another installed distribution claims the import
    ``name``; ``where`` is the imported package's file (named in the message)."""
    others = claimants(name)
    if not others:
        return
    listed = ", ".join(f"{d} {v}" for d, v in others)
    raise NameClashError(
        f"the import name {name!r} is claimed by two installed distributions: cspace (this "
        f"package, {where}) and {listed} ({_KNOWN[name]}). Both install a top-level folder "
        f"{name!r} and overwrite each other's files: install cspace in a virtual environment of "
        f"its own, or remove the other one (pip uninstall {others[0][0]})"
    )
