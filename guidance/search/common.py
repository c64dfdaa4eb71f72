"""What every search algorithm shares: the result record, errors, checks and small helpers.

Signature style of every algorithm::

    search(velocity, shape, verifier, budget, *, n_return, steps, generator, ...) -> SearchResult

``shape`` is the shape of one sample (e.g. ``(d,)``), ``budget`` a :class:`Budget` or a number of
NFE for the whole call, ``n_return`` the number of samples returned. The noise searches and the
search over paths run ``n_return`` independent searches side by side, each with
``budget // n_return`` NFE, and return the best of each (the per-prompt protocol of Ma et al.,
batched); the particle methods document their own layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cspace.io.checks import check_memory
from guidance.sampling import Prediction, Velocity, sample
from guidance.search.budget import Budget, BudgetExceeded, as_budget
from guidance.search.verifiers import Verifier, VerifierError

__all__ = [
    "SearchError",
    "SearchResult",
    "Velocity",
    "begin",
    "check_states",
    "draw_noise",
    "grid",
    "group_argmax",
    "ode",
    "per_sample_budget",
]


class SearchError(ValueError):
    """A search was set up wrongly (bad sizes, an empty candidate set)."""


@dataclass
class SearchResult:
    """What a search returns.

    Attributes:
        algo: the algorithm's name.
        samples: (n_return, ...) the returned clean samples.
        scores: (n_return,) float64 verifier scores of ``samples``.
        nfe: velocity evaluations spent (<= budget).
        budget: the NFE the search was allowed.
        verifier_calls: verifier calls made by the search (batched calls; no NFE).
        verifier_samples: samples the verifier scored.
        records: algorithm-specific records (candidate scores, rounds, weights, ...).
    """

    algo: str
    samples: torch.Tensor
    scores: torch.Tensor
    nfe: int
    budget: int
    verifier_calls: int
    verifier_samples: int
    records: dict = field(default_factory=dict)

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe / self.samples.shape[0]


@dataclass
class Run:
    """Book-keeping of one search call (budget, verifier counters at the start)."""

    algo: str
    budget: Budget
    verifier: Verifier
    start_nfe: int
    start_calls: int
    start_samples: int
    velocity: Velocity

    def result(self, samples, scores, records=None) -> SearchResult:
        return SearchResult(
            algo=self.algo,
            samples=samples,
            scores=scores,
            nfe=self.budget.spent - self.start_nfe,
            budget=self.budget.total,
            verifier_calls=self.verifier.calls - self.start_calls,
            verifier_samples=self.verifier.samples - self.start_samples,
            records=records or {},
        )


def begin(
    algo: str,
    velocity: Velocity,
    shape,
    verifier: Verifier,
    budget: Budget | int,
    n_return: int,
    steps: int,
) -> tuple[Run, tuple[int, ...]]:
    """Check the common arguments; returns the run record (with a charged velocity) and shape."""
    if not callable(velocity):
        raise TypeError("velocity must be a callable v(x, t)")
    if not isinstance(verifier, Verifier):
        raise TypeError(
            f"verifier must be a guidance.search Verifier; got {type(verifier).__name__} "
            "(wrap a function with CallableVerifier)"
        )
    shape = tuple(int(s) for s in (shape if hasattr(shape, "__iter__") else (shape,)))
    if not shape or any(s < 1 for s in shape):
        raise SearchError(f"shape of one sample must be non-empty and positive; got {shape}")
    if int(n_return) < 1:
        raise SearchError(f"n_return must be >= 1; got {n_return}")
    if int(steps) < 1:
        raise SearchError(f"steps must be >= 1; got {steps}")
    check_states(algo, int(n_return), shape, torch.float64, f"{int(n_return):,} returned samples")
    b = as_budget(budget)
    run = Run(algo, b, verifier, b.spent, verifier.calls, verifier.samples, b.wrap(velocity))
    return run, shape


def per_sample_budget(budget: Budget, n_return: int, one_sample: int, algo: str) -> int:
    """NFE each of ``n_return`` searches may spend; raises when it cannot pay ``one_sample``."""
    each = budget.remaining // int(n_return)
    if each < one_sample:
        raise BudgetExceeded(
            f"{algo}: a budget of {budget.remaining} NFE for {n_return} returned samples leaves "
            f"{each} per sample, less than one sample costs ({one_sample} NFE); raise the budget "
            f"to at least {one_sample * int(n_return)}"
        )
    return each


#: how many copies of its states a search holds at once, at most (noises, clean samples,
#: candidates kept for the records): the factor of :func:`check_states`
STATE_COPIES = 4


def check_states(algo: str, n_states: int, shape, dtype: torch.dtype, what: str) -> None:
    """Refuse a plan of ``n_states`` states of ``shape`` that this machine's memory cannot hold
    (:data:`STATE_COPIES` copies of ``n_states x prod(shape)`` numbers of ``dtype``), before
    anything is allocated; the :class:`~cspace.io.checks.SizeLimitError` names the plan."""
    nbytes = STATE_COPIES * int(n_states) * math.prod(int(s) for s in shape) * dtype.itemsize
    check_memory(
        nbytes,
        f"{algo}: {what} ({int(n_states):,} states of shape {tuple(shape)})",
        "lower the budget or the number of returned samples",
    )


def draw_noise(n: int, shape, generator, dtype=torch.float64, device=None) -> torch.Tensor:
    return torch.randn((int(n), *shape), generator=generator, dtype=dtype, device=device)


def grid(t_start: float, t_end: float, steps_per_unit: int) -> torch.Tensor:
    """A uniform time grid from ``t_start`` down to ``t_end`` with about ``steps_per_unit`` steps
    per unit of time (at least one step)."""
    n = max(1, math.ceil((t_start - t_end) * steps_per_unit - 1e-9))
    return torch.linspace(float(t_start), float(t_end), n + 1, dtype=torch.float64)


def ode(
    velocity: Velocity,
    x: torch.Tensor,
    times: torch.Tensor,
    method: str = "euler",
    chunk: int = 1 << 15,
) -> torch.Tensor:
    """Integrate the ODE over ``times`` with :func:`guidance.sample` in chunks of states."""
    outs = [
        sample(velocity, x[s : s + chunk], times=times, method=method, progress=False).samples
        for s in range(0, x.shape[0], chunk)
    ]
    return torch.cat(outs)


def x0_hat(velocity: Velocity, x: torch.Tensor, t: float) -> torch.Tensor:
    """The clean estimate ``x - t v(x, t)`` (:class:`~guidance.sampling.Prediction`; one NFE per
    state, none at t = 0)."""
    if t == 0:
        return x
    tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    return Prediction.from_velocity(x, t, velocity(x, tt)).x0_hat


def group_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate of each group, ``scores`` (G, N); the first one among ties."""
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise SearchError(
            f"empty candidate set: nothing to select from (scores {tuple(scores.shape)})"
        )
    if not bool(torch.isfinite(scores).all()):
        raise VerifierError("candidate scores contain NaN or Inf")
    return torch.argmax(scores, dim=1)
