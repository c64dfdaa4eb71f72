"""The second-order stochastic steps (stochastic Heun, SDE-DPM-Solver++ 2M), the shifted time grid
and what the particle searches do with them, against closed forms on Gaussians and exact truth on
the mixture toy (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from cspace.experiments.measure import mean_distance
from cspace.experiments.toy import toy_obstacle_set
from cspace.models.toy import GaussianMixture, toy_with_coverage
from guidance import Guided, RepulsiveField, sample, time_grid
from guidance.sampling import STEPS, predict
from guidance.sampling.steps import dpm_sde_step, sde_heun_step, trajectory_nfe
from guidance.search import OracleVerifier, SearchError, rejection, smc, twisted

F64 = torch.float64
torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MU, SD = torch.tensor([[1.5, -0.5]], dtype=F64), 0.4
ONE = GaussianMixture(MU, SD)


def _law_after_one_step(step, t: float, h: float, **kw) -> float:
    """From ``x ~ p_t`` exactly, one step on a single Gaussian is affine in ``(x, z)``: push the
    mean and unit vectors of both through it, and return the largest gap of the next law's mean
    and variance to the exact ``p_{t-h}``."""
    a = 1 - t
    m_t, var_t = a * MU, a**2 * SD**2 + t**2
    zero = torch.zeros(1, 2, dtype=F64)

    def run(x, z):
        return step(ONE.velocity, x, t, t - h, noise=z, **kw).x_next

    base = run(m_t, zero)
    ax = torch.cat([run(m_t + e[None], zero) - base for e in torch.eye(2, dtype=F64)])
    az = torch.cat([run(m_t, e[None]) - base for e in torch.eye(2, dtype=F64)])
    var_next = var_t * (ax**2).sum(0) + (az**2).sum(0)
    a2 = 1 - (t - h)
    want_m, want_v = a2 * MU, a2**2 * SD**2 + (t - h) ** 2
    return max(float((base - want_m).abs().max()), float((var_next - want_v).abs().max()))


@pytest.mark.parametrize(
    "name, step, kw, order",
    [
        ("stochastic Heun", sde_heun_step, {"noise_scale": 1.0}, 3),
        ("stochastic Heun, more noise", sde_heun_step, {"noise_scale": 3.0}, 3),
        ("DPM-Solver++ SDE, first order", dpm_sde_step, {}, 2),
    ],
)
def test_one_step_moves_the_exact_marginal_with_its_order(name, step, kw, order):
    """The local error of the law shrinks as h^order: 3 for the weak-order-2 Heun step (the
    Euler-Maruyama step's is 2: tests/test_sampling.py), 2 for the first-order DPM step."""
    g1, g2 = _law_after_one_step(step, 0.5, 0.04, **kw), _law_after_one_step(step, 0.5, 0.02, **kw)
    ratio = g1 / g2
    assert g1 < 0.01 and 2**order * 0.7 < ratio < 2**order * 1.45, (name, g1, g2, ratio)


def test_dpm_second_order_uses_the_previous_estimate():
    """2M: with the model's clean estimate at ``t + h`` (at the state ``x (1-t-h)/(1-t)``, on the
    same ray from the origin) as ``previous``, the one-step law's error falls as h^3 (first order:
    h^2) and is below the first-order step's."""
    t = 0.5

    def gap(h, history):
        def step(v, x, t_, tn, noise):
            if not history:
                return dpm_sde_step(v, x, t_, tn, noise=noise)
            tp = torch.full((x.shape[0],), t + h, dtype=F64)
            back = x * (1 - t - h) / (1 - t)
            prev = (predict(ONE.velocity, back, tp).x0_hat, tp)
            return dpm_sde_step(v, x, t_, tn, noise=noise, previous=prev)

        return _law_after_one_step(step, t, h)

    first = gap(0.04, False), gap(0.02, False)
    second = gap(0.04, True), gap(0.02, True)
    assert 4 * 0.7 < first[0] / first[1] < 4 * 1.45, first
    assert 8 * 0.7 < second[0] / second[1] < 8 * 1.45, second
    assert second[0] < first[0] / 2, (first, second)


def test_heun_step_by_hand_and_its_last_step():
    mix = ONE
    g = gen(3)
    x = torch.randn(6, 2, generator=g, dtype=F64)
    z = torch.randn(6, 2, generator=g, dtype=F64)
    t, tn, ns = 0.6, 0.5, 0.8
    st = sde_heun_step(mix.velocity, x, t, tn, noise_scale=ns, noise=z)

    def f(y, s):
        p = predict(mix.velocity, y, torch.full((6,), s, dtype=F64))
        return p.v + ns / 2 * p.eps_hat

    kick = math.sqrt(ns * (t + tn) / 2 * (t - tn)) * z  # the integral of g^2 = ns s
    pred = x - (t - tn) * f(x, t) + kick
    want = x - (t - tn) * (f(x, t) + f(pred, tn)) / 2 + kick
    assert torch.allclose(st.x_next, want, rtol=1e-13, atol=1e-13)
    assert (st.nfe, st.calls) == (12, 2)
    last = sde_heun_step(mix.velocity, x, 0.1, 0.0, noise_scale=ns, noise=z)
    assert last.nfe == 6 and torch.allclose(
        last.x_next, x - 0.1 * f(x, 0.1) + math.sqrt(ns * 0.05 * 0.1) * z, atol=1e-13
    )
    with pytest.raises(ValueError, match="noise must have the states' shape"):
        sde_heun_step(mix.velocity, x, t, tn, noise=z[:2])


def test_dpm_step_ends_on_the_clean_estimate_and_shifts_by_the_guidance(toy):
    mix, _, fld = toy
    x = torch.randn(8, 2, generator=gen(1), dtype=F64) * 2
    end = dpm_sde_step(mix.velocity, x, 0.05, 0.0, generator=gen(2))
    p = predict(mix.velocity, x, torch.full((8,), 0.05, dtype=F64))
    assert torch.equal(end.x_next, p.x0_hat) and float(end.noise_var.max()) == 0.0
    guided = Guided(mix.velocity, fld, strength=2.0)
    a = dpm_sde_step(mix.velocity, x, 0.6, 0.5, noise=torch.zeros(8, 2, dtype=F64))
    b = dpm_sde_step(guided, x, 0.6, 0.5, noise=torch.zeros(8, 2, dtype=F64))
    assert torch.allclose(b.x_next - a.x_next, b.shift, atol=1e-13)
    assert float(b.shift.abs().max()) > 0
    # the proposal correction of a Gaussian step uses its own shift (not h delta)
    r = smc.proposal_log_ratio(b)
    var = b.noise_var.reshape(-1)
    want = -(b.shift**2).sum(1) / (2 * var)  # x_next = mean: zero residual
    assert torch.allclose(r, want, rtol=1e-12)


def test_time_grid_shift():
    u = time_grid(10)
    assert torch.equal(u, torch.linspace(1, 0, 11, dtype=F64))
    s = time_grid(10, shift=3.0)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0 and bool((s[:-1] > s[1:]).all())
    assert torch.allclose(s, 3 * u / (1 + 2 * u))
    assert float(s[5]) > float(u[5])  # more steps near noise
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift"):
            time_grid(10, shift=bad)


def test_trajectory_nfe_and_sample_count_agree(toy):
    mix = toy[0]
    noise = torch.randn(5, 2, generator=gen(0), dtype=F64)
    for method in STEPS:
        out = sample(mix.velocity, noise, steps=7, method=method, generator=gen(1), progress=False)
        assert out.nfe == 5 * trajectory_nfe(7, method), method
        assert bool(torch.isfinite(out.samples).all())
    with pytest.raises(ValueError, match="unknown method"):
        trajectory_nfe(7, "rk4")


@pytest.fixture(scope="module")
def toy99():
    mix, balls, _measured = toy_with_coverage(2, 0.99)
    return mix, balls, RepulsiveField(toy_obstacle_set(balls)), OracleVerifier(mix, balls)


def _ed(x, y):
    return 2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def test_second_order_steps_sample_the_restricted_law_closer_than_euler_maruyama(toy99):
    """Rejection of each sampler at 50 NFE per draw on the 2-D toy restricted to 1% of its mass:
    energy distance of 1,000 accepted samples to 1,000 exact ones. Euler-Maruyama's
    discretisation shows (docs/noise-vs-trajectory.md: 5.6 x the floor at n = 10,000); both
    second-order steps are at least twice closer."""
    mix, balls, fld, ver = toy99
    exact = mix.sample_outside(1000, balls, gen(9))
    eds = {}
    for method, steps in (("sde", 50), ("sde-heun", 25), ("dpm-sde", 50)):
        res = rejection.search(mix.velocity, (2,), ver, 10_000_000, field=fld, n_return=1000,
                               steps=steps, method=method, generator=gen(4))  # fmt: skip
        assert not bool(balls.inside(res.samples).any())
        assert res.nfe >= 1000 * trajectory_nfe(steps, method)
        eds[method] = _ed(res.samples, exact)
    assert eds["sde-heun"] < eds["sde"] / 2 and eds["dpm-sde"] < eds["sde"] / 2, eds


@pytest.mark.parametrize(
    "kw",
    [{"method": "sde-heun"}, {"method": "dpm-sde"}, {"method": "dpm-sde", "proposal": "field"}],
)
def test_twisted_with_second_order_steps_stays_exact_outside(toy99, kw):
    mix, balls, fld, ver = toy99
    steps = 10
    cost = trajectory_nfe(steps, kw["method"])
    res = twisted.search(mix.velocity, (2,), ver, 200 * cost * 3, field=fld, n_return=200,
                         steps=steps, generator=gen(5), data_scale=0.35, **kw)  # fmt: skip
    assert not bool(balls.inside(res.samples).any())
    assert res.records["n_particles"] == 600
    assert res.nfe == 600 * cost
    assert bool(torch.isfinite(res.records["log_z"]).all())


def test_twisted_refuses_a_proposal_without_a_density(toy99):
    mix, _balls, fld, ver = toy99
    with pytest.raises(SearchError, match="Gaussian step"):
        twisted.search(mix.velocity, (2,), ver, 10_000, field=fld, n_return=10, steps=10,
                       method="sde-heun", proposal="field")  # fmt: skip
    with pytest.raises(SearchError, match="unknown method"):
        twisted.search(mix.velocity, (2,), ver, 10_000, field=fld, n_return=10, steps=10,
                       method="heun")  # fmt: skip


def test_sample_carries_the_dpm_history(toy):
    """``sample(method="dpm-sde")`` is the 2M solver: each step after the first uses the
    previous clean estimate (a hand-made loop with it agrees; one without it does not)."""
    mix = toy[0]
    noise = torch.randn(16, 2, generator=gen(2), dtype=F64)
    out = sample(mix.velocity, noise, steps=6, method="dpm-sde", generator=gen(3), progress=False)
    times = time_grid(6)
    for use_history in (True, False):
        g, x, prev = gen(3), noise.clone(), None
        for k in range(6):
            t = times[k].repeat(16)
            kw = {"previous": prev} if use_history and prev is not None else {}
            st = dpm_sde_step(mix.velocity, x, t, times[k + 1].repeat(16), generator=g, **kw)
            prev, x = (st.x0_hat, t), st.x_next
        same = torch.allclose(out.samples, x, rtol=1e-12, atol=1e-12)
        assert same == use_history


def test_twist_proposal_at_strength_zero_is_the_model_proposal(toy99):
    mix, _, fld, ver = toy99
    kw = dict(field=fld, n_return=50, steps=12, data_scale=0.35, method="dpm-sde")
    a = twisted.search(mix.velocity, (2,), ver, 50 * 12 * 4, generator=gen(6), **kw)
    b = twisted.search(mix.velocity, (2,), ver, 50 * 12 * 4, generator=gen(6), proposal="twist",
                       strength=0.0, **kw)  # fmt: skip
    assert torch.equal(a.samples, b.samples)


def test_twist_proposal_moves_particles_out_and_stays_exact(toy99):
    """TDS's proposal (the twist's gradient) ends more particles outside than the model's own
    step from the same budget, and every returned sample is outside."""
    mix, balls, fld, ver = toy99
    free = {}
    for proposal in ("model", "twist"):
        res = twisted.search(mix.velocity, (2,), ver, 400 * 20 * 4, field=fld, n_return=400,
                             steps=20, generator=gen(8), data_scale=0.35, method="dpm-sde",
                             proposal=proposal, shift=0.5)  # fmt: skip
        assert not bool(balls.inside(res.samples).any())
        assert bool(torch.isfinite(res.records["log_z"]).all())
        free[proposal] = res.records["free_fraction"]
    assert free["twist"] > free["model"] + 0.05, free
    with pytest.raises(SearchError, match="max_shift"):
        twisted.search(mix.velocity, (2,), ver, 10_000, field=fld, n_return=10, steps=10,
                       method="dpm-sde", proposal="twist", max_shift=0.0)  # fmt: skip


def test_steps_refuse_times_that_do_not_run_down_to_data(toy):
    mix = toy[0]
    x = torch.randn(3, 2, generator=gen(0), dtype=F64)
    for step in STEPS.values():
        for t, tn in ((0.3, 0.6), (float("nan"), 0.3), (1.5, 0.3), (0.5, -0.1)):
            with pytest.raises(ValueError, match="0 <= t_next <= t <= 1"):
                step(mix.velocity, x, t, tn, generator=gen(1))


def test_shifted_grid_keeps_its_ends_exactly():
    for shift in (0.01, 0.1, 0.2, 1 / 3, 0.3, 3.0, 7.0):
        for dtype in (torch.float64, torch.float32):
            g = time_grid(10, shift=shift, dtype=dtype)
            assert float(g[0]) == 1.0 and float(g[-1]) == 0.0, (shift, dtype)
            assert bool((g[:-1] > g[1:]).all())
    with pytest.raises(ValueError, match="shifted grid runs from 1 to 0"):
        time_grid(4, t_start=0.5, t_end=0.1, shift=3.0)


def test_search_options_are_checked():
    from cspace.experiments.search import check_options

    assert check_options("twisted-smc", {"method": "dpm-sde"}) == {"method": "dpm-sde"}
    with pytest.raises(ValueError, match="unknown search option 'field'"):
        check_options("twisted-smc", {"field": None})
    with pytest.raises(ValueError, match="--method does not apply to --algo auto"):
        check_options("auto", {"method": "sde"})
