"""The Fashion-MNIST latent flow pipeline: a real DiffusionPipeline subclass that saves and
loads as a diffusers folder, refuses incomplete folders, runs under ``guide`` and trains end to
end on tiny synthetic IDX files."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cspace.io.errors import MissingWeightsError
from cspace.models.encoders import Encoder
from cspace.models.flow import FlowWeightsError
from cspace.models.latent_pipeline import (
    LatentFlowPipeline,
    _save_atomic,
    build_latent_unet,
    load_latent_pipeline,
    train_latent_flow,
)
from cspace.models.vae import AlignedVAEConfig, build_autoencoder
from tests.fashion_idx import write_fashion

TINY_VAE = AlignedVAEConfig(
    sample_size=28, block_out_channels=(8, 8, 8), latent_channels=4, norm_num_groups=4
)


def _tiny_pipe() -> LatentFlowPipeline:
    torch.manual_seed(0)
    vae = build_autoencoder(TINY_VAE)
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    return LatentFlowPipeline(
        unet=build_latent_unet(4, 7, width=8), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler()
    )


def _sample(pipe, **kw):
    return pipe(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(1), **kw
    )


def test_samples_have_the_image_shape_and_range():
    pipe = _tiny_pipe()
    img = _sample(pipe).images
    assert img.shape == (2, 1, 28, 28) and float(img.min()) >= 0 and float(img.max()) <= 1
    lat = _sample(pipe, output_type="latent").images
    assert lat.shape == (2, 4, 7, 7) and bool(torch.isfinite(lat).all())
    # latents drawn first and decoded later (tested before decoding) are the same images
    assert torch.equal(pipe.decode_latents(lat), img)
    assert len(_sample(pipe, output_type="pil").images) == 2
    with pytest.raises(ValueError, match="output_type"):
        _sample(pipe, output_type="jpeg")
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, 7, 7\)"):
        pipe(latents=torch.zeros(1, 4, 8, 8))


def test_save_and_load_give_the_same_samples(tmp_path):
    pipe = _tiny_pipe()
    _save_atomic(pipe, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["_class_name"] == (
        "LatentFlowPipeline"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p-")]  # no temporary left
    back = load_latent_pipeline(tmp_path / "p")
    assert isinstance(back, LatentFlowPipeline)
    assert back.vae.config.scaling_factor == 0.5 and back.vae.config.shift_factor == 0.1
    assert torch.equal(_sample(back).images, _sample(pipe).images)


def test_incomplete_or_foreign_folders_are_refused(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"model_index\.json is missing"):
        load_latent_pipeline(tmp_path / "none")
    _save_atomic(_tiny_pipe(), tmp_path / "p")
    for name, victim in (
        ("vae", "vae/config.json"),
        ("scheduler", "scheduler/scheduler_config.json"),
    ):
        bad = tmp_path / f"no-{name}"
        shutil.copytree(tmp_path / "p", bad)
        (bad / victim).unlink()
        with pytest.raises(MissingWeightsError, match=f"lacks its '{name}' component"):
            load_latent_pipeline(bad)
    bad = tmp_path / "no-weights"
    shutil.copytree(tmp_path / "p", bad)
    next((bad / "unet").glob("*.safetensors")).unlink()
    with pytest.raises(MissingWeightsError, match="no weights for 'unet'"):
        load_latent_pipeline(bad)
    # the shipped layout (vae weights a relative link) copied without what the link points to
    linked = tmp_path / "linked"
    shutil.copytree(tmp_path / "p", linked)
    vae_file = next((linked / "vae").glob("*.safetensors"))
    os.replace(vae_file, tmp_path / "vae-weights.safetensors")
    os.symlink(os.path.join("..", "..", "vae-weights.safetensors"), vae_file)
    assert load_latent_pipeline(linked).vae is not None  # the link is followed
    moved = tmp_path / "moved" / "linked"
    moved.parent.mkdir()
    shutil.copytree(linked, moved, symlinks=True)  # as `cp -r`: the link kept, now dangling
    with pytest.raises(MissingWeightsError, match=r"is a link to .* leads to no file.*cp -rL"):
        load_latent_pipeline(moved)
    with pytest.raises(MissingWeightsError, match=r"link_shipped_vaes"):  # the other cause
        Encoder.from_diffusers(moved, subfolder="vae")
    loop = moved / "vae" / "diffusion_pytorch_model.safetensors"
    loop.unlink()
    os.symlink(loop.name, loop)  # a link to itself: named, not a RuntimeError
    with pytest.raises(MissingWeightsError, match="leads to no file"):
        load_latent_pipeline(moved)
    # a checkout without symbolic links: the link's text in a file of its own
    loop.unlink()
    loop.write_text(os.path.join("..", "..", "vae-weights.safetensors"))
    with pytest.raises(MissingWeightsError, match=r"core\.symlinks"):
        load_latent_pipeline(moved)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "p", other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a LatentFlowPipeline"):
        load_latent_pipeline(other)


def test_guide_with_the_field_off_is_bitwise_the_plain_pipeline():
    from guidance.integrations.diffusers import guide

    pipe = _tiny_pipe()
    plain = _sample(pipe).images
    guided = guide(pipe, None)
    assert torch.equal(_sample(guided).images, plain)


@pytest.mark.slow
def test_training_end_to_end_on_tiny_files(tmp_path):
    data = write_fashion(tmp_path / "data", n_train=64, n_test=20)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        train_latent_flow(tmp_path / "full", data=data, steps=1, progress=False)
    kw = dict(data=data, steps=4, batch_size=8, width=8, max_images=32, progress=False)
    ckpt = tmp_path / "ckpt.safetensors"
    rep = train_latent_flow(tmp_path / "p", checkpoint=ckpt, checkpoint_every=2, **kw)
    assert rep["steps"] == 4 and rep["train_images"] == 32 and ckpt.is_file()
    # the digits flows' loop: its checkpoint carries the settings, so a resume with others fails
    with pytest.raises(FlowWeightsError, match="other training settings"):
        train_latent_flow(tmp_path / "q", resume=ckpt, **{**kw, "ema": 0.9})
    with pytest.raises(ValueError, match="ema must be in"):
        train_latent_flow(tmp_path / "q", ema=1.0, **kw)
    # the checkpoint holds the latents' SHA-256: one of the plain twin's space is not resumed
    with pytest.raises(FlowWeightsError, match="latents_sha256"):
        train_latent_flow(tmp_path / "q", resume=ckpt, vae_kind="plain", **kw)
    # refused before any work: a checkpoint inside the output folder, or a folder as checkpoint
    with pytest.raises(ValueError, match="inside the output folder"):
        train_latent_flow(tmp_path / "q", checkpoint=tmp_path / "q" / "ck.st", **kw)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        train_latent_flow(tmp_path / "q", checkpoint=tmp_path, **kw)
    assert not (tmp_path / "q").exists()
    pipe = load_latent_pipeline(tmp_path / "p")
    assert pipe.unet.config.sample_size == 7 and pipe.unet.config.in_channels == 4
    assert _sample(pipe).images.shape == (2, 1, 28, 28)


def test_cli_refuses_a_full_output_folder(tmp_path, run_cli):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc, _, err = run_cli(["train", "pipeline", "--out", tmp_path / "full", "--steps", "1"])
    assert rc == 2 and "not empty" in err


def test_cli_refuses_a_width_the_unet_cannot_take(tmp_path, run_cli):
    # refused before the VAE or the data are read (no data folder exists here)
    rc, _, err = run_cli(["train", "pipeline", "--out", tmp_path / "o", "--width", "40"])
    assert rc == 2 and "multiple of 32" in err and "got 40" in err, err
    assert not (tmp_path / "o").exists()
    for bad in ("0", "x"):  # not a positive integer: argparse's own usage error
        with pytest.raises(SystemExit) as e:
            run_cli(["train", "pipeline", "--out", tmp_path / "o", "--width", bad])
        assert e.value.code == 2


def test_guide_with_diffusers_heun_scheduler_corrects_each_call_at_its_own_sigma():
    """With ``FlowMatchHeunDiscreteScheduler`` swapped in (2 N - 1 model calls for N steps) the
    correction of every call, predictor and corrector, uses the sigma the model was called at
    (the UNet gets ``timestep = 1000 sigma``); with the field off the output is the plain
    Heun pipeline's bit for bit; with an obstacle at the plain samples they move away."""
    import numpy as np
    from diffusers import FlowMatchHeunDiscreteScheduler

    from guidance import RepulsiveField
    from guidance.integrations.diffusers import _coefficients, guide
    from obstacles import ObstacleSet

    pipe = _tiny_pipe()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    seen, unet_forward = [], pipe.unet.forward

    def forward(x, timestep, *a, **kw):
        seen.append(float(timestep.reshape(-1)[0]) / 1000)
        return unet_forward(x, timestep, *a, **kw)

    pipe.unet.forward = forward
    plain = _sample(pipe, output_type="latent").images
    assert len(seen) == 2 * 3 - 1  # 3 steps: 2 Heun steps and a last Euler step
    sigmas, step = [], pipe.scheduler.step

    def spy(m, timestep, x, *a, **kw):
        sigmas.append(_coefficients(pipe.scheduler, "flow", timestep)[1])
        return step(m, timestep, x, *a, **kw)

    pipe.scheduler.step = spy
    seen.clear()
    off = guide(pipe, None)
    assert torch.equal(_sample(off, output_type="latent").images, plain)
    assert off.stats.steps == 5
    np.testing.assert_allclose(sigmas, seen, rtol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[1] == sigmas[2] < 1  # the corrector's sigma, the next's
    del pipe.scheduler.step
    emb = plain.reshape(2, -1).double().numpy()
    q = 0.5 * float(np.linalg.norm(emb[0] - emb[1]))
    field = RepulsiveField(ObstacleSet.from_embeddings(emb, q_star=q, eta=q**3))
    guided = guide(pipe, field, strength=30)
    moved = _sample(guided, output_type="latent").images.reshape(2, -1).double().numpy()
    assert guided.stats.guided_steps >= 1
    assert (np.linalg.norm(moved - emb, axis=1) > 0.5 * q).all()


def test_the_shipped_pipeline_makes_clothes_the_judge_recognises():
    from cspace.models.fashion_judge import default_fashion_judge
    from cspace.models.shipped import shipped

    pipe = load_latent_pipeline(shipped("fashion_pipeline"))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    img = pipe(batch_size=200, num_inference_steps=10, generator=g).images
    assert img.shape == (200, 1, 28, 28) and bool(torch.isfinite(img).all())
    rep = default_fashion_judge().report(img * 2 - 1)
    # a briefly trained generator: every class appears, none takes over, the judge is mostly sure
    assert min(rep["class_shares"]) > 0 and max(rep["class_shares"]) < 0.35, rep["class_shares"]
    assert rep["confidence"] > 0.65
    # noise gives none of that
    noise = torch.rand(200, 1, 28, 28, generator=g)
    assert default_fashion_judge().report(noise * 2 - 1)["confidence"] < rep["confidence"]


def test_cspace_sample_on_a_saved_latent_pipeline_gives_its_own_images(tmp_path, run_cli):
    """`cspace sample --pipeline` loads cspace's own pipeline class (diffusers' generic loader
    does not know it) and writes the pipeline's own images, in its own pixel range."""
    import numpy as np
    from PIL import Image

    pipe = _tiny_pipe()
    _save_atomic(pipe, tmp_path / "p")
    argv = ["sample", "--pipeline", tmp_path / "p", "--n", "2", "--steps", "3", "--seed", "1"]
    rc, _, err = run_cli([*argv, "--out", tmp_path / "s", "--no-progress"])
    assert rc == 0, err
    record = json.loads((tmp_path / "s" / "record.json").read_text())
    assert record["pipeline_class"] == "LatentFlowPipeline" and record["nfe"] == 6
    own = _sample(pipe, output_type="pil").images  # the same seed, steps and batch
    grid = np.asarray(Image.open(tmp_path / "s" / "grid.png"))  # grayscale, like the images
    h, w = np.asarray(own[0]).shape[:2]
    assert grid.shape == (h + 2, 2 * w + 3)
    for i in range(2):
        written = np.asarray(Image.open(tmp_path / "s" / f"image_{i:03d}.png"))
        assert np.array_equal(written, np.asarray(own[i]).squeeze())
        assert np.array_equal(grid[1 : h + 1, 1 + (w + 1) * i : (w + 1) * (i + 1)], written)

    # --scheduler heun: diffusers' Heun scheduler from the folder's config, 2 x 3 - 1 calls each
    from diffusers import FlowMatchHeunDiscreteScheduler

    rc, _, err = run_cli([*argv, "--scheduler", "heun", "--out", tmp_path / "h", "--no-progress"])
    assert rc == 0, err
    record = json.loads((tmp_path / "h" / "record.json").read_text())
    assert record["nfe"] == 2 * 5 and record["settings"]["scheduler"] == "heun"
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    heun = _sample(pipe, output_type="pil").images
    written = [np.asarray(Image.open(tmp_path / "h" / f"image_{i:03d}.png")) for i in range(2)]
    assert all(
        np.array_equal(a, np.asarray(b).squeeze()) for a, b in zip(written, heun, strict=True)
    )
    assert not np.array_equal(written[0], np.asarray(own[0]).squeeze())  # not the Euler images

    # a search on the same folder, with an obstacle set built with the pipeline's VAE
    from cspace.experiments.demo import FASHION_EXAMPLES

    rc, _, err = run_cli(
        ["obstacles", "build", FASHION_EXAMPLES / "pullover", "--encoder", tmp_path / "p",
         "--out", tmp_path / "pull.set", "--no-progress"]
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = run_cli(
        [*argv, "--obstacles", tmp_path / "pull.set", "--search", "rejection", "--budget", "60",
         "--out", tmp_path / "r", "--no-progress"]
    )  # fmt: skip
    assert rc == 0, err
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["nfe"] <= 60 and len(record["per_image"]) == 2
    assert not any(p["collided"] for p in record["per_image"])
    rc, _, err = run_cli(
        [*argv, "--obstacles", tmp_path / "pull.set", "--search", "rejection", "--budget", "60",
         "--scheduler", "heun", "--out", tmp_path / "rh", "--no-progress"]
    )  # fmt: skip
    assert rc == 2 and "drop --scheduler heun or --search" in err and not (tmp_path / "rh").exists()


@pytest.mark.parametrize(
    "index, why",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ('{"_class_name": "NoSuchPipeline"}', "names the pipeline class 'NoSuchPipeline'"),
        ('{"_class_name": 3}', "_class_name is 3"),
        ('{"_class_name": "LatentFlowPipeline", "x": "' + "y" * 70000 + '"}', "more than 65,536"),
    ],
)
def test_cspace_sample_refuses_a_bad_pipeline_index_in_one_line(tmp_path, run_cli, index, why):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text(index)
    rc, _, err = run_cli(
        ["sample", "--pipeline", tmp_path / "p", "--n", "1", "--steps", "1", "--out",
         tmp_path / "s"]
    )  # fmt: skip
    assert rc == 2 and why in err and "this is a bug" not in err
    assert not (tmp_path / "s").exists()


def test_obstacles_of_another_space_are_refused_at_the_pipelines_own_size():
    """A set of 8x8 digits against the 28x28 Fashion-MNIST pipeline: the error describes the
    pipeline at its own size (28x28 -> 4x7x7, d = 196), not at the set's, and says to build the
    set from 28x28 images with the pipeline's VAE."""
    import numpy as np

    from cspace.models.encoders import Encoder
    from cspace.models.shipped import shipped
    from cspace.models.space import SpaceMismatchError
    from guidance import RepulsiveField
    from guidance.integrations.diffusers import check_pipeline_space, pipeline_space
    from obstacles import ObstacleSet

    pipe = load_latent_pipeline(shipped("fashion_pipeline"))
    assert pipe.image_size == (28, 28)
    own = pipeline_space(pipe, pipe.image_size)
    assert own.latent_shape == (4, 7, 7) and own.dim == 196
    digits = Encoder.from_aligned(shipped("vae_aligned")).space()
    emb = np.zeros((2, digits.dim))
    field = RepulsiveField(ObstacleSet.from_embeddings(emb, q_star=1.0, space=digits))
    with pytest.raises(SpaceMismatchError) as err:
        check_pipeline_space(pipe, field)
    msg = str(err.value)
    assert own.describe() in msg and digits.describe() in msg
    assert "from 28x28 images" in msg and "--size" not in msg
    same = RepulsiveField(ObstacleSet.from_embeddings(np.zeros((2, 196)), q_star=1.0, space=own))
    check_pipeline_space(pipe, same)  # its own space: accepted


def test_the_fashion_encoder_names_are_the_pipelines_spaces():
    """``--encoder fashion`` / ``fashion-plain`` (``load_encoder``) are the shipped Fashion-MNIST
    VAEs, whose 28x28 space is that of the pipeline trained in their latents, so a set built
    with the name is accepted by that pipeline and refused by the other twin's."""
    from cspace.models.encoders import EncoderError, load_encoder
    from cspace.models.shipped import shipped
    from guidance.integrations.diffusers import pipeline_space

    aligned = load_latent_pipeline(shipped("fashion_pipeline"))
    plain = load_latent_pipeline(shipped("fashion_pipeline_plain"))
    for name, own, other in (("fashion", aligned, plain), ("fashion-plain", plain, aligned)):
        space = load_encoder(name).space((28, 28))
        assert space.same_as(pipeline_space(own, own.image_size)), name
        assert not space.same_as(pipeline_space(other, other.image_size)), name
    with pytest.raises(EncoderError, match="digits, digits-plain, fashion, fashion-plain"):
        load_encoder("fashon")
