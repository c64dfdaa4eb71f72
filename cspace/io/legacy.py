"""The layouts cspace wrote before the current safe-folder format, and their readers.

Every reader here returns a :class:`cspace.io.folder.Folder` in the *current* layout of its
kind (verified, with the kind's current ``format_version``), so each kind decodes one layout.
:func:`cspace.io.folder.read_folder` picks the reader; :func:`cspace.io.folder.migrate_folder`
rewrites an old folder in the current format (same payload bytes; an old obstacle set's
``index.faiss`` becomes the ``embeddings.safetensors`` of its vectors). The old layouts:

=====================  ====================================================  ==================
layout                 files, and how a folder is recognised                 checks kept
=====================  ====================================================  ==================
every kind, v2         ``manifest.json`` (``format_version`` 2): the         size and SHA-256
                       payload files under their plain names                 of every file
                       (``model.safetensors``), not content-addressed
obstacle set v2        ``manifest.json`` (``format_version`` 2),             size and SHA-256;
                       ``index.faiss`` (a serialised ``IndexFlatL2``),       the index parsed
                       ``metadata.safetensors``, ``records.json``            field by field
obstacle set v1        ``manifest.json`` (format ``cspace.obstacles``,       as v2
                       ``format_version`` 1; labels, sources and history
                       in the manifest), ``index.faiss``,
                       ``metadata.safetensors``
classifier v1          ``manifest.json`` (format ``cspace.classifier``,      size and SHA-256
                       ``format_version`` 1), ``classifier.safetensors``
flow v1                ``config.json`` (format ``cspace-flow``,              size and SHA-256
                       ``format_version`` 1, a ``files`` table),             (the ``files``
                       ``model.safetensors``; no ``manifest.json``           table)
VAE v2 and v3          ``manifest.json`` (``format_version`` 2 or 3), one    size and SHA-256
                       ``model.safetensors`` (``vae.*`` and the projection)
VAE v1                 ``config.json`` (format ``cspace-aligned-vae``,       SHA-256 when
                       optional ``model_sha256``), ``model.safetensors``;    ``model_sha256``
                       no ``manifest.json``                                  is present
teacher v1             ``config.json`` (format ``cspace-digits-teacher``),   none (the old
                       ``model.safetensors``; no ``manifest.json``           writer kept none)
=====================  ====================================================  ==================

An old manifest (v1, v2) is told apart by its ``format_version``; an old layout without a
manifest by a ``config.json`` and no ``manifest.json`` (its ``format`` is then checked). The
``index.faiss`` of an old obstacle set is never given to FAISS' deserialiser: its header is
parsed and checked against the manifest's ``dim`` and ``count`` and the file's size
(:func:`cspace.io.untrusted.read_faiss_flat_l2`), and the set is rebuilt from its vectors. The
model kinds' legacy folders without their weights file raise the kind's *missing* error
(:class:`~cspace.io.errors.MissingWeightsError`), as the old readers did. Obstacle sets and
classifiers of v1 record no C-space: they load with ``space = None`` ("unknown", accepted by
every space check; see :mod:`cspace.models.space`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.numpy import save as _st_save

from cspace.io.files import sha256_hex
from cspace.io.folder import (
    MANIFEST,
    Folder,
    FolderKind,
    Legacy,
    check_int,
    read_json_file,
    read_regular_file,
    verify_files,
)
from cspace.io.untrusted import (
    MAX_COUNT,
    MAX_DIM,
    FormatError,
    check_safetensors,
    read_faiss_flat_l2,
)

__all__ = [
    "CLASSIFIER_V1",
    "FLOW_V1",
    "OBSTACLES_V1",
    "OBSTACLES_V2",
    "TEACHER_V1",
    "VAE_PROJECTION_FILE",
    "VAE_STATE_FILE",
    "VAE_V1",
    "VAE_V2",
    "VAE_V3",
    "manifest_v2",
    "split_vae_weights",
]

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_INDEX = "index.faiss"
_EMBEDDINGS = "embeddings.safetensors"
_RECORDS = "records.json"


def _has_config(path: Path) -> bool:
    return (path / _CONFIG).is_file() and not (path / MANIFEST).exists()


def _config(path: Path, kind: FolderKind, old_format: str, noun: str) -> dict[str, Any]:
    cpath = path / _CONFIG
    config = read_json_file(cpath, kind)
    if not isinstance(config, dict) or config.get("format") != old_format:
        raise kind.error(f"{cpath} is not a cspace {noun} config (format {old_format})", cpath)
    return config


def _current(
    path: Path,
    kind: FolderKind,
    fields: dict,
    files: dict[str, bytes],
    name: str,
    stored: dict[str, str] | None = None,
) -> Folder:
    manifest = {
        "format": kind.format,
        "format_version": kind.version,
        **fields,
        "files": {n: {"bytes": len(b), "sha256": sha256_hex(b)} for n, b in files.items()},
    }
    return Folder(path, manifest, files, kind, legacy=name, stored=dict(stored or {}))


def _weights(path: Path, kind: FolderKind) -> bytes:
    wpath = path / _WEIGHTS
    if not wpath.is_file() and not wpath.is_symlink():
        raise kind.absent(path, f"{wpath} is missing")
    return read_regular_file(wpath, None, kind)


# ---------------------------------------------------------------------- obstacle sets, v1 and v2
def _embeddings_of_index(folder: Folder, kind: FolderKind) -> bytes:
    """The embeddings of an obstacle set's ``index.faiss`` as ``embeddings.safetensors``
    (one float32 tensor (count, dim)), parsed by :func:`cspace.io.untrusted.read_faiss_flat_l2`:
    every header field checked against the manifest and the file size before the codes are
    read; FAISS' deserialiser never sees the file."""
    mpath, ipath = folder.mpath, folder.file(_INDEX)
    dim = check_int(folder.get("dim"), "dim", mpath, kind, 1, MAX_DIM)
    count = check_int(folder.get("count"), "count", mpath, kind, 0, MAX_COUNT)
    try:
        codes = read_faiss_flat_l2(folder.files[_INDEX], dim, count)
    except FormatError as err:
        raise kind.fail(f"{ipath} {err}", ipath) from None
    return _st_save({"embeddings": codes})


def _obstacles_v2(folder: Folder, kind: FolderKind) -> Folder:
    """v2 stored the exact ``faiss.IndexFlatL2`` (``index.faiss``); v3 stores its vectors."""
    files = {n: b for n, b in folder.files.items() if n != _INDEX}
    files[_EMBEDDINGS] = _embeddings_of_index(folder, kind)
    stored = {**folder.stored, _EMBEDDINGS: folder.stored.get(_INDEX, _INDEX)}
    return _current(folder.path, kind, folder.fields, files, "cspace.obstacles v2", stored)


def _obstacles_v1(folder: Folder, kind: FolderKind) -> Folder:
    """v1 kept labels, sources and history in the manifest; v2 keeps them in records.json."""
    labels, sources = folder.require("labels", "sources")
    records = {"labels": labels, "sources": sources, "history": folder.manifest.get("history", [])}
    moved = ("labels", "sources", "history")
    manifest = {k: v for k, v in folder.manifest.items() if k not in moved}
    files = {**folder.files, _RECORDS: json.dumps(records).encode()}
    v2 = Folder(folder.path, manifest, files, kind, stored=folder.stored)
    out = _obstacles_v2(v2, kind)
    out.legacy = "cspace.obstacles v1"
    out.stored[_RECORDS] = MANIFEST
    return out


OBSTACLES_V1 = Legacy(
    name="cspace.obstacles v1",
    files=(MANIFEST, _INDEX, "metadata.safetensors"),
    read=_obstacles_v1,
    version=1,
)

OBSTACLES_V2 = Legacy(
    name="cspace.obstacles v2",
    files=(MANIFEST, _INDEX, "metadata.safetensors", _RECORDS),
    read=_obstacles_v2,
    version=2,
)


# ---------------------------------------------------------------------- every kind, v2
def _same_payload(folder: Folder, kind: FolderKind) -> Folder:
    """A v2 manifest: the current payload under plain file names."""
    name = f"{kind.format} v2"
    return _current(folder.path, kind, folder.fields, folder.files, name, folder.stored)


def manifest_v2(files: tuple[str, ...]) -> Legacy:
    """The layout of ``format_version`` 2 of a kind whose payload did not change in version 3
    (classifiers, flows, VAEs, teachers): the payload ``files`` under their plain names."""
    return Legacy(name="manifest v2", files=(MANIFEST, *files), read=_same_payload, version=2)


# ---------------------------------------------------------------------- classifiers, v1
def _classifier_v1(folder: Folder, kind: FolderKind) -> Folder:
    """v1 is v2 without the ``space`` field."""
    return _current(folder.path, kind, folder.fields, folder.files, "cspace.classifier v1")


CLASSIFIER_V1 = Legacy(
    name="cspace.classifier v1",
    files=(MANIFEST, "classifier.safetensors"),
    read=_classifier_v1,
    version=1,
)


# ---------------------------------------------------------------------- flows, v1
def _flow_v1(path: Path, kind: FolderKind) -> Folder:
    """config.json (format cspace-flow v1: config, parameters, meta, files) + model.safetensors."""
    if not (path / _WEIGHTS).is_file():
        raise kind.absent(path, f"{path / _WEIGHTS} is missing")
    config = _config(path, kind, "cspace-flow", "flow")
    version = config.get("format_version")
    if version != 1:
        raise kind.error(
            f"{path / _CONFIG} has format_version {version!r}; the config.json layout of flows "
            "has version 1 only (newer flows have a manifest.json)",
            path / _CONFIG,
        )
    files = verify_files(path, config.get("files"), kind, where=_CONFIG)
    if _WEIGHTS not in files:
        raise kind.fail(f"{path / _CONFIG} does not list {_WEIGHTS}", path / _CONFIG)
    fields = {k: v for k, v in config.items() if k not in ("format", "format_version", "files")}
    return _current(path, kind, fields, files, "cspace-flow v1 (config.json)")


FLOW_V1 = Legacy(
    name="cspace-flow v1 (config.json)",
    files=(_CONFIG, _WEIGHTS),
    read=_flow_v1,
    detect=_has_config,
)


# ---------------------------------------------------------------------- VAEs, v1 to v3
#: the current VAE layout's files (format_version 4): the AutoencoderKL's state under diffusers'
#: names, serialised as diffusers serialises ``diffusion_pytorch_model.safetensors`` (so a
#: pipeline folder's ``vae/`` may hold the same file), and the VF projection's, when there is one
VAE_STATE_FILE = "vae.safetensors"
VAE_PROJECTION_FILE = "projection.safetensors"


def split_vae_weights(blob: bytes, where: Path, kind: FolderKind) -> dict[str, bytes]:
    """The one ``model.safetensors`` of VAE folders before ``format_version`` 4 (``vae.*``: the
    AutoencoderKL; other keys: the VF projection) as the files of the current layout,
    :data:`VAE_STATE_FILE` and, when there are other keys, :data:`VAE_PROJECTION_FILE` (the
    header is validated before any tensor is read: :func:`cspace.io.untrusted.check_safetensors`)."""
    from safetensors.torch import load, save

    try:
        check_safetensors(blob)
        state = load(blob)
    except Exception as err:  # FormatError, or safetensors' own error types
        raise kind.fail(f"{where} is not a readable safetensors file: {err}", where) from None
    vae = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vae.")}
    files = {VAE_STATE_FILE: save(vae, metadata={"format": "pt"})}
    if rest:
        files[VAE_PROJECTION_FILE] = save(rest)
    return files


def _vae_one_file(folder: Folder, kind: FolderKind, name: str) -> Folder:
    if _WEIGHTS not in folder.files:
        raise kind.fail(f"{folder.mpath} does not list {_WEIGHTS}", folder.mpath)
    files = split_vae_weights(folder.files[_WEIGHTS], folder.file(_WEIGHTS), kind)
    source = folder.stored.get(_WEIGHTS, _WEIGHTS)  # messages name the file on disk
    return _current(folder.path, kind, folder.fields, files, name, dict.fromkeys(files, source))


def _vae_v2(folder: Folder, kind: FolderKind) -> Folder:
    """A v2 manifest: one ``model.safetensors`` under its plain name."""
    return _vae_one_file(folder, kind, f"{kind.format} v2")


def _vae_v3(folder: Folder, kind: FolderKind) -> Folder:
    """A v3 manifest: one content-addressed ``model-<hash>.safetensors``."""
    return _vae_one_file(folder, kind, f"{kind.format} v3")


VAE_V2 = Legacy(name="manifest v2", files=(MANIFEST, _WEIGHTS), read=_vae_v2, version=2)
VAE_V3 = Legacy(
    name="manifest v3 (one model.safetensors)", files=(MANIFEST, _WEIGHTS), read=_vae_v3, version=3
)


def _vae_v1(path: Path, kind: FolderKind) -> Folder:
    """config.json (format cspace-aligned-vae, optional model_sha256) + model.safetensors."""
    blob = _weights(path, kind)
    config = _config(path, kind, "cspace-aligned-vae", "aligned-VAE")
    want = config.get("model_sha256")
    if want is not None:
        got = sha256_hex(blob)
        if got != want:
            raise kind.error(
                f"{path / _WEIGHTS} is not the file {path / _CONFIG} was written with (SHA-256 "
                f"{got[:12]}... != {str(want)[:12]}...): an interrupted or foreign write; "
                "retrain it",
                path / _WEIGHTS,
            )
    fields = {k: v for k, v in config.items() if k not in ("format", "model_sha256")}
    files = split_vae_weights(blob, path / _WEIGHTS, kind)
    name = "cspace-aligned-vae (config.json)"
    return _current(path, kind, fields, files, name, dict.fromkeys(files, _WEIGHTS))


VAE_V1 = Legacy(
    name="cspace-aligned-vae (config.json)",
    files=(_CONFIG, _WEIGHTS),
    read=_vae_v1,
    detect=_has_config,
)


# ---------------------------------------------------------------------- teachers, v1
def _teacher_v1(path: Path, kind: FolderKind) -> Folder:
    """config.json (format cspace-digits-teacher) + model.safetensors, no checksum."""
    blob = _weights(path, kind)
    config = _config(path, kind, "cspace-digits-teacher", "digits teacher")
    fields = {k: v for k, v in config.items() if k != "format"}
    return _current(path, kind, fields, {_WEIGHTS: blob}, "cspace-digits-teacher (config.json)")


TEACHER_V1 = Legacy(
    name="cspace-digits-teacher (config.json)",
    files=(_CONFIG, _WEIGHTS),
    read=_teacher_v1,
    detect=_has_config,
)
