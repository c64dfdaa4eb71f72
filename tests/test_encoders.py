"""The Encoder interface over diffusers AutoencoderKL models loaded from local folders."""

from __future__ import annotations

import pytest
import torch

from cspace.io.errors import MissingWeightsError
from cspace.models.encoders import Encoder
from cspace.models.tiny_pipelines import tiny_digits_vae


def test_from_diffusers_local_folder(tmp_path):
    vae = tiny_digits_vae(scaling_factor=0.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path / "vae")
    enc = Encoder.from_diffusers(tmp_path / "vae")
    assert enc.scaling_factor == 0.5 and enc.shift_factor == 0.25
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    z = enc.encode(x)
    assert z.shape == (3, 2, 4, 4) == (3, *enc.latent_shape((8, 8)))
    raw = vae.eval().encode(x).latent_dist.mean
    assert torch.allclose(z, (raw - 0.25) * 0.5, atol=1e-6)
    img = enc.decode(z)
    ref = vae.decode(raw).sample.clamp(-1, 1)
    assert img.shape == x.shape and torch.allclose(img, ref, atol=1e-5)
    assert enc.embed(z).shape == (3, 32)


def test_pipeline_subfolder(tmp_path):
    tiny_digits_vae().save_pretrained(tmp_path / "pipe" / "vae")
    enc = Encoder.from_diffusers(tmp_path / "pipe", subfolder="vae")
    assert enc.encode(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 4, 4)


def test_missing_weights_message(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"config\.json missing.*local-dir"):
        Encoder.from_diffusers(tmp_path / "nothing")


def test_bad_image_shapes():
    enc = Encoder(tiny_digits_vae())
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\)"):
        enc.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        enc.encode(torch.zeros(2, 1, 7, 7))
