r"""Guided SMC: exact sampling of the data distribution restricted to the outside of obstacles.

Target: ``pi(x) = p0(x) 1[x free] / Z`` ("free": outside every hard obstacle radius). The particle
system below targets it exactly in the limit of many particles (up to the SDE's time
discretisation), and uses the repulsive field only to *propose* better moves.

**Reference process.** The unguided Euler-Maruyama chain of the marginal-preserving SDE
(:func:`guidance.sampling.sde_step`): from ``x_k`` at ``t_k`` to ``t_{k+1} = t_k - h``,

    p(x_{k+1} | x_k) = N(mu_p, s^2 I),  mu_p = x_k - h v - h (g^2 / 2t) eps_hat,  s^2 = g^2 h,

with ``g^2 = noise_scale t``. Its law of ``x_S`` (t = 0) is p0 up to the discretisation error.

**Proposal.** The same SDE step on the :class:`~guidance.Guided` velocity in clean mode: the
velocity becomes ``v - lambda(t) F(x0_hat)`` (``lambda(t) = strength x weight(t)``), the noise and
the score term (the unguided ``eps_hat``) are unchanged, so ``q(x_{k+1} | x_k) = N(mu_q, s^2 I)``
with ``mu_q = mu_p + d``, ``d = h delta``, ``delta = lambda(t) F(x0_hat(x_k))``: same covariance,
shifted mean. The density ratio of one step is

    log p/q (x_{k+1}) = [|x_{k+1} - mu_q|^2 - |x_{k+1} - mu_p|^2] / (2 s^2)
                      = -(2 (x_{k+1} - mu_q) . d + |d|^2) / (2 s^2),

computed from the step's own quantities (:func:`guidance.search.smc.propagate`: ``mu_q`` its
mean, ``s^2`` its noise variance, ``delta`` its prediction's displacement); the field is
evaluated once per step, at ``x0_hat``, and that evaluation also gives the potential's clearance.
Its expectation under q is ``-|d|^2 / 2s^2 = -h lambda(t)^2 |F|^2 / (2 noise_scale t)``
(Girsanov): the default ``weight(t) = sqrt(t)`` keeps this bounded as t -> 0, where ``s^2``
vanishes (``h lambda(t)^2 / t = h strength^2``), and the proposal's force is capped at
``max_force`` (default 1) so that ``|F|^2`` is bounded too.

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

import math

import torch

from guidance.checks import check_number
from guidance.fields import CombinedField
from guidance.sampling import Guided, Prediction
from guidance.search.common import SearchError, SearchResult, begin
from guidance.search.protocol import Algorithm
from guidance.search.smc import check_particle_options, particle_result, particle_run

__all__ = ["ClearancePotential", "posterior_std", "search"]


def posterior_std(t: float, data_scale: float) -> float:
    """Std of x0 given x_t for data locally N(m, a^2): ``a t / sqrt(t^2 + (1-t)^2 a^2)``."""
    a = float(data_scale)
    return a * t / math.sqrt(t**2 + (1 - t) ** 2 * a**2)


class ClearancePotential:
    """``log G_k = log Phi(c / sigma(t))`` on ``x0_hat``, the hard indicator at the end; the
    increments telescope (per-particle previous value gathered on resampling).

    The clearance at ``x0_hat`` is read from the step's prediction when the guided velocity
    evaluated this very field there (no second evaluation), else computed."""

    def __init__(self, field, m: int, data_scale: float = 1.0, temper: float = 1.0) -> None:
        if not (data_scale > 0 and temper > 0):
            raise SearchError("data_scale and temper must be > 0")
        self.field = field
        self.data_scale, self.temper = float(data_scale), float(temper)
        self.prev = torch.zeros(m, dtype=torch.float64)

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.evaluate(x, need_force=False).clearance.to(torch.float64).reshape(-1)

    def clearance_of(self, prediction: Prediction) -> torch.Tensor:
        """The clearance of ``prediction.x0_hat`` (B,) float64, reusing its field output."""
        p = prediction
        if p.field is not None and p.field_mode == "clean" and p.field_source is self.field:
            return p.field.clearance.to(torch.float64).reshape(-1)
        return self.clearance(p.x0_hat)

    def log_g(self, clearance: torch.Tensor, t: float) -> torch.Tensor:
        """``log Phi(c / sigma(t))`` for clearances ``c`` (B,)."""
        sigma = self.temper * posterior_std(t, self.data_scale)
        return torch.special.log_ndtr(clearance / sigma)

    def step(self, prediction: Prediction, t: float) -> torch.Tensor:
        lg = self.log_g(self.clearance_of(prediction), t)
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
            (default ``weight(t) = sqrt(t)``); ``strength = 0`` proposes with the unguided SDE.
        max_force: cap on the proposal's force norm (None: the field's own force).
        data_scale, temper: the potentials' ``sigma(t)`` (see the module docstring).
        n_particles: particles per group (default: as many as the budget pays).
        groups: independent systems (default 1); each returns ``n_return / groups`` samples.
        select_by: ``"sample"`` (weighted draw, default) or ``"best"`` (verifier score).
        threshold, scheme, noise_scale: as :func:`guidance.search.smc.search`.

    The verifier scores the final particles (one call) for the returned ``scores``.
    Records: as :func:`guidance.search.smc.search`, plus ``free_fraction`` (the share of final
    particles outside the obstacles) and ``unique`` (distinct particles returned).
    """
    run, shape = begin("smc-guided", velocity, shape, verifier, budget, n_return, steps)
    if field is None or not hasattr(field, "evaluate"):
        raise SearchError("smc-guided needs the obstacles' field (with evaluate())")
    check_particle_options("smc-guided", scheme, threshold, noise_scale)
    strength = check_number(strength, "strength", error=SearchError)
    proposal_field = field if max_force is None else CombinedField(field, max_force=max_force)
    proposal = Guided(run.velocity, proposal_field, strength=strength, weight=weight)
    # the capped field has the field's clearance: the potential reads it from the proposal's
    # evaluation at x0_hat (one field evaluation per step)
    pr = particle_run(
        run, shape, proposal,
        lambda m: ClearancePotential(proposal_field, m, data_scale, temper),
        n_return=n_return, steps=steps, groups=groups, n_particles=n_particles,
        generator=generator, threshold=threshold, scheme=scheme, noise_scale=noise_scale,
        dtype=dtype, device=device,
    )  # fmt: skip
    scores = verifier.score(pr.x)

    def extra(p, idx):
        return {
            "free_fraction": float(torch.isfinite(p.weights.logw).double().mean()),
            "unique": int(torch.unique(idx).numel()),
        }

    return particle_result(run, pr, scores, n_return, select_by, generator, extra)


ALGORITHM = Algorithm(
    name="smc-guided",
    run=search,
    searches_over="SDE trajectories, guided proposal (exact restriction)",
    needs_field=True,
)
