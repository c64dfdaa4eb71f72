r"""Guided SMC: exact sampling of the data distribution restricted to the outside of obstacles.

Target: ``pi(x) = p0(x) 1[x free] / Z`` ("free": outside every hard obstacle radius). The particle
system below targets it exactly in the limit of many particles (up to the SDE's time
discretisation), and uses the repulsive field only to *propose* better moves.

**Reference process.** The unguided Euler-Maruyama chain of the marginal-preserving SDE
(:func:`guidance.sample`, ``method="sde"``): from ``x_k`` at ``t_k`` to ``t_{k+1} = t_k - h``,

    p(x_{k+1} | x_k) = N(mu_p, s^2 I),  mu_p = x_k - h v - h (g^2 / 2t) eps_hat,  s^2 = g^2 h,

with ``g^2 = noise_scale t``. Its law of ``x_S`` (t = 0) is p0 up to the discretisation error.

**Proposal.** The guided step of :func:`guidance.sample` in clean mode: the velocity becomes
``v - lambda(t) F(x0_hat)`` (``lambda(t) = strength x weight(t)``), the noise and the score term are
unchanged, so ``q(x_{k+1} | x_k) = N(mu_q, s^2 I)`` with ``mu_q = mu_p + d``,
``d = h lambda(t) F(x0_hat(x_k))``: same covariance, shifted mean. The density ratio of one step is

    log p/q (x_{k+1}) = [|x_{k+1} - mu_q|^2 - |x_{k+1} - mu_p|^2] / (2 s^2)
                      = -(2 (x_{k+1} - mu_q) . d + |d|^2) / (2 s^2),

computed from the step's own ``x0_hat`` (``v = (x - x0_hat)/t``). Its expectation under q is
``-|d|^2 / 2s^2 = -h lambda(t)^2 |F|^2 / (2 noise_scale t)`` (Girsanov): the default
``weight(t) = t`` keeps this finite as t -> 0, where ``s^2`` vanishes.

**Potentials.** ``G_k(x_k) = Phi(c(x0_hat(x_k)) / sigma(t_k))``, Phi the standard normal CDF,
``c`` the clearance of the field (negative inside), and ``sigma(t) = temper x a t / sqrt(t^2 +
(1-t)^2 a^2)`` the posterior std of ``x0`` given ``x_t`` for data locally Gaussian of scale
``a = data_scale``: ``G_k`` approximates the probability that the particle ends free, and it
sharpens to the hard indicator as t -> 0. The final potential is the exact indicator
``G_S(x_S) = 1[x_S free]`` (x_S is its own clean sample).

**Weights.** With ``G_{-1} = 1``, step k adds

    log w += log G_k(x_k) - log G_{k-1}(x_{k-1}) + log p/q (x_{k+1} | x_k),

and at the end ``log 1[x_S free] - log G_{S-1}(x_{S-1})``. Over a path the potentials telescope, so
the product of all increments is ``1[x_S free] p(x_{0:S}) / q(x_{0:S})``: the weighted particles
estimate expectations under the reference path law restricted to free endpoints, whose t = 0
marginal is ``p0 restricted`` (of the discretised SDE). Resampling (when a group's ESS < N/2)
multiplies particles in proportion to their carried weights and resets them, which leaves every
such expectation unbiased-in-the-limit (the standard SMC argument); potential values are gathered
with the particles. The intermediate potentials change only the variance: they resample particles
heading into obstacles early, while the SDE noise left can still spread their replacements. The
returned samples are drawn by systematic resampling of the final weights.

Without a field force (``strength = 0``) this is plain SMC on the SDE with the tempered clearance
potentials; with a flat potential it is the unguided SDE.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from guidance.sampler import time_grid
from guidance.search.common import SearchError, SearchResult, begin, draw_noise
from guidance.search.smc import SCHEMES, ParticleWeights, _layout, run_particles, select

__all__ = ["ClearancePotential", "posterior_std", "search"]


def posterior_std(t: float, data_scale: float) -> float:
    """Std of x0 given x_t for data locally N(m, a^2): ``a t / sqrt(t^2 + (1-t)^2 a^2)``."""
    a = float(data_scale)
    return a * t / math.sqrt(t**2 + (1 - t) ** 2 * a**2)


class ClearancePotential:
    """``log G_k = log Phi(c / sigma(t))`` on ``x0_hat``, the hard indicator at the end; the
    increments telescope (per-particle previous value gathered on resampling)."""

    def __init__(self, field, m: int, data_scale: float = 1.0, temper: float = 1.0) -> None:
        if not (data_scale > 0 and temper > 0):
            raise SearchError("data_scale and temper must be > 0")
        self.field = field
        self.data_scale, self.temper = float(data_scale), float(temper)
        self.prev = torch.zeros(m, dtype=torch.float64)

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.evaluate(x, need_force=False).clearance.to(torch.float64).reshape(-1)

    def log_g(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        sigma = self.temper * posterior_std(t, self.data_scale)
        return torch.special.log_ndtr(self.clearance(x0) / sigma)

    def step(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        lg = self.log_g(x0, t)
        inc, self.prev = lg - self.prev, lg
        return inc

    def final(self, x: torch.Tensor) -> torch.Tensor:
        c = self.clearance(x)
        lg = torch.where(c >= 0, torch.zeros_like(c), torch.full_like(c, -math.inf))
        inc = lg - self.prev
        self.prev = lg
        return inc

    def gather(self, idx: torch.Tensor) -> None:
        self.prev = self.prev[idx]


def _sqrt_weight(t: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(t)


class CappedField:
    """A field whose force norm is capped at ``max_force`` (clearance unchanged): a bounded
    proposal displacement keeps the importance weights from degenerating."""

    def __init__(self, field, max_force: float) -> None:
        if not (math.isfinite(max_force) and max_force > 0):
            raise SearchError(f"max_force must be a finite number > 0; got {max_force}")
        self.field, self.max_force = field, float(max_force)

    def evaluate(self, x, t=None, *, need_force: bool = True):
        out = self.field.evaluate(x, t, need_force=need_force)
        if need_force:
            f = out.force.reshape(x.shape[0], -1)
            norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
            f = f * torch.clamp(self.max_force / norm.clamp(min=1e-300), max=1.0)
            out = dataclasses.replace(out, force=f.reshape(out.force.shape))
        return out


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
    strength: float = 1.0,
    weight=_sqrt_weight,
    max_force: float | None = 1.0,
    data_scale: float = 1.0,
    temper: float = 1.0,
    n_particles: int | None = None,
    groups: int | None = 1,
    select_by: str = "sample",
    threshold: float = 0.5,
    scheme: str = "systematic",
    noise_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """Guided SMC; see the module docstring.

    Args:
        field: the obstacles' field (``evaluate`` gives ``clearance`` and ``force``).
        strength, weight: the proposal's guidance ``lambda(t) = strength x weight(t)``
            (default ``weight(t) = t``); ``strength = 0`` proposes with the unguided SDE.
        data_scale, temper: the potentials' ``sigma(t)`` (see the module docstring).
        n_particles: particles per group (default: as many as the budget pays).
        groups: independent systems (default 1); each returns ``n_return / groups`` samples.
        select_by: ``"sample"`` (weighted draw, default) or ``"best"`` (verifier score).

    The verifier scores the final particles (one call) for the returned ``scores``.
    Records: as :func:`guidance.search.smc.search`, plus ``free_fraction`` (the share of final
    particles outside the obstacles) and ``unique`` (distinct particles returned).
    """
    run, shape = begin("smc-guided", velocity, shape, verifier, budget, n_return, steps)
    if field is None or not hasattr(field, "evaluate"):
        raise SearchError("smc-guided needs the obstacles' field (with evaluate())")
    if scheme not in SCHEMES:
        raise SearchError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")
    if not (math.isfinite(noise_scale) and noise_scale > 0):
        raise SearchError("SMC needs a stochastic sampler: noise_scale must be > 0")
    if not (math.isfinite(strength) and strength >= 0):
        raise SearchError(f"strength must be a finite number >= 0; got {strength}")
    g, n = _layout(run.budget.remaining, n_return, steps, groups, n_particles, "smc-guided")
    run.budget.require(g * n * int(steps), f"smc-guided with {g} x {n} particles")
    pot = ClearancePotential(field, g * n, data_scale, temper)
    proposal_field = field if max_force is None else CappedField(field, max_force)
    w = ParticleWeights(g, n)
    x = draw_noise(g * n, shape, generator, dtype, device)
    x, ess, resampled = run_particles(
        run.velocity,
        x,
        time_grid(steps),
        pot,
        w,
        noise_scale=noise_scale,
        generator=generator,
        threshold=threshold,
        scheme=scheme,
        field=proposal_field,
        strength=strength,
        weight=weight,
    )
    scores = verifier.score(x)
    idx, dead = select(x, w, scores, int(n_return) // g, select_by, generator)
    records = {
        "n_particles": n,
        "groups": g,
        "ess": ess,
        "resampled": resampled,
        "resamplings": w.resamplings,
        "log_z": w.final_log_z(),
        "final_logw": w.logw,
        "particles": x,
        "weights": w.normalised(),
        "dead_groups": dead,
        "free_fraction": float(torch.isfinite(w.logw).double().mean()),
        "unique": int(torch.unique(idx).numel()),
    }
    return run.result(x[idx], scores[idx], records)
