"""guidance.sample against the exact flow of a Gaussian mixture (float64 throughout).

Distribution checks use the energy distance (cspace.models.metrics) at n = 2000. Its sampling noise is
large (for two exact sets the value varies by ~3x between seeds), so the baseline is the mean
over four pairs of exact sets, and a sampler's value is its mean distance to four exact sets:
for exact samples the ratio of the two lies between ~0.8 and ~2.4; the bound is 2.5x. All seeds
are fixed; deliberately wrong velocities exceed the bound by 3x or more.
"""

from __future__ import annotations

import pytest
import torch

from cspace.models.metrics import energy_distance
from cspace.models.toy import GaussianMixture, default_toy
from guidance import Backtrack, Guided, RepulsiveField, sample, time_grid
from obstacles import ObstacleSet

F64 = torch.float64
N = 2000
BOUND = 2.5


@pytest.fixture(scope="module")
def toy():
    mix, balls = default_toy()
    obs = ObstacleSet.from_embeddings(
        balls.centers.numpy(),
        q_star=(1.5 * balls.radii).numpy(),
        eta=1.0,
        radius=balls.radii.numpy(),
    )
    return mix, balls, RepulsiveField(obs)


def _noise(seed: int, n: int = N, d: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_sets(mix: GaussianMixture, seed: int, t: float = 0.0) -> list[torch.Tensor]:
    """Eight independent exact sample sets of x_t = (1 - t) x0 + t eps."""
    g = _gen(seed)
    out = []
    for _ in range(8):
        x0 = mix.sample(N, g)
        out.append((1 - t) * x0 + t * torch.randn(N, mix.dim, generator=g, dtype=F64))
    return out


def _ed_ratio(x: torch.Tensor, refs: list[torch.Tensor]) -> float:
    baseline = sum(energy_distance(refs[2 * i], refs[2 * i + 1]) for i in range(4)) / 4
    value = sum(energy_distance(x, refs[2 * i]) for i in range(4)) / 4
    return value / baseline


@pytest.fixture(scope="module")
def exact0(toy):
    return _exact_sets(toy[0], seed=1000)


def _hit_rate(balls, x) -> float:
    return float(balls.inside(x).double().mean())


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, steps, noise_scale",
    [("euler", 200, 1.0), ("heun", 50, 1.0), ("sde", 300, 1.0), ("sde", 300, 0.5)],
)
def test_samplers_reproduce_the_exact_mixture(toy, exact0, method, steps, noise_scale):
    mix = toy[0]
    out = sample(
        mix.velocity,
        _noise(1),
        steps=steps,
        method=method,
        noise_scale=noise_scale,
        generator=_gen(101),
    )
    assert out.samples.shape == (N, 2) and out.samples.dtype == F64
    assert _ed_ratio(out.samples, exact0) < BOUND


def test_wrong_velocity_fails_the_same_bound(toy, exact0):
    mix = toy[0]
    wrong = GaussianMixture(mix.means + 0.3, mix.stds)  # every mode shifted by 0.3 (std 0.35)
    out = sample(wrong.velocity, _noise(1), steps=200, method="euler")
    assert _ed_ratio(out.samples, exact0) > BOUND


def test_sde_preserves_the_marginal_at_an_intermediate_time(toy):
    mix = toy[0]
    times = torch.linspace(1, 0.5, 151)
    out = sample(mix.velocity, _noise(1), times=times, method="sde", generator=_gen(201))
    assert torch.equal(out.times, times.to(F64))
    assert _ed_ratio(out.samples, _exact_sets(mix, seed=2000, t=0.5)) < BOUND
    # the same statistic tells x_0.5 from x_0.4
    assert _ed_ratio(out.samples, _exact_sets(mix, seed=3000, t=0.4)) > BOUND


def test_integrators_on_a_linear_ode():
    """v(x, t) = c x: Euler multiplies by (1 - c h), Heun by (1 - c h + (c h)^2 / 2) per step."""
    c = 0.7
    noise = torch.randn(6, 2, 3, generator=_gen(3), dtype=F64)
    times = torch.tensor([1.0, 0.9, 0.65, 0.3, 0.05, 0.0], dtype=F64)
    h = times[:-1] - times[1:]
    euler = sample(lambda x, t: c * x, noise, method="euler", times=times)
    heun = sample(lambda x, t: c * x, noise, method="heun", times=times)
    assert euler.samples.shape == (6, 2, 3)
    assert torch.allclose(euler.samples, noise * torch.prod(1 - c * h), rtol=1e-14, atol=0)
    assert torch.allclose(
        heun.samples, noise * torch.prod(1 - c * h + (c * h) ** 2 / 2), rtol=1e-14, atol=0
    )


def test_velocity_sees_per_sample_times_of_the_grid(toy):
    mix = toy[0]
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return mix.velocity(x, t)

    out = sample(velocity, _noise(4, n=7), steps=5, method="heun")
    grid = time_grid(5)
    assert torch.equal(out.times, grid)
    assert all(t.shape == (7,) and t.dtype == F64 for t in seen)
    # Heun evaluates at t_i and at t_{i+1}
    want = [grid[i // 2 + i % 2] for i in range(10)]
    assert all(bool((t == w).all()) for t, w in zip(seen, want, strict=True))


# ---------------------------------------------------------------------------------- identities
def test_sde_with_zero_noise_is_euler_bit_for_bit(toy):
    mix = toy[0]
    noise = _noise(5, n=500)
    euler = sample(mix.velocity, noise, steps=40, method="euler")
    sde = sample(mix.velocity, noise, steps=40, method="sde", noise_scale=0.0, generator=_gen(6))
    assert torch.equal(euler.samples, sde.samples)


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_zero_strength_and_far_field_change_nothing(toy, method):
    mix, _, field = toy
    noise = _noise(7, n=500)
    plain = sample(mix.velocity, noise, steps=30, method=method, generator=_gen(8))
    zero = sample(
        Guided(mix.velocity, field, strength=0.0), noise, steps=30, method=method, generator=_gen(8)
    )
    assert torch.equal(plain.samples, zero.samples)
    far = RepulsiveField(
        ObstacleSet.from_embeddings([[100.0, 100.0], [-80.0, 0.0]], q_star=1.0, radius=0.5)
    )
    guided = sample(
        Guided(mix.velocity, far, strength=5.0), noise, steps=30, method=method, generator=_gen(8)
    )
    assert torch.equal(plain.samples, guided.samples)
    assert guided.collided is not None and not bool(guided.collided.any())
    assert plain.collided is None
    # a zero weight switches guidance off too
    weighted = sample(
        Guided(mix.velocity, field, strength=3.0, weight=torch.zeros_like),
        noise,
        steps=30,
        method=method,
        generator=_gen(8),
    )
    assert torch.equal(plain.samples, weighted.samples)


# ---------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("method, per_step", [("euler", 1), ("heun", 2), ("sde", 1)])
def test_nfe_and_trajectory(toy, method, per_step):
    mix = toy[0]
    b, steps = 13, 17
    calls, rows = [], []

    def velocity(x, t):
        calls.append(1)
        rows.append(x.shape[0])
        return mix.velocity(x, t)

    noise = _noise(9, n=b)
    out = sample(
        velocity, noise, steps=steps, method=method, return_trajectory=True, generator=_gen(10)
    )
    assert out.nfe == b * steps * per_step == sum(rows)
    assert out.model_calls == steps * per_step == len(calls)
    assert out.nfe_per_sample == steps * per_step
    assert out.trajectory.shape == (steps + 1, b, 2)
    assert torch.equal(out.trajectory[0], noise)
    assert torch.equal(out.trajectory[-1], out.samples)
    assert out.retries.tolist() == [0] * b
    # the input noise is not modified in place
    assert torch.equal(noise, _noise(9, n=b))
    assert sample(mix.velocity, noise, steps=steps, method=method).trajectory is None


def test_callback_once_per_iteration(toy):
    mix = toy[0]
    infos = []
    noise = _noise(11, n=5)
    out = sample(
        mix.velocity, noise, steps=8, method="euler", callback=infos.append, return_trajectory=True
    )
    grid = time_grid(8)
    assert len(infos) == 8
    for i, info in enumerate(infos):
        assert set(info) == {"step", "t", "x", "x0_hat", "index"}
        assert info["step"] == i
        assert bool((info["t"] == grid[i]).all()) and info["t"].shape == (5,)
        assert torch.equal(info["index"], torch.arange(5))
        assert torch.equal(info["x"], out.trajectory[i + 1])
        xi = out.trajectory[i]
        want_x0 = xi - grid[i] * mix.velocity(xi, grid[i].expand(5))
        assert torch.allclose(info["x0_hat"], want_x0, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------- guidance
def test_guidance_avoids_the_obstacles(toy):
    mix, balls, field = toy
    noise = _noise(12)
    plain = sample(mix.velocity, noise, steps=50, method="euler")
    guided = sample(Guided(mix.velocity, field, strength=3.0), noise, steps=50, method="euler")
    assert _hit_rate(balls, plain.samples) > 0.20
    assert _hit_rate(balls, guided.samples) <= 0.01
    assert float(guided.collided.double().mean()) <= 0.01
    assert bool(torch.isfinite(guided.samples).all())
    # pushed out of the balls, not flung away: the samples stay near the circle of modes, and
    # are closer to the exact obstacle-free distribution than the unguided ones
    assert float(guided.samples.norm(dim=1).max()) < 6.0
    target = mix.sample_outside(N, balls, _gen(15))
    assert energy_distance(guided.samples, target) < energy_distance(plain.samples, target)
    # guidance only in the noisy half of the path is weaker and gives another result
    late = sample(
        Guided(mix.velocity, field, strength=3.0, window=(0.5, 1.0)),
        noise,
        steps=50,
        method="euler",
    )
    assert not torch.equal(late.samples, guided.samples)
    assert _hit_rate(balls, late.samples) > _hit_rate(balls, guided.samples)
    noisy = sample(
        Guided(mix.velocity, field, strength=3.0, mode="noisy"), noise, steps=50, method="euler"
    )
    assert noisy.samples.shape == (N, 2) and bool(torch.isfinite(noisy.samples).all())
    assert not torch.equal(noisy.samples, guided.samples)


@pytest.mark.slow
def test_backtracking_avoids_the_obstacles(toy):
    mix, balls, field = toy
    noise, steps = _noise(13), 50
    iters = []

    def count(info):
        iters.append(info["index"].numel())

    plain = sample(mix.velocity, noise, steps=steps, method="sde", generator=_gen(14))
    bt = sample(
        mix.velocity,
        noise,
        steps=steps,
        method="sde",
        backtrack=Backtrack(revert=20, max_retries=20, field=field),
        generator=_gen(14),
        callback=count,
        return_trajectory=True,
    )
    assert _hit_rate(balls, plain.samples) > 0.20
    assert _hit_rate(balls, bt.samples) < 0.02
    assert int(bt.retries.sum()) > 0 and int(bt.retries.max()) <= 20
    assert bt.nfe > N * steps
    assert bt.nfe == sum(iters)  # every evaluated state is counted once
    assert bt.model_calls == len(iters)
    assert torch.equal(bt.trajectory[-1], bt.samples) and torch.equal(bt.trajectory[0], noise)
    target = mix.sample_outside(N, balls, _gen(15))
    assert energy_distance(bt.samples, target) < 0.5 * energy_distance(plain.samples, target)


def test_backtracking_needs_sde_and_a_field(toy):
    mix, _, field = toy
    noise = _noise(16, n=10)
    guided = Guided(mix.velocity, field)
    for method in ("euler", "heun"):
        with pytest.raises(ValueError, match="sde"):
            sample(guided, noise, method=method, backtrack=Backtrack())
        with pytest.raises(ValueError, match="sde"):
            sample(mix.velocity, noise, method=method, backtrack=Backtrack(field=field))
    with pytest.raises(ValueError, match="noise_scale"):
        sample(guided, noise, method="sde", noise_scale=0.0, backtrack=Backtrack())
    with pytest.raises(ValueError, match=r"field.*Backtrack\(field=\.\.\.\) or a Guided"):
        sample(mix.velocity, noise, method="sde", backtrack=Backtrack())
    with pytest.raises(ValueError):
        Backtrack(revert=0)
    with pytest.raises(ValueError):
        Backtrack(max_retries=-1)
    with pytest.raises(ValueError, match="window"):
        Backtrack(window=(0.7, 0.2))
    with pytest.raises(TypeError, match="evaluate"):
        Backtrack(field=object())


# ---------------------------------------------------------------------------------- bad input
def _vel(x, t):
    return -x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"velocity": lambda x, t: x[:, :1]}, "shape"),
        ({"velocity": lambda x, t: x.sum(1)}, "shape"),
        ({"velocity": lambda x, t: x.tolist()}, "velocity returned"),
        ({"velocity": lambda x, t: torch.full_like(x, float("nan"))}, "NaN"),
        ({"velocity": lambda x, t: torch.where(t[:, None] < 0.5, torch.inf, x)}, "NaN or Inf"),
        ({"method": "rk4"}, "method"),
        ({"mode": "dirty"}, "mode"),
        ({"strength": -1.0}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"noise_scale": -0.5}, "noise_scale"),
        ({"window": (0.8, 0.2)}, "window"),
        ({"window": (-0.1, 0.5)}, "window"),
        ({"window": (0.2, 1.5)}, "window"),
        ({"steps": 0}, "steps"),
        ({"times": torch.tensor([1.0, 0.5, 0.6, 0.0])}, "decreasing"),
        ({"times": torch.tensor([1.0, 1.0, 0.0])}, "decreasing"),
        ({"times": torch.tensor([1.0])}, "times"),
        ({"times": torch.tensor([1.5, 0.5, 0.0])}, r"\[0, 1\]"),
    ],
)
def test_bad_input_raises_value_error(toy, kwargs, match):
    kwargs = dict(kwargs)
    velocity = kwargs.pop("velocity", _vel)
    guide = {k: kwargs.pop(k) for k in ("mode", "strength", "window") if k in kwargs}
    with pytest.raises(ValueError, match=match):
        if guide:  # the guidance settings are the Guided velocity's, checked when it is built
            velocity = Guided(velocity, toy[2], **guide)
        sample(velocity, _noise(17, n=4), steps=kwargs.pop("steps", 5), **kwargs)


@pytest.mark.parametrize(
    "noise, match",
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]], dtype=F64), "NaN"),
        (torch.tensor([[0.0, float("inf")]], dtype=F64), "Inf"),
        (torch.zeros(0, 2, dtype=F64), "batch"),
        (torch.zeros(3, 2, dtype=torch.long), "floating"),
        (torch.tensor(1.0, dtype=F64), "floating"),
    ],
)
def test_bad_noise_raises_value_error(noise, match):
    with pytest.raises(ValueError, match=match):
        sample(_vel, noise, steps=3)
