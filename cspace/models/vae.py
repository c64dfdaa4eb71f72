"""The C-space VAE: a diffusers ``AutoencoderKL`` aligned to a frozen teacher with VA-VAE's VF loss.

VA-VAE (Yao et al. 2025, "Reconstruction vs. generation", hustvl/LightningDiT,
``vavae/ldm/modules/losses/contperceptual.py``) adds a
*vision-foundation (VF) alignment loss* to the usual VAE objective:

* a 1x1 convolution without bias projects the latent ``z`` (B, c, h, w) to the teacher's width:
  ``z' = P z`` (B, C_t, h, w), read as tokens (B, T = h*w, C_t); the teacher gives ``f``
  (B, T, C_t) on the same grid (a DINOv2 grid is resampled to the latent grid);
* marginal cosine similarity, per token: ``L_mcos = mean_{b,t} relu(1 - m1 - cos(z'_bt, f_bt))``
  with ``m1 = 0.5``;
* marginal distance-matrix similarity, per image over all token pairs:
  ``L_mdms = mean_{b,i,j} relu(|cos(z'_bi, z'_bj) - cos(f_bi, f_bj)| - m2)`` with ``m2 = 0.25``;
* ``L_vf = L_mcos + L_mdms``, weighted by ``vf_weight`` (0.1) times the adaptive factor
  ``||grad_W L_nll|| / (||grad_W L_vf|| + 1e-4)`` (clamped to [0, 1e8], detached) where ``W`` is
  the encoder's last convolution weight (``encoder.conv_out.weight``).

The total loss here is ``L_nll + kl_weight * L_kl + vf_weight * adaptive * L_vf`` with
``L_nll`` the squared error summed over pixels (Gaussian likelihood, fixed variance: MSE is the
metric we report, and at 8x8 it keeps strokes sharp) and ``L_kl`` the KL divergence of the
posterior to N(0, I) summed over latent elements, both averaged over the batch (LDM's
convention). ``kl_weight`` is small (1e-3) so reconstructions stay sharp, and it is warmed up
linearly over the first ``kl_warmup`` (500) steps. Training images are randomly shifted by up to
one pixel: with 896 training images the VAE otherwise memorises them (heldout reconstruction
error 100x the training error).

Seeds matter at this size: with seed 0 the plain 2-channel VAE lets its second latent channel
drift towards the prior (posterior std of that channel ~1, heldout MSE 0.015 instead of 0.004
with seeds 1 and 2); KL warm-up, KL weight 1e-4, free bits, a small initial posterior variance
and batch 128 did not prevent it. Check ``metrics`` and the per-channel posterior spread when
comparing runs.

Shapes for the shipped digits VAE: images (B, 1, 8, 8) -> latents (B, 2, 4, 4), a 32-d C-space;
the digits teacher (:class:`cspace.models.teachers.DigitsTeacher`, the stand-in for DINOv2 at 8x8) has
a 4x4 grid of 64-d tokens, so ``P`` is a (64, 2, 1, 1) convolution.

Files (a folder in cspace's safe-folder format, :mod:`cspace.io.folder`): ``manifest.json``
(format ``cspace.vae`` v4: the :class:`AlignedVAEConfig`, ``name``, ``scaling_factor``,
``shift_factor``, ``vf_weight``, teacher, steps, seed, metrics, stored names, sizes and SHA-256
of the weights), ``vae-<hash>.safetensors`` (the AutoencoderKL's state under diffusers' names,
serialised as diffusers' ``save_pretrained`` serialises ``diffusion_pytorch_model.safetensors``,
so that a pipeline folder's ``vae/`` can hold the very same file; the shipped Fashion-MNIST
pipelines link to it instead of a copy) and, when ``vf_weight > 0``,
``projection-<hash>.safetensors`` (``proj.weight``: the VF projection).
:func:`load_aligned_vae` reads them (and the older layouts: one ``model.safetensors`` with
``vae.*`` and ``proj.weight`` in v2 and v3 manifests, and ``config.json`` with
``model_sha256`` + ``model.safetensors``; :mod:`cspace.io.legacy`); :func:`train_vae` writes them with :func:`save_aligned_vae`
(crash-safe, serialised with other writers). Training checkpoints (``checkpoint/`` inside
the folder) make an interrupted run resume where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cspace.io.checks import check_output_folder
from cspace.io.errors import FolderError, MissingWeightsError
from cspace.io.files import save_safetensors_atomic, write_json_atomic
from cspace.io.folder import (
    FolderKind,
    check_int,
    check_number,
    check_target,
    read_folder,
    write_folder,
)
from cspace.io.legacy import (
    VAE_PROJECTION_FILE,
    VAE_STATE_FILE,
    VAE_V1,
    VAE_V2,
    VAE_V3,
)
from cspace.io.untrusted import FormatError, check_safetensors
from cspace.io.weights import build_within, check_finite_state, check_state_dict, weights_values
from cspace.models.data import shift_images
from cspace.models.shipped import shipped
from cspace.models.teachers import Teacher, load_teacher

__all__ = [
    "VAE_DATA",
    "VAE_KIND",
    "AlignedVAEConfig",
    "VAEWeightsError",
    "VFAlignment",
    "adaptive_vf_weight",
    "build_autoencoder",
    "evaluate_fashion_vae",
    "evaluate_vae",
    "fashion_vae_config",
    "latent_stats",
    "load_aligned_vae",
    "load_fashion_vae",
    "match_token_grid",
    "save_aligned_vae",
    "train_vae",
    "vf_loss",
]

VAE_FORMAT = "cspace.vae"
VAE_FORMAT_VERSION = 4
CHECKPOINT_DIR = "checkpoint"


class VAEWeightsError(FolderError):
    """A VAE folder that exists but cannot be used (corrupt, foreign, mismatched)."""


@dataclass
class AlignedVAEConfig:
    """Architecture of the C-space VAE and the weights and margins of its loss.

    The default is the shipped digits VAE: 8x8x1 images, two diffusers blocks (32, 64 channels),
    latents (2, 4, 4) - a 32-d C-space. ``kl_weight`` multiplies the KL term (per-image sum),
    linearly warmed up over ``kl_warmup`` steps; the margins and weights are VA-VAE's VF loss
    settings (m2 = ``distmat_margin``, m1 = ``cos_margin``).
    """

    in_channels: int = 1
    sample_size: int = 8
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 2
    norm_num_groups: int = 8
    kl_weight: float = 1e-3
    kl_warmup: int = 500
    distmat_margin: float = 0.25
    cos_margin: float = 0.5
    distmat_weight: float = 1.0
    cos_weight: float = 1.0

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be divisible by norm_num_groups="
                f"{self.norm_num_groups}; got {self.block_out_channels}"
            )
        if self.sample_size % self.downsample:
            raise ValueError(
                f"sample_size {self.sample_size} is not divisible by the downsampling factor "
                f"{self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_grid(self) -> int:
        """Latent tokens per side (``sample_size / downsample``)."""
        return self.sample_size // self.downsample

    @property
    def latent_dim(self) -> int:
        return self.latent_channels * self.latent_grid**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignedVAEConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown AlignedVAEConfig fields {unknown}")
        return cls(**d)


#: the data sets a C-space VAE trains on (``train_vae(data=...)``)
VAE_DATA = ("digits", "fashion")


def fashion_vae_config() -> AlignedVAEConfig:
    """The Fashion-MNIST VAE: 28x28x1 images, three diffusers blocks (16, 32, 64 channels;
    28 -> 14 -> 7 pixels), latents (4, 7, 7) - a 196-d C-space shaped like Stable Diffusion's
    (a few channels on a spatial grid, downsampled 4x); the VF loss pulls its 7x7 grid towards
    the Fashion-MNIST teacher's 7x7 patch tokens."""
    return AlignedVAEConfig(
        in_channels=1, sample_size=28, block_out_channels=(16, 32, 64), latent_channels=4
    )


def build_autoencoder(cfg: AlignedVAEConfig | None = None):
    """A diffusers ``AutoencoderKL`` for ``cfg`` (randomly initialised from torch's global RNG)."""
    from diffusers import AutoencoderKL

    cfg = cfg or AlignedVAEConfig()
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
    )


# ---------------------------------------------------------------------- the VF loss
def match_token_grid(tokens: torch.Tensor, grid: int, interpolate: bool = False) -> torch.Tensor:
    """Teacher tokens (B, T, C) on a square grid -> (B, grid*grid, C).

    Identity when ``T == grid**2``. Otherwise, with ``interpolate`` (a DINOv2 teacher), the
    teacher grid is area-resampled (antialiased bilinear) down to ``grid``. Raises ValueError when
    T is not a square, or the grids differ and may not (or cannot: teacher grid smaller) be
    resampled.
    """
    if tokens.ndim != 3:
        raise ValueError(f"teacher tokens must be (B, T, C); got {tuple(tokens.shape)}")
    b, t, c = tokens.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"teacher gives {t} tokens: not a square grid")
    if side == grid:
        return tokens
    if not interpolate:
        raise ValueError(
            f"the teacher's token grid is {side}x{side} but the latent grid is {grid}x{grid}; "
            "this teacher's grid cannot be resampled: pick a VAE whose latent grid "
            f"(sample_size / 2**(len(block_out_channels) - 1)) is {side}"
        )
    if side < grid:
        raise ValueError(
            f"the teacher's token grid {side}x{side} is coarser than the latent grid "
            f"{grid}x{grid}: use a larger teacher img_size (>= {14 * grid} for DINOv2)"
        )
    x = tokens.transpose(1, 2).reshape(b, c, side, side)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", antialias=True, align_corners=False)
    return x.flatten(2).transpose(1, 2)


def vf_loss(
    z_tokens: torch.Tensor,
    f_tokens: torch.Tensor,
    distmat_margin: float = 0.25,
    cos_margin: float = 0.5,
    distmat_weight: float = 1.0,
    cos_weight: float = 1.0,
    return_terms: bool = False,
):
    """VA-VAE's VF loss between projected latent tokens and teacher tokens.

    Args:
        z_tokens: projected latent ``z'`` (B, T, C).
        f_tokens: teacher features ``f`` (B, T, C) on the same grid (detached here).

    Returns:
        ``cos_weight * L_mcos + distmat_weight * L_mdms`` (a scalar), and with ``return_terms``
        also ``{"mcos": L_mcos, "mdms": L_mdms}`` where
        ``L_mcos = relu(1 - cos_margin - cos(z'_t, f_t)).mean()`` over (B, T) and
        ``L_mdms = relu(|Cz - Cf| - distmat_margin).mean()`` over (B, T, T), with ``Cz``/``Cf``
        the per-image token cosine-similarity matrices.
    """
    if z_tokens.shape != f_tokens.shape:
        raise ValueError(
            f"projected latent tokens {tuple(z_tokens.shape)} and teacher tokens "
            f"{tuple(f_tokens.shape)} differ in shape"
        )
    f_tokens = f_tokens.detach()
    zn = F.normalize(z_tokens, dim=-1)
    fn = F.normalize(f_tokens, dim=-1)
    cz = zn @ zn.transpose(1, 2)
    cf = fn @ fn.transpose(1, 2)
    mdms = F.relu((cz - cf).abs() - distmat_margin).mean()
    mcos = F.relu(1.0 - cos_margin - F.cosine_similarity(z_tokens, f_tokens, dim=-1)).mean()
    total = cos_weight * mcos + distmat_weight * mdms
    if return_terms:
        return total, {"mcos": mcos, "mdms": mdms}
    return total


def adaptive_vf_weight(
    nll: torch.Tensor, vf: torch.Tensor, last_layer: torch.Tensor, vf_weight: float = 0.1
) -> torch.Tensor:
    """VA-VAE's adaptive weight: ``vf_weight * ||d nll/dW|| / (||d vf/dW|| + 1e-4)``, detached.

    ``W`` = ``last_layer`` (the encoder's last conv weight); the ratio is clamped to [0, 1e8].
    """
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf, last_layer, retain_graph=True, allow_unused=True)[0]
    if g_vf is None:
        raise ValueError("the VF loss does not depend on last_layer: nothing to align")
    ratio = torch.linalg.vector_norm(g_nll) / (torch.linalg.vector_norm(g_vf) + 1e-4)
    return (ratio.clamp(0.0, 1e8) * vf_weight).detach()


class VFAlignment(nn.Module):
    """The 1x1 projection (no bias) from latent channels to the teacher width, and the VF loss.

    ``forward(z, f)``: latents (B, c, h, w) with h == w, teacher tokens (B, T, C_t) -> VF loss
    (after matching the teacher grid to the latent grid with :func:`match_token_grid`).
    """

    def __init__(
        self, latent_channels: int, teacher_width: int, cfg: AlignedVAEConfig | None = None
    ):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, teacher_width, kernel_size=1, bias=False)
        self.cfg = cfg or AlignedVAEConfig(latent_channels=latent_channels)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) -> projected tokens (B, h*w, C_t)."""
        return self.proj(z).flatten(2).transpose(1, 2)

    def forward(
        self,
        z: torch.Tensor,
        f_tokens: torch.Tensor,
        interpolate: bool = False,
        return_terms: bool = False,
    ):
        h, w = z.shape[-2:]
        if h != w:
            raise ValueError(f"the VF loss needs a square latent grid; got {h}x{w}")
        f = match_token_grid(f_tokens, h, interpolate=interpolate)
        c = self.cfg
        return vf_loss(
            self.project(z),
            f,
            distmat_margin=c.distmat_margin,
            cos_margin=c.cos_margin,
            distmat_weight=c.distmat_weight,
            cos_weight=c.cos_weight,
            return_terms=return_terms,
        )


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def _posterior_means(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat(
        [
            vae.encode(images[s : s + batch_size]).latent_dist.mean
            for s in range(0, images.shape[0], batch_size)
        ]
    )


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: the mean and 1/std of the posterior means (all elements)."""
    m = _posterior_means(vae, images).double()
    return float(m.mean()), float(1.0 / m.std())


@torch.no_grad()
def evaluate_vae(
    vae, scaling_factor: float, shift_factor: float, batch_size: int = 256
) -> dict[str, float]:
    """Metrics of a digits VAE.

    * ``heldout_mse``: mean squared error of ``decode(posterior mean)`` (clamped to [-1, 1]) on
      the heldout split, per pixel, images in [-1, 1];
    * ``knn_accuracy``: 5-nearest-neighbour (Euclidean) class accuracy on heldout of the C-space
      embeddings ``flatten((mean - shift) * scale)``, the classifier fit on the train split;
    * ``linear_probe_accuracy``: the same with a logistic regression (lbfgs, C=1).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    from cspace.models.data import digits

    vae.eval()
    xt, yt = digits("train")
    xh, yh = digits("heldout")
    mt = _posterior_means(vae, xt, batch_size)
    mh = _posterior_means(vae, xh, batch_size)
    rec = torch.cat(
        [
            vae.decode(mh[s : s + batch_size]).sample.clamp(-1, 1)
            for s in range(0, mh.shape[0], batch_size)
        ]
    )
    et = ((mt - shift_factor) * scaling_factor).flatten(1).numpy()
    eh = ((mh - shift_factor) * scaling_factor).flatten(1).numpy()
    knn = KNeighborsClassifier(n_neighbors=5).fit(et, yt.numpy())
    probe = LogisticRegression(max_iter=5000).fit(et, yt.numpy())
    return {
        "heldout_mse": float(((rec - xh) ** 2).mean()),
        "knn_accuracy": float(knn.score(eh, yh.numpy())),
        "linear_probe_accuracy": float(probe.score(eh, yh.numpy())),
    }


@torch.no_grad()
def evaluate_fashion_vae(
    vae,
    scaling_factor: float,
    shift_factor: float,
    data: str | os.PathLike | None = None,
    batch_size: int = 500,
    train: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Metrics of a Fashion-MNIST VAE.

    * ``heldout_mse``: per-pixel squared error of ``decode(posterior mean)`` (clamped to
      [-1, 1]) on the shipped held-out slice (2,000 test images), images in [-1, 1];
      ``heldout_psnr``: ``10 log10(1 / mse01)`` dB with ``mse01 = heldout_mse / 4`` (pixels on
      [0, 1]); ``test_mse`` and ``test_psnr`` the same on the full test split;
    * kNN (5 neighbours) and linear-probe accuracy of the C-space embeddings
      ``flatten((mean - shift) * scale)`` (196-d), fit on the train split
      (:func:`cspace.models.metrics.embedding_accuracy`): ``heldout_knn_accuracy``,
      ``heldout_linear_probe_accuracy``, ``test_knn_accuracy``, ``test_linear_probe_accuracy``;
      ``knn_accuracy`` and ``linear_probe_accuracy`` repeat the held-out ones (the digits
      report's names).

    ``train``: the train split's (images, labels) if already loaded (else read from ``data``).
    """
    from cspace.models.data import fashion_heldout, fashion_mnist
    from cspace.models.metrics import embedding_accuracy

    vae.eval()
    xt, yt = train if train is not None else fashion_mnist("train", data)
    sets = {"heldout": fashion_heldout(), "test": fashion_mnist("test", data)}
    out: dict[str, float] = {}
    tests = {}
    for name, (x, y) in sets.items():
        m = _posterior_means(vae, x, batch_size)
        rec = torch.cat(
            [
                vae.decode(m[s : s + batch_size]).sample.clamp(-1, 1)
                for s in range(0, m.shape[0], batch_size)
            ]
        )
        mse = float(((rec - x) ** 2).double().mean())
        out[f"{name}_mse"] = mse
        out[f"{name}_psnr"] = 10 * math.log10(4.0 / max(mse, 1e-12))
        tests[name] = (((m - shift_factor) * scaling_factor).flatten(1), y)
    et = ((_posterior_means(vae, xt, batch_size) - shift_factor) * scaling_factor).flatten(1)
    out.update(embedding_accuracy(et, yt, tests))
    out["knn_accuracy"] = out["heldout_knn_accuracy"]
    out["linear_probe_accuracy"] = out["heldout_linear_probe_accuracy"]
    return out


# ---------------------------------------------------------------------- files
def _missing_vae(folder: Path, what: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"aligned VAE: {what}. Train it with `cspace train vae --out {folder}` "
        "(or cspace.models.vae.train_vae); the shipped digits VAEs live in cspace/weights/vae_aligned "
        "and cspace/weights/vae_plain"
    )


def _missing_folder(folder: Path, detail: str) -> MissingWeightsError:
    where = f"no folder {folder}" if detail == "the folder is missing" else f"{folder}: {detail}"
    return _missing_vae(folder, where)


#: the VAE's folder kind (:mod:`cspace.io.folder`)
VAE_KIND = FolderKind(
    format=VAE_FORMAT,
    version=VAE_FORMAT_VERSION,
    what="aligned-VAE",
    a_what="a cspace VAE folder",
    error=VAEWeightsError,
    files=(VAE_STATE_FILE,),
    optional=(VAE_PROJECTION_FILE,),
    fix="retrain it (cspace train vae) or restore the folder from a copy",
    missing=_missing_folder,
    legacy=(VAE_V1, VAE_V2, VAE_V3),
)


def save_aligned_vae(
    path: str | os.PathLike,
    vae,
    meta: dict[str, Any],
    projection: VFAlignment | None = None,
    *,
    allow: tuple[str, ...] = (),
) -> Path:
    """Write a VAE folder (what :func:`train_vae` writes at the end; crash-safe and serialised
    with other writers, :func:`cspace.io.folder.write_folder`); returns the path.

    ``vae``: the ``AutoencoderKL`` (saved as ``vae.safetensors``, byte for byte diffusers'
    ``diffusion_pytorch_model.safetensors``); ``projection``: the VF projection
    (``projection.safetensors``: ``proj.weight``), if any; ``meta``: the manifest fields, at
    least ``config`` (an :meth:`AlignedVAEConfig.to_dict`), ``scaling_factor``,
    ``shift_factor`` and ``teacher_width`` (None without a projection); ``format``,
    ``format_version``, ``model_sha256`` and ``projection`` are dropped (the manifest has its
    own), so the meta :func:`load_aligned_vae` returns can be saved again. ``allow``: entries
    an existing folder may hold besides a VAE (e.g. the training ``checkpoint``); they are
    kept.
    """
    from safetensors.torch import save

    def blob(module, metadata=None) -> bytes:
        state = module.state_dict().items()
        return save({k: v.detach().to("cpu").contiguous() for k, v in state}, metadata=metadata)

    # the AutoencoderKL's file is what diffusers' save_pretrained writes for it, byte for byte
    files = {VAE_STATE_FILE: blob(vae, {"format": "pt"})}
    if projection is not None:
        files[VAE_PROJECTION_FILE] = blob(projection)
    drop = ("format", "format_version", "model_sha256", "projection")  # load_aligned_vae's meta
    fields = {k: v for k, v in meta.items() if k not in drop}
    return write_folder(path, VAE_KIND, fields, files, allow=allow)


def load_aligned_vae(path: str | os.PathLike | None = None, with_projection: bool = False):
    """Load a VAE folder made by :func:`train_vae` -> ``(AutoencoderKL, meta)``.

    ``path`` None: the shipped digits VAE (``cspace/weights/vae_aligned``). ``meta`` is the
    manifest's fields (format, config, name, ``scaling_factor``, ``shift_factor``, training
    settings, metrics) plus ``model_sha256`` (of the AutoencoderKL's ``vae.safetensors``; for a
    folder of an older layout, of that file as the split on reading makes it); with
    ``with_projection``
    also ``meta["projection"]``, the trained VF projection (or None). The model is in eval mode.
    Folders in the older ``config.json`` layout load too.

    Raises:
        MissingWeightsError: the folder or its weights file is missing.
        VAEWeightsError (a ValueError): a foreign, corrupt or newer folder (size, SHA-256).
        ValueError: weights whose keys/shapes do not match the config.
    """
    from safetensors.torch import load

    folder = Path(path) if path is not None else shipped("vae_aligned")
    read = read_folder(folder, VAE_KIND)
    w_file = read.file(VAE_STATE_FILE)
    meta = {
        "format": VAE_FORMAT,
        "format_version": VAE_FORMAT_VERSION,
        **read.fields,
        "model_sha256": read.sha256(VAE_STATE_FILE),
    }
    try:
        cfg = AlignedVAEConfig.from_dict(read.get("config"))
    except (TypeError, ValueError, OverflowError) as err:
        raise VAEWeightsError(f"{read.mpath} lacks or has a bad field: {err}", read.mpath) from err
    scaling = check_number(read.get("scaling_factor"), "scaling_factor", read.mpath, VAE_KIND)
    shift = check_number(read.get("shift_factor"), "shift_factor", read.mpath, VAE_KIND)
    width = meta.get("teacher_width")
    if width is not None:
        width = check_int(width, "teacher_width", read.mpath, VAE_KIND, 0, 1 << 20)
    unknown = sorted(set(read.files) - {VAE_STATE_FILE, VAE_PROJECTION_FILE})
    if unknown:
        raise VAE_KIND.fail(
            f"{read.mpath} lists files a VAE folder does not hold: {unknown[:5]}", read.mpath
        )
    has_proj = VAE_PROJECTION_FILE in read.files
    p_file = read.file(VAE_PROJECTION_FILE) if has_proj else None
    if bool(width) != has_proj:
        if has_proj:
            try:
                keys = sorted(check_safetensors(read.files[VAE_PROJECTION_FILE]))
            except FormatError:
                keys = ["(unreadable)"]
            what = f"the projection's tensors {keys[:5]} in {p_file.name}"
        else:
            what = f"no projection ({VAE_PROJECTION_FILE} is not listed)"
        raise VAEWeightsError(
            f"{read.mpath}: teacher_width {width!r} but {what}; a VF projection is saved "
            "exactly when there is a teacher width; retrain it or restore the folder",
            read.mpath,
        )
    values = weights_values(read.files[VAE_STATE_FILE], w_file, VAEWeightsError)
    if has_proj:
        values += weights_values(read.files[VAE_PROJECTION_FILE], p_file, VAEWeightsError)
    try:
        vae, proj = build_within(
            lambda: (
                build_autoencoder(cfg),
                VFAlignment(cfg.latent_channels, width, cfg) if width else None,
            ),
            values,
            w_file,
            read.mpath,
            VAEWeightsError,
        )
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:
        if isinstance(err, VAEWeightsError):
            raise
        raise VAEWeightsError(f"{read.mpath} has a bad config: {err}", read.mpath) from err

    def state_of(name: str, where: Path) -> dict:
        try:
            return load(read.files[name])
        except Exception as err:  # safetensors raises its own error types
            raise VAEWeightsError(
                f"{where} is not a readable safetensors file: {err}", where
            ) from err

    def checked(module, name: str, where: Path, what: str) -> dict:
        state = state_of(name, where)
        try:
            check_state_dict(module, state, where, what)
        except ValueError as err:
            raise VAE_KIND.fail(str(err), where) from None
        check_finite_state(state, where, VAE_KIND)
        return state

    vae_state = checked(vae, VAE_STATE_FILE, w_file, "VAE")
    if proj is not None:
        proj.load_state_dict(checked(proj, VAE_PROJECTION_FILE, p_file, "VF projection"))
    vae.load_state_dict(vae_state)
    vae.eval()
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    meta.setdefault("name", f"aligned-vae:{folder.name}")
    if with_projection:
        meta["projection"] = proj
    return vae, meta


def load_fashion_vae(kind: str = "aligned", path: str | os.PathLike | None = None):
    """The Fashion-MNIST VAE ``kind`` (``"aligned"``: with the VF loss against the
    self-supervised teacher; ``"plain"``: its twin without) -> ``(AutoencoderKL, meta)``, as
    :func:`load_aligned_vae`; ``path`` None: the shipped ``cspace/weights/fashion_vae_<kind>``.

    Raises:
        MissingWeightsError: the folder is missing; the message gives the command that trains it.
    """
    if kind not in ("aligned", "plain"):
        raise ValueError(f"kind must be 'aligned' or 'plain'; got {kind!r}")
    folder = Path(path) if path is not None else shipped(f"fashion_vae_{kind}")
    try:
        return load_aligned_vae(folder)
    except MissingWeightsError as err:
        vf = "--vf-weight 0.1 --teacher fashion" if kind == "aligned" else "--vf-weight 0"
        raise MissingWeightsError(
            f"Fashion-MNIST VAE ({kind}): {err}. For this one: `cspace train vae --data fashion "
            f"{vf} --steps 1000 --seed 0 --out {folder}` (needs the Fashion-MNIST files, see "
            "cspace.models.data.find_fashion_mnist"
            + (
                ", and the teacher: cspace train teacher --data fashion)"
                if kind == "aligned"
                else ")"
            )
        ) from err


# ---------------------------------------------------------------------- training
def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            out[f"optim.{idx}.{key}"] = (
                val if torch.is_tensor(val) else torch.tensor(val, dtype=torch.float64)
            )
    return out


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": groups})


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Epoch-wise shuffling that depends only on (seed, step): resumable without RNG state."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


def _diverged(step: int, what: str, vf_weight: float) -> str:
    return (
        f"VAE training diverged at step {step}: {what}; nothing was saved. Lower --vf-weight "
        f"(got {vf_weight:g}; the shipped VAE uses 0.1) or the learning rate"
    )


def train_vae(
    out_dir: str | os.PathLike,
    vf_weight: float = 0.1,
    teacher: str | Teacher | None = "digits",
    steps: int = 3000,
    batch_size: int = 64,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    *,
    cfg: AlignedVAEConfig | None = None,
    teacher_weights: str | os.PathLike | None = None,
    lr: float = 2e-3,
    warmup: int = 100,
    shift_augment: int = 1,
    checkpoint_every: int = 250,
    keep_checkpoint: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    data: str = "digits",
    data_dir: str | os.PathLike | None = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Train the C-space VAE on the digits (or Fashion-MNIST) train split and write it to
    ``out_dir``.

    Args:
        out_dir: output folder: ``manifest.json`` and the weights at the end (one
            crash-safe save; an existing folder must be a VAE folder, empty, or hold only the
            checkpoint), and ``checkpoint/`` (model + optimizer in safetensors; step, seed and
            settings in JSON; the random state is a function of (seed, step)) every
            ``checkpoint_every`` steps.
        vf_weight: the VF loss weight (times VA-VAE's adaptive factor); 0 trains the plain VAE
            (no teacher, no projection, otherwise the same run: same init, batches and noise).
        teacher: ``"digits"``, a DINOv2 name, a teacher folder or a :class:`Teacher`.
        teacher_weights: weights file for a DINOv2 teacher (or a digits teacher folder).
        steps, batch_size, seed: the run. Everything random derives from ``seed`` and the step
            number, so a run is deterministic and an interrupted run resumes exactly.
        resume: continue from ``out_dir/checkpoint`` if present (its settings must match).
        progress: show a tqdm bar.
        cfg: the architecture and loss settings (default :class:`AlignedVAEConfig`).
        lr, warmup: AdamW learning rate (linear warm-up, cosine decay to 10%).
        shift_augment: random translations of the training images by up to this many pixels
            (0: none). With 896 training images the VAE otherwise memorises them: reconstruction
            error on heldout images is then 100x the training error.
        keep_checkpoint: keep ``checkpoint/`` after the final files are written.
        callback: called as ``callback(step, logs)`` after each step (``step`` counts done steps).
        data: ``"digits"`` (the embedded 8x8 digits, the default) or ``"fashion"``
            (Fashion-MNIST's 60,000 train images, found by
            :func:`cspace.models.data.find_fashion_mnist` in ``data_dir``; use
            ``cfg=fashion_vae_config()`` and ``teacher="fashion"``). The teacher's tokens are
            then computed batch by batch, and the metrics are :func:`evaluate_fashion_vae`'s.
        max_images: train on the first N train images only (small runs and tests; fashion).

    Returns:
        The metrics (see :func:`evaluate_vae`) and the run's settings, as stored in the
        manifest, plus ``wall_s`` and ``steps_run`` (steps done in this call).
    """
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from cspace.models.data import digits, fashion_mnist

    if data not in VAE_DATA:
        raise ValueError(f"unknown data {data!r}; choose one of {VAE_DATA}")
    if max_images is not None and (data != "fashion" or max_images < 1):
        raise ValueError("max_images must be >= 1, and only with data='fashion'")
    if shift_augment < 0:
        raise ValueError(f"shift_augment must be >= 0; got {shift_augment}")
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
    if not vf_weight >= 0 or not math.isfinite(vf_weight):
        raise ValueError(f"vf_weight must be a finite number >= 0; got {vf_weight}")
    t0 = time.perf_counter()
    cfg = cfg or AlignedVAEConfig()
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    check_target(out, VAE_KIND, allow=(CHECKPOINT_DIR,))  # before training, not after
    check_output_folder(out, "the output folder (--out)")

    # ---- teacher: frozen; without augmentation its tokens for the training set are precomputed
    if data == "digits":
        x_train, _ = digits("train")
        y_train = None
    else:
        x_train, y_train = fashion_mnist("train", data_dir)
        if max_images is not None:
            x_train, y_train = x_train[:max_images], y_train[:max_images]
    if x_train.shape[1:] != (cfg.in_channels, cfg.sample_size, cfg.sample_size):
        got = "x".join(str(v) for v in (*x_train.shape[2:], x_train.shape[1]))
        raise ValueError(
            f"cfg expects {cfg.sample_size}x{cfg.sample_size}x{cfg.in_channels} images; {data} "
            f"images are {got}" + (" (use cfg=fashion_vae_config())" if data == "fashion" else "")
        )
    # the teacher runs batch by batch on augmented or many images; else its tokens are cached
    per_batch = bool(shift_augment) or data != "digits"
    use_vf = vf_weight > 0
    teacher_name, t_tokens, t_width, tmod = None, None, None, None
    if use_vf:
        if teacher is None:
            raise ValueError("vf_weight > 0 needs a teacher")
        tmod = teacher if isinstance(teacher, Teacher) else load_teacher(teacher, teacher_weights)
        teacher_name = teacher if isinstance(teacher, str) else tmod.name
        if tmod.grid != cfg.latent_grid and not tmod.interpolate_grid:
            match_token_grid(torch.zeros(1, tmod.grid**2, 1), cfg.latent_grid, False)  # raises
        t_tokens = match_token_grid(
            tmod.tokens_batched(x_train[:2] if per_batch else x_train),
            cfg.latent_grid,
            interpolate=tmod.interpolate_grid,
        )
        t_width = int(t_tokens.shape[-1])

    settings = {
        "config": cfg.to_dict(),
        "vf_weight": float(vf_weight),
        "teacher": teacher_name,
        "teacher_width": t_width,
        "steps": int(steps),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "lr": float(lr),
        "warmup": int(warmup),
        "shift_augment": int(shift_augment),
        "teacher_weights": str(teacher_weights) if use_vf and teacher_weights else None,
    }
    if data != "digits":  # (the digits manifests keep their fields)
        settings.update(data=data, train_images=int(x_train.shape[0]))

    # ---- model, projection, optimiser (same init for aligned and plain: the VAE is built first)
    torch.manual_seed(seed)
    vae = build_autoencoder(cfg)
    align = VFAlignment(cfg.latent_channels, t_width, cfg) if use_vf else None
    params = list(vae.parameters()) + (list(align.parameters()) if align is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    start = 0
    if resume and (ckpt_dir / "checkpoint.json").is_file():
        info = json.loads((ckpt_dir / "checkpoint.json").read_text())
        if info.get("settings") != json.loads(json.dumps(settings)):
            diff = sorted(
                k
                for k in settings
                if info.get("settings", {}).get(k) != json.loads(json.dumps(settings[k]))
            )
            raise ValueError(
                f"the checkpoint in {ckpt_dir} was made with other settings ({', '.join(diff)}); "
                "resume with the same settings, or pass resume=False (--no-resume) or another out dir"
            )
        tensors = load_file(str(ckpt_dir / info["file"]))
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        if align is not None:
            align.load_state_dict({k: v for k, v in tensors.items() if k.startswith("proj.")})
        _load_optimizer(opt, tensors, info["param_groups"])
        start = int(info["step"])

    def save_checkpoint(step: int) -> None:
        name = f"state-{step:08d}.safetensors"
        tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
        if align is not None:
            tensors.update(align.state_dict())
        tensors.update(_optimizer_tensors(opt))
        save_safetensors_atomic(ckpt_dir / name, tensors, metadata={"step": str(step)})
        groups = json.loads(json.dumps(opt.state_dict()["param_groups"]))
        write_json_atomic(
            ckpt_dir / "checkpoint.json",
            {
                "step": step,
                "seed": seed,
                "file": name,
                "settings": settings,
                "param_groups": groups,
            },
        )
        for old in ckpt_dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    # ---- training loop
    vae.train()
    n = x_train.shape[0]
    last_layer = vae.encoder.conv_out.weight
    bar = tqdm(total=steps, initial=start, desc=f"vae vf={vf_weight:g}", disable=not progress)
    logs: dict[str, float] = {}
    for step in range(start, steps):
        idx = _batch_indices(n, batch_size, seed, step)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = shift_images(x_train[idx], g, shift_augment) if shift_augment else x_train[idx]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        nll = (rec - x).pow(2).sum(dim=(1, 2, 3)).mean()
        kl = post.kl().mean()
        kl_w = (
            cfg.kl_weight * min(1.0, (step + 1) / cfg.kl_warmup) if cfg.kl_warmup else cfg.kl_weight
        )
        loss = nll + kl_w * kl
        logs = {"nll": nll.item(), "kl": kl.item()}
        if align is not None:
            if per_batch:
                with torch.no_grad():
                    f = tmod.tokens(x)
            else:
                f = t_tokens[idx]
            vf, terms = align(z, f, interpolate=tmod.interpolate_grid, return_terms=True)
            w = adaptive_vf_weight(nll, vf, last_layer, vf_weight)
            loss = loss + w * vf
            logs.update(vf=vf.item(), mcos=terms["mcos"].item(), mdms=terms["mdms"].item())
            logs["vf_w"] = float(w)
        if not math.isfinite(float(loss.detach())):
            raise ValueError(
                _diverged(step + 1, f"the loss is {float(loss.detach())} ({logs})", vf_weight)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        bar.update(1)
        if done % 50 == 0 or done == steps:
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(done)
        if callback is not None:
            callback(done, logs)
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in vae.parameters()):
        raise ValueError(_diverged(steps, "the weights hold NaN or Inf", vf_weight))

    # ---- normalisation, metrics, final files
    vae.eval()
    shift, scale = latent_stats(vae, x_train)
    if data == "digits":
        metrics = evaluate_vae(vae, scale, shift)
    else:
        metrics = evaluate_fashion_vae(vae, scale, shift, data_dir, train=(x_train, y_train))
    meta = {
        "format": VAE_FORMAT,
        "name": f"cspace-{data}-vae(vf={vf_weight:g}, teacher={teacher_name})",
        **settings,
        "scaling_factor": scale,
        "shift_factor": shift,
        "metrics": metrics,
    }
    save_aligned_vae(out, vae, meta, align, allow=(CHECKPOINT_DIR,))
    if not keep_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {
        **metrics,
        **{k: v for k, v in meta.items() if k not in ("metrics", "format", "model_sha256")},
        "wall_s": time.perf_counter() - t0,
        "steps_run": steps - start,
        "out_dir": str(out),
    }
