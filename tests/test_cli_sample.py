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


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    from cspace.models.tiny_pipelines import tiny_dit

    path = tmp_path_factory.mktemp("dit") / "dit"
    tiny_dit().save_pretrained(path)
    return path


def _dit_images(path, labels, seed, steps, guidance_scale=4.0):
    """The images DiTPipeline itself makes for these labels and seed (the reference), as the
    uint8 arrays of its PIL output (DiT has no latent output)."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    out = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
               generator=gen).images  # fmt: skip
    return [np.asarray(im) for im in out]


def _images(out, n):
    return [np.asarray(Image.open(out / f"image_{i:03d}.png")) for i in range(n)]


def test_a_class_conditional_pipeline_samples_the_given_classes_in_turn(dit_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["sample", "--pipeline", str(dit_dir), "--class-label", "1,0", "--n", "3",
                 "--steps", "3", "--seed", "5", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rec = _record(out)
    assert rec["pipeline_class"] == "DiTPipeline" and rec["nfe"] == 9
    assert rec["settings"]["class_labels"] == [1, 0] and rec["settings"]["guidance_scale"] == 4.0
    assert load_file(out / "latents.safetensors")["latents"].shape == (3, 4, 4, 4)
    got = _images(out, 3)
    want = _dit_images(dit_dir, [1, 0, 1], 5, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))  # labels in turn
    other = _dit_images(dit_dir, [0, 1, 0], 5, 3)
    assert not np.array_equal(got[0], other[0])  # the labels matter
    # blocks take the labels by the image's place in the run, not in its block
    from guidance.distributed.search import block_seed

    blocked = tmp_path / "b"
    assert main(["sample", "--pipeline", str(dit_dir), "--class-label", "1,0", "--n", "3",
                 "--steps", "3", "--seed", "5", "--blocks", "3", "--guidance-scale", "1",
                 "--out", str(blocked), "--no-progress"]) == 0  # fmt: skip
    got = _images(blocked, 3)
    for k, label in enumerate([1, 0, 1]):
        (want,) = _dit_images(dit_dir, [label], block_seed(5, k), 3, guidance_scale=1.0)
        assert np.array_equal(got[k], want), k


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "DiTPipeline is class-conditional: give the classes of the images (--class-label 3"),
        (
            ["--class-label", "1000"],
            "--class-label 1000 is out of range: DiTPipeline has classes 0 to 999",
        ),
        (
            ["--class-label", "1", "--prompt", "a cat"],
            "takes class labels, not a prompt; drop --prompt",
        ),
        (
            ["--class-label", "1", "--search", "best-of-n", "--budget", "8", "--obstacles", "SET"],
            "DiTPipeline is guided without a search: drop --search and --budget",
        ),
    ],
)
def test_a_class_conditional_pipelines_bad_settings_are_named(dit_dir, tmp_path, capsys, extra,
                                                              message):  # fmt: skip
    out = tmp_path / "o"
    assert main(["sample", "--pipeline", str(dit_dir), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_class_labels_are_refused_where_they_mean_nothing(pipeline_dir, tmp_path, capsys):
    assert main(["sample", "--pipeline", str(pipeline_dir), "--class-label", "3",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "DDIMPipeline is not class-conditional the way DiT is" in err
    for bad in ("a", "1,,2", "-1", "2.5", ",", "", "1e4300", str(2**31)):
        with pytest.raises(SystemExit):
            main(["sample", "--pipeline", str(pipeline_dir), f"--class-label={bad}"])
        err = capsys.readouterr().err
        assert "expected class labels, integers from 0 to 2147483647 separated by commas" in err


def test_more_labels_than_images_and_a_dit_without_imagenets_null_class(dit_dir, tmp_path, capsys):
    """Labels that would not be used are refused; DiTPipeline's classifier-free guidance uses
    class 1000 as its null class, so a transformer of 10 classes is refused above scale 1 (it
    crashed inside diffusers) and runs at scale 1."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from cspace.models.tiny_pipelines import tiny_vae

    out = tmp_path / "o"
    assert main(["sample", "--pipeline", str(dit_dir), "--n", "2", "--class-label", "5,6,7",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "3 class labels for 2 images" in capsys.readouterr().err and not out.exists()
    torch.manual_seed(0)
    ten = DiTTransformer2DModel(sample_size=4, num_layers=1, patch_size=2, attention_head_dim=8,
                                num_attention_heads=2, in_channels=4, out_channels=8,
                                num_embeds_ada_norm=10).eval()  # fmt: skip
    DiTPipeline(transformer=ten, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(
        tmp_path / "dit10"
    )
    argv = ["sample", "--pipeline", str(tmp_path / "dit10"), "--n", "2", "--steps", "2",
            "--class-label", "3", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "uses class 1000 as its null class, but this transformer has 10 classes: pass " in err
    assert not out.exists()
    assert main([*argv, "--guidance-scale", "1"]) == 0
    assert _record(out)["settings"]["guidance_scale"] == 1.0


def test_a_consistency_model_is_called_as_an_unconditional_pipeline(tmp_path, capsys):
    """ConsistencyModelPipeline takes class_labels (optional) and batch_size: not DiT's way; it
    gets the unconditional path, whose guide() names its unsupported scheduler."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    path = tmp_path / "cm"
    ConsistencyModelPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler()
                             ).save_pretrained(path)  # fmt: skip
    assert main(["sample", "--pipeline", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "CMStochasticIterativeScheduler" in err and "class-conditional" not in err
    assert main(["sample", "--pipeline", str(path), "--class-label", "3",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "ConsistencyModelPipeline is not class-conditional the way DiT is" in (
        capsys.readouterr().err
    )


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


def test_a_pipeline_that_takes_neither_prompt_labels_nor_batch_size_is_refused(
    pipeline_dir, tmp_path, capsys, monkeypatch
):
    """An image-to-image pipeline, say: ``cspace sample`` cannot call it; the error says how to
    guide it from Python."""
    import cspace.experiments.pipeline_sampling as ps

    class ImageToImage(DDIMPipeline):
        def __call__(self, image, num_inference_steps=50, generator=None, output_type="pil"):
            raise AssertionError("never called")

    monkeypatch.setattr(
        ps, "load_pipeline", lambda path, device: ImageToImage.from_pretrained(path)
    )
    assert main(["sample", "--pipeline", str(pipeline_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ImageToImage takes neither a prompt, class_labels nor batch_size: guide it from" in err
    assert not (tmp_path / "o").exists()
