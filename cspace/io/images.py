"""Image files in and out: PNG/JPEG files and folders to float32 ``(N, C, H, W)`` tensors in
[-1, 1], and back.

Image tensors throughout cspace are float32 ``(B, C, H, W)`` with values in [-1, 1].

Reading is safe for files a user hands over:

* **Size before decoding.** Each file's header is read first and its pixel count ``W x H`` is
  checked against a limit (:data:`MAX_IMAGE_PIXELS` = 4096 x 4096 by default; the ``max_pixels``
  argument or the environment variable ``CSPACE_MAX_IMAGE_PIXELS`` raises it), then against the
  size the caller wants; only then is the image decoded. A file whose header claims 20000 x 20000
  pixels is refused after reading a few hundred bytes. Only PNG and JPEG content is opened
  (whatever the suffix says), and only regular files: a FIFO, a socket or a device is never
  opened (so it cannot hang a read).
* **Modes converted exactly, or refused.** 8-bit grey (``L``, ``1``) and colour (``RGB``, and
  ``P`` through its palette) map ``v`` to ``v / 127.5 - 1``; 16-bit grey (``I;16``; also ``I``
  with values in 0..65535) maps ``v`` to ``v / 32767.5 - 1``, so that 65535 is white and no value
  is clipped. An alpha channel (``LA``, ``RGBA``, ``P`` or ``L``/``RGB`` with a transparent
  colour) is dropped when every pixel is opaque and refused otherwise (the colour under a
  transparent pixel is undefined). ``CMYK`` (needs colour management), floating-point ``F`` and
  other modes are refused with a message saying what to convert them to. A colour image whose
  three channels are equal everywhere is grey (a greyscale image saved as RGB) and is accepted
  for a 1-channel encoder; a grey image is repeated into three channels for a 3-channel encoder.
* **Folders say what they skip.** A folder contributes its regular image files, sorted; its
  subfolders, hidden files, symlink loops and broken links, FIFOs and other non-regular entries
  are skipped, and each skip is reported: in the ``skipped`` field of the result and as a
  :class:`SkippedFilesWarning` (one line per folder, which the ``cspace`` command prints as
  ``cspace COMMAND: warning: ...``).
* **Sizes.** Every image must have the size asked for; a file of another size is refused with
  both sizes named, unless ``resize=True`` (``--resize``), which resizes it (bilinear,
  antialiased) after the pixel-count check and says so in an :class:`ImagesResizedNote`.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from cspace.io.files import write_file_atomic

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS_ENV",
    "ImageFolderError",
    "ImagesResizedNote",
    "LoadedImages",
    "SkippedFilesWarning",
    "list_images",
    "load_images",
    "max_image_pixels",
    "save_grid_png",
    "save_png",
    "to_uint8",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: the default largest pixel count (W x H) of an image file read by :func:`load_images`
MAX_IMAGE_PIXELS = 4096 * 4096
#: the environment variable that overrides :data:`MAX_IMAGE_PIXELS` (a positive integer)
MAX_IMAGE_PIXELS_ENV = "CSPACE_MAX_IMAGE_PIXELS"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SKIPPED_SHOWN = 8  # skipped entries named in one warning line


class ImageFolderError(ValueError):
    """Bad image input: unreadable, wrong size or channel count, or nothing to read."""


class SkippedFilesWarning(UserWarning):
    """A folder of images held entries that were not read (subfolders, hidden files, links that
    lead nowhere, FIFOs and other non-regular files)."""


class ImagesResizedNote(UserWarning):
    """Images were resized to the size asked for (``load_images(..., resize=True)``, ``--resize``);
    the ``cspace`` command prints it as ``cspace COMMAND: note: ...``."""

    cli_label = "note"


class LoadedImages(tuple):
    """What :func:`load_images` returns: the pair ``(images, files)`` (it unpacks as one), plus
    ``skipped`` and ``resized``.

    Attributes:
        images: (N, C, H, W) float32 in [-1, 1].
        files: the N files read, in order.
        skipped: ``(path, reason)`` for every folder entry that was not read.
        resized: ``(path, (W, H))`` for every file resized from its own size ``W x H``
            (``resize=True`` only).
    """

    def __new__(
        cls,
        images: torch.Tensor,
        files: list[Path],
        skipped: list[tuple[Path, str]],
        resized: list[tuple[Path, tuple[int, int]]] | None = None,
    ):
        obj = super().__new__(cls, (images, files))
        obj.skipped = skipped
        obj.resized = list(resized or [])
        return obj

    @property
    def images(self) -> torch.Tensor:
        return self[0]

    @property
    def files(self) -> list[Path]:
        return self[1]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, C, H, W) to uint8 arrays (B, H, W) or (B, H, W, C)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def save_png(images: torch.Tensor, paths: Sequence[str | os.PathLike]) -> None:
    """Write images in [-1, 1] (B, C, H, W) as PNG files, one per path, each atomically."""
    arrs = to_uint8(images)
    if len(arrs) != len(paths):
        raise ValueError(f"{len(arrs)} images but {len(paths)} paths")
    for arr, p in zip(arrs, paths, strict=True):
        write_file_atomic(p, _png_bytes(arr))


def save_grid_png(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1
) -> Path:
    """Write images in [-1, 1] (B, C, H, W), C = 1 or 3, as one PNG grid of ``nrow`` images a
    row (default ``ceil(sqrt(B))``), 1 white pixel between and around them (torchvision's
    ``make_grid``: a single image has no border), each pixel drawn ``scale`` x ``scale``
    (nearest); atomically. Returns ``path``."""
    from PIL import Image
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be (B >= 1, 1 or 3, H, W); got {tuple(images.shape)}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1; got {scale}")
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1):
        raise ValueError(f"nrow must be an integer >= 1 or None; got {nrow!r}")
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
    grid = grid[:1] if images.shape[1] == 1 else grid  # make_grid repeats one channel 3 times
    arr = to_uint8(grid[None])[0]
    if scale > 1:
        h, w = arr.shape[:2]
        arr = np.asarray(Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST))
    return write_file_atomic(path, _png_bytes(arr))


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``$CSPACE_MAX_IMAGE_PIXELS`` if
    set, else :data:`MAX_IMAGE_PIXELS`. Raises ``ValueError`` for a limit that is not a positive
    integer (naming where it came from)."""
    if max_pixels is not None:
        source, value = "max_pixels", max_pixels
    elif os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip():
        source, value = MAX_IMAGE_PIXELS_ENV, os.environ[MAX_IMAGE_PIXELS_ENV].strip()
    else:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value) if not isinstance(value, bool) else 0
    except (TypeError, ValueError):
        limit = 0
    if limit < 1:
        raise ValueError(f"{source} must be a positive integer (a pixel count); got {value!r}")
    return limit


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _classify(p: Path) -> tuple[str, str]:
    """``("file", "")``, ``("dir", "")`` or ``("skip", reason)`` for a path, following links
    without opening anything."""
    try:
        st = os.stat(p)
    except OSError as err:
        if os.path.islink(p):
            if err.errno == errno.ELOOP:
                return "skip", "a symlink loop"
            return "skip", "a broken symlink"
        return "missing", str(err.strerror or err)
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    if stat.S_ISREG(st.st_mode):
        return "file", ""
    return "skip", _kind(st.st_mode)


def _expand(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to read and the folder entries skipped (path, reason)."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        what, reason = _classify(p)
        if what == "dir":
            found, skipped_here = [], []
            try:
                entries = sorted(p.iterdir())
            except OSError as err:
                raise ImageFolderError(
                    f"{p}: cannot list the folder ({err.strerror or err})"
                ) from err
            for f in entries:
                if f.name.startswith("."):
                    skipped_here.append((f, "a hidden file"))
                    continue
                w, why = _classify(f)
                if w == "file":
                    found.append(f)
                elif w == "dir":
                    skipped_here.append((f, "a subfolder (folders are not read recursively)"))
                else:
                    skipped_here.append((f, why))
            if skipped_here:
                names = ", ".join(f"{f.name} ({why})" for f, why in skipped_here[:_SKIPPED_SHOWN])
                more = len(skipped_here) - _SKIPPED_SHOWN
                warnings.warn(
                    f"{p}: skipped {len(skipped_here)} entries that are not image files: {names}"
                    + (f", and {more} more" if more > 0 else ""),
                    SkippedFilesWarning,
                    stacklevel=3,
                )
            if not found:
                if not skipped_here:
                    raise ImageFolderError(f"{p} is an empty folder: no images to read")
                raise ImageFolderError(
                    f"{p} has no image files to read ({len(skipped_here)} entries skipped: "
                    + ", ".join(f"{f.name} ({why})" for f, why in skipped_here[:_SKIPPED_SHOWN])
                    + ")"
                )
            files += found
            skipped += skipped_here
        elif what == "file":
            files.append(p)
        elif what == "skip":
            raise ImageFolderError(f"{p} is {reason}, not an image file or a folder")
        else:
            raise ImageFolderError(f"{p} does not exist")
    if not files:
        raise ImageFolderError("no images given")
    return files, skipped


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files that :func:`load_images` would read from ``inputs`` (files and folders,
    a folder's regular files sorted), in that order, without opening them; what a folder skips
    is reported as for :func:`load_images`."""
    return _expand(inputs)[0]


def _open_header(f: Path):
    """The image of file ``f`` with only its header read (PNG or JPEG content only).

    Pillow's plugin classes are used directly so that no pixel count is checked before ours
    (``PIL.Image.open`` applies Pillow's own decompression-bomb limit, which would refuse a large
    image whatever ``max_pixels`` says).
    """
    from PIL import JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

    with open(f, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(_PNG_MAGIC):
        return PngImagePlugin.PngImageFile(f)
    if magic.startswith(_JPEG_MAGIC):
        return JpegImagePlugin.JpegImageFile(f)
    raise UnidentifiedImageError("neither PNG nor JPEG content")


class _Refused(Exception):
    """A file's image mode cannot be read correctly; the message says what to convert it to."""


def _drop_opaque_alpha(arr: np.ndarray, maximum: int) -> np.ndarray:
    """(H, W, C+1) with the alpha last -> (H, W, C), if every pixel is opaque."""
    alpha = arr[..., -1]
    if not np.all(alpha == maximum):
        n = int(np.count_nonzero(alpha != maximum))
        raise _Refused(
            f"has {n} transparent or translucent pixels (alpha < {maximum}); the colour under "
            "them is undefined: flatten the image onto a background first"
        )
    return arr[..., :-1]


def _pixels(im) -> tuple[np.ndarray, float]:
    """The decoded pixels of ``im`` as (H, W) grey or (H, W, 3) colour numbers, and the value of
    white (255 or 65535)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.float32), 65535.0
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise _Refused(
                "is a 32-bit integer image with values outside 0..65535; save it as an 8- or "
                "16-bit PNG"
            )
        return arr.astype(np.float32), 65535.0
    if mode == "F":
        raise _Refused("is a floating-point image (mode F); save it as an 8- or 16-bit PNG")
    if mode == "CMYK":
        raise _Refused(
            "is a CMYK image; converting it needs its colour profile: save it as RGB first"
        )
    if mode in ("1", "L") and "transparency" not in im.info:
        return np.asarray(im.convert("L")).astype(np.float32), 255.0
    if mode == "RGB" and "transparency" not in im.info:
        return np.asarray(im).astype(np.float32), 255.0
    if mode == "YCbCr":
        return np.asarray(im.convert("RGB")).astype(np.float32), 255.0
    if mode in ("LA", "La"):
        grey = _drop_opaque_alpha(np.asarray(im.convert("LA")), 255)[..., 0]
        return grey.astype(np.float32), 255.0
    if mode in ("RGBA", "RGBa", "P", "PA", "1", "L", "RGB"):
        # RGBA, a palette (with or without transparency), or a transparent colour key
        if mode == "P" and "transparency" not in im.info:
            return np.asarray(im.convert("RGB")).astype(np.float32), 255.0
        rgba = np.asarray(im.convert("RGBA"))
        return _drop_opaque_alpha(rgba, 255).astype(np.float32), 255.0
    raise _Refused(f"has the unsupported mode {mode}; save it as an 8-bit grey or RGB PNG")


def _to_channels(arr: np.ndarray, channels: int, mode: str) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour -> (H, W) for ``channels`` 1, (H, W, 3) for 3."""
    if channels == 1:
        if arr.ndim == 2:
            return arr
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            return arr[..., 0]  # a grey image saved in colour
        raise _Refused(f"is a {mode} image with colour; expected 1 channel (grey)")
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def _resize(arr: np.ndarray, size: tuple[int, int], white: float) -> np.ndarray:
    """(H, W) or (H, W, 3) pixel values in [0, white] resized to ``size`` = (H', W'): bilinear
    with antialiasing (an area average when shrinking), clipped back to [0, white]."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(
        t.double(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )
    out = out.clamp(0, white).float()[0]
    return (out[0] if arr.ndim == 2 else out.permute(1, 2, 0)).numpy()


def load_images(
    inputs: Iterable[str | os.PathLike],
    size: tuple[int, int] = (8, 8),
    channels: int = 1,
    *,
    max_pixels: int | None = None,
    resize: bool = False,
    size_source: str | None = None,
) -> LoadedImages:
    """Read PNG/JPEG files and folders of them into (N, C, H, W) float32 in [-1, 1].

    All-or-nothing: every file is checked first (a regular file with PNG or JPEG content, at
    most ``max_pixels`` pixels by its header, ``size`` = (H, W), a mode that converts to
    ``channels`` = 1 for grey or 3 for RGB; see the module docstring), and one
    :class:`ImageFolderError` lists every bad file, so a caller never ends up with part of a
    folder. A file is decoded only after its header passed the checks.

    Args:
        inputs: image files and folders (a folder contributes its regular files, sorted; what it
            skips is reported).
        size: the (H, W) every image must have.
        channels: 1 (grey) or 3 (RGB).
        max_pixels: the largest W x H accepted (default: ``$CSPACE_MAX_IMAGE_PIXELS``, else
            :data:`MAX_IMAGE_PIXELS` = 16,777,216).

    Returns:
        :class:`LoadedImages`: unpacks as ``(images, files)``; ``.skipped`` lists the folder
        entries that were not read.
    """
    from PIL import UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    limit = max_image_pixels(max_pixels)
    files, skipped = _expand(inputs)
    problems, arrays, resized, other_sizes = [], [], [], []
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{f}: not a PNG or JPEG file (suffix {f.suffix or 'none'})")
            continue
        try:
            with _open_header(f) as im:
                mode, (w, h) = im.mode, im.size
                if w * h > limit:
                    problems.append(
                        f"{f}: {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} "
                        f"(not decoded); raise it with {MAX_IMAGE_PIXELS_ENV}=N or max_pixels=N "
                        "if the file is trusted"
                    )
                    continue
                other_size = (h, w) != tuple(size)
                if other_size and not resize:
                    source = f", {size_source}" if size_source else ""
                    other_sizes.append((w, h))
                    problems.append(
                        f"{f}: {w}x{h} pixels, expected {size[1]}x{size[0]}{source} (resize the "
                        "images, or pass --resize / resize=True to resize them on reading)"
                    )
                    continue
                im.load()
                arr, white = _pixels(im)
                arr = _to_channels(arr, channels, mode)
                if other_size:
                    arr = _resize(arr, size, white)
                    resized.append((f, (w, h)))
        except _Refused as err:
            problems.append(f"{f}: {err}")
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
            problems.append(f"{f}: unreadable or not an image ({type(err).__name__}: {err})")
            continue
        arrays.append(arr / 127.5 - 1.0 if white == 255.0 else arr / 32767.5 - 1.0)
    if problems and len(other_sizes) == len(problems) == len(files) and len(set(other_sizes)) == 1:
        # every file is of one other size: one line, and the likelier fix first (these images
        # may be right and the C-space wrong)
        (w, h), source = other_sizes[0], f", {size_source}" if size_source else ""
        which = f"all {len(files)} files are" if len(files) > 1 else f"{files[0]} is"
        raise ImageFolderError(
            f"{which} {w}x{h} pixels, expected {size[1]}x{size[0]}{source}. If they belong to "
            "another C-space, use its encoder (--encoder); otherwise resize the images, or pass "
            "--resize / resize=True to resize them on reading"
        )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ImageFolderError(
            f"{len(problems)} of {len(files)} files cannot be used; nothing was read:\n  {shown}{more}"
        )
    stack = np.stack(arrays).astype(np.float32, copy=False)
    stack = stack[:, None] if channels == 1 else stack.transpose(0, 3, 1, 2)
    if resized:
        sizes = Counter(f"{w}x{h}" for _, (w, h) in resized)
        warnings.warn(
            f"resized {len(resized)} of {len(files)} images to {size[1]}x{size[0]} (from "
            + ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))
            + ")",
            ImagesResizedNote,
            stacklevel=2,
        )
    return LoadedImages(torch.from_numpy(np.ascontiguousarray(stack)), files, skipped, resized)
