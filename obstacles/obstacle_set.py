"""Obstacle sets: embeddings with per-obstacle metadata, an exact FAISS index, safe files.

An obstacle set holds N embeddings of dimension d (float32) in a FAISS ``IndexFlatL2`` and, per
obstacle, a stable integer id, a label, a source, the influence range ``q_star`` (Q*), the strength
``eta`` and a hard collision ``radius``. Queries return true Euclidean distances: FAISS' L2 metric
is squared, and its batched search computes ``|x|^2 + |o|^2 - 2 x.o``, which cancels when D is
much smaller than |x|; so candidates are searched with a safety margin and their distances are
recomputed from the differences ``x - o`` in float64.

An obstacle set records the C-space of its embeddings (:attr:`ObstacleSet.space`, a
:class:`cspace.models.space.Space`: encoder, config hash, weights fingerprint, image size,
channels, latent shape, d), or None for an unknown space (embeddings from elsewhere, sets saved
before spaces were recorded), which every space check accepts. :meth:`ObstacleSet.check_space`
refuses another space with an error naming both.

On disk a set is a folder in cspace's safe-folder format (:mod:`cspace.io.folder`); each
payload file is stored under a name carrying its checksum (``embeddings-<hash>.safetensors``)::

    manifest.json          format "cspace.obstacles", format_version 3, the stored name, size
                           and SHA-256 of each file, d, count, metric, next_id, revision, space,
                           saved
    embeddings.safetensors embeddings (float32, (count, d)): the vectors of the exact
                           IndexFlatL2, rebuilt on load
    metadata.safetensors   ids (int64), q_star, eta, radius (float64), each (count,)
    records.json           labels, sources, history (the earlier Q*, eta and radius of each
                           revision)

Saves are crash-safe and serialised: payload files are immutable and the manifest is replaced
last, under a writers' lock, so a reader sees the previous set or the new one whatever moment a
writer dies at and however many writers run; files in the folder that are not the set's
(images kept beside it) are kept. :meth:`ObstacleSet.load` treats the folder as untrusted: it
checks format and version, each file (a regular file, its size before reading it, its SHA-256),
the type and range of every manifest and records field, each safetensors header against the
file size and the exact tensors expected (before ``safetensors`` parses it), and that the
embeddings are finite; FAISS' deserialiser never sees a file, and nothing is unpickled. Sets of
format_version 2 (``index.faiss``) and 1 (labels, sources and history in the manifest, no
space) still load (:mod:`cspace.io.legacy`: their index is parsed field by field, never
deserialised by FAISS); :func:`cspace.io.folder.migrate_folder` rewrites one in version 3.

Sources are strings (usually image paths), stored exactly as they were given (a path typed
relative to the working folder stays relative; nothing is resolved to an absolute path, so a set
does not record the machine's folder layout).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from cspace.io.errors import FolderError
from cspace.io.folder import (
    FolderKind,
    check_int,
    check_number,
    check_str,
    check_str_list,
    is_folder_of,
    read_folder,
    write_folder,
)
from cspace.io.legacy import OBSTACLES_V1, OBSTACLES_V2
from cspace.io.untrusted import MAX_COUNT, MAX_DIM, FormatError, check_safetensors
from cspace.models.space import Space, check_same_space

__all__ = ["FORMAT", "FORMAT_VERSION", "KIND", "ObstacleSet", "ObstacleSetError"]

FORMAT = "cspace.obstacles"
FORMAT_VERSION = 3
_EMB_FILE = "embeddings.safetensors"
_META_FILE = "metadata.safetensors"
_RECORDS = "records.json"
_EPS32 = float(np.finfo(np.float32).eps)
_MAX_ID = 2**62  # ids and revisions: int64 with room to grow


class ObstacleSetError(FolderError):
    """A bad obstacle set: invalid input, or a file that is corrupt, foreign or mismatched."""


#: the obstacle set's folder kind (:mod:`cspace.io.folder`)
KIND = FolderKind(
    format=FORMAT,
    version=FORMAT_VERSION,
    what="obstacle-set",
    a_what="an obstacle set",
    error=ObstacleSetError,
    files=(_EMB_FILE, _META_FILE, _RECORDS),
    fix="rebuild the set (cspace obstacles build) or restore the folder from a copy",
    legacy=(OBSTACLES_V1, OBSTACLES_V2),
)


def _per_obstacle(value, n: int, name: str, *, positive: bool) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ObstacleSetError(
            f"{name} must be a number or have shape ({n},); got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ObstacleSetError(f"{name} must be finite; got {arr[~np.isfinite(arr)][:3].tolist()}")
    bad = arr <= 0 if positive else arr < 0
    if np.any(bad):
        rel = "> 0" if positive else ">= 0"
        raise ObstacleSetError(
            f"{name} must be {rel}; got {arr[bad][:3].tolist()} (fix: pass {name} {rel})"
        )
    return arr


def _strings(value, n: int, name: str, default: str) -> list[str]:
    if value is None:
        return [default] * n
    if isinstance(value, str):
        return [value] * n
    out = [str(v) for v in value]
    if len(out) != n:
        raise ObstacleSetError(
            f"{name} must be a string or a sequence of {n} strings; got {len(out)}"
        )
    return out


def is_obstacle_set(path: str | os.PathLike) -> bool:
    """Whether the folder holds a manifest.json written by :meth:`ObstacleSet.save` (any
    version; not verified)."""
    return is_folder_of(path, KIND)


class ObstacleSet:
    """A set of obstacles in an embedding space of dimension ``dim``.

    Build one with :meth:`from_embeddings`; grow and shrink it with :meth:`add` and
    :meth:`remove`; query it with :meth:`knn` and :meth:`within`; persist it with :meth:`save`
    and :meth:`load`. ``space``: the C-space of the embeddings (None: unknown).
    """

    def __init__(self, dim: int, space: Space | None = None) -> None:
        if int(dim) < 1:
            raise ObstacleSetError(f"dim must be >= 1; got {dim}")
        self.index = faiss.IndexFlatL2(int(dim))
        self.space = space
        self._ids = np.zeros(0, dtype=np.int64)
        self._q_star = np.zeros(0)
        self._eta = np.zeros(0)
        self._radius = np.zeros(0)
        self._labels: list[str] = []
        self._sources: list[str] = []
        self._next_id = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_embeddings(
        cls,
        embeddings,
        *,
        q_star,
        eta=1.0,
        radius=0.0,
        labels: str | Sequence[str] | None = None,
        sources: str | Sequence[str] | None = None,
        space: Space | None = None,
    ) -> ObstacleSet:
        """A new set from ``embeddings`` (N, d), N >= 1.

        ``q_star`` (> 0), ``eta`` (>= 0) and ``radius`` (>= 0, the hard collision radius) are
        numbers or (N,) arrays; ``labels``/``sources`` are strings or N strings; ``space`` the
        C-space the embeddings come from (None: unknown).
        """
        emb = cls._check_embeddings(embeddings, None)
        if emb.shape[0] == 0:
            raise ObstacleSetError(
                "empty obstacle set: from_embeddings needs at least one embedding"
            )
        out = cls(emb.shape[1], space=space)
        out.add(emb, q_star=q_star, eta=eta, radius=radius, labels=labels, sources=sources)
        return out

    @staticmethod
    def _check_embeddings(embeddings, dim: int | None) -> np.ndarray:
        arr = np.asarray(embeddings)
        if arr.ndim != 2:
            raise ObstacleSetError(f"embeddings must be a 2-D array (N, d); got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ObstacleSetError(f"embeddings must be real numbers; got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ObstacleSetError("embeddings contain NaN or Inf; remove or fix those rows")
        with np.errstate(over="ignore"):
            arr32 = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr32)):
            raise ObstacleSetError("embeddings overflow float32 (|value| > 3.4e38); rescale them")
        if dim is not None and arr32.shape[1] != dim:
            raise ObstacleSetError(
                f"dimension mismatch: embeddings have d={arr32.shape[1]} but this obstacle set has d={dim}"
            )
        return arr32

    def add(
        self,
        embeddings,
        *,
        q_star,
        eta=1.0,
        radius=0.0,
        labels: str | Sequence[str] | None = None,
        sources: str | Sequence[str] | None = None,
    ) -> np.ndarray:
        """Add obstacles; returns their new ids (int64). All-or-nothing: bad input adds nothing."""
        emb = self._check_embeddings(embeddings, self.dim)
        n = emb.shape[0]
        q = _per_obstacle(q_star, n, "q_star", positive=True)
        e = _per_obstacle(eta, n, "eta", positive=False)
        r = _per_obstacle(radius, n, "radius", positive=False)
        lab = _strings(labels, n, "labels", "")
        src = _strings(sources, n, "sources", "")
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self.index.add(emb)
        self._ids = np.concatenate([self._ids, ids])
        self._q_star = np.concatenate([self._q_star, q])
        self._eta = np.concatenate([self._eta, e])
        self._radius = np.concatenate([self._radius, r])
        self._labels += lab
        self._sources += src
        self._next_id += n
        return ids

    def remove(self, ids) -> int:
        """Remove the obstacles with these ids; returns how many were removed.

        Unknown ids raise :class:`ObstacleSetError` and remove nothing.
        """
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        unknown = np.setdiff1d(ids, self._ids)
        if unknown.size:
            raise ObstacleSetError(f"unknown obstacle ids {unknown[:5].tolist()}; nothing removed")
        drop = np.isin(self._ids, ids)
        positions = np.flatnonzero(drop).astype(np.int64)
        self.index.remove_ids(faiss.IDSelectorBatch(positions))
        keep = ~drop
        self._ids, self._q_star = self._ids[keep], self._q_star[keep]
        self._eta, self._radius = self._eta[keep], self._radius[keep]
        self._labels = [s for s, k in zip(self._labels, keep, strict=True) if k]
        self._sources = [s for s, k in zip(self._sources, keep, strict=True) if k]
        return int(drop.sum())

    # ------------------------------------------------------------------ accessors
    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        labels = sorted(set(self._labels))
        return f"ObstacleSet(count={len(self)}, dim={self.dim}, labels={labels[:5]})"

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def space(self) -> Space | None:
        """The C-space of the embeddings (:class:`cspace.models.space.Space`); None: unknown.

        Settable (e.g. to record the space of a set saved before spaces were recorded); the
        space's d must be the set's.
        """
        return self._space

    @space.setter
    def space(self, value: Space | None) -> None:
        if value is not None:
            if not isinstance(value, Space):
                raise ObstacleSetError(
                    f"space must be a cspace.models.space.Space or None; got {type(value).__name__}"
                )
            if value.dim != self.dim:
                raise ObstacleSetError(
                    f"dimension mismatch: the space {value.describe()} has d={value.dim} but "
                    f"this obstacle set has d={self.dim}"
                )
        self._space = value

    def check_space(self, other: Space | None, what: str, fix: str = "") -> None:
        """Raise :class:`cspace.models.space.SpaceMismatchError` (naming both spaces) when
        ``other`` (the space of ``what``: an encoder, a flow, a field) is not this set's space;
        an unknown space (None) on either side passes."""
        check_same_space(self.space, other, "the obstacle set", what, fix)

    @property
    def embeddings(self) -> np.ndarray:
        """(N, d) float32 copy of the embeddings, in id order of insertion."""
        if len(self) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.index.reconstruct_n(0, len(self))

    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    @property
    def q_star(self) -> np.ndarray:
        return self._q_star.copy()

    @property
    def eta(self) -> np.ndarray:
        return self._eta.copy()

    @property
    def radius(self) -> np.ndarray:
        return self._radius.copy()

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    def set_parameters(self, *, q_star=None, eta=None, radius=None, note: str = "") -> None:
        """Replace Q*, eta and/or the hard radius (numbers or (N,) arrays), keeping the old
        values in :attr:`history` (saved with the set)."""
        n = len(self)
        new = {
            "q_star": None if q_star is None else _per_obstacle(q_star, n, "q_star", positive=True),
            "eta": None if eta is None else _per_obstacle(eta, n, "eta", positive=False),
            "radius": None
            if radius is None
            else _per_obstacle(radius, n, "radius", positive=False),
        }
        self.history.append(
            {
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "note": note,
                "ids": self._ids.tolist(),
                "q_star": self._q_star.tolist(),
                "eta": self._eta.tolist(),
                "radius": self._radius.tolist(),
            }
        )
        if new["q_star"] is not None:
            self._q_star = new["q_star"]
        if new["eta"] is not None:
            self._eta = new["eta"]
        if new["radius"] is not None:
            self._radius = new["radius"]

    # ------------------------------------------------------------------ queries
    def _queries(self, queries) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ObstacleSetError(
                f"dimension mismatch: queries have shape {q.shape} but this obstacle set has d={self.dim}"
            )
        if not np.all(np.isfinite(q)):
            raise ObstacleSetError("queries contain NaN or Inf")
        return q

    def _slack(self, q: np.ndarray, r2: float) -> float:
        """A bound on the rounding error of FAISS' squared distances (float32 expansion)."""
        emb = self.embeddings  # float32; the norms summed in float64 without a float64 copy
        onorm2 = float(np.max(np.einsum("nd,nd->n", emb, emb, dtype=np.float64)))
        qnorm2 = float(np.max(np.einsum("bd,bd->b", q, q)))
        return 16 * _EPS32 * (qnorm2 + onorm2 + r2) * np.sqrt(self.dim)

    def _exact(self, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Distances from queries (B, d) to the obstacles at ``positions`` (B, k), from differences."""
        diff = q[:, None, :] - self.embeddings[np.clip(positions, 0, None)].astype(np.float64)
        return np.sqrt(np.einsum("bkd,bkd->bk", diff, diff))

    def knn(self, queries, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest obstacles of each query (B, d) or (d,).

        Returns ``(distances, ids)``, both (B, k), sorted by true Euclidean distance (float64);
        where fewer than k obstacles exist the rest are ``inf`` and ``-1``.
        """
        if int(k) < 1:
            raise ObstacleSetError(f"k must be >= 1; got {k}")
        q = self._queries(queries)
        b, n = q.shape[0], len(self)
        dist = np.full((b, k), np.inf)
        ids = np.full((b, k), -1, dtype=np.int64)
        if n == 0:
            return dist, ids
        ks = min(n, k + 16)  # a margin of extra candidates, re-ranked on exact distances
        approx, pos = self.index.search(q.astype(np.float32), ks)
        exact = np.where(pos >= 0, self._exact(q, pos), np.inf)
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        if ks < n:
            # Obstacles FAISS did not return are certainly farther than the k-th candidate only
            # if FAISS' ks-th squared distance exceeds it by more than its rounding error; rows
            # where that fails (large common offsets) are re-ranked on all exact distances.
            kth = np.take_along_axis(exact, order[:, -1:], 1)[:, 0]
            slack = self._slack(q, float(np.max(kth)) ** 2)
            redo = np.flatnonzero(approx[:, -1] - slack <= kth**2)
            emb64 = self.embeddings.astype(np.float64) if redo.size else None
            for i in redo:
                d_all = np.sqrt(((q[i][None] - emb64) ** 2).sum(-1))
                pos[i, :k] = np.argsort(d_all, kind="stable")[:k]
                exact[i, :k] = d_all[pos[i, :k]]
                order[i] = np.arange(k)
        kk = order.shape[1]
        dist[:, :kk] = np.take_along_axis(exact, order, 1)
        p = np.take_along_axis(pos, order, 1)
        ids[:, :kk] = np.where(p >= 0, self._ids[np.clip(p, 0, None)], -1)
        return dist, ids

    def within(self, queries, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Obstacles strictly closer than ``radius`` to each query.

        Returns one ``(ids, distances)`` pair per query, sorted by true distance (float64).
        FAISS' range search is run on the squared radius plus a margin for the rounding of its
        ``|x|^2 + |o|^2 - 2 x.o`` expansion, and the candidates are filtered on exact distances.
        """
        r = float(radius)
        if not np.isfinite(r) or r <= 0:
            raise ObstacleSetError(f"radius must be a finite number > 0; got {radius}")
        q = self._queries(queries)
        if len(self) == 0:
            return [(np.zeros(0, np.int64), np.zeros(0)) for _ in range(q.shape[0])]
        margin = self._slack(q, r * r)
        lims, _, pos = self.index.range_search(q.astype(np.float32), r * r + margin)
        out = []
        for i in range(q.shape[0]):
            p = pos[lims[i] : lims[i + 1]]
            d = np.sqrt(((q[i][None] - self.embeddings[p].astype(np.float64)) ** 2).sum(-1))
            keep = d < r
            p, d = p[keep], d[keep]
            o = np.argsort(d, kind="stable")
            out.append((self._ids[p[o]], d[o]))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the set to the folder ``path``; returns the path.

        Crash-safe and safe with concurrent readers and writers (:mod:`cspace.io.folder`):
        readers see the previous set or this one, whatever moment the save is interrupted at.
        An existing folder is replaced only if it is an obstacle set or empty; anything else
        raises rather than being overwritten. Other files inside an existing set's folder
        (images kept beside it) are kept. Sources are stored as given (module docstring).
        """
        path = Path(path)
        emb_bytes = _st_save({"embeddings": np.ascontiguousarray(self.embeddings, np.float32)})
        meta_bytes = _st_save(
            {
                "ids": self._ids,
                "q_star": self._q_star.astype(np.float64),
                "eta": self._eta.astype(np.float64),
                "radius": self._radius.astype(np.float64),
            }
        )
        records = {
            "labels": self._labels,
            "sources": self._sources,
            "history": self.history,
        }
        fields = {
            "dim": self.dim,
            "count": len(self),
            "metric": "l2",
            "next_id": int(self._next_id),
            "revision": len(self.history),  # one more at every set_parameters
            "space": None if self.space is None else self.space.to_json(),
        }
        payload = {
            _EMB_FILE: emb_bytes,
            _META_FILE: meta_bytes,
            _RECORDS: json.dumps(records, indent=0).encode(),
        }
        return write_folder(path, KIND, fields, payload)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_dim: int | None = None) -> ObstacleSet:
        """Read a set written by :meth:`save` (or by an older cspace), verifying everything; see
        the module docstring.

        ``expected_dim`` (optional) is the embedding dimension the caller needs. Raises
        :class:`ObstacleSetError` naming the file and the field for anything that is not such
        a set (memory used: a few times the set's size on disk, whatever its files declare).
        """
        folder = read_folder(path, KIND)
        path, mpath, manifest = folder.path, folder.mpath, folder.manifest
        dim = check_int(folder.get("dim"), "dim", mpath, KIND, 1, MAX_DIM)
        count = check_int(folder.get("count"), "count", mpath, KIND, 0, MAX_COUNT)
        metric = folder.get("metric")
        if metric != "l2":
            raise KIND.fail(
                f"{mpath}: field 'metric' is {metric!r:.40}; obstacle sets use Euclidean "
                "distances ('l2')",
                mpath,
            )
        if expected_dim is not None and dim != int(expected_dim):
            raise ObstacleSetError(
                f"dimension mismatch: {path} holds d={dim} embeddings but d={expected_dim} was expected",
                path,
            )
        if "revision" in manifest:
            check_int(manifest["revision"], "revision", mpath, KIND, 0, _MAX_ID)
        try:
            space = Space.from_json(manifest.get("space"))
        except ValueError as err:
            raise ObstacleSetError(f"{mpath}: bad space record: {err}", mpath) from err
        if space is not None and space.dim != dim:
            raise ObstacleSetError(
                f"{mpath}: the recorded space has d={space.dim} but the set has d={dim}", mpath
            )
        emb = _tensors(folder, _EMB_FILE, {"embeddings": ("F32", (count, dim))})["embeddings"]
        if not np.all(np.isfinite(emb)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(emb), axis=1))[0])
            raise ObstacleSetError(
                f"{folder.file(_EMB_FILE)}: embedding {bad} holds NaN or Inf (a corrupt or "
                "crafted set)",
                folder.file(_EMB_FILE),
            )
        meta = _tensors(
            folder,
            _META_FILE,
            {
                "ids": ("I64", (count,)),
                "q_star": ("F64", (count,)),
                "eta": ("F64", (count,)),
                "radius": ("F64", (count,)),
            },
        )
        labels, sources, history = _records(folder, count)
        ids = meta["ids"].astype(np.int64)
        default_next = int(ids.max(initial=-1)) + 1
        next_id = check_int(
            manifest.get("next_id", default_next), "next_id", mpath, KIND, 0, _MAX_ID
        )
        if np.unique(ids).size != count or (count and (ids.min() < 0 or ids.max() >= next_id)):
            raise ObstacleSetError(
                f"{path}: obstacle ids are duplicated, negative or not below next_id={next_id}",
                path,
            )
        where = folder.file(_META_FILE)
        try:
            q_star = _per_obstacle(meta["q_star"], count, "q_star", positive=True)
            eta = _per_obstacle(meta["eta"], count, "eta", positive=False)
            radius = _per_obstacle(meta["radius"], count, "radius", positive=False)
        except ObstacleSetError as err:
            raise ObstacleSetError(f"{where}: {err}", where) from None
        out = cls(dim, space=space)
        out.index.add(np.ascontiguousarray(emb, dtype=np.float32))
        out._ids = ids
        out._q_star, out._eta, out._radius = q_star, eta, radius
        out._labels, out._sources = labels, sources
        out._next_id = next_id
        out.history = history
        return out


def _tensors(folder, name: str, expected: dict) -> dict[str, np.ndarray]:
    """The tensors of the safetensors payload ``name``, its header validated against
    ``expected`` (name -> (dtype, shape)) and the file size before safetensors parses it."""
    where = folder.file(name)
    data = folder.files[name]
    try:
        check_safetensors(data, expected)
        return _st_load(data)
    except FormatError as err:
        raise ObstacleSetError(
            f"{where} is not a readable safetensors file of this set: {err}", where
        ) from None
    except Exception as err:  # pragma: no cover - safetensors' own checks, after ours
        raise ObstacleSetError(f"{where} is not a readable safetensors file: {err}", where) from err


_HISTORY_LISTS = ("ids", "q_star", "eta", "radius")


def _records(folder, count: int) -> tuple[list[str], list[str], list[dict]]:
    """Labels, sources and history from records.json, every field's type checked."""
    where = folder.file(_RECORDS)
    records = folder.json(_RECORDS)
    if not isinstance(records, dict):
        raise ObstacleSetError(
            f"{where} is a JSON {type(records).__name__}, not an object of labels, sources and "
            "history",
            where,
        )
    for key in ("labels", "sources"):
        if key not in records:
            raise ObstacleSetError(f"{where} lacks a required field: {key!r}", where)
    labels = check_str_list(records["labels"], "labels", where, KIND, count)
    sources = check_str_list(records["sources"], "sources", where, KIND, count)
    history = records.get("history", [])
    if not isinstance(history, list):
        raise ObstacleSetError(
            f"{where}: field 'history' must be a list of revisions; got {type(history).__name__}",
            where,
        )
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise ObstacleSetError(
                f"{where}: history[{i}] must be an object; got {type(entry).__name__}", where
            )
        for key in ("time", "note"):
            if key in entry:
                check_str(entry[key], f"history[{i}].{key}", where, KIND)
        sizes = set()
        for key in _HISTORY_LISTS:
            if key not in entry:
                continue
            values = entry[key]
            if not isinstance(values, list):
                raise ObstacleSetError(
                    f"{where}: history[{i}].{key} must be a list; got {type(values).__name__}",
                    where,
                )
            for j, v in enumerate(values):
                if key == "ids":
                    check_int(v, f"history[{i}].ids[{j}]", where, KIND, 0, _MAX_ID)
                else:
                    check_number(v, f"history[{i}].{key}[{j}]", where, KIND)
            sizes.add(len(values))
        if len(sizes) > 1:
            raise ObstacleSetError(
                f"{where}: the lists of history[{i}] have different lengths {sorted(sizes)}",
                where,
            )
    return labels, sources, history
