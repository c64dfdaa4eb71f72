"""The Fashion-MNIST C-space VAEs: training end to end on tiny synthetic IDX files (aligned to a
teacher and its plain twin), the checks of its input, and the shipped pair."""

from __future__ import annotations

import math

import pytest
import torch

from cspace.models.data import fashion_heldout
from cspace.models.encoders import Encoder
from cspace.models.shipped import shipped
from cspace.models.teachers import FashionTeacher, FashionTeacherConfig
from cspace.models.vae import (
    AlignedVAEConfig,
    fashion_vae_config,
    load_aligned_vae,
    load_fashion_vae,
    train_vae,
)
from tests.fashion_idx import write_fashion

TINY = AlignedVAEConfig(
    sample_size=28, block_out_channels=(8, 8, 8), latent_channels=4, norm_num_groups=4
)
TEACHER = FashionTeacherConfig(channels=(8, 8, 16), width=16, proj_hidden=16, proj_dim=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion"), n_train=64, n_test=20)


def _run(out, data, vf_weight, teacher=None, steps=3, **kw):
    return train_vae(out, vf_weight=vf_weight, teacher=teacher, steps=steps, batch_size=8,
                     cfg=TINY, data="fashion", data_dir=data, progress=False, **kw)  # fmt: skip


def test_the_fashion_config_gives_4x7x7_latents():
    cfg = fashion_vae_config()
    assert cfg.latent_grid == 7 and cfg.latent_dim == 196 and cfg.sample_size == 28


@pytest.mark.slow
def test_aligned_and_plain_twins_end_to_end(tmp_path, data):
    torch.manual_seed(0)
    teacher = FashionTeacher(TEACHER).freeze()
    ra = _run(tmp_path / "aligned", data, 0.1, teacher)
    rp = _run(tmp_path / "plain", data, 0.0)
    va, ma = load_aligned_vae(tmp_path / "aligned", with_projection=True)
    vp, mp = load_aligned_vae(tmp_path / "plain", with_projection=True)
    assert ma["data"] == mp["data"] == "fashion" and ma["train_images"] == 64
    assert ma["teacher_width"] == 16 and ma["projection"].proj.weight.shape == (16, 4, 1, 1)
    assert mp["projection"] is None and mp["teacher"] is None
    assert ma["name"].startswith("cspace-fashion-vae(vf=0.1")
    for r in (ra, rp):
        for key in ("heldout_mse", "heldout_psnr", "test_mse", "heldout_knn_accuracy",
                    "heldout_linear_probe_accuracy", "test_knn_accuracy"):  # fmt: skip
            assert math.isfinite(r[key])
        assert r["heldout_psnr"] == pytest.approx(10 * math.log10(4 / r["heldout_mse"]))
    # twins: same seed, batches and steps; only the VF term differs, so the weights differ
    assert ma["seed"] == mp["seed"] and ma["steps"] == mp["steps"]
    wa, wp = va.state_dict(), vp.state_dict()
    assert wa.keys() == wp.keys()
    assert not torch.equal(wa["encoder.conv_out.weight"], wp["encoder.conv_out.weight"])
    # the encoder maps 28x28 images to normalised 4x7x7 latents and back
    enc = Encoder.from_aligned(tmp_path / "aligned")
    x, _ = fashion_heldout()
    z = enc.encode(x[:5])
    assert z.shape == (5, 4, 7, 7) and enc.decode(z).shape == (5, 1, 28, 28)
    assert enc.image_size == (28, 28) and enc.size_fixed


def test_bad_data_or_config_is_refused_before_training(tmp_path, data):
    with pytest.raises(ValueError, match=r"cfg expects 8x8x1 images; fashion images are 28x28x1"):
        train_vae(tmp_path / "o", vf_weight=0.0, data="fashion", data_dir=data, steps=1,
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="unknown data 'cifar'"):
        train_vae(tmp_path / "o", vf_weight=0.0, data="cifar", steps=1, progress=False)
    with pytest.raises(ValueError, match="max_images"):
        train_vae(tmp_path / "o", vf_weight=0.0, steps=1, max_images=10, progress=False)
    # a teacher whose grid (7x7) is not the latent grid (4x4 for the digits VAE)
    with pytest.raises(ValueError, match=r"token grid is 7x7 but the latent grid is 4x4"):
        train_vae(tmp_path / "o", vf_weight=0.1, teacher=FashionTeacher(TEACHER).freeze(),
                  steps=1, progress=False)  # fmt: skip
    # missing IDX files: the error names the ways to supply them
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        _run(tmp_path / "o", tmp_path / "empty", 0.0)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_missing_fashion_vae_says_how_to_train_it(tmp_path):
    from cspace.io.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError) as err:
        load_fashion_vae("aligned", tmp_path / "nope")
    msg = str(err.value)
    assert "cspace train vae --data fashion --vf-weight 0.1 --teacher fashion" in msg
    assert str(tmp_path / "nope") in msg and "cspace train teacher --data fashion" in msg
    with pytest.raises(MissingWeightsError, match="--vf-weight 0 "):
        load_fashion_vae("plain", tmp_path / "nope")
    with pytest.raises(ValueError, match="kind must be"):
        load_fashion_vae("both")


# ---------------------------------------------------------------------- the shipped pair
@pytest.fixture(scope="module")
def pair():
    pair = {k: load_fashion_vae(k) for k in ("aligned", "plain")}
    assert pair["aligned"][1]["name"] == load_aligned_vae(shipped("fashion_vae_aligned"))[1]["name"]
    return pair


def test_shipped_pair_are_twins(pair):
    (_, ma), (_, mp) = pair["aligned"], pair["plain"]
    assert ma["teacher"] == "fashion" and ma["vf_weight"] == 0.1 and mp["vf_weight"] == 0.0
    for key in ("config", "steps", "seed", "batch_size", "lr", "data", "train_images"):
        assert ma[key] == mp[key], key
    assert ma["config"]["latent_channels"] == 4 and ma["config"]["sample_size"] == 28


@pytest.mark.parametrize("kind", ["aligned", "plain"])
def test_shipped_reconstruction_is_what_the_manifest_says(pair, kind):
    vae, meta = pair[kind]
    enc = Encoder(vae, meta["scaling_factor"], meta["shift_factor"])
    x, _ = fashion_heldout()
    z = enc.encode(x)
    assert z.shape == (2000, 4, 7, 7) and bool(torch.isfinite(z).all())
    rec = enc.decode(z).clamp(-1, 1)
    mse = float(((rec - x) ** 2).double().mean())
    assert mse == pytest.approx(meta["metrics"]["heldout_mse"], rel=1e-3)
    assert mse < 0.05  # PSNR above 19 dB on [0, 1]


def test_shipped_encoder_refuses_images_it_was_not_made_for(pair):
    from obstacles.from_images import image_size_for

    vae, meta = pair["aligned"]
    enc = Encoder(vae, meta["scaling_factor"], meta["shift_factor"], name="fashion")
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\)"):
        enc.encode(torch.zeros(2, 3, 28, 28))
    enc.size_fixed = True  # what Encoder.from_aligned sets
    with pytest.raises(ValueError, match="28x28"):
        image_size_for(enc, 8)
    assert image_size_for(enc) == ((28, 28), None)
