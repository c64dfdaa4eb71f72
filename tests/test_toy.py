"""The exact Gaussian-mixture flow of cspace.models.toy against independent references.

Convention: t = 1 noise, t = 0 data, x_t = (1 - t) x0 + t eps, v = eps - x0.
Every reference here is derived in the test itself (Gaussian conditioning with matrices,
numerical quadrature over x0, autograd), never copied from cspace.models.toy.
"""

from __future__ import annotations

import math

import pytest
import torch

from cspace.models.toy import BallObstacles, GaussianMixture, default_toy

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a w.r.t. b, in norm over the whole tensor."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _mixture_1d() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([[-2.0], [0.5], [3.0]], dtype=F64),
        torch.tensor([0.3, 1.0, 0.6], dtype=F64),
        torch.tensor([0.2, 0.5, 0.3], dtype=F64),
    )


def _mixture_2d() -> GaussianMixture:
    # unequal stds in d = 2: the responsibilities depend on the d-dependent normaliser
    return GaussianMixture(
        torch.tensor([[-1.5, 0.5], [1.0, -1.0], [0.5, 2.0]], dtype=F64),
        torch.tensor([0.4, 0.8, 0.25], dtype=F64),
        torch.tensor([0.5, 0.3, 0.2], dtype=F64),
    )


def _log_p0(x0: torch.Tensor, means, stds, weights) -> torch.Tensor:
    """Independent mixture log density at points x0 (M, d)."""
    d = x0.shape[1]
    sq = ((x0[:, None, :] - means[None]) ** 2).sum(-1)  # (M, K)
    logn = -0.5 * sq / stds**2 - d * torch.log(stds) - 0.5 * d * math.log(2 * math.pi)
    return torch.logsumexp(torch.log(weights) + logn, dim=1)


def _posterior_velocity_quadrature(mix, x, t, grid):
    """v(x, t) = E[eps - x0 | x_t = x] by quadrature over x0 on ``grid`` (M, d).

    Given x0 and x_t = x, eps = (x - a x0)/t, so eps - x0 = (x - x0)/t (a + t = 1). The posterior
    of x0 is p0(x0) N(x; a x0, t^2 I) up to a constant; the cell volume cancels.
    """
    a = 1 - t
    logp0 = _log_p0(grid, mix.means, mix.stds, mix.weights)  # (M,)
    sq = ((x[:, None, :] - a * grid[None]) ** 2).sum(-1)  # (B, M)
    logw = logp0[None] - 0.5 * sq / t**2
    w = torch.softmax(logw, dim=1)  # (B, M)
    ex0 = w @ grid  # (B, d)
    return (x - ex0) / t


# ---------------------------------------------------------------------------------- velocity
@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("d", [1, 3])
def test_velocity_single_gaussian_matches_gaussian_conditioning(t, d):
    """K = 1: v = E[eps - x0 | x_t] from the joint Gaussian of (x_t, eps - x0), with matrices."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(d, generator=g, dtype=F64) * 2
    s = 0.7
    mix = GaussianMixture(mu[None], s)
    a = 1 - t
    eye = torch.eye(d, dtype=F64)
    # z = (x0, eps) ~ N((mu, 0), diag(s^2 I, I)); y = (x_t, eps - x0) = L z
    mean_z = torch.cat([mu, torch.zeros(d, dtype=F64)])
    cov_z = torch.block_diag(s**2 * eye, eye)
    lin = torch.cat([torch.cat([a * eye, t * eye], 1), torch.cat([-eye, eye], 1)], 0)
    mean_y, cov_y = lin @ mean_z, lin @ cov_z @ lin.T
    c_xx, c_vx = cov_y[:d, :d], cov_y[d:, :d]
    x = torch.randn(9, d, generator=g, dtype=F64) * 3
    want = mean_y[d:] + torch.linalg.solve(c_xx, (x - mean_y[:d]).T).T @ c_vx.T
    if t == 0.0:  # x_t = x0: v = E[eps] - x0 = -x
        assert _rel(want, -x) < 1e-12
    got = mix.velocity(x, t)
    assert got.shape == x.shape and got.dtype == F64
    assert _rel(got, want) < 1e-12


@pytest.mark.parametrize("t", [0.02, 0.1, 0.4, 0.8, 1.0])
def test_velocity_mixture_1d_matches_posterior_quadrature(t):
    mix = _mixture_1d()
    # the posterior of x0 has width ~ t / (1 - t) >= 0.02: a 1e-3 grid resolves it, and the
    # range covers the prior's tails to far below float64 precision
    grid = torch.arange(-14.0, 14.0, 1e-3, dtype=F64)[:, None]
    x = torch.linspace(-4, 5, 41, dtype=F64)[:, None]
    want = _posterior_velocity_quadrature(mix, x, t, grid)
    got = mix.velocity(x, t)
    assert got.shape == x.shape
    assert float((got - want).abs().max()) < 1e-10


@pytest.mark.parametrize("t", [0.25, 0.6, 0.95])
def test_velocity_mixture_2d_matches_posterior_quadrature(t):
    mix = _mixture_2d()
    ax = torch.arange(-8.0, 9.0, 0.03, dtype=F64)
    grid = torch.cartesian_prod(ax, ax)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 2, generator=g, dtype=F64) * 1.5
    want = _posterior_velocity_quadrature(mix, x, t, grid)
    got = mix.velocity(x, t)
    assert float((got - want).abs().max()) < 1e-10


def test_velocity_per_sample_times_match_scalar_times():
    mix = _mixture_2d()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    ts = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    v = mix.velocity(x, ts)
    for i, t in enumerate(ts.tolist()):
        assert torch.allclose(v[i], mix.velocity(x[i : i + 1], t)[0], rtol=0, atol=1e-14)


def test_velocity_at_t1_is_x_minus_data_mean():
    # at t = 1, x_1 = eps independent of x0: v = x - E[x0]
    mix = _mixture_2d()
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    want = x - (mix.weights[:, None] * mix.means).sum(0)
    assert _rel(mix.velocity(x, 1.0), want) < 1e-14


# ---------------------------------------------------------------------------------- score
@pytest.mark.parametrize("t", [1e-3, 0.05, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("which", ["1d", "2d", "toy"])
def test_score_equals_minus_eps_hat_over_t(t, which):
    mix = {"1d": _mixture_1d, "2d": _mixture_2d, "toy": lambda: default_toy()[0]}[which]()
    g = torch.Generator().manual_seed(4)
    # states drawn from p_t itself, where the identity matters
    x = (1 - t) * mix.sample(400, g) + t * torch.randn(400, mix.dim, generator=g, dtype=F64)
    score = mix.score(x, t)
    want = -(x + (1 - t) * mix.velocity(x, t)) / t
    assert _rel(score, want) < 1e-10


@pytest.mark.parametrize("t", [0.0, 0.01, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("which", ["1d", "2d", "toy"])
def test_score_equals_autograd_of_log_prob(t, which):
    mix = {"1d": _mixture_1d, "2d": _mixture_2d, "toy": lambda: default_toy(dim=3)[0]}[which]()
    g = torch.Generator().manual_seed(5)
    x = (1 - t) * mix.sample(200, g) + max(t, 0.1) * torch.randn(
        200, mix.dim, generator=g, dtype=F64
    )
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(xr, t).sum(), xr)
    assert _rel(mix.score(x, t), grad) < 1e-10


# ---------------------------------------------------------------------------------- log_prob
@pytest.mark.parametrize("t", [0.0, 0.5])
def test_log_prob_integrates_to_one_1d(t):
    mix = _mixture_1d()
    dx = 1e-3
    x = torch.arange(-12.0, 12.0, dx, dtype=F64)[:, None]
    total = float(mix.log_prob(x, t).exp().sum() * dx)
    assert abs(total - 1) < 1e-8


@pytest.mark.parametrize("which", ["2d", "toy"])
def test_log_prob_integrates_to_one_2d(which):
    mix = _mixture_2d() if which == "2d" else default_toy()[0]
    dx = 0.02
    ax = torch.arange(-7.0, 7.0, dx, dtype=F64)
    x = torch.cartesian_prod(ax, ax)
    total = float(mix.log_prob(x, 0.0).exp().sum() * dx * dx)
    assert abs(total - 1) < 1e-6


def test_log_prob_at_t0_matches_independent_density():
    mix = _mixture_2d()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(6), dtype=F64) * 2
    want = _log_p0(x, mix.means, mix.stds, mix.weights)
    assert _rel(mix.log_prob(x, 0.0), want) < 1e-13
    assert _rel(mix.log_prob(x), want) < 1e-13  # t defaults to 0


@pytest.mark.parametrize("d", [1, 2, 5])
def test_log_prob_at_t1_is_standard_normal(d):
    mix = GaussianMixture(
        torch.randn(4, d, generator=torch.Generator().manual_seed(7), dtype=F64) * 3, 0.4
    )
    x = torch.randn(30, d, generator=torch.Generator().manual_seed(8), dtype=F64) * 2
    want = -0.5 * (x**2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    assert float((mix.log_prob(x, 1.0) - want).abs().max()) < 1e-12


# ---------------------------------------------------------------------------------- sampling
def test_sample_mean_and_covariance():
    mix = _mixture_2d()
    n = 200_000
    x = mix.sample(n, torch.Generator().manual_seed(9))
    assert x.shape == (n, 2) and x.dtype == F64
    w, mu, s2 = mix.weights, mix.means, mix.stds**2
    mean = (w[:, None] * mu).sum(0)
    cov = (w * s2).sum() * torch.eye(2, dtype=F64) + (
        w[:, None, None] * mu[:, :, None] * mu[:, None, :]
    ).sum(0)
    cov = cov - mean[:, None] * mean[None, :]
    # standard errors are about sqrt(var / n) < 0.004; the tolerances are ~5x that
    assert float((x.mean(0) - mean).abs().max()) < 0.02
    assert float((torch.cov(x.T) - cov).abs().max()) < 0.03
    # and it is reproducible with a seeded generator
    assert torch.equal(x, mix.sample(n, torch.Generator().manual_seed(9)))


def test_sample_component_frequencies():
    mix = _mixture_1d()
    x = mix.sample(100_000, torch.Generator().manual_seed(10))[:, 0]
    # the three components are well separated at these cut points
    frac_left = float((x < -1.0).double().mean())
    # mass of each component left of -1 (Gaussian CDFs, computed with erf)
    cdf = [
        0.5 * (1 + math.erf((-1.0 - m) / (s * math.sqrt(2))))
        for m, s in [(-2, 0.3), (0.5, 1.0), (3, 0.6)]
    ]
    want = 0.2 * cdf[0] + 0.5 * cdf[1] + 0.3 * cdf[2]
    assert abs(frac_left - want) < 0.006


def test_sample_outside_is_exact_rejection():
    mix, balls = default_toy()
    drawn = []
    original = mix.sample

    def recording_sample(n, generator=None):
        x = original(n, generator)
        drawn.append(x)
        return x

    mix.sample = recording_sample  # instance attribute: sample_outside calls self.sample
    n = 50_000
    out = mix.sample_outside(n, balls, torch.Generator().manual_seed(11))
    del mix.sample
    assert out.shape == (n, 2)
    assert not bool(balls.inside(out).any())
    allx = torch.cat(drawn)
    keep = ~balls.inside(allx)
    # exactly the first n accepted proposals, in order (no selection beyond the rejection rule)
    assert torch.equal(out, allx[keep][:n])
    acceptance = float(keep.double().mean())
    mass_in = mix.mass_inside(balls)
    # binomial standard error of the acceptance over >= 1e5 draws is ~1.4e-3
    assert allx.shape[0] >= 100_000
    assert abs(acceptance - (1 - mass_in)) < 0.01


def test_sample_outside_raises_when_obstacles_cover_everything():
    mix = GaussianMixture(torch.zeros(1, 2, dtype=F64), 0.1)
    balls = BallObstacles(torch.zeros(1, 2, dtype=F64), torch.tensor([100.0], dtype=F64))
    with pytest.raises(RuntimeError, match="max_draws"):
        mix.sample_outside(10, balls, max_draws=10_000)


# ---------------------------------------------------------------------------------- default toy
def test_default_toy_2d_mass_inside():
    mix, balls = default_toy()
    assert mix.dim == 2 and mix.means.shape == (8, 2) and mix.means.dtype == F64
    assert torch.allclose(mix.means.norm(dim=1), torch.full((8,), 4.0, dtype=F64))
    assert balls.centers.shape == (3, 2) and balls.radii.shape == (3,)
    mass_mc = mix.mass_inside(balls)
    assert 0.22 <= mass_mc <= 0.28
    # independent check by quadrature of the density over the balls
    dx = 0.01
    ax = torch.arange(-6.0, 6.0, dx, dtype=F64) + dx / 2
    x = torch.cartesian_prod(ax, ax)
    mass_q = float((mix.log_prob(x).exp() * balls.inside(x)).sum() * dx * dx)
    assert 0.22 <= mass_q <= 0.28
    assert abs(mass_mc - mass_q) < 0.005


def test_default_toy_ball_radius_holds_997_permille_of_a_mode():
    # in 2-D, |x - mu|^2 / s^2 is chi-square with 2 dof: P(|x - mu| < r) = 1 - exp(-r^2 / 2 s^2)
    mix, balls = default_toy()
    s = float(mix.stds[0])
    held = 1 - math.exp(-(float(balls.radii[0]) ** 2) / (2 * s**2))
    assert 0.996 < held < 0.998
    assert float(balls.radii[2]) == pytest.approx(float(balls.radii[0]) / 2)
    assert torch.allclose(balls.centers[:2], mix.means[[0, 3]])
    # the small ball sits on the circle midway between modes 5 and 6
    mid = mix.means[5] + mix.means[6]
    assert torch.allclose(balls.centers[2], 4 * mid / mid.norm())


def test_default_toy_dim8():
    mix, balls = default_toy(dim=8)
    assert mix.dim == 8 and balls.centers.shape == (3, 8)
    assert bool((mix.means[:, 2:] == 0).all())
    x = mix.sample(500, torch.Generator().manual_seed(12))
    v = mix.velocity(x, 0.5)
    assert v.shape == (500, 8) and bool(torch.isfinite(v).all())
    assert 0.22 <= mix.mass_inside(balls, n=50_000) <= 0.28


def test_default_toy_float32():
    mix, balls = default_toy(dtype=torch.float32)
    assert mix.means.dtype == torch.float32 and balls.radii.dtype == torch.float32
    x = mix.sample(10, torch.Generator().manual_seed(13))
    assert mix.velocity(x, 0.3).dtype == torch.float32


@pytest.mark.parametrize("dim", [1, 0, -3])
def test_default_toy_rejects_small_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        default_toy(dim=dim)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 2), 0.0), "stds"),
        ((torch.zeros(2, 2), -1.0), "stds"),
        ((torch.zeros(2, 2), torch.tensor([1.0, 0.0])), "stds"),
        ((torch.zeros(2, 2), torch.tensor([1.0, float("nan")])), "stds"),
        ((torch.zeros(2), 1.0), "means"),
        ((torch.zeros(0, 2), 1.0), "means"),
        ((torch.zeros(2, 2, 2), 1.0), "means"),
        ((torch.zeros(2, 2), torch.tensor([1.0, 1.0, 1.0])), "shape"),
        ((torch.zeros(2, 2), 1.0, torch.tensor([1.0])), "shape"),
        ((torch.zeros(2, 2), 1.0, torch.tensor([-1.0, 2.0])), "weights"),
        ((torch.zeros(2, 2), 1.0, torch.tensor([0.0, 0.0])), "weights"),
    ],
)
def test_gaussian_mixture_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(*args)


@pytest.mark.parametrize(
    "centers, radii",
    [
        (torch.zeros(2), torch.ones(2)),
        (torch.zeros(2, 2), torch.ones(3)),
        (torch.zeros(2, 2), torch.tensor([1.0, 0.0])),
        (torch.zeros(2, 2), torch.tensor([1.0, -1.0])),
    ],
)
def test_ball_obstacles_reject_bad_input(centers, radii):
    with pytest.raises(ValueError):
        BallObstacles(centers, radii)


def test_ball_obstacles_inside_is_strict():
    balls = BallObstacles(torch.zeros(1, 2, dtype=F64), torch.tensor([1.0], dtype=F64))
    x = torch.tensor([[0.0, 0.0], [0.999, 0.0], [1.0, 0.0], [0.0, -1.5]], dtype=F64)
    assert balls.inside(x).tolist() == [True, True, False, False]


def test_state_dimension_mismatch_raises():
    """States whose last dimension is not the mixture's d must be rejected, not broadcast.

    (4, 1) states on a 2-D mixture otherwise broadcast against the (K, 2) means and come back as
    a (4, 2) velocity without any error; (4, 3) states raise a RuntimeError from broadcasting.
    """
    mix = _mixture_2d()
    for shape in [(4, 1), (4, 3), (4,)]:
        x = torch.zeros(shape, dtype=F64)
        for method in (mix.velocity, mix.score, mix.log_prob):
            with pytest.raises(ValueError):
                method(x, 0.5)
