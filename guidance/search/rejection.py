r"""Rejection sampling: the baseline every avoidance method is measured against.

Draw samples with the plain sampler (no guidance), test each final sample with the field's own
membership (``clearance < 0``: inside a hard radius of an obstacle set, on the bad side of a
classifier's boundary, inside a toy ball; :func:`guidance.fields.regions.hard_regions`), keep
those outside, and draw again until ``n_return`` have passed or the budget cannot pay another
draw. Every draw costs its full solve (``steps`` NFE for Euler, the SDE and SDE-DPM-Solver++,
``2 steps`` for Heun, ``2 steps - 1`` for the stochastic Heun step), discarded or not, so the reported NFE include every rejected draw.

What it returns is exact in the limit that matters: a sample of the *sampler's* law restricted to
the outside of the obstacles, ``p_model(x) 1[x free] / Z``, with no approximation beyond the
sampler's own discretisation. Its cost is ``steps / (1 - coverage)`` NFE per returned sample,
``coverage`` the model's mass inside the obstacles.

**Rounds.** The draws are made in batches: the first of ``n_return`` draws (or what the budget
pays; or the samples given as ``first``, drawn elsewhere with the same sampler), then, with ``a`` the acceptance measured so far (at least one success counted), ``ceil(
1.1 x missing / a) + 8`` draws, capped by the budget and by ``max_batch``. The NFE a one-at-a-time
sampler would have spent to reach the ``n_return``-th success in the same draw order is reported
as ``nfe_needed`` beside the NFE actually spent (the last batch may overshoot).

**Budget.** A budget below one draw per returned sample (what ``n_return`` samples cost with no
obstacle at all) raises :class:`~guidance.search.BudgetExceeded` before
anything is computed. When the budget ends with fewer than ``n_return`` successes, the ones found
are returned (``records["shortfall"]`` says how many are missing); when it ends with none, a
:class:`SearchError` names the acceptance estimate (at most ``1 / draws``).
"""

from __future__ import annotations

import math

import torch

from guidance.fields.regions import hard_regions
from guidance.sampling import STEPS, sample, time_grid
from guidance.sampling.steps import trajectory_nfe
from guidance.search.budget import BudgetExceeded
from guidance.search.common import SearchError, SearchResult, begin, check_states, draw_noise
from guidance.search.protocol import Algorithm

__all__ = ["draw_cost", "search"]


def draw_cost(steps: int, method: str) -> int:
    """NFE of one draw (:func:`guidance.sampling.steps.trajectory_nfe`)."""
    if method not in STEPS:
        raise SearchError(f"rejection: method must be one of {tuple(STEPS)}; got {method!r}")
    return trajectory_nfe(steps, method)


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    field=None,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    method: str = "euler",
    noise_scale: float = 1.0,
    shift: float = 1.0,
    max_batch: int = 1 << 16,
    first: torch.Tensor | None = None,
    membership=None,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """Rejection sampling; see the module docstring.

    Args:
        field: the obstacles' field; its hard regions are the membership test.
        method: the plain sampler, ``"euler"`` (the ODE, default), ``"heun"``, ``"sde"`` or
            ``"sde-heun"`` (:data:`guidance.sampling.STEPS`).
        shift: the time grid's shift (:func:`guidance.sampling.time_grid`; 1: uniform).
        max_batch: the largest number of draws solved at once.
        first: (m, *shape) final samples already drawn with this plain sampler (the same
            ``method``, ``steps``, ``shift`` and ``noise_scale``), for instance another arm's
            unguided samples: they are the first round (tested in order, charged ``m x`` a
            draw's NFE like any other draw), and only the rejected ones are drawn again.
            Comparing arms on common draws removes the sampling noise of an independent set
            from their difference; the law of what is returned is unchanged.
        membership: instead of the field's hard regions, any test with a method
            ``inside(states) -> (m,) bool`` on the flattened states (m, d) and its ``dim`` d,
            for instance :class:`obstacles.KernelRegion` (``field`` may then be None); checked
            against the samples' size before any draw.

    Records: ``draws``, ``accepted`` (outside, including any beyond ``n_return``),
    ``acceptance`` (accepted / draws), ``inside_estimate`` (1 - acceptance), ``nfe_needed``,
    ``shortfall`` (n_return minus what is returned), ``rounds``.
    """
    run, shape = begin("rejection", velocity, shape, verifier, budget, n_return, steps)
    if membership is not None:
        if not callable(getattr(membership, "inside", None)):
            raise SearchError(
                f"rejection: membership must have a method inside(states) -> bool per state; got "
                f"{type(membership).__name__}"
            )
        dim = getattr(membership, "dim", None)
        if dim != math.prod(shape):
            raise SearchError(
                f"rejection: the membership test is for states of d={dim}, the samples flatten "
                f"to d={math.prod(shape)}; fit it on embeddings of the samples' space"
            )
        regions = membership
    elif field is None:
        raise SearchError("rejection needs the obstacles' field (its membership test)")
    else:
        regions = hard_regions(field)
    cost = draw_cost(steps, method)
    if run.budget.remaining < int(n_return) * cost:
        raise BudgetExceeded(
            f"rejection: a budget of {run.budget.remaining} NFE is less than one draw per "
            f"returned sample ({n_return} x {cost} NFE per {steps}-step {method} draw = "
            f"{int(n_return) * cost} NFE, the cost with no obstacle at all); raise the budget to "
            f"at least {int(n_return) * cost}, about {int(n_return) * cost} / (1 - coverage)"
        )
    n_return = int(n_return)
    times = time_grid(steps, shift=shift)
    kept: list[torch.Tensor] = []
    have = draws = rounds = 0
    nfe_needed = None
    while have < n_return:
        affordable = run.budget.remaining // cost
        if affordable < 1:
            break
        missing = n_return - have
        if draws == 0:
            m = missing
        else:
            acc = max(have, 1) / draws
            m = math.ceil(1.1 * missing / acc) + 8
        m = max(1, min(m, affordable, int(max_batch)))
        if draws == 0 and first is not None:  # the given draws, paid for as draws
            x = _given(first, shape, affordable, cost, dtype, device)
            m = x.shape[0]
            run.budget.charge(m * cost, f"{m} given draws")
        else:
            check_states("rejection", m, shape, dtype, f"a batch of {m:,} draws")
            noise = draw_noise(m, shape, generator, dtype, device)
            x = sample(run.velocity, noise, times=times, method=method, noise_scale=noise_scale,
                       generator=generator, progress=False).samples  # fmt: skip
        free = ~regions.inside(x.reshape(m, -1)).to(x.device)
        idx = torch.nonzero(free).flatten()
        if nfe_needed is None and have + idx.numel() >= n_return:
            nth = int(idx[missing - 1])  # draw order within this batch
            nfe_needed = (draws + nth + 1) * cost
        kept.append(x[idx])
        have += int(idx.numel())
        draws += m
        rounds += 1
    if have == 0:
        raise SearchError(
            f"rejection: none of {draws:,} draws fell outside the obstacles (estimated mass "
            f"outside below {1 / draws:.3g}); the budget of {run.budget.total:,} NFE cannot find "
            "one: raise it, or use twisted SMC (--algo twisted-smc)"
        )
    samples = torch.cat(kept)[:n_return]
    scores = verifier.score(samples)
    records = {
        "draws": draws,
        "accepted": have,
        "acceptance": have / draws,
        "inside_estimate": 1 - have / draws,
        "nfe_needed": nfe_needed if nfe_needed is not None else draws * cost,
        "shortfall": n_return - int(samples.shape[0]),
        "rounds": rounds,
    }
    return run.result(samples, scores, records)


def _given(first, shape: tuple, affordable: int, cost: int, dtype, device) -> torch.Tensor:
    """``first`` checked and moved where the search's own draws go (``dtype``, ``device``; None:
    torch's default device, as for the noise): real floating samples (m, *shape), m >= 1, that
    the budget can pay for, finite after the cast."""
    if not torch.is_tensor(first) or tuple(first.shape[1:]) != tuple(shape) or not len(first):
        got = tuple(first.shape) if torch.is_tensor(first) else type(first).__name__
        raise SearchError(
            f"rejection: first must be a tensor of samples (m, {', '.join(map(str, shape))}) "
            f"with m >= 1; got {got}"
        )
    if not first.dtype.is_floating_point:
        raise SearchError(
            f"rejection: first must hold real floating-point samples; got {first.dtype} (draw them "
            "with the same sampler, or convert them with .to(torch.float32))"
        )
    if first.shape[0] > affordable:
        raise BudgetExceeded(
            f"rejection: {first.shape[0]} given first draws cost {first.shape[0] * cost} NFE but "
            f"the budget pays {affordable} draws ({affordable * cost} NFE); raise the budget"
        )
    x = first.to(dtype=dtype, device=torch.empty(0, device=device).device)
    if not bool(torch.isfinite(x).all()):
        raise SearchError(
            f"rejection: the given first draws hold NaN or infinite values (in {dtype}: values "
            "beyond its range become infinite)"
        )
    return x


ALGORITHM = Algorithm(
    name="rejection",
    run=search,
    searches_over="independent draws of the plain sampler (membership test)",
    needs_field=True,
)
