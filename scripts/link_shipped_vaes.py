"""Rewrite the shipped VAE folders in the current format and make the shipped Fashion-MNIST
pipelines' ``vae/diffusion_pytorch_model.safetensors`` a relative symbolic link to their VAE
folder's ``vae-<hash>.safetensors``: the same bytes, stored once (the VAE folder's file is what
diffusers' ``save_pretrained`` writes for an AutoencoderKL, :mod:`cspace.models.vae`).

    python scripts/link_shipped_vaes.py          # after retraining a VAE or a pipeline

A pipeline whose VAE file is not byte for byte its VAE folder's is refused, not linked: it was
trained in another VAE's latents. Each folder is rewritten beside itself and swapped in, so a
folder is old or new, never half of each. Links are followed by diffusers, pip and setuptools
(a wheel holds the file itself).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cspace.io.folder import read_folder, write_folder  # noqa: E402
from cspace.models.shipped import shipped  # noqa: E402
from cspace.models.vae import VAE_KIND, VAE_STATE_FILE  # noqa: E402

#: each shipped pipeline and the VAE folder whose latents it was trained in
PAIRS = {"fashion_pipeline": "fashion_vae_aligned", "fashion_pipeline_plain": "fashion_vae_plain"}
VAE_FOLDERS = ("vae_aligned", "vae_plain", "fashion_vae_aligned", "fashion_vae_plain")
DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"


def rewrite(name: str) -> None:
    folder = shipped(name)
    read = read_folder(folder, VAE_KIND)
    if read.legacy is None:
        return
    tmp, old = folder.with_name(f".{name}.new"), folder.with_name(f".{name}.old")
    for leftover in (tmp, old):  # of an earlier run that died
        shutil.rmtree(leftover, ignore_errors=True)
    write_folder(tmp, VAE_KIND, read.fields, read.files)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old)
    (folder / ".cspace-lock").unlink(missing_ok=True)
    print(f"{name}: rewritten from {read.legacy}")


def link(pipeline: str, vae: str) -> None:
    target = read_folder(shipped(vae), VAE_KIND)
    stored = target.stored[VAE_STATE_FILE]
    path = shipped(pipeline) / "vae" / DIFFUSERS_FILE
    if path.is_symlink() and not path.exists():  # a link to a file the VAE's re-save removed
        path.unlink()
    if not path.exists():
        sys.exit(f"{path} is missing: save the pipeline again (cspace train pipeline), then rerun")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != target.sha256(VAE_STATE_FILE):
        sys.exit(f"{path} is not {shipped(vae) / stored}: the pipeline was trained in another VAE")
    rel = Path("..", "..", vae, stored)
    tmp = path.with_name(f".{DIFFUSERS_FILE}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, path)
    print(f"{path.relative_to(ROOT)} -> {rel}")


def main() -> None:
    for name in VAE_FOLDERS:
        rewrite(name)
    for pipeline, vae in PAIRS.items():
        link(pipeline, vae)


if __name__ == "__main__":
    main()
