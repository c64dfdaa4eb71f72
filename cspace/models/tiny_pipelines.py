"""Tiny diffusers pipelines and models built offline from configs, with random weights.

They run anywhere in seconds and need no download: the tests of the diffusers integration, the
notebooks and anyone trying ``guide``, ``DiffusersVelocity`` or ``cspace sample`` on a machine
without weights use them. Random weights do not make pictures; the mechanics are those of the
real pipelines (the same classes, schedulers and calls). ``tiny_sd`` needs ``transformers`` (a
test dependency) for its CLIP text encoder.

* :func:`tiny_unet`: ``UNet2DModel`` on 3 x 8 x 8 (DDPM/DDIM/flow pipelines);
* :func:`tiny_vae`: ``AutoencoderKL``, 3 channels in, 4 latent channels, 2 x downsampling;
* :func:`tiny_digits_vae`: ``AutoencoderKL`` shaped like the digits VAE (1 x 8 x 8 images,
  latents 2 x 4 x 4), for encoders and obstacle sets from image files;
* :func:`tiny_conditional_unet`, :func:`tiny_sd`: Stable Diffusion (epsilon, DDIM) with a tiny
  CLIP text encoder and no tokenizer (call it with ``prompt_embeds`` (B, L, 8));
* :func:`tiny_sd3`: Stable Diffusion 3 (flow matching) without text encoders;
* :func:`tiny_dit`: DiT (class-conditional, DDIM);
* :func:`tiny_text_to_image`: a whole Stable Diffusion pipeline, tokenizer included (a
  character-level CLIP tokenizer), for RGB images of a given size (default 64 x 64): save it with
  ``save_pretrained(DIR)`` and every ``cspace`` command that takes a pipeline folder runs on it
  (the README's pipeline recipe, offline).
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)


def _seeded(build):
    """Build with the weights of seed 0, leaving the caller's global random state as it was."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build(*args, **kwargs)

    return wrapper


__all__ = [
    "tiny_conditional_unet",
    "tiny_digits_vae",
    "tiny_dit",
    "tiny_sd",
    "tiny_sd3",
    "tiny_text_to_image",
    "tiny_unet",
    "tiny_vae",
]


@_seeded
def tiny_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@_seeded
def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
    ).eval()


@_seeded
def tiny_digits_vae(**config) -> AutoencoderKL:
    """An ``AutoencoderKL`` shaped like the digits VAE: grey 8 x 8 images, latents 2 x 4 x 4
    (``config`` overrides, e.g. ``scaling_factor``)."""
    return AutoencoderKL(
        **{
            "in_channels": 1,
            "out_channels": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "latent_channels": 2,
            "norm_num_groups": 4,
            "sample_size": 8,
            **config,
        }
    )


@_seeded
def tiny_conditional_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    ).eval()


@_seeded
def tiny_sd() -> StableDiffusionPipeline:
    """Stable Diffusion (epsilon, DDIM) with a tiny CLIP text encoder and no tokenizer: call it
    with ``prompt_embeds`` (B, L, 8)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_conditional_unet.__wrapped__()  # the CLIP weights draw on after the UNet's
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=100,
        )
    ).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@_seeded
def tiny_sd3() -> StableDiffusion3Pipeline:
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=8,
    ).eval()
    # no text encoders: the prompts come as embeddings
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@_seeded
def tiny_dit() -> DiTPipeline:
    transformer = DiTTransformer2DModel(
        sample_size=4,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,  # DiT's pipeline uses class 1000 as the null class
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(),
                       id2label={0: "zero", 1: "one"})  # fmt: skip


def _character_tokenizer(max_length: int = 16):
    """A CLIP tokenizer whose vocabulary is the byte-level alphabet, each character alone and at
    the end of a word (514 tokens, no merges): any text tokenizes, one token per character."""
    import json
    import tempfile
    from pathlib import Path

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(alphabet)})
    vocab.update({c + "</w>": 2 + len(alphabet) + i for i, c in enumerate(alphabet)})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


@_seeded
def tiny_text_to_image(image_size: int = 64) -> StableDiffusionPipeline:
    """A complete Stable Diffusion pipeline (DDIM, epsilon) for RGB images of ``image_size`` x
    ``image_size`` (even): a character-level tokenizer and a tiny CLIP text encoder (any
    ``prompt`` works), a UNet on latents 4 x ``image_size/2`` x ``image_size/2`` and a VAE whose
    config's ``sample_size`` is ``image_size``. Random weights: it makes noise, through the real
    classes and calls. Needs ``transformers``.

    ``tiny_text_to_image().save_pretrained("tiny-pipe")`` gives a folder that ``cspace obstacles
    build --encoder tiny-pipe`` and ``cspace sample --pipeline tiny-pipe`` take."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size < 2 or image_size % 2:
        raise ValueError(f"image_size must be an even number >= 2; got {image_size}")
    tokenizer = _character_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=image_size,
    ).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
