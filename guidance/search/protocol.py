"""One protocol for search algorithms, and the registry entry that describes each one.

Every algorithm is a function with the signature of :class:`SearchAlgorithm`; its module
declares one :class:`Algorithm` (name, the function, what it searches over, whether it needs the
obstacles' field) and :data:`guidance.search.ALGORITHMS` collects them. Callers ask the entry,
never a list of names: ``ALGORITHMS[name].needs_field``, ``ALGORITHMS[name].keywords(...)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from guidance.search.common import SearchError, SearchResult, Velocity

__all__ = ["Algorithm", "SearchAlgorithm"]


class SearchAlgorithm(Protocol):
    """``search(velocity, shape, verifier, budget, *, n_return, steps, generator, ...)``.

    ``velocity`` is ``v(x, t)`` (or a :class:`~guidance.Guided` velocity), ``shape`` the shape
    of one sample, ``budget`` a :class:`~guidance.search.Budget` or a number of NFE for the whole
    call (never exceeded), ``n_return`` the number of samples returned.
    """

    def __call__(
        self,
        velocity: Velocity,
        shape: Any,
        verifier: Any,
        budget: Any,
        *,
        n_return: int = 1,
        steps: int = 50,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> SearchResult: ...


@dataclass(frozen=True)
class Algorithm:
    """A registered search algorithm; calling it calls ``run``.

    Attributes:
        name: the registry name (``cspace search --algo NAME``).
        run: the search function (:class:`SearchAlgorithm`).
        searches_over: what the search varies (initial noises, paths, SDE trajectories, ...).
        needs_field: whether ``run`` requires the obstacles' field (keyword ``field=``).
        learns_membership: whether ``run`` learns the obstacles' membership from examples of a
            class (it applies where the examples stand for a class, such as a digit class in the
            C-space, not where the obstacles are themselves the exact test, such as the toy's
            balls on several modes).
        options: the keyword options ``run`` accepts beyond the common ones (from its
            signature).
    """

    name: str
    run: SearchAlgorithm
    searches_over: str
    needs_field: bool = False
    learns_membership: bool = False
    options: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        common = {"velocity", "shape", "verifier", "budget", "n_return", "steps", "generator"}
        params = inspect.signature(self.run).parameters
        opts = tuple(p for p in params if p not in common)
        if self.needs_field and "field" not in opts:
            raise TypeError(f"{self.name}: needs_field=True but run() takes no field= keyword")
        object.__setattr__(self, "options", opts)

    def __call__(self, *args: Any, **kwargs: Any) -> SearchResult:
        return self.run(*args, **kwargs)

    def keywords(self, **candidates: Any) -> dict[str, Any]:
        """The subset of ``candidates`` this algorithm accepts, as keyword arguments.

        Raises:
            SearchError: the algorithm needs the field and ``field`` is missing or None.
        """
        if self.needs_field and candidates.get("field") is None:
            raise SearchError(f"{self.name} needs the obstacles' field: pass field=...")
        return {k: v for k, v in candidates.items() if k in self.options}
