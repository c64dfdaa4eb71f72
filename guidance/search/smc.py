r"""Trajectory search by sequential Monte Carlo on the SDE (FK steering, Singhal et al. 2025).

Particles follow the marginal-preserving SDE of :func:`guidance.sample` (``method="sde"``), one
step at a time (``sample(..., times=[t_k, t_{k+1}])``); an ODE would not do: resampled copies of a
particle would stay identical. Write ``x_k`` for the state at grid time ``t_k`` (``t_0 = 1``,
``t_S = 0``) and ``r_k = lambda * verifier(x0_hat(x_k))`` for the tempered reward of its clean
estimate (the step from ``x_k`` evaluates the velocity at ``x_k``, which gives ``x0_hat(x_k)`` at
no extra NFE; ``x_S`` is its own clean sample).

**Potentials** (the FK paper's three; the incremental log-weight added at step k):

* ``diff``: ``r_k - r_{k-1}`` (telescopes: the total is ``r_S - r_0`` and ``r_0`` is the same for
  every particle, because ``x0_hat`` at t = 1 is the data mean; the particle system then targets
  ``p(x) exp(lambda verifier(x))`` at t = 0, exactly as the particles grow);
* ``max``: ``max_{j <= k} r_j``;
* ``sum``: ``sum_{j <= k} r_j``
  (``max`` and ``sum`` are heuristics of the paper: they target a path-dependent tilt).

**Weights are carried.** The log-weight of a particle accumulates the increments of every step
since the last resampling and is reset to 0 only when its group is resampled (the bug of the
public code, issue #12, is dropping them between resamplings: then the system no longer targets
anything). Per-particle potential state (``r_{k-1}``, running max, running sum) is gathered with
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

import torch

from guidance.sampler import sample, time_grid
from guidance.search.budget import BudgetExceeded
from guidance.search.common import SearchError, SearchResult, begin, draw_noise

__all__ = [
    "SCHEMES",
    "FKPotential",
    "ParticleWeights",
    "propagate",
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
        inc = inc.reshape(self.groups, self.n).to(self.logw.dtype)
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

    ``step(x0, t)`` returns the incremental log-weight of each particle (see the module doc).
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

    def step(self, x0: torch.Tensor, t: float) -> torch.Tensor:
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
        return self.step(x, 0.0)

    def gather(self, idx: torch.Tensor) -> None:
        self.prev, self.run_max, self.run_sum = self.prev[idx], self.run_max[idx], self.run_sum[idx]


def propagate(
    velocity,
    x: torch.Tensor,
    t: float,
    t_next: float,
    *,
    noise_scale: float,
    generator: torch.Generator | None,
    field=None,
    strength: float = 0.0,
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """One SDE step of :func:`guidance.sample` from t to t_next (guided in clean mode if a field
    and strength > 0 are given).

    Returns ``(x_next, x0_hat(x), log_ratio)`` where ``log_ratio`` (B,) is
    ``log N(x_next; mu_p, s^2) - log N(x_next; mu_q, s^2)``: the unguided transition over the guided
    proposal (zeros without guidance). With ``h = t - t_next``, ``s^2 = noise_scale t h`` and the
    guidance displacement ``d = mu_q - mu_p = h strength weight(t) F(x0_hat)``, it is
    ``-(2 (x_next - mu_q) . d + |d|^2) / (2 s^2)``.
    """
    seen = {}

    def keep(info: dict) -> None:
        seen["x0"] = info["x0_hat"]

    times = torch.tensor([float(t), float(t_next)], dtype=torch.float64)
    guided = field is not None and strength > 0
    out = sample(
        velocity,
        x,
        times=times,
        method="sde",
        noise_scale=noise_scale,
        field=field if guided else None,
        strength=strength if guided else 0.0,
        weight=weight,
        generator=generator,
        progress=False,
        callback=keep,
    )
    xn, x0 = out.samples, seen["x0"]
    b = x.shape[0]
    if not guided:
        return xn, x0, torch.zeros(b, dtype=torch.float64)
    h = float(t) - float(t_next)
    tt = torch.full((b,), float(t), dtype=x.dtype, device=x.device)
    lam = weight(tt) if weight is not None else torch.ones_like(tt)
    shape1 = (-1,) + (1,) * (x.ndim - 1)
    force = field.evaluate(x0).force
    scale = (strength * lam).reshape(shape1)
    v = (x - x0) / float(t)  # the unguided velocity: x0_hat = x - t v
    eps = x + (1 - float(t)) * v
    mu_q = x - h * (v - scale * force) - h * (noise_scale / 2) * eps
    d = (h * scale * force).reshape(b, -1).double()
    r = (xn - mu_q).reshape(b, -1).double()
    var = noise_scale * float(t) * h
    log_ratio = -(2 * (r * d).sum(1) + (d * d).sum(1)) / (2 * var)
    return xn, x0, log_ratio


def run_particles(
    velocity,
    x: torch.Tensor,
    times: torch.Tensor,
    potential,
    weights: ParticleWeights,
    *,
    noise_scale: float,
    generator: torch.Generator | None,
    threshold: float,
    scheme: str,
    field=None,
    strength: float = 0.0,
    weight=None,
):
    """The SMC loop: propagate, weigh (potential increments + proposal correction), resample.

    ``potential`` has ``step(x0_hat, t) -> inc``, ``final(x) -> inc`` and ``gather(idx)``.
    Returns the final particles and the per-step ESS (S, G) and resampling flags (S, G).
    """
    n_steps = times.numel() - 1
    ess_hist, resampled = [], []
    for k in range(n_steps):
        t, tn = float(times[k]), float(times[k + 1])
        x, x0, log_ratio = propagate(
            velocity,
            x,
            t,
            tn,
            noise_scale=noise_scale,
            generator=generator,
            field=field,
            strength=strength,
            weight=weight,
        )
        weights.add(potential.step(x0, t) + log_ratio)
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


def _layout(budget_left: int, n_return: int, steps: int, groups, n_particles, algo: str):
    g = int(n_return) if groups is None else int(groups)
    if g < 1 or int(n_return) % g:
        raise SearchError(f"{algo}: groups ({g}) must divide n_return ({n_return})")
    if budget_left < int(n_return) * int(steps):
        raise BudgetExceeded(
            f"{algo}: a budget of {budget_left} NFE is less than one sample per returned sample "
            f"({n_return} x {steps} steps = {int(n_return) * int(steps)} NFE); raise the budget"
        )
    n = budget_left // (g * int(steps)) if n_particles is None else int(n_particles)
    if n_particles is None and n < 1:
        raise BudgetExceeded(
            f"{algo}: {g} particle systems of {steps} steps need at least {g * int(steps)} NFE "
            f"(one particle each); the budget has {budget_left}"
        )
    if n < 1:
        raise SearchError(f"{algo}: empty candidate set (n_particles={n})")
    return g, n


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

    Records: ``n_particles``, ``groups``, ``ess`` (S, G), ``resampled`` (S, G), ``resamplings``,
    ``log_z`` (G,), ``final_logw`` (G, N), ``particles`` (G*N, ...) and their normalised
    ``weights`` (G, N) at t = 0, ``dead_groups`` (G,).
    """
    run, shape = begin("smc", velocity, shape, verifier, budget, n_return, steps)
    if scheme not in SCHEMES:
        raise SearchError(f"unknown resampling scheme {scheme!r}; choose one of {SCHEMES}")
    if not 0 <= threshold <= 1:
        raise SearchError(f"threshold must be in [0, 1]; got {threshold}")
    if not (math.isfinite(noise_scale) and noise_scale > 0):
        raise SearchError("SMC needs a stochastic sampler: noise_scale must be > 0")
    g, n = _layout(run.budget.remaining, n_return, steps, groups, n_particles, "smc")
    run.budget.require(g * n * int(steps), f"smc with {g} x {n} particles")
    pot = FKPotential(verifier, potential, lam, g * n)
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
    )
    final_scores = pot.last_scores
    idx, dead = select(x, w, final_scores, int(n_return) // g, select_by, generator)
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
    }
    return run.result(x[idx], final_scores[idx], records)
