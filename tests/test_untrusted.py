"""Loading untrusted folders: crafted files of a few hundred bytes (huge declared lengths, foreign
metrics, NaN embeddings, FIFOs, deep or mistyped JSON) give a clear error naming the file and the
field, and allocate nothing large (cspace.io.untrusted, cspace.io.folder, ObstacleSet.load)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from safetensors.numpy import save as st_save

from cspace.io.folder import MAX_JSON_DEPTH, read_folder
from cspace.io.untrusted import (
    FAISS_FLAT_HEADER_BYTES,
    FAISS_FLAT_L2_FOURCC,
    FormatError,
    check_safetensors,
    json_depth,
    parse_json,
    read_faiss_flat_l2,
)
from cspace.models.space import Space
from obstacles import ObstacleSet, ObstacleSetError, PreferenceClassifier
from obstacles.classifier import ClassifierError
from obstacles.obstacle_set import KIND
from tests.folders import manifest, replace_payload, stored, write_manifest
from tests.legacy_writers import save_obstacle_set_v1, save_obstacle_set_v2

ROOT = Path(__file__).resolve().parents[1]
SPACE = Space(
    encoder="tiny",
    config_hash="abc",
    weights=(0.5, -1.25),
    image_size=(8, 8),
    channels=1,
    latent_shape=(2, 2, 1),
    dim=4,
)


def _set(n: int = 4, d: int = 4, seed: int = 0, space=None) -> ObstacleSet:
    rng = np.random.default_rng(seed)
    s = ObstacleSet.from_embeddings(
        rng.standard_normal((n, d)),
        q_star=1.0,
        eta=0.5,
        labels=[f"l{i}" for i in range(n)],
        sources=[f"s{i}" for i in range(n)],
        space=space,
    )
    s.set_parameters(q_star=2.0, note="tuned")
    return s


@pytest.fixture
def v3(tmp_path) -> Path:
    return _set(space=SPACE).save(tmp_path / "set")


@pytest.fixture
def v2(tmp_path) -> Path:
    return save_obstacle_set_v2(_set(), tmp_path / "set2")


# ---------------------------------------------------------------------- the FAISS parser
@pytest.mark.parametrize(("n", "d"), [(0, 1), (1, 1), (4, 4), (37, 13), (5, 300)])
def test_flat_index_parser_reads_what_the_installed_faiss_writes(n, d):
    """The layout the parser assumes (fourcc, header fields, codes) is checked against
    faiss.serialize_index of this FAISS: the vectors come back bit for bit."""
    vecs = np.random.default_rng(n * 1000 + d).standard_normal((n, d)).astype(np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(vecs)
    blob = faiss.serialize_index(index).tobytes()
    assert blob[:4] == FAISS_FLAT_L2_FOURCC
    assert len(blob) == FAISS_FLAT_HEADER_BYTES + 4 * n * d
    got = read_faiss_flat_l2(blob, d, n)
    assert got.shape == (n, d) and got.dtype == np.float32
    assert got.tobytes() == vecs.tobytes()
    assert not got.flags.writeable  # a view of the bytes, nothing allocated


@pytest.mark.parametrize(
    ("make", "msg"),
    [
        (lambda: faiss.IndexFlatIP(4), "holds a IndexFlatIP with the inner product metric"),
        (lambda: faiss.IndexFlat(4, faiss.METRIC_L1), "holds a IndexFlat with the L1 metric"),
        (lambda: faiss.IndexHNSWFlat(4, 8), "is not a readable FAISS index: it starts with"),
    ],
    ids=["ip", "l1", "hnsw"],
)
def test_flat_index_parser_refuses_other_indexes(make, msg):
    index = make()
    index.add(np.zeros((3, 4), np.float32))
    with pytest.raises(FormatError, match=msg):
        read_faiss_flat_l2(faiss.serialize_index(index).tobytes(), 4, 3)


def _l2_blob(n: int = 4, d: int = 4) -> bytes:
    index = faiss.IndexFlatL2(d)
    index.add(np.arange(n * d, dtype=np.float32).reshape(n, d))
    return faiss.serialize_index(index).tobytes()


def _with(blob: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "msg"),
    [
        (33, "<i", 0, "declares the inner product metric, not L2"),  # an IP metric in an IxF2
        (33, "<i", 2, "declares the L1 metric, not L2"),
        (33, "<i", 77, "unknown metric_type 77"),
        (37, "<Q", 750_000_000, r"declares 750000000 codes \(3000000000 bytes\)"),  # 3 GB
        (37, "<Q", 2**64 - 1, "declares 18446744073709551615 codes"),
        (4, "<i", 5, "has d=5, count=4 but the manifest says d=4, count=4"),
        (8, "<q", -1, "has d=4, count=-1"),
        (16, "<q", 7, "not those FAISS writes"),
        (32, "<B", 0, "is_trained 0"),
    ],
    ids=["ip", "l1", "metric77", "3GB", "2^64", "d", "ntotal", "dummy", "untrained"],
)
def test_flat_index_parser_checks_every_header_field(offset, fmt, value, msg):
    blob = _l2_blob()
    assert len(blob) == 109  # the crafted file of the issue: 45 header bytes + 16 floats
    with pytest.raises(FormatError, match=msg):
        read_faiss_flat_l2(_with(blob, offset, fmt, value), 4, 4)


def test_flat_index_parser_refuses_truncated_and_padded_files():
    blob = _l2_blob()
    for bad in (blob[:-1], blob + b"\0" * 4, blob[:40], blob[:3], b""):
        with pytest.raises(FormatError, match="not a readable FAISS index"):
            read_faiss_flat_l2(bad, 4, 4)


# ---------------------------------------------------------------------- safetensors headers
def test_safetensors_header_accepts_what_safetensors_writes():
    blob = st_save({"a": np.zeros((3, 2), np.float32), "b": np.arange(5), "e": np.zeros((0, 4))})
    info = check_safetensors(blob)
    assert info["a"][:2] == ("F32", (3, 2)) and info["b"][:2] == ("I64", (5,))
    assert info["e"][:2] == ("F64", (0, 4))
    check_safetensors(blob, {"a": ("F32", (3, 2)), "b": ("I64", (5,)), "e": ("F64", (0, 4))})


def _st(header, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("blob", "msg"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 2**62) + b"{}", "header claims 4611686018427387904 bytes"),
        (
            _st(
                {"t": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}},
                b"\0" * 16,
            ),
            "needs 4611686018427387904 bytes but its data_offsets span 16",
        ),
        (
            _st({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 3 << 30]}}, b"\0" * 16),
            "do not lie within the 16-byte data buffer",
        ),
        (
            _st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
            "starts at byte 8 of the data buffer, expected 0",
        ),
        (
            _st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16),
            "cover 8 of the 16 bytes",
        ),
        (
            _st({"t": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
            "unknown dtype",
        ),
        (
            _st({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4),
            "is not a list of ints",
        ),
        (
            _st({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
            "is not a list of ints",
        ),
        (
            _st({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4),
            "expected {dtype, shape, data_offsets}",
        ),
        (_st({"__metadata__": {"a": 1}}), "__metadata__ is not an object of strings"),
        (_st(b"[" * 5000 + b"]" * 5000), "nested 5000 levels deep"),
        (_st(b"{not json"), "not JSON"),
        (_st([1, 2]), "is a JSON list, not an object"),
    ],
    ids=[
        "short",
        "header-2^62",
        "shape-huge",
        "offsets-3GB",
        "gap",
        "short-cover",
        "dtype",
        "float-shape",
        "bool-shape",
        "extra-key",
        "metadata",
        "deep",
        "not-json",
        "list",
    ],
)
def test_safetensors_header_refuses_crafted_headers(blob, msg):
    with pytest.raises(FormatError, match=msg):
        check_safetensors(blob)


def test_safetensors_header_expected_tensors():
    blob = st_save({"ids": np.arange(3.0)})
    with pytest.raises(FormatError, match=r"'ids' is F64 of shape \(3,\), expected I64"):
        check_safetensors(blob, {"ids": ("I64", (3,))})
    with pytest.raises(FormatError, match=r"missing \['q'\], unexpected \[\]"):
        check_safetensors(blob, {"ids": ("F64", (3,)), "q": ("F64", (3,))})


# ---------------------------------------------------------------------- bounded JSON
def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b"1") == 0
    assert json_depth(b'{"a": [1, {"b": "[[[["}], "c": "\\"]]]"}') == 3
    assert json_depth(b"[" * 100 + b"]" * 100) == 100


def test_parse_json_limits():
    with pytest.raises(
        FormatError, match=f"nested 100000 levels deep, more than the {MAX_JSON_DEPTH}"
    ):
        parse_json(b"[" * 100_000 + b"]" * 100_000, max_bytes=1 << 20)
    with pytest.raises(FormatError, match="more than the 10 such a file may have"):
        parse_json(b"[1, 2, 3, 4, 5]", max_bytes=10)
    with pytest.raises(FormatError, match="not JSON"):  # Python refuses > 4300 digits
        parse_json(b"9" * 5000, max_bytes=1 << 20)
    with pytest.raises(FormatError, match="not UTF-8"):
        parse_json(b"\xff\xfe", max_bytes=10)
    assert parse_json(b'{"a": [1, 2.5, "x"]}', max_bytes=100) == {"a": [1, 2.5, "x"]}


# ---------------------------------------------------------------------- crafted sets: memory
def _crafted_109_byte_set(tmp_path: Path, codes: int = 750_000_000, count: int = 4) -> Path:
    """A format-2 set whose 109-byte index.faiss claims ``codes`` float32 codes (3 GB by
    default), checksums matching, as an adversary would make it."""
    path = save_obstacle_set_v2(_set(n=4, d=4), tmp_path / f"crafted-{codes}-{count}")
    blob = (path / "index.faiss").read_bytes()
    assert len(blob) == 109
    blob = _with(_with(blob, 37, "<Q", codes), 8, "<q", count)
    replace_payload(path, "index.faiss", blob)
    doc = manifest(path)
    doc["count"] = count
    write_manifest(path, doc)
    return path


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from obstacles import ObstacleSet, ObstacleSetError
    ObstacleSet.load(sys.argv[1])  # everything imported and warmed up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    errors = []
    for path in sys.argv[2:]:
        try:
            ObstacleSet.load(path)
            errors.append(None)
        except ObstacleSetError as err:
            errors.append(str(err))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak, "errors": errors}))
    """
)


def test_crafted_109_byte_set_is_refused_without_allocating(tmp_path):
    """The issue's reproduction: faiss.deserialize_index zero-filled 3 GB for it (and raised
    a raw MemoryError for a 12 GB claim). The peak RSS of a fresh process loading it (and the
    variants) stays within 100 MB of its baseline."""
    valid = _set(n=4, d=4).save(tmp_path / "valid")
    crafted = [
        _crafted_109_byte_set(tmp_path),  # 3 GB of codes
        _crafted_109_byte_set(tmp_path, codes=3_000_000_000),  # 12 GB
        _crafted_109_byte_set(tmp_path, codes=750_000_000, count=187_500_000),  # count agrees
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(valid), *map(str, crafted)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    grown_mb = (rep["peak_kib"] - rep["base_kib"]) / 1024
    print(f"peak RSS over baseline loading the crafted sets: {grown_mb:.2f} MB "
          f"({time.perf_counter() - t0:.1f} s with the interpreter start)")  # fmt: skip
    assert grown_mb < 100
    e3, e12, ecount = rep["errors"]
    assert "index.faiss is not a readable FAISS index: it declares 750000000 codes" in e3
    assert "declares 3000000000 codes" in e12
    assert "its header and 750000000 float32 codes make 3000000045" in ecount
    # and in this process, the same clear error
    with pytest.raises(ObstacleSetError, match="declares 750000000 codes"):
        ObstacleSet.load(crafted[0])


def test_crafted_current_set_with_huge_declared_lengths(v3):
    emb = stored(v3, "embeddings.safetensors").read_bytes()
    # the header length claims 2^62 bytes
    replace_payload(v3, "embeddings.safetensors", struct.pack("<Q", 2**62) + emb[8:])
    with pytest.raises(ObstacleSetError, match="header claims 4611686018427387904 bytes"):
        ObstacleSet.load(v3)
    # a header that claims a 3 GB tensor (count and manifest agreeing)
    header = {
        "embeddings": {"dtype": "F32", "shape": [187_500_000, 4], "data_offsets": [0, 3 * 10**9]}
    }
    replace_payload(v3, "embeddings.safetensors", _st(header, b"\0" * 64))
    doc = manifest(v3)
    doc["count"] = 187_500_000
    write_manifest(v3, doc)
    with pytest.raises(ObstacleSetError, match="do not lie within the 64-byte data buffer"):
        ObstacleSet.load(v3)


# ---------------------------------------------------------------------- crafted sets: fields
@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("count", float("inf"), r"field 'count' must be an integer in \[0, \d+\]; got inf"),
        ("count", 4.0, "field 'count' must be an integer"),
        ("count", 1e300, "field 'count' must be an integer"),
        ("count", -1, "field 'count' must be an integer"),
        ("count", True, "field 'count' must be an integer"),
        ("count", "4", "field 'count' must be an integer"),
        ("count", 2**80, "field 'count' must be an integer"),
        ("count", None, "field 'count' must be an integer"),
        ("dim", float("inf"), "field 'dim' must be an integer"),
        ("dim", 0, "field 'dim' must be an integer"),
        ("dim", 4.5, "field 'dim' must be an integer"),
        ("metric", "ip", "field 'metric' is 'ip'; obstacle sets use Euclidean distances"),
        ("metric", None, "field 'metric' is None"),
        ("next_id", 12.5, "field 'next_id' must be an integer"),
        ("next_id", -3, "field 'next_id' must be an integer"),
        ("revision", "one", "field 'revision' must be an integer"),
        ("space", 5, "bad space record: a space must be a JSON object"),
        ("space", {**SPACE.to_json(), "dim": float("inf")}, "space's 'dim' must be an integer"),
        ("space", {**SPACE.to_json(), "dim": 4.0}, "space's 'dim' must be an integer"),
        ("space", {**SPACE.to_json(), "image_size": [8, 1e300]}, "'image_size' must be a list"),
        ("space", {**SPACE.to_json(), "weights": "abc"}, "'weights' must be a list"),
        ("space", {**SPACE.to_json(), "weights": [float("nan")]}, "'weights' must be finite"),
        ("space", {**SPACE.to_json(), "encoder": 3}, "'encoder' must be a string"),
    ],
)
def test_bad_manifest_fields_name_the_field(v3, field, value, msg):
    doc = manifest(v3)
    doc[field] = value
    write_manifest(v3, doc)  # json.dumps writes inf as Infinity, as a crafted file would
    with pytest.raises(ObstacleSetError, match=msg) as err:
        ObstacleSet.load(v3)
    assert err.value.path == v3 / "manifest.json"


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested 200000 levels deep"),
        ('{"format": "cspace.obstacles", "x": ' + "[" * 40 + "]" * 40 + "}", "nested 41 levels"),
        ("{not json", "corrupt or not JSON"),
        ('{"count": ' + "9" * 5000 + "}", "corrupt or not JSON"),
    ],
    ids=["deep", "deep-field", "not-json", "5000-digits"],
)
def test_bad_manifest_text(v3, text, msg):
    (v3 / "manifest.json").write_text(text)
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.load(v3)


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"labels": "l0l1l2l3"[:4]}, r"field 'labels' must be a list of 4 strings; got 'l0l1'"),
        ({"labels": "abcd"}, "field 'labels' must be a list of 4 strings"),  # not 4 labels
        ({"labels": ["a", "b", 3, "d"]}, r"field 'labels\[2\]' must be a string; got 3"),
        ({"sources": ["a"]}, "field 'sources' must be a list of 4 strings; got 1 entries"),
        ({"history": 5}, "field 'history' must be a list of revisions; got int"),
        ({"history": [5]}, r"history\[0\] must be an object; got int"),
        ({"history": [{"ids": [0.5]}]}, r"'history\[0\].ids\[0\]' must be an integer"),
        ({"history": [{"ids": [True]}]}, r"'history\[0\].ids\[0\]' must be an integer"),
        ({"history": [{"q_star": ["a"]}]}, r"'history\[0\].q_star\[0\]' must be a finite number"),
        ({"history": [{"eta": [float("nan")]}]}, r"'history\[0\].eta\[0\]' must be a finite"),
        ({"history": [{"radius": 1.0}]}, r"history\[0\].radius must be a list; got float"),
        ({"history": [{"q_star": [1.0], "eta": [1.0, 2.0]}]}, "have different lengths"),
        ({"history": [{"note": 5}]}, r"'history\[0\].note' must be a string"),
    ],
)
def test_bad_records_name_the_field(v3, change, msg):
    records = json.loads(stored(v3, "records.json").read_text())
    records.update(change)
    replace_payload(v3, "records.json", json.dumps(records).encode())
    with pytest.raises(ObstacleSetError, match=msg) as err:
        ObstacleSet.load(v3)
    assert err.value.path.name.startswith("records-")


def test_bad_records_text(v3):
    for text, msg in (
        (b"[]", "is a JSON list, not an object"),
        (b"[" * 100 + b"]" * 100, "nested 100 levels deep"),
        (b'{"labels": []}', "lacks a required field: 'sources'"),
    ):
        replace_payload(v3, "records.json", text)
        with pytest.raises(ObstacleSetError, match=msg):
            ObstacleSet.load(v3)


def test_legacy_records_are_checked_too(tmp_path):
    """A v1 set kept labels in its manifest: a string there is refused, not split into
    characters (one label per character before)."""
    path = save_obstacle_set_v1(_set(n=4), tmp_path / "v1")
    doc = manifest(path)
    doc["labels"] = "abcd"
    write_manifest(path, doc)
    with pytest.raises(ObstacleSetError, match="field 'labels' must be a list of 4 strings"):
        ObstacleSet.load(path)


@pytest.mark.parametrize(
    ("tensors", "msg"),
    [
        (
            {"ids": np.arange(4.0), "q_star": np.ones(4), "eta": np.ones(4), "radius": np.zeros(4)},
            r"tensor 'ids' is F64 of shape \(4,\), expected I64",  # float ids: truncated before
        ),
        (
            {"ids": np.arange(4), "q_star": np.ones(4), "eta": np.ones(4)},
            r"missing \['radius'\]",
        ),
        (
            {
                "ids": np.arange(4),
                "q_star": np.ones(4),
                "eta": np.ones(4),
                "radius": np.zeros(4),
                "extra": np.zeros(1),
            },
            r"unexpected \['extra'\]",
        ),
        (
            {"ids": np.arange(5), "q_star": np.ones(5), "eta": np.ones(5), "radius": np.zeros(5)},
            r"tensor 'ids' is I64 of shape \(5,\), expected I64 of shape \(4,\)",
        ),
        (
            {
                "ids": np.arange(4),
                "q_star": np.full(4, np.nan),
                "eta": np.ones(4),
                "radius": np.zeros(4),
            },
            "q_star must be finite",
        ),
    ],
    ids=["float-ids", "missing", "extra", "count", "nan-q_star"],
)
def test_bad_metadata_tensors(v3, tensors, msg):
    replace_payload(v3, "metadata.safetensors", st_save(tensors))
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.load(v3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_refused(v3, v2, bad):
    """In the current layout and inside an older set's index.faiss (accepted before: the
    field then returned NaN nearest distances and clearances)."""
    emb = _set().embeddings
    emb[2, 1] = bad
    replace_payload(v3, "embeddings.safetensors", st_save({"embeddings": emb}))
    with pytest.raises(ObstacleSetError, match="embedding 2 holds NaN or Inf"):
        ObstacleSet.load(v3)
    index = faiss.IndexFlatL2(4)
    index.add(emb)
    replace_payload(v2, "index.faiss", faiss.serialize_index(index).tobytes())
    with pytest.raises(ObstacleSetError, match="embedding 2 holds NaN or Inf") as err:
        ObstacleSet.load(v2)
    assert err.value.path == v2 / "index.faiss"


@pytest.mark.parametrize(
    ("tensors", "msg"),
    [
        ({"embeddings": np.zeros((4, 4))}, r"is F64 of shape \(4, 4\), expected F32"),
        ({"embeddings": np.zeros((5, 4), np.float32)}, r"expected F32 of shape \(4, 4\)"),
        ({"vectors": np.zeros((4, 4), np.float32)}, r"missing \['embeddings'\]"),
    ],
)
def test_bad_embeddings_tensor(v3, tensors, msg):
    replace_payload(v3, "embeddings.safetensors", st_save(tensors))
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.load(v3)


def test_legacy_index_with_a_foreign_metric_in_an_l2_header(v2):
    """A crafted header: IxF2 with an inner-product metric loaded as an L2 index before, and
    within() then silently found nothing."""
    blob = _with((v2 / "index.faiss").read_bytes(), 33, "<i", 0)
    replace_payload(v2, "index.faiss", blob)
    with pytest.raises(ObstacleSetError, match="declares the inner product metric, not L2"):
        ObstacleSet.load(v2)


# ---------------------------------------------------------------------- files that are not files
@pytest.mark.parametrize("what", ["fifo", "folder", "symlink"])
@pytest.mark.parametrize("name", ["embeddings.safetensors", "records.json", "manifest.json"])
def test_payload_that_is_not_a_regular_file(v3, tmp_path, what, name):
    """Refused by lstat before anything is opened: a FIFO would block a reader forever, a
    symbolic link could point anywhere (its target is never read)."""
    target = v3 / "manifest.json" if name == "manifest.json" else stored(v3, name)
    data = target.read_bytes()
    target.unlink()
    if what == "fifo":
        os.mkfifo(target)
    elif what == "folder":
        target.mkdir()
    else:
        (tmp_path / "elsewhere").write_bytes(data)
        target.symlink_to(tmp_path / "elsewhere")
    msg = "symbolic link, not a regular file" if what == "symlink" else "is not a regular file"
    with pytest.raises(ObstacleSetError, match=msg):
        ObstacleSet.load(v3)


def test_stored_name_must_match_the_checksum(v3):
    doc = manifest(v3)
    doc["files"]["records.json"]["file"] = stored(v3, "embeddings.safetensors").name
    write_manifest(v3, doc)
    with pytest.raises(ObstacleSetError, match=r"records\.json is stored as 'embeddings-"):
        ObstacleSet.load(v3)
    doc["files"]["records.json"]["file"] = "../../etc/passwd"
    write_manifest(v3, doc)
    with pytest.raises(ObstacleSetError, match=r"is stored as '\.\./\.\./etc/passwd'"):
        ObstacleSet.load(v3)
    doc["files"]["records.json"]["sha256"] = "ZZ" * 32
    write_manifest(v3, doc)
    with pytest.raises(ObstacleSetError, match="the manifest says"):
        ObstacleSet.load(v3)


# ---------------------------------------------------------------------- other kinds
@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("dim", float("inf"), "field 'dim' must be an integer"),
        ("dim", 3.0, "field 'dim' must be an integer"),
        ("threshold", "high", "field 'threshold' must be a finite number"),
        ("q_star", float("inf"), "field 'q_star' must be a finite number"),
        ("accuracy", 7, r"field 'accuracy' must be a finite number in \[0.0, 1.0\] or null"),
    ],
)
def test_classifier_manifest_fields(tmp_path, field, value, msg):
    path = PreferenceClassifier(np.array([1.0, -2.0, 0.5]), 0.3).save(tmp_path / "clf")
    doc = manifest(path)
    doc[field] = value
    write_manifest(path, doc)
    with pytest.raises(ClassifierError, match=msg):
        PreferenceClassifier.load(path)


def test_read_folder_verifies_before_the_kind_decodes(v3):
    """The shared reader alone refuses a crafted table entry (a size that is not an int)."""
    doc = manifest(v3)
    doc["files"]["records.json"]["bytes"] = float("inf")
    write_manifest(v3, doc)
    with pytest.raises(ObstacleSetError, match="the manifest says"):
        read_folder(v3, KIND)


def _model(kind: str, path: Path) -> Path:
    import torch

    from cspace.models.flow import FlowConfig, VelocityNet, save_flow
    from cspace.models.teachers import DigitsTeacher
    from cspace.models.vae import AlignedVAEConfig, build_autoencoder, save_aligned_vae

    torch.manual_seed(0)
    if kind == "flow":
        cfg = FlowConfig(latent_shape=(2, 1, 1), width=16, depth=1, time_channels=8)
        return save_flow(path, VelocityNet(cfg), {"encoder": "test"})
    if kind == "vae":
        cfg = AlignedVAEConfig(block_out_channels=(8, 16), norm_num_groups=4)
        meta = {"config": cfg.to_dict(), "scaling_factor": 1.5, "shift_factor": 0.25}
        return save_aligned_vae(path, build_autoencoder(cfg), {**meta, "teacher_width": None})
    return DigitsTeacher().save(path)


def _load_model(kind: str, path: Path):
    from cspace.models.flow import load_flow
    from cspace.models.teachers import DigitsTeacher
    from cspace.models.vae import load_aligned_vae

    return {"flow": load_flow, "vae": load_aligned_vae, "teacher": DigitsTeacher.load}[kind](path)


@pytest.mark.parametrize(
    ("kind", "change", "msg"),
    [
        # a config describing a model of 10^10 values beside a file of a few thousand: refused
        # on the meta device, before anything is allocated
        ("flow", {"config": {"width": 100_000}}, r"its config describes [\d,]+ values, the file"),
        ("flow", {"config": {"width": float("inf")}}, "lacks or has a bad field"),
        ("vae", {"config": {"block_out_channels": [8, 100_000]}}, "its config describes"),
        ("vae", {"teacher_width": 10**9}, r"field 'teacher_width' must be an integer"),
        ("vae", {"scaling_factor": float("nan")}, "field 'scaling_factor' must be a finite"),
        ("vae", {"config": {"latent_channels": float("inf")}}, "bad config"),
        ("teacher", {"config": {"width": 10**6}}, "its config describes"),
        ("teacher", {"config": 5}, "lacks or has a bad field"),
    ],
)
def test_model_configs_cannot_make_a_load_allocate(tmp_path, kind, change, msg):
    path = _model(kind, tmp_path / kind)
    doc = manifest(path)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    write_manifest(path, doc)
    with pytest.raises(ValueError, match=msg):
        _load_model(kind, path)


@pytest.mark.parametrize("kind", ["flow", "vae", "teacher"])
def test_model_weights_with_a_crafted_header(tmp_path, kind):
    path = _model(kind, tmp_path / kind)
    name = "vae.safetensors" if kind == "vae" else "model.safetensors"
    blob = stored(path, name).read_bytes()
    replace_payload(path, name, struct.pack("<Q", 2**62) + blob[8:])
    with pytest.raises(ValueError, match="header claims 4611686018427387904 bytes"):
        _load_model(kind, path)
