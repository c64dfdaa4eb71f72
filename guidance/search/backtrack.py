"""Backtracking as a search: :func:`guidance.sample` with :class:`~guidance.Backtrack` on the SDE.

Each returned sample runs the SDE; when its clean estimate enters a hard obstacle radius it goes
back ``revert`` steps and redraws the noise of that segment (at most ``max_retries`` times). A retry
costs at most ``revert + 1`` extra NFE (the step that found the collision and the ``revert`` steps
walked again), so a sample costs at most ``steps + max_retries (revert + 1)`` NFE. The budget fixes
``max_retries`` (at most the given one) so that this worst case fits; the velocity is metered
like every search's, and the NFE actually spent are reported (usually far fewer).
"""

from __future__ import annotations

import torch

from guidance.sampling import Backtrack, Guided, sample, time_grid
from guidance.search.common import SearchError, SearchResult, begin, draw_noise, per_sample_budget
from guidance.search.protocol import Algorithm

__all__ = ["search"]


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    field,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    revert: int = 10,
    max_retries: int = 20,
    strength: float = 0.0,
    noise_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """Backtracking search; see the module docstring.

    Args:
        field: the obstacles' field (hard radii for the collision check; its force is added when
            ``strength > 0``).
        revert, max_retries: the :class:`~guidance.Backtrack` settings (max_retries is an upper
            bound: the budget may lower it).

    Records: ``max_retries`` (used), ``retries`` (n_return,), ``collided`` (n_return,).
    """
    run, shape = begin("backtrack", velocity, shape, verifier, budget, n_return, steps)
    if field is None:
        raise SearchError("backtracking needs the obstacles' field (hard collision radii)")
    if int(revert) < 1 or int(max_retries) < 0:
        raise SearchError(f"need revert >= 1 and max_retries >= 0; got {revert}, {max_retries}")
    each = per_sample_budget(run.budget, n_return, int(steps), "backtrack")
    retries = min(int(max_retries), (each - int(steps)) // (int(revert) + 1))
    worst = int(n_return) * (int(steps) + retries * (int(revert) + 1))
    run.budget.require(worst, "backtracking (worst case)")
    # the field displaces x0_hat when strength > 0 (its evaluation then also serves the
    # collision check) and is known to the sampler either way (the final collision flags)
    out = sample(
        Guided(run.velocity, field, strength=strength),
        draw_noise(n_return, shape, generator, dtype, device),
        times=time_grid(steps),
        method="sde",
        noise_scale=noise_scale,
        backtrack=(
            Backtrack(revert=int(revert), max_retries=retries, field=field) if retries > 0 else None
        ),
        generator=generator,
        progress=False,
    )
    scores = verifier.score(out.samples)
    records = {"max_retries": retries, "retries": out.retries, "collided": out.collided}
    return run.result(out.samples, scores, records)


ALGORITHM = Algorithm(
    name="backtrack", run=search, searches_over="SDE segments (retries)", needs_field=True
)
