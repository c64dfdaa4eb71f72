"""``cspace sample`` on tiny pipelines saved to disk and loaded offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image
from safetensors.torch import load_file

from cspace.cli import main
from cspace.models.tiny_pipelines import tiny_unet
from obstacles import ObstacleSet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    unet = tiny_unet()
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    path = tmp_path_factory.mktemp("pipe") / "tiny-ddim"
    DDIMPipeline(unet, sched).save_pretrained(path)
    return path


def _record(out):
    return json.loads((out / "record.json").read_text())


def test_plain_then_guided_away_from_the_plain_images(pipeline_dir, tmp_path):
    plain = tmp_path / "plain"
    assert main(["sample", "--pipeline", str(pipeline_dir), "--n", "2", "--steps", "5",
                 "--out", str(plain)]) == 0  # fmt: skip
    rec = _record(plain)
    assert rec["pipeline_class"] == "DDIMPipeline" and rec["nfe"] == 10
    assert np.asarray(Image.open(plain / "image_000.png")).shape == (8, 8, 3)
    # no prompt, so no classifier-free guidance: the record says so instead of the default 7
    assert rec["settings"]["guidance_scale"] is None
    # grid.png: the 2 images side by side (1 white pixel around each), pixel for pixel
    grid = np.asarray(Image.open(plain / "grid.png"))
    assert grid.shape == (10, 19, 3)
    for i in range(2):
        img = np.asarray(Image.open(plain / f"image_{i:03d}.png"))
        assert np.array_equal(grid[1:9, 1 + 9 * i : 9 + 9 * i], img)
    assert (grid[0] == 255).all() and (grid[:, 9] == 255).all()
    # obstacles at the plain run's final latents
    emb = load_file(str(plain / "latents.safetensors"))["latents"].reshape(2, -1).double().numpy()
    q = 0.5 * float(np.linalg.norm(emb, axis=1).min())
    ObstacleSet.from_embeddings(emb, q_star=q, eta=q**3).save(tmp_path / "set")
    guided = tmp_path / "guided"
    assert main(["sample", "--pipeline", str(pipeline_dir), "--n", "2", "--steps", "5",
                 "--obstacles", str(tmp_path / "set"), "--strength", "30", "--out", str(guided)]) == 0  # fmt: skip
    rec = _record(guided)
    assert rec["guided_steps"] >= 1 and len(rec["per_image"]) == 2
    assert all(p["nearest_obstacle"] > q for p in rec["per_image"])


def test_a_second_run_into_the_folder_leaves_no_image_of_the_first(pipeline_dir, tmp_path):
    out = tmp_path / "again"
    for n in ("3", "1"):
        assert main(["sample", "--pipeline", str(pipeline_dir), "--n", n, "--steps", "1",
                     "--out", str(out), "--no-progress"]) == 0  # fmt: skip
        (out / "notes.txt").write_text("mine")  # a file of the user's: kept
        (out / "image_a.png").write_text("not ours")  # not a name cspace writes: kept
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png", "image_000.png", "image_a.png", "latents.safetensors", "notes.txt",
        "record.json",
    ]  # fmt: skip
    assert _record(out)["settings"]["n"] == 1


def test_the_grid_holds_the_first_64_images(pipeline_dir, tmp_path):
    out = tmp_path / "many"
    assert main(["sample", "--pipeline", str(pipeline_dir), "--n", "65", "--steps", "1",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert len(list(out.glob("image_*.png"))) == 65
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (8 * 9 + 1, 8 * 9 + 1, 3)  # 8 x 8 images of 8 x 8, 1 pixel apart
    last = np.asarray(Image.open(out / "image_063.png"))
    assert np.array_equal(grid[64:72, 64:72], last)


def test_a_class_conditional_pipeline_is_refused_with_the_way_to_guide_it(tmp_path, capsys):
    from cspace.models.tiny_pipelines import tiny_dit

    tiny_dit().save_pretrained(tmp_path / "dit")
    assert main(["sample", "--pipeline", str(tmp_path / "dit"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "DiTPipeline takes neither a prompt nor batch_size: guide it from Python" in err
    assert not (tmp_path / "o").exists()


def test_heun_takes_the_euler_schedulers_sigmas_or_refuses():
    """``--scheduler heun`` builds diffusers' Heun scheduler with the same sigmas (each one
    twice, for the corrector); options of the Euler scheduler that Heun lacks are refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from guidance.integrations.pipelines import heun_scheduler

    for shift in (1.0, 3.0):
        euler = FlowMatchEulerDiscreteScheduler(shift=shift)
        heun = heun_scheduler(euler)
        euler.set_timesteps(7)
        heun.set_timesteps(7)
        assert torch.equal(heun.sigmas[1:-1:2], euler.sigmas[1:-1])
        assert torch.equal(heun.sigmas[2:-1:2], euler.sigmas[1:-1])  # 1, s1, s1, s2, s2, ..
        assert heun.sigmas[0] == euler.sigmas[0] == 1 and heun.sigmas[-1] == 0
        assert heun_scheduler(heun) is heun
    for kw, named in [(dict(shift_terminal=0.1), "shift_terminal=0.1"),
                      (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True"),
                      (dict(use_karras_sigmas=True), "use_karras_sigmas=True")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"sets {named}, which FlowMatchHeun"):
            heun_scheduler(FlowMatchEulerDiscreteScheduler(**kw))


def test_search_on_the_pipeline(pipeline_dir, tmp_path):
    ObstacleSet.from_embeddings(np.zeros((1, 192)), q_star=3.0, radius=1.0).save(tmp_path / "set")
    out = tmp_path / "search"
    assert main(["sample", "--pipeline", str(pipeline_dir), "--n", "2", "--steps", "4",
                 "--obstacles", str(tmp_path / "set"), "--search", "best-of-n",
                 "--budget", "32", "--out", str(out)]) == 0  # fmt: skip
    rec = _record(out)
    assert rec["nfe"] <= 32 and rec["verifier_calls"] >= 1 and len(rec["per_image"]) == 2
    assert len(rec["verifier_scores"]) == 2 and rec["settings"]["seed"] == 0
    assert (out / "image_001.png").is_file()


def test_errors(pipeline_dir, tmp_path, capsys):
    assert main(["sample", "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not download" in capsys.readouterr().err
    ObstacleSet.from_embeddings(np.zeros((1, 5)), q_star=1.0).save(tmp_path / "small")
    assert main(["sample", "--pipeline", str(pipeline_dir), "--n", "1", "--steps", "2",
                 "--obstacles", str(tmp_path / "small"), "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "flatten to d=192" in capsys.readouterr().err
    assert main(["sample", "--pipeline", str(pipeline_dir), "--search", "smc",
                 "--budget", "100", "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "--obstacles" in capsys.readouterr().err
    # a prompt for a pipeline without text: refused, not silently dropped; nothing written
    assert main(["sample", "--pipeline", str(pipeline_dir), "--prompt", "a cat",
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    assert "DDIMPipeline takes no prompt; drop --prompt" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["sample", "--pipeline", str(pipeline_dir), "--guidance-scale", "3",
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    assert "takes no prompt; drop --guidance-scale" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    # Heun is diffusers' flow-matching Heun scheduler: not for a DDIM pipeline
    assert main(["sample", "--pipeline", str(pipeline_dir), "--scheduler", "heun",
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "FlowMatchEulerDiscreteScheduler; this one has DDIMScheduler" in err
    assert not (tmp_path / "p").exists()
