"""Preference classifiers as obstacles: training, the signed distance, safe files, the half-space
field (against an independent potential and autograd), sampling with it, and CombinedField."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from cspace.models.toy import GaussianMixture
from guidance import ClassifierField, CombinedField, Guided, RepulsiveField, safe_norm, sample
from obstacles import ObstacleSet
from obstacles.classifier import ClassifierError, PreferenceClassifier
from tests.folders import replace_payload, stored

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
F64 = torch.float64


def _blobs(n_good=60, n_bad=60, seed=0, d=2, sep=4.0):
    rng = np.random.default_rng(seed)
    shift = np.zeros(d)
    shift[0] = sep / 2
    return rng.normal(size=(n_good, d)) * 0.5 - shift, rng.normal(size=(n_bad, d)) * 0.5 + shift


def _logit(p):
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------- training
def test_fit_reports_heldout_accuracy():
    good, bad = _blobs()
    clf = PreferenceClassifier.fit(good, bad, seed=0)
    assert clf.accuracy is not None and clf.accuracy >= 0.95
    assert clf.train_accuracy >= 0.95
    assert clf.info["counts"] == {"good": 60, "bad": 60}
    assert clf.info["holdout_count"] == 30  # ceil(0.25 * 120), stratified
    assert clf.w[0] > 0  # p(bad) grows towards the bad blob
    same = PreferenceClassifier.fit(good, bad, seed=0)
    np.testing.assert_array_equal(same.w, clf.w)
    assert same.accuracy == clf.accuracy
    # no hold-out: accuracy is not measured
    assert PreferenceClassifier.fit(good, bad, holdout=0).accuracy is None
    # a held-out accuracy that means something: overlapping classes score well below 1
    g2, b2 = _blobs(sep=0.5, seed=1)
    noisy = PreferenceClassifier.fit(g2, b2)
    assert 0.4 < noisy.accuracy < 0.95


def test_fit_errors():
    good, bad = _blobs()
    with pytest.raises(ClassifierError, match="no bad examples"):
        PreferenceClassifier.fit(good, bad[:0])
    with pytest.raises(ClassifierError, match="no good examples"):
        PreferenceClassifier.fit(np.zeros((0, 2)), bad)
    assert issubclass(ClassifierError, ValueError)
    with pytest.raises(ClassifierError, match="dimension mismatch"):
        PreferenceClassifier.fit(good, bad[:, :1])
    with pytest.raises(ClassifierError, match=r"too few examples.*holdout=0"):
        PreferenceClassifier.fit(good[:1], bad[:3])
    with pytest.raises(ClassifierError, match="threshold"):
        PreferenceClassifier.fit(good, bad, threshold=1.0)
    with pytest.raises(ClassifierError, match="NaN"):
        PreferenceClassifier.fit(np.full((3, 2), np.nan), bad)
    with pytest.raises(ClassifierError, match="'auto'"):
        PreferenceClassifier.fit(good, bad, q_star="wide")
    with pytest.raises(ClassifierError, match="does not separate"):
        PreferenceClassifier(np.zeros(2), 0.0)


def test_signed_distance_closed_form():
    w, b, p0 = np.array([3.0, 4.0]), -2.0, 0.8
    clf = PreferenceClassifier(w, b, threshold=p0, q_star=1.0)
    x = np.random.default_rng(0).normal(size=(50, 2)) * 3
    want = (math.log(4.0) - (3 * x[:, 0] + 4 * x[:, 1] - 2)) / 5
    np.testing.assert_allclose(clf.signed_distance(x), want, rtol=1e-12, atol=1e-12)
    got_t = clf.signed_distance(torch.from_numpy(x))
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == F64
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-12, atol=1e-12)
    # p(bad) >= p0 exactly on the non-positive side; the boundary has p(bad) = p0
    np.testing.assert_array_equal(clf.prob_bad(x) >= p0, want <= 0)
    foot = x + want[:, None] * clf.unit_normal[None]  # move D along the normal onto the boundary
    np.testing.assert_allclose(clf.prob_bad(foot), p0, rtol=1e-12)
    np.testing.assert_allclose(clf.signed_distance(foot), 0, atol=1e-12)
    # a fitted 2-D model agrees with its own probabilities
    good, bad = _blobs()
    fit = PreferenceClassifier.fit(good, bad, threshold=0.3)
    pts = np.concatenate([good, bad])
    z = pts @ fit.w + fit.b
    np.testing.assert_allclose(
        fit.signed_distance(pts), (_logit(0.3) - z) / np.linalg.norm(fit.w), rtol=1e-10
    )
    np.testing.assert_array_equal(fit.is_bad(pts), fit.prob_bad(pts) > 0.3)
    with pytest.raises(ClassifierError, match="dimension mismatch"):
        fit.signed_distance(np.zeros((2, 3)))


def test_auto_q_star_rule():
    good, bad = _blobs()
    clf = PreferenceClassifier.fit(good, bad)
    d = clf.signed_distance(good)
    assert clf.q_star == pytest.approx(float(np.median(d[d > 0])), rel=1e-12)
    assert PreferenceClassifier.fit(good, bad, q_star=0.7, eta=2.0).q_star == 0.7


# ---------------------------------------------------------------------- positive-unlabelled
def _pu_problem(bad_share=0.1, n=1000, m=40, d=8, seed=0, sep=3.0):
    """Examples of the bad blob (m), unlabelled states (n, a share ``bad_share`` of them bad),
    and fresh labelled test points of both blobs."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(d)
    mu[0] = sep / 2

    def blob(k, sign):
        return rng.normal(size=(k, d)) * 0.6 + sign * mu

    n_bad = round(bad_share * n)
    unlabelled = np.concatenate([blob(n - n_bad, -1), blob(n_bad, +1)])
    return blob(m, +1), unlabelled, blob(2000, -1), blob(2000, +1)


def test_positive_unlabelled_finds_the_class_without_good_labels():
    examples, unlabelled, good_test, bad_test = _pu_problem()
    pu = PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, seed=0)
    c = pu.info["c"]
    assert 0 < c < 1 and pu.threshold == pytest.approx(c / 2, rel=1e-12)
    assert pu.accuracy is None and pu.info["counts"] == {"unlabelled": 1000, "examples": 40}
    recall, false_pos = pu.is_bad(bad_test).mean(), pu.is_bad(good_test).mean()
    assert recall >= 0.9 and false_pos <= 0.05, (recall, false_pos)
    # Elkan and Noto's threshold catches more of the class than p(bad | x) >= 1/2 would: the
    # unlabelled states hold bad ones, which pull g down on the class
    naive = pu.prob_bad(bad_test) >= 0.5
    assert recall > naive.mean()
    # about a tenth of the unlabelled states are inside (they are a 10% mixture)
    assert 0.07 <= pu.info["unlabelled_inside"] <= 0.15
    assert pu.info["example_recall"] >= 0.9
    # deterministic for a seed
    again = PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, seed=0)
    np.testing.assert_array_equal(again.w, pu.w)
    assert again.threshold == pu.threshold


def test_positive_unlabelled_c_falls_as_the_unlabelled_hold_more_of_the_class():
    # c = P(labelled | bad): the more bad states among the unlabelled, the less g tells them apart
    cs = [
        PreferenceClassifier.fit_positive_unlabelled(*_pu_problem(share)[:2]).info["c"]
        for share in (0.0, 0.1, 0.3)
    ]
    assert cs[0] > cs[1] > cs[2], cs
    assert cs[0] > 0.9  # nothing of the class unlabelled: the examples are told apart


def test_positive_unlabelled_region_is_the_fields_hard_region():
    # the rejection-pu arm tests membership through the field's hard region: the same set
    from guidance.fields.regions import hard_regions

    examples, unlabelled, good_test, bad_test = _pu_problem(d=5, seed=3)
    pu = PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled)
    pts = np.concatenate([good_test[:500], bad_test[:500]])
    inside = hard_regions(ClassifierField(pu)).inside(torch.from_numpy(pts)).numpy()
    np.testing.assert_array_equal(inside, pu.is_bad(pts))
    assert 0.3 < inside.mean() < 0.7


def test_positive_unlabelled_errors(tmp_path):
    examples, unlabelled, _, _ = _pu_problem(n=100, m=10, d=3)
    with pytest.raises(ClassifierError, match=r"5-fold.*at least 5 examples.*got 4 and 100"):
        PreferenceClassifier.fit_positive_unlabelled(examples[:4], unlabelled)
    with pytest.raises(ClassifierError, match="at least 3 examples and 3 unlabelled"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled[:2], folds=3)
    with pytest.raises(ClassifierError, match="folds must be an integer >= 2; got 1"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, folds=1)
    with pytest.raises(ClassifierError, match=r"folds must be an integer >= 2; got 2\.5"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, folds=2.5)
    with pytest.raises(ClassifierError, match="folds must be an integer >= 2; got None"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, folds=None)
    with pytest.raises(
        ClassifierError, match=r"seed must be an integer in 0 \.\. 2\*\*32 - 1; got -1"
    ):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, seed=-1)
    with pytest.raises(ClassifierError, match=r"seed must be an integer.*got 1\.7"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, seed=1.7)
    with pytest.raises(ClassifierError, match="C must be a finite number > 0; got True"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, C=True)
    with pytest.raises(ClassifierError, match=r"dimension mismatch.*d=3.*d=2"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled[:, :2])
    with pytest.raises(ClassifierError, match="C must be a finite number > 0"):
        PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled, C=0)
    bad = unlabelled.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ClassifierError, match="unlabelled states contain NaN or Inf"):
        PreferenceClassifier.fit_positive_unlabelled(examples, bad)
    # it saves and loads like any classifier: the threshold c / 2 and the rule survive
    pu = PreferenceClassifier.fit_positive_unlabelled(examples, unlabelled)
    back = PreferenceClassifier.load(pu.save(tmp_path / "pu"))
    assert back.threshold == pu.threshold and back.info["rule"] == pu.info["rule"]


# ---------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    good, bad = _blobs(d=5)
    clf = PreferenceClassifier.fit(good, bad, threshold=0.4, eta=0.25)
    clf.info["encoder"] = "tiny"
    clf.save(tmp_path / "clf")
    back = PreferenceClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(back.w, clf.w)
    assert back.b == clf.b and back.threshold == 0.4 and back.eta == 0.25
    assert back.q_star == clf.q_star and back.accuracy == clf.accuracy
    assert back.info["encoder"] == "tiny" and back.info["counts"] == {"good": 60, "bad": 60}
    manifest = json.loads((tmp_path / "clf" / "manifest.json").read_text())
    assert manifest["format"] == "cspace.classifier" and manifest["format_version"] == 3
    assert manifest["dim"] == 5 and manifest["classes"] == ["good", "bad"]
    assert "sha256" in manifest["files"]["classifier.safetensors"]
    clf.save(tmp_path / "clf")  # replacing a classifier is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary folders left
    with pytest.raises(ClassifierError, match="dimension mismatch"):
        PreferenceClassifier.load(tmp_path / "clf", expected_dim=4)


def _tamper(folder: Path, how: str) -> None:
    tensors, mpath = stored(folder, "classifier.safetensors"), folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if how == "flip":
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-8])
    elif how == "missing":
        tensors.unlink()
    elif how in ("version", "format"):
        if how == "version":
            manifest["format_version"] = 99
        else:
            manifest["format"] = "something.else"
        mpath.write_text(json.dumps(manifest))
    elif how == "shape":  # a consistent checksum on tensors of the wrong shape
        replace_payload(
            folder, "classifier.safetensors", st_save({"w": np.ones(3), "b": np.zeros(1)})
        )
    elif how == "json":
        mpath.write_text("{not json")


@pytest.mark.parametrize(
    "how,msg",
    [
        ("flip", "checksum mismatch"),
        ("truncate", "truncated or replaced"),
        ("missing", "is missing"),
        ("version", "format_version 99"),
        ("format", "not a cspace classifier manifest"),
        ("shape", r"tensor 'w' is F64 of shape \(3,\), expected F64 of shape \(2,\)"),
        ("json", "not JSON"),
    ],
)
def test_tampered_files_are_refused(tmp_path, how, msg):
    PreferenceClassifier.fit(*_blobs()).save(tmp_path / "clf")
    _tamper(tmp_path / "clf", how)
    with pytest.raises(ClassifierError, match=msg):
        PreferenceClassifier.load(tmp_path / "clf")


def test_save_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ClassifierError, match="refusing to overwrite"):
        PreferenceClassifier.fit(*_blobs()).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_no_pickle_in_the_code():
    for rel in (
        "obstacles/classifier.py",
        "obstacles/from_images.py",
        "guidance/fields/classifier.py",
        "cspace/cli/obstacles.py",
    ):
        text = (ROOT / rel).read_text()
        for bad in ("import pickle", "joblib", "torch.load", "allow_pickle=True", "cloudpickle"):
            assert bad not in text, (rel, bad)


# ---------------------------------------------------------------------- the field
def _clf(q_star=1.5, eta=0.7, p0=0.8, d=3, seed=0) -> PreferenceClassifier:
    rng = np.random.default_rng(seed)
    return PreferenceClassifier(rng.normal(size=d), 0.3, threshold=p0, q_star=q_star, eta=eta)


def _ref_potential(x: torch.Tensor, clf: PreferenceClassifier) -> torch.Tensor:
    """U from the formula alone, differentiable (valid away from the clamp)."""
    w = torch.from_numpy(clf.w)
    dist = (_logit(clf.threshold) - (x @ w + clf.b)) / torch.linalg.vector_norm(w)
    pot = 0.5 * clf.eta * (1 / dist - 1 / clf.q_star) ** 2
    return torch.where(dist <= clf.q_star, pot, torch.zeros_like(pot))


def _points_at(clf: PreferenceClassifier, dists, seed=1) -> torch.Tensor:
    """States at the given signed distances, with random offsets along the boundary."""
    rng = np.random.default_rng(seed)
    u = clf.unit_normal
    base = rng.normal(size=(len(dists), clf.dim)) * 3
    base -= (base @ u)[:, None] * u[None]  # on the plane through the origin
    x = base + (clf.offset - np.asarray(dists, dtype=float))[:, None] * u[None]
    return torch.from_numpy(x)


def test_force_is_minus_grad_potential():
    clf = _clf()
    q, rho = clf.q_star, 0.05
    dists = np.linspace(rho * q * 1.01, q * 0.999, 40)
    x = _points_at(clf, dists)
    field = ClassifierField(clf)
    out = field.evaluate(x)
    np.testing.assert_allclose(out.nearest.numpy(), dists, rtol=1e-10, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_ref_potential(xr, clf).sum(), xr)
    ref_u = _ref_potential(x, clf)
    assert torch.allclose(out.potential, ref_u, rtol=1e-10, atol=0)
    rel = safe_norm(out.force + grad) / safe_norm(grad)
    assert float(rel.max()) < 1e-8
    # closed form: eta (1/D - 1/Q) / D^2 along -u
    mag = clf.eta * (1 / dists - 1 / q) / dists**2
    np.testing.assert_allclose(safe_norm(out.force).numpy(), mag, rtol=1e-10)
    assert bool((out.active == 1).all())


def test_zero_beyond_q_star_and_clamped_inside():
    clf = _clf()
    q, rho, eta = clf.q_star, 0.05, clf.eta
    field = ClassifierField(clf)
    far = field.evaluate(_points_at(clf, [q * 1.001, 2 * q, 1e6]))
    assert bool((far.potential == 0).all()) and bool((far.force == 0).all())
    assert bool((far.active == 0).all()) and not bool(far.collided.any())
    # at or below rho Q*, on the boundary and deep on the bad side: the clamp values
    near = field.evaluate(_points_at(clf, [rho * q, rho * q / 2, 0.0, -0.1, -5.0, -1e6]))
    u_clamp = 0.5 * eta / q**2 * (1 / rho - 1) ** 2
    f_clamp = eta / q**3 * (1 / rho - 1) / rho**2
    np.testing.assert_allclose(near.potential.numpy(), u_clamp, rtol=1e-12)
    np.testing.assert_allclose(safe_norm(near.force).numpy(), f_clamp, rtol=1e-12)
    assert field.max_force == pytest.approx(f_clamp)
    assert near.collided.tolist() == [False, False, False, True, True, True]


def test_force_points_away_from_the_bad_side():
    clf = _clf()
    x = _points_at(clf, np.linspace(-3, 1.4, 50))
    out = ClassifierField(clf).evaluate(x)
    u = torch.from_numpy(clf.unit_normal)
    unit = out.force / safe_norm(out.force)[:, None]
    assert torch.allclose(unit, -u.expand_as(unit), atol=1e-12)  # along -w/|w|
    step = x + 1e-3 * unit  # moving along the force increases D: away from the bad region
    assert bool((clf.signed_distance(step) > out.nearest).all())
    np.testing.assert_array_equal(out.collided.numpy(), clf.is_bad(x.numpy()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_everywhere(dtype):
    clf = _clf(q_star=1e-3, eta=5.0)
    big = float(torch.finfo(dtype).max)
    u = torch.from_numpy(clf.unit_normal)
    rows = [
        _points_at(clf, [0.0])[0],  # on the boundary
        _points_at(clf, [-1e6])[0],  # deep on the bad side
        u * 1e30,
        -u * 1e30,
        torch.full((3,), 1e30, dtype=F64),
        torch.full((3,), -1e-30, dtype=F64),
        torch.zeros(3, dtype=F64),
        torch.full((3,), big * 0.99, dtype=F64),
        -torch.full((3,), big * 0.99, dtype=F64),
        torch.tensor([big * 0.99, -big * 0.99, 0.0], dtype=F64),
    ]
    x = torch.stack(rows).to(dtype)
    assert bool(torch.isfinite(x).all())
    for t in (None, 0.3, 1.0):
        out = ClassifierField(clf).evaluate(x, t)
        for v in (out.potential, out.force, out.nearest, out.clearance):
            assert bool(torch.isfinite(v).all()), (t, v)
        assert out.force.dtype == dtype
        cap = ClassifierField(clf).max_force
        assert bool((safe_norm(out.force.to(F64)) <= cap * (1 + 1e-6)).all())
    # a small cap is honoured
    capped = ClassifierField(clf, max_force=2.0).evaluate(x)
    assert bool((safe_norm(capped.force.to(F64)) <= 2.0 * (1 + 1e-6)).all())


def test_noisy_mode_and_projection():
    clf = _clf(d=2)
    x = _points_at(clf, np.linspace(-1, 2, 9))
    field = ClassifierField(clf)
    t = torch.linspace(0, 1, 9, dtype=F64)
    out = field.evaluate(x, t)
    want = (1 - t).numpy() * clf.offset - x.numpy() @ clf.unit_normal
    np.testing.assert_allclose(out.nearest.numpy(), want, rtol=1e-10, atol=1e-12)
    # states (B, 3) embedded by a linear map: the force is pulled back, = -grad of U(P(x))
    a = torch.tensor([[1.0, 0.5], [-0.3, 2.0], [0.2, 0.1]], dtype=F64)
    states = torch.linalg.lstsq(a.T, x.T).solution.T  # P(states) = states @ a = x
    pf = ClassifierField(clf, projection=lambda s: s @ a)
    pout = pf.evaluate(states)
    np.testing.assert_allclose(pout.nearest.numpy(), clf.signed_distance(x.numpy()), atol=1e-9)
    active = (pout.nearest > 0.05 * clf.q_star * 1.01) & (pout.nearest < clf.q_star)
    sr = states.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_ref_potential(sr @ a, clf).sum(), sr)
    assert torch.allclose(pout.force[active], -grad[active], rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        field.evaluate(torch.zeros(2, 5, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        field.evaluate(torch.full((1, 2), float("nan")))


def test_sampling_avoids_the_bad_mode():
    """Two equal modes; the classifier calls one bad. Unguided ~50% bad, guided < 5%."""
    mix = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64), 0.5)
    gen = torch.Generator().manual_seed(0)
    good = mix.means[0] + 0.5 * torch.randn(300, 2, generator=gen, dtype=F64)
    bad = mix.means[1] + 0.5 * torch.randn(300, 2, generator=gen, dtype=F64)
    # eta is calibrated to the toy's scale: with eta = 1 the clamped force (~950) would move a
    # state by ~19 per step of h = 0.02 and throw the guided samples far past the good mode
    clf = PreferenceClassifier.fit(good.numpy(), bad.numpy(), eta=0.01)
    assert clf.accuracy > 0.98
    noise = torch.randn(2000, 2, generator=gen, dtype=F64)
    plain = sample(mix.velocity, noise, steps=50)
    guided = sample(Guided(mix.velocity, ClassifierField(clf), strength=1.0), noise, steps=50)
    plain_bad = float(np.mean(clf.is_bad(plain.samples.numpy())))
    guided_bad = float(np.mean(clf.is_bad(guided.samples.numpy())))
    assert 0.45 < plain_bad < 0.55
    assert guided_bad < 0.05
    assert float(guided.collided.double().mean()) == pytest.approx(guided_bad)
    # the avoided mass lands near the good mode, not far away
    dist = torch.linalg.vector_norm(guided.samples - mix.means[0], dim=1)
    assert float((dist < 2.0).double().mean()) > 0.95
    assert guided.nfe == plain.nfe


def test_combined_field_sums():
    clf = _clf(d=2, q_star=2.0)
    emb = np.array([[0.5, -0.25], [-1.0, 1.5]], dtype=np.float32)
    oset = ObstacleSet.from_embeddings(emb, q_star=1.5, eta=0.5, radius=0.2)
    rep, hs = RepulsiveField(oset), ClassifierField(clf)
    both = CombinedField(rep, hs)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    a, b, c = rep.evaluate(x), hs.evaluate(x), both.evaluate(x)
    assert torch.allclose(c.potential, a.potential + b.potential, rtol=1e-12)
    assert torch.allclose(c.force, a.force + b.force, rtol=1e-12, atol=1e-12)
    assert torch.equal(c.nearest, torch.minimum(a.nearest, b.nearest))
    assert torch.equal(c.clearance, torch.minimum(a.clearance, b.clearance))
    assert torch.equal(c.active, a.active + b.active)
    assert torch.equal(c.collided, a.collided | b.collided)
    nf = both.evaluate(x, need_force=False)
    assert torch.equal(nf.potential, c.potential) and bool((nf.force == 0).all())
    tt = both.evaluate(x, 0.4)
    assert torch.allclose(
        tt.potential, rep.evaluate(x, 0.4).potential + hs.evaluate(x, 0.4).potential
    )
    # huge values from several fields stay finite
    big = torch.full((1, 2), 1e308, dtype=F64)
    hb = CombinedField(hs, hs, hs).evaluate(big)
    assert bool(torch.isfinite(hb.force).all()) and bool(torch.isfinite(hb.potential).all())
    out = sample(Guided(lambda s, t: -s, both, strength=0.1), x, steps=5)
    assert bool(torch.isfinite(out.samples).all()) and out.collided.shape == (64,)
    with pytest.raises(ValueError, match="at least one"):
        CombinedField()
    with pytest.raises(TypeError, match="evaluate"):
        CombinedField(object())


# ---------------------------------------------------------------------- the command
def test_cli_classifier(tmp_path, run_cli, tiny_encoder, monkeypatch):
    import cspace.models.encoders as mod

    enc = tiny_encoder
    calls = []
    real_encode = enc.encode
    enc.encode = lambda images, batch_size=256: calls.append(len(images)) or real_encode(images)
    monkeypatch.setattr(mod, "load_encoder", lambda spec: enc)
    for c in ("1", "2", "3"):
        (tmp_path / c).mkdir()
        for f in sorted((DIGITS / c).glob("*.png"))[:8]:
            shutil.copy(f, tmp_path / c / f.name)
    out = tmp_path / "clf"
    argv = ["obstacles", "classifier", "--good", tmp_path / "1", tmp_path / "2"]
    argv += ["--bad", tmp_path / "3", "--out", out, "--encoder", "tiny"]
    rc, text, err = run_cli([*argv, "--threshold", "0.6", "--eta", "0.5"])
    assert rc == 0, err
    assert "held-out accuracy: " in text and "16 good and 8 bad" in text and "(auto)" in text
    clf = PreferenceClassifier.load(out)
    assert clf.dim == 32 and clf.threshold == 0.6 and clf.eta == 0.5
    assert clf.accuracy is not None and clf.info["encoder"].startswith("tiny")
    rc, text, _ = run_cli(["obstacles", "info", out])
    assert rc == 0 and "cspace.classifier v3" in text and "threshold: 0.6" in text
    assert "examples: 16 good, 8 bad" in text
    rc, _, err = run_cli(argv)
    assert rc == 2 and "--overwrite" in err
    before = stored(out, "classifier.safetensors").read_bytes()
    # a bad image among the bad ones: nothing encoded, nothing written
    (tmp_path / "3" / "broken.png").write_text("no")
    calls.clear()
    rc, _, err = run_cli([*argv, "--overwrite"])
    assert rc == 2 and err.startswith("cspace obstacles: error:") and "broken.png" in err
    assert calls == [] and stored(out, "classifier.safetensors").read_bytes() == before
    (tmp_path / "3" / "broken.png").unlink()
    for extra, msg in (
        (["--threshold", "1.5"], "--threshold must be a probability"),
        (["--q-star", "zero"], "--q-star must be 'auto'"),
        (["--holdout", "1"], "--holdout must be in [0, 1)"),
    ):
        rc, _, err = run_cli([*argv, "--overwrite", *extra])
        assert rc == 2 and msg in err, err
    same = ["obstacles", "classifier", "--good", tmp_path / "1", "--bad", tmp_path / "1"]
    rc, _, err = run_cli([*same, "--out", tmp_path / "c2", "--encoder", "tiny"])
    assert rc == 2 and "files are both good and bad" in err and not (tmp_path / "c2").exists()


def test_cli_classifier_positive_unlabelled(tmp_path, run_cli):
    """--unlabelled instead of --good: the bad images against unlabelled ones (a mixture of
    digits with some of the bad class), Elkan and Noto's threshold, the default C of PU_CN / n, in
    the shipped digits C-space."""
    from obstacles.classifier import PU_CN

    (tmp_path / "bad").mkdir()
    (tmp_path / "mix").mkdir()
    for f in sorted((DIGITS / "3").glob("*.png"))[:20]:
        shutil.copy(f, tmp_path / "bad" / f.name)
    for c in ("1", "3", "5", "6", "7", "0"):
        for f in sorted((DIGITS / c).glob("*.png"))[-10:]:
            shutil.copy(f, tmp_path / "mix" / f"{c}_{f.name}")
    out = tmp_path / "pu"
    base = ["obstacles", "classifier", "--bad", tmp_path / "bad", "--encoder", "digits"]
    rc, text, err = run_cli([*base, "--out", out, "--unlabelled", tmp_path / "mix"])
    assert rc == 0, err
    assert "20 bad and 60 unlabelled images (positive-unlabelled)" in text
    assert "Elkan and Noto's c = " in text and "held-out accuracy" not in text
    clf = PreferenceClassifier.load(out)
    assert clf.info["C"] == PU_CN / 80 and clf.threshold == pytest.approx(
        clf.info["c"] / 2, rel=1e-12
    )
    assert clf.info["counts"] == {"unlabelled": 60, "examples": 20}
    # the unlabelled threes are the ones inside, mostly
    inside = clf.info["unlabelled_inside"]
    assert 0.1 <= inside <= 0.3, inside
    rc, text, _ = run_cli(["obstacles", "info", out])
    assert rc == 0 and "positive-unlabelled: 20 bad and 60 unlabelled images" in text
    assert "None" not in text and "held-out accuracy" not in text
    # one of --good and --unlabelled; no threshold or hold-out with --unlabelled: nothing written
    for extra, msg in (
        ([], "give --good DIR... (wanted images) or --unlabelled DIR..."),
        (["--good", tmp_path / "mix", "--unlabelled", tmp_path / "mix"], "one of the two"),
        (["--unlabelled", tmp_path / "mix", "--threshold", "0.4"], "--threshold does not apply"),
        (["--unlabelled", tmp_path / "mix", "--holdout", "0"], "--holdout does not apply"),
        (["--unlabelled", tmp_path / "bad"], "files are both unlabelled and bad"),
        (["--good", tmp_path / "mix", "--folds", "3"], "--folds applies to --unlabelled only"),
        (["--unlabelled", tmp_path / "mix", "--folds", "30"], "at least 30 examples"),
        (["--unlabelled", tmp_path / "mix", "--folds", "1"], "--folds must be at least 2; got 1"),
    ):
        rc, _, err = run_cli([*base, "--out", tmp_path / "no", *extra])
        assert rc == 2 and msg in err, (extra, err)
        assert not (tmp_path / "no").exists()


def test_positive_unlabelled_that_separates_nothing_is_refused():
    # examples drawn like the unlabelled states: the region would hold most of them
    rng = np.random.default_rng(0)
    with pytest.raises(ClassifierError, match=r"holds \d+% of the unlabelled states"):
        PreferenceClassifier.fit_positive_unlabelled(
            rng.normal(size=(40, 4)), rng.normal(size=(400, 4))
        )
