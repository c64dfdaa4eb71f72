"""The layouts cspace wrote before the shared safe-folder format, and their readers.

Every reader here returns a :class:`cspace.io.folder.Folder` in the *current* layout of its
kind (verified, with the kind's current ``format_version``), so each kind decodes one layout.
:func:`cspace.io.folder.read_folder` picks the reader; :func:`cspace.io.folder.migrate_folder`
rewrites an old folder in the current format (same payload bytes). The old layouts:

=====================  ====================================================  ==================
layout                 files, and how a folder is recognised                 checks kept
=====================  ====================================================  ==================
obstacle set v1        ``manifest.json`` (format ``cspace.obstacles``,       size and SHA-256
                       ``format_version`` 1; labels, sources and history     of every file
                       in the manifest), ``index.faiss``,
                       ``metadata.safetensors``
classifier v1          ``manifest.json`` (format ``cspace.classifier``,      size and SHA-256
                       ``format_version`` 1), ``classifier.safetensors``
flow v1                ``config.json`` (format ``cspace-flow``,              size and SHA-256
                       ``format_version`` 1, a ``files`` table),             (the ``files``
                       ``model.safetensors``; no ``manifest.json``           table)
VAE v1                 ``config.json`` (format ``cspace-aligned-vae``,       SHA-256 when
                       optional ``model_sha256``), ``model.safetensors``;    ``model_sha256``
                       no ``manifest.json``                                  is present
teacher v1             ``config.json`` (format ``cspace-digits-teacher``),   none (the old
                       ``model.safetensors``; no ``manifest.json``           writer kept none)
=====================  ====================================================  ==================

An old manifest (v1) is told apart by its ``format_version``; an old layout without a
manifest by a ``config.json`` and no ``manifest.json`` (its ``format`` is then checked). The
model kinds' legacy folders without their weights file raise the kind's *missing* error
(:class:`~cspace.io.errors.MissingWeightsError`), as the old readers did. Obstacle sets and
classifiers of v1 record no C-space: they load with ``space = None`` ("unknown", accepted by
every space check; see :mod:`cspace.models.space`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cspace.io.files import sha256_hex
from cspace.io.folder import (
    MANIFEST,
    Folder,
    FolderKind,
    Legacy,
    read_json_file,
    read_regular_file,
    verify_files,
)

__all__ = ["CLASSIFIER_V1", "FLOW_V1", "OBSTACLES_V1", "TEACHER_V1", "VAE_V1"]

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"


def _has_config(path: Path) -> bool:
    return (path / _CONFIG).is_file() and not (path / MANIFEST).exists()


def _config(path: Path, kind: FolderKind, old_format: str, noun: str) -> dict[str, Any]:
    cpath = path / _CONFIG
    config = read_json_file(cpath, kind)
    if not isinstance(config, dict) or config.get("format") != old_format:
        raise kind.error(f"{cpath} is not a cspace {noun} config (format {old_format})", cpath)
    return config


def _current(path: Path, kind: FolderKind, fields: dict, files: dict[str, bytes], name: str):
    manifest = {
        "format": kind.format,
        "format_version": kind.version,
        **fields,
        "files": {n: {"bytes": len(b), "sha256": sha256_hex(b)} for n, b in files.items()},
    }
    return Folder(path, manifest, files, kind, legacy=name)


def _weights(path: Path, kind: FolderKind) -> bytes:
    wpath = path / _WEIGHTS
    if not wpath.is_file() and not wpath.is_symlink():
        raise kind.absent(path, f"{wpath} is missing")
    return read_regular_file(wpath, None, kind)


# ---------------------------------------------------------------------- obstacle sets, v1
def _obstacles_v1(folder: Folder, kind: FolderKind) -> Folder:
    """v1 kept labels, sources and history in the manifest; v2 keeps them in records.json."""
    labels, sources = folder.require("labels", "sources")
    records = {"labels": labels, "sources": sources, "history": folder.manifest.get("history", [])}
    fields = {k: v for k, v in folder.fields.items() if k not in ("labels", "sources", "history")}
    files = {**folder.files, "records.json": json.dumps(records).encode()}
    return _current(folder.path, kind, fields, files, "cspace.obstacles v1")


OBSTACLES_V1 = Legacy(
    name="cspace.obstacles v1",
    files=(MANIFEST, "index.faiss", "metadata.safetensors"),
    read=_obstacles_v1,
    version=1,
)


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


# ---------------------------------------------------------------------- VAEs, v1
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
    return _current(path, kind, fields, {_WEIGHTS: blob}, "cspace-aligned-vae (config.json)")


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
