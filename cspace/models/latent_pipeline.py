r"""A diffusers latent flow-matching pipeline on the Fashion-MNIST C-space.

:class:`LatentFlowPipeline` is a ``DiffusionPipeline`` with three components, all diffusers
classes, so ``save_pretrained(DIR)`` writes a standard pipeline folder (``model_index.json``,
``unet/``, ``vae/``, ``scheduler/``) and ``LatentFlowPipeline.from_pretrained(DIR)`` reads it
back offline:

* ``unet``: a ``UNet2DModel`` on the normalised latents (4 x 7 x 7), one resolution level (7 is
  odd, so no down-sampling) with a self-attention mid block; it predicts the flow-matching
  velocity ``v = eps - x0`` at ``timestep = 1000 sigma``;
* ``vae``: the ``AutoencoderKL`` whose latents the UNet was trained in (the aligned one, or its
  plain twin for ``fashion_pipeline_plain``; :func:`cspace.models.vae.load_fashion_vae`), whose
  config holds ``scaling_factor`` and ``shift_factor``: ``x0 = (mean - shift) * scale``;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (``x_sigma = (1 - sigma) x0 + sigma eps``,
  Euler steps from sigma = 1 to 0).

Because every step goes through ``scheduler.step``, :func:`guidance.integrations.diffusers.guide`
wraps it like any other flow-matching pipeline, and diffusers' usual scheduler swap works:
``pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)`` then
``pipe(num_inference_steps=15)`` runs Heun (29 model calls: 14 Heun steps and a last Euler
step), the sampler the shipped pipeline meets its quality targets with (docs/fashion.md); its
Euler steps at equal calls do not.

Training (:func:`train_latent_flow`): the train split is encoded once (posterior means,
normalised), then ``L = E || unet((1 - s) x0 + s eps, 1000 s) - (eps - x0) ||^2`` with
``s ~ U(0, 1)``, by the digits flows' loop (AdamW, warm-up and cosine decay, gradient
clipping, EMA weights, checkpoints and resume). :func:`load_latent_pipeline` checks the folder (every component
present) before diffusers reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

from cspace.io.checks import check_output_file, check_output_folder, check_weight_links
from cspace.io.errors import MissingWeightsError
from cspace.io.untrusted import FormatError, parse_json

__all__ = [
    "COMPONENTS",
    "LatentFlowPipeline",
    "UNetVelocity",
    "build_latent_unet",
    "load_latent_pipeline",
    "quiet_loading",
    "read_pipeline_index",
    "train_latent_flow",
]

COMPONENTS = ("unet", "vae", "scheduler")


def build_latent_unet(latent_channels: int = 4, grid: int = 7, width: int = 64) -> UNet2DModel:
    """The velocity network: ``UNet2DModel`` on (latent_channels, grid, grid), one level of
    ``width`` channels (two ResNet blocks down, three up), attention in the mid block."""
    return UNet2DModel(
        sample_size=grid,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(width,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=2,
        norm_num_groups=min(32, width),
    )


class LatentFlowPipeline(DiffusionPipeline):
    """Unconditional latent flow matching: noise (B, c, h, w) -> Euler steps of the velocity
    ``unet`` -> ``vae.decode(x0 / scale + shift)`` -> images (B, 1, 28, 28)."""

    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        unet: UNet2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images it samples, its only size: the UNet's latent grid times the
        VAE's downsampling (2 per block after the first); (28, 28) for the shipped ones."""
        n = self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (n, n)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Sample ``batch_size`` images with ``num_inference_steps`` steps of the scheduler
        (Euler with the shipped ``FlowMatchEulerDiscreteScheduler``; ``2 n - 1`` model calls
        with ``FlowMatchHeunDiscreteScheduler`` swapped in, module docstring).

        ``output_type``: ``"pt"`` (tensor (B, 1, H, W) in [0, 1]), ``"np"`` (array
        (B, H, W, 1) in [0, 1]), ``"pil"`` (PIL images) or ``"latent"`` (the final normalised
        latents). ``latents``: the starting noise (B, c, h, w) instead of drawing it.
        """
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be pt, np, pil or latent; got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        dev, dtype = self.unet.device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=dev, dtype=dtype)
        elif tuple(latents.shape[1:]) != shape[1:]:
            raise ValueError(f"latents must have shape (B, {shape[1]}, {shape[2]}, {shape[3]}); "
                             f"got {tuple(latents.shape)}")  # fmt: skip
        else:
            latents = latents.to(dev, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=dev)
        for t in self.progress_bar(self.scheduler.timesteps):
            v = self.unet(latents, t.expand(latents.shape[0])).sample
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [0, 1] from final normalised latents (B, c, h, w), as
        ``__call__`` returns them: ``(clamp(vae.decode(x0 / scale + shift), -1, 1) + 1) / 2``
        (for latents drawn with ``output_type="latent"``, e.g. tested before decoding)."""
        vc = self.vae.config
        x = latents.to(self.vae.device) / vc.scaling_factor + (vc.shift_factor or 0.0)
        return ((self.vae.decode(x.to(self.vae.dtype)).sample.clamp(-1, 1) + 1) / 2).float()


def load_latent_pipeline(path: str | os.PathLike) -> LatentFlowPipeline:
    """Read a folder written by ``LatentFlowPipeline.save_pretrained`` (offline), after checking
    that ``model_index.json`` names this pipeline and every component folder is there.

    Raises:
        MissingWeightsError: no folder, no ``model_index.json``, or a component missing (named,
            with the command that makes the folder).
        ValueError: a ``model_index.json`` of another pipeline.
    """
    folder = Path(path)
    how = (
        "Train it with `cspace train pipeline --out DIR` (`--space plain` for the plain twin's "
        "pipeline; or cspace.models.latent_pipeline.train_latent_flow)"
    )
    index = folder / "model_index.json"
    if not index.is_file():
        raise MissingWeightsError(f"no latent flow pipeline at {folder}: {index} is missing. {how}")
    meta = read_pipeline_index(folder)
    if meta.get("_class_name") != LatentFlowPipeline.__name__:
        got = meta.get("_class_name")
        raise ValueError(f"{index} describes {got!r}, not a {LatentFlowPipeline.__name__}")
    for name in COMPONENTS:
        if name not in meta or not (folder / name / _CONFIG[name]).is_file():
            raise MissingWeightsError(
                f"the pipeline folder {folder} lacks its {name!r} component "
                f"({folder / name / _CONFIG[name]}): copy the whole folder again. {how}"
            )
    for name in ("unet", "vae"):
        weights = sorted((folder / name).glob("*.safetensors"))
        if not weights:
            raise MissingWeightsError(
                f"the pipeline folder {folder} has no weights for {name!r} "
                f"(no {folder / name}/*.safetensors; cspace never reads pickles). {how}"
            )
        check_weight_links(folder / name)  # the shipped vae/ weights are links
    with quiet_loading():
        return LatentFlowPipeline.from_pretrained(
            str(folder), local_files_only=True, low_cpu_mem_usage=False, use_safetensors=True
        )


#: the largest ``model_index.json`` read (real ones are under 1 KiB)
MAX_INDEX_BYTES = 1 << 16


def read_pipeline_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of ``folder/model_index.json`` (any diffusers pipeline folder), read as
    untrusted: at most :data:`MAX_INDEX_BYTES` (checked before reading), UTF-8 JSON of bounded
    depth (:func:`cspace.io.untrusted.parse_json`), an object. Raises ``OSError`` when it cannot
    be read and ``ValueError`` naming the file and what is wrong otherwise."""
    index = Path(folder) / "model_index.json"
    size = index.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise ValueError(f"{index}: it is {size:,} bytes, more than {MAX_INDEX_BYTES:,}")
    with open(index, "rb") as f:
        data = f.read(MAX_INDEX_BYTES + 1)
    try:
        meta = parse_json(data, max_bytes=MAX_INDEX_BYTES)
    except FormatError as err:
        raise ValueError(f"{index}: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{index}: it holds a JSON {type(meta).__name__}, not an object")
    return meta


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' "Loading pipeline components" bar while a pipeline folder is read
    (restored afterwards); the commands have their own progress display."""
    from diffusers.utils import logging as dlog

    was = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            dlog.enable_progress_bar()


_CONFIG = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


def _save_atomic(pipe: LatentFlowPipeline, out: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then rename it to ``out`` (which
    must not exist or be empty): a crash leaves no half-written pipeline at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            out.rmdir()  # empty (checked before training)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class UNetVelocity(torch.nn.Module):
    """``v(x, t) = unet(x, 1000 t).sample``: a ``UNet2DModel`` as the ``net(x, t)`` that
    :func:`cspace.models.flow.fit_velocity` trains (x: (B, c, h, w), t: (B,) in [0, 1])."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t * 1000).sample


def train_latent_flow(
    out_dir: str | os.PathLike,
    vae: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    width: int = 64,
    max_images: int | None = None,
    progress: bool = True,
    ema: float = 0.999,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: str | os.PathLike | None = None,
    vae_kind: str = "aligned",
) -> dict[str, Any]:
    r"""Train the velocity ``unet`` on the Fashion-MNIST train split's latents under the VAE
    folder ``vae`` (default: the shipped ``vae_kind`` one, ``"aligned"`` or ``"plain"``) and
    write the pipeline folder.

    ``L = E || unet((1 - s) x0 + s eps, 1000 s) - (eps - x0) ||^2``, ``s ~ U(0, 1)``, by the
    training loop of the digits flows (:func:`cspace.models.flow.fit_velocity`): AdamW,
    linear warm-up over 5% of ``steps`` then cosine decay to 5% of ``lr``, gradient norm
    clipped at 1, and the pipeline keeps the exponential moving average of the weights (decay
    ``min(ema, (1+n)/(10+n))``; ``ema=0`` keeps the raw weights). Everything random comes from
    ``seed``. ``checkpoint``: a safetensors file written every ``checkpoint_every`` steps;
    ``resume``: continue from one (same settings and the same latents: their SHA-256 is part of
    the settings), giving the same weights as one run. Both must lie outside ``out_dir``.
    ``out_dir`` must not exist or be empty (checked first). Returns the settings with
    ``final_loss`` (mean of the last 10% of steps), ``train_loss`` (the EMA net's loss on the
    first 5,000 latents, fixed draws) and ``wall_s``.
    """
    from cspace.models.data import fashion_mnist
    from cspace.models.encoders import Encoder
    from cspace.models.flow import MAX_LR, fit_velocity
    from cspace.models.vae import load_fashion_vae

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1); got {ema}")
    if (
        isinstance(width, bool)
        or not isinstance(width, int)
        or width < 1
        or (width > 32 and width % 32)
    ):
        raise ValueError(
            f"width must be a positive int, a multiple of 32 above 32 (the UNet's group norm "
            f"has min(32, width) groups); got {width!r}"
        )
    if not (math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise ValueError(f"lr must be in (0, {MAX_LR:g}]; got {lr}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"the output folder {out} exists and is not empty; pick a new one")
    check_output_folder(out, "the output folder (--out)")
    for path, flag in ((checkpoint, "--checkpoint"), (resume, "the checkpoint to resume")):
        if path is None:
            continue
        check_output_file(path, f"the checkpoint ({flag})")
        if Path(path).resolve().is_relative_to(out.resolve()):
            raise ValueError(
                f"the checkpoint {path} ({flag}) is inside the output folder {out}, which must "
                "be empty when the pipeline is saved; keep the checkpoint outside it"
            )
    t0 = time.perf_counter()
    autoencoder, meta = load_fashion_vae(vae_kind, vae)
    enc = Encoder(autoencoder, meta["scaling_factor"], meta["shift_factor"])
    x, _ = fashion_mnist("train", data)
    if max_images is not None:
        x = x[:max_images]
    z = enc.encode(x, batch_size=500).to(torch.float32).contiguous()  # (N, c, h, w), normalised
    if not bool(torch.isfinite(z).all()):
        raise ValueError("the VAE gave non-finite latents for the train split; check its weights")
    c, h = int(z.shape[1]), int(z.shape[2])
    # the latents' identity (VAE and images): a checkpoint of another space is not resumed
    digest = hashlib.sha256(z.numpy().tobytes()).hexdigest()
    settings = {
        "config": {"network": "UNet2DModel", "latent_channels": c, "grid": h, "width": width},
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "ema": float(ema),
        "time_dist": "uniform",
        "weight_decay": 0.0,
        "warmup": max(1, int(steps) // 20),
        "min_lr_ratio": 0.05,
        "grad_clip": 1.0,
        "n_train": int(z.shape[0]),
        "latents_sha256": digest,
    }
    net, metrics = fit_velocity(
        lambda: UNetVelocity(build_latent_unet(c, h, width)),
        z,
        settings,
        progress,
        checkpoint,
        checkpoint_every,
        resume,
        desc="latent flow",
    )
    unet = net.unet.eval()
    autoencoder.register_to_config(
        scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"])
    )
    pipe = LatentFlowPipeline(
        unet=unet, vae=autoencoder, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0)
    )
    _save_atomic(pipe, out)
    return {
        **{
            k: v for k, v in metrics.items() if k not in ("loss_curve", "n_train", "latents_sha256")
        },
        "width": width,
        "vae": vae_kind if vae is None else str(vae),
        "train_images": int(z.shape[0]),
        "loss_curve": metrics["loss_curve"],
        "wall_s": time.perf_counter() - t0,
        "out_dir": str(out),
    }
