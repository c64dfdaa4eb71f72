"""C-spaces (cspace.models.space): the record, the check, and where it is kept and enforced
(Encoder.space, ObstacleSet.space, PreferenceClassifier.space, FlowModel.space, add_images)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cspace.models.encoders import Encoder
from cspace.models.flow import load_flow
from cspace.models.shipped import shipped
from cspace.models.space import (
    Space,
    SpaceMismatchError,
    check_same_space,
    config_hash,
    weights_fingerprint,
    weights_match,
)
from obstacles import ObstacleSet, ObstacleSetError, PreferenceClassifier
from obstacles.from_images import add_images, build_from_images
from tests.legacy_writers import save_obstacle_set_v1

ROOT = Path(__file__).resolve().parents[1]
THREES = sorted((ROOT / "examples" / "digits" / "3").glob("*.png"))[:6]
SEVENS = sorted((ROOT / "examples" / "digits" / "7").glob("*.png"))[:3]


@pytest.fixture(scope="module")
def digits() -> Encoder:
    return Encoder.from_aligned(shipped("vae_aligned"))


@pytest.fixture(scope="module")
def plain() -> Encoder:
    return Encoder.from_aligned(shipped("vae_plain"))


def _space(**kw) -> Space:
    base = dict(
        encoder="enc",
        config_hash="0123456789abcdef",
        weights=(0.25, -0.5, 0.125, 1.0),
        image_size=(8, 8),
        channels=1,
        latent_shape=(2, 4, 4),
        dim=32,
    )
    return Space(**{**base, **kw})


# ---------------------------------------------------------------------- the record
def test_json_round_trip_and_describe():
    s = _space()
    doc = json.loads(json.dumps(s.to_json()))
    assert Space.from_json(doc) == s and Space.from_json(None) is None
    assert s.describe() == (
        "enc [config 01234567, weights (0.25, -0.5, 0.125, ...); 8x8x1 images -> latents "
        "2x4x4, d=32]"
    )
    for bad in ([1, 2], {"encoder": "x"}, {**doc, "dim": 31}, {**doc, "image_size": [8]}):
        with pytest.raises(ValueError):
            Space.from_json(bad)


def test_check_same_space():
    a = _space()
    check_same_space(a, a, "x", "y")
    check_same_space(a, _space(encoder="another name"), "x", "y")  # the name only describes
    check_same_space(None, a, "x", "y")  # an unknown space matches every space
    check_same_space(a, None, "x", "y")
    # weights within the tolerance (a float16 copy) are the same; beyond it another space
    check_same_space(a, _space(weights=(0.2505, -0.4995, 0.125, 1.0)), "x", "y")
    b = _space(weights=(0.25, -0.5, 0.125, 1.1))
    with pytest.raises(SpaceMismatchError, match="differ in weights") as err:
        check_same_space(a, b, "the obstacle set", "the encoder 'z'")
    msg = str(err.value)
    assert f"the obstacle set: {a.describe()}" in msg and f"the encoder 'z': {b.describe()}" in msg
    assert isinstance(err.value, ValueError)
    assert _space(image_size=(16, 16), latent_shape=(2, 8, 8), dim=128).differences(a) == [
        "image_size",
        "latent_shape",
        "dim",
    ]


def test_fingerprint_and_config_hash():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Linear(40, 3))
    fp = weights_fingerprint(net)
    assert len(fp) == 32
    assert fp == weights_fingerprint(copy.deepcopy(net)) == weights_fingerprint(net.state_dict())
    assert weights_match(fp, weights_fingerprint(copy.deepcopy(net).half()))  # half precision
    assert weights_match(fp, weights_fingerprint(copy.deepcopy(net).bfloat16()))
    with torch.no_grad():
        net[0].weight.add_(0.05)
    assert not weights_match(weights_fingerprint(net), fp)
    cfg = {"in_channels": 1, "latent_channels": 2, "block_out_channels": (8, 16), "extra": 1}
    h = config_hash(cfg, 1.0, 0.0)
    assert h == config_hash({**cfg, "extra": 2, "_diffusers_version": "x"}, 1.0, 0.0)
    assert h != config_hash(cfg, 1.0, 0.1) and h != config_hash({**cfg, "latent_channels": 4}, 1, 0)


# ---------------------------------------------------------------------- encoders
def test_digits_and_plain_are_different_spaces(digits, plain):
    a, p = digits.space((8, 8)), plain.space(8)
    assert a.dim == p.dim == 32 and a.latent_shape == p.latent_shape == (2, 4, 4)
    assert a.image_size == (8, 8) and a.channels == 1
    assert "weights" in a.differences(p) and not a.same_as(p)
    # one config, one normalisation, other weights: still another space
    same_cfg = Encoder(plain.vae, digits.scaling_factor, digits.shift_factor, name=digits.name)
    assert same_cfg.space().differences(a) == ["weights"]
    # the same VAE loaded again, under another name, is the same space
    again = Encoder.from_aligned(shipped("vae_aligned"))
    again.name = "renamed"
    assert Encoder(again.vae, again.scaling_factor, again.shift_factor, name="x").space() == (
        Space(**{**a.to_json(), "encoder": "x"})
    )
    with pytest.raises(ValueError, match="divisible by 2"):
        digits.space((7, 8))


def test_half_precision_and_a_new_decoder_keep_the_space(digits):
    """The space is the encoding half's: the same VAE in float16 (a pipeline run in half
    precision) and the same encoder with another decoder (a fine-tuned decoder) embed alike."""
    a = digits.space((8, 8))
    half = copy.deepcopy(digits.vae).half()
    assert Encoder(half, digits.scaling_factor, digits.shift_factor).space().same_as(a)
    other = copy.deepcopy(digits.vae)
    with torch.no_grad():
        for p in other.decoder.parameters():
            p.add_(0.1)
    assert Encoder(other, digits.scaling_factor, digits.shift_factor).space().same_as(a)
    with torch.no_grad():
        for p in other.encoder.parameters():
            p.add_(0.1)
    assert Encoder(other, digits.scaling_factor, digits.shift_factor).space().differences(a) == [
        "weights"
    ]


def test_shipped_flows_record_their_space(digits, plain):
    assert load_flow(shipped("flow_aligned")).space == digits.space((8, 8))
    assert load_flow(shipped("flow_plain")).space == plain.space((8, 8))


# ---------------------------------------------------------------------- obstacle sets
def test_set_built_with_digits_refuses_digits_plain(digits, plain, tmp_path):
    oset = build_from_images(THREES, digits)
    assert oset.space == digits.space((8, 8))
    oset.save(tmp_path / "set")
    loaded = ObstacleSet.load(tmp_path / "set")
    assert loaded.space == oset.space
    before = loaded.embeddings.copy()
    with pytest.raises(SpaceMismatchError) as err:
        add_images(loaded, SEVENS, plain)
    msg = str(err.value)
    assert digits.space((8, 8)).describe() in msg and plain.space((8, 8)).describe() in msg
    assert (
        "differ in config_hash, weights" in msg
        and "the encoder (and --size) the set was built with" in msg
    )
    assert len(loaded) == 6 and np.array_equal(loaded.embeddings, before)  # nothing added
    assert len(add_images(loaded, SEVENS, digits)) == 3  # its own encoder is fine
    with pytest.raises(SpaceMismatchError):
        loaded.check_space(plain.space((8, 8)), "the flow digits-plain")
    loaded.check_space(None, "embeddings from elsewhere")


def test_cli_append_with_another_encoder_names_both_spaces(digits, plain, tmp_path, capsys):
    from cspace.cli import main

    out = tmp_path / "set"
    assert main(["obstacles", "build", *map(str, THREES), "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["obstacles", "build", *map(str, SEVENS), "--out", str(out), "--append"]
    assert main([*argv, "--encoder", "digits-plain"]) == 2
    err = capsys.readouterr().err
    assert digits.space().describe() in err and plain.space().describe() in err
    assert len(ObstacleSet.load(out)) == 6  # unchanged
    assert main(["obstacles", "info", str(out)]) == 0
    assert f"space: {digits.space().describe()}" in capsys.readouterr().out


def test_legacy_set_has_an_unknown_space_and_takes_the_encoders(digits, plain, tmp_path, capsys):
    from cspace.cli import main

    old = build_from_images(THREES, digits)
    save_obstacle_set_v1(old, tmp_path / "old")
    legacy = ObstacleSet.load(tmp_path / "old")
    assert legacy.space is None
    legacy.check_space(plain.space(), "anything")  # unknown: accepted
    assert main(["obstacles", "info", str(tmp_path / "old"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["space"] is None and info["format_version"] == 1
    assert info["space_description"].startswith("unknown")
    add_images(legacy, SEVENS, digits)  # the documented migration: it takes the space
    assert legacy.space == digits.space()
    legacy.save(tmp_path / "old")
    assert ObstacleSet.load(tmp_path / "old").space == digits.space()


def test_space_must_fit_the_set(digits):
    s = ObstacleSet.from_embeddings(np.zeros((2, 3)), q_star=1.0)
    assert s.space is None
    with pytest.raises(ObstacleSetError, match="dimension mismatch"):
        s.space = digits.space()
    with pytest.raises(ObstacleSetError, match=r"must be a cspace\.models\.space\.Space"):
        s.space = {"dim": 3}
    with pytest.raises(ObstacleSetError, match="dimension mismatch"):
        ObstacleSet.from_embeddings(np.zeros((2, 3)), q_star=1.0, space=digits.space())
    t = ObstacleSet.from_embeddings(np.zeros((2, 32)), q_star=1.0, space=digits.space())
    t.remove([0])
    assert t.space == digits.space()  # kept through edits


def test_bad_space_record_in_a_manifest(tmp_path, digits):
    path = ObstacleSet.from_embeddings(np.zeros((2, 32)), q_star=1.0, space=digits.space()).save(
        tmp_path / "s"
    )
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["space"] = {"encoder": "x"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ObstacleSetError, match="bad space record"):
        ObstacleSet.load(path)


# ---------------------------------------------------------------------- classifiers
def test_classifier_records_its_space(digits, plain, tmp_path):
    rng = np.random.default_rng(0)
    good, bad = rng.normal(size=(20, 32)), rng.normal(size=(20, 32)) + 1.0
    clf = PreferenceClassifier.fit(good, bad, space=digits.space())
    clf.save(tmp_path / "clf")
    back = PreferenceClassifier.load(tmp_path / "clf")
    assert back.space == digits.space()
    assert json.loads((tmp_path / "clf" / "manifest.json").read_text())["space"] == (
        digits.space().to_json()
    )
    with pytest.raises(SpaceMismatchError, match="the classifier and the encoder"):
        back.check_space(plain.space(), "the encoder digits-plain")


def test_cli_classifier_records_the_encoders_space(digits, tmp_path, capsys):
    from cspace.cli.obstacles import register

    parser = argparse.ArgumentParser(prog="cspace")
    register(parser.add_subparsers(dest="command"))
    argv = ["obstacles", "classifier", "--good", str(ROOT / "examples" / "digits" / "1")]
    argv += ["--bad", str(ROOT / "examples" / "digits" / "7"), "--out", str(tmp_path / "c")]
    args = parser.parse_args(argv)
    try:
        assert args.func(args) == 0
    except ValueError as err:  # pragma: no cover - shown on failure
        print(err, file=sys.stderr)
        raise
    assert PreferenceClassifier.load(tmp_path / "c").space == digits.space()
    capsys.readouterr()
    args = parser.parse_args(["obstacles", "info", str(tmp_path / "c"), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["space"] == digits.space().to_json()


# ---------------------------------------------------------------------- fields, samplers, pipelines
def test_fields_and_guided_velocities_refuse_another_space(digits, plain):
    """A field carries its obstacles' space; a flow model of another space, a sum of fields of
    two spaces and backtracking against another space's obstacles are refused, naming both."""
    from guidance import Backtrack, ClassifierField, CombinedField, Guided, RepulsiveField, sample

    field = RepulsiveField(build_from_images(THREES, digits))
    assert field.space == digits.space()
    aligned, plain_flow = load_flow(shipped("flow_aligned")), load_flow(shipped("flow_plain"))
    guided = Guided(aligned, field, strength=1.0)  # its own space: fine
    assert guided.space == digits.space()
    with pytest.raises(SpaceMismatchError) as err:
        Guided(plain_flow, field)
    msg = str(err.value)
    assert "the velocity (FlowModel)" in msg and "the field (RepulsiveField)" in msg
    assert digits.space().describe() in msg and plain.space().describe() in msg
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SpaceMismatchError, match="the backtracking field"):
        sample(plain_flow, noise, steps=4, method="sde", backtrack=Backtrack(field=field))
    rng = np.random.default_rng(0)
    clf = PreferenceClassifier.fit(
        rng.normal(size=(20, 32)), rng.normal(size=(20, 32)) + 1, space=plain.space()
    )
    with pytest.raises(SpaceMismatchError, match="field 0 of the sum and field 1"):
        CombinedField(field, ClassifierField(clf))
    # an unknown space (embeddings from elsewhere) is accepted everywhere
    anywhere = RepulsiveField(ObstacleSet.from_embeddings(np.zeros((2, 32)), q_star=1.0))
    assert anywhere.space is None and CombinedField(field, anywhere).space == digits.space()
    Guided(plain_flow, anywhere)


def test_guide_refuses_obstacles_of_another_vae():
    """``guide(pipe, field)``: obstacles built with the pipeline's own VAE (any dtype) are
    accepted; obstacles of another VAE (other encoder weights) are refused, naming both."""
    from cspace.models.tiny_pipelines import tiny_sd, tiny_vae
    from guidance import RepulsiveField
    from guidance.integrations.diffusers import guide, pipeline_space

    pipe = tiny_sd()
    own = Encoder(pipe.vae).space((16, 16))
    assert pipeline_space(pipe, (16, 16)).same_as(own) and own.latent_shape == (4, 8, 8)
    emb = np.random.default_rng(0).normal(size=(3, own.dim))
    ok = RepulsiveField(ObstacleSet.from_embeddings(emb, q_star=1.0, space=own))
    guide(pipe, ok)
    other_vae = tiny_vae()
    with torch.no_grad():
        for p in other_vae.encoder.parameters():
            p.mul_(1.5)
    other = Encoder(other_vae).space((16, 16))
    bad = RepulsiveField(ObstacleSet.from_embeddings(emb, q_star=1.0, space=other))
    with pytest.raises(SpaceMismatchError) as err:
        guide(pipe, bad)
    msg = str(err.value)
    assert "the pipeline's VAE (StableDiffusionPipeline)" in msg and "Encoder.from_diffusers" in msg
    pipe.vae.to(torch.float16)  # the same VAE in half precision: the same space
    guide(pipe, ok)


def test_searches_and_bound_methods_keep_the_models_space(digits, plain):
    """A search meters its velocity (Budget.wrap): the metered model keeps its space, so the
    searches that guide with the field (backtrack, smc-guided) refuse another space's obstacles;
    ``flow.velocity`` (a bound method) is the flow's space too."""
    from guidance import Guided, RepulsiveField
    from guidance.search import ALGORITHMS, ClearanceVerifier

    field = RepulsiveField(build_from_images(THREES, digits))
    flow = load_flow(shipped("flow_plain"))
    with pytest.raises(SpaceMismatchError):
        Guided(flow.velocity, field)
    for name in ("backtrack", "smc-guided"):
        algo = ALGORITHMS[name]
        with pytest.raises(SpaceMismatchError, match="different C-spaces"):
            algo(flow, (2, 4, 4), ClearanceVerifier(field), 80, n_return=2, steps=5,
                 **algo.keywords(field=field))  # fmt: skip
    aligned = load_flow(shipped("flow_aligned"))  # its own space: runs
    algo = ALGORITHMS["backtrack"]
    res = algo(aligned, (2, 4, 4), ClearanceVerifier(field), 80, n_return=2, steps=5,
               **algo.keywords(field=field))  # fmt: skip
    assert res.samples.shape == (2, 2, 4, 4)


def test_a_projection_leaves_the_states_space_open(digits, plain):
    """A field with a projection takes states from another space (the projection maps them into
    the obstacles'): it names no space, so a model of another space may use it."""
    from guidance import Guided, RepulsiveField

    oset = build_from_images(THREES, digits)
    bridge = RepulsiveField(oset, projection=lambda z: z.reshape(z.shape[0], -1) * 1.0)
    assert bridge.space is None and RepulsiveField(oset).space == digits.space()
    Guided(load_flow(shipped("flow_plain")), bridge)  # accepted


def test_cspace_sample_search_refuses_obstacles_of_another_vae(tmp_path, monkeypatch):
    """``cspace sample --search`` checks the pipeline's space before searching (a search never
    goes through guide())."""
    from cspace.experiments import pipeline_sampling
    from cspace.models.tiny_pipelines import tiny_sd3, tiny_vae

    pipe = tiny_sd3()
    pipe.set_progress_bar_config(disable=True)
    other_vae = tiny_vae()
    with torch.no_grad():
        for p in other_vae.encoder.parameters():
            p.mul_(1.5)
    space = Encoder(other_vae).space((16, 16))
    emb = np.random.default_rng(0).normal(size=(3, space.dim))
    ObstacleSet.from_embeddings(emb, q_star=1.0, space=space).save(tmp_path / "other")
    monkeypatch.setattr(pipeline_sampling, "load_pipeline", lambda path, device: pipe)
    for search in (None, "best-of-n", "smc-guided"):
        with pytest.raises(SpaceMismatchError, match="the pipeline's VAE"):
            pipeline_sampling.sample_pipeline(
                "unused", obstacles=tmp_path / "other", n=1, steps=2, search=search,
                budget=40, prompt=None, out_dir=tmp_path / "out",
            )  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing written
