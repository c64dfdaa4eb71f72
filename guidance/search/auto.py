r"""``auto``: rejection sampling where it is cheap, twisted SMC where it is not, chosen by a pilot.

1. **Pilot.** ``pilot`` draws of the plain sampler (default: 5% of the budget's draws, at least 32
   and at most ``n_return``), tested with the field's membership; the obstacles' mass is
   estimated as ``c = inside / pilot`` (with a 95% Wilson interval in the records).
2. **Choice.** Rejection costs ``steps / (1 - c)`` NFE per returned sample. It is chosen when
   ``1 - c >= min_acceptance`` (default 0.5: rejection needs at most twice the NFE of one pass)
   and the remaining budget pays ``1.2 x`` its expected cost; otherwise twisted SMC
   (:mod:`guidance.search.twisted`) runs on the remaining budget: with the model's proposal and
   Euler-Maruyama steps, or, where ``c >= high_coverage`` (default 0.95), with TDS's proposal on
   SDE-DPM-Solver++ 2M steps, the grid shifted by 0.5 and resampling at ESS < 0.3 N
   (:data:`HIGH_COVERAGE_SETTING`, ``"twisted-smc/dpm-twist-ess0.3"``). Measured on the toy
   (docs/noise-vs-trajectory.md, section 6): at coverage 0.99 the second is 1.2-1.8 x the exact
   floor where the first is 2.3-7 x; at coverage 0.8 (2.5 particles per sample) TDS's proposal
   is worse, 2.9-7.3 x against 1.2-3.1 x. The threshold between the two measured coverages is a
   choice, not a measurement.
3. **Reuse.** The pilot's draws that fell outside are exact samples: rejection keeps them and
   draws only the rest. Twisted SMC does not use them (its particles start from noise); the
   pilot's NFE still count.

A pilot that finds no sample outside raises :class:`SearchError` naming the estimate (every
draw inside: the mass outside is below ``3 / pilot`` at 95%), before anything else is computed.

Records: ``choice`` (``"rejection"``, ``"twisted-smc"`` or ``"twisted-smc/dpm-twist-ess0.3"``),
``inside_estimate``,
``inside_interval`` (95% Wilson), ``pilot`` (draws), ``pilot_nfe``, and the chosen algorithm's
records under ``chosen``.
"""

from __future__ import annotations

import math

import torch

from guidance.fields.regions import hard_regions
from guidance.sampling import sample, time_grid
from guidance.search import rejection, twisted
from guidance.search.budget import BudgetExceeded
from guidance.search.common import SearchError, SearchResult, begin, draw_noise
from guidance.search.protocol import Algorithm

#: twisted SMC's setting where the pilot finds at least ``high_coverage`` of the mass inside:
#: TDS's proposal on SDE-DPM-Solver++ 2M steps, the grid shifted by 0.5, resampling when the
#: ESS falls below 0.3 x the particles (measured: docs/noise-vs-trajectory.md, section 6)
HIGH_COVERAGE_SETTING = {"method": "dpm-sde", "proposal": "twist", "shift": 0.5, "threshold": 0.3}

__all__ = ["HIGH_COVERAGE_SETTING", "search", "wilson_interval"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


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
    pilot: int | None = None,
    min_acceptance: float = 0.5,
    high_coverage: float = 0.95,
    data_scale: float = 1.0,
    temper: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """The pilot, the choice and the chosen algorithm (module docstring)."""
    run, shape = begin("auto", velocity, shape, verifier, budget, n_return, steps)
    if field is None:
        raise SearchError("auto needs the obstacles' field (its membership test)")
    if not 0 < float(min_acceptance) <= 1:
        raise SearchError(f"auto: min_acceptance must be in (0, 1]; got {min_acceptance}")
    if not 0 <= float(high_coverage) <= 1:
        raise SearchError(f"auto: high_coverage must be in [0, 1]; got {high_coverage}")
    regions = hard_regions(field)
    cost = int(steps)
    affordable = run.budget.remaining // cost
    if affordable < 1:
        raise BudgetExceeded(
            f"auto: a budget of {run.budget.remaining} NFE is less than one pilot draw "
            f"({cost} NFE); raise the budget"
        )
    m = int(pilot) if pilot is not None else max(32, min(int(n_return), affordable // 20))
    if m < 1:
        raise SearchError(f"auto: the pilot needs at least one draw; got pilot={pilot}")
    if m > affordable:
        raise BudgetExceeded(
            f"auto: a pilot of {m} draws costs {m * cost} NFE but the budget has "
            f"{run.budget.remaining}; lower --pilot or raise the budget"
        )
    x = sample(run.velocity, draw_noise(m, shape, generator, dtype, device), times=time_grid(steps),
               progress=False).samples  # fmt: skip
    inside = regions.inside(x.reshape(m, -1)).to(x.device)
    k_in = int(inside.sum())
    c_hat = k_in / m
    lo, hi = wilson_interval(k_in, m)
    if k_in == m:
        raise SearchError(
            f"auto: all {m} pilot draws fell inside the obstacles (estimated mass inside "
            f"{c_hat:.3f}; outside below {3 / m:.3g} at 95%): no sample outside to estimate from; "
            "check that the obstacles do not cover everything, or raise --pilot"
        )
    free = x[~inside]
    rej_cost = (int(n_return) - free.shape[0]) * cost / max(1 - c_hat, 1e-12)
    pick_rejection = (1 - c_hat) >= float(min_acceptance) and (
        free.shape[0] >= int(n_return) or 1.2 * rej_cost <= run.budget.remaining
    )
    records = {
        "inside_estimate": c_hat,
        "inside_interval": (lo, hi),
        "pilot": m,
        "pilot_nfe": m * cost,
    }
    if pick_rejection:
        records["choice"] = "rejection"
        if free.shape[0] >= int(n_return):
            samples = free[: int(n_return)]
            records["chosen"] = {"draws": m, "accepted": int(free.shape[0])}
        else:
            rest = rejection.search(velocity, shape, verifier, run.budget, field=field,
                                    n_return=int(n_return) - free.shape[0], steps=steps,
                                    generator=generator, dtype=dtype, device=device)  # fmt: skip
            samples = torch.cat([free, rest.samples])
            records["chosen"] = rest.records
    else:
        high = c_hat >= float(high_coverage)
        records["choice"] = "twisted-smc/dpm-twist-ess0.3" if high else "twisted-smc"
        setting = HIGH_COVERAGE_SETTING if high else {}
        res = twisted.search(velocity, shape, verifier, run.budget, field=field,
                             n_return=n_return, steps=steps, generator=generator,
                             data_scale=data_scale, temper=temper, dtype=dtype,
                             device=device, **setting)  # fmt: skip
        samples = res.samples
        records["chosen"] = res.records
    scores = verifier.score(samples)
    return run.result(samples, scores, records)


ALGORITHM = Algorithm(
    name="auto",
    run=search,
    searches_over="a pilot, then rejection or twisted SMC (whichever is cheaper)",
    needs_field=True,
)
