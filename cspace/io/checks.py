"""Checks made before work starts: sizes against this machine's memory, output paths, and
weights files that are links.

A size that no machine could hold (a budget of 10^20 NFE, ten million dimensions, a trillion
samples) is refused here with an error naming the size, the memory it needs and what to lower,
before anything is allocated or computed; an output path that cannot be written (a folder under
a file, a file where a folder is wanted, no permission) is refused before a long run rather than
after it.

* :func:`check_memory`: ``nbytes`` against the machine's physical memory
  (:func:`memory_bytes`); raises :class:`SizeLimitError`.
* :func:`check_output_folder`, :func:`check_output_file`: the path can be created (or replaced)
  by this process; raise ``NotADirectoryError``, ``IsADirectoryError``, ``FileExistsError`` or
  ``PermissionError`` with a message naming the path and the fix.
* :func:`check_weight_links`: the ``*.safetensors`` of a model folder that are symbolic links
  (the shipped pipelines' ``vae/``) lead to a file, and none is the text of a link that a
  checkout without symbolic links wrote; raises
  :class:`~cspace.io.errors.MissingWeightsError` naming the link and the fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = [
    "SizeLimitError",
    "check_memory",
    "check_output_file",
    "check_output_folder",
    "check_weight_links",
    "format_bytes",
    "memory_bytes",
]

_FALLBACK_MEMORY = 1 << 40  # 1 TiB, when the operating system does not say


class SizeLimitError(ValueError):
    """A requested size needs more memory than this machine has (nothing was allocated)."""


def memory_bytes() -> int:
    """This machine's physical memory in bytes (``sysconf``; 1 TiB where it is not known)."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_MEMORY
    return int(pages) * int(size) if pages > 0 and size > 0 else _FALLBACK_MEMORY


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``3.0 GiB``; astronomically large sizes in powers of 10."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            break
        n /= 1024
    if unit == "EiB" and n >= 1024:
        return f"{n * 2.0**60:.3g} B"
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def check_memory(nbytes: int | float, what: str, fix: str) -> None:
    """Raise :class:`SizeLimitError` when ``nbytes`` exceed this machine's physical memory.

    Args:
        nbytes: the bytes the request needs at least (e.g. ``states x dim x 8``); Python ints
            of any size are compared exactly.
        what: what needs them, e.g. ``"best-of-n with 7.8e15 candidates per sample"``.
        fix: what to lower, e.g. ``"lower --budget"``.
    """
    limit = memory_bytes()
    if nbytes > limit:
        raise SizeLimitError(
            f"{what} needs {format_bytes(nbytes)}, more than this machine's memory "
            f"({format_bytes(limit)}); {fix}"
        )


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_output_folder(path: str | os.PathLike, flag: str = "the output folder") -> Path:
    """Check that the folder ``path`` exists or can be created, and can be written into.

    Nothing is created. Raises ``NotADirectoryError`` (``path`` or a parent is a file),
    ``PermissionError`` (no write permission where the first missing part would be made) with a
    message naming ``flag``, the path and the fix. Returns ``path`` as a Path.
    """
    path = Path(path)
    here = _first_existing(path)
    if here.exists() and not here.is_dir():
        where = "is a file" if here == path else f"is inside {here}, which is a file"
        raise NotADirectoryError(
            errno.ENOTDIR, f"{flag} {path} {where}, not a folder; choose another path"
        )
    if not os.access(here, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"{flag} {path}: no write permission in {here}; choose another path"
        )
    return path


def check_output_file(path: str | os.PathLike, flag: str = "the output file") -> Path:
    """Check that the file ``path`` can be written (created or replaced): not a folder, its
    parent a folder that exists or can be created, writable. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"{flag} {path} is a folder, not a file; pass a file name"
        )
    check_output_folder(path.parent if str(path.parent) else Path("."), f"the folder of {flag}")
    return path


#: the longest file read as the possible text of a link (a real weights file is far longer)
_LINK_TEXT_BYTES = 4096


def check_weight_links(folder: str | os.PathLike) -> None:
    """Raise :class:`~cspace.io.errors.MissingWeightsError` if a ``*.safetensors`` file of
    ``folder`` is a symbolic link that leads nowhere (a dangling link, or a loop), or a small
    file holding the relative path of another ``.safetensors`` file (what git writes for a link
    in a checkout without symbolic links). The shipped Fashion-MNIST pipelines' ``vae/`` weights
    are such links, to their VAE folders' files (``scripts/link_shipped_vaes.py``)."""
    from cspace.io.errors import MissingWeightsError

    for w in sorted(Path(folder).glob("*.safetensors")):
        if w.is_symlink() and not os.path.exists(w):  # never raises, loops included
            raise MissingWeightsError(
                f"{w} is a link to {os.readlink(w)}, which leads to no file. Either the folder "
                "was copied without the file the link points to (copy it with the links "
                "followed: `cp -rL` or shutil.copytree), or that file's folder was saved again "
                "since (in a checkout of cspace: python scripts/link_shipped_vaes.py)"
            )
        if not w.is_symlink() and w.is_file() and w.stat().st_size <= _LINK_TEXT_BYTES:
            text = w.read_bytes()
            if text.strip().endswith(b".safetensors") and (b"/" in text or b"\\" in text):
                raise MissingWeightsError(
                    f"{w} holds the text {text.strip().decode(errors='replace')!r}, not weights: "
                    "a symbolic link checked out as a file (git with core.symlinks false). "
                    "Check out with symbolic links (git config core.symlinks true), or copy the "
                    "file it names here"
                )
