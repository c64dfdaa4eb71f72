"""Frozen teachers for the VF (vision-foundation) alignment of the C-space VAE.

A teacher maps images (B, C, H, W) in [-1, 1] to patch tokens (B, T, C_t) on a square grid of
``grid`` x ``grid`` tokens (``T = grid**2``, row-major). The aligned VAE (:mod:`cspace.models.vae`)
pulls the tokens of its latent towards a teacher's tokens with VA-VAE's VF loss.

* :class:`DinoV2Teacher` is the real thing: a timm DINOv2 ViT
  (``vit_{small,base,large,giant}_patch14[_reg4]_dinov2.lvd142m``), as VA-VAE uses it (ViT-L/14,
  input resized to 224). Weights are never downloaded: pass a local ``model.safetensors``, or
  have it in the local Hugging Face cache.
* :class:`DigitsTeacher` is the **documented stand-in for DINOv2 at 8x8**: DINOv2 knows nothing
  useful about 8x8 grey digits upsampled 28 times, and it needs weights we cannot download here.
  It is a small CNN trained (by :func:`train_teacher`) to classify the digits *train* split only
  (never ``judge`` or ``heldout``); its patch tokens are the last feature map on a 4x4 grid
  (T = 16, 64 channels, layer-normalised per token like a ViT's output). The classification head
  exists only to train it; the VF loss uses the tokens. Its weights ship in
  ``cspace/weights/teacher/`` (``cspace train teacher`` rebuilds them), a folder in cspace's
  safe-folder format (:mod:`cspace.io.folder`: ``manifest.json``, format ``cspace.teacher`` v3,
  + ``model-<hash>.safetensors``); folders of the older layouts (v2 manifests; ``config.json``
  + ``model.safetensors``, no checksum) still load.
* :class:`FashionTeacher` is the **self-supervised** teacher for 28x28 Fashion-MNIST: like DINOv2
  it never sees a label. A small CNN (28 -> 14 -> 7) whose patch tokens are its last feature map
  on a 7x7 grid (T = 49, layer-normalised per token), trained with SimCLR's contrastive loss
  (:mod:`cspace.models.simclr`, ``cspace train teacher --data fashion``). Its folder has its own
  format (``cspace.ssl_teacher`` v3); the shipped one is ``cspace/weights/fashion_teacher``.

Teachers are frozen: parameters do not require gradients and the module stays in eval mode
(``.train()`` is a no-op), so a parent module's ``.train()`` cannot switch it back.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cspace.io.checks import check_output_folder
from cspace.io.errors import FolderError, MissingWeightsError
from cspace.io.folder import FolderKind, check_target, is_folder_of, read_folder, write_folder
from cspace.io.legacy import TEACHER_V1, manifest_v2
from cspace.io.weights import build_within, check_state_dict, load_config_module, weights_values
from cspace.models.data import shift_images
from cspace.models.shipped import shipped

__all__ = [
    "DINOV2_MODELS",
    "SSL_TEACHER_KIND",
    "TEACHER_KIND",
    "DigitsTeacher",
    "DigitsTeacherConfig",
    "DinoV2Teacher",
    "FashionTeacher",
    "FashionTeacherConfig",
    "Teacher",
    "TeacherWeightsError",
    "load_teacher",
    "train_teacher",
]

DINOV2_MODELS = tuple(
    f"vit_{size}_patch14{reg}_dinov2"
    for size in ("small", "base", "large", "giant")
    for reg in ("", "_reg4")
)
_DINOV2_TAG = "lvd142m"
TEACHER_FORMAT = "cspace.teacher"
TEACHER_FORMAT_VERSION = 3
_WEIGHTS = "model.safetensors"


class TeacherWeightsError(FolderError):
    """A digits-teacher folder that exists but cannot be used (corrupt, foreign, mismatched)."""


def _missing_teacher(folder: Path, detail: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"digits teacher: {folder}: {detail}. Train it with "
        f"`cspace train teacher --out {folder}` (or cspace.models.teachers.train_teacher)"
    )


#: the digits teacher's folder kind (:mod:`cspace.io.folder`)
TEACHER_KIND = FolderKind(
    format=TEACHER_FORMAT,
    version=TEACHER_FORMAT_VERSION,
    what="digits-teacher",
    a_what="a cspace digits-teacher folder",
    error=TeacherWeightsError,
    files=(_WEIGHTS,),
    fix="retrain it (cspace train teacher) or restore the folder from a copy",
    missing=_missing_teacher,
    legacy=(TEACHER_V1, manifest_v2((_WEIGHTS,))),
)


# ---------------------------------------------------------------------- the teacher interface
class Teacher(nn.Module):
    """Base class: a frozen module with ``tokens(images) -> (B, grid*grid, width)``."""

    grid: int
    width: int
    #: whether the VF loss may resample this teacher's token grid to the latent grid
    interpolate_grid: bool = False
    name: str = "teacher"

    def freeze(self) -> Teacher:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:  # frozen: always eval
        return super().train(False)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def tokens_batched(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """``tokens`` over a large set, in batches, without gradients."""
        dev = next(self.parameters()).device
        outs = [
            self.tokens(images[s : s + batch_size].to(dev)).cpu()
            for s in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(outs)


# ---------------------------------------------------------------------- digits stand-in
@dataclass
class DigitsTeacherConfig:
    """Architecture of :class:`DigitsTeacher`."""

    in_channels: int = 1
    image_size: int = 8
    channels: int = 32
    width: int = 64
    num_classes: int = 10


class DigitsTeacher(Teacher):
    """Small CNN teacher for 8x8 digits: the documented stand-in for DINOv2 at 8x8.

    conv3x3(1->32) GELU, conv3x3(32->64, stride 2) GELU, conv3x3(64->64) GELU,
    conv1x1(64->width), LayerNorm over channels -> patch tokens on a 4x4 grid (B, 16, width).
    ``logits`` (mean of tokens -> linear) is used only to train it on the digits train split.
    """

    interpolate_grid = False

    def __init__(self, config: DigitsTeacherConfig | None = None):
        super().__init__()
        cfg = config or DigitsTeacherConfig()
        if cfg.image_size % 2:
            raise ValueError(f"image_size must be even; got {cfg.image_size}")
        self.config = cfg
        c, w = cfg.channels, cfg.width
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * c, w, 1),
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.num_classes)
        self.grid = cfg.image_size // 2
        self.width = w
        self.name = "digits"

    def _check(self, images: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"DigitsTeacher expects images (B, {want[0]}, {want[1]}, {want[2]}) in [-1, 1]; "
                f"got {tuple(images.shape)}"
            )

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 8, 8) in [-1, 1] -> patch tokens (B, 16, width), row-major 4x4 grid."""
        self._check(images)
        feat = self.features(images)  # (B, width, 4, 4)
        return self.norm(feat.flatten(2).transpose(1, 2))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10): the training head on the mean token."""
        return self.head(self.tokens(images).mean(dim=1))

    forward = tokens

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> DigitsTeacher:
        """Load a teacher folder (default: the shipped teacher): ``manifest.json`` +
        ``model.safetensors``, or the older ``config.json`` + ``model.safetensors``."""
        from safetensors.torch import load

        folder = Path(path) if path is not None else shipped("teacher")
        read = read_folder(folder, TEACHER_KIND)
        meta = {"format": TEACHER_FORMAT, "format_version": TEACHER_FORMAT_VERSION, **read.fields}
        w_file = read.file(_WEIGHTS)
        try:
            cfg = DigitsTeacherConfig(**read.get("config"))
            values = weights_values(read.files[_WEIGHTS], w_file, TeacherWeightsError)
            model = build_within(lambda: cls(cfg), values, w_file, read.mpath, TeacherWeightsError)
        except (TypeError, ValueError, OverflowError, RuntimeError) as err:
            if isinstance(err, TeacherWeightsError):
                raise
            raise TeacherWeightsError(
                f"{read.mpath} lacks or has a bad field: {err}", read.mpath
            ) from err
        try:
            state = load(read.files[_WEIGHTS])
        except Exception as err:  # safetensors raises its own error types
            raise TeacherWeightsError(
                f"{w_file} is not a readable safetensors file: {err}", w_file
            ) from err
        check_state_dict(model, state, w_file, "digits teacher")
        model.load_state_dict(state)
        model.meta = meta
        return model.freeze()

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the teacher folder (``manifest.json``: the config and ``extra`` fields;
        ``model.safetensors``), crash-safe and serialised with other writers
        (:func:`cspace.io.folder.write_folder`); returns the path."""
        from safetensors.torch import save

        blob = save({k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()})
        fields = {"config": asdict(self.config), **(extra or {})}
        return write_folder(path, TEACHER_KIND, fields, {_WEIGHTS: blob})


# ---------------------------------------------------------------------- Fashion-MNIST (SSL)
SSL_TEACHER_FORMAT = "cspace.ssl_teacher"


def _missing_ssl_teacher(folder: Path, detail: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"Fashion-MNIST teacher: {folder}: {detail}. Train it with "
        f"`cspace train teacher --data fashion --out {folder}` (needs the Fashion-MNIST files, "
        "see cspace.models.data.find_fashion_mnist; or cspace.models.simclr.train_fashion_teacher)"
    )


#: the self-supervised (Fashion-MNIST) teacher's folder kind (:mod:`cspace.io.folder`)
SSL_TEACHER_KIND = FolderKind(
    format=SSL_TEACHER_FORMAT,
    version=3,
    what="self-supervised teacher",
    a_what="a cspace self-supervised teacher folder",
    error=TeacherWeightsError,
    files=(_WEIGHTS,),
    fix="retrain it (cspace train teacher --data fashion) or restore the folder from a copy",
    missing=_missing_ssl_teacher,
)


@dataclass
class FashionTeacherConfig:
    """Architecture of :class:`FashionTeacher`: encoder ``channels`` (c1, c2, c3), token
    ``width`` and the SimCLR projection head (``proj_hidden`` -> ``proj_dim``)."""

    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, int, int] = (16, 32, 64)
    width: int = 64
    proj_hidden: int = 128
    proj_dim: int = 64

    def __post_init__(self) -> None:
        ch = tuple(self.channels)
        if len(ch) != 3 or not all(type(c) is int and 1 <= c <= 1024 for c in ch):
            raise ValueError(f"channels must be 3 ints in 1..1024; got {self.channels!r}")
        for name in ("in_channels", "width", "proj_hidden", "proj_dim"):
            v = getattr(self, name)
            if type(v) is not int or not 1 <= v <= 4096:
                raise ValueError(f"{name} must be an int in 1..4096; got {v!r}")
        if type(self.image_size) is not int or self.image_size < 4 or self.image_size % 4:
            raise ValueError(
                f"image_size must be a multiple of 4 (two stride-2 convolutions); "
                f"got {self.image_size!r}"
            )
        self.channels = ch


class FashionTeacher(Teacher):
    """The self-supervised CNN teacher for 28x28 images (Fashion-MNIST).

    ``[conv3x3 -> BatchNorm -> GELU]`` x 5 with strides 1, 2, 1, 2, 1 (channels c1, c2, c2, c3,
    c3; 28 -> 14 -> 7 pixels), conv1x1 (c3 -> width), LayerNorm over channels -> patch tokens
    (B, 49, width) on the 7x7 grid (row-major). ``embed`` is the mean token (B, width), the
    image embedding the kNN and linear-probe figures use; ``head`` (linear -> ReLU -> linear to
    ``proj_dim``) is SimCLR's projection head, used only in training. No label is ever used.
    """

    interpolate_grid = False

    def __init__(self, config: FashionTeacherConfig | None = None):
        super().__init__()
        cfg = config or FashionTeacherConfig()
        self.config = cfg
        c1, c2, c3 = cfg.channels
        layers: list[nn.Module] = []
        for c_in, c_out, stride in (
            (cfg.in_channels, c1, 1),
            (c1, c2, 2),
            (c2, c2, 1),
            (c2, c3, 2),
            (c3, c3, 1),
        ):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.GELU(),
            ]
        layers.append(nn.Conv2d(c3, cfg.width, 1))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Sequential(
            nn.Linear(cfg.width, cfg.proj_hidden),
            nn.ReLU(),
            nn.Linear(cfg.proj_hidden, cfg.proj_dim),
        )
        self.grid = cfg.image_size // 4
        self.width = cfg.width
        self.name = "fashion"
        self.meta: dict[str, Any] = {}

    def _check(self, images: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f"the Fashion-MNIST teacher expects images (B, {want[0]}, {want[1]}, {want[2]}) "
                f"in [-1, 1]; got {got}"
            )

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) in [-1, 1] -> patch tokens (B, 49, width), row-major 7x7 grid."""
        self._check(images)
        return self.norm(self.features(images).flatten(2).transpose(1, 2))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> the mean patch token (B, width)."""
        return self.tokens(images).mean(dim=1)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """SimCLR's projection ``head(embed(x))`` (B, proj_dim) (training only)."""
        return self.head(self.embed(images))

    forward = tokens

    def unfreeze(self) -> FashionTeacher:
        """Trainable (for :func:`cspace.models.simclr.train_fashion_teacher`); ``freeze`` ends it."""
        for p in self.parameters():
            p.requires_grad_(True)
        return nn.Module.train(self, True)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> FashionTeacher:
        """Load a self-supervised teacher folder (default: the shipped
        ``cspace/weights/fashion_teacher``), frozen."""
        read = read_folder(Path(path) if path is not None else shipped("fashion_teacher"),
                           SSL_TEACHER_KIND)  # fmt: skip
        model = load_config_module(read, _WEIGHTS, FashionTeacherConfig, cls, SSL_TEACHER_KIND,
                                   TeacherWeightsError, "Fashion-MNIST teacher")  # fmt: skip
        return model.freeze()

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the teacher folder (``manifest.json``: the config and ``extra``;
        ``model.safetensors``), crash-safe (:func:`cspace.io.folder.write_folder`)."""
        from safetensors.torch import save

        blob = save({k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()})
        config = asdict(self.config)
        config["channels"] = list(config["channels"])
        fields = {"config": config, **(extra or {})}
        return write_folder(path, SSL_TEACHER_KIND, fields, {_WEIGHTS: blob})


# ---------------------------------------------------------------------- DINOv2 (timm)
def _split_dinov2_name(name: str) -> tuple[str, str]:
    arch, _, tag = name.partition(".")
    if arch not in DINOV2_MODELS or tag not in ("", _DINOV2_TAG):
        raise ValueError(
            f"unknown DINOv2 teacher {name!r}; choose one of "
            + ", ".join(f"{m}.{_DINOV2_TAG}" for m in DINOV2_MODELS)
        )
    return arch, tag or _DINOV2_TAG


def _missing_dinov2(name: str, hub_id: str | None, detail: str) -> MissingWeightsError:
    hub = hub_id or f"timm/{name}"
    return MissingWeightsError(
        f"no weights for DINOv2 teacher {name}: {detail}. Nothing is downloaded. On a machine "
        f"with network access download model.safetensors from the Hugging Face repo {hub} "
        f"(e.g. `hf download {hub} model.safetensors --local-dir DIR`), copy it here "
        "and pass weights=PATH (command line: --teacher-weights PATH), or put it in the local "
        "Hugging Face cache"
    )


class DinoV2Teacher(Teacher):
    """A frozen timm DINOv2 ViT as VF teacher (VA-VAE uses ``vit_large_patch14_dinov2``).

    Args:
        name: ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2[.lvd142m]``.
        weights: a local ``model.safetensors`` (or a folder holding one). None: look only in the
            local Hugging Face cache (offline; nothing is downloaded).
        img_size: the ViT input size (multiple of 14; default 224 as in VA-VAE); the grid is
            ``img_size // 14`` tokens per side.
        cache_dir: the Hugging Face hub cache to look in when ``weights`` is None (default: the
            hub's own, ``HF_HUB_CACHE``).
        pretrained: False builds a randomly initialised model (for tests), with ``timm_kwargs``
            (``depth``, ``embed_dim``, ``num_heads`` ...) passed to ``timm.create_model``.

    ``tokens(images)`` maps [-1, 1] images to [0, 1], repeats grey to 3 channels, resizes to
    ``img_size`` (bicubic, the model's interpolation), normalises with the model's mean/std and
    returns ``forward_features(x)[:, num_prefix_tokens:]`` (1 prefix token, 5 with registers).

    Raises:
        MissingWeightsError: the weights file is not there (message says how to supply it).
    """

    interpolate_grid = True

    def __init__(
        self,
        name: str = "vit_large_patch14_dinov2.lvd142m",
        weights: str | os.PathLike | None = None,
        img_size: int = 224,
        pretrained: bool = True,
        cache_dir: str | os.PathLike | None = None,
        **timm_kwargs: Any,
    ):
        super().__init__()
        import timm

        arch, tag = _split_dinov2_name(name)
        if img_size % 14:
            raise ValueError(f"img_size must be a multiple of the patch size 14; got {img_size}")
        full = f"{arch}.{tag}"
        kwargs: dict[str, Any] = dict(img_size=img_size, num_classes=0, **timm_kwargs)
        if pretrained:
            hub_id = timm.models.get_pretrained_cfg(full).hf_hub_id
            path = self._resolve_weights(full, hub_id, weights, cache_dir)
            try:
                model = timm.create_model(
                    full,
                    pretrained=True,
                    pretrained_cfg_overlay=dict(file=str(path)),
                    **kwargs,
                )
            except (RuntimeError, KeyError, ValueError) as err:
                raise ValueError(
                    f"the weights file {path} does not fit {full} (img_size={img_size}, "
                    f"{timm_kwargs or 'default size'}): {err}"
                ) from err
            self.weights_path: str | None = str(path)
        else:
            model = timm.create_model(full, pretrained=False, **kwargs)
            self.weights_path = None
        self.model = model
        self.img_size = img_size
        gh, gw = model.patch_embed.grid_size
        if gh != gw:
            raise ValueError(f"non-square token grid {gh}x{gw}")
        self.grid = int(gh)
        self.width = int(model.num_features)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.name = full
        self.freeze()

    @staticmethod
    def _resolve_weights(name: str, hub_id: str | None, weights, cache_dir=None) -> Path:
        if weights is not None:
            p = Path(weights)
            if p.is_dir():
                p = p / "model.safetensors"
            if not p.is_file():
                raise _missing_dinov2(name, hub_id, f"{p} does not exist")
            _check_safetensors(p)
            return p
        # local Hugging Face cache only (HF_HUB_OFFLINE semantics: no network request)
        try:
            from huggingface_hub import try_to_load_from_cache

            found = (
                try_to_load_from_cache(hub_id, "model.safetensors", cache_dir=cache_dir)
                if hub_id
                else None
            )
        except Exception:  # a broken or absent hub install means: not cached
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
        raise _missing_dinov2(name, hub_id, "weights=None and not in the local HF cache")

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1 or 3, H, W) in [-1, 1] -> patch tokens (B, grid*grid, width)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W); got {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(
                x, size=(self.img_size, self.img_size), mode=mode, align_corners=False
            )
        x = (x - self.mean) / self.std
        return self.model.forward_features(x)[:, self.num_prefix_tokens :]

    forward = tokens


def _check_safetensors(path: Path) -> None:
    """Raise ValueError unless ``path`` is a readable ``.safetensors`` file: timm reads any other
    file with ``torch.load`` (unpickling), which a file handed over by a user must never reach."""
    if path.suffix != ".safetensors":
        raise ValueError(
            f"--teacher-weights {path}: expected a .safetensors file (other formats are pickles, "
            "which cspace never loads); convert it with safetensors.torch.save_file"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(
            f"--teacher-weights {path} is not a readable safetensors file: {err}"
        ) from err


def load_teacher(
    spec: str = "digits", weights: str | os.PathLike | None = None, img_size: int = 224
) -> Teacher:
    """A frozen teacher from a spec.

    * ``"digits"``: the shipped :class:`DigitsTeacher` (``weights`` may name another folder made
      by :func:`train_teacher`);
    * ``"fashion"``: the shipped self-supervised :class:`FashionTeacher` (``weights`` may name
      another folder made by :func:`cspace.models.simclr.train_fashion_teacher`);
    * a folder made by :func:`train_teacher` or by ``train_fashion_teacher``;
    * a DINOv2 name (``vit_large_patch14_dinov2.lvd142m`` ...): :class:`DinoV2Teacher` with
      ``weights`` (a local ``model.safetensors``) and ``img_size``.
    """
    if spec == "digits":
        return DigitsTeacher.load(weights)
    if spec == "fashion":
        return FashionTeacher.load(weights)
    if "dinov2" in spec:
        return DinoV2Teacher(spec, weights=weights, img_size=img_size)
    p = Path(spec)
    if p.is_dir() and is_folder_of(p, TEACHER_KIND):
        return DigitsTeacher.load(p)
    if p.is_dir() and is_folder_of(p, SSL_TEACHER_KIND):
        return FashionTeacher.load(p)
    raise ValueError(
        f"unknown teacher {spec!r}: use 'digits', 'fashion', a folder made by "
        "`cspace train teacher`, or a DINOv2 name such as vit_large_patch14_dinov2.lvd142m"
    )


# ---------------------------------------------------------------------- training
@torch.no_grad()
def teacher_accuracy(teacher: DigitsTeacher, split: str = "heldout") -> float:
    """Classification accuracy of a digits teacher on a digits split."""
    from cspace.models.data import digits

    x, y = digits(split)
    pred = torch.cat([teacher.logits(x[s : s + 256]).argmax(1) for s in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def train_teacher(
    out_dir: str | os.PathLike,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the digits teacher on the digits *train* split and save it to ``out_dir``.

    AdamW, cross-entropy with label smoothing 0.1, random 1-pixel shifts, cosine learning rate.
    Deterministic for a seed. Writes the folder (``manifest.json`` with the metrics,
    ``model.safetensors``); returns the metrics: ``heldout_accuracy`` and ``train_accuracy``.
    """
    from tqdm.auto import tqdm

    from cspace.models.data import digits

    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    check_target(out_dir, TEACHER_KIND)  # before training, not after
    check_output_folder(out_dir, "the output folder (--out)")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = DigitsTeacher()
    x, y = digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    n = x.shape[0]
    warm = max(1, steps // 20)
    for step in tqdm(range(steps), desc="teacher", disable=not progress):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch_size,), generator=g)
        xb = shift_images(x[idx], g)
        frac = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        loss = F.cross_entropy(model.logits(xb), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.freeze()
    metrics = {
        "heldout_accuracy": teacher_accuracy(model, "heldout"),
        "train_accuracy": teacher_accuracy(model, "train"),
    }
    wall = time.perf_counter() - t0
    info = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr}
    model.save(out_dir, extra={**info, "metrics": metrics, "trained_on": "digits train split"})
    return {**metrics, **info, "wall_s": wall, "out_dir": str(out_dir)}
