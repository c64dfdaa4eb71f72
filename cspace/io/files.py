"""Safe files: SHA-256 digests and atomic writes of single files.

A single file goes through :func:`write_file_atomic` (a fsynced temporary file in the same
folder, then ``os.replace``): readers see the old file or the new one, never a part. Folders
(obstacle sets, classifiers, model weights) are written by :func:`cspace.io.folder.write_folder`
(immutable payload files, a manifest replaced last, a writers' lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "save_safetensors_atomic",
    "sha256_hex",
    "write_file_atomic",
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
