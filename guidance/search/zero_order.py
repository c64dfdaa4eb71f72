r"""Zero-order search over initial noises (Ma et al. 2025, sec. 3.2).

For each of the ``n_return`` searches, round after round:

1. a pivot noise ``p`` (a fresh Gaussian draw at the start and after every rejected round);
2. K neighbours on the pivot's norm sphere at cosine ``c`` to it:
   ``y = |p| (c u + sqrt(1 - c^2) w)``, ``u = p / |p|``, ``w`` a random unit vector orthogonal to
   ``u`` (so ``|y| = |p|`` and ``cos(y, p) = c`` exactly);
3. each neighbour (and a new pivot) is solved to t = 0 with the ODE and scored; the pivot and its
   neighbours are scored in the same verifier call;
4. if the best neighbour scores strictly higher than the pivot, it becomes the pivot (a move);
   otherwise the round is rejected and a fresh pivot is drawn.

The search returns the best clean sample it has seen. A round costs ``K x steps`` NFE (plus
``steps`` for a fresh pivot); when the budget left cannot pay K neighbours, the last round uses
fewer (with no neighbour affordable, a fresh pivot alone is one more random draw).
Defaults c = 0.95, K = 4 are those of the public code.
"""

from __future__ import annotations

import math

import torch

from guidance.sampling import time_grid
from guidance.sampling.steps import trajectory_nfe
from guidance.search.common import SearchError, SearchResult, begin, draw_noise, ode
from guidance.search.common import per_sample_budget as _per_sample
from guidance.search.protocol import Algorithm

__all__ = ["neighbours", "search"]


def neighbours(
    pivot: torch.Tensor, k: int, cosine: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``k`` points on the sphere of radius ``|p|`` at cosine ``cosine`` to each pivot.

    ``pivot`` (A, D) -> (A, k, D).
    """
    if not 0 < cosine < 1:
        raise SearchError(f"cosine must be in (0, 1); got {cosine}")
    if pivot.shape[1] < 2:
        raise SearchError("zero-order search needs noises of dimension >= 2 (a sphere to move on)")
    norm = torch.linalg.vector_norm(pivot, dim=1, keepdim=True)  # (A, 1)
    u = pivot / norm
    g = torch.randn(
        (pivot.shape[0], int(k), pivot.shape[1]),
        generator=generator,
        dtype=pivot.dtype,
        device=pivot.device,
    )
    w = g - (g * u[:, None]).sum(-1, keepdim=True) * u[:, None]
    w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    return norm[:, None] * (cosine * u[:, None] + math.sqrt(1 - cosine**2) * w)


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    n_neighbours: int = 4,
    cosine: float = 0.95,
    method: str = "euler",
    dtype: torch.dtype = torch.float64,
    device=None,
    record: bool = False,
) -> SearchResult:
    """Zero-order search; see the module docstring.

    Records: ``rounds`` (number of rounds), ``moves`` (n_return,), ``rejections`` (n_return,),
    ``best_noise`` (n_return, ...); with ``record=True`` also ``history``: one dict per round with
    ``active`` (indices of the searches in the round), ``pivot`` (A, D), ``pivot_score`` (A,),
    ``neighbours`` (A, K, D), ``n_neighbours`` (A,), ``neighbour_scores`` (A, K; -inf where
    unused), ``moved`` (A,), ``next_pivot`` (A, D).
    """
    run, shape = begin("zero-order", velocity, shape, verifier, budget, n_return, steps)
    if int(n_neighbours) < 1:
        raise SearchError(f"zero-order search: empty candidate set (n_neighbours={n_neighbours})")
    if not 0 < cosine < 1:
        raise SearchError(f"cosine must be in (0, 1); got {cosine}")
    if method not in ("euler", "heun"):
        raise SearchError(
            f"zero-order solves an ODE: method must be 'euler' or 'heun'; got {method}"
        )
    cost = trajectory_nfe(steps, method)
    each = _per_sample(run.budget, n_return, cost, "zero-order")
    g_n, kmax = int(n_return), int(n_neighbours)
    times = time_grid(steps)
    dim = math.prod(shape)

    pivots = draw_noise(g_n, (dim,), generator, dtype, device)
    pivot_x0 = torch.zeros_like(pivots)
    needs = torch.ones(g_n, dtype=torch.bool)
    spent = torch.zeros(g_n, dtype=torch.long)
    best_x0 = torch.zeros_like(pivots)
    best_noise = torch.zeros_like(pivots)
    best_s = torch.full((g_n,), -math.inf, dtype=torch.float64)
    moves = torch.zeros(g_n, dtype=torch.long)
    rejections = torch.zeros(g_n, dtype=torch.long)
    history = []
    rounds = 0
    while True:
        afford = (each - spent) // cost
        k = torch.clamp(torch.minimum(afford - needs.long(), torch.full_like(afford, kmax)), min=0)
        active = (afford >= 1) & (needs | (k >= 1))
        if not bool(active.any()):
            break
        act = torch.nonzero(active).squeeze(1)
        ka = k[act]
        nb = neighbours(pivots[act], kmax, cosine, generator)  # (A, K, D)
        mask = torch.arange(kmax)[None] < ka[:, None]
        fresh = act[needs[act]]
        x = torch.cat([pivots[fresh], nb[mask]])
        x0 = ode(run.velocity, x.reshape(-1, *shape), times, method).reshape(x.shape[0], dim)
        spent[act] += (ka + needs[act].long()) * cost
        pivot_x0[fresh] = x0[: fresh.numel()]
        nb_x0 = x0[fresh.numel() :]
        s = verifier.score(torch.cat([pivot_x0[act], nb_x0]).reshape(-1, *shape))
        a_n = act.numel()
        piv_s = s[:a_n]
        nb_s = torch.full((a_n, kmax), -math.inf, dtype=torch.float64)
        nb_s[mask] = s[a_n:]
        top_s, top_k = nb_s.max(dim=1)
        has_nb = ka >= 1
        moved = has_nb & (top_s > piv_s)
        offs = torch.cumsum(ka, 0) - ka
        # best seen so far (strict improvement keeps the earlier one among ties)
        for cand_s, cand_x0, cand_noise, ok in (
            (piv_s, pivot_x0[act], pivots[act], torch.ones_like(has_nb)),
            (
                top_s,
                _rows(nb_x0, offs + top_k, pivot_x0[act]),
                nb[torch.arange(a_n), top_k],
                has_nb,
            ),
        ):
            better = ok & (cand_s > best_s[act])
            idx = act[better]
            best_s[idx] = cand_s[better]
            best_x0[idx] = cand_x0[better]
            best_noise[idx] = cand_noise[better]
        # the next pivot: the best neighbour after a move, a fresh draw after a rejection
        pivot_before = pivots[act].clone()
        next_pivot = pivot_before.clone()
        mv = torch.nonzero(moved).squeeze(1)
        next_pivot[mv] = nb[mv, top_k[mv]]
        pivot_x0[act[mv]] = nb_x0[offs[mv] + top_k[mv]]
        rej = has_nb & ~moved
        if bool(rej.any()):
            next_pivot[rej] = draw_noise(int(rej.sum()), (dim,), generator, dtype, device)
        needs[act] = rej
        pivots[act] = next_pivot
        moves[act] += moved.long()
        rejections[act] += rej.long()
        rounds += 1
        if record:
            history.append(
                {
                    "active": act,
                    "pivot": pivot_before,
                    "pivot_score": piv_s,
                    "neighbours": nb,
                    "n_neighbours": ka,
                    "neighbour_scores": nb_s,
                    "moved": moved,
                    "next_pivot": next_pivot,
                }
            )
    records = {
        "rounds": rounds,
        "moves": moves,
        "rejections": rejections,
        "best_noise": best_noise.reshape(g_n, *shape),
    }
    if record:
        records["history"] = history
    return run.result(best_x0.reshape(g_n, *shape), best_s, records)


def _rows(x: torch.Tensor, idx: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` where valid, rows of ``fallback`` where ``idx`` is out of range (no neighbour)."""
    ok = idx < x.shape[0]
    out = fallback.clone()
    out[ok] = x[idx[ok]]
    return out


ALGORITHM = Algorithm(
    name="zero-order",
    run=search,
    searches_over="initial noises (ODE), local moves",
    needs_field=False,
)
