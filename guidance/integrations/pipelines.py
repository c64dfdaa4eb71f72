"""Local diffusers pipelines for the samplers and searches of :mod:`guidance`.

* :func:`load_pipeline`: a pipeline from a local folder, offline, with a clear error naming how
  to supply it when it is not there (nothing is downloaded);
* :func:`pipeline_denoiser`: its denoiser with the prompt's conditioning, for
  :class:`~guidance.integrations.velocity.DiffusersVelocity`;
* :func:`heun_scheduler`: diffusers' flow-matching Heun scheduler with an Euler scheduler's
  sigmas;
* :func:`decode`, :func:`to_pil`: latents to images.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch

from cspace.io.errors import MissingWeightsError
from guidance.integrations.diffusers import GuidanceError
from guidance.integrations.velocity import stable_diffusion, stable_diffusion_3, unconditional

__all__ = [
    "HEUN_LACKS",
    "decode",
    "heun_scheduler",
    "load_pipeline",
    "pipeline_denoiser",
    "to_pil",
]


def load_pipeline(path: str | os.PathLike, device: str = "cpu"):
    """A diffusers pipeline from a local folder, offline; a clear error when it is not there."""
    import diffusers
    from diffusers import DiffusionPipeline

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise MissingWeightsError(
            f"no diffusers pipeline at {folder} (model_index.json missing). cspace does not "
            "download weights: save one with pipe.save_pretrained(DIR), or on a machine with "
            "network run `hf download REPO --local-dir DIR`, and pass DIR"
        )
    from cspace.models.latent_pipeline import load_latent_pipeline, quiet_loading

    name = _class_name(folder)
    if name != "LatentFlowPipeline" and not hasattr(diffusers, name):
        raise MissingWeightsError(
            f"{folder / 'model_index.json'} names the pipeline class {name!r}, which neither "
            f"diffusers {diffusers.__version__} nor cspace (LatentFlowPipeline) has; check the "
            "folder, or update diffusers"
        )
    try:
        if name == "LatentFlowPipeline":  # cspace's own: diffusers does not know it
            pipe = load_latent_pipeline(folder)
        else:
            with quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(
                    folder, local_files_only=True, low_cpu_mem_usage=False
                )
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"cannot load the pipeline at {folder}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _class_name(folder: Path) -> str:
    """The ``_class_name`` that ``model_index.json`` declares, after checking the file
    (:func:`cspace.models.latent_pipeline.read_pipeline_index`: bounded, JSON, an object) and
    the name (else :class:`MissingWeightsError` naming what is wrong)."""
    from cspace.models.latent_pipeline import read_pipeline_index

    index = folder / "model_index.json"
    try:
        name = read_pipeline_index(folder).get("_class_name")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"its _class_name is {name!r}, not a class name")
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"{index} is not a diffusers pipeline index: {err}") from err
    return name


def pipeline_denoiser(
    pipe, prompt: str | None = None, negative_prompt: str | None = None, guidance_scale: float = 7.0
):
    """The pipeline's denoiser with its conditioning, for
    :class:`~guidance.integrations.velocity.DiffusersVelocity`, and the shape of one latent.

    Unconditional ``UNet2DModel`` pipelines (DDPM, DDIM), ``StableDiffusionPipeline`` and
    ``StableDiffusion3Pipeline`` (the prompt encoded once; classifier-free guidance when
    ``guidance_scale > 1``). Returns ``(denoise, (C, H, W))``.
    """

    if hasattr(pipe, "unet") and type(pipe.unet).__name__ == "UNet2DModel":
        return unconditional(pipe.unet), tuple(
            [
                pipe.unet.config.in_channels,
                pipe.unet.config.sample_size,
                pipe.unet.config.sample_size,
            ]
        )
    name = type(pipe).__name__
    if name == "StableDiffusionPipeline":
        cfg = guidance_scale > 1
        pe, ne = pipe.encode_prompt(prompt, pipe.device, 1, cfg, negative_prompt)
        size = pipe.unet.config.sample_size
        shape = (pipe.unet.config.in_channels, size, size)
        return stable_diffusion(pipe.unet, pe, ne if cfg else None, guidance_scale), shape
    if name == "StableDiffusion3Pipeline":
        cfg = guidance_scale > 1
        pe, ne, pp, npp = pipe.encode_prompt(
            prompt, None, None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg, device=pipe.device,
        )  # fmt: skip
        size = pipe.transformer.config.sample_size
        shape = (pipe.transformer.config.in_channels, size, size)
        den = stable_diffusion_3(pipe.transformer, pe, pp, ne if cfg else None,
                                   npp if cfg else None, guidance_scale)  # fmt: skip
        return den, shape
    raise GuidanceError(
        f"search supports UNet2DModel pipelines (DDPM, DDIM), StableDiffusionPipeline and "
        f"StableDiffusion3Pipeline; got {name} (use it without search, through guide())"
    )


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) from the pipeline's latents."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return latents.float().clamp(-1, 1)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype) / scale + shift).sample.float().clamp(-1, 1)


def to_pil(arr) -> list:
    """PIL images from a pipeline's output: PIL images, a numpy batch in [0, 1] (B, H, W, C) or a
    tensor in [-1, 1] (B, C, H, W)."""
    from PIL import Image

    if isinstance(arr, list):
        return arr
    if isinstance(arr, np.ndarray):
        return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in arr]
    x = ((arr.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(a.squeeze(-1).numpy() if a.shape[-1] == 1 else a.numpy()) for a in x]


#: options of ``FlowMatchEulerDiscreteScheduler`` that change its sigmas and that
#: ``FlowMatchHeunDiscreteScheduler`` does not have (it takes ``num_train_timesteps`` and ``shift``)
HEUN_LACKS = (
    "use_dynamic_shifting",
    "shift_terminal",
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


def heun_scheduler(sched):
    """diffusers' ``FlowMatchHeunDiscreteScheduler`` with the ``num_train_timesteps`` and
    ``shift`` of the flow-matching ``sched``: the same sigmas, when ``sched`` uses none of the
    options Heun lacks (:data:`HEUN_LACKS`); one that does is refused, not silently changed
    (dynamic shifting, as SD3 and FLUX use it, would also fail in the middle of the run). A Heun
    scheduler is returned as it is. What ``cspace sample --scheduler heun`` swaps in.

    Raises:
        ValueError: another scheduler class, or an Euler scheduler with an option Heun lacks.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    if type(sched) is FlowMatchHeunDiscreteScheduler:
        return sched
    if type(sched) is not FlowMatchEulerDiscreteScheduler:
        raise ValueError(
            f"--scheduler heun is for flow-matching pipelines with diffusers' "
            f"FlowMatchEulerDiscreteScheduler; this one has {type(sched).__name__}: drop "
            "--scheduler heun"
        )
    defaults = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    used = [
        f"{k}={sched.config[k]!r}"
        for k in HEUN_LACKS
        if k in sched.config and k in defaults and sched.config[k] != defaults[k].default
    ]
    if used:
        raise ValueError(
            f"--scheduler heun: this pipeline's scheduler sets {', '.join(used)}, which "
            "FlowMatchHeunDiscreteScheduler does not have, so its sigmas would differ: drop "
            "--scheduler heun"
        )
    cfg = sched.config
    return FlowMatchHeunDiscreteScheduler(
        num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift
    )
