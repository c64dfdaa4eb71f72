"""Teachers: DINOv2 through timm (tiny random configs, offline weights) and the digits stand-in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cspace.io.errors import MissingWeightsError
from cspace.models.shipped import shipped
from cspace.models.teachers import (
    DigitsTeacher,
    DinoV2Teacher,
    load_teacher,
    teacher_accuracy,
    train_teacher,
)
from tests.folders import live_files

TINY = dict(depth=1, embed_dim=32, num_heads=2)


def _tiny(name="vit_small_patch14_dinov2", **kw):
    torch.manual_seed(0)
    return DinoV2Teacher(name, pretrained=False, img_size=28, **TINY, **kw)


def _images(n=3, c=1, size=8):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize(
    "name, prefix", [("vit_small_patch14_dinov2", 1), ("vit_small_patch14_reg4_dinov2", 5)]
)
def test_dinov2_tokens_drop_prefix_tokens(name, prefix):
    t = _tiny(name)
    assert t.grid == 2 and t.width == 32 and t.num_prefix_tokens == prefix
    x = _images()
    tok = t.tokens(x)
    assert tok.shape == (3, 4, 32)
    # the same as timm's forward_features on the prepared input, prefix tokens removed
    prep = ((x + 1) / 2).expand(-1, 3, -1, -1)
    prep = torch.nn.functional.interpolate(prep, size=(28, 28), mode="bicubic")
    prep = (prep - t.mean) / t.std
    full = t.model.forward_features(prep)
    assert full.shape[1] == 4 + prefix
    torch.testing.assert_close(tok, full[:, prefix:])
    # RGB input works the same way; grey is repeated to 3 channels
    torch.testing.assert_close(t.tokens(x.expand(-1, 3, -1, -1)), tok)


def test_dinov2_is_frozen():
    t = _tiny()
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.model.training


def test_dinov2_bad_name_and_size():
    with pytest.raises(ValueError, match="unknown DINOv2 teacher"):
        DinoV2Teacher("vit_small_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DinoV2Teacher("vit_small_patch14_dinov2", pretrained=False, img_size=30, **TINY)


def test_dinov2_missing_weights_says_how(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        DinoV2Teacher(
            "vit_large_patch14_dinov2.lvd142m", weights=tmp_path / "nope" / "model.safetensors"
        )
    msg = str(err.value)
    assert "vit_large_patch14_dinov2.lvd142m" in msg
    assert "timm/vit_large_patch14_dinov2.lvd142m" in msg and "model.safetensors" in msg
    assert "--teacher-weights" in msg and "weights=" in msg
    # weights=None looks only in the (here empty) local Hugging Face cache
    with pytest.raises(MissingWeightsError, match="not in the local HF cache"):
        DinoV2Teacher("vit_small_patch14_dinov2", img_size=28, cache_dir=tmp_path, **TINY)
    # load_teacher passes it through
    with pytest.raises(MissingWeightsError):
        load_teacher("vit_base_patch14_reg4_dinov2.lvd142m", weights=tmp_path / "x.safetensors")


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_loads_local_safetensors(tmp_path, name):
    """A tiny model's state dict saved as safetensors, loaded back through timm's pretrained path
    (``pretrained_cfg_overlay=dict(file=...)``), from a file, a folder and a fake HF cache."""
    src = _tiny(name)
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    x = _images(2)
    want = src.tokens(x)

    from_file = DinoV2Teacher(name, weights=tmp_path / "model.safetensors", img_size=28, **TINY)
    from_dir = DinoV2Teacher(name, weights=tmp_path, img_size=28, **TINY)
    assert from_file.weights_path == str(tmp_path / "model.safetensors")
    torch.testing.assert_close(from_file.tokens(x), want, rtol=0, atol=0)
    torch.testing.assert_close(from_dir.tokens(x), want, rtol=0, atol=0)

    # the local Hugging Face cache layout: models--timm--NAME/snapshots/REV/model.safetensors
    cache = tmp_path / "hub"
    repo = cache / f"models--timm--{name}.lvd142m"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(sd, str(snap / "model.safetensors"))
    from_cache = DinoV2Teacher(name, img_size=28, cache_dir=cache, **TINY)
    torch.testing.assert_close(from_cache.tokens(x), want, rtol=0, atol=0)

    # a file for another architecture is refused with a clear error
    with pytest.raises(ValueError, match="does not fit"):
        DinoV2Teacher(name, weights=tmp_path, img_size=28, depth=1, embed_dim=48, num_heads=2)


def test_digits_teacher_shipped_accuracy():
    t = load_teacher("digits")
    assert isinstance(t, DigitsTeacher)
    assert t.grid == 4 and not any(p.requires_grad for p in t.parameters())
    tok = t.tokens(_images(5))
    assert tok.shape == (5, 16, t.width)
    acc = teacher_accuracy(t, "heldout")
    assert acc >= 0.9
    meta = json.loads((shipped("teacher") / "manifest.json").read_text())
    assert meta["format"] == "cspace.teacher" and meta["format_version"] == 3
    assert abs(meta["metrics"]["heldout_accuracy"] - acc) < 1e-6
    with pytest.raises(ValueError, match="expects images"):
        t.tokens(torch.zeros(2, 1, 16, 16))


def test_train_teacher_tiny(tmp_path):
    r1 = train_teacher(tmp_path / "a", steps=3, progress=False)
    r2 = train_teacher(tmp_path / "b", steps=3, progress=False)
    assert 0.0 <= r1["heldout_accuracy"] <= 1.0
    assert r1["heldout_accuracy"] == r2["heldout_accuracy"]
    a, b = load_teacher(str(tmp_path / "a")), DigitsTeacher.load(tmp_path / "b")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k  # deterministic for a seed
    meta = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert meta["steps"] == 3 and "heldout_accuracy" in meta["metrics"]
    assert {p.name for p in (tmp_path / "a").iterdir()} == live_files(tmp_path / "a")


def test_load_teacher_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("resnet50")
    with pytest.raises(MissingWeightsError, match="cspace train teacher"):
        DigitsTeacher.load(tmp_path)
