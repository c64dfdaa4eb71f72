"""Random search (best-of-N over initial noises; Ma et al. 2025, sec. 3.2).

For each of the ``n_return`` searches: draw N noises, solve the probability-flow ODE from t = 1 to
t = 0 for each, score the clean samples with the verifier, return the best (the first among ties).
N is the largest number the per-sample budget pays: ``N = (budget // n_return) // (steps x NFE per
step)``. All candidates are scored in one verifier call.
"""

from __future__ import annotations

import torch

from guidance.sampling import time_grid
from guidance.sampling.steps import trajectory_nfe
from guidance.search.common import (
    SearchError,
    SearchResult,
    begin,
    check_states,
    draw_noise,
    group_argmax,
    ode,
    per_sample_budget,
)
from guidance.search.protocol import Algorithm

__all__ = ["search"]


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    method: str = "euler",
    n_candidates: int | None = None,
    dtype: torch.dtype = torch.float64,
    device=None,
    record: bool = False,
) -> SearchResult:
    """Best-of-N random search; see the module docstring.

    Args:
        n_candidates: N per returned sample (default: as many as the budget pays).
        method: the ODE solver of :func:`guidance.sample` (``"euler"`` or ``"heun"``).
        record: also keep every candidate's clean sample in ``records["candidates"]``.

    Records: ``noises`` (n_return, N, ...), ``candidate_scores`` (n_return, N), ``best_index``
    (n_return,), ``n_candidates``.
    """
    run, shape = begin("best-of-n", velocity, shape, verifier, budget, n_return, steps)
    if method not in ("euler", "heun"):
        raise SearchError(
            f"best-of-n solves an ODE: method must be 'euler' or 'heun'; got {method}"
        )
    cost = trajectory_nfe(steps, method)
    each = per_sample_budget(run.budget, n_return, cost, "best-of-n")
    n = each // cost if n_candidates is None else int(n_candidates)
    if n < 1:
        raise SearchError(f"best-of-n: empty candidate set (n_candidates={n})")
    check_states("best-of-n", n_return * n, shape, dtype, f"{n:,} candidates per returned sample")
    run.budget.require(n * cost * n_return, f"best-of-n with {n} candidates per sample")
    noise = draw_noise(n_return * n, shape, generator, dtype, device)
    x0 = ode(run.velocity, noise, time_grid(steps), method)
    scores = verifier.score(x0).reshape(n_return, n)
    best = group_argmax(scores)
    rows = torch.arange(n_return)
    cand = x0.reshape(n_return, n, *shape)
    records = {
        "noises": noise.reshape(n_return, n, *shape),
        "candidate_scores": scores,
        "best_index": best,
        "n_candidates": n,
    }
    if record:
        records["candidates"] = cand
    return run.result(cand[rows, best], scores[rows, best], records)


ALGORITHM = Algorithm(
    name="best-of-n", run=search, searches_over="initial noises (ODE)", needs_field=False
)
