"""guidance.RepulsiveField against an independent potential, on adversarial inputs, and its bounds.

The reference potential here is written from the formula alone,

    U(x) = sum_j 1/2 eta_j (1/D_j - 1/Q_j)^2 for D_j = |x - o_j| <= Q_j, else 0,

and the reference force is ``-grad U`` by torch autograd. Obstacle embeddings are stored in
float32 by ObstacleSet, so every test builds obstacles from values that float32 holds exactly
(or reads them back from the set) before comparing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidance import RepulsiveField, safe_norm
from obstacles import ObstacleSet

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]


def _set(emb, q_star, eta=1.0, radius=0.0) -> ObstacleSet:
    return ObstacleSet.from_embeddings(np.asarray(emb), q_star=q_star, eta=eta, radius=radius)


def _ref_potential(x: torch.Tensor, obs: ObstacleSet) -> torch.Tensor:
    """Independent U(x) for x (B, d) float64, differentiable."""
    o = torch.from_numpy(obs.embeddings.astype(np.float64))
    q = torch.from_numpy(obs.q_star)
    eta = torch.from_numpy(obs.eta)
    dist = ((x[:, None, :] - o[None]) ** 2).sum(-1).sqrt()  # (B, N)
    pair = 0.5 * eta * (1 / dist - 1 / q) ** 2
    return torch.where(dist <= q, pair, torch.zeros_like(pair)).sum(1)


def _ref_force(x: torch.Tensor, obs: ObstacleSet, projection=None) -> torch.Tensor:
    xr = x.detach().clone().requires_grad_(True)
    emb = xr if projection is None else projection(xr)
    (grad,) = torch.autograd.grad(_ref_potential(emb, obs).sum(), xr)
    return -grad


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Row norms in float64 without overflow."""
    return safe_norm(v.reshape(v.shape[0], -1).to(F64))


def _all_finite(out) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for v in (out.potential, out.force, out.nearest, out.clearance)
    )


def _clustered_problem(seed: int = 0, d: int = 4, n_obs: int = 8):
    """Obstacles in two clusters with per-obstacle Q* and eta, and states among them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * d, [3.0] + [0.0] * (d - 1)], dtype=F64)
    which = torch.arange(n_obs) % 2
    emb = (centres[which] + 0.6 * torch.randn(n_obs, d, generator=g, dtype=F64)).float().double()
    q = 1.0 + torch.rand(n_obs, generator=g, dtype=F64)
    eta = 0.5 + 2.5 * torch.rand(n_obs, generator=g, dtype=F64)
    obs = _set(emb.numpy(), q.numpy(), eta.numpy())
    x = centres[torch.arange(400) % 2] + 0.8 * torch.randn(400, d, generator=g, dtype=F64)
    return obs, x, emb, q, eta


# ---------------------------------------------------------------------------------- exactness
def test_force_is_minus_gradient_of_independent_potential():
    obs, x, emb, q, _ = _clustered_problem()
    field = RepulsiveField(obs)
    dist = torch.cdist(x, emb, compute_mode="donot_use_mm_for_euclid_dist")
    # above the clamp everywhere, away from the kink of U at D = Q, at least two active obstacles
    ok = (dist > 2 * field.rho_min * q).all(1) & ((dist - q).abs() > 1e-6).all(1)
    ok &= (dist < q).sum(1) >= 2
    x = x[ok]
    assert x.shape[0] >= 50
    want = _ref_force(x, obs)
    assert bool((_norms(want) < field.max_force).all())  # the cap is not what is tested here
    got = field.force(x)
    assert got.dtype == F64 and got.shape == x.shape
    rel = _norms(got - want) / _norms(want)
    assert float(rel.max()) < 1e-8
    # and the potential agrees with the independent one
    pot = field.potential(x)
    assert float(((pot - _ref_potential(x, obs)).abs() / pot).max()) < 1e-12


def test_potential_matches_closed_form_sum():
    obs, x, emb, q, eta = _clustered_problem(seed=1, d=3, n_obs=6)
    field = RepulsiveField(obs)
    out = field.evaluate(x)
    e, qq, ee = emb.numpy(), q.numpy(), eta.numpy()
    for i in range(0, x.shape[0], 7):
        total, active = 0.0, 0
        for j in range(e.shape[0]):
            dj = math.sqrt(sum((float(x[i, k]) - float(e[j, k])) ** 2 for k in range(3)))
            if dj <= qq[j]:
                dj_eff = max(dj, field.rho_min * qq[j])
                total += 0.5 * ee[j] * (1 / dj_eff - 1 / qq[j]) ** 2
                active += 1
        assert float(out.potential[i]) == pytest.approx(total, rel=1e-12, abs=1e-300)
        assert int(out.active[i]) == active


def test_zero_beyond_every_q_star():
    obs = _set([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]], q_star=[1.0, 0.5, 2.0], eta=[1.0, 3.0, 0.5])
    field = RepulsiveField(obs)
    x = torch.tensor([[1.2, 0.0], [2.0, 0.6], [-3.0, -3.0], [0.0, 2.9], [100.0, 100.0]], dtype=F64)
    out = field.evaluate(x)
    assert bool((out.potential == 0).all())
    assert bool((out.force == 0).all())
    assert bool((out.active == 0).all())
    # but not zero just inside one Q*
    inside = field.evaluate(torch.tensor([[0.9, 0.0]], dtype=F64))
    assert float(inside.potential[0]) > 0 and float(_norms(inside.force)[0]) > 0


def test_potential_and_force_continuous_at_q_star():
    q, eta = 1.5, 2.0
    field = RepulsiveField(_set([[0.0, 0.0]], q_star=q, eta=eta))
    deltas = torch.tensor([1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8], dtype=F64)
    x = torch.stack([q * (1 - deltas), torch.zeros_like(deltas)], 1)
    out = field.evaluate(x)
    pot, fn = out.potential, _norms(out.force)
    assert bool((pot > 0).all()) and bool((pot[1:] < pot[:-1]).all())
    assert bool((fn[1:] < fn[:-1]).all())
    # U ~ eta/2 (delta/Q)^2 and |F| ~ eta delta / Q^2 as D -> Q from inside: both go to 0
    assert bool((pot <= eta * (deltas / q) ** 2).all())
    assert bool((fn <= 2 * eta * deltas / q**2).all())
    assert float(pot[-1]) < 1e-15 and float(fn[-1]) < 1e-7
    outside = field.evaluate(torch.tensor([[q * (1 + 1e-8), 0.0]], dtype=F64))
    assert float(outside.potential[0]) == 0.0


def test_clamp_below_min_distance_ratio():
    q, eta = 2.0, 1.0
    field = RepulsiveField(_set([[0.0, 0.0, 0.0]], q_star=q, eta=eta), min_distance_ratio=0.1)
    x = torch.tensor([[0.2, 0, 0], [0.1, 0, 0], [0, 0.01, 0], [0, 0, 0]], dtype=F64)
    out = field.evaluate(x)
    d_eff = 0.1 * q
    u_clamp = 0.5 * eta * (1 / d_eff - 1 / q) ** 2
    f_clamp = eta * (1 / d_eff - 1 / q) / d_eff**2
    assert out.potential.tolist() == pytest.approx([u_clamp] * 4, rel=1e-13)
    assert _norms(out.force).tolist() == pytest.approx([f_clamp] * 4, rel=1e-13)
    assert field.max_force == pytest.approx(f_clamp, rel=1e-13)
    # the direction stays (x - o)/D; at D = 0 it is (1, ..., 1)/sqrt(d)
    assert torch.allclose(out.force[2] / f_clamp, torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    assert torch.allclose(out.force[3] / f_clamp, torch.full((3,), 3**-0.5, dtype=F64))


def test_clearance_nearest_and_collided():
    obs = _set([[0.0, 0.0], [4.0, 0.0]], q_star=2.0, radius=[1.0, 0.5])
    out = RepulsiveField(obs).evaluate(
        torch.tensor([[0.5, 0.0], [3.0, 0.0], [2.0, 0.0]], dtype=F64)
    )
    assert out.nearest.tolist() == pytest.approx([0.5, 1.0, 2.0])
    assert out.clearance.tolist() == pytest.approx([-0.5, 0.5, 1.0])
    assert out.collided.tolist() == [True, False, False]


def test_noised_obstacles_at_time_t():
    emb = [[2.0, -4.0], [0.5, 1.0]]
    obs = _set(emb, q_star=1.5, eta=[1.0, 2.0])
    half = _set(np.asarray(emb) * 0.5, q_star=1.5, eta=[1.0, 2.0])  # exact in float32
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    got = RepulsiveField(obs).evaluate(x, 0.5)
    want = RepulsiveField(half).evaluate(x)
    assert torch.equal(got.force, want.force) and torch.equal(got.potential, want.potential)
    per_sample = RepulsiveField(obs).evaluate(x, torch.full((30,), 0.5, dtype=F64))
    assert torch.equal(per_sample.force, got.force)
    # t = 0 is the obstacles themselves
    assert torch.equal(RepulsiveField(obs).force(x, 0.0), RepulsiveField(obs).force(x))


def test_chunking_does_not_change_results():
    obs, x, *_ = _clustered_problem(seed=2, d=3, n_obs=11)
    a = RepulsiveField(obs).evaluate(x)
    b = RepulsiveField(obs, chunk_elements=7).evaluate(x)  # one obstacle per chunk
    for name in ("potential", "force", "nearest", "clearance"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-13, atol=0), name
    assert torch.equal(a.active, b.active)


# ---------------------------------------------------------------------------------- adversarial
def _check_bounded(field, out, dtype):
    assert _all_finite(out)
    tol = 1 + 4 * float(torch.finfo(dtype).eps)  # the float64 cap rounded to the output dtype
    assert bool((_norms(out.force) <= field.max_force * tol).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_exactly_on_obstacle(dtype):
    obs = _set([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], q_star=0.5, eta=2.0)
    field = RepulsiveField(obs)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1e-30, 0, 0], [0.1, 0, 0]], dtype=dtype)
    out = field.evaluate(x)
    assert out.force.dtype == dtype and out.potential.dtype == dtype
    _check_bounded(field, out, dtype)
    fn = _norms(out.force)
    assert bool((fn > 0).all())
    assert float(fn[0]) == pytest.approx(field.max_force, rel=1e-6)
    assert out.nearest[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_obstacles(dtype):
    obs = _set([[0.0, 0.0]] * 5 + [[1.0, 1.0], [1.0, 1.0]], q_star=0.7, eta=1.0)
    field = RepulsiveField(obs)
    x = torch.tensor([[0.0, 0.0], [0.01, 0.0], [1.0, 1.0], [0.45, 0.45], [0.3, -0.1]], dtype=dtype)
    out = field.evaluate(x)
    _check_bounded(field, out, dtype)
    assert bool((_norms(out.force) > 0).all())
    assert out.active.tolist() == [5, 5, 2, 5, 5]
    # five copies push five times as hard as one (below the cap)
    single = RepulsiveField(_set([[0.0, 0.0]], q_star=0.7, eta=1.0), max_force=1e9).evaluate(x[3:])
    assert torch.allclose(out.force[3:].double(), 5 * single.force.double(), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_are_scale_invariant(dtype, scale):
    """With eta = s^3 the force of a configuration scaled by s is the unit-scale force."""
    base = np.array([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0]])
    q = np.array([1.0, 0.75, 1.5])
    x_unit = torch.tensor([[0.3, 0.1], [0.9, 0.4], [-0.25, 0.5], [0.0, 0.0], [5.0, 5.0]], dtype=F64)
    unit = RepulsiveField(_set(base, q)).evaluate(x_unit)
    obs = _set(base * scale, q * scale, eta=scale**3)
    field = RepulsiveField(obs)
    out = field.evaluate((x_unit * scale).to(dtype))
    _check_bounded(field, out, dtype)
    assert torch.allclose(
        out.force.to(F64), unit.force, rtol=1e-4, atol=1e-4 * float(_norms(unit.force).max())
    )
    assert torch.allclose(out.nearest.to(F64) / scale, unit.nearest, rtol=1e-5)
    assert float(_norms(out.force)[3]) > 0  # on an obstacle


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_with_unit_eta(dtype, scale):
    # tiny Q* (1e-30) with eta = 1 gives forces ~1e90: beyond float32, within float64
    obs = _set([[scale, scale], [-scale, 2 * scale]], q_star=scale, eta=1.0)
    field = RepulsiveField(obs)
    x = torch.tensor(
        [[scale, scale], [1.2 * scale, scale], [0.0, 0.0], [scale, -scale]], dtype=dtype
    )
    out = field.evaluate(x)
    _check_bounded(field, out, dtype)
    if scale < 1:
        assert float(_norms(out.force)[0]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_q_star_whose_force_overflows_float64(dtype):
    # eta / Q^3 = 1e900: the default cap is not representable; outputs must still be finite
    field = RepulsiveField(_set(np.zeros((3, 2)), q_star=1e-300))
    x = torch.tensor([[0.0, 0.0], [1e-301, 0.0], [1.0, 1.0]], dtype=dtype)
    out = field.evaluate(x)
    assert _all_finite(out)
    assert bool((_norms(out.force)[:2] > 0).all())


def test_float64_states_near_the_largest_values():
    obs = _set([[0.0, 0.0], [3e38, -3e38], [1.0, 1.0]], q_star=2.0, eta=1.0)
    field = RepulsiveField(obs)
    x = torch.tensor(
        [[1e300, 1e300], [-1.7e308, 1.7e308], [1.7e308, 1.7e308], [1.7e308, -1.0], [0.5, 0.25]],
        dtype=F64,
    )
    out = field.evaluate(x)
    assert _all_finite(out)
    assert bool((out.force[:4] == 0).all()) and bool((out.potential[:4] == 0).all())
    assert bool((out.nearest[:4] > 1e299).all())
    # the state near an obstacle gets the same force as when evaluated on its own
    alone = field.evaluate(x[4:])
    assert torch.allclose(out.force[4:], alone.force, rtol=1e-13, atol=0)
    assert torch.allclose(out.potential[4:], alone.potential, rtol=1e-13, atol=0)


def test_float32_states_near_float32_max():
    obs = _set([[-3e38, -3e38], [3e38, 3e38]], q_star=1e38, eta=1.0)
    field = RepulsiveField(obs)
    x = torch.tensor([[3.4e38, 3.4e38], [-3.4e38, 3.4e38], [3e38, 3e38]], dtype=torch.float32)
    out = field.evaluate(x)
    _check_bounded(field, out, torch.float32)
    assert out.nearest.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_obstacles_at_one_point(dtype):
    field = RepulsiveField(_set(np.zeros((2000, 3)), q_star=1.0, eta=1.0))
    x = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.5, 0.5, 0.5], [2.0, 0, 0]], dtype=dtype)
    out = field.evaluate(x)
    _check_bounded(field, out, dtype)
    assert out.active.tolist() == [2000, 2000, 2000, 0]
    # 2000 equal pushes are capped at the single-obstacle clamp force
    assert float(_norms(out.force)[0]) == pytest.approx(field.max_force, rel=1e-6)


# ---------------------------------------------------------------------------------- bounds
def test_default_max_force_formula_and_bound():
    obs, x, emb, q, eta = _clustered_problem(seed=4, d=2, n_obs=10)
    field = RepulsiveField(obs)
    rho = field.rho_min
    assert field.max_force == pytest.approx(
        float((eta / q**3 * (1 / rho - 1) / rho**2).max()), rel=1e-12
    )
    # states right on and between obstacles, where several obstacles push at their clamp
    g = torch.Generator().manual_seed(5)
    near = emb[torch.randint(0, 10, (300,), generator=g)] + 0.02 * torch.randn(
        300, 2, generator=g, dtype=F64
    )
    xs = torch.cat([x, near, emb])
    fn = _norms(field.force(xs))
    assert bool((fn <= field.max_force * (1 + 1e-12)).all())
    assert float(fn.max()) == pytest.approx(field.max_force, rel=1e-9)  # the cap is reached


def test_user_max_force_and_max_potential():
    obs, x, emb, *_ = _clustered_problem(seed=6, d=3, n_obs=8)
    field = RepulsiveField(obs, max_force=0.5, max_potential=0.25)
    assert field.max_force == 0.5
    xs = torch.cat([x, emb])
    out = field.evaluate(xs)
    fn = _norms(out.force)
    assert bool((fn <= 0.5 * (1 + 1e-12)).all()) and float(fn.max()) == pytest.approx(0.5)
    assert bool((out.potential <= 0.25).all()) and float(out.potential.max()) == 0.25
    # below the caps the field is the uncapped one
    free = RepulsiveField(obs).evaluate(xs)
    small = (_norms(free.force) < 0.4) & (free.potential < 0.2)
    assert int(small.sum()) > 20
    assert torch.allclose(out.force[small], free.force[small], rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("b", [1, 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_shapes_and_dtype(b, dtype):
    obs, x, *_ = _clustered_problem(seed=7, d=4, n_obs=6)
    field = RepulsiveField(obs)
    xb = x[:b].to(dtype)
    out = field.evaluate(xb)
    assert out.force.shape == (b, 4) and out.potential.shape == (b,)
    assert out.nearest.shape == (b,) and out.clearance.shape == (b,) and out.active.shape == (b,)
    for v in (out.force, out.potential, out.nearest, out.clearance):
        assert v.dtype == dtype and v.device == xb.device
    assert field.potential(xb).shape == (b,) and field.clearance(xb).shape == (b,)
    # each row is what it is alone
    for i in range(b):
        one = field.evaluate(xb[i : i + 1])
        assert torch.equal(one.force[0], out.force[i]) and torch.equal(
            one.potential[0], out.potential[i]
        )


def test_structured_states_are_flattened():
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(5, 6, generator=g, dtype=F64).float().double()
    obs = _set(emb.numpy(), q_star=2.5, eta=[1.0, 2.0, 0.5, 1.5, 3.0])
    field = RepulsiveField(obs)
    x = emb[torch.arange(9) % 5].reshape(9, 2, 3) + 0.5 * torch.randn(
        9, 2, 3, generator=g, dtype=F64
    )
    out = field.evaluate(x)
    flat = field.evaluate(x.reshape(9, 6))
    assert out.force.shape == (9, 2, 3)
    assert torch.equal(out.force.reshape(9, 6), flat.force)
    assert torch.equal(out.potential, flat.potential)
    want = _ref_force(x.reshape(9, 6), obs).reshape(9, 2, 3)
    assert float((_norms(out.force - want) / _norms(want)).max()) < 1e-8


def test_linear_projection_pulls_back_the_force():
    g = torch.Generator().manual_seed(9)
    proj = torch.randn(3, 5, generator=g, dtype=F64)
    emb = torch.randn(6, 3, generator=g, dtype=F64).float().double()
    q = 1.0 + torch.rand(6, generator=g, dtype=F64)
    obs = _set(emb.numpy(), q.numpy(), eta=(0.5 + torch.rand(6, generator=g, dtype=F64)).numpy())

    def projection(s):
        return s @ proj.T

    field = RepulsiveField(obs, projection=projection)
    plain = RepulsiveField(obs)
    # states whose embeddings lie near the obstacles: least-squares pre-images plus a null-space part
    target = emb[torch.arange(40) % 6] + 0.4 * torch.randn(40, 3, generator=g, dtype=F64)
    x = torch.linalg.lstsq(proj, target.T).solution.T + 0.3 * torch.randn(
        40, 5, generator=g, dtype=F64
    )
    dist = torch.cdist(projection(x), emb)
    x = x[
        (dist < q).any(1) & (dist > 2 * field.rho_min * q).all(1) & ((dist - q).abs() > 1e-6).all(1)
    ]
    assert x.shape[0] >= 15
    out = field.evaluate(x)
    assert out.force.shape == x.shape
    pulled = plain.force(projection(x)) @ proj  # P^T F(P x), row-wise
    assert float((_norms(out.force - pulled) / _norms(pulled)).max()) < 1e-12
    want = _ref_force(x, obs, projection)
    assert float((_norms(out.force - want) / _norms(want)).max()) < 1e-8
    assert torch.allclose(out.potential, _ref_potential(projection(x), obs), rtol=1e-12)
    assert field.potential(x).shape == (x.shape[0],)


# ---------------------------------------------------------------------------------- precision
def test_no_cancellation_near_an_offset_obstacle():
    base = np.full(3, 1000.0)
    shifts = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, -0.25, 0.125]])
    emb = base + shifts  # float32-exact
    field = RepulsiveField(_set(emb, q_star=0.01, eta=1.0))
    g = torch.Generator().manual_seed(10)
    u = torch.randn(50, 3, generator=g, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    o = torch.from_numpy(emb[0]).to(F64)
    x = o + 1e-3 * u
    exact = (x - o).norm(dim=1)  # x - o is exact in float64 here (Sterbenz)
    out = field.evaluate(x)
    assert float(((out.nearest - exact).abs() / exact).max()) < 1e-6
    assert float(((out.clearance - exact).abs() / exact).max()) < 1e-6
    # and the force points away from the obstacle
    cos = (out.force * u).sum(1) / _norms(out.force)
    assert float(cos.min()) > 1 - 1e-9
    want = _ref_force(x, field.obstacles)
    assert float((_norms(out.force - want) / _norms(want)).max()) < 1e-8


# ---------------------------------------------------------------------------------- bad input
def test_rejects_non_obstacle_set():
    with pytest.raises(TypeError, match="ObstacleSet"):
        RepulsiveField(np.zeros((3, 2)))


def test_rejects_empty_obstacle_set():
    with pytest.raises(ValueError, match="empty"):
        RepulsiveField(ObstacleSet(3))


def test_dimension_mismatch_message():
    field = RepulsiveField(_set(np.zeros((2, 3)), q_star=1.0))
    with pytest.raises(ValueError, match="dimension mismatch") as err:
        field.evaluate(torch.zeros(4, 5, dtype=F64))
    assert "d=5" in str(err.value) and "d=3" in str(err.value)
    with pytest.raises(ValueError, match="d="):
        field.force(torch.zeros(4, 2, 2, dtype=F64))  # flattens to d=4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_states(bad):
    field = RepulsiveField(_set(np.zeros((1, 2)), q_star=1.0))
    x = torch.zeros(3, 2, dtype=F64)
    x[1, 0] = bad
    with pytest.raises(ValueError, match="NaN"):
        field.evaluate(x)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(0, 2, dtype=F64),
        torch.zeros(3, 2, dtype=torch.long),
        torch.tensor(1.0, dtype=F64),
    ],
)
def test_rejects_empty_or_integer_states(x):
    field = RepulsiveField(_set(np.zeros((1, 2)), q_star=1.0))
    with pytest.raises(ValueError):
        field.evaluate(x)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_rejects_min_distance_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="min_distance_ratio"):
        RepulsiveField(_set(np.zeros((1, 2)), q_star=1.0), min_distance_ratio=ratio)


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), float("inf")])
def test_rejects_bad_caps(cap):
    obs = _set(np.zeros((1, 2)), q_star=1.0)
    with pytest.raises(ValueError, match="max_force"):
        RepulsiveField(obs, max_force=cap)
    with pytest.raises(ValueError, match="max_potential"):
        RepulsiveField(obs, max_potential=cap)


def test_rejects_projection_of_wrong_shape():
    field = RepulsiveField(_set(np.zeros((1, 2)), q_star=1.0), projection=lambda s: s[0])
    with pytest.raises(ValueError, match="projection"):
        field.evaluate(torch.zeros(4, 2, dtype=F64))


# ---------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    obs, x, *_ = _clustered_problem(seed=11, d=4, n_obs=8)
    x = torch.cat([x, torch.from_numpy(obs.embeddings.astype(np.float64))]).to(dtype)
    field = RepulsiveField(obs)
    cpu = field.evaluate(x)
    gpu = field.evaluate(x.cuda())
    # float64: the reference on the GPU; float32: the Triton kernel (tf32 products, <= 1e-3)
    for name in ("potential", "force", "nearest", "clearance"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        assert b.device.type == "cuda" and b.dtype == dtype
        if dtype == F64:
            assert torch.allclose(b.cpu(), a, rtol=1e-10, atol=0), name
        else:
            err = float((b.cpu().double() - a.double()).norm() / a.double().norm())
            assert err <= 1e-3, (name, err)
    assert torch.equal(gpu.active.cpu(), cpu.active)
    assert _all_finite(field.evaluate(torch.zeros(3, 4, dtype=dtype, device="cuda")))


# ---------------------------------------------------------------------- the base all fields share
def _three_fields(d: int = 3):
    from guidance import ClassifierField, CombinedField
    from obstacles import PreferenceClassifier

    rng = np.random.default_rng(0)
    rep = RepulsiveField(_set(rng.normal(size=(6, d)).astype(np.float32), q_star=1.5, eta=2.0))
    clf = ClassifierField(PreferenceClassifier(rng.normal(size=d), 0.2, q_star=1.0, eta=0.5))
    return {"repulsive": rep, "classifier": clf, "combined": CombinedField(rep, clf)}


@pytest.mark.parametrize("name", ["repulsive", "classifier", "combined"])
def test_every_field_shares_the_base_checks(name):
    from guidance import Field

    field = _three_fields()[name]
    assert isinstance(field, Field)
    x = torch.zeros(2, 3, dtype=F64)
    for bad, msg in (
        (torch.full((2, 3), math.nan, dtype=F64), "NaN or Inf"),
        (torch.zeros(0, 3, dtype=F64), "B >= 1"),
        (torch.zeros(2, 3, dtype=torch.long), "floating tensor"),
    ):
        with pytest.raises(ValueError, match=msg):
            field.evaluate(bad)
    out = field.evaluate(x)
    assert out.potential.shape == (2,) and out.force.shape == (2, 3)
    # the wrappers are the base's: the same numbers as evaluate
    assert torch.equal(field.potential(x), out.potential)
    assert torch.equal(field.force(x), out.force)
    assert torch.equal(field.clearance(x), out.clearance)


@pytest.mark.parametrize("name", ["repulsive", "classifier"])
def test_projection_pull_back_is_shared(name):
    """With P(x) = A x the force on the state is A^T F(A x) for both embedding fields."""
    fields = _three_fields()
    a = torch.tensor([[2.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.3, 0.0, 1.0]], dtype=F64)
    plain = fields[name]
    cls = type(plain)
    arg = plain.obstacles if name == "repulsive" else plain.classifier
    projected = cls(arg, projection=lambda s: s @ a.T)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    want = plain.evaluate(x @ a.T).force @ a
    assert torch.allclose(projected.evaluate(x).force, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="projection must return"):
        cls(arg, projection=lambda s: s[:, :1].reshape(-1)).evaluate(x)
    with pytest.raises(ValueError, match="NaN or Inf embeddings"):
        cls(arg, projection=lambda s: s * math.inf).evaluate(x)


def test_combined_field_total_cap():
    """``CombinedField(field, max_force=m)``: the total force norm is at most m, its direction
    unchanged; below the cap the force is the field's own; clearance untouched."""
    from guidance import CombinedField

    rep = _three_fields()["repulsive"]
    x = torch.from_numpy(rep.obstacles.embeddings[:4].astype(np.float64)) + 0.05
    own = rep.evaluate(x)
    m = 0.5 * float(_norms(own.force).min())
    capped = CombinedField(rep, max_force=m).evaluate(x)
    assert torch.allclose(_norms(capped.force), torch.full((4,), m, dtype=F64), rtol=1e-12)
    cos = (capped.force * own.force).sum(1) / (_norms(capped.force) * _norms(own.force))
    assert torch.allclose(cos, torch.ones(4, dtype=F64), atol=1e-12)
    assert torch.equal(capped.clearance, own.clearance)
    loose = CombinedField(rep, max_force=10 * float(_norms(own.force).max())).evaluate(x)
    assert torch.equal(loose.force, own.force)
    with pytest.raises(ValueError, match="max_force"):
        CombinedField(rep, max_force=0.0)


def test_classifier_force_is_capped_at_its_clamp_force():
    """Inside the bad region the classifier's force is the clamp force (its default cap), in the
    direction of the good side."""
    clf = _three_fields()["classifier"]
    u = clf._u  # unit normal into the bad region; D(x) = offset - u . x
    deep = ((clf._offset + torch.tensor([1.0, 10.0, 1e3], dtype=F64))[:, None]) * u[None]
    out = clf.evaluate(deep)
    assert bool(out.collided.all())
    assert torch.allclose(_norms(out.force), torch.full((3,), clf.max_force, dtype=F64), rtol=1e-14)
    assert bool(((out.force @ u) < 0).all())  # along -u, out of the bad region
