"""The C-space VAE: VA-VAE's VF loss, training with resume, files, and the shipped weights."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from cspace.cli.train import register
from cspace.io.errors import MissingWeightsError
from cspace.models.encoders import Encoder
from cspace.models.shipped import shipped as shipped_dir
from cspace.models.vae import (
    AlignedVAEConfig,
    VAEWeightsError,
    VFAlignment,
    adaptive_vf_weight,
    build_autoencoder,
    evaluate_vae,
    load_aligned_vae,
    match_token_grid,
    save_aligned_vae,
    train_vae,
    vf_loss,
)
from tests.folders import live_files, replace_payload, stored

TINY = AlignedVAEConfig(block_out_channels=(8, 16), norm_num_groups=4)


def _unit(theta: float) -> list[float]:
    return [math.cos(theta), math.sin(theta)]


# ---------------------------------------------------------------------- the VF loss
def test_vf_loss_zero_when_projection_equals_teacher():
    torch.manual_seed(0)
    align = VFAlignment(2, 5, TINY)
    z = torch.randn(3, 2, 4, 4)
    f = align.project(z).detach()  # teacher tokens equal to the projected latent, token by token
    total, terms = align(z, f, return_terms=True)
    assert float(total.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["mcos"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["mdms"].detach()) == pytest.approx(0.0, abs=1e-6)
    # unrelated teacher tokens: positive loss
    assert float(align(z, torch.randn(3, 16, 5)).detach()) > 0.01
    # within the margins: a small perturbation of f changes nothing
    f2 = f + 0.05 * f.norm(dim=-1, keepdim=True) * torch.randn_like(f)
    assert not torch.allclose(f2, f)
    assert float(align(z, f2).detach()) == 0.0


def test_vf_loss_margins_exactly():
    # marginal cosine term: relu(1 - m1 - cos), m1 = 0.5, per token
    z = torch.tensor([[[1.0, 0.0]]])
    assert float(vf_loss(z, torch.tensor([[_unit(math.acos(0.6))]]))) == pytest.approx(0.0)
    assert float(vf_loss(z, torch.tensor([[_unit(math.acos(0.3))]]))) == pytest.approx(0.2)
    # distance-matrix term: relu(|Cz - Cf| - m2), m2 = 0.25, mean over the T x T matrix
    z2 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # Cz = all ones
    inside = torch.tensor([[_unit(0.0), _unit(math.acos(0.8))]])  # |1 - 0.8| = 0.2 < m2
    outside = torch.tensor([[_unit(0.0), _unit(math.acos(0.6))]])  # |1 - 0.6| = 0.4
    tot, terms = vf_loss(z2, inside, return_terms=True)
    assert float(tot) == pytest.approx(0.0, abs=1e-7)
    tot, terms = vf_loss(z2, outside, return_terms=True)
    assert float(terms["mcos"]) == pytest.approx(0.0, abs=1e-7)  # cos 0.6 >= 1 - m1
    assert float(terms["mdms"]) == pytest.approx(2 * 0.15 / 4, abs=1e-6)
    # the weights and margins are parameters
    tot = vf_loss(z2, outside, distmat_margin=0.0, cos_margin=0.0, distmat_weight=2.0)
    assert float(tot) == pytest.approx(2 * (2 * 0.4 / 4) + (0.0 + 0.4) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        vf_loss(z2, torch.zeros(1, 3, 2))


def test_vf_gradient_reaches_encoder_and_projection():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY)
    align = VFAlignment(2, 6, TINY)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    f = torch.randn(4, 16, 6, requires_grad=True)
    vf = align(z, f)
    vf.backward()
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert align.proj.weight.grad.abs().sum() > 0
    assert align.proj.bias is None and align.proj.kernel_size == (1, 1)
    assert all(p.grad is None for p in vae.decoder.parameters())
    assert f.grad is None  # teacher features are detached


def test_adaptive_weight_is_ratio_of_gradient_norms():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    a = torch.tensor([[0.5, -1.0], [2.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    nll = (w * a).sum() ** 2  # grad = 2 (w.a) a
    vf = (w * b).sum()  # grad = b
    want = 0.1 * float((2 * (w * a).sum() * a).norm().detach()) / (float(b.norm()) + 1e-4)
    got = adaptive_vf_weight(nll, vf, w, vf_weight=0.1)
    assert not got.requires_grad
    assert float(got) == pytest.approx(want, rel=1e-6)
    # on a real encoder: the factor equalises the VF gradient with the reconstruction's at W
    torch.manual_seed(0)
    vae = build_autoencoder(TINY)
    align = VFAlignment(2, 4, TINY)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    z = vae.encode(x).latent_dist.mean
    nll = (vae.decode(z).sample - x).pow(2).sum()
    vf = align(z, torch.randn(4, 16, 4))
    last = vae.encoder.conv_out.weight
    k = adaptive_vf_weight(nll, vf, last, vf_weight=1.0)
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    g_vf = torch.autograd.grad(k * vf, last, retain_graph=True)[0].norm()
    assert float(g_vf) == pytest.approx(float(g_nll), rel=1e-3)


def test_match_token_grid():
    t = torch.randn(2, 16, 3)
    assert match_token_grid(t, 4) is t
    const = torch.ones(2, 256, 3) * torch.tensor([1.0, 2.0, 3.0])
    out = match_token_grid(const, 4, interpolate=True)  # a DINOv2 16x16 grid -> 4x4 latent grid
    assert out.shape == (2, 16, 3)
    torch.testing.assert_close(out, torch.ones(2, 16, 3) * torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="cannot be resampled"):
        match_token_grid(const, 4)
    with pytest.raises(ValueError, match="not a square"):
        match_token_grid(torch.zeros(1, 15, 3), 4, interpolate=True)
    with pytest.raises(ValueError, match="coarser"):
        match_token_grid(torch.zeros(1, 4, 3), 4, interpolate=True)


def test_grid_mismatch_is_refused_before_training(tmp_path):
    cfg = AlignedVAEConfig(block_out_channels=(8,), norm_num_groups=4)  # 8x8 latent grid
    with pytest.raises(ValueError, match="grid"):
        train_vae(tmp_path, steps=1, cfg=cfg, progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        AlignedVAEConfig(block_out_channels=(6, 16), norm_num_groups=4)
    assert AlignedVAEConfig().latent_dim == 32
    assert AlignedVAEConfig.from_dict(TINY.to_dict()) == TINY


# ---------------------------------------------------------------------- training and files
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    report = train_vae(out, steps=4, batch_size=16, cfg=TINY, progress=False)
    return out, report


@pytest.mark.slow
def test_train_vae_writes_loadable_files(tiny_run):
    out, report = tiny_run
    assert {p.name for p in out.iterdir()} == live_files(out)
    assert not (out / "checkpoint").exists()  # removed after a finished run
    vae, meta = load_aligned_vae(out, with_projection=True)
    assert meta["vf_weight"] == 0.1 and meta["teacher"] == "digits" and meta["steps"] == 4
    assert meta["teacher_width"] == 64 and meta["projection"].proj.weight.shape == (64, 2, 1, 1)
    for k in ("heldout_mse", "knn_accuracy", "linear_probe_accuracy"):
        assert meta["metrics"][k] == report[k]
    enc = Encoder.from_aligned(out)
    z = enc.encode(torch.zeros(3, 1, 8, 8))
    assert z.shape == (3, 2, 4, 4)
    assert enc.scaling_factor == pytest.approx(meta["scaling_factor"])
    assert vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])


def _run(out, steps=6, **kw):
    return train_vae(
        out, steps=steps, batch_size=16, cfg=TINY, checkpoint_every=2, progress=False, **kw
    )


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    ref = _run(tmp_path / "ref")

    def interrupt(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", callback=interrupt)
    ckpt = json.loads((tmp_path / "cut" / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["step"] == 2
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path / "cut", vf_weight=0.5)
    res = _run(tmp_path / "cut")
    assert res["steps_run"] == 4
    a, b = (
        {
            k: v
            for f in ("vae", "projection")
            for k, v in load_file(str(stored(d, f"{f}.safetensors"))).items()
        }
        for d in (tmp_path / "ref", tmp_path / "cut")
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert res["knn_accuracy"] == ref["knn_accuracy"]
    # --no-resume starts over
    assert _run(tmp_path / "ref", steps=2, resume=False)["steps_run"] == 2


def test_plain_vae_has_no_projection(tmp_path):
    r = _run(tmp_path, steps=2, vf_weight=0.0)
    _, meta = load_aligned_vae(tmp_path, with_projection=True)
    assert meta["teacher"] is None and meta["projection"] is None
    assert r["vf_weight"] == 0.0


@pytest.mark.slow
def test_train_with_a_dinov2_teacher_resamples_its_grid(tmp_path):
    from cspace.models.teachers import DinoV2Teacher

    torch.manual_seed(0)
    dino = DinoV2Teacher(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        img_size=112,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )  # an 8x8 token grid, resampled to the 4x4 latent grid
    r = _run(tmp_path / "d", steps=2, teacher=dino)
    _, meta = load_aligned_vae(tmp_path / "d", with_projection=True)
    assert meta["teacher"] == "vit_small_patch14_reg4_dinov2.lvd142m" and r["teacher_width"] == 32
    coarse = DinoV2Teacher(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )
    with pytest.raises(ValueError, match="coarser"):
        _run(tmp_path / "c", steps=1, teacher=coarse)


def _replace_weights(folder, sd, name: str = "vae.safetensors") -> None:
    """New tensors for the payload file ``name`` of ``folder``, with the manifest's size and
    checksum updated to match."""
    from safetensors.torch import save

    replace_payload(folder, name, save(sd))


@pytest.mark.slow
def test_load_errors(tiny_run, tmp_path):
    out, _ = tiny_run
    with pytest.raises(MissingWeightsError, match="cspace train vae"):
        load_aligned_vae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"manifest\.json is missing.*cspace train vae"):
        load_aligned_vae(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    stored(bad, "vae.safetensors").unlink()  # listed in the manifest: a damaged folder
    with pytest.raises(VAEWeightsError, match=r"vae-[0-9a-f]{12}\.safetensors is missing"):
        load_aligned_vae(bad)
    # tampered shapes (with a matching checksum)
    weights = stored(out, "vae.safetensors")
    sd = load_file(str(weights))
    sd["encoder.conv_in.weight"] = torch.zeros(8, 1, 5, 5)
    _replace_weights(bad, sd)
    with pytest.raises(ValueError, match=r"shape mismatches.*conv_in"):
        load_aligned_vae(bad)
    # a dropped key: the projection file without its tensor
    _replace_weights(bad, load_file(str(weights)))
    _replace_weights(bad, {}, "projection.safetensors")
    with pytest.raises(ValueError, match="does not match the architecture"):  # fewer values
        load_aligned_vae(bad)
    # no projection file where the manifest has a teacher width
    meta = json.loads((bad / "manifest.json").read_text())
    del meta["files"]["projection.safetensors"]
    (bad / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(VAEWeightsError, match=r"teacher_width \d+ but no projection"):
        load_aligned_vae(bad)
    # NaN weights (with a matching checksum); a file no VAE folder holds
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    sd = load_file(str(weights))
    sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"] * float("nan")
    _replace_weights(bad, sd)
    with pytest.raises(VAEWeightsError, match=r"'decoder\.conv_out\.bias' holds NaN or Inf"):
        load_aligned_vae(bad)
    _replace_weights(bad, load_file(str(weights)))
    replace_payload(bad, "notes.safetensors", b"x")
    with pytest.raises(VAEWeightsError, match=r"lists files a VAE folder does not hold: \['notes"):
        load_aligned_vae(bad)
    # a projection file where the manifest has no teacher width; a crafted projection header
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    meta = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**meta, "teacher_width": None}))
    with pytest.raises(
        VAEWeightsError, match=r"teacher_width None but the projection's tensors \['proj.weight'\]"
    ):
        load_aligned_vae(bad)
    shutil.copy(out / "manifest.json", bad / "manifest.json")
    blob = stored(bad, "projection.safetensors").read_bytes()
    replace_payload(bad, "projection.safetensors", struct.pack("<Q", 2**62) + blob[8:])
    with pytest.raises(VAEWeightsError, match="header claims 4611686018427387904 bytes"):
        load_aligned_vae(bad)
    # a config that does not match the weights
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    meta = json.loads((out / "manifest.json").read_text())
    meta["config"]["latent_channels"] = 4
    (bad / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        load_aligned_vae(bad)
    # same keys and shapes, other values: not the file the manifest was written with
    shutil.copy(out / "manifest.json", bad / "manifest.json")
    proj = stored(out, "projection.safetensors")
    sd = load_file(str(proj))
    sd["proj.weight"] = sd["proj.weight"] + 1.0
    save_file(sd, str(bad / proj.name))
    with pytest.raises(VAEWeightsError, match="checksum mismatch"):
        load_aligned_vae(bad)
    (bad / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="not a cspace aligned-VAE"):
        load_aligned_vae(bad)


def test_train_vae_writes_one_folder(tmp_path):
    """The final files are one atomic folder: a foreign folder is refused before training; the
    checkpoint inside the output folder survives the swap when asked to."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(VAEWeightsError, match="refusing to overwrite"):
        _run(foreign, steps=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "v"
    _run(out, steps=2, keep_checkpoint=True)
    assert {p.name for p in out.iterdir()} == {"checkpoint", *live_files(out)}
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "cspace.vae" and manifest["format_version"] == 4
    assert "model_sha256" not in manifest and manifest["steps"] == 2
    _, meta = load_aligned_vae(out)
    assert meta["model_sha256"] == manifest["files"]["vae.safetensors"]["sha256"]


def test_the_vae_file_is_what_diffusers_writes(tmp_path):
    """The AutoencoderKL's file of a VAE folder is byte for byte ``save_pretrained``'s
    ``diffusion_pytorch_model.safetensors``: what lets a pipeline folder's ``vae/`` be a link to
    it (the shipped Fashion-MNIST pipelines, scripts/link_shipped_vaes.py)."""
    torch.manual_seed(0)
    cfg = AlignedVAEConfig(block_out_channels=(8, 16), norm_num_groups=4)
    vae = build_autoencoder(cfg)
    meta = {"config": cfg.to_dict(), "scaling_factor": 1.5, "shift_factor": 0.25}
    save_aligned_vae(tmp_path / "mine", vae, {**meta, "teacher_width": None})
    vae.save_pretrained(tmp_path / "diffusers")
    theirs = (tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert stored(tmp_path / "mine", "vae.safetensors").read_bytes() == theirs


# ---------------------------------------------------------------------- the shipped weights
def _knn_from_encoder(path) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    from cspace.models.data import digits

    enc = Encoder.from_aligned(path)
    xt, yt = digits("train")
    xh, yh = digits("heldout")
    et, eh = enc.embed(enc.encode(xt)).numpy(), enc.embed(enc.encode(xh)).numpy()
    return float(KNeighborsClassifier(n_neighbors=5).fit(et, yt.numpy()).score(eh, yh.numpy()))


@pytest.fixture(scope="module")
def shipped():
    out = {}
    for kind in ("aligned", "plain"):
        vae, meta = load_aligned_vae(shipped_dir(f"vae_{kind}"))
        out[kind] = (vae, meta)
    return out


def test_shipped_default_is_aligned(shipped):
    _, meta = load_aligned_vae()
    assert meta["vf_weight"] > 0 and meta["teacher"] == "digits"
    assert meta["config"] == shipped["aligned"][1]["config"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["aligned", "plain"])
def test_shipped_metrics_match_fresh_evaluation(shipped, kind):
    vae, meta = shipped[kind]
    knn = _knn_from_encoder(shipped_dir(f"vae_{kind}"))
    assert abs(knn - meta["metrics"]["knn_accuracy"]) <= 1e-6
    fresh = evaluate_vae(vae, meta["scaling_factor"], meta["shift_factor"])
    for k, v in fresh.items():
        assert abs(v - meta["metrics"][k]) <= 1e-6, k


def test_shipped_aligned_vs_plain(shipped):
    """The shipped pair differs only in the VF loss. What we measured (seeds 0, 1, 2; 2000 steps):
    in this 2x4x4 (32-d) C-space the VF alignment does *not* raise the kNN accuracy (aligned is
    0.2 to 1.3 points below plain on heldout); both C-spaces are far above chance and both
    reconstruct well. Flip the kNN assertion when the alignment is made to help."""
    a, p = shipped["aligned"][1], shipped["plain"][1]
    assert a["config"] == p["config"]
    same = ("steps", "seed", "batch_size", "lr", "warmup", "shift_augment")
    assert all(a[k] == p[k] for k in same)
    assert p["vf_weight"] == 0.0 and p["teacher"] is None and a["vf_weight"] > 0
    am, pm = a["metrics"], p["metrics"]
    assert am["knn_accuracy"] >= 0.95 and pm["knn_accuracy"] >= 0.95
    assert am["linear_probe_accuracy"] >= 0.94 and pm["linear_probe_accuracy"] >= 0.94
    assert am["knn_accuracy"] <= pm["knn_accuracy"]  # measured: no kNN gain from alignment
    # both reconstruct well (images in [-1, 1]; PCA with 32 components: 0.0095)
    assert am["heldout_mse"] < 0.02 and pm["heldout_mse"] < 0.02


def test_shipped_latents_are_normalised(shipped):
    from cspace.models.data import digits

    vae, meta = shipped["aligned"]
    enc = Encoder(vae, meta["scaling_factor"], meta["shift_factor"])
    z = enc.encode(digits("train")[0]).double()
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1.0, abs=1e-5)


def test_shipped_weights_are_small():
    total = sum(
        f.stat().st_size
        for d in (shipped_dir("vae_aligned"), shipped_dir("vae_plain"))
        for f in d.iterdir()
    )
    assert total < 8_000_000
    assert not (shipped_dir("vae_aligned") / "checkpoint").exists()


# ---------------------------------------------------------------------- the command line
def _parser():
    parser = argparse.ArgumentParser(prog="cspace")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    register(sub)
    return parser


@pytest.mark.slow
def test_cli_train_vae_and_teacher(tmp_path):
    args = _parser().parse_args(
        [
            *("train", "vae", "--out", str(tmp_path / "v"), "--steps", "2", "--vf-weight", "0"),
            *("--seed", "3", "--no-resume", "--no-progress", "--json", "--batch-size", "8"),
        ]
    )
    assert args.no_resume and args.vf_weight == 0.0
    assert args.teacher is None and args.data == "digits"  # default: the data set's own teacher
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    report = json.loads(buf.getvalue())
    assert report["steps"] == 2 and report["seed"] == 3 and 0 <= report["knn_accuracy"] <= 1
    assert stored(tmp_path / "v", "vae.safetensors").is_file()
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["name"] == "cspace-digits-vae(vf=0, teacher=None)"  # VF 0: no teacher used

    args = _parser().parse_args(
        ["train", "teacher", "--out", str(tmp_path / "t"), "--steps", "2", "--no-progress"]
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    assert "heldout_accuracy" in buf.getvalue()
    assert (tmp_path / "t" / "manifest.json").is_file()


def test_cli_train_rejects_bad_options(capsys):
    parser = _parser()
    for argv in (
        ["train", "vae", "--vf-weight", "-1"],
        ["train", "vae", "--steps", "0"],
        ["train"],
        ["train", "teacher", "--steps", "x"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    args = parser.parse_args(["train", "vae", "--teacher", "vit_small_patch14_dinov2"])
    assert args.teacher_weights is None


def test_cli_missing_dinov2_weights(tmp_path, capsys):
    from cspace.cli import main

    rc = main(
        [
            *("train", "vae", "--out", str(tmp_path), "--no-progress"),
            *("--teacher", "vit_small_patch14_dinov2.lvd142m"),
            *("--teacher-weights", str(tmp_path / "missing.safetensors")),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "--teacher-weights" in err and "model.safetensors" in err
