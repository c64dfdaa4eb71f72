"""Safe files: SHA-256 digests and atomic writes of a folder of files.

Single files go through :func:`write_file_atomic` (a temporary file in the same folder, then
``os.replace``). Every folder cspace writes (obstacle sets, classifiers, model weights: the
safe-folder format of :mod:`cspace.io.folder`) goes through :func:`write_folder_atomic`: the files are written and fsynced into a temporary sibling folder,
the old folder (if any) is moved aside, the new one is swapped in with ``os.replace`` and the old
one removed. An interruption at any point leaves either the old folder or the new one at
``path``, never a half-written one; on an error the old folder is put back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "save_safetensors_atomic",
    "sha256_hex",
    "write_file_atomic",
    "write_folder_atomic",
    "write_json_atomic",
]


def sha256_hex(data: bytes) -> str:
    """The SHA-256 digest of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through a fsynced temporary file in the
    same folder and ``os.replace``: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; weights ship as package data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then ``os.replace`` it into place."""
    write_file_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def save_safetensors_atomic(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as safetensors through a temporary file and ``os.replace``; returns the
    file's SHA-256 (hex)."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(clean, metadata=metadata)
    write_file_atomic(path, data)
    return sha256_hex(data)


def write_folder_atomic(
    path: str | os.PathLike, files: Mapping[str, bytes], carry: Sequence[str] = ()
) -> Path:
    """Write ``files`` (name -> bytes) as the folder ``path``, replacing it atomically.

    ``carry``: names of entries (files or folders) of the existing folder that are moved into
    the new folder just before the swap (a training checkpoint, images kept beside an obstacle
    set), so replacing a folder never deletes them; on an error they are moved back.

    The parent folder must exist and be writable (callers check it, to name the problem in
    their own error type).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    moved: list[str] = []
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if path.exists():
            for name in carry:
                if name not in files and os.path.lexists(path / name):
                    os.replace(path / name, tmp / name)
                    moved.append(name)
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous folder back
        for name in moved:  # and what was carried out of it
            if os.path.lexists(tmp / name) and path.is_dir():
                os.replace(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
