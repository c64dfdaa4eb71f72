"""Image files in and out: PNG/JPEG files and folders to float32 ``(N, C, H, W)`` tensors in
[-1, 1], and back.

Image tensors throughout cspace are float32 ``(B, C, H, W)`` with values in [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGE_SUFFIXES", "ImageFolderError", "load_images", "save_png", "to_uint8"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFolderError(ValueError):
    """Bad image input: unreadable, wrong size or channel count, or nothing to read."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, C, H, W) to uint8 arrays (B, H, W) or (B, H, W, C)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_png(images: torch.Tensor, paths: Sequence[str | os.PathLike]) -> None:
    """Write images in [-1, 1] (B, C, H, W) as PNG files, one per path."""
    from PIL import Image

    arrs = to_uint8(images)
    if len(arrs) != len(paths):
        raise ValueError(f"{len(arrs)} images but {len(paths)} paths")
    for arr, p in zip(arrs, paths, strict=True):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)


def _expand(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not found:
                raise ImageFolderError(f"{p} is an empty folder: no images to read")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ImageFolderError(f"{p} does not exist")
    if not files:
        raise ImageFolderError("no images given")
    return files


def load_images(
    inputs: Iterable[str | os.PathLike],
    size: tuple[int, int] = (8, 8),
    channels: int = 1,
) -> tuple[torch.Tensor, list[Path]]:
    """Read PNG/JPEG files and folders of them into (N, C, H, W) float32 in [-1, 1].

    All-or-nothing: every file is checked first (readable image, ``size`` = (H, W), ``channels``
    = 1 for grey or 3 for RGB), and one :class:`ImageFolderError` lists every bad file, so a
    caller never ends up with part of a folder.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    files = _expand(inputs)
    want_mode = "L" if channels == 1 else "RGB"
    problems, arrays = [], []
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{f}: not a PNG or JPEG file (suffix {f.suffix or 'none'})")
            continue
        try:
            with Image.open(f) as im:
                im.load()
                mode, (w, h) = im.mode, im.size
                if (h, w) != tuple(size):
                    problems.append(
                        f"{f}: {w}x{h} pixels, expected {size[1]}x{size[0]} (resize it first)"
                    )
                    continue
                grey = mode in ("L", "I", "I;16", "1", "P") and (
                    mode != "P" or _palette_is_grey(im)
                )
                if channels == 1 and not grey:
                    problems.append(f"{f}: {mode} image with colour, expected 1 channel (grey)")
                    continue
                if channels == 3 and mode not in ("RGB", "RGBA", "P", "L"):
                    problems.append(f"{f}: {mode} image, expected RGB")
                    continue
                arr = np.asarray(im.convert(want_mode), dtype=np.float32)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            problems.append(f"{f}: unreadable or not an image ({type(err).__name__}: {err})")
            continue
        arrays.append(arr / 127.5 - 1.0)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ImageFolderError(
            f"{len(problems)} of {len(files)} files cannot be used; nothing was read:\n  {shown}{more}"
        )
    stack = np.stack(arrays)
    stack = stack[:, None] if channels == 1 else stack.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stack)), files


def _palette_is_grey(im) -> bool:
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    return bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))
