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

On disk a set is a folder in cspace's safe-folder format (:mod:`cspace.io.folder`)::

    manifest.json          format "cspace.obstacles", format_version 2, size and SHA-256 of each
                           file, d, count, metric, next_id, revision, space, saved
    index.faiss            the FAISS index (faiss.serialize_index)
    metadata.safetensors   ids (int64), q_star, eta, radius (float64)
    records.json           labels, sources, history (the earlier Q*, eta and radius of each
                           revision)

It is written to a temporary folder and swapped in with ``os.replace``, so an interrupted save
leaves the previous set intact; files in the folder that are not the set's (images kept beside
it) are kept. :meth:`ObstacleSet.load` checks format, version, sizes, SHA-256 checksums,
dimension and count, and never unpickles anything. Sets of format_version 1 (labels, sources and
history in the manifest, no space) still load, with ``space = None``
(:mod:`cspace.io.legacy`).

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
from cspace.io.folder import FolderKind, is_folder_of, read_folder, write_folder
from cspace.io.legacy import OBSTACLES_V1
from cspace.models.space import Space, check_same_space

__all__ = ["FORMAT", "FORMAT_VERSION", "KIND", "ObstacleSet", "ObstacleSetError"]

FORMAT = "cspace.obstacles"
FORMAT_VERSION = 2
_INDEX_FILE = "index.faiss"
_META_FILE = "metadata.safetensors"
_RECORDS = "records.json"
_EPS32 = float(np.finfo(np.float32).eps)


class ObstacleSetError(FolderError):
    """A bad obstacle set: invalid input, or a file that is corrupt, foreign or mismatched."""


#: the obstacle set's folder kind (:mod:`cspace.io.folder`)
KIND = FolderKind(
    format=FORMAT,
    version=FORMAT_VERSION,
    what="obstacle-set",
    a_what="an obstacle set",
    error=ObstacleSetError,
    files=(_INDEX_FILE, _META_FILE, _RECORDS),
    fix="rebuild the set (cspace obstacles build) or restore the folder from a copy",
    legacy=(OBSTACLES_V1,),
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
        """Write the set to the folder ``path`` atomically; returns the path.

        An existing folder is replaced only if it is an obstacle set or empty; anything else
        raises rather than being overwritten. Other files inside an existing set's folder
        (images kept beside it) are kept. Sources are stored as given (module docstring).
        """
        path = Path(path)
        index_bytes = faiss.serialize_index(self.index).tobytes()
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
            _INDEX_FILE: index_bytes,
            _META_FILE: meta_bytes,
            _RECORDS: json.dumps(records, indent=0).encode(),
        }
        return write_folder(path, KIND, fields, payload)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_dim: int | None = None) -> ObstacleSet:
        """Read a set written by :meth:`save` (or a version-1 set), verifying everything; see
        the module docstring.

        ``expected_dim`` (optional) is the embedding dimension the caller needs.
        """
        folder = read_folder(path, KIND)
        path, mpath, manifest = folder.path, folder.mpath, folder.manifest
        try:
            dim, count = int(manifest["dim"]), int(manifest["count"])
        except (KeyError, TypeError, ValueError) as err:
            raise ObstacleSetError(f"{mpath} lacks a required field: {err}", mpath) from err
        if expected_dim is not None and dim != int(expected_dim):
            raise ObstacleSetError(
                f"dimension mismatch: {path} holds d={dim} embeddings but d={expected_dim} was expected",
                path,
            )
        records = folder.json(_RECORDS)
        try:
            labels, sources = list(records["labels"]), list(records["sources"])
            history = list(records.get("history", []))
        except (KeyError, TypeError, AttributeError) as err:
            raise ObstacleSetError(
                f"{path / _RECORDS} lacks a required field: {err}", path / _RECORDS
            ) from err
        try:
            space = Space.from_json(manifest.get("space"))
        except ValueError as err:
            raise ObstacleSetError(f"{mpath}: bad space record: {err}", mpath) from err
        try:
            index = faiss.deserialize_index(
                np.frombuffer(folder.files[_INDEX_FILE], dtype=np.uint8)
            )
        except RuntimeError as err:
            raise ObstacleSetError(
                f"{path / _INDEX_FILE} is not a readable FAISS index: {err}", path / _INDEX_FILE
            ) from err
        if not isinstance(index, faiss.IndexFlatL2):
            raise ObstacleSetError(
                f"{path / _INDEX_FILE} holds a {type(index).__name__}, not an IndexFlatL2",
                path / _INDEX_FILE,
            )
        if index.d != dim or index.ntotal != count:
            raise ObstacleSetError(
                f"{path}: index has d={index.d}, count={index.ntotal} but the manifest says d={dim}, count={count}",
                path,
            )
        try:
            meta = _st_load(folder.files[_META_FILE])
        except Exception as err:  # safetensors raises its own error type
            raise ObstacleSetError(
                f"{path / _META_FILE} is not a readable safetensors file: {err}", path / _META_FILE
            ) from err
        for key in ("ids", "q_star", "eta", "radius"):
            if key not in meta or meta[key].shape != (count,):
                raise ObstacleSetError(
                    f"{path / _META_FILE}: {key!r} missing or not of shape ({count},)",
                    path / _META_FILE,
                )
        if len(labels) != count or len(sources) != count:
            raise ObstacleSetError(
                f"{path / _RECORDS}: labels/sources do not have {count} entries", path / _RECORDS
            )
        ids = meta["ids"].astype(np.int64)
        try:
            next_id = int(manifest.get("next_id", int(ids.max(initial=-1)) + 1))
        except (TypeError, ValueError) as err:
            raise ObstacleSetError(f"{mpath}: next_id is not an integer: {err}", mpath) from err
        if np.unique(ids).size != count or (count and (ids.min() < 0 or ids.max() >= next_id)):
            raise ObstacleSetError(
                f"{path}: obstacle ids are duplicated, negative or not below next_id={next_id}",
                path,
            )
        if space is not None and space.dim != dim:
            raise ObstacleSetError(
                f"{mpath}: the recorded space has d={space.dim} but the set has d={dim}", mpath
            )
        out = cls(dim, space=space)
        out.index = index
        out._ids = ids
        out._q_star = _per_obstacle(meta["q_star"], count, "q_star", positive=True)
        out._eta = _per_obstacle(meta["eta"], count, "eta", positive=False)
        out._radius = _per_obstacle(meta["radius"], count, "radius", positive=False)
        out._labels, out._sources = [str(s) for s in labels], [str(s) for s in sources]
        out._next_id = next_id
        out.history = history
        return out
