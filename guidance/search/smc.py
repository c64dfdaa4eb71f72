r"""Trajectory search by sequential Monte Carlo on the SDE (FK steering, Singhal et al. 2025).

Particles follow the marginal-preserving SDE, one :func:`guidance.sampling.sde_step` at a time
(the step :func:`guidance.sample` takes with ``method="sde"``); an ODE would not do: resampled
copies of a particle would stay identical. Write ``x_k`` for the state at grid time ``t_k``
(``t_0 = 1``, ``t_S = 0``) and ``r_k = lambda * verifier(x0_hat(x_k))`` for the tempered reward
of its clean estimate (the step from ``x_k`` evaluates the velocity at ``x_k``, which gives
``x0_hat(x_k)`` at no extra NFE; ``x_S`` is its own clean sample).

**Potentials** (the FK paper's three; the incremental log-weight added at step k):

* ``diff``: ``r_k - r_{k-1}`` (telescopes: the total is ``r_S - r_0`` and ``r_0`` is the same for
  every particle, because ``x0_hat`` at t = 1 is the data mean; the particle system then targets
  ``p(x) exp(lambda verifier(x))`` at t = 0, exactly as the particles grow);
* ``max``: ``max_{j <= k} r_j``;
* ``sum``: ``sum_{j <= k} r_j``
  (``max`` and ``sum`` are heuristics of the paper: they target a path-dependent tilt).

**Weights are carried.** The log-weight of a particle accumulates the increments of every step
since the last resampling and is reset to 0 only when its group is resampled (dropping them
between resamplings, an open bug of the FK paper's public code, zacharyhorvitz/Fk-Diffusion-Steering
issue 12, leaves a system that no longer targets anything). Per-particle potential state (``r_{k-1}``, running max, running sum) is gathered with
the particles. A group is resampled after a step when its ESS ``(sum w)^2 / sum w^2`` falls below
``threshold x N`` (default N/2), multinomially or systematically.

**Layout.** ``groups`` independent particle systems of N particles each (N = the budget's
particles per group, ``budget // (groups x steps)``); each returns ``n_return / groups`` samples,
drawn by systematic resampling of its final weights (``select="sample"``) or its best final
particles by verifier score (``select="best"``, the FK paper's choice for search). The default for
search (``smc``) is one group per returned sample with ``select="best"``.

With a flat verifier every increment is the same for every particle: no resampling happens and
the particles are exactly the unguided SDE's (tested against exact samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from guidance.sampling import Prediction, Step, sde_step, time_grid
from guidance.search.budget import BudgetExceeded
from guidance.search.common import (
    Run,
    SearchError,
    SearchResult,
    begin,
    check_states,
    draw_noise,
)
from guidance.search.protocol import Algorithm

__all__ = [
    "SCHEMES",
    "FKPotential",
    "ParticleRun",
    "ParticleWeights",
    "check_particle_options",
    "particle_result",
    "particle_run",
    "propagate",
    "proposal_log_ratio",
    "resample_indices",
    "run_particles",
    "search",
]

SCHEMES = ("multinomial", "systematic")
POTENTIALS = ("diff", "max", "sum")


def _normalise(logw: torch.Tensor) -> torch.Tensor:
    """Normalised weights of each row of ``logw`` (G, N); a row of all -inf gets uniform weights."""
    mx = logw.max(dim=1, keepdim=True).values
    dead = ~torch.isfinite(mx)
    w = torch.exp(logw - torch.where(dead, torch.zeros_like(mx), mx))
    w = torch.where(dead, torch.ones_like(w), w)
    return w / w.sum(dim=1, keepdim=True)


def resample_indices(
    weights: torch.Tensor, n: int, scheme: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` ancestor indices per row of normalised ``weights`` (G, N); (G, n)."""
    if scheme not in SCHEMES:
        raise SearchError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")
    g = weights.shape[0]
    if scheme == "multinomial":
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    u = torch.rand((g, 1), generator=generator, dtype=weights.dtype, device=weights.device)
    pos = (u + torch.arange(n, dtype=weights.dtype, device=weights.device)[None]) / n
    cdf = torch.cumsum(weights, dim=1)
    cdf[:, -1] = 1.0  # guard against rounding
    return torch.searchsorted(cdf, pos).clamp(max=weights.shape[1] - 1)


class ParticleWeights:
    """Log-weights of ``groups`` systems of ``n`` particles, carried between resamplings.

    ``add(inc)`` accumulates increments; :meth:`maybe_resample` resamples the groups whose ESS is
    below ``threshold x n``, resets *only their* log-weights to 0, and adds their average weight to
    the log-evidence estimate ``log_z`` (G,).
    """

    def __init__(self, groups: int, n: int, dtype=torch.float64) -> None:
        self.groups, self.n = int(groups), int(n)
        self.logw = torch.zeros(self.groups, self.n, dtype=dtype)
        self.log_z = torch.zeros(self.groups, dtype=dtype)
        self.resamplings = 0
        self.last_resampled = torch.zeros(self.groups, dtype=torch.bool)

    def add(self, inc: torch.Tensor) -> None:
        inc = inc.reshape(self.groups, self.n).to(device=self.logw.device, dtype=self.logw.dtype)
        if bool(torch.isnan(inc).any()):
            raise SearchError("a log-weight increment is NaN (check the verifier and potential)")
        self.logw = self.logw + inc

    def normalised(self) -> torch.Tensor:
        return _normalise(self.logw)

    def ess(self) -> torch.Tensor:
        """Effective sample size of each group (G,)."""
        w = self.normalised()
        return 1.0 / (w**2).sum(dim=1)

    def dead_groups(self) -> torch.Tensor:
        return ~torch.isfinite(self.logw.max(dim=1).values)

    def _log_mean_w(self) -> torch.Tensor:
        return torch.logsumexp(self.logw, dim=1) - math.log(self.n)

    def maybe_resample(
        self, threshold: float, scheme: str, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Flat ancestor indices (G*n,) if some group was resampled, else None."""
        low = self.ess() < threshold * self.n
        self.last_resampled = low
        if not bool(low.any()):
            return None
        anc = torch.arange(self.n).repeat(self.groups, 1)
        rows = torch.nonzero(low).squeeze(1)
        anc[rows] = resample_indices(self.normalised()[rows], self.n, scheme, generator)
        self.log_z[rows] += self._log_mean_w()[rows]
        self.logw[rows] = 0.0
        self.resamplings += int(rows.numel())
        return (anc + self.n * torch.arange(self.groups)[:, None]).reshape(-1)

    def final_log_z(self) -> torch.Tensor:
        """Log-evidence estimate of each group including the weights since the last resampling."""
        return self.log_z + self._log_mean_w()


class FKPotential:
    """The FK steering potentials on verifier rewards; per-particle state gathered on resampling.

    ``step(prediction, t)`` returns the incremental log-weight of each particle from the
    verifier's score of ``prediction.x0_hat`` (see the module doc).
    """

    def __init__(self, verifier, kind: str, lam: float, m: int) -> None:
        if kind not in POTENTIALS:
            raise SearchError(f"unknown potential {kind!r}; choose one of {POTENTIALS}")
        if not (math.isfinite(lam) and lam >= 0):
            raise SearchError(f"lambda must be a finite number >= 0; got {lam}")
        self.verifier, self.kind, self.lam = verifier, kind, float(lam)
        self.prev = torch.zeros(m, dtype=torch.float64)
        self.run_max = torch.full((m,), -math.inf, dtype=torch.float64)
        self.run_sum = torch.zeros(m, dtype=torch.float64)
        self.last_scores: torch.Tensor | None = None

    def step(self, prediction: Prediction, t: float) -> torch.Tensor:
        return self._advance(prediction.x0_hat)

    def _advance(self, x0: torch.Tensor) -> torch.Tensor:
        s = self.verifier.score(x0)
        self.last_scores = s
        r = self.lam * s
        if self.kind == "diff":
            inc, self.prev = r - self.prev, r
        elif self.kind == "max":
            self.run_max = torch.maximum(self.run_max, r)
            inc = self.run_max.clone()
        else:
            self.run_sum = self.run_sum + r
            inc = self.run_sum.clone()
        return inc

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self._advance(x)

    def gather(self, idx: torch.Tensor) -> None:
        self.prev, self.run_max, self.run_sum = self.prev[idx], self.run_max[idx], self.run_sum[idx]


def propagate(
    velocity,
    x: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    *,
    noise_scale: float,
    generator: torch.Generator | None,
) -> tuple[Step, torch.Tensor]:
    """One SDE step (:func:`guidance.sampling.sde_step`) of ``velocity`` from t to t_next, and the
    proposal's log-ratio.

    ``velocity`` may be a :class:`~guidance.Guided` velocity (the proposal q) around the model (the
    reference p). Both steps share ``eps_hat`` and the noise, so
    ``q = N(mu_q, s^2 I)``, ``p = N(mu_p, s^2 I)`` with ``mu_q`` the step's ``mean``,
    ``s^2 = noise_scale t h`` its ``noise_var`` and ``d = mu_q - mu_p = h delta`` (``delta`` the
    prediction's displacement, ``v' = v - delta``). Returns ``(step, log_ratio)`` with
    ``log_ratio`` (B,) float64

        log N(x_next; mu_p, s^2) - log N(x_next; mu_q, s^2)
            = -(2 (x_next - mu_q) . d + |d|^2) / (2 s^2),

    zeros when nothing displaced the velocity. The velocity (and the guidance's field) is
    evaluated once per state.
    """
    step = sde_step(velocity, x, t, t_next, noise_scale=noise_scale, generator=generator)
    return step, proposal_log_ratio(step)


def proposal_log_ratio(step: Step) -> torch.Tensor:
    """``log p/q (x_next)`` of one Gaussian step (:func:`propagate`), from the step's own
    ``mean``, ``noise_var`` and ``shift`` (the proposal's mean minus the model's; None: ``h
    delta`` of the prediction's displacement, zeros without one); (B,) float64."""
    b = step.x_next.shape[0]
    delta = step.prediction.delta
    if step.shift is None and delta is None:
        return torch.zeros(b, dtype=torch.float64, device=step.x_next.device)
    if step.noise_var is None:
        raise SearchError("the proposal correction needs a stochastic step (sde_step)")
    shift = step.h * delta if step.shift is None else step.shift
    d = shift.reshape(b, -1).double()
    r = (step.x_next - step.mean).reshape(b, -1).double()
    var = step.noise_var.reshape(b).double()
    moved = (d != 0).any(1)
    if bool((moved & (var <= 0)).any()):
        raise SearchError(
            "the proposal moved a deterministic step (no noise at t_next = 0): its density "
            "ratio is undefined; keep the last step the model's own"
        )
    out = -(2 * (r * d).sum(1) + (d * d).sum(1)) / (2 * torch.where(var > 0, var, 1.0))
    return torch.where(moved, out, torch.zeros_like(out))


class Potential(Protocol):
    """What :func:`run_particles` needs of a potential: increments per particle (G*N,)."""

    def step(self, prediction: Prediction, t: float) -> torch.Tensor: ...

    def final(self, x: torch.Tensor) -> torch.Tensor: ...

    def gather(self, idx: torch.Tensor) -> None: ...


def run_particles(
    velocity,
    x: torch.Tensor,
    times: torch.Tensor,
    potential: Potential,
    weights: ParticleWeights,
    *,
    noise_scale: float,
    generator: torch.Generator | None,
    threshold: float,
    scheme: str,
):
    """The SMC loop: propagate (:func:`propagate`), weigh (potential increment + proposal
    log-ratio), resample.

    ``potential`` has ``step(prediction, t) -> inc`` (``prediction`` the step's
    :class:`~guidance.sampling.Prediction` at the particles before the move: ``x0_hat`` and any
    field output to reuse), ``final(x) -> inc`` and ``gather(idx)``.
    Returns the final particles and the per-step ESS (S, G) and resampling flags (S, G).
    """
    n_steps = times.numel() - 1
    grid = times.to(device=x.device, dtype=x.dtype)
    b = x.shape[0]
    ess_hist, resampled = [], []
    for k in range(n_steps):
        step, log_ratio = propagate(
            velocity,
            x,
            grid[k].repeat(b),
            grid[k + 1].repeat(b),
            noise_scale=noise_scale,
            generator=generator,
        )
        x = step.x_next
        weights.add(potential.step(step.prediction, float(times[k])) + log_ratio)
        ess_hist.append(weights.ess())
        flags = torch.zeros(weights.groups, dtype=torch.bool)
        if k < n_steps - 1:
            idx = weights.maybe_resample(threshold, scheme, generator)
            if idx is not None:
                x = x[idx]
                potential.gather(idx)
                flags = weights.last_resampled.clone()
        resampled.append(flags)
    weights.add(potential.final(x))
    return x, torch.stack(ess_hist), torch.stack(resampled)


def select(
    x: torch.Tensor,
    weights: ParticleWeights,
    scores: torch.Tensor,
    per_group: int,
    how: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_group`` particles of each group, by weighted systematic draw or best score.

    Returns flat indices (G*per_group,) into the particles and the groups' dead flags.
    """
    g, n = weights.groups, weights.n
    offs = n * torch.arange(g)[:, None]
    if how == "sample":
        idx = resample_indices(weights.normalised(), per_group, "systematic", generator)
    elif how == "best":
        sc = scores.reshape(g, n).clone()
        sc[~torch.isfinite(weights.logw)] = -math.inf  # a particle with weight 0 is not a result
        order = torch.argsort(sc, dim=1, descending=True, stable=True)
        idx = order[:, : min(per_group, n)]
        if per_group > n:
            idx = idx.repeat(1, -(-per_group // n))[:, :per_group]
    else:
        raise SearchError(f"unknown selection {how!r}; choose 'sample' or 'best'")
    return (idx + offs).reshape(-1), weights.dead_groups()


def _layout(budget_left: int, n_return: int, steps: int, groups, n_particles, algo: str, cost=None):
    """``(groups, particles per group)`` the budget pays, a particle's trajectory costing
    ``cost`` NFE (default ``steps``: one evaluation per step)."""
    cost = int(steps) if cost is None else int(cost)
    g = int(n_return) if groups is None else int(groups)
    if g < 1 or int(n_return) % g:
        raise SearchError(f"{algo}: groups ({g}) must divide n_return ({n_return})")
    if budget_left < int(n_return) * cost:
        raise BudgetExceeded(
            f"{algo}: a budget of {budget_left} NFE is less than one sample per returned sample "
            f"({n_return} x {cost} NFE per {steps}-step trajectory = {int(n_return) * cost} "
            "NFE); raise the budget"
        )
    n = budget_left // (g * cost) if n_particles is None else int(n_particles)
    if n_particles is None and n < 1:
        raise BudgetExceeded(
            f"{algo}: {g} particle systems of {cost} NFE per particle need at least {g * cost} "
            f"NFE (one particle each); the budget has {budget_left}"
        )
    if n < 1:
        raise SearchError(f"{algo}: empty candidate set (n_particles={n})")
    return g, n


def check_particle_options(algo: str, scheme: str, threshold: float, noise_scale: float) -> None:
    """The checks every particle search shares (resampling scheme, ESS threshold, a stochastic
    sampler); raises :class:`SearchError` naming the bad value."""
    if scheme not in SCHEMES:
        raise SearchError(f"{algo}: unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")
    if not 0 <= threshold <= 1:
        raise SearchError(f"{algo}: threshold must be in [0, 1]; got {threshold}")
    if not (math.isfinite(noise_scale) and noise_scale > 0):
        raise SearchError(
            f"{algo}: SMC needs a stochastic sampler: noise_scale must be > 0; got {noise_scale}"
        )


@dataclass
class ParticleRun:
    """The particles of a finished SMC run and what happened to them.

    Attributes:
        x: (G*N, ...) the final particles (t = 0).
        weights: their :class:`ParticleWeights` (log-weights including the final potential).
        ess: (S, G) ESS after each step; resampled: (S, G) resampling flags.
        groups, n: G systems of N particles.
        potential: the potential (its per-particle state gathered with the particles).
    """

    x: torch.Tensor
    weights: ParticleWeights
    ess: torch.Tensor
    resampled: torch.Tensor
    groups: int
    n: int
    potential: Potential


def particle_run(
    run: Run,
    shape: tuple[int, ...],
    velocity,
    make_potential: Callable[[int], Potential],
    *,
    n_return: int,
    steps: int,
    groups: int | None,
    n_particles: int | None,
    generator: torch.Generator | None,
    threshold: float,
    scheme: str,
    noise_scale: float,
    dtype: torch.dtype,
    device,
) -> ParticleRun:
    """The particle run every SMC search shares: layout from the budget, the budget check, the
    potential (``make_potential(G*N)``), initial noise, :func:`run_particles` on the uniform grid.

    ``velocity`` is the metered model (``run.velocity``) or a guidance wrapper around it.
    """
    g, n = _layout(run.budget.remaining, n_return, steps, groups, n_particles, run.algo)
    check_states(run.algo, g * n, shape, dtype, f"{g} x {n:,} particles")
    run.budget.require(g * n * int(steps), f"{run.algo} with {g} x {n} particles")
    pot = make_potential(g * n)
    w = ParticleWeights(g, n)
    x = draw_noise(g * n, shape, generator, dtype, device)
    x, ess, resampled = run_particles(
        velocity,
        x,
        time_grid(steps),
        pot,
        w,
        noise_scale=noise_scale,
        generator=generator,
        threshold=threshold,
        scheme=scheme,
    )
    return ParticleRun(x, w, ess, resampled, g, n, pot)


def particle_result(
    run: Run,
    pr: ParticleRun,
    scores: torch.Tensor,
    n_return: int,
    select_by: str,
    generator: torch.Generator | None,
    extra: Callable[[ParticleRun, torch.Tensor], dict] | None = None,
) -> SearchResult:
    """Select the returned particles (:func:`select`) and build the records every SMC search
    shares (see :func:`search`); ``extra(pr, idx)`` adds algorithm-specific records."""
    idx, dead = select(pr.x, pr.weights, scores, int(n_return) // pr.groups, select_by, generator)
    w = pr.weights
    records = {
        "n_particles": pr.n,
        "groups": pr.groups,
        "ess": pr.ess,
        "resampled": pr.resampled,
        "resamplings": w.resamplings,
        "log_z": w.final_log_z(),
        "final_logw": w.logw,
        "particles": pr.x,
        "weights": w.normalised(),
        "dead_groups": dead,
    }
    if extra is not None:
        records.update(extra(pr, idx))
    return run.result(pr.x[idx], scores[idx], records)


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
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
    """FK-steering SMC; see the module docstring.

    Args:
        potential: ``"diff"``, ``"max"`` or ``"sum"``; ``lam``: the reward's temperature.
        n_particles: particles per group (default: as many as the budget pays).
        groups: independent particle systems (default ``n_return``); each returns
            ``n_return / groups`` samples chosen by ``select_by`` (``"best"`` or ``"sample"``).
        threshold: resample a group when its ESS < threshold x N (default 0.5).
        scheme: ``"systematic"`` or ``"multinomial"`` resampling.

    A :class:`~guidance.Guided` velocity is a proposal: its displacement is corrected by the
    proposal log-ratio of :func:`propagate`, so the target stays the model's.

    Records: ``n_particles``, ``groups``, ``ess`` (S, G), ``resampled`` (S, G), ``resamplings``,
    ``log_z`` (G,), ``final_logw`` (G, N), ``particles`` (G*N, ...) and their normalised
    ``weights`` (G, N) at t = 0, ``dead_groups`` (G,).
    """
    run, shape = begin("smc", velocity, shape, verifier, budget, n_return, steps)
    check_particle_options("smc", scheme, threshold, noise_scale)
    pr = particle_run(
        run, shape, run.velocity, lambda m: FKPotential(verifier, potential, lam, m),
        n_return=n_return, steps=steps, groups=groups, n_particles=n_particles,
        generator=generator, threshold=threshold, scheme=scheme, noise_scale=noise_scale,
        dtype=dtype, device=device,
    )  # fmt: skip
    return particle_result(run, pr, pr.potential.last_scores, n_return, select_by, generator)


ALGORITHM = Algorithm(
    name="smc", run=search, searches_over="SDE trajectories (FK steering SMC)", needs_field=False
)
