"""The sharded ``obstacles build`` on 2 gloo processes: merge equal to a one-process build,
resume after a crash, a set kept sharded and loaded shard-per-rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance import RepulsiveField
from obstacles import ObstacleSet
from obstacles.obstacle_set import ObstacleSetError
from obstacles.sharded import load_shard, save_sharded
from tests.distributed import spawn

# several processes each, on ports picked at run time: one such test at a time (conftest.py)
pytestmark = pytest.mark.usefixtures("one_distributed_at_a_time")

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
INPUTS = [str(DIGITS / "0"), str(DIGITS / "1")]  # 80 images
KW = dict(shard_size=15, batch_size=8)  # 6 shards, batches that straddle nothing in particular


def _build_worker(rank, world, out, crash, keep_sharded):
    import os

    from cspace.experiments.sharded_build import build_sharded
    from cspace.models.encoders import load_encoder
    from guidance.distributed import DistributedError

    def on_shard(k):
        if crash and rank == 1:
            os._exit(5)  # dies after its first shard is written

    try:
        rep = build_sharded(
            INPUTS, load_encoder("digits"), out, on_shard=on_shard, keep_sharded=keep_sharded,
            **KW,
        )  # fmt: skip
    except DistributedError as err:
        Path(f"{out}.rank{rank}.err").write_text(str(err))
        return
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(rep))


def _one_process(tmp_path) -> ObstacleSet:
    from cspace.models.encoders import load_encoder
    from obstacles.from_images import build_from_images

    # the same batch size and threads as each rank: the digits encoder's float32 output moves
    # by ~1e-6 with either (another CPU kernel), not with which images share a batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = build_from_images(INPUTS, load_encoder("digits"), batch_size=KW["batch_size"])
    finally:
        torch.set_num_threads(threads)
    one.save(tmp_path / "one")
    return one


def _manifest_files(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["files"]


@pytest.mark.slow  # several processes importing the models: 20-60 s on 2 busy cores
def test_sharded_build_merges_to_the_one_process_set_and_resumes_after_a_crash(tmp_path):
    out = tmp_path / "set"
    codes = spawn(_build_worker, 2, str(out), True, None, timeout_s=5, check=False)
    assert codes == [0, 5]
    err = Path(f"{out}.rank0.err").read_text()
    assert "rank 0 of 2: waiting for every rank's shards failed" in err
    assert not out.exists()  # nothing merged, nothing half-written
    work = [p for p in tmp_path.iterdir() if p.name.startswith(".set.shards-")]
    assert len(work) == 1 and len(list(work[0].glob("shard-*.json"))) == 4  # 3 of rank 0, 1
    spawn(_build_worker, 2, str(out), False, None)
    r0 = json.loads(Path(f"{out}.rank0.json").read_text())
    r1 = json.loads(Path(f"{out}.rank1.json").read_text())
    assert (r0["skipped"], r0["encoded"], r1["skipped"], r1["encoded"]) == (3, 0, 1, 2)
    assert not work[0].exists()  # removed after the merge
    merged, one = ObstacleSet.load(out), _one_process(tmp_path)
    assert np.array_equal(merged.embeddings, one.embeddings)
    assert (
        r0["embeddings_sha256"]
        == __import__("hashlib").sha256(one.embeddings.astype(np.float32).tobytes()).hexdigest()
    )
    a, b = _manifest_files(out), _manifest_files(tmp_path / "one")
    assert a == b  # same files, same SHA-256: embeddings, ids and parameters, records
    np.testing.assert_array_equal(merged.q_star, one.q_star)  # "auto" on the whole set


def _field_worker(rank, world, path, folder):
    from guidance.distributed import from_sharded_set

    field = from_sharded_set(path, backend="torch")
    assert len(field.obstacles) < field.n_total  # only this rank's shards were loaded
    x = torch.from_numpy(np.load(f"{folder}/x.npy"))
    out = field.evaluate(x)
    d, i = field.nearest_obstacle(x)
    np.savez(
        f"{folder}/rank{rank}.npz", potential=out.potential.numpy(), force=out.force.numpy(),
        near_d=d.numpy(), near_id=i.numpy(),
    )  # fmt: skip


def test_a_set_kept_sharded_loads_shard_per_rank(tmp_path):
    g = np.random.default_rng(0)
    emb = g.normal(size=(50, 6))
    full = ObstacleSet.from_embeddings(emb, q_star=g.uniform(1, 3, 50), eta=0.5, radius=0.2)
    save_sharded(full, tmp_path / "sharded", shards=3)
    x = emb[:10] + 0.3 * g.normal(size=(10, 6))
    np.save(tmp_path / "x.npy", x)
    spawn(_field_worker, 2, str(tmp_path / "sharded"), str(tmp_path))
    ref = RepulsiveField(full, backend="torch").evaluate(torch.from_numpy(x))
    r0 = np.load(tmp_path / "rank0.npz")
    np.testing.assert_allclose(r0["potential"], ref.potential.numpy(), rtol=1e-12)
    np.testing.assert_allclose(r0["force"], ref.force.numpy(), rtol=1e-12, atol=1e-13)
    _, ids = full.knn(x, k=1)
    np.testing.assert_array_equal(r0["near_id"], ids[:, 0])
    # ranks 0 and 1 of 2 get shards [0, 1] and [2]; more ranks than shards is refused
    a, ids_a, dig = load_shard(tmp_path / "sharded", 0, 2)
    b, ids_b, _ = load_shard(tmp_path / "sharded", 1, 2)
    assert len(a) + len(b) == 50 and ids_a[0] == 0 and ids_b[0] == len(a) and len(dig) == 64
    with pytest.raises(ObstacleSetError, match="3 shards, fewer than the 4 ranks"):
        load_shard(tmp_path / "sharded", 0, 4)
    # a shard replaced after the index was written is refused
    save_sharded(full, tmp_path / "other", shards=3)
    ObstacleSet.from_embeddings(emb[:17] + 1, q_star=1.0).save(
        tmp_path / "other" / "shard-00000-of-00003"
    )
    with pytest.raises(ObstacleSetError, match="changed since the index was written"):
        load_shard(tmp_path / "other", 0, 1)


@pytest.mark.slow  # several processes importing the models: 20-60 s on 2 busy cores
def test_cspace_obstacles_build_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 cspace obstacles build`` writes the set a plain one-process
    ``cspace obstacles build`` writes (same batch size, one thread each): same files, same
    SHA-256s."""
    import os
    import subprocess
    import sys

    from tests.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    args = ["obstacles", "build", str(DIGITS / "3"), "--batch-size", "8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           f"--master-port={free_port()}", "-m", "cspace.cli", *args, "--shard-size", "10",
           "--out", str(tmp_path / "dist")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from 4 shards on 2 processes" in done.stdout
    one = subprocess.run(
        [sys.executable, "-m", "cspace.cli", *args, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert _manifest_files(tmp_path / "dist") == _manifest_files(tmp_path / "one")


def test_a_crafted_shard_index_is_refused(tmp_path):
    g = np.random.default_rng(1)
    full = ObstacleSet.from_embeddings(g.normal(size=(6, 3)), q_star=1.0)
    save_sharded(full, tmp_path / "s", shards=2)
    index = tmp_path / "s" / "shards.json"
    good = json.loads(index.read_text())
    bad_cases = [
        ({**good, "count": 7}, "the shards hold 6 obstacles but count is 7"),
        ({**good, "format": "other"}, "format must be"),
        ({**good, "shards": [{**good["shards"][0], "name": "../x"}]}, "bad shard entry"),
        ({**good, "dim": 1.5}, "dim must be an integer"),
    ]
    for data, message in bad_cases:
        index.write_text(json.dumps(data))
        with pytest.raises(ObstacleSetError, match=message):
            load_shard(tmp_path / "s", 0, 1)
    index.write_text("[" * 100 + "]" * 100)
    with pytest.raises(ObstacleSetError, match="nested"):
        load_shard(tmp_path / "s", 0, 1)
    with pytest.raises(ObstacleSetError, match="shards must be in"):
        save_sharded(full, tmp_path / "t", shards=7)
