"""``benchmarks/fashion_generator.py``: the Frechet distance it reports, against the closed form
for Gaussians, and with the singular covariance that a dead ReLU feature gives."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion_generator.py"


def _frechet():
    spec = importlib.util.spec_from_file_location("fashion_generator", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.frechet


def test_frechet_is_the_closed_form_of_two_gaussians():
    # N(0, I) against N(m, 4 I) in d dims: |m|^2 + tr(I + 4 I - 2 (4 I)^(1/2)) = |m|^2 + d
    rng = np.random.default_rng(0)
    d, n = 8, 200_000
    m = np.full(d, 0.5)
    a = rng.normal(size=(n, d))
    b = m + 2.0 * rng.normal(size=(n, d))
    assert abs(_frechet()(a, b) - (float(m @ m) + d)) < 0.1
    assert abs(_frechet()(a, a)) < 1e-9


def test_frechet_of_features_with_a_dead_unit_is_finite_and_warns_nothing():
    rng = np.random.default_rng(1)
    a = np.maximum(rng.normal(size=(500, 16)), 0.0)
    b = np.maximum(rng.normal(0.2, 1.0, size=(500, 16)), 0.0)
    a[:, :3] = 0.0  # features that are always 0: both covariances singular
    b[:, :3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = _frechet()(a, b)
    assert np.isfinite(f) and f > 0
    # the same as dropping the dead features, which carry no distance
    assert abs(f - _frechet()(a[:, 3:], b[:, 3:])) < 1e-9
