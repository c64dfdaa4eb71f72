"""NFE budgets for inference-time search.

One NFE is one velocity evaluation of one state (a batch of B states costs B). Every search
algorithm calls the model only through :meth:`Budget.wrap`, which charges a call *before* the
model runs: a call that would take the total past the budget raises :class:`BudgetExceeded` and the
model is not called, so a search can never spend more than its budget. The algorithms plan their
sizes from :attr:`Budget.remaining` first, so in normal use they never hit that error; when the
budget cannot pay even their smallest configuration they raise it before doing anything, and
nothing half-made is returned.

Verifier calls cost no NFE; they are counted by the verifiers themselves and reported beside the
NFE in :class:`~guidance.search.result.SearchResult`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cspace.models.space import space_of
from guidance.sampling import Prediction, predict

__all__ = ["MAX_NFE", "Budget", "BudgetExceeded", "as_budget"]


class BudgetExceeded(RuntimeError):
    """A search asked for more NFE than its budget holds (nothing was computed for that request)."""


#: the largest budget: NFE are counted in 64-bit integers
MAX_NFE = 2**63 - 1


class Budget:
    """A pool of ``nfe`` velocity evaluations, spent by :meth:`charge`.

    Args:
        nfe: total NFE allowed (an integer, 0 <= nfe <= :data:`MAX_NFE` = 2**63 - 1).
    """

    def __init__(self, nfe: int) -> None:
        try:
            whole = not isinstance(nfe, bool) and int(nfe) == nfe
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or not 0 <= int(nfe) <= MAX_NFE:
            raise ValueError(
                f"a budget is a whole number of NFE in 0..{MAX_NFE} (2**63 - 1); got {nfe!r}"
            )
        self.total = int(nfe)
        self.spent = 0
        self.calls = 0

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def can_afford(self, nfe: int) -> bool:
        return 0 <= int(nfe) <= self.remaining

    def charge(self, nfe: int, what: str = "model call") -> None:
        """Take ``nfe`` from the budget, or raise :class:`BudgetExceeded` and take nothing."""
        nfe = int(nfe)
        if nfe < 0:
            raise ValueError(f"cannot charge a negative NFE ({nfe})")
        if nfe > self.remaining:
            raise BudgetExceeded(
                f"{what} needs {nfe} NFE but only {self.remaining} of the budget's {self.total} "
                f"remain ({self.spent} spent); raise the budget or shrink the search"
            )
        self.spent += nfe
        self.calls += 1

    def require(self, nfe: int, what: str) -> None:
        """Raise :class:`BudgetExceeded` (spending nothing) unless ``nfe`` can be paid."""
        if int(nfe) > self.remaining:
            raise BudgetExceeded(
                f"{what} needs at least {int(nfe)} NFE but the budget has {self.remaining} left "
                f"(of {self.total}); raise the budget"
            )

    def wrap(
        self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``velocity`` behind a meter: each call charges its batch size before the model runs.

        The metered velocity keeps ``predict`` (:func:`guidance.sampling.predict`), so a
        :class:`~guidance.Guided` velocity stays one: its whole prediction (the model's
        ``x0_hat``, ``delta``, the field output) reaches the step functions, charged once.
        """
        return _Metered(self, velocity)

    def __repr__(self) -> str:
        return f"Budget(total={self.total}, spent={self.spent})"


class _Metered:
    """A velocity whose every call (``__call__`` or ``predict``) is charged to a budget."""

    def __init__(self, budget: Budget, velocity) -> None:
        self.budget, self.velocity = budget, velocity
        #: the model's C-space (:func:`cspace.models.space.space_of`): metering keeps it, so
        #: that a search's Guided proposal still refuses a field of another space
        self.space = space_of(velocity)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.budget.charge(x.shape[0], "a velocity call")
        return self.velocity(x, t)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        self.budget.charge(x.shape[0], "a velocity call")
        return predict(self.velocity, x, t)


def as_budget(budget: Budget | int) -> Budget:
    """A :class:`Budget` from a Budget (returned as is) or a number of NFE."""
    return budget if isinstance(budget, Budget) else Budget(budget)
