r"""Search over paths (Ma et al. 2025, sec. 3.2), on our flow's own noising kernel.

For each of the ``n_return`` searches:

1. N noises are solved with the ODE from t = 1 down to the level ``s = start``;
2. repeat until the level is 0: every survivor spawns M copies, each forward-noised from its
   level ``t`` to ``t' = min(t + forward, 1)`` with the path's own kernel (below); each copy is
   solved back with the ODE to ``t'' = max(t + forward - backward, 0)``; its clean estimate
   ``x0_hat = x - t'' v(x, t'')`` is scored (one NFE per copy, none at t'' = 0); the N best of the
   N x M copies survive at level t'';
3. the best of the final N (clean samples at t = 0) is returned.

**Forward kernel.** Under ``x_t = (1-t) x0 + t eps`` the noised state at ``t' > t`` given ``x_t``
must have the conditional law ``x_{t'} | x0 ~ N((1-t') x0, t'^2 I)``. With
``x_{t'} = a x_t + b z``, z ~ N(0, I): matching the mean gives ``a (1-t) = 1-t'`` and matching the
variance ``a^2 t^2 + b^2 = t'^2``, so

    x_{t'} = (1-t')/(1-t) x_t + sqrt(t'^2 - ((1-t')/(1-t))^2 t^2) z,

real exactly when t' >= t. Then ``x_{t'}`` has the exact marginal p_{t'} whenever ``x_t ~ p_t``
(tested on the exact mixture). At t' = 1 it is pure noise.

**Settings.** The paper's ``s = 0.11, df = 0.78, db = 0.81`` are noise levels sigma of a
variance-exploding parametrisation ``x = x0 + sigma eps``; on our path ``sigma = t/(1-t)``, i.e.
``t = sigma/(1+sigma)``: 0.11 -> t = 0.099, 0.11 + 0.78 = 0.89 -> t = 0.471, 0.89 - 0.81 = 0.08 ->
t = 0.074. Our defaults are the same shape in t units: ``start = 0.1``, ``forward = 0.4`` (re-noise
to t ~ 0.5, where the toy's modes start to merge), ``backward = 0.425`` (net progress 0.025 per
iteration: 4 iterations). ``M = n_copies = 2``.

**Three bugs of the public draft, avoided.** (1) It drops the conditioning: here the same
``velocity`` callable (which carries any conditioning) is used for every solve. (2) It
forward-noises without the schedule: here the kernel above. (3) It scores noisy latents: here the
verifier only ever sees ``x0_hat`` (or the final sample).

**Budget.** One start costs ``ceil((1-s) steps)`` NFE plus, per iteration,
``M (ceil((t'-t'') steps) + [t'' > 0])``; N is the largest number of starts the per-sample budget
pays (steps are counted per unit of time, so a partial solve costs its share of ``steps``).
"""

from __future__ import annotations

import torch

from guidance.sampling.steps import trajectory_nfe
from guidance.search.budget import BudgetExceeded
from guidance.search.common import (
    SearchError,
    SearchResult,
    begin,
    check_states,
    draw_noise,
    grid,
    ode,
    per_sample_budget,
    x0_hat,
)
from guidance.search.protocol import Algorithm

__all__ = ["forward_noise", "plan", "search"]


def forward_noise(
    x: torch.Tensor, t: float, t_next: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise states ``x`` at level ``t`` forward to level ``t_next >= t`` (exact path kernel)."""
    t, t_next = float(t), float(t_next)
    if not 0 <= t <= t_next <= 1 or t >= 1:
        raise SearchError(f"forward noising needs 0 <= t <= t_next <= 1, t < 1; got {t}, {t_next}")
    a = (1 - t_next) / (1 - t)
    b2 = max(t_next**2 - (a * t) ** 2, 0.0)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return a * x + b2**0.5 * z


def plan(steps: int, start: float, forward: float, backward: float, n_copies: int, nfe_step: int):
    """The levels and the NFE of one start: ``(iterations [(t, t', t'')], init_nfe, per_start)``."""
    iters, lvl = [], float(start)
    per = 0
    while lvl > 0:
        tf = min(lvl + forward, 1.0)
        tb = max(lvl + forward - backward, 0.0)
        n_seg = len(grid(tf, tb, steps)) - 1
        per += n_copies * (n_seg * nfe_step + (1 if tb > 0 else 0))
        iters.append((lvl, tf, tb))
        lvl = tb
    init = (len(grid(1.0, start, steps)) - 1) * nfe_step
    return iters, init, init + per


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    n_starts: int | None = None,
    n_copies: int = 2,
    start: float = 0.1,
    forward: float = 0.4,
    backward: float = 0.425,
    method: str = "euler",
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """Search over paths; see the module docstring.

    Records: ``n_starts`` (N), ``iterations`` ([(t, t', t'')]), ``nfe_per_start``,
    ``survivor_scores`` (one (n_return, N) tensor per iteration).
    """
    run, shape = begin("paths", velocity, shape, verifier, budget, n_return, steps)
    if not 0 < start < 1 or forward <= 0 or backward <= forward:
        raise SearchError(
            f"paths needs 0 < start < 1, forward > 0 and backward > forward (progress per "
            f"iteration); got start={start}, forward={forward}, backward={backward}"
        )
    if int(n_copies) < 1:
        raise SearchError(f"paths: empty candidate set (n_copies={n_copies})")
    if method not in ("euler", "heun"):
        raise SearchError(f"paths solves ODEs: method must be 'euler' or 'heun'; got {method}")
    nfe_step = trajectory_nfe(1, method)  # one ODE step
    iters, _init, per_start = plan(steps, start, forward, backward, int(n_copies), nfe_step)
    each = per_sample_budget(run.budget, n_return, trajectory_nfe(steps, method), "paths")
    n = each // per_start if n_starts is None else int(n_starts)
    if n_starts is None and n < 1:
        raise BudgetExceeded(
            f"paths: one start costs {per_start} NFE with these settings (steps={steps}, "
            f"start={start}, forward={forward}, backward={backward}, M={n_copies}) but each "
            f"returned sample has {each}; raise the budget to at least {per_start * n_return}"
        )
    if n < 1:
        raise SearchError(f"paths: empty candidate set (n_starts={n})")
    check_states("paths", n_return * n * int(n_copies), shape, dtype,
                 f"{n:,} starts x {n_copies} copies per returned sample")  # fmt: skip
    run.budget.require(n * per_start * n_return, f"paths with {n} starts per sample")
    g_n, m = int(n_return), int(n_copies)
    flat = torch.Size(shape)
    noise = draw_noise(g_n * n, shape, generator, dtype, device)
    x = ode(run.velocity, noise, grid(1.0, start, steps), method)
    x = x.reshape(g_n, n, *flat)
    survivor_scores = []
    x0 = s = None
    for lvl, tf, tb in iters:
        xr = x.repeat_interleave(m, dim=1).reshape(g_n * n * m, *flat)
        xb = ode(run.velocity, forward_noise(xr, lvl, tf, generator), grid(tf, tb, steps), method)
        c0 = x0_hat(run.velocity, xb, tb)
        cs = verifier.score(c0).reshape(g_n, n * m)
        keep = torch.argsort(cs, dim=1, descending=True, stable=True)[:, :n]
        rows = torch.arange(g_n)[:, None]
        x = xb.reshape(g_n, n * m, *flat)[rows, keep]
        x0 = c0.reshape(g_n, n * m, *flat)[rows, keep]
        s = cs[rows, keep]
        survivor_scores.append(s)
    if x0 is None:  # pragma: no cover - start > 0 always gives one iteration
        raise SearchError("paths: no iteration ran")
    rows = torch.arange(g_n)
    best = torch.argmax(s, dim=1)  # survivors are sorted: the first is the best
    records = {
        "n_starts": n,
        "iterations": iters,
        "nfe_per_start": per_start,
        "survivor_scores": survivor_scores,
    }
    return run.result(x0[rows, best], s[rows, best], records)


ALGORITHM = Algorithm(
    name="paths", run=search, searches_over="re-noised partial paths (ODE)", needs_field=False
)
