"""IDX files (the format of MNIST and Fashion-MNIST), plain or gzip-compressed, read safely.

A data file is untrusted: :func:`read_idx` parses the header with
:func:`cspace.io.untrusted.idx_header` (magic number, element type, dimensions) and bounds the
number of data bytes it declares, ``prod(sizes) * itemsize``, **before** allocating anything:

* a plain file must be exactly ``header + data`` bytes long (shorter: truncated; longer: bytes
  after the data, a different file);
* a gzip file (recognised by its first two bytes, ``1f 8b``, whatever its name) may declare at
  most :data:`GZIP_MAX_RATIO` times its compressed size (deflate cannot compress more than
  1032:1, so a larger claim is a lie), and is decompressed in bounded reads: exactly the declared
  bytes, then one more read that must find the end of the stream (and its CRC check);
* every file may declare at most ``max_bytes`` (default :data:`MAX_IDX_BYTES`, 1 GiB).

Only regular files are read (a FIFO or a device is refused before it is read, so it cannot hang
the reader). Errors are :class:`cspace.io.errors.DataFileError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from pathlib import Path

import numpy as np

from cspace.io.errors import DataFileError
from cspace.io.untrusted import FormatError, idx_header

__all__ = ["GZIP_MAX_RATIO", "IDX_IMAGES_U8", "IDX_LABELS_U8", "MAX_IDX_BYTES", "read_idx"]

#: the magic number of unsigned-byte images (N, H, W): MNIST's ``*-images-idx3-ubyte``
IDX_IMAGES_U8 = 0x00000803
#: the magic number of unsigned-byte labels (N,): MNIST's ``*-labels-idx1-ubyte``
IDX_LABELS_U8 = 0x00000801
#: the largest number of data bytes an IDX file may declare (Fashion-MNIST's train images: 47 MB)
MAX_IDX_BYTES = 1 << 30
#: deflate's largest compression ratio is 1032:1; a gzip file declaring more is refused
GZIP_MAX_RATIO = 1032
_GZIP_MAGIC = b"\x1f\x8b"
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _open_regular(path: Path):
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise DataFileError(f"{path} does not exist", path) from None
    except OSError as err:
        raise DataFileError(f"{path} cannot be opened: {err}", path) from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DataFileError(f"{path} is not a regular file", path)
    return os.fdopen(fd, "rb"), st.st_size


def read_idx(
    path: str | os.PathLike, magic: int | None = None, *, max_bytes: int = MAX_IDX_BYTES
) -> np.ndarray:
    """The array of the IDX file ``path`` (plain or gzip), shape = the header's sizes, in the
    native byte order of its element type (uint8 for MNIST files).

    ``magic``: the magic number required (:data:`IDX_IMAGES_U8`, :data:`IDX_LABELS_U8`), or None
    for any IDX file. Raises :class:`DataFileError` for a file that is missing, not a regular
    file, not IDX, of another magic number, truncated, longer than its header says, declaring
    more than ``max_bytes`` (or, gzip, more than :data:`GZIP_MAX_RATIO` x its size), or a
    corrupt gzip stream.
    """
    path = Path(path)
    fh, size = _open_regular(path)
    with fh:
        compressed = fh.read(2) == _GZIP_MAGIC
        fh.seek(0)
        if not compressed:
            return _parse(path, fh, size, size, magic, max_bytes, "")
        try:
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                return _parse(path, gz, None, size, magic, max_bytes, " (decompressed)")
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise DataFileError(f"{path} is not a readable gzip file: {err}", path) from None


def _read_exact(path: Path, fh, n: int, what: str) -> bytearray:
    """Exactly ``n`` bytes (``n`` already bounded) into one writable buffer, or the error."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            break
        got += k
    if got != n:
        raise DataFileError(
            f"{path} is truncated: {what} needs {n} bytes but only {got} are there", path
        )
    return data


def _parse(path: Path, fh, plain_size: int | None, file_size: int, magic, max_bytes, how: str):
    head = fh.read(4)
    if len(head) == 4:  # at most 1020 more bytes, whatever the magic number says
        head += fh.read(4 * head[3])
    try:
        dtype, shape, nbytes = idx_header(head, magic)
    except FormatError as err:
        raise DataFileError(f"{path}{how}: {err}", path) from None
    header = len(head)
    if nbytes > max_bytes:
        raise DataFileError(
            f"{path}: its header declares {shape} = {nbytes} bytes of data, more than the "
            f"{max_bytes} an IDX file may have (corrupt or crafted)",
            path,
        )
    if plain_size is not None:
        if header + nbytes != plain_size:
            state = "truncated" if header + nbytes > plain_size else "longer than its header says"
            raise DataFileError(
                f"{path} is {state}: its header declares {shape} ({header + nbytes} bytes with "
                f"the header) but the file has {plain_size} bytes",
                path,
            )
    elif header + nbytes > GZIP_MAX_RATIO * file_size:
        raise DataFileError(
            f"{path}: its header declares {shape} = {nbytes} bytes of data, more than a gzip "
            f"file of {file_size} bytes can hold (at most {GZIP_MAX_RATIO} x its size): "
            "truncated, corrupt or crafted",
            path,
        )
    data = _read_exact(path, fh, nbytes, f"the {shape} data its header declares{how}")
    if plain_size is None and fh.read(1):
        raise DataFileError(
            f"{path} is longer than its header says: bytes follow the {shape} data{how}", path
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr
