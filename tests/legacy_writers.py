"""The writers cspace used before the current safe-folder format, kept verbatim (bar names) to
make legacy fixture folders:

* format_version 2 of every kind (payload files under their plain names, the folder swapped in
  by ``write_folder_atomic``: a temporary sibling folder, then two renames), copied from commit
  816b1b8 (cspace/io/folder.py ``write_folder``, cspace/io/files.py ``write_folder_atomic``,
  obstacles/obstacle_set.py ``ObstacleSet.save`` with its ``index.faiss``);
* obstacle sets and classifiers of manifest v1, flows of config.json v1, VAE folders
  (config.json with model_sha256) and digits-teacher folders (config.json, no checksum), copied
  from commit 657620f (obstacles/obstacle_set.py ``ObstacleSet.save``, obstacles/classifier.py
  ``PreferenceClassifier.save``, cspace/models/flow.py ``save_flow``, the end of
  cspace/models/vae.py ``train_vae``, cspace/models/teachers.py ``DigitsTeacher.save``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import save as _st_save

from cspace.io.files import save_safetensors_atomic, sha256_hex, write_json_atomic


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


def write_folder_v2(
    path, format: str, fields: Mapping[str, Any], payload: Mapping[str, bytes]
) -> Path:
    """``write_folder`` of format_version 2 (``carry`` and the target checks left out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": format,
        "format_version": 2,
        **json.loads(json.dumps(dict(fields))),
        "files": {n: {"bytes": len(b), "sha256": sha256_hex(b)} for n, b in payload.items()},
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files = {**payload, "manifest.json": (json.dumps(manifest, indent=1) + "\n").encode()}
    return write_folder_atomic(path, files)


def write_folder_v3(
    path, format: str, fields: Mapping[str, Any], payload: Mapping[str, bytes]
) -> Path:
    """``write_folder`` of format_version 3 (content-addressed names; what VAE folders were
    before version 4 split their one ``model.safetensors``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table, files = {}, {}
    for name, data in payload.items():
        sha = sha256_hex(data)
        stem, ext = name.split(".", 1)
        table[name] = {"file": f"{stem}-{sha[:12]}.{ext}", "bytes": len(data), "sha256": sha}
        files[table[name]["file"]] = data
    manifest = {
        "format": format,
        "format_version": 3,
        **json.loads(json.dumps(dict(fields))),
        "files": table,
        "superseded": [],
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files["manifest.json"] = (json.dumps(manifest, indent=1) + "\n").encode()
    return write_folder_atomic(path, files)


def save_obstacle_set_v2(oset, path) -> Path:
    """``ObstacleSet.save`` of format_version 2 (``index.faiss``, records.json)."""
    index_bytes = faiss.serialize_index(oset.index).tobytes()
    meta_bytes = _st_save(
        {
            "ids": oset.ids,
            "q_star": oset.q_star.astype(np.float64),
            "eta": oset.eta.astype(np.float64),
            "radius": oset.radius.astype(np.float64),
        }
    )
    records = {"labels": oset.labels, "sources": oset.sources, "history": oset.history}
    fields = {
        "dim": oset.dim,
        "count": len(oset),
        "metric": "l2",
        "next_id": int(oset._next_id),
        "revision": len(oset.history),
        "space": None if oset.space is None else oset.space.to_json(),
    }
    payload = {
        "index.faiss": index_bytes,
        "metadata.safetensors": meta_bytes,
        "records.json": json.dumps(records, indent=0).encode(),
    }
    return write_folder_v2(path, "cspace.obstacles", fields, payload)


def save_obstacle_set_v1(oset, path) -> Path:
    """``ObstacleSet.save`` of format_version 1 (labels, sources, history in the manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index_bytes = faiss.serialize_index(oset.index).tobytes()
    meta_bytes = _st_save(
        {
            "ids": oset.ids,
            "q_star": oset.q_star.astype(np.float64),
            "eta": oset.eta.astype(np.float64),
            "radius": oset.radius.astype(np.float64),
        }
    )
    manifest = {
        "format": "cspace.obstacles",
        "format_version": 1,
        "dim": oset.dim,
        "count": len(oset),
        "metric": "l2",
        "next_id": int(oset._next_id),
        "revision": len(oset.history),
        "files": {
            "index.faiss": {"bytes": len(index_bytes), "sha256": sha256_hex(index_bytes)},
            "metadata.safetensors": {"bytes": len(meta_bytes), "sha256": sha256_hex(meta_bytes)},
        },
        "labels": oset.labels,
        "sources": oset.sources,
        "history": oset.history,
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    files = {
        "index.faiss": index_bytes,
        "metadata.safetensors": meta_bytes,
        "manifest.json": json.dumps(manifest, indent=1).encode(),
    }
    return write_folder_atomic(path, files)


def save_classifier_v1(clf, path) -> Path:
    """``PreferenceClassifier.save`` of format_version 1 (no space)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = _st_save({"w": clf.w.astype(np.float64), "b": np.array([clf.b], np.float64)})
    manifest = {
        "format": "cspace.classifier",
        "format_version": 1,
        "dim": clf.dim,
        "threshold": clf.threshold,
        "q_star": clf.q_star,
        "eta": clf.eta,
        "accuracy": clf.accuracy,
        "train_accuracy": clf.train_accuracy,
        "classes": ["good", "bad"],
        "info": clf.info,
        "files": {"classifier.safetensors": {"bytes": len(blob), "sha256": sha256_hex(blob)}},
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    files = {
        "classifier.safetensors": blob,
        "manifest.json": json.dumps(manifest, indent=1).encode(),
    }
    return write_folder_atomic(path, files)


def save_flow_v1(dir, net, meta: dict) -> Path:
    """``save_flow`` of format "cspace-flow" v1: config.json + model.safetensors."""
    from safetensors.torch import save

    path = Path(dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    blob = save(tensors, metadata={"format": "cspace-flow"})
    config = {
        "format": "cspace-flow",
        "format_version": 1,
        "config": net.config.to_dict(),
        "parameters": net.num_parameters(),
        "files": {"model.safetensors": {"bytes": len(blob), "sha256": sha256_hex(blob)}},
        "meta": json.loads(json.dumps(meta)),
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files = {
        "model.safetensors": blob,
        "config.json": (json.dumps(config, indent=1) + "\n").encode(),
    }
    return write_folder_atomic(path, files)


def save_vae_v1(out, meta: dict, tensors: dict) -> None:
    """The end of ``train_vae``: model.safetensors, then config.json with its SHA-256 (two
    separate atomic files). ``meta``: the config.json fields without format and model_sha256."""
    out = Path(out)
    meta = {"format": "cspace-aligned-vae", **meta}
    meta["model_sha256"] = save_safetensors_atomic(out / "model.safetensors", tensors)
    write_json_atomic(out / "config.json", meta)


def save_teacher_v1(teacher, path, extra: dict | None = None) -> None:
    """``DigitsTeacher.save``: model.safetensors and config.json, no checksum."""
    folder = Path(path)
    save_safetensors_atomic(folder / "model.safetensors", teacher.state_dict())
    meta = {"format": "cspace-digits-teacher", "config": asdict(teacher.config), **(extra or {})}
    write_json_atomic(folder / "config.json", meta)
