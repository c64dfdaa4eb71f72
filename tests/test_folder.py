"""The one safe-folder format (cspace.io.folder) of every kind that cspace writes, its checks,
the legacy layouts (cspace.io.legacy) and the shipped weights."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from safetensors.torch import load_file

import cspace.io.folder as folder_mod
from cspace.io.errors import FolderError, MissingWeightsError
from cspace.io.folder import (
    LOCK_FILE,
    MAX_MANIFEST_BYTES,
    is_folder_of,
    migrate_folder,
    read_folder,
    stored_name,
)
from cspace.models.flow import (
    FLOW_KIND,
    FlowConfig,
    FlowWeightsError,
    VelocityNet,
    load_flow,
    save_flow,
)
from cspace.models.shipped import NAMES, WEIGHTS_DIR, shipped
from cspace.models.teachers import TEACHER_KIND, DigitsTeacher, TeacherWeightsError
from cspace.models.vae import (
    VAE_KIND,
    AlignedVAEConfig,
    VAEWeightsError,
    build_autoencoder,
    load_aligned_vae,
    save_aligned_vae,
)
from obstacles import ObstacleSet, ObstacleSetError, PreferenceClassifier, is_obstacle_set
from obstacles.classifier import CLASSIFIER_KIND, ClassifierError
from obstacles.obstacle_set import KIND as OBSTACLES_KIND
from tests.folders import load_kind, stored, version_files
from tests.legacy_writers import (
    save_classifier_v1,
    save_flow_v1,
    save_obstacle_set_v1,
    save_teacher_v1,
    save_vae_v1,
    write_folder_v2,
    write_folder_v3,
)

ROOT = Path(__file__).resolve().parents[1]
LEGACY_SHIPPED = Path(__file__).resolve().parent / "data" / "legacy_shipped"
TINY_VAE = AlignedVAEConfig(block_out_channels=(8, 16), norm_num_groups=4)
TINY_FLOW = FlowConfig(latent_shape=(2, 1, 1), width=16, depth=1, time_channels=8, time_embed_dim=8)
KINDS = ("obstacles", "classifier", "flow", "vae", "teacher")
FOLDER_KINDS = {
    "obstacles": OBSTACLES_KIND,
    "classifier": CLASSIFIER_KIND,
    "flow": FLOW_KIND,
    "vae": VAE_KIND,
    "teacher": TEACHER_KIND,
}
ERRORS = {
    "obstacles": ObstacleSetError,
    "classifier": ClassifierError,
    "flow": FlowWeightsError,
    "vae": VAEWeightsError,
    "teacher": TeacherWeightsError,
}
PAYLOAD = {
    "obstacles": "metadata.safetensors",
    "classifier": "classifier.safetensors",
    "flow": "model.safetensors",
    "vae": "vae.safetensors",
    "teacher": "model.safetensors",
}
#: SHA-256 of the shipped weights files before they were re-saved in the safe-folder format
#: (the VAEs': of their one model.safetensors before format_version 4 split it in two, which
#: _vae_model_file rebuilds from the two)
SHIPPED_SHA256 = {
    "teacher": "a4796c521142fa34c1850e72496c3f33dfa24c971e561eb6356dd90a12286a08",
    "vae_aligned": "e481b15faa79b6fd29bc8235da26d5c0a99821e064f564be67a872a30057ca4c",
    "vae_plain": "ebc7673d5c6b7392757b4eb71fea904237c1bf1643647af6121cc8650d03d677",
    "flow_aligned": "f849b4c9760cde42c47a188e73259071f9d71d9b8805d91ec712a13da69e400f",
    "flow_plain": "aafe8edd32841ac202b7e5318c5caf9349279ef88718d0bbbcf6aad7e3bb2fd1",
}


def _make_set(n: int = 6, d: int = 4, seed: int = 0) -> ObstacleSet:
    rng = np.random.default_rng(seed)
    s = ObstacleSet.from_embeddings(
        rng.standard_normal((n, d)),
        q_star=rng.uniform(0.5, 2.0, n),
        eta=rng.uniform(0.0, 2.0, n),
        radius=0.1,
        labels=[f"o{i}" for i in range(n)],
        sources=[f"src{i}" for i in range(n)],
    )
    s.remove([1])
    s.set_parameters(q_star=1.5, note="tuned")
    return s


def _make(kind: str, path: Path) -> None:
    """A fresh folder of ``kind`` at ``path``, written by the kind's own writer."""
    torch.manual_seed(0)
    if kind == "obstacles":
        _make_set().save(path)
    elif kind == "classifier":
        PreferenceClassifier(np.arange(1.0, 5.0), 0.1, q_star=0.5).save(path)
    elif kind == "flow":
        save_flow(path, VelocityNet(TINY_FLOW), {"encoder": "test"})
    elif kind == "vae":
        meta = {
            "config": TINY_VAE.to_dict(),
            "scaling_factor": 1.5,
            "shift_factor": 0.25,
            "teacher_width": None,
        }
        save_aligned_vae(path, build_autoencoder(TINY_VAE), meta)
    else:
        DigitsTeacher().save(path, extra={"steps": 0})


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(params=KINDS)
def made(request, tmp_path) -> tuple[str, Path]:
    path = tmp_path / request.param
    _make(request.param, path)
    return request.param, path


# ---------------------------------------------------------------------- one format
def test_every_kind_writes_the_same_format(made):
    kind, path = made
    manifest = _manifest(path)
    fk = FOLDER_KINDS[kind]
    assert manifest["format"] == fk.format
    assert manifest["format_version"] == fk.version == (4 if kind == "vae" else 3)
    assert isinstance(manifest["saved"], str) and manifest["superseded"] == []
    files = {e["file"] for e in manifest["files"].values()}
    assert {p.name for p in path.iterdir()} == {"manifest.json", LOCK_FILE, *files}
    assert set(fk.files) <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = (path / entry["file"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        stem, ext = name.split(".", 1)
        assert entry == {"file": f"{stem}-{sha[:12]}.{ext}", "bytes": len(data), "sha256": sha}
    assert is_folder_of(path, fk)
    assert not any(is_folder_of(path, other) for k, other in FOLDER_KINDS.items() if k != kind)
    load_kind(kind, path)  # and it loads


def test_one_reader_for_every_kind(made, monkeypatch):
    """Every kind's loader verifies its files through cspace.io.folder.verify_files."""
    kind, path = made
    calls = []
    real = folder_mod.verify_files
    monkeypatch.setattr(
        folder_mod, "verify_files", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    load_kind(kind, path)
    assert calls == [path]


def test_flipped_byte_gives_the_shared_error_with_the_kinds_class(made):
    kind, path = made
    target = stored(path, PAYLOAD[kind])
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ERRORS[kind], match=f"checksum mismatch for .*{target.name}") as err:
        load_kind(kind, path)
    assert isinstance(err.value, FolderError) and isinstance(err.value, ValueError)
    assert err.value.path == target
    assert "restore the folder from a copy" in str(err.value)  # what to do


def test_truncated_file(made):
    kind, path = made
    target = stored(path, PAYLOAD[kind])
    data = target.read_bytes()
    target.write_bytes(data[:-7])
    msg = f"has {len(data) - 7} bytes but the manifest says {len(data)}: truncated or replaced"
    with pytest.raises(ERRORS[kind], match=msg):
        load_kind(kind, path)


def test_symlinked_payload_is_refused(made, tmp_path):
    """A symbolic link to an identical file (same size, same SHA-256) is still refused."""
    kind, path = made
    target = stored(path, PAYLOAD[kind])
    elsewhere = tmp_path / "elsewhere.bin"
    shutil.copy(target, elsewhere)
    target.unlink()
    target.symlink_to(elsewhere)
    with pytest.raises(ERRORS[kind], match="is a symbolic link, not a regular file"):
        load_kind(kind, path)


def test_symlinked_manifest_is_refused(made, tmp_path):
    kind, path = made
    shutil.copy(path / "manifest.json", tmp_path / "m.json")
    (path / "manifest.json").unlink()
    (path / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(ERRORS[kind], match="symbolic link"):
        load_kind(kind, path)


def test_size_is_checked_before_reading(made):
    """A 1 TiB sparse file in place of the payload is refused by its size; reading it whole
    would fail with MemoryError instead."""
    kind, path = made
    target = stored(path, PAYLOAD[kind])
    target.unlink()
    try:
        with open(target, "wb") as f:
            f.truncate(1 << 40)
    except OSError as err:  # pragma: no cover - a file system without sparse files
        pytest.skip(f"no sparse files here: {err}")
    with pytest.raises(ERRORS[kind], match=f"has {1 << 40} bytes but the manifest says"):
        load_kind(kind, path)


def test_oversized_manifest_is_refused(made):
    kind, path = made
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text + " " * MAX_MANIFEST_BYTES)  # still valid JSON
    with pytest.raises(ERRORS[kind], match=f"more than the {MAX_MANIFEST_BYTES}"):
        load_kind(kind, path)


@pytest.mark.parametrize("change", ["newer", "foreign", "bad-name", "not-json"])
def test_manifest_problems(made, change):
    kind, path = made
    manifest = _manifest(path)
    if change == "newer":
        newest = FOLDER_KINDS[kind].version
        manifest["format_version"] = newest + 1
        msg = rf"format_version {newest + 1}; this cspace reads versions? ([12]\.\.)?{newest} \(upgrade"
    elif change == "foreign":
        manifest["format"] = "someone.else"
        msg = "is not a cspace .* manifest .*someone.else"
    elif change == "bad-name":
        manifest["files"]["../outside"] = {"bytes": 0, "sha256": hashlib.sha256().hexdigest()}
        msg = "lists a file with a bad name '../outside'"
    else:
        manifest = None
        msg = "corrupt or not JSON"
    text = "{not json" if manifest is None else json.dumps(manifest)
    (path / "manifest.json").write_text(text)
    with pytest.raises(ERRORS[kind], match=msg):
        load_kind(kind, path)


@pytest.mark.parametrize("kind", KINDS)
def test_absent_folder(kind, tmp_path):
    """Model weights: MissingWeightsError with the command that makes them; obstacle sets and
    classifiers: the kind's error."""
    for where in (tmp_path / "nowhere", tmp_path):  # absent; a folder without a manifest
        if kind in ("flow", "vae", "teacher"):
            with pytest.raises(MissingWeightsError, match="cspace train"):
                load_kind(kind, where)
        else:
            with pytest.raises(ERRORS[kind], match="is missing"):
                load_kind(kind, where)


def test_save_replaces_only_its_own_kind_and_keeps_other_files(made, tmp_path):
    kind, path = made
    (path / "notes.txt").write_text("mine")
    (path / "images").mkdir()
    (path / "images" / "a.png").write_bytes(b"\x89PNG")
    _make(kind, path)  # saving again over the same kind keeps the user's files
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "images" / "a.png").read_bytes() == b"\x89PNG"
    load_kind(kind, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]  # no temporary folders left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ERRORS[kind], match="refusing to overwrite"):
        _make(kind, foreign)
    assert _tree(foreign) == {"notes.txt": b"keep"}
    other = next(k for k in KINDS if k != kind)
    with pytest.raises(ERRORS[other], match="refusing to overwrite"):
        _make(other, path)  # a folder of another kind is foreign too


# ---------------------------------------------------------------------- sources
def test_sources_are_stored_as_given(tmp_path, monkeypatch, tiny_encoder):
    """Sources keep the form the user gave them in (relative or absolute), through build, add,
    save and load, from any working folder: nothing is resolved to an absolute path."""
    from obstacles import add_images, build_from_images

    digits = ROOT / "examples" / "digits"
    for c in ("3", "7"):
        (tmp_path / c).mkdir()
        for f in sorted((digits / c).glob("*.png"))[:4]:
            shutil.copy(f, tmp_path / c / f.name)
    enc = tiny_encoder
    monkeypatch.chdir(tmp_path)
    oset = build_from_images("3", enc, q_star=1.0)  # relative, as the user typed it
    given = [str(Path("3") / f.name) for f in sorted((tmp_path / "3").iterdir())]
    assert oset.sources == given
    oset.save(tmp_path / "set")
    shutil.copytree(tmp_path / "7", tmp_path / "set" / "images")  # images kept inside the set
    add_images(oset, tmp_path / "set" / "images", enc, q_star=1.0)  # an absolute path
    absolute = [
        str(tmp_path / "set" / "images" / f.name) for f in sorted((tmp_path / "7").iterdir())
    ]
    oset.save(tmp_path / "set")
    assert ObstacleSet.load(tmp_path / "set").sources == given + absolute
    assert len(list((tmp_path / "set" / "images").iterdir())) == 4  # kept by the save
    monkeypatch.chdir(ROOT)  # saving again from elsewhere changes no source
    again = ObstacleSet.load(tmp_path / "set")
    again.save(tmp_path / "set")
    assert ObstacleSet.load(tmp_path / "set").sources == given + absolute


# ---------------------------------------------------------------------- legacy layouts
def test_legacy_obstacle_set_v1_loads(tmp_path):
    s = _make_set(n=9, d=5, seed=3)
    save_obstacle_set_v1(s, tmp_path / "old")
    assert _manifest(tmp_path / "old")["format_version"] == 1
    assert is_obstacle_set(tmp_path / "old")
    assert read_folder(tmp_path / "old", OBSTACLES_KIND).legacy == "cspace.obstacles v1"
    loaded = ObstacleSet.load(tmp_path / "old")
    assert loaded.space is None  # unknown: accepted by every space check
    np.testing.assert_array_equal(loaded.embeddings, s.embeddings)
    np.testing.assert_array_equal(loaded.ids, s.ids)
    for attr in ("q_star", "eta", "radius"):
        np.testing.assert_array_equal(getattr(loaded, attr), getattr(s, attr))
    assert loaded.labels == s.labels and loaded.sources == s.sources
    assert loaded.history == s.history
    # the documented migration: rewrite it in the current format, same tensors
    old = _tree(tmp_path / "old")
    migrate_folder(tmp_path / "old", OBSTACLES_KIND)
    assert _manifest(tmp_path / "old")["format_version"] == 3
    assert (
        stored(tmp_path / "old", "metadata.safetensors").read_bytes() == old["metadata.safetensors"]
    )
    emb = load_file(str(stored(tmp_path / "old", "embeddings.safetensors")))["embeddings"]
    assert np.array_equal(emb.numpy(), s.embeddings) and emb.dtype == torch.float32
    again = ObstacleSet.load(tmp_path / "old")
    assert again.labels == s.labels and again.history == s.history
    np.testing.assert_array_equal(again.embeddings, s.embeddings)
    # a v1 set with a damaged file is refused as before
    save_obstacle_set_v1(s, tmp_path / "bad")
    data = bytearray((tmp_path / "bad" / "index.faiss").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad" / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ObstacleSetError, match="checksum mismatch"):
        ObstacleSet.load(tmp_path / "bad")


def test_legacy_classifier_v1_loads(tmp_path):
    clf = PreferenceClassifier(np.array([1.0, -2.0, 0.5]), 0.3, threshold=0.4, q_star=0.7)
    clf.info["encoder"] = "digits"
    save_classifier_v1(clf, tmp_path / "old")
    back = PreferenceClassifier.load(tmp_path / "old")
    np.testing.assert_array_equal(back.w, clf.w)
    assert back.b == clf.b and back.threshold == 0.4 and back.q_star == 0.7
    assert back.info == {"encoder": "digits"} and back.space is None
    back.save(tmp_path / "old")  # saving over a v1 classifier writes v3
    assert _manifest(tmp_path / "old")["format_version"] == 3


def test_legacy_flow_v1_loads(tmp_path):
    torch.manual_seed(0)
    net = VelocityNet(TINY_FLOW)
    save_flow_v1(tmp_path / "old", net, {"encoder": "vae_test"})
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    flow = load_flow(tmp_path / "old")
    assert flow.meta["encoder"] == "vae_test" and flow.space is None
    x, t = torch.randn(4, 2, 1, 1), torch.rand(4)
    from cspace.models.flow import FlowModel

    assert torch.equal(flow(x, t), FlowModel(net)(x, t))
    # the legacy reader keeps the old checks
    wpath = tmp_path / "old" / "model.safetensors"
    blob = wpath.read_bytes()
    wpath.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    with pytest.raises(FlowWeightsError, match="checksum mismatch"):
        load_flow(tmp_path / "old")
    wpath.unlink()
    with pytest.raises(MissingWeightsError, match="cspace train flow"):
        load_flow(tmp_path / "old")
    # saving over a legacy flow writes the manifest; the old files stay for readers of the old
    # layout until the next save
    save_flow_v1(tmp_path / "old2", net, {"encoder": "vae_test"})
    save_flow(tmp_path / "old2", net, {"encoder": "vae_test"})
    assert _manifest(tmp_path / "old2")["superseded"] == ["config.json", "model.safetensors"]
    assert {p.name for p in (tmp_path / "old2").iterdir()} == version_files(tmp_path / "old2")
    save_flow(tmp_path / "old2", net, {"encoder": "vae_test"})
    assert sorted(p.name for p in (tmp_path / "old2").iterdir()) == sorted(
        [LOCK_FILE, "manifest.json", stored(tmp_path / "old2", "model.safetensors").name]
    )


def test_legacy_vae_v1_loads(tmp_path):
    from cspace.models.encoders import Encoder, is_aligned_vae_folder

    torch.manual_seed(0)
    vae = build_autoencoder(TINY_VAE)
    tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    meta = {
        "name": "old-vae",
        "config": TINY_VAE.to_dict(),
        "scaling_factor": 1.5,
        "shift_factor": 0.25,
        "teacher_width": None,
    }
    old = tmp_path / "old"
    save_vae_v1(old, meta, tensors)
    assert is_aligned_vae_folder(old) and is_folder_of(old, VAE_KIND)
    loaded, got = load_aligned_vae(old)
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert got["name"] == "old-vae" and got["scaling_factor"] == 1.5
    # the one old file, split in the current layout's two (no projection here): the
    # AutoencoderKL's file as diffusers would write it
    from safetensors.torch import save

    assert set(read_folder(old, VAE_KIND).files) == {"vae.safetensors"}
    want = hashlib.sha256(save(vae.state_dict(), metadata={"format": "pt"})).hexdigest()
    assert got["model_sha256"] == want
    enc = Encoder.from_aligned(old)
    assert enc.space((8, 8)).same_as(Encoder(vae, 1.5, 0.25, name="x").space((8, 8)))
    # the old checks: a weights file the config was not written with; a missing weights file
    sd = load_file(str(old / "model.safetensors"))
    sd["vae.encoder.conv_in.bias"] = sd["vae.encoder.conv_in.bias"] + 1.0
    from safetensors.torch import save_file

    save_file(sd, str(old / "model.safetensors"))
    with pytest.raises(VAEWeightsError, match="SHA-256"):
        load_aligned_vae(old)
    (old / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"model\.safetensors is missing"):
        load_aligned_vae(old)
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"")
    with pytest.raises(VAEWeightsError, match="not a cspace aligned-VAE"):
        load_aligned_vae(old)
    # saving over a legacy VAE folder writes the current format (the old files go at the
    # next save)
    save_vae_v1(tmp_path / "old2", meta, tensors)
    save_aligned_vae(tmp_path / "old2", vae, meta)
    assert _manifest(tmp_path / "old2")["superseded"] == ["config.json", "model.safetensors"]
    save_aligned_vae(tmp_path / "old2", vae, meta)
    assert sorted(p.name for p in (tmp_path / "old2").iterdir()) == sorted(
        [LOCK_FILE, "manifest.json", stored(tmp_path / "old2", "vae.safetensors").name]
    )
    assert load_aligned_vae(tmp_path / "old2")[1]["name"] == "old-vae"


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("name", ["fashion_vae_aligned", "fashion_vae_plain"])
def test_vae_folders_with_one_weights_file_load_as_the_split_ones(tmp_path, name, version):
    """VAE folders of format_version 2 and 3 (one ``model.safetensors``: ``vae.*`` and the
    projection) read as the current two files, byte for byte, and load the same VAE; saving
    over one writes the current layout."""
    current = read_folder(shipped(name), VAE_KIND)
    writer = write_folder_v2 if version == 2 else write_folder_v3
    old = writer(tmp_path / "old", "cspace.vae", current.fields,
                 {"model.safetensors": _vae_model_file(current)})  # fmt: skip
    read = read_folder(old, VAE_KIND)
    assert read.legacy == f"cspace.vae v{version}" and read.files == current.files
    (a, ma), (b, mb) = load_aligned_vae(old, with_projection=True), load_aligned_vae(shipped(name))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert ma["model_sha256"] == mb["model_sha256"]
    assert (ma["projection"] is None) == name.endswith("plain")
    # a crafted header in the old file: refused before any tensor is read
    bad = writer(tmp_path / "bad", "cspace.vae", current.fields,
                 {"model.safetensors": b"\xff" * 8 + b"{}"})  # fmt: skip
    with pytest.raises(VAEWeightsError, match="not a readable safetensors file"):
        load_aligned_vae(bad)
    save_aligned_vae(old, a, {**ma, "projection": None}, ma["projection"])
    assert read_folder(old, VAE_KIND).legacy is None
    assert read_folder(old, VAE_KIND).files == current.files


def test_legacy_teacher_v1_loads(tmp_path):
    from cspace.models.teachers import load_teacher

    torch.manual_seed(0)
    t = DigitsTeacher()
    save_teacher_v1(t, tmp_path / "old", extra={"steps": 7})
    back = load_teacher(str(tmp_path / "old"))
    assert back.meta["steps"] == 7
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    (tmp_path / "old" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TeacherWeightsError, match="not a cspace digits teacher config"):
        DigitsTeacher.load(tmp_path / "old")
    (tmp_path / "old" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="cspace train teacher"):
        DigitsTeacher.load(tmp_path / "old")


# ---------------------------------------------------------------------- shipped weights
def _vae_model_file(read) -> bytes:
    """The one ``model.safetensors`` of a VAE folder before format_version 4 (``vae.*`` and the
    projection's keys, serialised without metadata, as save_aligned_vae wrote it) from the two
    files of the current layout."""
    from safetensors.torch import load, save

    state = {f"vae.{k}": v for k, v in load(read.files["vae.safetensors"]).items()}
    if "projection.safetensors" in read.files:
        state.update(load(read.files["projection.safetensors"]))
    return save(state)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_are_in_the_new_format(name):
    folder = shipped(name)
    kind = {"teacher": TEACHER_KIND, "vae": VAE_KIND, "flow": FLOW_KIND}[name.split("_")[0]]
    read = read_folder(folder, kind)
    assert read.legacy is None and read.manifest["format_version"] == kind.version
    assert read.manifest["superseded"] == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", *read.stored.values()]
    )
    # the very bytes shipped before the re-saves: every figure stays the same
    if kind is VAE_KIND:
        assert set(read.files) == {"vae.safetensors"} | (
            {"projection.safetensors"} if name.endswith("aligned") else set()
        )
        assert hashlib.sha256(_vae_model_file(read)).hexdigest() == SHIPPED_SHA256[name]
    else:
        weights = stored_name("model.safetensors", SHIPPED_SHA256[name])
        assert read.sha256("model.safetensors") == SHIPPED_SHA256[name]
        assert hashlib.sha256((folder / weights).read_bytes()).hexdigest() == SHIPPED_SHA256[name]
    if name.startswith("flow"):
        from cspace.models.encoders import Encoder

        flow = load_flow(folder)
        vae = shipped(flow.meta["encoder"])
        assert flow.space == Encoder.from_aligned(vae).space((8, 8))
    # the package data globs ship the files
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = globs["package-data"]["cspace"]
    for f in folder.iterdir():
        rel = str(f.relative_to(WEIGHTS_DIR.parent))
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_in_the_old_layout_stillload_kind(name, tmp_path):
    """The config.json each shipped folder had before (tests/data/legacy_shipped) beside the
    same weights file: the old folder, read by the legacy reader, gives what the new one does."""
    old = tmp_path / name
    old.mkdir()
    shutil.copy(LEGACY_SHIPPED / name / "config.json", old / "config.json")
    kind = {"teacher": TEACHER_KIND, "vae": VAE_KIND, "flow": FLOW_KIND}[name.split("_")[0]]
    if kind is VAE_KIND:  # the one file the VAEs had then
        (old / "model.safetensors").write_bytes(_vae_model_file(read_folder(shipped(name), kind)))
    else:
        shutil.copy(stored(shipped(name), "model.safetensors"), old / "model.safetensors")
    legacy, current = read_folder(old, kind), read_folder(shipped(name), kind)
    assert legacy.legacy is not None
    assert legacy.files == current.files
    fields = dict(current.fields)
    if name.startswith("flow"):
        fields["meta"] = {k: v for k, v in fields["meta"].items() if k != "space"}
    assert legacy.fields == fields
    if name.startswith("vae"):
        (_, a), (_, b) = load_aligned_vae(old), load_aligned_vae(shipped(name))
        assert a == b  # the same meta, model_sha256 included
    elif name.startswith("flow"):
        assert load_flow(old).space is None
    else:
        assert DigitsTeacher.load(old).meta == DigitsTeacher.load().meta
