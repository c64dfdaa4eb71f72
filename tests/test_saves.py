"""Crash-safe, concurrent-safe saves (cspace.io.folder.write_folder) for every kind: a writer
killed at any step leaves the old folder or the new one; readers never fail while writers save;
writers are serialised; the next save removes what a dead writer left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cspace.io.folder as folder_mod
from cspace.io.errors import FolderError
from cspace.io.folder import LOCK_FILE, MANIFEST, TMP_PREFIX, folder_lock, read_folder
from cspace.models.flow import FLOW_KIND, FlowConfig, VelocityNet, save_flow
from cspace.models.teachers import TEACHER_KIND, DigitsTeacher
from cspace.models.vae import (
    VAE_KIND,
    AlignedVAEConfig,
    VFAlignment,
    build_autoencoder,
    save_aligned_vae,
)
from obstacles import ObstacleSet, ObstacleSetError, PreferenceClassifier
from obstacles.classifier import CLASSIFIER_KIND
from obstacles.obstacle_set import KIND as OBSTACLES_KIND
from tests.folders import live_files, load_kind, manifest, version_files
from tests.legacy_writers import save_obstacle_set_v2

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = AlignedVAEConfig(block_out_channels=(8, 16), norm_num_groups=4)
TINY_FLOW = FlowConfig(latent_shape=(2, 1, 1), width=16, depth=1, time_channels=8, time_embed_dim=8)
KINDS = {
    "obstacles": OBSTACLES_KIND,
    "classifier": CLASSIFIER_KIND,
    "flow": FLOW_KIND,
    "vae": VAE_KIND,
    "teacher": TEACHER_KIND,
}


def _obstacles(seed: int) -> ObstacleSet:
    rng = np.random.default_rng(seed)
    n = 3 + seed % 5
    return ObstacleSet.from_embeddings(
        rng.standard_normal((n, 4)), q_star=1.0, labels=f"seed{seed}", sources="x"
    )


def _save(kind: str, path: Path, seed: int) -> None:
    """Save a folder of ``kind`` whose content depends on ``seed``, with the kind's writer."""
    torch.manual_seed(seed)
    if kind == "obstacles":
        _obstacles(seed).save(path)
    elif kind == "classifier":
        PreferenceClassifier(np.arange(1.0, 5.0) + seed, 0.1).save(path)
    elif kind == "flow":
        save_flow(path, VelocityNet(TINY_FLOW), {"encoder": "test", "seed": seed})
    elif kind == "vae":  # even seeds with a VF projection (its own file), odd ones without
        width = 4 if seed % 2 == 0 else None
        meta = {
            "config": TINY_VAE.to_dict(),
            "scaling_factor": 1.5,
            "shift_factor": 0.25,
            "teacher_width": width,
            "seed": seed,
        }
        proj = VFAlignment(TINY_VAE.latent_channels, width, TINY_VAE) if width else None
        save_aligned_vae(path, build_autoencoder(TINY_VAE), meta, proj)
    else:
        DigitsTeacher().save(path, extra={"seed": seed})


def _content(kind: str, path: Path) -> dict[str, bytes]:
    """The payload a reader gets (verified), after the kind's own loader accepted the folder."""
    load_kind(kind, path)
    return read_folder(path, KINDS[kind]).files


class Killed(OSError):
    """The simulated death of the writing process."""


class Killer:
    """Counts the file-system steps of a save (open, write, fsync, replace, unlink, mkdir,
    rmdir) and, from step ``at`` on, fails every one of them: the process is dead, so not even
    its clean-up runs."""

    OPS = ("open", "write", "fsync", "replace", "unlink", "mkdir", "rmdir")

    def __init__(self, monkeypatch, at: int | None = None) -> None:
        self.at, self.steps, self.dead = at, [], False
        for op in self.OPS:
            monkeypatch.setattr(os, op, self._wrap(op, getattr(os, op)))

    def _wrap(self, op, real):
        def step(*args, **kwargs):
            if not self.dead and (self.at is None or len(self.steps) < self.at):
                target = args[1] if op == "replace" else args[0]
                self.steps.append((op, "" if op in ("write", "fsync") else Path(target).name))
                return real(*args, **kwargs)
            self.dead = True
            raise Killed(f"killed (simulated) at {op}")

        return step


def _check_clean(path: Path) -> None:
    """After a save that finished: no temporary file, nothing but the current version, the one
    it replaced (listed as superseded) and the lock."""
    names = set(os.listdir(path))
    assert not [n for n in names if n.startswith(TMP_PREFIX)]
    assert names == version_files(path), names ^ version_files(path)


@pytest.mark.parametrize("fresh", [False, True], ids=["over-old", "first-save"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_kill_at_every_step_leaves_the_old_or_the_new_folder(kind, fresh, tmp_path, monkeypatch):
    ref_old, ref_new = tmp_path / "ref-old", tmp_path / "ref-new"
    _save(kind, ref_old, 1)
    _save(kind, ref_new, 2)
    old, new = _content(kind, ref_old), _content(kind, ref_new)
    assert old != new
    # a dry run counts the steps of the save
    probe = tmp_path / "probe"
    if not fresh:  # two versions: the save under test also removes the older one's files
        _save(kind, probe, 0)
        _save(kind, probe, 1)
    with monkeypatch.context() as m:
        counter = Killer(m)
        _save(kind, probe, 2)
    steps = counter.steps
    ops = {op for op, _ in steps}
    assert {"open", "write", "fsync", "replace"} | ({"unlink"} if not fresh else set()) <= ops
    commit = max(i for i, (op, name) in enumerate(steps) if op == "replace" and name == MANIFEST)
    for k in range(len(steps) + 1):
        path = tmp_path / f"k{k}"
        if not fresh:
            _save(kind, path, 0)
            _save(kind, path, 1)
        with monkeypatch.context() as m:
            killer = Killer(m, at=k)
            try:
                _save(kind, path, 2)
            except (Killed, FolderError):  # the lock's open is reported as the kind's error
                assert killer.dead
        if k <= len(steps) - 1:
            assert killer.dead, k
        # the folder at the path: the old one (or, for a first save, none) before the commit,
        # the new one from the commit on
        if k <= commit:
            if fresh:
                with pytest.raises((ValueError, FileNotFoundError), match=r"missing|no folder"):
                    load_kind(kind, path)
            else:
                assert _content(kind, path) == old, (k, steps[k])
        else:
            assert _content(kind, path) == new, (k, steps[k])
        # the next save removes what the dead writer left
        _save(kind, path, 3)
        _check_clean(path)
        _save(kind, path, 3)
        assert set(os.listdir(path)) == live_files(path)


def test_kill_steps_name_the_commit(tmp_path, monkeypatch):
    """The manifest is replaced last: every payload file is in place before the commit."""
    _obstacles(1).save(tmp_path / "set")
    with monkeypatch.context() as m:
        counter = Killer(m)
        _obstacles(2).save(tmp_path / "set")
    replaced = [name for op, name in counter.steps if op == "replace"]
    assert len(replaced) == 4 and replaced[-1] == MANIFEST
    assert {n for n in replaced[:-1]} == {
        e["file"] for e in manifest(tmp_path / "set")["files"].values()
    }


def test_leftovers_of_dead_writers_are_removed_and_user_files_kept(tmp_path):
    path = tmp_path / "set"
    _obstacles(1).save(path)
    (path / "notes.txt").write_text("mine")
    (path / "images").mkdir()
    (path / f"{TMP_PREFIX}dead-embeddings.safetensors").write_bytes(b"x" * 1000)
    (path / "embeddings-0123456789ab.safetensors").write_bytes(b"a dead writer's file")
    (path / "model-0123456789ab.safetensors").write_bytes(b"not a set's file name")
    _obstacles(2).save(path)
    names = set(os.listdir(path))
    assert names == version_files(path) | {"notes.txt", "images", "model-0123456789ab.safetensors"}
    assert (path / "notes.txt").read_text() == "mine"


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    """An error (not a kill) during a first save removes the folder it created."""
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == MANIFEST:
            raise OSError("disk full (simulated)")
        return real(src, dst)

    monkeypatch.setattr(folder_mod.os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        _obstacles(1).save(tmp_path / "new")
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()


def test_a_first_save_that_died_is_taken_over(tmp_path):
    """A folder holding only what a dead first save left (its lock, stored files without a
    manifest) is not a set, and the next save writes there without complaint."""
    path = tmp_path / "set"
    path.mkdir()
    (path / LOCK_FILE).write_bytes(b"")
    (path / "embeddings-0123456789ab.safetensors").write_bytes(b"partial")
    (path / f"{TMP_PREFIX}x-records.json").write_bytes(b"{")
    with pytest.raises(ObstacleSetError, match=r"manifest\.json is missing"):
        ObstacleSet.load(path)
    _obstacles(1).save(path)
    assert set(os.listdir(path)) == live_files(path)


def test_a_vae_projection_file_is_the_folders_own(tmp_path):
    """The VF projection's file is optional in a VAE folder but the kind's own: a save takes
    over a folder whose dead first save left only it (and the VAE's file), and a VAE saved
    without a projection over one with it drops the old file at the next save."""
    path = tmp_path / "vae"
    _save("vae", path, 0)  # with a projection
    (path / MANIFEST).unlink()  # what a first save killed before its commit leaves
    _save("vae", path, 0)
    assert set(os.listdir(path)) == live_files(path)
    _save("vae", path, 1)  # without: the projection's file is superseded, then removed
    _save("vae", path, 1)
    assert not any(n.startswith("projection-") for n in os.listdir(path))
    assert set(os.listdir(path)) == live_files(path)


def test_the_lock_serialises_writers_in_threads(tmp_path):
    """Two holders of one folder's lock never overlap (flock on separate open files)."""
    inside, overlaps = [], []

    def hold(i):
        for _ in range(20):
            with folder_lock(tmp_path / "set", OBSTACLES_KIND):
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(tuple(inside))
                time.sleep(0.0005)
                inside.remove(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert os.listdir(tmp_path / "set") == [LOCK_FILE]


# ---------------------------------------------------------------------- real processes
_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from obstacles import ObstacleSet
    path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        n = 3 + i % 5
        ObstacleSet.from_embeddings(
            rng.standard_normal((n, 4)), q_star=1.0, labels=f"seed{i}", sources="x"
        ).save(path)
    print("done")
    """
)


def _writer(path: Path, first: int, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(first), str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _consistent(s: ObstacleSet) -> bool:
    """A whole set as one writer saved it: its labels name the seed its embeddings come from."""
    seed = int(s.labels[0][4:])
    return np.array_equal(s.embeddings, _obstacles(seed).embeddings)


def _read_while(procs: list[subprocess.Popen], path: Path) -> tuple[int, list[str]]:
    """Load ``path`` in a loop until the processes end; returns the number of loads and the
    failures (before the first save lands, "not an obstacle set" is expected, not counted)."""
    loads, failures = 0, []
    while any(p.poll() is None for p in procs):
        try:
            s = ObstacleSet.load(path)
            loads += 1
            if not _consistent(s):
                failures.append(f"a mixed set: {s.labels[:1]}")
        except Exception as err:  # every failure is counted
            first = loads == 0 and isinstance(err, ObstacleSetError)
            if not (first and "is not an obstacle set: " in str(err)):
                failures.append(f"{type(err).__name__}: {err}")
    return loads, failures


def test_a_reader_never_fails_while_another_process_saves_100_times(tmp_path):
    path = tmp_path / "set"
    _obstacles(0).save(path)
    t0 = time.perf_counter()
    writer = _writer(path, 1, 100)
    loads, failures = _read_while([writer], path)
    out, err = writer.communicate()
    assert writer.returncode == 0 and out.split() == ["ready", "done"], err
    print(
        f"{loads} loads during 100 saves in {time.perf_counter() - t0:.1f} s; failures: {failures}"
    )
    assert failures == [] and loads > 0
    assert ObstacleSet.load(path).labels[0] == "seed100"
    _check_clean(path)


def test_two_writer_processes_and_a_reader(tmp_path):
    path = tmp_path / "set"
    t0 = time.perf_counter()
    writers = [_writer(path, 1, 50), _writer(path, 1001, 50)]  # a first save raced by both
    loads, failures = _read_while(writers, path)
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0 and out.split() == ["ready", "done"], err
    print(f"{loads} loads during 2 x 50 saves in {time.perf_counter() - t0:.1f} s")
    assert failures == [] and loads > 0
    final = ObstacleSet.load(path)
    assert final.labels[0] in ("seed50", "seed1050") and _consistent(final)
    _check_clean(path)


def test_sigkill_during_saves(tmp_path):
    """A writer process killed with SIGKILL at arbitrary moments: the set at the path always
    loads whole, and the next save leaves nothing of the dead writer's."""
    path = tmp_path / "set"
    _obstacles(0).save(path)
    rng = np.random.default_rng(0)
    left = []
    for _ in range(3):
        writer = _writer(path, 1, 100_000)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.3)))  # some hundred saves, then a kill in one
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
        assert _consistent(ObstacleSet.load(path))
        left.append(len(set(os.listdir(path)) - version_files(path)))
        _obstacles(0).save(path)
        _check_clean(path)
    print(f"entries left by the killed writers (removed by the next save): {left}")


def test_reader_retries_when_a_version_vanishes(tmp_path, monkeypatch):
    """The read that fails because two saves replaced the version it was reading starts over
    (bounded) and returns the newest set."""
    path = tmp_path / "set"
    _obstacles(1).save(path)
    real = folder_mod.verify_files
    calls = []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # two saves land between the manifest read and the files
            _obstacles(2).save(path)
            _obstacles(3).save(path)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_mod, "verify_files", racing)
    assert ObstacleSet.load(path).labels[0] == "seed3"
    assert len(calls) == 2


def test_v2_folders_written_by_the_previous_writer_still_load_and_are_replaced(tmp_path):
    s = _obstacles(4)
    path = save_obstacle_set_v2(s, tmp_path / "set")
    assert json.loads((path / MANIFEST).read_text())["format_version"] == 2
    np.testing.assert_array_equal(ObstacleSet.load(path).embeddings, s.embeddings)
    _obstacles(5).save(path)  # the v2 files stay for readers of v2 until the next save
    assert set(manifest(path)["superseded"]) == {
        "index.faiss",
        "metadata.safetensors",
        "records.json",
    }
    _obstacles(6).save(path)
    assert set(os.listdir(path)) == version_files(path)
    assert not (path / "index.faiss").exists()


def test_a_writer_waits_for_the_lock_and_gives_up_with_a_clear_error(tmp_path):
    path = tmp_path / "set"
    _obstacles(1).save(path)
    with folder_lock(path, OBSTACLES_KIND):  # another writer holds the folder
        t0 = time.perf_counter()
        with pytest.raises(ObstacleSetError, match="another process has been saving to"):
            with folder_lock(path, OBSTACLES_KIND, timeout=0.2):
                pass
        assert 0.2 <= time.perf_counter() - t0 < 5
    with folder_lock(path, OBSTACLES_KIND, timeout=0.2):  # released: taken at once
        pass


def test_a_lock_file_that_is_a_symbolic_link_is_refused(tmp_path):
    path = tmp_path / "set"
    _obstacles(1).save(path)
    (path / LOCK_FILE).unlink()
    (tmp_path / "target").write_text("keep")
    (path / LOCK_FILE).symlink_to(tmp_path / "target")
    with pytest.raises(ObstacleSetError, match="cannot open the lock file"):
        _obstacles(2).save(path)
    assert (tmp_path / "target").read_text() == "keep"
    assert ObstacleSet.load(path).labels[0] == "seed1"


def test_a_folder_created_while_the_reader_looks_is_not_taken_for_a_file(tmp_path, monkeypatch):
    """A first save creates the folder between the reader's checks: the reader reports a set
    not there yet (what it was when it looked), never "a file"."""
    path = tmp_path / "set"
    real_is_dir = Path.is_dir

    def racing_is_dir(self):
        found = real_is_dir(self)
        if self == path and not found:
            path.mkdir()  # the writer's folder lock lands now
        return found

    monkeypatch.setattr(Path, "is_dir", racing_is_dir)
    with pytest.raises(ObstacleSetError) as err:
        ObstacleSet.load(path)
    assert "is not an obstacle set: " in str(err.value), err.value
    assert "is a file" not in str(err.value)
