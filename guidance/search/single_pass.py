"""One pass of a guided sampler as a search entry: no candidates, no selection, one solve per
returned sample (``steps`` NFE each), so that the negation denoiser and the safety filter sit in
the same tables as the searches (:data:`guidance.search.ALGORITHMS`).

* ``negation``: :class:`~guidance.sampling.NegationDenoiser` (the obstacles' examples as the
  negation set), SDE by default;
* ``safety-filter``: :class:`~guidance.sampling.SafetyFilter` (the constricting barrier tube),
  Euler by default (its guarantee holds for Euler steps of size <= 1/alpha).

Neither is exact: they change the law of what they return (measured in
``docs/noise-vs-trajectory.md``). Records: ``inside`` (share of returned samples inside a hard
region, by the field's membership).
"""

from __future__ import annotations

import torch

from guidance.fields.regions import hard_regions
from guidance.sampling import NegationDenoiser, SafetyFilter, sample, time_grid
from guidance.sampling.steps import trajectory_nfe
from guidance.search.common import SearchError, SearchResult, begin, draw_noise, per_sample_budget
from guidance.search.protocol import Algorithm

__all__ = ["negation", "safety_filter"]


def _one_pass(run, wrapped, shape, n_return, steps, method, noise_scale, generator, dtype, device,
              field, verifier):  # fmt: skip
    if method not in ("euler", "heun", "sde"):
        raise SearchError(f"{run.algo}: method must be 'euler', 'heun' or 'sde'; got {method!r}")
    cost = trajectory_nfe(steps, method)
    per_sample_budget(run.budget, n_return, cost, run.algo)
    out = sample(wrapped, draw_noise(n_return, shape, generator, dtype, device),
                 times=time_grid(steps), method=method, noise_scale=noise_scale,
                 generator=generator, progress=False)  # fmt: skip
    inside = hard_regions(field).inside(out.samples.reshape(out.samples.shape[0], -1))
    scores = verifier.score(out.samples)
    return run.result(out.samples, scores, {"inside": float(inside.double().mean())})


def negation(
    velocity,
    shape,
    verifier,
    budget,
    *,
    field,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    data_scale: float = 1.0,
    temper: float = 1.0,
    beta_max: float = 0.9,
    negation_strength: float = 1.0,
    method: str = "sde",
    noise_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """One pass of the negation denoiser (module docstring); its settings as
    :class:`~guidance.sampling.NegationDenoiser`'s (``negation_strength`` its ``strength``)."""
    run, shape = begin("negation", velocity, shape, verifier, budget, n_return, steps)
    if field is None:
        raise SearchError("negation needs the obstacles' field (its examples and hard regions)")
    wrapped = NegationDenoiser(run.velocity, field, data_scale=data_scale, temper=temper,
                               beta_max=beta_max, strength=negation_strength)  # fmt: skip
    return _one_pass(run, wrapped, shape, n_return, steps, method, noise_scale, generator, dtype,
                     device, field, verifier)  # fmt: skip


def safety_filter(
    velocity,
    shape,
    verifier,
    budget,
    *,
    field,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    alpha: float = 10.0,
    kappa: float = 3.0,
    method: str = "euler",
    noise_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """One pass of the safety filter (module docstring); ``alpha``, ``kappa`` as
    :class:`~guidance.sampling.SafetyFilter`'s."""
    run, shape = begin("safety-filter", velocity, shape, verifier, budget, n_return, steps)
    if field is None:
        raise SearchError("safety-filter needs the obstacles' field (its hard regions)")
    wrapped = SafetyFilter(run.velocity, field, alpha=alpha, kappa=kappa)
    return _one_pass(run, wrapped, shape, n_return, steps, method, noise_scale, generator, dtype,
                     device, field, verifier)  # fmt: skip


NEGATION = Algorithm(
    name="negation",
    run=negation,
    searches_over="nothing: one pass of the negation denoiser (SDE)",
    needs_field=True,
)
SAFETY_FILTER = Algorithm(
    name="safety-filter",
    run=safety_filter,
    searches_over="nothing: one pass of the barrier safety filter (Euler)",
    needs_field=True,
)
