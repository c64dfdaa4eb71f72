"""obstacles.KernelRegion: the positive-unlabelled region of an RBF kernel model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obstacles.classifier import ClassifierError, PreferenceClassifier
from obstacles.kernel_region import KernelRegion


def _ring_and_core(seed: int = 0, n: int = 1000, core_share: float = 0.15):
    """Unlabelled 2-D states: a core blob at the origin (the class) inside a ring of radius 3
    (the rest), and 40 examples of the core; no half-space holds the core without half the
    ring. Returns (examples, unlabelled, is_core)."""
    rng = np.random.default_rng(seed)
    core = rng.random(n) < core_share
    angle = rng.uniform(0, 2 * np.pi, n)
    ring = 3.0 * np.c_[np.cos(angle), np.sin(angle)] + 0.3 * rng.standard_normal((n, 2))
    x = np.where(core[:, None], 0.5 * rng.standard_normal((n, 2)), ring)
    return 0.5 * rng.standard_normal((40, 2)), x, core


def test_it_holds_a_class_that_no_half_space_can():
    ex, u, _ = _ring_and_core()
    _, test, core2 = _ring_and_core(seed=1)
    region = KernelRegion.fit_positive_unlabelled(ex, u)
    flags = region.is_bad(test)
    assert flags[core2].mean() >= 0.9, flags[core2].mean()  # the class is inside
    assert flags[~core2].mean() <= 0.05, flags[~core2].mean()  # the ring is not
    # the half-space is refused (its region holds most of the states), or it misses much of
    # the core, or it takes much of the ring
    try:
        linear = PreferenceClassifier.fit_positive_unlabelled(ex, u).is_bad(test)
    except ClassifierError as err:
        assert "% of the unlabelled states" in str(err)
    else:
        assert linear[core2].mean() < 0.7 or linear[~core2].mean() > 0.2
    info = region.info
    assert 0 < info["c"] < 1 and info["example_recall"] >= 0.9
    assert np.isclose(region.threshold, 0.4 * info["c"])
    assert info["counts"] == {"unlabelled": 1000, "examples": 40, "unlabelled_fitted": 1000}


def test_prob_bad_is_scikit_learns_pipeline():
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    ex, u, _ = _ring_and_core(n=300)
    region = KernelRegion.fit_positive_unlabelled(ex, u, components=50, seed=3)
    x = (np.concatenate([u, ex]) - region.centre) / region.scale  # the model's units
    y = np.r_[np.zeros(len(u)), np.ones(len(ex))]
    ref = make_pipeline(
        Nystroem(gamma=region.gamma, n_components=50, random_state=3),
        LogisticRegression(C=region.info["C"], class_weight="balanced", max_iter=5000,
                           random_state=3),
    ).fit(x, y)  # fmt: skip
    _, test, _ = _ring_and_core(seed=5, n=200)
    ref_p = ref.predict_proba((test - region.centre) / region.scale)[:, 1]
    np.testing.assert_allclose(region.prob_bad(test), ref_p, atol=1e-9)
    # the units: the centre is the unlabelled states' mean, the scale their median distance
    np.testing.assert_allclose(region.centre, u.mean(0))
    assert 3 < region.scale < 5 and region.gamma == 2.0
    # more rows than one block give the same values
    many = np.repeat(test, 25, axis=0)
    np.testing.assert_array_equal(region.prob_bad(many), np.repeat(region.prob_bad(test), 25))


def test_inside_is_the_torch_membership_test():
    ex, u, _ = _ring_and_core(n=300)
    region = KernelRegion.fit_positive_unlabelled(ex, u, components=50)
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, -3.0]], dtype=torch.float32)
    flags = region.inside(x)
    assert flags.dtype == torch.bool and flags.tolist() == [True, False, False]
    assert region.dim == 2 and "KernelRegion(d=2" in repr(region)
    assert region.inside(x.numpy()).tolist() == [True, False, False]  # an array works too
    with pytest.raises(ClassifierError, match=r"inside takes states \(m, d\).*x\[None\]"):
        region.inside(torch.tensor([3.0, 3.0]))


def test_every_finite_input_gives_a_probability():
    ex, u, _ = _ring_and_core(n=300)
    region = KernelRegion.fit_positive_unlabelled(ex, u, components=50)
    big = np.array([[1e300, -1e300], [1e154, 1e154], [0.0, 0.0], [-5e-324, 5e-324]])
    p = region.prob_bad(big)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    assert p[2] > region.threshold and p[0] < region.threshold


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0.0}, "width must be a finite number > 0"),
        ({"components": 0}, "components must be an integer >= 1"),
        ({"components": True}, "components must be an integer >= 1"),
        ({"factor": 1.5}, r"factor must be a number in \(0, 1\]"),
        ({"factor": -0.1}, r"factor must be a number in \(0, 1\]"),
        ({"factor": "x"}, r"factor must be a number in \(0, 1\]"),
        ({"C": -1.0}, "C must be a finite number > 0"),
        ({"folds": 1}, "folds must be an integer >= 2"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    ex, u, _ = _ring_and_core(n=200)
    with pytest.raises(ClassifierError, match=message):
        KernelRegion.fit_positive_unlabelled(ex, u, **kwargs)


def test_bad_data_is_named():
    ex, u, _ = _ring_and_core(n=200)
    with pytest.raises(ClassifierError, match="dimension mismatch"):
        KernelRegion.fit_positive_unlabelled(ex, np.c_[u, u])
    bad = u.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ClassifierError, match="NaN or Inf"):
        KernelRegion.fit_positive_unlabelled(ex, bad)
    with pytest.raises(ClassifierError, match="one point"):
        KernelRegion.fit_positive_unlabelled(ex, np.ones((100, 2)))
    region = KernelRegion.fit_positive_unlabelled(ex, u, components=20)
    with pytest.raises(ClassifierError, match="d=2"):
        region.prob_bad(np.zeros((3, 5)))


def test_a_class_that_is_most_of_the_states_is_refused():
    rng = np.random.default_rng(0)
    u = 0.5 * rng.standard_normal((300, 2))  # every unlabelled state looks like the examples
    with pytest.raises(
        ClassifierError, match=r"holds \d+% of the unlabelled states.*smaller factor"
    ):
        KernelRegion.fit_positive_unlabelled(0.5 * rng.standard_normal((40, 2)), u)


def test_the_constructor_checks_its_arrays():
    z = np.zeros((3, 2))
    with pytest.raises(ClassifierError, match="normalization"):
        KernelRegion(z, np.eye(2), 1.0, np.zeros(3), 0.0, 0.5)
    with pytest.raises(ClassifierError, match="threshold"):
        KernelRegion(z, np.eye(3), 1.0, np.zeros(3), 0.0, 1.5)
    with pytest.raises(ClassifierError, match="gamma"):
        KernelRegion(z, np.eye(3), 0.0, np.zeros(3), 0.0, 0.5)


@pytest.mark.parametrize(
    ("offset", "scale"), [(1e8, 1.0), (0.0, 1e-160), (0.0, 1e160), (-3e5, 1e3)]
)
def test_the_region_does_not_depend_on_offset_or_scale(offset, scale):
    """The model works in units of the unlabelled states' spread about their mean: a common
    offset or any finite scale gives the same region (no precision lost, no overflow)."""
    ex, u, _ = _ring_and_core(n=600)
    _, test, _ = _ring_and_core(seed=1, n=400)
    ref = KernelRegion.fit_positive_unlabelled(ex, u, components=100).is_bad(test)

    def moved(a):
        return a * scale + offset

    got = KernelRegion.fit_positive_unlabelled(moved(ex), moved(u), components=100)
    flags = got.is_bad(moved(test))
    assert np.mean(flags != ref) <= 0.01, np.mean(flags != ref)
    assert np.all(np.isfinite(got.prob_bad(moved(test))))


def test_a_fit_uses_at_most_max_fit_rows_unlabelled_states(monkeypatch):
    import obstacles.kernel_region as kr

    monkeypatch.setattr(kr, "MAX_FIT_ROWS", 300)
    ex, u, core = _ring_and_core(n=1000)
    region = KernelRegion.fit_positive_unlabelled(ex, u, components=100)
    assert region.info["counts"] == {"unlabelled": 1000, "examples": 40, "unlabelled_fitted": 300}
    flags = region.is_bad(u)
    assert flags[core].mean() >= 0.9 and flags[~core].mean() <= 0.05


def test_a_region_built_by_hand_that_overflows_is_refused():
    z = np.zeros((2, 2))
    region = KernelRegion(z, np.full((2, 2), 1.7e308), 1.0, [1.0, -1.0], 0.0, 0.5)
    with pytest.raises(ClassifierError, match="overflow"):
        region.prob_bad(np.zeros((3, 2)))
