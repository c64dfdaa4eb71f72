"""Bounded parsers of untrusted bytes: JSON documents, safetensors headers, FAISS flat indexes,
IDX headers.

A file cspace loads may have been crafted: its checksums (written by whoever wrote the file)
protect against accidents, not against an adversary. Every parser here checks each length the
bytes declare against the real number of bytes (and against what the caller expects: tensor
names, dtypes, shapes, an index's dimension and count) *before* anything is allocated, never
recurses on the input, and never unpickles anything. Each raises :class:`FormatError` (a
``ValueError``) saying what is wrong; :mod:`cspace.io.folder` adds the file's path and the
kind's error class.

* :func:`parse_json`: UTF-8 JSON of at most ``max_bytes`` bytes and ``max_depth`` levels of
  nesting (checked on the text before it is parsed, so a deeply nested document costs neither a
  ``RecursionError`` nor memory);
* :func:`check_safetensors`: a safetensors file's header (an 8-byte little-endian length, then
  a JSON object of tensors ``{name: {"dtype", "shape", "data_offsets"}}``), validated against
  the file size and optionally against the exact tensors expected;
* :func:`read_faiss_flat_l2`: the float32 vectors of a serialised ``faiss.IndexFlatL2`` (the
  ``index.faiss`` of obstacle sets before format version 3), parsed here so that FAISS' own
  deserialiser never sees an untrusted file;
* :func:`idx_header`: the header of an IDX file (the format of MNIST and Fashion-MNIST): magic
  number, element type, dimensions, and the number of data bytes they declare
  (:mod:`cspace.io.idx` reads the files, gzip-compressed or not).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "FAISS_FLAT_HEADER_BYTES",
    "FAISS_FLAT_L2_FOURCC",
    "IDX_DTYPES",
    "MAX_COUNT",
    "MAX_DIM",
    "MAX_JSON_DEPTH",
    "MAX_SAFETENSORS_HEADER",
    "SAFETENSORS_DTYPES",
    "FormatError",
    "check_safetensors",
    "idx_header",
    "json_depth",
    "parse_json",
    "read_faiss_flat_l2",
]


class FormatError(ValueError):
    """Bytes that are not what they claim to be (the message says what is wrong)."""


#: the largest embedding dimension d read (FAISS stores d as a C int)
MAX_DIM = 2**31 - 1
#: the largest number of vectors N read (a declared count beyond it is refused outright;
#: smaller ones are checked against the bytes that hold the vectors)
MAX_COUNT = 2**40


#: the deepest nesting of JSON read (cspace's manifests and records nest at most 4 levels)
MAX_JSON_DEPTH = 32

# A JSON string (with escapes); used to blank strings out before counting brackets.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes) -> int:
    """The deepest nesting of brackets (``[`` and ``{``) in the JSON text ``data``, outside
    strings; no recursion, and memory linear in the number of brackets."""
    blank = _JSON_STRING.sub(b'""', data)
    codes = np.frombuffer(blank, dtype=np.uint8)
    steps = _OPEN[codes]
    steps = steps[steps != 0]
    if steps.size == 0:
        return 0
    return int(np.cumsum(steps, dtype=np.int64).max())


def parse_json(data: bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON of at most ``max_bytes`` bytes nested at most ``max_depth`` levels.

    The depth is measured on the text before parsing. Numbers are parsed as Python's ``json``
    does (``NaN``, ``Infinity`` and big integers included): callers check the type and range
    of every field they use.
    """
    if len(data) > max_bytes:
        raise FormatError(f"{len(data)} bytes, more than the {max_bytes} such a file may have")
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"not UTF-8 text: {err}") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise FormatError(
            f"JSON nested {depth} levels deep, more than the {max_depth} allowed (corrupt or "
            "crafted)"
        )
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise FormatError("JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and integers of more than 4300 digits
        raise FormatError(f"not JSON: {err}") from None


# ---------------------------------------------------------------------- safetensors
#: bytes per element of each safetensors dtype
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: the largest safetensors header read (a model of thousands of tensors needs well under 1 MiB)
MAX_SAFETENSORS_HEADER = 16 << 20
_MAX_NDIM = 16


def _is_int(value: Any) -> bool:
    return type(value) is int


def check_safetensors(
    data: bytes | memoryview,
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
    *,
    max_header: int = MAX_SAFETENSORS_HEADER,
) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Validate a safetensors file's header against the file's size (and ``expected``).

    The layout: ``n`` (8 bytes, little-endian), a JSON object of ``n`` bytes
    ``{name: {"dtype": D, "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
    {str: str}}``, then the data buffer. Checked: ``8 + n <= len(data)`` and
    ``n <= max_header``; the JSON (bounded depth); each tensor's dtype known, shape a list of
    ints >= 0, ``end - begin = prod(shape) * itemsize``, and the tensors tiling the buffer
    exactly (contiguous, no gap, no overlap, nothing after). With ``expected`` (name ->
    (dtype, shape)) the tensors must be exactly those.

    Returns name -> (dtype, shape, begin, end) (offsets into the buffer after the header).
    """
    size = len(data)
    if size < 8:
        raise FormatError(f"{size} bytes: too short for a safetensors file (no header length)")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > size - 8:
        raise FormatError(
            f"its header claims {n} bytes but the file has {size - 8} after the length field "
            "(truncated or crafted)"
        )
    if n > max_header:
        raise FormatError(f"its header has {n} bytes, more than the {max_header} allowed")
    try:
        header = parse_json(bytes(data[8 : 8 + n]), max_bytes=max_header, max_depth=4)
    except FormatError as err:
        raise FormatError(f"its header is not valid: {err}") from None
    if not isinstance(header, dict):
        raise FormatError(f"its header is a JSON {type(header).__name__}, not an object")
    buffer = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FormatError("its __metadata__ is not an object of strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(
                f"tensor {name!r}: expected {{dtype, shape, data_offsets}}; got {info!r:.200}"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r:.40}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_NDIM
            or not all(_is_int(s) and s >= 0 for s in shape)
        ):
            raise FormatError(f"tensor {name!r}: shape {shape!r:.200} is not a list of ints >= 0")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= buffer
        ):
            raise FormatError(
                f"tensor {name!r}: data_offsets {offsets!r:.200} do not lie within the "
                f"{buffer}-byte data buffer"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if nbytes != end - begin:
            raise FormatError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but its "
                f"data_offsets span {end - begin}"
            )
        tensors[name] = (dtype, tuple(shape), begin, end)
    pos = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            raise FormatError(
                f"tensor {name!r} starts at byte {begin} of the data buffer, expected {pos} "
                "(tensors must tile the buffer)"
            )
        pos = end
    if pos != buffer:
        raise FormatError(f"the tensors cover {pos} of the {buffer} bytes of its data buffer")
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise FormatError(
                f"expected the tensors {sorted(expected)}; missing {missing}, unexpected "
                f"{extra[:5]}"
            )
        for name, (dtype, shape) in expected.items():
            got_dtype, got_shape = tensors[name][:2]
            if got_dtype != dtype or got_shape != tuple(shape):
                raise FormatError(
                    f"tensor {name!r} is {got_dtype} of shape {got_shape}, expected {dtype} "
                    f"of shape {tuple(shape)}"
                )
    return tensors


# ---------------------------------------------------------------------- FAISS IndexFlatL2
#: the type tag of a serialised ``IndexFlatL2`` (``faiss.serialize_index``)
FAISS_FLAT_L2_FOURCC = b"IxF2"
_FAISS_FOURCC = {
    b"IxF2": "IndexFlatL2",
    b"IxFI": "IndexFlatIP",
    b"IxFl": "IndexFlat",
}
_FAISS_METRICS = {
    0: "inner product",
    1: "L2",
    2: "L1",
    3: "Linf",
    4: "Lp",
    20: "Canberra",
    21: "BrayCurtis",
    22: "JensenShannon",
    23: "Jaccard",
    24: "NaNEuclidean",
    25: "ABS_INNER_PRODUCT",
}
_METRIC_L2 = 1
# fourcc, d (int32), ntotal (int64), two unused int64 (always 1 << 20), is_trained (1 byte),
# metric_type (int32); an L2 index has no metric_arg; then the number of float32 codes (uint64)
_FAISS_HEADER = struct.Struct("<4siqqqBi")
_FAISS_COUNT = struct.Struct("<Q")
_FAISS_DUMMY = 1 << 20
#: bytes before the codes of a serialised IndexFlatL2
FAISS_FLAT_HEADER_BYTES = _FAISS_HEADER.size + _FAISS_COUNT.size


def _metric_name(metric: int) -> str:
    return _FAISS_METRICS.get(metric, f"unknown ({metric})")


def read_faiss_flat_l2(data: bytes | memoryview, dim: int, count: int) -> np.ndarray:
    """The (count, dim) float32 vectors of a serialised ``faiss.IndexFlatL2``, a read-only view
    of ``data`` (nothing is allocated).

    The layout written by ``faiss.serialize_index`` (faiss/impl/index_write.cpp,
    ``write_index_header``)::

        "IxF2" | d: int32 | ntotal: int64 | 1<<20: int64 | 1<<20: int64 | is_trained: uint8
        | metric_type: int32 (1 = L2) | n_codes: uint64 | n_codes float32 codes

    Error messages are phrases that follow the file's name ("is not a readable FAISS index:
    ...", "holds a ...", "declares the ... metric", "has d=...").

    Each field is checked (``d`` = ``dim``, ``ntotal`` = ``count``, ``n_codes`` = ``d * ntotal``
    and the file exactly that long) before the codes are touched; another index type or metric
    (inner product, L1, ...) is refused by name.
    """
    size = len(data)
    tag = bytes(data[:4])
    if size < 4 or tag not in _FAISS_FOURCC:
        raise FormatError(
            f"is not a readable FAISS index: it starts with {tag!r}, not {FAISS_FLAT_L2_FOURCC!r} "
            "(an IndexFlatL2)"
        )
    if size < _FAISS_HEADER.size:
        raise FormatError(
            f"is not a readable FAISS index: {size} bytes, shorter than the "
            f"{FAISS_FLAT_HEADER_BYTES}-byte header of an IndexFlatL2 (truncated)"
        )
    if tag != FAISS_FLAT_L2_FOURCC:
        metric = _FAISS_HEADER.unpack_from(data, 0)[-1]
        raise FormatError(
            f"holds a {_FAISS_FOURCC[tag]} with the {_metric_name(metric)} metric, not an "
            "IndexFlatL2: obstacle sets use Euclidean (L2) distances"
        )
    _, d, ntotal, dummy1, dummy2, trained, metric = _FAISS_HEADER.unpack_from(data, 0)
    if metric != _METRIC_L2:
        if metric not in _FAISS_METRICS:
            raise FormatError(f"is not a readable FAISS index: unknown metric_type {metric}")
        raise FormatError(
            f"declares the {_metric_name(metric)} metric, not L2: obstacle sets use Euclidean "
            "(L2) distances"
        )
    if d != dim or ntotal != count:
        raise FormatError(f"has d={d}, count={ntotal} but the manifest says d={dim}, count={count}")
    if dummy1 != _FAISS_DUMMY or dummy2 != _FAISS_DUMMY or trained != 1:
        raise FormatError(
            "is not a readable FAISS index: its header fields are not those FAISS writes "
            f"(unused fields {dummy1}, {dummy2}; is_trained {trained})"
        )
    if size < FAISS_FLAT_HEADER_BYTES:
        raise FormatError(
            f"is not a readable FAISS index: {size} bytes, shorter than the "
            f"{FAISS_FLAT_HEADER_BYTES}-byte header of an IndexFlatL2 (truncated)"
        )
    (n_codes,) = _FAISS_COUNT.unpack_from(data, _FAISS_HEADER.size)
    if n_codes != d * ntotal:
        raise FormatError(
            f"is not a readable FAISS index: it declares {n_codes} codes ({4 * n_codes} bytes) but "
            f"d x count = {d} x {ntotal} = {d * ntotal}"
        )
    if size != FAISS_FLAT_HEADER_BYTES + 4 * n_codes:
        raise FormatError(
            f"is not a readable FAISS index: {size} bytes, but its header and {n_codes} float32 "
            f"codes make {FAISS_FLAT_HEADER_BYTES + 4 * n_codes} (truncated or padded)"
        )
    codes = np.frombuffer(data, dtype="<f4", count=n_codes, offset=FAISS_FLAT_HEADER_BYTES)
    return codes.reshape(count, dim)


# ---------------------------------------------------------------------- IDX (MNIST) headers
#: IDX element type code -> numpy dtype (big-endian, as the format stores them)
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def idx_header(head: bytes, magic: int | None = None) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an IDX header: ``(dtype, shape, data_bytes)``.

    The layout (Y. LeCun's MNIST page): a 4-byte magic number ``0x00 0x00 T N`` (``T`` the
    element type, :data:`IDX_DTYPES`; ``N`` the number of dimensions), then ``N`` big-endian
    uint32 sizes, then ``prod(sizes)`` elements in row-major order. ``head`` is the file's first
    bytes: the magic number is checked first, then that the ``4 + 4 N`` header bytes are there
    (bytes after them are ignored). With ``magic`` (e.g. ``0x00000803``:
    unsigned bytes in 3 dimensions, MNIST's images) the magic number must be exactly that.

    ``data_bytes = prod(sizes) * itemsize`` is what the header declares; the caller checks it
    against the bytes really there before allocating anything.
    """
    if len(head) < 4:
        raise FormatError(f"{len(head)} bytes: too short for an IDX file (no magic number)")
    got = int.from_bytes(head[:4], "big")
    if head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES or head[3] == 0:
        want = f" (expected 0x{magic:08x})" if magic is not None else ""
        raise FormatError(f"magic number 0x{got:08x} is not that of an IDX file{want}")
    if magic is not None and got != magic:
        raise FormatError(
            f"magic number 0x{got:08x} ({IDX_DTYPES[head[2]].name}, {head[3]} dimensions), "
            f"expected 0x{magic:08x} ({IDX_DTYPES[(magic >> 8) & 0xFF].name}, "
            f"{magic & 0xFF} dimensions): a different IDX file (images and labels swapped?)"
        )
    dtype, ndim = IDX_DTYPES[head[2]], head[3]
    need = 4 + 4 * ndim
    if len(head) < need:
        raise FormatError(
            f"{len(head)} bytes, shorter than the {need}-byte header of {ndim} dimensions "
            "(truncated)"
        )
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return dtype, shape, math.prod(shape) * dtype.itemsize
