"""Distributed SMC and data-parallel search on 2 gloo processes against one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cspace.experiments.search import build_problem
from guidance.distributed import DistributedError
from guidance.distributed import smc as dsmc
from guidance.search import smc
from tests.distributed import spawn

SMC = dict(n_return=2, steps=8, n_particles=12, lam=3.0, threshold=0.9)


def _smc_outputs(res) -> dict:
    r = res.records
    return dict(
        samples=res.samples.numpy(),
        scores=res.scores.numpy(),
        nfe=np.array(res.nfe),
        verifier_samples=np.array(res.verifier_samples),
        ess=r["ess"].numpy(),
        resampled=r["resampled"].numpy(),
        log_z=r["log_z"].numpy(),
        particles=r["particles"].numpy(),
        weights=r["weights"].numpy(),
    )


def _smc_worker(rank, world, folder, seed, kw):
    problem = build_problem("toy", "oracle", dim=2)
    gen = torch.Generator().manual_seed(seed)
    res = dsmc.search(
        problem.velocity, problem.shape, problem.verifier, 10_000, generator=gen, **kw
    )
    np.savez(f"{folder}/rank{rank}.npz", **_smc_outputs(res))


@pytest.mark.parametrize("kw", [SMC, {**SMC, "scheme": "multinomial", "potential": "max"}])
def test_distributed_smc_equals_one_process(tmp_path, kw):
    spawn(_smc_worker, 2, str(tmp_path), 7, kw)
    problem = build_problem("toy", "oracle", dim=2)
    gen = torch.Generator().manual_seed(7)
    one = _smc_outputs(
        smc.search(problem.velocity, problem.shape, problem.verifier, 10_000, generator=gen, **kw)
    )
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert one["resampled"].sum() >= 2  # the particles moved between ranks
    assert int(one["nfe"]) == 2 * 12 * 8 == int(r0["nfe"])  # NFE summed over the ranks
    for k, want in one.items():
        np.testing.assert_array_equal(r0[k], r1[k])  # the same result on every rank
        np.testing.assert_allclose(r0[k], want, rtol=1e-12, atol=1e-12)


def _seed_worker(rank, world, folder):
    problem = build_problem("toy", "oracle", dim=2)
    gen = torch.Generator().manual_seed(rank)  # a different seed on each rank: refused
    try:
        dsmc.search(problem.velocity, problem.shape, problem.verifier, 10_000, generator=gen, **SMC)
    except DistributedError as err:
        (__import__("pathlib").Path(folder) / f"rank{rank}.txt").write_text(str(err))


def _too_many_worker(rank, world, folder):
    problem = build_problem("toy", "oracle", dim=2)
    gen = torch.Generator().manual_seed(0)
    try:
        dsmc.search(
            problem.velocity, problem.shape, problem.verifier, 10_000, generator=gen,
            n_return=1, steps=4, n_particles=1,
        )  # fmt: skip
    except DistributedError as err:
        (__import__("pathlib").Path(folder) / f"rank{rank}.txt").write_text(str(err))


def test_distributed_smc_refuses_different_seeds_and_too_many_ranks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    spawn(_seed_worker, 2, str(tmp_path / "a"))
    spawn(_too_many_worker, 2, str(tmp_path / "b"))
    for r in (0, 1):
        msg = (tmp_path / "a" / f"rank{r}.txt").read_text()
        assert "disagree on SMC settings and generator seed" in msg
        msg = (tmp_path / "b" / f"rank{r}.txt").read_text()
        assert "2 ranks but only 1 particles" in msg
