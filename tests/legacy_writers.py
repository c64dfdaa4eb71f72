"""The writers cspace used before the shared safe-folder format, kept verbatim (bar names) to make
legacy fixture folders: obstacle sets and classifiers of manifest v1, flows of config.json v1,
VAE folders (config.json with model_sha256) and digits-teacher folders (config.json, no
checksum). Copied from commit 657620f (obstacles/obstacle_set.py ``ObstacleSet.save``,
obstacles/classifier.py ``PreferenceClassifier.save``, cspace/models/flow.py ``save_flow``, the
end of cspace/models/vae.py ``train_vae``, cspace/models/teachers.py ``DigitsTeacher.save``).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import save as _st_save

from cspace.io.files import (
    save_safetensors_atomic,
    sha256_hex,
    write_folder_atomic,
    write_json_atomic,
)


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
