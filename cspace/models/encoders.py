"""One encoder interface over our aligned VAE and any diffusers ``AutoencoderKL``.

An :class:`Encoder` maps images (B, C, H, W) in [-1, 1] to *normalised latents* (B, c, h, w),
decodes them back, and embeds latents as the C-space vectors that obstacles live in:

    z = (mean_of_posterior(image) - shift_factor) * scaling_factor       (diffusers' convention)
    image = decode(z / scaling_factor + shift_factor)
    embedding = flatten(z)                                               (B, c*h*w)

Flow models and guidance work on normalised latents, so a state of the sampler and an obstacle
embedding are directly comparable (the field's default flatten projection) - within one C-space:
:meth:`Encoder.space` is the :class:`~cspace.models.space.Space` record that obstacle sets,
classifiers and flows keep to refuse one another's embeddings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cspace.io.errors import MissingWeightsError
from cspace.models.shipped import FASHION_ENCODERS, SPACES, shipped
from cspace.models.space import Space, config_hash, weights_fingerprint

__all__ = ["Encoder", "EncoderError", "is_aligned_vae_folder", "load_encoder"]


class EncoderError(ValueError):
    """An encoder spec that names no loadable VAE (the message says what to pass instead)."""


class Encoder:
    """A VAE as the C-space map. Wraps a diffusers ``AutoencoderKL`` (ours or a user's).

    Args:
        vae: a ``diffusers.AutoencoderKL``.
        scaling_factor: multiplies latents after the shift (``vae.config.scaling_factor`` if None).
        shift_factor: subtracted from latents first (``vae.config.shift_factor`` or 0 if None).
        name: a short description for reports.

    The weights' fingerprint for :meth:`space` is taken here, from the encoding half of the VAE
    (``encoder.*`` and ``quant_conv.*``: what the embeddings depend on, so a VAE with a
    fine-tuned decoder keeps its C-space), compared with a tolerance that accepts the same
    weights in float16 or bfloat16.
    """

    def __init__(
        self,
        vae,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        name: str = "vae",
    ):
        self.vae = vae.eval()
        cfg = vae.config
        self.scaling_factor = float(
            scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", 1.0)
        )
        shift = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        #: whether the VAE works only at :attr:`image_size` (a cspace VAE, trained at one size)
        self.size_fixed = False
        self.name = name
        self.config_hash = config_hash(dict(cfg), self.scaling_factor, self.shift_factor)
        state = vae.state_dict()
        encoding = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
        self.weights_fingerprint = weights_fingerprint(encoding or state)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The (H, W) of the images this VAE is made for: its config's ``sample_size`` (the
        digits VAEs: 8 x 8; SD 1.5's VAE: 512 x 512), or None when the config has none."""
        size = getattr(self.vae.config, "sample_size", None)
        if isinstance(size, int) and size > 0:
            return (size, size)
        if isinstance(size, list | tuple) and len(size) == 2 and all(int(v) > 0 for v in size):
            return (int(size[0]), int(size[1]))
        return None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_diffusers(
        cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> Encoder:
        """Load a diffusers ``AutoencoderKL`` (SD, SDXL, FLUX VAEs) from a local folder.

        The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (a pipeline
        folder with ``subfolder="vae"`` works too). Nothing is downloaded.
        """
        from diffusers import AutoencoderKL

        p = Path(path)
        where = p / subfolder if subfolder else p
        if not (where / "config.json").is_file():
            raise MissingWeightsError(
                f"no diffusers VAE at {where} (config.json missing). Download it on a machine with "
                "network access, e.g. `hf download stabilityai/sd-vae-ft-mse --local-dir DIR`, "
                "and pass that DIR"
            )
        from cspace.io.checks import check_weight_links

        check_weight_links(where)  # a link leading nowhere: named, not diffusers' search for .bin
        # low_cpu_mem_usage=False: the plain load, without diffusers' warning that `accelerate`
        # (which the fast path needs, and which is not a dependency) is missing
        vae = AutoencoderKL.from_pretrained(
            str(p), subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False
        )
        return cls(vae, name=kwargs.pop("name", f"diffusers:{where}"), **kwargs)

    @classmethod
    def from_aligned(cls, path: str | os.PathLike | None = None) -> Encoder:
        """Load a cspace aligned VAE folder (``manifest.json`` and its weights,
        :func:`cspace.models.vae.load_aligned_vae`, or an older layout); default: the digits
        VAE shipped in the package."""
        from cspace.models.vae import load_aligned_vae

        vae, meta = load_aligned_vae(path)
        enc = cls(
            vae,
            scaling_factor=meta["scaling_factor"],
            shift_factor=meta["shift_factor"],
            name=meta.get("name", "aligned-vae"),
        )
        enc.size_fixed = enc.image_size is not None  # trained at that size only
        return enc

    # ------------------------------------------------------------------ the map
    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"{self.name} expects images (B, {self.channels}, H, W); got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"{self.name} needs H and W divisible by {self.downsample}; got {h}x{w}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> normalised latents (B, c, H/f, W/f) (posterior mean)."""
        self._check(images)
        p = next(self.vae.parameters())
        outs = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(device=p.device, dtype=p.dtype)
            mean = self.vae.encode(x).latent_dist.mean
            outs.append((mean - self.shift_factor) * self.scaling_factor)
        return torch.cat(outs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, C, H, W), clamped to [-1, 1]."""
        p = next(self.vae.parameters())
        outs = []
        for s in range(0, latents.shape[0], batch_size):
            z = latents[s : s + batch_size].to(device=p.device, dtype=p.dtype)
            outs.append(
                self.vae.decode(z / self.scaling_factor + self.shift_factor).sample.clamp(-1, 1)
            )
        return torch.cat(outs)

    @staticmethod
    def embed(latents: torch.Tensor) -> torch.Tensor:
        """C-space embeddings of normalised latents: (B, c*h*w)."""
        return latents.reshape(latents.shape[0], -1)

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        return (
            self.latent_channels,
            image_size[0] // self.downsample,
            image_size[1] // self.downsample,
        )

    def space(self, image_size: tuple[int, int] | int = (8, 8)) -> Space:
        """The C-space of this encoder for images of ``image_size`` (H, W) (an int: square)."""
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        h, w = (int(s) for s in image_size)
        if h < 1 or w < 1 or h % self.downsample or w % self.downsample:
            raise ValueError(
                f"{self.name} needs positive H and W divisible by {self.downsample}; got {h}x{w}"
            )
        shape = self.latent_shape((h, w))
        return Space(
            encoder=self.name,
            config_hash=self.config_hash,
            weights=self.weights_fingerprint,
            image_size=(h, w),
            channels=self.channels,
            latent_shape=shape,
            dim=shape[0] * shape[1] * shape[2],
        )


def is_aligned_vae_folder(path: str | os.PathLike) -> bool:
    """A cspace aligned VAE folder: a manifest.json of format ``cspace.vae``, or (the older
    layout) a config.json with a "cspace" marker, or model.safetensors next to a config.json
    that holds "scaling_factor"."""
    from cspace.io.folder import is_folder_of
    from cspace.models.vae import VAE_KIND

    path = Path(path)
    if (path / "manifest.json").exists():
        return is_folder_of(path, VAE_KIND)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(cfg, dict):
        return False
    if "cspace" in cfg or str(cfg.get("format", "")).startswith("cspace"):
        return True
    return (path / "model.safetensors").is_file() and "scaling_factor" in cfg


def load_encoder(spec: str | os.PathLike) -> Encoder:
    """An :class:`Encoder` from a spec.

    * ``digits``: the aligned digits VAE shipped in the package (``Encoder.from_aligned()``);
    * ``digits-plain``: the same VAE trained without the alignment loss (``weights/vae_plain``);
    * ``fashion`` / ``fashion-plain``: the shipped Fashion-MNIST VAEs, aligned and plain
      (28x28 images; the latents of ``weights/fashion_pipeline`` / ``fashion_pipeline_plain``);
    * a folder: a cspace aligned VAE (see :func:`is_aligned_vae_folder`) is loaded with
      ``Encoder.from_aligned``, anything else as a diffusers ``AutoencoderKL`` (a pipeline folder
      with a ``vae/`` subfolder works too).

    Raises :class:`EncoderError` with what to do when weights are missing.
    """
    spec = str(spec)
    path = Path(spec)
    try:
        if spec in SPACES:
            return Encoder.from_aligned(shipped(SPACES[spec][0]))
        if spec in FASHION_ENCODERS:
            return Encoder.from_aligned(shipped(FASHION_ENCODERS[spec]))
        if path.is_dir():
            if is_aligned_vae_folder(path):
                return Encoder.from_aligned(path)
            if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
                return Encoder.from_diffusers(path, subfolder="vae")
            return Encoder.from_diffusers(path)
    except ImportError as err:
        raise EncoderError(
            f"encoder {spec!r} cannot be loaded: {err} (this cspace build lacks the aligned-VAE "
            "loader; pass --encoder PATH to a diffusers VAE folder)"
        ) from err
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        if isinstance(err, EncoderError):
            raise
        raise EncoderError(f"encoder {spec!r} cannot be loaded: {err}") from err
    if path.exists():
        raise EncoderError(f"--encoder {spec!r} is a file; pass a folder holding a VAE")
    raise EncoderError(
        f"unknown encoder {spec!r}: use {', '.join([*SPACES, *FASHION_ENCODERS])}, or the path of a folder "
        "holding a cspace aligned VAE or a diffusers AutoencoderKL"
    )
