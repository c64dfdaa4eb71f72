r"""Data-parallel search over the ranks of a process group.

**Best-of-N with a global top-k** (:func:`best_of_n_top_k`): the N candidate noises of one search
are drawn whole on every rank from the same generator (so candidate i is the same noise
whatever the number of ranks), rank r solves the ODE for its contiguous block of them and scores
them, keeps its own best k, and the ranks' ``(score, candidate index, sample)`` are all-gathered;
every rank then keeps the global top k, ordered by score (higher first) and, among equal
scores, by candidate index. So the result is the one-process result (tested with 2 gloo
processes); the NFE is summed over the ranks.

**Blocks of samples** (:func:`block_seed`, :func:`split_blocks`): a run of n samples (or n
independent searches) split into K contiguous blocks ``numpy.array_split``-style; block k is
an independent run of its ``n_k`` samples with its own generator, seeded by the rule

    block_seed(seed, 0) = seed,
    block_seed(seed, k) = int(SHA-256("cspace-block:{seed}:{k}")[:8]) mod 2^63   (k >= 1),

and ``budget_k = budget x n_k // n`` NFE. The ranks take the blocks in contiguous runs
(``split_blocks``), so the union of the blocks, in block order, does not depend on the number of
ranks: a run on W ranks with K blocks equals one process running the same K blocks one after
the other (and K = 1 is the plain one-process run, bit for bit).
"""

from __future__ import annotations

import torch

from guidance.distributed.comm import all_gather_cat, all_reduce, check_same, check_world, current
from guidance.distributed.smc import generator_digest
from guidance.sampling import time_grid
from guidance.sampling.steps import trajectory_nfe
from guidance.search.budget import Budget
from guidance.search.common import SearchError, SearchResult, begin, check_states, draw_noise, ode
from guidance.seeding import derived_seed

__all__ = ["best_of_n_top_k", "block_seed", "split_blocks"]


def block_seed(seed: int, k: int) -> int:
    """The seed of block ``k`` of a run seeded ``seed`` (module docstring): ``seed`` itself for
    block 0, :func:`guidance.seeding.derived_seed` ``(seed, "block", k)`` for the others (no two
    blocks of nearby seeds share a stream, as ``seed + k`` would)."""
    if int(k) == 0:
        return int(seed)
    return derived_seed(seed, "block", int(k))


def split_blocks(n: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous ``[start, stop)`` ranges of ``n`` items, the first ``n % blocks``
    one longer; raises ``ValueError`` unless ``1 <= blocks <= n``."""
    n, blocks = int(n), int(blocks)
    if not 1 <= blocks <= n:
        raise ValueError(f"blocks must be in [1, n={n}] so that no block is empty; got {blocks}")
    q, r = divmod(n, blocks)
    out, start = [], 0
    for k in range(blocks):
        stop = start + q + (1 if k < r else 0)
        out.append((start, stop))
        start = stop
    return out


def best_of_n_top_k(
    velocity,
    shape,
    verifier,
    *,
    n_candidates: int,
    k: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    method: str = "euler",
    group=None,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """The best ``k`` of ``n_candidates`` ODE samples by verifier score, the candidates split
    over the ranks (module docstring).

    Returns ``samples`` (k, ...) and ``scores`` (k,) best first; records ``indices`` (k,) of the
    chosen candidates, ``candidate_scores`` (N,) of every candidate, ``n_candidates``. ``nfe``
    is the whole run's (``N x steps``, x2 for Heun). ``generator`` must be seeded the same on
    every rank (checked at start with the settings).
    """
    g = current(group)
    n, k = int(n_candidates), int(k)
    if not 1 <= k <= n:
        raise SearchError(f"best-of-n top-k: need 1 <= k <= n_candidates={n}; got k={k}")
    if method not in ("euler", "heun"):
        raise SearchError(
            f"best-of-n solves an ODE: method must be 'euler' or 'heun'; got {method}"
        )
    shape_t = tuple(int(s) for s in (shape if hasattr(shape, "__iter__") else (shape,)))
    settings = dict(
        algo="best-of-n-top-k", shape=shape_t, n=n, k=k, steps=steps, method=method,
        dtype=str(dtype), generator=generator_digest(generator),
    )  # fmt: skip
    check_same(settings, "best-of-N settings and generator seed", g)
    check_world(n, "candidates", g, "use fewer processes or more candidates")
    cost = trajectory_nfe(steps, method)
    run, shape = begin("best-of-n", velocity, shape, verifier, Budget(n * cost), 1, steps)
    lo, hi = g.block(n)
    check_states("best-of-n", hi - lo, shape, dtype, f"{hi - lo:,} candidates on this rank")
    noise = draw_noise(n, shape, generator, dtype, device)[lo:hi]
    x0 = ode(run.velocity, noise, time_grid(steps), method)
    s = verifier.score(x0)
    idx = torch.arange(lo, hi)
    mine = _order(s, idx)[: min(k, hi - lo)]
    top_s = all_gather_cat(s[mine], g, "gathering the candidates' scores")
    top_i = all_gather_cat(idx[mine], g, "gathering the candidates' indices")
    top_x = all_gather_cat(x0[mine], g, "gathering the best candidates")
    best = _order(top_s, top_i)[:k]
    every = all_gather_cat(s, g, "gathering every candidate's score")
    local_nfe = torch.tensor([run.budget.spent], dtype=torch.long)
    run.budget.spent = int(all_reduce(local_nfe, "sum", g)[0])
    mine_v = torch.tensor([verifier.samples - run.start_samples], dtype=torch.long)
    run.start_samples = verifier.samples - int(all_reduce(mine_v, "sum", g)[0])
    records = {"indices": top_i[best], "candidate_scores": every, "n_candidates": n}
    return run.result(top_x[best], top_s[best], records)


def _order(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions sorted by score, higher first, then by candidate index (ties)."""
    by_index = torch.argsort(index, stable=True)
    by_score = torch.argsort(scores[by_index], descending=True, stable=True)
    return by_index[by_score]
