"""``guidance.integrations.diffusers.guide`` on real diffusers pipelines built offline from tiny
configs with random weights (:mod:`cspace.models.tiny_pipelines`): DDPM and DDIM (epsilon, v-prediction,
sample), flow matching (FlowMatchEulerDiscreteScheduler), Stable Diffusion with classifier-free
guidance and a batch of prompts (``tokenizer=None``, ``prompt_embeds``), and DiT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from cspace.models.tiny_pipelines import tiny_dit, tiny_sd, tiny_sd3, tiny_unet
from guidance import RepulsiveField
from guidance.integrations.diffusers import GuidanceError, guide
from obstacles import ObstacleSet

torch.set_num_threads(1)


def _unconditional(kind: str):
    if kind == "flow":
        return DDPMPipeline(tiny_unet(), FlowMatchEulerDiscreteScheduler())
    # clip_sample=False: with the default True the scheduler clamps x0_hat to [-1, 1] after the
    # correction, which bounds how far any guidance can move a sample
    if kind == "ddpm-epsilon":
        return DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=100, clip_sample=False))
    pred = kind.split("-", 1)[1]
    sched = DDIMScheduler(num_train_timesteps=100, prediction_type=pred, clip_sample=False)
    return DDIMPipeline(tiny_unet(), sched)


UNCONDITIONAL = ["flow", "ddpm-epsilon", "ddim-epsilon", "ddim-v_prediction", "ddim-sample"]


def _far_set(d: int) -> ObstacleSet:
    # one obstacle far from every latent: the field is zero everywhere the sampler goes
    return ObstacleSet.from_embeddings(np.full((1, d), 1e3), q_star=1.0)


def _run_pair(pipe, call):
    """The plain pipeline's output and final latents (captured by a strength-0 wrapper, which is
    itself checked to change nothing)."""
    plain = call(pipe)
    probe = guide(pipe, None)
    again = call(probe)
    return plain, again, probe.stats.last_latents


def _push_out(pipe, call, strength: float, weight=None):
    """Obstacles at the plain output's final latents, Q* half their norm: guided latents leave Q*."""
    _, _, lat = _run_pair(pipe, call)
    emb = lat.reshape(lat.shape[0], -1).double().numpy()
    q = 0.5 * float(np.linalg.norm(emb, axis=1).min())
    oset = ObstacleSet.from_embeddings(emb, q_star=q, eta=q**3)
    g = guide(pipe, RepulsiveField(oset), strength=strength, weight=weight)
    call(g)
    new = g.stats.last_latents.reshape(lat.shape[0], -1).double().numpy()
    dist = np.linalg.norm(new[:, None] - emb[None], axis=2).min(axis=1)
    return dist / q, g.stats


@pytest.mark.parametrize("kind", UNCONDITIONAL)
def test_unconditional_off_is_bit_exact_and_on_moves_out(kind):
    pipe = _unconditional(kind)

    def call(p):
        return p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
                 output_type="np").images  # fmt: skip

    plain, again, lat = _run_pair(pipe, call)
    assert np.array_equal(plain, again)
    # a field with no obstacle in reach is off too, bit for bit
    far = guide(pipe, RepulsiveField(_far_set(lat[0].numel())), strength=5.0)
    assert np.array_equal(plain, call(far)) and far.stats.guided_steps == 0
    # weight 1/t: the clean estimate moves by the full delta at every step (sigma_t delta
    # otherwise); without it DDPM-epsilon and v-prediction end on the edge of Q* (0.83-0.98 Q*
    # at strength 10-30), where the thresholded field vanishes
    ratio, stats = _push_out(pipe, call, strength=30.0, weight=lambda t: 1 / max(t, 0.02))
    assert stats.guided_steps >= 1 and bool((ratio > 1).all()), ratio


@pytest.mark.slow
def test_stable_diffusion_cfg_and_two_prompts():
    pipe = tiny_sd()
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 6, 8, generator=g)
    negative = torch.randn(2, 6, 8, generator=g)

    def call(p):
        return p(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=3.0,
                 num_inference_steps=4, height=16, width=16, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    plain, again, lat = _run_pair(pipe, call)
    assert plain.shape == (2, 4, 8, 8) and torch.equal(plain, again) and torch.equal(plain, lat)
    ratio, stats = _push_out(pipe, call, strength=10.0)
    assert stats.guided_steps >= 1 and bool((ratio > 1).all()), ratio
    # two images per prompt: a batch of 4
    out = guide(pipe, RepulsiveField(_far_set(256)), strength=1.0)(
        prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=3.0,
        num_images_per_prompt=2, num_inference_steps=2, height=16, width=16,
        output_type="latent")  # fmt: skip
    assert out.images.shape[0] == 4


@pytest.mark.parametrize("mode", ["clean", "noisy"])
def test_stable_diffusion_3_flow_matching_cfg(mode):
    pipe = tiny_sd3()
    g = torch.Generator().manual_seed(1)
    emb = {
        "prompt_embeds": torch.randn(2, 5, 16, generator=g),
        "negative_prompt_embeds": torch.randn(2, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 8, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(2, 8, generator=g),
    }

    def call(p):
        return p(**emb, guidance_scale=3.0, num_inference_steps=4, height=16, width=16,
                 output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    plain, again, lat = _run_pair(pipe, call)
    assert plain.shape == (2, 4, 8, 8) and torch.equal(plain, again) and torch.equal(plain, lat)
    emb_ = lat.reshape(2, -1).double().numpy()
    q = 0.5 * float(np.linalg.norm(emb_, axis=1).min())
    g2 = guide(pipe, RepulsiveField(ObstacleSet.from_embeddings(emb_, q_star=q, eta=q**3)),
               strength=10.0, mode=mode)  # fmt: skip
    call(g2)
    new = g2.stats.last_latents.reshape(2, -1).double().numpy()
    dist = np.linalg.norm(new[:, None] - emb_[None], axis=2).min(axis=1)
    # noisy mode acts on x_t against obstacles noised to level t; with 4 steps its last push is
    # at t = 0.25, and one sample ends at 0.68 Q*: out of Q* is shown for the clean mode
    assert (dist > q).all() if mode == "clean" else (dist > 0.5 * q).all(), dist / q


def test_dit_class_conditional_with_cfg():
    pipe = tiny_dit()

    def call(p):
        return p(class_labels=[0, 1], guidance_scale=4.0, num_inference_steps=4, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    plain, again, lat = _run_pair(pipe, call)
    assert np.array_equal(plain, again) and lat.shape[0] == 4  # DiT steps the doubled batch
    ratio, stats = _push_out(pipe, call, strength=10.0)
    assert stats.guided_steps >= 1 and bool((ratio > 1).all()), ratio


def test_scheduler_is_restored_and_errors_are_clear():
    pipe = _unconditional("ddim-epsilon")
    g = guide(pipe, RepulsiveField(_far_set(192)), strength=1.0)
    g(batch_size=1, num_inference_steps=2, output_type="np")
    assert "step" not in pipe.scheduler.__dict__  # the class's step is back
    assert g.unet is pipe.unet  # attributes are the pipeline's
    # obstacles of the wrong latent size
    wrong = guide(pipe, RepulsiveField(_far_set(10)), strength=1.0)
    with pytest.raises(GuidanceError, match="flatten to d=192"):
        wrong(batch_size=1, num_inference_steps=2, output_type="np")
    assert "step" not in pipe.scheduler.__dict__  # restored after an error too
    # an unsupported scheduler, prediction type, pipeline, settings
    with pytest.raises(GuidanceError, match="not supported; guide works with"):
        guide(DDPMPipeline(tiny_unet(), EulerDiscreteScheduler()), RepulsiveField(_far_set(192)))
    bad = DDIMPipeline(tiny_unet(), DDIMScheduler())
    bad.scheduler.register_to_config(prediction_type="x_start")
    with pytest.raises(GuidanceError, match="prediction_type='x_start'"):
        guide(bad, RepulsiveField(_far_set(192)))
    with pytest.raises(GuidanceError, match="diffusers pipeline with a scheduler"):
        guide(object(), RepulsiveField(_far_set(192)))
    with pytest.raises(GuidanceError, match="strength"):
        guide(pipe, RepulsiveField(_far_set(192)), strength=-1)
    with pytest.raises(GuidanceError, match="mode='noisy'"):
        guide(pipe, RepulsiveField(_far_set(192)), mode="noisy")
    with pytest.raises(GuidanceError, match="evaluate"):
        guide(pipe, object())


def test_obstacles_from_images_through_the_pipelines_vae(tmp_path):
    """Example images -> the pipeline's own VAE (cspace.models.encoders) -> obstacles in the latent
    space guide() acts in: an image decoded from the plain output, encoded again, repels it."""
    from cspace.models.encoders import Encoder

    pipe = tiny_sd()
    pipe.vae.save_pretrained(tmp_path / "vae")
    enc = Encoder.from_diffusers(tmp_path / "vae")
    g = torch.Generator().manual_seed(1)
    embeds, negative = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)

    def call(p):
        return p(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=3.0,
                 num_inference_steps=4, height=16, width=16, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    lat = call(pipe)
    with torch.no_grad():
        image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    emb = enc.embed(enc.encode(image)).double().numpy()  # the image as an obstacle
    assert emb.shape == (1, 4 * 8 * 8)
    d0 = float(np.linalg.norm(lat.reshape(1, -1).double().numpy() - emb))
    q = 2 * d0 + 1.0
    g2 = guide(pipe, RepulsiveField(ObstacleSet.from_embeddings(emb, q_star=q, eta=q**3)),
               strength=10.0)  # fmt: skip
    new = call(g2).reshape(1, -1).double().numpy()
    assert g2.stats.guided_steps >= 1 and float(np.linalg.norm(new - emb)) > d0


def test_tiny_text_to_image_round_trips_and_takes_any_prompt(tmp_path):
    """The whole pipeline, tokenizer included, saves and loads back as a folder; any text
    tokenizes (one token per character, cut at 16); images are RGB at ``image_size``; the
    caller's random state is untouched."""
    from diffusers import StableDiffusionPipeline

    from cspace.models.tiny_pipelines import tiny_text_to_image

    with pytest.raises(ValueError, match="even number"):
        tiny_text_to_image(63)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    tiny_text_to_image(16).save_pretrained(tmp_path / "pipe")
    assert torch.equal(torch.rand(1), before)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.vae.config.sample_size == 16
    ids = pipe.tokenizer(["a red car", "Zürich ✓ " * 9], padding="max_length", truncation=True)
    assert [len(i) for i in ids["input_ids"]] == [16, 16]
    assert ids["input_ids"][0][0] == pipe.tokenizer.bos_token_id != ids["input_ids"][0][1]
    assert len(set(ids["input_ids"][0][1:9])) > 3  # characters map to different tokens
    out = pipe(["a red car", "Zürich ✓"], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
