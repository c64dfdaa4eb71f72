"""``cspace sample`` under ``torchrun`` (2 gloo processes) against one process with the same
blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image
from safetensors.torch import load_file

from cspace.models.tiny_pipelines import tiny_unet
from obstacles import ObstacleSet
from tests.distributed import free_port

# several processes each, on ports picked at run time: one such test at a time (conftest.py)
pytestmark = pytest.mark.usefixtures("one_distributed_at_a_time")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    unet = tiny_unet()
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    path = tmp_path_factory.mktemp("pipe") / "tiny-ddim"
    DDIMPipeline(unet, sched).save_pretrained(path)
    return path


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # several processes importing the models: 20-60 s on 2 busy cores
def test_cspace_sample_under_torchrun_equals_one_process(pipeline_dir, tmp_path):
    ObstacleSet.from_embeddings(np.zeros((1, 192)), q_star=3.0, radius=1.0).save(tmp_path / "set")
    args = ["sample", "--pipeline", str(pipeline_dir), "--samples", "3", "--steps", "3",
            "--obstacles", str(tmp_path / "set"), "--search", "best-of-n", "--budget", "36"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              f"--master-port={free_port()}", "-m", "cspace.cli"]  # fmt: skip
    out = _run([*launch, *args, "--out", str(tmp_path / "dist")])
    assert out.count("record.json") == 1  # rank 0 prints
    _run(
        [sys.executable, "-m", "cspace.cli", *args, "--blocks", "2", "--out", str(tmp_path / "one")]
    )
    a, b = tmp_path / "dist", tmp_path / "one"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    la, lb = load_file(str(a / "latents.safetensors")), load_file(str(b / "latents.safetensors"))
    assert la["latents"].shape[0] == 3 and np.array_equal(la["latents"], lb["latents"])
    for i in range(3):
        pa = np.asarray(Image.open(a / f"image_{i:03d}.png"))
        assert np.array_equal(pa, np.asarray(Image.open(b / f"image_{i:03d}.png")))
    ra, rb = (json.loads((p / "record.json").read_text()) for p in (a, b))
    assert (ra.pop("ranks"), rb.pop("ranks")) == (2, 1)
    ra["settings"].pop("out"), rb["settings"].pop("out")
    assert ra == rb and ra["blocks"] == 2 and ra["nfe"] <= 36
