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

# several processes each, on ports picked at run time: one such test at a time (conftest.py)
pytestmark = pytest.mark.usefixtures("one_distributed_at_a_time")

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


def _topk_worker(rank, world, folder, k):
    from guidance.distributed.search import best_of_n_top_k

    problem = build_problem("toy", "oracle", dim=2)
    gen = torch.Generator().manual_seed(3)
    res = best_of_n_top_k(
        problem.velocity, problem.shape, problem.verifier, n_candidates=9, k=k, steps=6,
        generator=gen,
    )  # fmt: skip
    np.savez(
        f"{folder}/rank{rank}.npz", samples=res.samples.numpy(), scores=res.scores.numpy(),
        indices=res.records["indices"].numpy(), nfe=np.array(res.nfe),
        verifier_samples=np.array(res.verifier_samples),
    )  # fmt: skip


def test_best_of_n_keeps_the_global_top_k(tmp_path):
    from guidance.distributed.search import best_of_n_top_k
    from guidance.search import random_search

    spawn(_topk_worker, 2, str(tmp_path), 4)
    problem = build_problem("toy", "oracle", dim=2)
    one = best_of_n_top_k(
        problem.velocity, problem.shape, problem.verifier, n_candidates=9, k=4, steps=6,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    np.testing.assert_array_equal(r0["indices"], one.records["indices"].numpy())
    assert set(r0["indices"]) & set(range(5)) and set(r0["indices"]) & set(range(5, 9))
    np.testing.assert_allclose(r0["samples"], one.samples.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r0["scores"], one.scores.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(r0["samples"], r1["samples"])
    assert int(r0["nfe"]) == 9 * 6 == one.nfe and int(r0["verifier_samples"]) == 9
    scores = one.records["candidate_scores"]
    assert torch.equal(one.scores, torch.sort(scores, descending=True).values[:4])
    # k = 1 is the one-process best-of-N
    best = random_search.search(
        problem.velocity, problem.shape, problem.verifier, 9 * 6, n_return=1, steps=6,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert int(one.records["indices"][0]) == int(best.records["best_index"][0])
    torch.testing.assert_close(one.samples[:1], best.samples, rtol=1e-12, atol=1e-12)


def test_search_blocks_of_one_are_the_plain_run_and_any_split_is_the_same_union():
    from cspace.experiments.search import run_search, run_search_blocks

    problem = build_problem("toy", "oracle", dim=2)
    plain = run_search(problem, "smc", 6 * 4 * 8, 6, 4, 0)
    one = run_search_blocks(problem, "smc", 6 * 4 * 8, 6, 4, 0, blocks=1)
    assert {k: one[k] for k in plain if k != "seconds"} == {
        k: v for k, v in plain.items() if k != "seconds"
    }
    three = run_search_blocks(problem, "smc", 6 * 4 * 8, 6, 4, 0, blocks=3)
    assert three["nfe"] == plain["nfe"] and three["score"] != plain["score"]  # other seeds
    with pytest.raises(ValueError, match="blocks must be in"):
        run_search_blocks(problem, "smc", 6 * 4 * 8, 6, 4, 0, blocks=7)


@pytest.mark.slow  # several processes importing the models: 20-60 s on 2 busy cores
def test_cspace_search_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 cspace search --out DIR`` writes (rank 0, atomically) the
    samples and the report of the one-process run with the same blocks."""
    import json
    import os
    import subprocess
    import sys

    from tests.distributed import free_port

    common = ["search", "--algo", "best-of-n", "--budget", "480", "--samples", "8", "--steps", "6",
              "--seed", "5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           f"--master-port={free_port()}", "-m", "cspace.cli", *common, "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("nfe_per_sample") == 1  # rank 0 prints
    one = subprocess.run(
        [sys.executable, "-m", "cspace.cli", *common, "--blocks", "2", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads((out / "report.json").read_text()), json.loads(one.stdout)
    assert (a.pop("ranks"), b.pop("ranks")) == (2, 1)
    a.pop("seconds"), b.pop("seconds")
    assert len(a.pop("samples_sha256")) == 64
    assert a == b and a["nfe"] == 480
    # rank 0 wrote the samples and the report; no temporary file left
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "samples.safetensors"]


def test_sde_step_with_given_noise_is_the_drawn_step():
    from guidance.sampling import sde_step

    problem = build_problem("toy", "oracle", dim=2)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t, t1 = torch.full((5,), 0.5, dtype=torch.float64), torch.full((5,), 0.4, dtype=torch.float64)
    drawn = sde_step(problem.velocity, x, t, t1, generator=torch.Generator().manual_seed(1))
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    given = sde_step(problem.velocity, x, t, t1, noise=z)
    assert torch.equal(drawn.x_next, given.x_next)
    with pytest.raises(ValueError, match="noise must have the states' shape"):
        sde_step(problem.velocity, x, t, t1, noise=z[:4])


def _few_samples_worker(rank, world, folder):
    from cspace.experiments.search import run_search_blocks

    problem = build_problem("toy", "oracle", dim=2)
    try:
        run_search_blocks(problem, "best-of-n", 100, 1, 4, 0, blocks=world)
    except DistributedError as err:
        (__import__("pathlib").Path(folder) / f"rank{rank}.txt").write_text(str(err))


def test_more_ranks_than_samples_fails_on_every_rank(tmp_path):
    spawn(_few_samples_worker, 2, str(tmp_path))
    for r in (0, 1):
        assert "2 ranks but only 1 samples" in (tmp_path / f"rank{r}.txt").read_text()
