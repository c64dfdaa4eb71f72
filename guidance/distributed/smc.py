r"""One SMC particle system spread over the ranks of a process group (FK steering,
:mod:`guidance.search.smc`, across processes and GPUs).

The ``M = G x N`` particles are split into contiguous blocks, one per rank (rank r holds the
particles ``[start_r, stop_r)``, ``numpy.array_split`` order). Each step:

1. every rank draws the noise of **all** M particles from its copy of the generator (the same
   draw, in the same order, as the one-process run) and keeps its rows: the initial noise and
   each SDE step's ``z`` (:func:`guidance.sampling.sde_step` with ``noise=``);
2. each rank evaluates the model (and any guidance) and the verifier on its particles only;
3. the verifier scores and the proposal log-ratios are all-gathered (M numbers each), so every
   rank holds the whole system's log-weights, the FK potentials' per-particle state and the ESS;
4. resampling is global: every rank draws the same ancestors from the same weights and
   generator; the particles move between ranks by an all-gather, and each rank keeps the
   ancestors of its block.

So with the same generator seed the particles, weights, ESS, resampling steps, log-evidence and
returned samples are those of the one-process :func:`guidance.search.smc.search` (tested with 2
gloo processes, float64, to 1e-12), and the NFE and verifier samples are summed over the ranks.
The returned :class:`~guidance.search.common.SearchResult` is the same on every rank.

Cost per step beyond the model: drawing M noises on every rank (cheap next to the model), an
all-gather of 2M numbers, and at a resampling an all-gather of the M particles (the simple and
exact choice; ``all_to_all`` would move only the particles that change rank).
At start the ranks compare a digest of the settings and of the generator's state (a
different seed on one rank is an error on every rank); more ranks than particles is an error.
"""

from __future__ import annotations

import hashlib

import torch

from guidance.distributed.comm import (
    Group,
    all_gather_cat,
    all_reduce,
    check_same,
    check_world,
    current,
)
from guidance.sampling import sde_step, time_grid
from guidance.search.common import SearchResult, begin, check_states, draw_noise
from guidance.search.smc import (
    FKPotential,
    ParticleRun,
    ParticleWeights,
    _layout,
    check_particle_options,
    particle_result,
    proposal_log_ratio,
)

__all__ = ["generator_digest", "search"]


def generator_digest(generator: torch.Generator | None) -> str:
    """SHA-256 (hex) of a generator's state (``"global"`` for None: the global generator's
    state is not compared)."""
    if generator is None:
        return "global"
    return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()


class _GatheredScores:
    """A verifier whose scores of this rank's particles come back as the whole system's (the
    ranks' scores all-gathered in rank order)."""

    def __init__(self, verifier, g: Group) -> None:
        self.verifier, self.g = verifier, g

    def score(self, x0: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(self.verifier.score(x0), self.g, "gathering the verifier scores")


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    group=None,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    potential: str = "diff",
    lam: float = 1.0,
    n_particles: int | None = None,
    groups: int | None = None,
    select_by: str = "best",
    threshold: float = 0.5,
    scheme: str = "systematic",
    noise_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """FK-steering SMC over the ranks of ``group`` (module docstring); the arguments are those of
    :func:`guidance.search.smc.search`, ``budget`` the NFE of the whole system (all ranks).

    ``generator`` must be seeded the same on every rank (checked). Records as for the
    one-process search (``particles`` and ``weights`` of the whole system, on every rank);
    ``nfe`` and ``verifier_samples`` are the sums over the ranks, ``verifier_calls`` this
    rank's (each rank calls its verifier once per step, as one process does).
    """
    g = current(group)
    shape_t = tuple(int(s) for s in (shape if hasattr(shape, "__iter__") else (shape,)))
    settings = dict(
        algo="smc", shape=shape_t, budget=int(getattr(budget, "remaining", budget)),
        n_return=n_return, steps=steps, potential=potential, lam=lam, n_particles=n_particles,
        groups=groups, select_by=select_by, threshold=threshold, scheme=scheme,
        noise_scale=noise_scale, dtype=str(dtype), generator=generator_digest(generator),
    )  # fmt: skip
    check_same(settings, "SMC settings and generator seed", g)
    run, shape = begin("smc", velocity, shape, verifier, budget, n_return, steps)
    check_particle_options("smc", scheme, threshold, noise_scale)
    n_groups, n = _layout(run.budget.remaining, n_return, steps, groups, n_particles, run.algo)
    m = n_groups * n
    check_world(m, "particles", g, "use fewer processes or more particles")
    lo, hi = g.block(m)
    check_states(run.algo, m, shape, dtype, f"{n_groups} x {n:,} particles")
    run.budget.require(m * int(steps), f"{run.algo} with {n_groups} x {n} particles")
    spent0 = run.budget.spent
    pot = FKPotential(_GatheredScores(verifier, g), potential, lam, m)
    w = ParticleWeights(n_groups, n)
    x = draw_noise(m, shape, generator, dtype, device)[lo:hi]
    times = time_grid(steps)
    grid = times.to(device=x.device, dtype=x.dtype)
    ess_hist, resampled = [], []
    for k in range(int(steps)):
        z = torch.randn((m, *shape), generator=generator, device=x.device, dtype=x.dtype)
        b = x.shape[0]
        step = sde_step(
            run.velocity, x, grid[k].repeat(b), grid[k + 1].repeat(b),
            noise_scale=noise_scale, noise=z[lo:hi],
        )  # fmt: skip
        x = step.x_next
        inc = pot.step(step.prediction, float(times[k]))  # (M,): scores gathered
        log_ratio = all_gather_cat(proposal_log_ratio(step), g, "gathering the log-weights")
        w.add(inc + log_ratio)
        ess_hist.append(w.ess())
        flags = torch.zeros(w.groups, dtype=torch.bool)
        if k < int(steps) - 1:
            idx = w.maybe_resample(threshold, scheme, generator)
            if idx is not None:
                every = all_gather_cat(x, g, "exchanging the resampled particles")
                x = every[idx[lo:hi].to(every.device)]
                pot.gather(idx)
                flags = w.last_resampled.clone()
        resampled.append(flags)
    w.add(pot.final(x))
    x_all = all_gather_cat(x, g, "gathering the final particles")
    # the whole system's NFE: this rank's and the others'
    local = run.budget.spent - spent0
    total = int(all_reduce(torch.tensor([local], dtype=torch.long), "sum", g)[0])
    run.budget.spent += total - local
    mine = torch.tensor([verifier.samples - run.start_samples], dtype=torch.long)
    run.start_samples = verifier.samples - int(all_reduce(mine, "sum", g)[0])
    pr = ParticleRun(x_all, w, torch.stack(ess_hist), torch.stack(resampled), n_groups, n, pot)
    return particle_result(run, pr, pot.last_scores, n_return, select_by, generator)
