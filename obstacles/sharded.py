r"""Obstacle sets kept sharded on disk, loaded shard-per-rank.

A sharded set is a folder of S ordinary obstacle-set folders (``shard-00000-of-00004`` ...,
each written by :meth:`ObstacleSet.save`, crash-safe and verified on load) and ``shards.json``,
written last and atomically, which makes the set exist:

    {"format": "cspace-sharded-obstacle-set", "version": 1, "count": N, "dim": d,
     "set_digest": SHA-256 of the whole set (:func:`set_fingerprint`),
     "shards": [{"name": ..., "count": N_s, "manifest_sha256": ...}, ...]}

Shard s holds the obstacles ``[offset_s, offset_s + N_s)`` of the whole set, in order, with
their Q*, eta, radius, labels and sources; its ids in the whole set are ``offset_s + local id``.
:func:`load_shard` gives rank r of W the shards ``split(S, W)[r]`` (contiguous runs, the first
``S % W`` ranks one shard more) as one set with those global ids, after checking every
listed shard's ``manifest.json`` against its recorded SHA-256 (so shards of two different
saves cannot be mixed). Everything read is bounded: ``shards.json`` at most 1 MiB, each field's
type and range checked, shard names plain names inside the folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from cspace.io.files import sha256_hex, write_json_atomic
from cspace.io.untrusted import FormatError, parse_json
from obstacles.obstacle_set import ObstacleSet, ObstacleSetError

__all__ = [
    "SHARDED_FORMAT",
    "is_sharded_set",
    "load_shard",
    "save_sharded",
    "set_fingerprint",
    "shard_of",
    "split",
]

SHARDED_FORMAT = "cspace-sharded-obstacle-set"
_INDEX = "shards.json"
_MAX_INDEX_BYTES = 1 << 20
_MAX_SHARDS = 100_000


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` ranges of ``n`` items, the first ``n % parts`` one
    longer (``numpy.array_split`` order)."""
    q, r = divmod(int(n), int(parts))
    out, start = [], 0
    for k in range(int(parts)):
        stop = start + q + (1 if k < r else 0)
        out.append((start, stop))
        start = stop
    return out


def set_fingerprint(obstacles: ObstacleSet) -> str:
    """SHA-256 (hex) of a set's embeddings (float32), ids, Q*, eta and radius: everything a
    field computes from."""
    h = hashlib.sha256()
    h.update(np.int64([len(obstacles), obstacles.dim]).tobytes())
    for a in (
        obstacles.embeddings.astype(np.float32),
        obstacles.ids.astype(np.int64),
        obstacles.q_star.astype(np.float64),
        obstacles.eta.astype(np.float64),
        obstacles.radius.astype(np.float64),
    ):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def shard_of(obstacles: ObstacleSet, start: int, stop: int) -> ObstacleSet:
    """The obstacles ``[start, stop)`` of a set as a new set (same space, parameters, labels and
    sources; its own ids count from 0: ``obstacles.ids[start:stop]`` are the global ones)."""
    return ObstacleSet.from_embeddings(
        obstacles.embeddings[start:stop],
        q_star=obstacles.q_star[start:stop],
        eta=obstacles.eta[start:stop],
        radius=obstacles.radius[start:stop],
        labels=obstacles.labels[start:stop],
        sources=obstacles.sources[start:stop],
        space=obstacles.space,
    )


def is_sharded_set(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a sharded set's ``shards.json``."""
    return (Path(path) / _INDEX).is_file()


def save_sharded(obstacles: ObstacleSet, path: str | os.PathLike, shards: int) -> Path:
    """Write ``obstacles`` as ``shards`` shard folders and ``shards.json`` (last, atomically);
    returns the path. The folder must be new, empty or a sharded set (which is replaced: its
    index is rewritten last, so a reader sees the old set or the new one)."""
    path = Path(path)
    n = len(obstacles)
    if not 1 <= int(shards) <= min(n, _MAX_SHARDS):
        raise ObstacleSetError(
            f"shards must be in [1, {min(n, _MAX_SHARDS)}] for a set of {n} obstacles; got {shards}"
        )
    if path.exists() and any(path.iterdir()) and not is_sharded_set(path):
        raise ObstacleSetError(
            f"{path} exists and is not a sharded obstacle set: refusing to write into it "
            "(choose a new folder)"
        )
    path.mkdir(parents=True, exist_ok=True)
    s = int(shards)
    table = []
    for k, (start, stop) in enumerate(split(n, s)):
        name = f"shard-{k:05d}-of-{s:05d}"
        shard_of(obstacles, start, stop).save(path / name)
        table.append(
            {
                "name": name,
                "count": stop - start,
                "manifest_sha256": sha256_hex((path / name / "manifest.json").read_bytes()),
            }
        )
    index = {
        "format": SHARDED_FORMAT,
        "version": 1,
        "count": n,
        "dim": obstacles.dim,
        "set_digest": set_fingerprint(obstacles),
        "shards": table,
    }
    write_json_atomic(path / _INDEX, index)
    return path


def _fail(path: Path, what: str) -> ObstacleSetError:
    return ObstacleSetError(f"{path / _INDEX}: {what} (not a sharded set cspace wrote?)")


def read_index(path: str | os.PathLike) -> dict:
    """The checked ``shards.json`` of a sharded set."""
    path = Path(path)
    f = path / _INDEX
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        raise ObstacleSetError(f"{path} is not a sharded obstacle set (no {_INDEX})") from None
    if not os.path.isfile(f) or os.path.islink(f) or st.st_size > _MAX_INDEX_BYTES:
        raise _fail(path, f"must be a regular file of at most {_MAX_INDEX_BYTES} bytes")
    try:
        idx = parse_json(f.read_bytes(), max_bytes=_MAX_INDEX_BYTES)
    except FormatError as err:
        raise _fail(path, str(err)) from None
    if not isinstance(idx, dict) or idx.get("format") != SHARDED_FORMAT or idx.get("version") != 1:
        raise _fail(path, f"format must be {SHARDED_FORMAT!r} version 1")
    for key in ("count", "dim"):
        v = idx.get(key)
        if type(v) is not int or v < 1:
            raise _fail(path, f"{key} must be an integer >= 1; got {v!r}")
    if not isinstance(idx.get("set_digest"), str) or len(idx["set_digest"]) != 64:
        raise _fail(path, "set_digest must be a SHA-256 hex string")
    table = idx.get("shards")
    if not isinstance(table, list) or not 1 <= len(table) <= _MAX_SHARDS:
        raise _fail(path, f"shards must be a list of 1 to {_MAX_SHARDS} entries")
    total = 0
    for e in table:
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and e["name"].startswith("shard-")
            and "/" not in e["name"]
            and e["name"] not in (".", "..")
            and type(e.get("count")) is int
            and e["count"] >= 1
            and isinstance(e.get("manifest_sha256"), str)
        )
        if not ok:
            raise _fail(path, f"bad shard entry {str(e)[:200]}")
        total += e["count"]
    if total != idx["count"]:
        raise _fail(path, f"the shards hold {total} obstacles but count is {idx['count']}")
    return idx


def load_shard(
    path: str | os.PathLike, rank: int = 0, world: int = 1
) -> tuple[ObstacleSet, np.ndarray, str]:
    """Rank ``rank`` of ``world``'s part of a sharded set: ``(set, global ids (N_r,) int64,
    set_digest)``, the set being the shards ``split(S, world)[rank]`` in order (module
    docstring). Raises :class:`ObstacleSetError` when ``world`` exceeds the number of shards
    (a rank would get none), for a shard whose manifest changed since the index was written,
    and for anything :meth:`ObstacleSet.load` refuses."""
    path = Path(path)
    idx = read_index(path)
    table = idx["shards"]
    if not 0 <= int(rank) < int(world):
        raise ObstacleSetError(f"rank must be in [0, world={world}); got {rank}")
    if int(world) > len(table):
        raise ObstacleSetError(
            f"{path} has {len(table)} shards, fewer than the {world} ranks that would load it: "
            f"start at most {len(table)} processes, or save it with more shards"
        )
    first, last = split(len(table), int(world))[int(rank)]
    offset = sum(e["count"] for e in table[:first])
    parts = []
    for e in table[first:last]:
        folder = path / e["name"]
        mpath = folder / "manifest.json"
        if not mpath.is_file() or mpath.is_symlink() or mpath.stat().st_size > _MAX_INDEX_BYTES:
            raise _fail(path, f"shard {e['name']} has no readable manifest.json")
        if sha256_hex(mpath.read_bytes()) != e["manifest_sha256"]:
            raise _fail(path, f"shard {e['name']} changed since the index was written")
        part = ObstacleSet.load(folder, expected_dim=idx["dim"])
        if len(part) != e["count"]:
            raise _fail(path, f"shard {e['name']} holds {len(part)} obstacles, not {e['count']}")
        parts.append(part)
    count = sum(len(p) for p in parts)
    merged = ObstacleSet.from_embeddings(
        np.concatenate([p.embeddings for p in parts]),
        q_star=np.concatenate([p.q_star for p in parts]),
        eta=np.concatenate([p.eta for p in parts]),
        radius=np.concatenate([p.radius for p in parts]),
        labels=[s for p in parts for s in p.labels],
        sources=[s for p in parts for s in p.sources],
        space=parts[0].space,
    )
    return merged, np.arange(offset, offset + count, dtype=np.int64), idx["set_digest"]
