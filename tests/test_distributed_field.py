"""The sharded field on 2 gloo processes against the one-process field (float64, 1e-12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import RepulsiveField
from guidance.distributed import DistributedError, ShardedRepulsiveField
from obstacles import ObstacleSet
from tests.distributed import spawn

# several processes each, on ports picked at run time: one such test at a time (conftest.py)
pytestmark = pytest.mark.usefixtures("one_distributed_at_a_time")

KEYS = ("potential", "force", "nearest", "clearance", "active", "near_d", "near_id")


def problem(n: int = 301, d: int = 7, seed: int = 0):
    """Obstacles in 20 blobs and states near them: every state has obstacles in range."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(20, d)) * 4
    emb = centres[g.integers(0, 20, n)] + 0.3 * g.normal(size=(n, d))
    emb[5] = emb[4]  # a duplicated obstacle: ties in the nearest id
    obs = ObstacleSet.from_embeddings(
        emb, q_star=g.uniform(0.5, 1.5, n), eta=g.uniform(0.2, 2, n), radius=0.1
    )
    x = torch.from_numpy(emb[g.integers(0, n, 24)] + 0.4 * g.normal(size=(24, d)))
    x[0] = torch.from_numpy(emb[4].astype(np.float64))  # exactly on the duplicated obstacle
    return obs, x


def _outputs(field, x, t=None) -> dict:
    out = field.evaluate(x, t)
    d, i = field.nearest_obstacle(x)
    return dict(
        potential=out.potential.numpy(),
        force=out.force.numpy(),
        nearest=out.nearest.numpy(),
        clearance=out.clearance.numpy(),
        active=out.active.numpy(),
        near_d=d.numpy(),
        near_id=i.numpy(),
    )


def _field_worker(rank, world, folder, kw, noisy):
    obs, x = problem()
    field = ShardedRepulsiveField(obs, **kw)
    assert len(field.obstacles) < len(obs)  # a shard, not the whole set
    t = torch.linspace(0, 0.02, x.shape[0], dtype=torch.float64) if noisy else None
    np.savez(f"{folder}/rank{rank}.npz", **_outputs(field, x, t))


@pytest.mark.parametrize(
    "kw,noisy",
    [
        (dict(backend="torch"), False),
        (dict(backend="torch"), True),
        (dict(backend="torch", prune=True), False),
        (dict(backend="torch", max_force=3.0, max_potential=2.0, chunk_elements=6720), False),
        (dict(backend="cpu"), False),
        (dict(backend="cpu", prune=True), False),
    ],
    ids=["reference", "noisy", "pruned", "caps-chunks", "cpu-path", "cpu-path-pruned"],
)
def test_sharded_field_equals_one_process(tmp_path, kw, noisy):
    spawn(_field_worker, 2, str(tmp_path), kw, noisy)
    obs, x = problem()
    t = torch.linspace(0, 0.02, x.shape[0], dtype=torch.float64) if noisy else None
    one = RepulsiveField(obs, **kw)
    out = one.evaluate(x, t)
    d, i = ShardedRepulsiveField(obs, **kw).nearest_obstacle(x)  # one process: the whole set
    ref = dict(
        potential=out.potential, force=out.force, nearest=out.nearest,
        clearance=out.clearance, active=out.active, near_d=d, near_id=i,
    )  # fmt: skip
    assert float((out.active > 0).double().mean()) > 0.5  # obstacles in range for most states
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    for k in KEYS:
        np.testing.assert_array_equal(r0[k], r1[k])  # every rank holds the same result
        want = ref[k].numpy()
        if k in ("nearest", "clearance") and kw.get("prune"):
            continue  # lower bounds when pruned, as for one process
        if k in ("active", "near_id"):
            np.testing.assert_array_equal(r0[k], want)
        else:
            np.testing.assert_allclose(r0[k], want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert r0["near_id"][0] == 4  # the smallest id of the duplicated pair, across shards


def _kernel_worker(rank, world, folder):
    obs, x = problem(n=64, d=13)
    field = ShardedRepulsiveField(obs, backend="triton", precision="ieee")
    out = field.evaluate(x[1:].float())  # row 0 sits on an obstacle only in float32
    np.savez(f"{folder}/rank{rank}.npz", potential=out.potential.numpy(), force=out.force.numpy())


def test_sharded_field_runs_the_kernel_per_shard(tmp_path):
    pytest.importorskip("triton")
    spawn(_kernel_worker, 2, str(tmp_path), env={"TRITON_INTERPRET": "1"})
    obs, x = problem(n=64, d=13)
    ref = RepulsiveField(obs, backend="torch").evaluate(x[1:])
    r0 = np.load(tmp_path / "rank0.npz")
    np.testing.assert_allclose(r0["potential"], ref.potential.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        r0["force"], ref.force.numpy(), rtol=1e-5, atol=1e-5 * float(ref.force.abs().max())
    )


def _mismatch_worker(rank, world, folder):
    obs, _ = problem()
    try:
        ShardedRepulsiveField(obs, backend="torch", min_distance_ratio=0.05 + 0.01 * rank)
    except DistributedError as err:
        (__import__("pathlib").Path(folder) / f"rank{rank}.txt").write_text(str(err))


def _too_many_worker(rank, world, folder):
    obs = ObstacleSet.from_embeddings(np.zeros((1, 3)), q_star=1.0)
    try:
        ShardedRepulsiveField(obs, backend="torch")
    except DistributedError as err:
        (__import__("pathlib").Path(folder) / f"rank{rank}.txt").write_text(str(err))


def test_mismatched_settings_and_too_many_ranks_fail_on_every_rank(tmp_path):
    spawn(_mismatch_worker, 2, str(tmp_path))
    for r in (0, 1):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert "disagree on field settings and obstacle set" in msg and "ranks [1]" in msg
    (tmp_path / "w").mkdir()
    spawn(_too_many_worker, 2, str(tmp_path / "w"))
    for r in (0, 1):
        msg = (tmp_path / "w" / f"rank{r}.txt").read_text()
        assert "2 ranks but only 1 obstacles" in msg


def test_one_process_sharded_field_is_the_field():
    obs, x = problem()
    a = ShardedRepulsiveField(obs, backend="torch").evaluate(x)
    b = RepulsiveField(obs, backend="torch").evaluate(x)
    assert torch.equal(a.potential, b.potential) and torch.equal(a.force, b.force)


def _dying_worker(rank, world, folder):
    import os
    import time

    obs, x = problem()
    field = ShardedRepulsiveField(obs, backend="torch")
    if rank == 1:
        os._exit(3)  # dies mid-run, without leaving the group
    t0 = time.perf_counter()
    try:
        field.evaluate(x)
    except DistributedError as err:
        msg = f"{time.perf_counter() - t0:.3f}\n{err}"
        (__import__("pathlib").Path(folder) / "rank0.txt").write_text(msg)


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    codes = spawn(_dying_worker, 2, str(tmp_path), timeout_s=10, check=False)
    assert codes == [0, 3]
    secs, msg = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(secs) < 10 + 5  # within the group's timeout
    assert "rank 0 of 2: the sharded field's sum failed: another rank stopped" in msg


def _hanging_worker(rank, world, folder):
    import time

    obs, x = problem()
    field = ShardedRepulsiveField(obs, backend="torch")
    if rank == 1:
        time.sleep(6)  # alive but silent: only the timeout can stop rank 0
        return
    t0 = time.perf_counter()
    try:
        field.evaluate(x)
    except DistributedError as err:
        msg = f"{time.perf_counter() - t0:.3f}\n{err}"
        (__import__("pathlib").Path(folder) / "rank0.txt").write_text(msg)


def test_a_rank_that_hangs_stops_the_others_after_the_timeout(tmp_path):
    spawn(_hanging_worker, 2, str(tmp_path), timeout_s=2, check=False)
    secs, msg = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert 1.5 < float(secs) < 5.5  # the group's 2 s timeout, not rank 1's 6 s
    assert "did not answer within the process group's timeout (2 s)" in msg
