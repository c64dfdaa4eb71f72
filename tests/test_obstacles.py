"""Tests for obstacles.obstacle_set: construction, exact queries, add/remove, safe files."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

import obstacles.obstacle_set as obstacle_set_module
from obstacles import FORMAT, FORMAT_VERSION, ObstacleSet, ObstacleSetError
from tests.folders import live_files, replace_payload, stored, version_files
from tests.legacy_writers import save_obstacle_set_v2

PAYLOAD = ("embeddings.safetensors", "metadata.safetensors", "records.json")


# ----------------------------------------------------------------------------- helpers
#: every payload file of a current (``saved``) and a version-2 (``saved_v2``) set
DATA_FILES = [
    ("saved", "embeddings.safetensors"),
    ("saved", "metadata.safetensors"),
    ("saved", "records.json"),
    ("saved_v2", "index.faiss"),
    ("saved_v2", "metadata.safetensors"),
]


def _rand(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal((n, d))


def _brute(queries: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """(B, N) true Euclidean distances in float64, from differences."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    e = np.asarray(emb, dtype=np.float64)
    return np.sqrt(((q[:, None, :] - e[None, :, :]) ** 2).sum(-1))


def _gap_radius(dist: np.ndarray, quantile: float, rel_gap: float = 1e-3) -> float:
    """A radius near ``quantile`` of ``dist`` farther than ``rel_gap`` (relative) from all of them."""
    s = np.sort(dist.ravel())
    start = int(quantile * s.size)
    for j in range(start, s.size - 1):
        r = 0.5 * (s[j] + s[j + 1])
        if np.min(np.abs(s - r)) > 2 * rel_gap * r:
            return float(r)
    raise AssertionError("no radius far enough from all distances; change the seed")


def _make_set(n: int = 10, d: int = 6, seed: int = 0) -> ObstacleSet:
    rng = np.random.default_rng(seed)
    return ObstacleSet.from_embeddings(
        rng.standard_normal((n, d)),
        q_star=rng.uniform(0.5, 2.0, n),
        eta=rng.uniform(0.0, 3.0, n),
        radius=rng.uniform(0.0, 0.2, n),
        labels=[f"o{i}" for i in range(n)],
        sources=[f"src{i % 3}" for i in range(n)],
    )


def _snapshot(s: ObstacleSet) -> dict:
    return {
        "len": len(s),
        "ids": s.ids,
        "emb": s.embeddings,
        "q_star": s.q_star,
        "eta": s.eta,
        "radius": s.radius,
        "labels": s.labels,
        "sources": s.sources,
        "history": [dict(h) for h in s.history],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _rewrite_manifest(path: Path, **changes) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _replace_file(path: Path, name: str, data: bytes) -> None:
    """Replace a data file and update the manifest's entry (stored name, size and checksum)
    to match it."""
    replace_payload(path, name, data)


@pytest.fixture(params=["default", "blas"])
def faiss_path(request):
    """Run with FAISS' default distance kernel and with its BLAS kernel forced.

    The BLAS kernel computes ``|x|^2 + |o|^2 - 2 x.o`` in float32, which cancels
    catastrophically for vectors sharing a large offset; recent FAISS versions only use it for
    large batches, so the threshold is lowered to exercise it with small test data.
    """
    old = faiss.cvar.distance_compute_blas_threshold
    if request.param == "blas":
        faiss.cvar.distance_compute_blas_threshold = 1
    try:
        yield request.param
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


@pytest.fixture
def saved(tmp_path) -> tuple[ObstacleSet, Path]:
    s = _make_set(n=12, d=8, seed=3)
    path = s.save(tmp_path / "set")
    return s, path


@pytest.fixture
def saved_v2(tmp_path) -> tuple[ObstacleSet, Path]:
    """A set of format_version 2 (``index.faiss``), written by the writer of that version."""
    s = _make_set(n=12, d=8, seed=3)
    path = save_obstacle_set_v2(s, tmp_path / "set")
    return s, path


# ----------------------------------------------------------------------------- 1. construction
def test_from_embeddings_scalar_metadata():
    emb = _rand(7, 5, seed=1)
    s = ObstacleSet.from_embeddings(
        emb, q_star=2.5, eta=0.5, radius=0.1, labels="cat", sources="web"
    )
    assert len(s) == 7 and s.dim == 5
    np.testing.assert_array_equal(s.ids, np.arange(7))
    assert s.ids.dtype == np.int64
    np.testing.assert_array_equal(s.q_star, np.full(7, 2.5))
    np.testing.assert_array_equal(s.eta, np.full(7, 0.5))
    np.testing.assert_array_equal(s.radius, np.full(7, 0.1))
    assert s.labels == ["cat"] * 7
    assert s.sources == ["web"] * 7
    assert s.history == []


def test_from_embeddings_defaults():
    s = ObstacleSet.from_embeddings(_rand(4, 3, seed=2), q_star=1.5)
    np.testing.assert_array_equal(s.q_star, np.full(4, 1.5))
    np.testing.assert_array_equal(s.eta, np.ones(4))
    np.testing.assert_array_equal(s.radius, np.zeros(4))
    assert s.labels == [""] * 4 and s.sources == [""] * 4


def test_from_embeddings_array_metadata():
    n = 9
    rng = np.random.default_rng(4)
    q_star, eta, radius = rng.uniform(0.1, 3, n), rng.uniform(0, 2, n), rng.uniform(0, 1, n)
    labels = [f"label-{i}" for i in range(n)]
    sources = np.array([f"file{i}.png" for i in range(n)])
    s = ObstacleSet.from_embeddings(
        rng.standard_normal((n, 4)),
        q_star=q_star,
        eta=eta,
        radius=radius,
        labels=labels,
        sources=sources,
    )
    np.testing.assert_array_equal(s.ids, np.arange(n))
    np.testing.assert_array_equal(s.q_star, q_star)
    np.testing.assert_array_equal(s.eta, eta)
    np.testing.assert_array_equal(s.radius, radius)
    assert s.labels == labels
    assert s.sources == sources.tolist()
    # accessors hand out copies
    s.q_star[:] = -1.0
    s.labels.append("x")
    np.testing.assert_array_equal(s.q_star, q_star)
    assert len(s.labels) == n
    assert "count=9" in repr(s) and "dim=4" in repr(s)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int32])
def test_embeddings_round_trip_as_float32(dtype):
    emb = (_rand(6, 5, seed=5) * 100).astype(dtype)
    s = ObstacleSet.from_embeddings(emb, q_star=1.0)
    out = s.embeddings
    assert out.dtype == np.float32 and out.shape == (6, 5)
    np.testing.assert_array_equal(out, emb.astype(np.float32))


# ----------------------------------------------------------------------------- 2. knn
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("b", [1, 50])
def test_knn_matches_brute_force(faiss_path, k, b):
    s = ObstacleSet.from_embeddings(_rand(200, 16, seed=6), q_star=1.0)
    queries = _rand(b, 16, seed=7)
    dist, ids = s.knn(queries, k=k)
    assert dist.shape == (b, k) and ids.shape == (b, k)
    assert dist.dtype == np.float64 and ids.dtype == np.int64
    true = _brute(queries, s.embeddings)  # true Euclidean, not squared
    want_ids = np.argsort(true, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, want_ids)  # ids == positions: nothing removed
    np.testing.assert_allclose(dist, np.take_along_axis(true, want_ids, 1), rtol=1e-12, atol=0)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_knn_distances_are_not_squared():
    s = ObstacleSet.from_embeddings(np.array([[0.0, 0.0], [3.0, 4.0]]), q_star=1.0)
    dist, ids = s.knn(np.zeros(2), k=2)
    np.testing.assert_array_equal(ids, [[0, 1]])
    np.testing.assert_array_equal(dist, [[0.0, 5.0]])


def test_knn_k_larger_than_n_pads():
    s = ObstacleSet.from_embeddings(_rand(3, 4, seed=8), q_star=1.0)
    queries = _rand(2, 4, seed=9)
    dist, ids = s.knn(queries, k=5)
    assert dist.shape == (2, 5) and ids.shape == (2, 5)
    true = _brute(queries, s.embeddings)
    order = np.argsort(true, axis=1)
    np.testing.assert_array_equal(ids[:, :3], order)
    np.testing.assert_allclose(dist[:, :3], np.take_along_axis(true, order, 1), rtol=1e-12)
    assert np.all(np.isinf(dist[:, 3:])) and np.all(ids[:, 3:] == -1)


def test_knn_accepts_1d_query():
    s = ObstacleSet.from_embeddings(_rand(30, 6, seed=10), q_star=1.0)
    q = _rand(1, 6, seed=11)[0]
    d1, i1 = s.knn(q, k=3)
    d2, i2 = s.knn(q[None], k=3)
    assert d1.shape == (1, 3)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, i2)
    assert i1[0, 0] == int(np.argmin(_brute(q, s.embeddings)))


def test_knn_large_common_offset(faiss_path):
    """Exact neighbours although |x|^2 + |o|^2 - 2 x.o cancels catastrophically in float32."""
    d, offset = 64, 1000.0
    emb = offset + _rand(300, d, seed=12, scale=1e-2)
    queries = offset + _rand(50, d, seed=13, scale=1e-2)
    s = ObstacleSet.from_embeddings(emb, q_star=1.0)
    dist, ids = s.knn(queries, k=5)
    true = _brute(queries, s.embeddings)
    want = np.argsort(true, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(dist, np.take_along_axis(true, want, 1), rtol=1e-9)


# ----------------------------------------------------------------------------- 3. within
@pytest.mark.parametrize("b", [1, 50])
def test_within_matches_brute_force(faiss_path, b):
    s = ObstacleSet.from_embeddings(_rand(200, 8, seed=14), q_star=1.0)
    queries = _rand(b, 8, seed=15)
    true = _brute(queries, s.embeddings)
    r = _gap_radius(true, 0.05, rel_gap=1e-6)
    out = s.within(queries, r)
    assert isinstance(out, list) and len(out) == b
    found = 0
    for i, (ids, dist) in enumerate(out):
        assert ids.dtype == np.int64 and dist.dtype == np.float64
        want = np.flatnonzero(true[i] < r)
        want = want[np.argsort(true[i, want], kind="stable")]
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_allclose(dist, true[i, want], rtol=1e-12, atol=0)
        assert np.all(np.diff(dist) >= 0)
        found += ids.size
    assert found > 0  # the radius is not vacuous


def test_within_is_strict():
    emb = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    s = ObstacleSet.from_embeddings(emb, q_star=1.0)
    ((ids, dist),) = s.within(np.zeros(3), 5.0)  # obstacle 1 is at exactly 5.0
    np.testing.assert_array_equal(ids, [0, 2])
    np.testing.assert_array_equal(dist, [0.0, 1.0])
    ((ids, dist),) = s.within(np.zeros(3), 5.0 + 1e-9)
    np.testing.assert_array_equal(ids, [0, 2, 1])
    np.testing.assert_array_equal(dist, [0.0, 1.0, 5.0])


@pytest.mark.parametrize("quantile", [0.001, 0.01, 0.1])
def test_within_large_common_offset(faiss_path, quantile):
    d, offset = 64, 1000.0
    emb = offset + _rand(300, d, seed=16, scale=1e-2)
    queries = offset + _rand(50, d, seed=17, scale=1e-2)
    true = _brute(queries, emb)  # from the float64 originals

    # the premise: the float32 expansion is useless here
    e32, q32 = emb.astype(np.float32), queries.astype(np.float32)
    naive = (q32**2).sum(1)[:, None] + (e32**2).sum(1)[None] - 2 * q32 @ e32.T
    assert np.max(np.abs(naive - true**2)) > 10 * np.max(true**2)

    s = ObstacleSet.from_embeddings(emb, q_star=1.0)
    r = _gap_radius(true, quantile, rel_gap=1e-3)
    out = s.within(queries, r)
    found = 0
    for i, (ids, dist) in enumerate(out):
        assert set(ids.tolist()) == set(np.flatnonzero(true[i] < r).tolist())
        np.testing.assert_allclose(dist, true[i, ids], rtol=1e-3, atol=0)
        assert np.all(np.diff(dist) >= 0)
        found += ids.size
    assert found >= max(1, int(0.5 * quantile * true.size))


def test_within_bad_radius():
    s = ObstacleSet.from_embeddings(_rand(5, 3, seed=18), q_star=1.0)
    for r in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ObstacleSetError, match="radius must be a finite number > 0"):
            s.within(np.zeros(3), r)


# ----------------------------------------------------------------------------- 4. add / remove
def test_remove_keeps_ids_stable():
    s = _make_set(n=10, d=6, seed=19)
    before = _snapshot(s)
    assert s.remove([2, 5, 7]) == 3
    keep = np.array([0, 1, 3, 4, 6, 8, 9])
    assert len(s) == 7
    np.testing.assert_array_equal(s.ids, keep)
    np.testing.assert_array_equal(s.embeddings, before["emb"][keep])
    np.testing.assert_array_equal(s.q_star, before["q_star"][keep])
    np.testing.assert_array_equal(s.eta, before["eta"][keep])
    np.testing.assert_array_equal(s.radius, before["radius"][keep])
    assert s.labels == [f"o{i}" for i in keep]
    assert s.sources == [before["sources"][i] for i in keep]
    # a kept obstacle is still found under its own id after the index was compacted
    dist, ids = s.knn(before["emb"][[3, 8, 9]], k=1)
    np.testing.assert_array_equal(ids[:, 0], [3, 8, 9])
    np.testing.assert_array_equal(dist[:, 0], 0.0)


def test_knn_and_within_never_return_removed_ids():
    s = ObstacleSet.from_embeddings(_rand(40, 5, seed=20), q_star=1.0)
    emb = s.embeddings
    removed = np.array([0, 7, 13, 21, 39])
    s.remove(removed)
    _, ids = s.knn(emb[removed], k=len(s))
    assert not np.isin(ids, removed).any()
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(s.ids, (len(removed), 1)))
    for ids_w, _ in s.within(emb[removed], 100.0):
        assert not np.isin(ids_w, removed).any()
        assert ids_w.size == len(s)


def test_remove_unknown_ids_raises_and_changes_nothing():
    s = _make_set(n=6, d=4, seed=21)
    s.remove(1)
    before = _snapshot(s)
    with pytest.raises(ObstacleSetError, match=r"unknown obstacle ids \[99\]"):
        s.remove([0, 99])
    _assert_same(before, _snapshot(s))
    with pytest.raises(ObstacleSetError, match=r"unknown obstacle ids \[1\]"):
        s.remove([1])  # already removed
    _assert_same(before, _snapshot(s))


def test_add_after_remove_continues_ids():
    s = ObstacleSet.from_embeddings(_rand(10, 4, seed=22), q_star=1.0)
    s.remove([8, 9])
    new = _rand(2, 4, seed=23)
    ids = s.add(new, q_star=[1.0, 2.0], labels=["a", "b"])
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [10, 11])
    np.testing.assert_array_equal(s.ids, [0, 1, 2, 3, 4, 5, 6, 7, 10, 11])
    assert s.labels[-2:] == ["a", "b"]
    np.testing.assert_array_equal(s.q_star[-2:], [1.0, 2.0])
    _, found = s.knn(new, k=1)
    np.testing.assert_array_equal(found[:, 0], [10, 11])


def test_remove_all_then_query_and_add():
    s = ObstacleSet.from_embeddings(_rand(3, 4, seed=24), q_star=1.0)
    assert s.remove(np.arange(3)) == 3
    assert len(s) == 0 and s.embeddings.shape == (0, 4)
    dist, ids = s.knn(np.zeros(4), k=2)
    assert np.all(np.isinf(dist)) and np.all(ids == -1)
    ((w_ids, w_dist),) = s.within(np.zeros(4), 10.0)
    assert w_ids.size == 0 and w_dist.size == 0
    np.testing.assert_array_equal(s.add(np.ones((1, 4)), q_star=1.0), [3])


def test_set_parameters_records_history():
    s = _make_set(n=5, d=3, seed=25)
    old_q, old_eta, old_r = s.q_star, s.eta, s.radius
    s.set_parameters(q_star=2.0, radius=[0.1, 0.2, 0.3, 0.4, 0.5], note="tuned")
    np.testing.assert_array_equal(s.q_star, np.full(5, 2.0))
    np.testing.assert_array_equal(s.eta, old_eta)
    np.testing.assert_array_equal(s.radius, [0.1, 0.2, 0.3, 0.4, 0.5])
    (h,) = s.history
    assert h["note"] == "tuned" and h["ids"] == [0, 1, 2, 3, 4]
    assert h["q_star"] == old_q.tolist() and h["radius"] == old_r.tolist()
    assert h["eta"] == old_eta.tolist()


def test_set_parameters_bad_value_changes_nothing():
    s = _make_set(n=5, d=3, seed=26)
    before = _snapshot(s)
    with pytest.raises(ObstacleSetError, match="eta must be >= 0"):
        s.set_parameters(q_star=3.0, eta=-1.0)
    _assert_same(before, _snapshot(s))


# ----------------------------------------------------------------------------- 5. save / load
def test_save_load_round_trip(tmp_path):
    s = _make_set(n=15, d=8, seed=27)
    s.remove([3, 14])
    s.set_parameters(eta=np.linspace(0.0, 1.0, 13), note="first")
    s.set_parameters(q_star=0.75, note="second")
    path = s.save(tmp_path / "set")
    assert path == tmp_path / "set"
    assert {p.name for p in path.iterdir()} == live_files(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION == 3
    assert sorted(manifest["files"]) == sorted(PAYLOAD)

    loaded = ObstacleSet.load(path)
    _assert_same(_snapshot(s), _snapshot(loaded))
    assert [h["note"] for h in loaded.history] == ["first", "second"]
    assert loaded.dim == 8 and isinstance(loaded.index, faiss.IndexFlatL2)

    queries = _rand(20, 8, seed=28)
    for a, b in zip(s.knn(queries, k=4), loaded.knn(queries, k=4), strict=True):
        np.testing.assert_array_equal(a, b)
    for (ia, da), (ib, db) in zip(s.within(queries, 3.0), loaded.within(queries, 3.0), strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)

    # the next id survives: both continue at 15, not at max(id) + 1 == 14
    extra = _rand(1, 8, seed=29)
    np.testing.assert_array_equal(loaded.add(extra, q_star=1.0), [15])
    np.testing.assert_array_equal(s.add(extra, q_star=1.0), [15])


def test_load_with_expected_dim_ok(saved):
    s, path = saved
    assert len(ObstacleSet.load(path, expected_dim=8)) == len(s)
    assert len(ObstacleSet.load(str(path))) == len(s)


def test_save_replaces_existing_set(tmp_path):
    path = tmp_path / "set"
    _make_set(n=10, d=6, seed=30).save(path)
    b = _make_set(n=4, d=3, seed=31)
    b.save(path)
    loaded = ObstacleSet.load(path)
    _assert_same(_snapshot(b), _snapshot(loaded))
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # nothing beside the folder
    # the new version, and the files of the one it replaced (for readers still reading it)
    assert {p.name for p in path.iterdir()} == version_files(path)
    assert len(json.loads((path / "manifest.json").read_text())["superseded"]) == 3
    b.save(path)  # the next save removes them
    assert {p.name for p in path.iterdir()} == live_files(path)


def test_save_into_empty_folder_and_new_parents(tmp_path):
    s = _make_set(n=3, d=2, seed=32)
    (tmp_path / "empty").mkdir()
    s.save(tmp_path / "empty")
    s.save(tmp_path / "a" / "b" / "set")
    for p in (tmp_path / "empty", tmp_path / "a" / "b" / "set"):
        np.testing.assert_array_equal(ObstacleSet.load(p).embeddings, s.embeddings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["set"]


@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": b"my thesis"},
        {"sub/data.bin": b"\x00\x01", "readme.md": b"# hi"},
        # a manifest.json from something else is not an obstacle set either
        {"manifest.json": b'{"name": "my-web-app"}', "index.html": b"<html></html>"},
        {"manifest.json": b"not json at all", "data.csv": b"a,b\n1,2\n"},
    ],
)
def test_save_refuses_foreign_folder(tmp_path, files):
    target = tmp_path / "target"
    for name, data in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    before = _tree(target)
    with pytest.raises(ObstacleSetError, match="not an obstacle set; refusing to overwrite"):
        _make_set(n=3, d=2, seed=33).save(target)
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_save_refuses_file_path(tmp_path):
    target = tmp_path / "set"
    target.write_bytes(b"keep me")
    with pytest.raises(ObstacleSetError, match="not a folder"):
        _make_set(n=3, d=2, seed=34).save(target)
    assert target.read_bytes() == b"keep me"


def test_interrupted_save_keeps_previous_set(tmp_path, monkeypatch):
    path = tmp_path / "set"
    a = _make_set(n=5, d=4, seed=35)
    a.save(path)
    before = {p.name for p in path.iterdir()}
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if Path(dst).name == "manifest.json":  # the commit: the new manifest replaces the old
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(obstacle_set_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        _make_set(n=7, d=4, seed=36).save(path)
    monkeypatch.undo()
    assert len(calls) == 4  # three payload files, then the manifest
    _assert_same(_snapshot(a), _snapshot(ObstacleSet.load(path)))
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
    # an error (not a kill) removes what the save wrote: no temporary file, no payload file
    # that no manifest names
    assert {p.name for p in path.iterdir()} == before
    a.save(path)
    assert {p.name for p in path.iterdir()} == version_files(path) == before


# ----------------------------------------------------------------------------- 6. corrupt files
def test_load_missing_manifest(saved):
    _, path = saved
    (path / "manifest.json").unlink()
    with pytest.raises(ObstacleSetError, match=r"not an obstacle set: manifest\.json is missing"):
        ObstacleSet.load(path)
    with pytest.raises(ObstacleSetError, match="is missing"):
        ObstacleSet.load(path.parent / "does-not-exist")


@pytest.mark.parametrize("data", [b'{"format": "cspace.obst', b"\xff\xfe\x00garbage", b""])
def test_load_manifest_not_json(saved, data):
    _, path = saved
    (path / "manifest.json").write_bytes(data)
    with pytest.raises(ObstacleSetError, match="corrupt or not JSON"):
        ObstacleSet.load(path)


@pytest.mark.parametrize("manifest", [{"format": "someone.else", "format_version": 1}, [1, 2], {}])
def test_load_foreign_format(saved, manifest):
    _, path = saved
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ObstacleSetError, match="not a cspace obstacle-set manifest"):
        ObstacleSet.load(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_load_bad_format_version(saved, version):
    _, path = saved
    _rewrite_manifest(path, format_version=version)
    with pytest.raises(ObstacleSetError, match=f"format_version {version!r}"):
        ObstacleSet.load(path)


def test_load_newer_version_says_upgrade(saved):
    _, path = saved
    _rewrite_manifest(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ObstacleSetError, match="upgrade cspace"):
        ObstacleSet.load(path)


def test_load_manifest_missing_field(saved):
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["dim"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ObstacleSetError, match="lacks a required field"):
        ObstacleSet.load(path)


def test_load_truncated_index(saved_v2):
    _, path = saved_v2
    data = (path / "index.faiss").read_bytes()
    (path / "index.faiss").write_bytes(data[:-10])
    msg = f"has {len(data) - 10} bytes but the manifest says {len(data)}: truncated"
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.load(path)


@pytest.mark.parametrize(("layout", "name"), DATA_FILES)
def test_load_flipped_byte(request, layout, name):
    _, path = request.getfixturevalue(layout)
    target = stored(path, name)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ObstacleSetError, match=f"checksum mismatch for .*{target.name}"):
        ObstacleSet.load(path)


@pytest.mark.parametrize(
    "blob",
    [
        b"this is a text file, not a FAISS index\n" * 20,
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        b"IxF2" + np.random.default_rng(37).bytes(300),  # right magic, garbage header
        b"IxF2" + b"\x08\x00\x00\x00",  # right magic, then truncated
        b"",
    ],
    ids=["text", "png", "garbage-header", "short", "empty"],
)
def test_load_foreign_index_with_matching_checksums(saved_v2, blob):
    _, path = saved_v2
    _replace_file(path, "index.faiss", blob)
    with pytest.raises(ObstacleSetError, match=r"index\.faiss is not a readable FAISS index"):
        ObstacleSet.load(path)


def test_load_index_of_wrong_type(saved_v2):
    _, path = saved_v2
    ip = faiss.IndexFlatIP(8)
    ip.add(_rand(12, 8, seed=38).astype(np.float32))
    _replace_file(path, "index.faiss", faiss.serialize_index(ip).tobytes())
    msg = "holds a IndexFlatIP with the inner product metric, not an IndexFlatL2"
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.load(path)


@pytest.mark.parametrize(("d", "n"), [(4, 12), (8, 11)])
def test_load_index_shape_disagrees_with_manifest(saved_v2, d, n):
    _, path = saved_v2
    other = faiss.IndexFlatL2(d)
    other.add(_rand(n, d, seed=39).astype(np.float32))
    _replace_file(path, "index.faiss", faiss.serialize_index(other).tobytes())
    with pytest.raises(
        ObstacleSetError, match=rf"index\.faiss has d={d}, count={n} but the manifest"
    ):
        ObstacleSet.load(path)


@pytest.mark.parametrize(("layout", "name"), DATA_FILES)
def test_load_missing_data_file(request, layout, name):
    _, path = request.getfixturevalue(layout)
    target = stored(path, name)
    target.unlink()
    with pytest.raises(ObstacleSetError, match=rf"{target.name} is missing"):
        ObstacleSet.load(path)


def test_load_foreign_metadata_with_matching_checksum(saved):
    _, path = saved
    _replace_file(path, "metadata.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(ObstacleSetError, match="not a readable safetensors file"):
        ObstacleSet.load(path)


def test_load_expected_dim_mismatch(saved):
    _, path = saved
    with pytest.raises(ObstacleSetError, match=r"dimension mismatch.*holds d=8.*d=16 was expected"):
        ObstacleSet.load(path, expected_dim=16)


def test_load_labels_count_mismatch(saved):
    _, path = saved
    records = json.loads(stored(path, "records.json").read_text())
    records["labels"] = records["labels"][:-1]
    _replace_file(path, "records.json", json.dumps(records).encode())
    with pytest.raises(ObstacleSetError, match="'labels' must be a list of 12 strings; got 11"):
        ObstacleSet.load(path)


@pytest.mark.parametrize("next_id", [0, 11, "abc"])
def test_load_bad_next_id(saved, next_id):
    _, path = saved
    _rewrite_manifest(path, next_id=next_id)  # ids are 0..11: a next_id <= 11 would reuse ids
    with pytest.raises(ObstacleSetError, match="next_id"):
        ObstacleSet.load(path)


@pytest.mark.parametrize("entry", ["abc", None, [1, 2], {}])
def test_load_malformed_files_entry(saved, entry):
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["embeddings.safetensors"] = entry
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ObstacleSetError, match="manifest says"):
        ObstacleSet.load(path)


# ----------------------------------------------------------------------------- 7. bad input
@pytest.mark.parametrize(
    ("emb", "msg"),
    [
        (np.zeros((0, 4)), "empty obstacle set"),
        (np.zeros(4), "must be a 2-D array"),
        (np.zeros((2, 3, 4)), "must be a 2-D array"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or Inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or Inf"),
        (np.array([[0.0, -np.inf]]), "NaN or Inf"),
        (np.array([[1e39, 0.0]]), "overflow float32"),
        (np.array([[0.0, -1e39]]), "overflow float32"),
        (np.array([["a", "b"]]), "real numbers"),
        (np.array([[1 + 2j, 0]]), "real numbers"),
        (np.zeros((3, 0)), "dim must be >= 1"),
    ],
    ids=[
        "empty",
        "1d",
        "3d",
        "nan",
        "inf",
        "-inf",
        "overflow",
        "-overflow",
        "str",
        "complex",
        "d0",
    ],
)
def test_from_embeddings_bad_embeddings(emb, msg):
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.from_embeddings(emb, q_star=1.0)


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"q_star": 0.0}, "q_star must be > 0"),
        ({"q_star": -1.0}, "q_star must be > 0"),
        ({"q_star": [1.0, 1.0, 0.0]}, "q_star must be > 0"),
        ({"q_star": float("nan")}, "q_star must be finite"),
        ({"q_star": float("inf")}, "q_star must be finite"),
        ({"q_star": [1.0, 1.0]}, r"q_star must be a number or have shape \(3,\)"),
        ({"q_star": 1.0, "eta": -0.1}, "eta must be >= 0"),
        ({"q_star": 1.0, "eta": [0.0, float("nan"), 1.0]}, "eta must be finite"),
        ({"q_star": 1.0, "radius": -1e-9}, "radius must be >= 0"),
        ({"q_star": 1.0, "radius": np.zeros((3, 1))}, "radius must be a number or have shape"),
        ({"q_star": 1.0, "labels": ["a", "b"]}, "labels must be a string or a sequence of 3"),
        ({"q_star": 1.0, "sources": ["a"] * 4}, "sources must be a string or a sequence of 3"),
    ],
)
def test_bad_metadata(kwargs, msg):
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.from_embeddings(_rand(3, 2, seed=40), **kwargs)
    s = _make_set(n=4, d=2, seed=41)
    before = _snapshot(s)
    with pytest.raises(ObstacleSetError, match=msg):
        s.add(_rand(3, 2, seed=42), **kwargs)
    _assert_same(before, _snapshot(s))


def test_zero_eta_and_radius_are_allowed():
    s = ObstacleSet.from_embeddings(_rand(2, 2, seed=43), q_star=1e-6, eta=0.0, radius=0.0)
    np.testing.assert_array_equal(s.eta, [0.0, 0.0])


@pytest.mark.parametrize(
    ("emb", "msg"),
    [
        (np.zeros((2, 5)), "dimension mismatch: embeddings have d=5 but this obstacle set has d=4"),
        (np.zeros(4), "2-D array"),
        (np.zeros((1, 2, 4)), "2-D array"),
        (np.full((2, 4), np.nan), "NaN or Inf"),
        (np.full((2, 4), 1e39), "overflow float32"),
    ],
)
def test_failing_add_leaves_set_unchanged(emb, msg):
    s = _make_set(n=5, d=4, seed=44)
    s.remove([1])
    before = _snapshot(s)
    with pytest.raises(ObstacleSetError, match=msg):
        s.add(emb, q_star=1.0)
    _assert_same(before, _snapshot(s))
    np.testing.assert_array_equal(s.add(np.ones((1, 4)), q_star=1.0), [5])  # next id unchanged


def test_empty_add_is_a_no_op():
    s = _make_set(n=3, d=4, seed=45)
    before = _snapshot(s)
    assert s.add(np.zeros((0, 4)), q_star=1.0).size == 0
    _assert_same(before, _snapshot(s))


@pytest.mark.parametrize(
    ("queries", "msg"),
    [
        (np.zeros((2, 5)), r"dimension mismatch: queries have shape \(2, 5\)"),
        (np.zeros(3), r"dimension mismatch: queries have shape \(1, 3\)"),
        (np.zeros((1, 2, 4)), "dimension mismatch"),
        (np.array([[0.0, np.nan, 0.0, 0.0]]), "NaN or Inf"),
        (np.array([0.0, 0.0, np.inf, 0.0]), "NaN or Inf"),
    ],
)
def test_bad_queries(queries, msg):
    s = _make_set(n=5, d=4, seed=46)
    with pytest.raises(ObstacleSetError, match=msg):
        s.knn(queries, k=1)
    with pytest.raises(ObstacleSetError, match=msg):
        s.within(queries, 1.0)


@pytest.mark.parametrize("k", [0, -1])
def test_knn_bad_k(k):
    s = _make_set(n=5, d=4, seed=47)
    with pytest.raises(ObstacleSetError, match=f"k must be >= 1; got {k}"):
        s.knn(np.zeros(4), k=k)


def test_bad_dim():
    with pytest.raises(ObstacleSetError, match="dim must be >= 1"):
        ObstacleSet(0)


# ----------------------------------------------------------------------------- 8. no pickle
def _code_without_docs(src: str) -> str:
    """The module's code with comments and docstrings removed (its docs may say "no pickle")."""
    tree = ast.parse(src)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_module_never_unpickles():
    src = Path(obstacle_set_module.__file__).read_text()
    code = _code_without_docs(src)
    assert "def load" in code and "check_safetensors" in code  # the check sees real code
    assert "deserialize_index" not in code  # FAISS' deserialiser never sees a file
    for word in ("pickle", "torch.load", "allow_pickle", "np.load", "eval(", "exec("):
        assert word not in code, word
    assert "torch.load" not in src
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(src))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(ast.parse(src))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"pickle", "cPickle", "dill", "joblib", "torch", "cloudpickle"}


def test_load_works_with_pickle_disabled(saved, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("load used pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    s, path = saved
    np.testing.assert_array_equal(ObstacleSet.load(path).embeddings, s.embeddings)
