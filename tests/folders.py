"""Helpers for tests that look inside saved folders (cspace.io.folder): payload files are stored
under content-addressed names (``model-<hash>.safetensors``) listed in the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cspace.io.folder import LOCK_FILE, MANIFEST, stored_name


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def write_manifest(path: Path, doc) -> None:
    (Path(path) / MANIFEST).write_text(json.dumps(doc))


def stored(path: Path, name: str) -> Path:
    """The file on disk that holds the logical payload file ``name``."""
    entry = manifest(path)["files"][name]
    return Path(path) / entry.get("file", name)


def replace_payload(path: Path, name: str, data: bytes) -> Path:
    """Store new bytes for the payload file ``name`` and update the manifest's entry (stored
    name, size, checksum) to match, as a crafted folder would; returns the stored path."""
    doc = manifest(path)
    sha = hashlib.sha256(data).hexdigest()
    if "file" in doc["files"].get(name, {"file": None}):
        fname = stored_name(name, sha)
        doc["files"][name] = {"file": fname, "bytes": len(data), "sha256": sha}
    else:
        fname = name
        doc["files"][name] = {"bytes": len(data), "sha256": sha}
    (Path(path) / fname).write_bytes(data)
    write_manifest(path, doc)
    return Path(path) / fname


def live_files(path: Path) -> set[str]:
    """The entries a reader of the current manifest needs, and the lock file."""
    doc = manifest(path)
    return {MANIFEST, LOCK_FILE, *(e.get("file", n) for n, e in doc["files"].items())}


def version_files(path: Path) -> set[str]:
    """What a folder holds right after a save: the current version's files, the lock file and
    the files of the version it replaced (``superseded``, kept for readers of that version)."""
    return live_files(path) | set(manifest(path).get("superseded", []))


def load_kind(kind: str, path: Path):
    """Load the folder ``path`` of ``kind`` (obstacles, classifier, flow, vae, teacher) with the
    kind's own public loader."""
    from cspace.models.flow import load_flow
    from cspace.models.teachers import DigitsTeacher
    from cspace.models.vae import load_aligned_vae
    from obstacles import ObstacleSet, PreferenceClassifier

    return {
        "obstacles": ObstacleSet.load,
        "classifier": PreferenceClassifier.load,
        "flow": load_flow,
        "vae": load_aligned_vae,
        "teacher": DigitsTeacher.load,
    }[kind](path)
