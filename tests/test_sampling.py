"""guidance.sampling's pieces on the exact Gaussian-mixture flow (float64): the convention, the
step functions, the Guided velocity, field reuse by backtracking and SMC, the search registry."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

import guidance
import guidance.sampling.sampler as sampler_mod
import guidance.search.backtrack as backtrack_mod
import guidance.search.common as common_mod
from cspace.models.toy import GaussianMixture
from guidance import Backtrack, Guided, Prediction, RepulsiveField, sample, time_grid
from guidance.sampling import STEPS, Step, euler_step, heun_step, predict, sde_step
from guidance.search import ALGORITHMS, Algorithm, OracleVerifier, SearchError, smc, smc_guided

F64 = torch.float64
torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Spy:
    """A field that counts its evaluations (and how they were asked for)."""

    def __init__(self, field) -> None:
        self.field, self.calls = field, []

    def evaluate(self, x, t=None, *, need_force=True):
        self.calls.append({"n": x.shape[0], "t": t is not None, "need_force": need_force})
        return self.field.evaluate(x, t, need_force=need_force)

    def count(self, **match) -> int:
        return sum(all(c[k] == v for k, v in match.items()) for c in self.calls)


def _states_at(mix: GaussianMixture, t: float, n: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    return (1 - t) * mix.sample(n, g) + t * torch.randn(n, mix.dim, generator=g, dtype=F64)


# ------------------------------------------------------------------ the convention
def test_prediction_round_trip(toy):
    mix = toy[0]
    x = _states_at(mix, 0.37, 64, 0)
    t = torch.full((64,), 0.37, dtype=F64)
    v = mix.velocity(x, t)
    p = Prediction.from_velocity(x, t, v)
    assert torch.equal(p.x0_hat, x - 0.37 * v) and torch.equal(p.eps_hat, x + 0.63 * v)
    # a number and a tensor of times give the same bits
    q = Prediction.from_velocity(x, 0.37, v)
    assert torch.equal(q.x0_hat, p.x0_hat) and torch.equal(q.eps_hat, p.eps_hat)
    # v = eps_hat - x0_hat, x = (1 - t) x0_hat + t eps_hat, and back from the clean estimate
    assert torch.allclose(Prediction.velocity(p.x0_hat, p.eps_hat), v, rtol=1e-13, atol=1e-13)
    assert torch.allclose(0.63 * p.x0_hat + 0.37 * p.eps_hat, x, rtol=1e-13, atol=1e-13)
    back = Prediction.from_clean(x, t, p.x0_hat)
    assert torch.allclose(back.v, v, rtol=1e-12, atol=1e-12)
    assert torch.allclose(back.eps_hat, p.eps_hat, rtol=1e-12, atol=1e-12)
    # the exact flow: eps_hat = -t score
    assert torch.allclose(p.eps_hat, -0.37 * mix.score(x, t), rtol=1e-10, atol=1e-10)
    # a displacement of the clean estimate with eps_hat fixed is v - delta
    delta = torch.randn(x.shape, generator=gen(1), dtype=F64)
    d = p.displaced(delta)
    assert torch.equal(d.v, v - delta) and torch.equal(d.delta, delta)
    assert torch.equal(d.x0_hat, p.x0_hat) and torch.equal(d.eps_hat, p.eps_hat)
    assert torch.allclose(Prediction.velocity(p.x0_hat + delta, p.eps_hat), d.v, atol=1e-13)
    assert torch.equal(d.displaced(delta).delta, 2 * delta)  # nested displacements add up


def test_predict_checks_plain_velocities_and_predictors(toy):
    mix = toy[0]
    x, t = _states_at(mix, 0.5, 8, 2), torch.full((8,), 0.5, dtype=F64)
    p = predict(mix.velocity, x, t)
    assert torch.equal(p.v, mix.velocity(x, t)) and p.delta is None and p.field is None
    with pytest.raises(ValueError, match="same shape"):
        predict(lambda x, t: x[:, :1], x, t)

    class Liar:
        def __call__(self, x, t):
            return x

        def predict(self, x, t):
            return x

    with pytest.raises(TypeError, match=r"must return a guidance\.sampling\.Prediction"):
        predict(Liar(), x, t)


# ------------------------------------------------------------------ the step functions
def test_step_functions_on_the_exact_flow(toy):
    mix = toy[0]
    n, t, tn = 256, 0.6, 0.55
    x = _states_at(mix, t, n, 3)
    tt = torch.full((n,), t, dtype=F64)
    v = mix.velocity(x, tt)
    e = euler_step(mix.velocity, x, t, tn)
    assert torch.equal(e.x_next, x - (t - tn) * v) and torch.equal(e.mean, e.x_next)
    assert torch.equal(e.x0_hat, x - t * v) and (e.nfe, e.calls, e.noise_var) == (n, 1, None)
    h_ = heun_step(mix.velocity, x, t, tn)
    v2 = mix.velocity(x - (t - tn) * v, torch.full((n,), tn, dtype=F64))
    assert torch.allclose(h_.x_next, x - (t - tn) * (v + v2) / 2, rtol=1e-14, atol=1e-14)
    assert (h_.nfe, h_.calls) == (2 * n, 2) and torch.equal(h_.x0_hat, e.x0_hat)
    s = sde_step(mix.velocity, x, t, tn, noise_scale=0.7, generator=gen(4))
    # mean = x - h v - h (g^2/2t) eps_hat with eps_hat = -t score (exact), g^2 = 0.7 t
    score = mix.score(x, tt)
    want = x - (t - tn) * v - (t - tn) * (0.7 * t / (2 * t)) * (-t * score)
    assert torch.allclose(s.mean, want, rtol=1e-12, atol=1e-12)
    z = torch.randn(x.shape, generator=gen(4), dtype=F64)
    assert torch.allclose(s.x_next, s.mean + math.sqrt(0.7 * t * (t - tn)) * z, atol=1e-14)
    assert torch.allclose(s.noise_var, torch.full((n, 1), 0.7 * t * (t - tn), dtype=F64))
    # noise_scale 0 is the Euler step, bit for bit
    assert torch.equal(sde_step(mix.velocity, x, t, tn, noise_scale=0.0).x_next, e.x_next)
    assert set(STEPS) == set(guidance.METHODS) == {"euler", "heun", "sde", "sde-heun", "dpm-sde"}
    with pytest.raises(ValueError, match="noise_scale"):
        sde_step(mix.velocity, x, t, tn, noise_scale=-1.0)


def _ode_reference(mix, x, t, tn, sub=2000):
    y = x
    grid = torch.linspace(t, tn, sub + 1, dtype=F64)
    for a, b in itertools.pairwise(grid):
        y = heun_step(mix.velocity, y, float(a), float(b)).x_next
    return y


@pytest.mark.parametrize("step, order", [(euler_step, 2), (heun_step, 3)])
def test_ode_steps_have_their_local_order_on_the_exact_flow(toy, step, order):
    """One step's error against the exact flow (a fine Heun solution) shrinks as h^order."""
    mix = toy[0]
    x = _states_at(mix, 0.5, 64, 5)
    errs = []
    for h in (0.04, 0.02):
        ref = _ode_reference(mix, x, 0.5, 0.5 - h)
        errs.append(float((step(mix.velocity, x, 0.5, 0.5 - h).x_next - ref).norm(dim=1).max()))
    ratio = errs[0] / errs[1]
    assert 2**order * 0.7 < ratio < 2**order * 1.4, (errs, ratio)


def test_sde_step_moves_the_exact_marginal_to_the_next_one():
    """On one Gaussian the step is affine: from x ~ p_t exactly, the law after one step is
    Gaussian with moments computed exactly from the step's mean map and noise variance. They
    match p_{t-h} = N((1-t+h) mu, ((1-t+h)^2 s^2 + (t-h)^2) I) up to O(h^2)."""
    mu, sd = torch.tensor([[1.5, -0.5]], dtype=F64), 0.4
    one = GaussianMixture(mu, sd)

    def gap(t, h, noise_scale):
        a = 1 - t
        m_t, var_t = a * mu, a**2 * sd**2 + t**2
        pts = torch.cat([m_t, m_t + torch.eye(2, dtype=F64)])  # the mean map is affine
        st = sde_step(one.velocity, pts, t, t - h, noise_scale=noise_scale, generator=gen(0))
        slope = st.mean[1:] - st.mean[:1]  # (2, 2): rows are the images of the unit vectors
        mean_next = st.mean[:1]
        var_next = var_t * (slope**2).sum(0) + st.noise_var[0]
        a2 = 1 - (t - h)
        want_m, want_v = a2 * mu, a2**2 * sd**2 + (t - h) ** 2
        return max(float((mean_next - want_m).abs().max()), float((var_next - want_v).abs().max()))

    for noise_scale in (0.0, 1.0, 3.0):
        g1, g2 = gap(0.5, 0.02, noise_scale), gap(0.5, 0.01, noise_scale)
        assert g1 < 0.01 and 3.0 < g1 / g2 < 5.0, (noise_scale, g1, g2)


# ------------------------------------------------------------------ Guided
def test_guided_is_the_plain_velocity_when_off(toy):
    mix, _, fld = toy
    x = _states_at(mix, 0.4, 300, 6)
    t = torch.full((300,), 0.4, dtype=F64)
    v = mix.velocity(x, t)
    spy = Spy(fld)
    for g in (
        Guided(mix.velocity, spy, strength=0.0),
        Guided(mix.velocity, spy, strength=5.0, window=(0.5, 1.0)),
        Guided(mix.velocity, spy, strength=5.0, window=(0.0, 0.3), mode="noisy"),
    ):
        p = g.predict(x, t)
        assert torch.equal(g(x, t), v) and torch.equal(p.v, v)
        assert p.delta is None and p.field is None
    assert spy.calls == []  # the field is not even evaluated
    assert Guided(mix.velocity, fld).field is fld
    # on: v' = v - strength weight(t) F(x0_hat), one evaluation at x0_hat
    g = Guided(mix.velocity, spy, strength=2.0, weight=lambda s: s**2)
    p = g.predict(x, t)
    f = fld.evaluate(x - 0.4 * v).force
    assert torch.allclose(p.v, v - 2.0 * 0.16 * f, rtol=1e-14, atol=1e-14)
    assert torch.equal(p.x0_hat, x - 0.4 * v) and p.field_mode == "clean"
    assert p.field_source is spy and spy.count(need_force=True, t=False) == 1
    noisy = Guided(mix.velocity, spy, strength=2.0, mode="noisy").predict(x, t)
    assert torch.allclose(noisy.delta, 2.0 * fld.evaluate(x, t).force, rtol=1e-14)
    assert spy.count(t=True) == 1 and noisy.field_mode == "noisy"


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"strength": -1.0}, ValueError, "strength"),
        ({"window": (0.6, 0.1)}, ValueError, "window"),
        ({"mode": "sideways"}, ValueError, "mode"),
        ({"weight": 3.0}, TypeError, "weight"),
    ],
)
def test_guided_bad_settings(toy, kwargs, err, match):
    with pytest.raises(err, match=match):
        Guided(toy[0].velocity, toy[2], **kwargs)


def test_guided_bad_field_or_velocity(toy):
    with pytest.raises(TypeError, match="evaluate"):
        Guided(toy[0].velocity, object())
    with pytest.raises(TypeError, match="callable"):
        Guided(3, toy[2])


# ------------------------------------------------------------------ backtracking reuses the field
def test_backtracking_reuses_the_guided_field_evaluation(toy):
    mix, _, fld = toy
    noise = torch.randn(400, 2, generator=gen(7), dtype=F64)
    a_field = Spy(fld)
    a = sample(Guided(mix.velocity, a_field, strength=1.0), noise, steps=30, method="sde",
               backtrack=Backtrack(revert=5, max_retries=10), generator=gen(8))  # fmt: skip
    # the same run with the check on another field object (same obstacles): no reuse possible
    b_guide, b_check = Spy(fld), Spy(RepulsiveField(fld.obstacles))
    b = sample(Guided(mix.velocity, b_guide, strength=1.0), noise, steps=30, method="sde",
               backtrack=Backtrack(revert=5, max_retries=10, field=b_check), generator=gen(8))  # fmt: skip
    assert torch.equal(a.samples, b.samples) and torch.equal(a.retries, b.retries)
    assert int(a.retries.sum()) > 0  # backtracking happened
    assert a.model_calls == b.model_calls
    # one field evaluation per model call in the reusing run ...
    assert a_field.count(need_force=True) == a.model_calls
    assert b_guide.count(need_force=True) == b.model_calls
    # ... while the other run evaluates the check's field once more at every step
    extra = a_field.count(need_force=False)  # the final samples' checks and collided flags
    assert b_check.count(need_force=False) == b.model_calls + extra
    assert extra < a.model_calls / 2
    assert torch.equal(a.collided, b.collided)


def test_backtracking_with_a_plain_velocity_checks_every_step(toy):
    mix, _, fld = toy
    spy = Spy(fld)
    noise = torch.randn(100, 2, generator=gen(9), dtype=F64)
    out = sample(mix.velocity, noise, steps=20, method="sde", generator=gen(10),
                 backtrack=Backtrack(revert=4, max_retries=3, field=spy))  # fmt: skip
    assert spy.count(need_force=True) == 0
    assert spy.count(need_force=False) >= out.model_calls + 1
    # a window keeps the check out of the noisy part
    spy2 = Spy(fld)
    sample(mix.velocity, noise, steps=20, method="sde", generator=gen(10),
           backtrack=Backtrack(revert=4, max_retries=3, field=spy2, window=(0.0, 0.5)))  # fmt: skip
    assert spy2.count(need_force=False) < spy.count(need_force=False)


# ------------------------------------------------------------------ SMC
@pytest.fixture
def no_sample(monkeypatch):
    """Every route to guidance.sample raises."""

    def boom(*a, **k):
        raise AssertionError("sample() was called")

    for mod in (guidance, guidance.sampling, sampler_mod, common_mod, backtrack_mod):
        monkeypatch.setattr(mod, "sample", boom)
    assert not hasattr(smc, "sample") and not hasattr(smc_guided, "sample")


@pytest.mark.parametrize("strength", [1.0, 0.0])
def test_guided_smc_evaluates_the_field_once_per_step(toy, no_sample, strength):
    mix, balls, fld = toy
    spy = Spy(fld)
    steps = 12
    res = smc_guided.search(
        mix.velocity, (2,), OracleVerifier(mix, balls), 32 * steps, field=spy, n_return=8,
        steps=steps, generator=gen(11), strength=strength,
    )  # fmt: skip
    assert res.nfe == 32 * steps
    # one per step at x0_hat (proposal force and potential clearance), one for the end
    assert len(spy.calls) == steps + 1
    assert spy.count(need_force=strength > 0, n=32) == steps + (strength == 0)


def test_plain_smc_never_calls_sample(toy, no_sample):
    mix, balls, _ = toy
    res = smc.search(mix.velocity, (2,), OracleVerifier(mix, balls), 8 * 10 * 4, n_return=8,
                     steps=10, generator=gen(12))  # fmt: skip
    assert res.samples.shape == (8, 2)


def test_smc_with_a_flat_potential_is_the_sde_bit_for_bit(toy):
    mix = toy[0]

    class Flat:
        def __init__(self):
            self.seen = 0

        def step(self, prediction, t):
            self.seen += 1
            return torch.zeros(prediction.x0_hat.shape[0], dtype=F64)

        def final(self, x):
            return torch.zeros(x.shape[0], dtype=F64)

        def gather(self, idx):
            raise AssertionError("no resampling with flat weights")

    n, steps = 300, 25
    noise = torch.randn(n, 2, generator=gen(13), dtype=F64)
    ref = sample(mix.velocity, noise, steps=steps, method="sde", generator=gen(14))
    w = smc.ParticleWeights(1, n)
    pot = Flat()
    x, ess, resampled = smc.run_particles(
        mix.velocity, noise.clone(), time_grid(steps), pot, w, noise_scale=1.0,
        generator=gen(14), threshold=0.5, scheme="systematic",
    )  # fmt: skip
    assert torch.equal(x, ref.samples) and pot.seen == steps
    assert not bool(resampled.any())
    assert torch.allclose(ess, torch.full((steps, 1), float(n), dtype=F64), rtol=1e-12)
    # a Guided velocity of strength 0 is the same proposal: same particles, zero log-ratios
    x2, _, _ = smc.run_particles(
        Guided(mix.velocity, toy[2], strength=0.0), noise.clone(), time_grid(steps), Flat(),
        smc.ParticleWeights(1, n), noise_scale=1.0, generator=gen(14), threshold=0.5,
        scheme="systematic",
    )  # fmt: skip
    assert torch.equal(x2, ref.samples)


def test_proposal_log_ratio_closed_form_on_a_hand_made_step():
    g = gen(15)
    b, d = 5, 3
    x_next, mean = (
        torch.randn(b, d, generator=g, dtype=F64),
        torch.randn(b, d, generator=g, dtype=F64),
    )
    delta = torch.randn(b, d, generator=g, dtype=F64)
    h = torch.full((b, 1), 0.02, dtype=F64)
    var = torch.rand(b, 1, generator=g, dtype=F64) * 0.05 + 0.01
    pred = Prediction(v=torch.zeros(b, d, dtype=F64), x0_hat=mean, eps_hat=mean, delta=delta)
    step = Step(x_next, mean, mean, pred, nfe=b, calls=1, h=h, noise_var=var)
    got = smc.proposal_log_ratio(step)
    mu_q, mu_p = mean, mean - h * delta  # mu_q - mu_p = h delta
    sd = var.sqrt().expand(b, d)
    want = torch.distributions.Normal(mu_p, sd).log_prob(x_next).sum(
        1
    ) - torch.distributions.Normal(mu_q, sd).log_prob(x_next).sum(1)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # no displacement: no correction; an ODE step cannot be corrected
    plain = Step(x_next, mean, mean, Prediction(v=mean, x0_hat=mean, eps_hat=mean), b, 1, h, var)
    assert torch.equal(smc.proposal_log_ratio(plain), torch.zeros(b, dtype=F64))
    with pytest.raises(SearchError, match="stochastic"):
        smc.proposal_log_ratio(Step(x_next, mean, mean, pred, b, 1, h, None))


def test_propagate_log_ratio_uses_the_unguided_step(toy):
    """On a real guided step: the log-ratio equals log N(x'; mu_p) - log N(x'; mu_q) with mu_p the
    unguided step's mean from the same state, and the score keeps the unguided eps_hat."""
    mix, _, fld = toy
    x = torch.tensor([[3.0, 0.8], [-2.9, 1.1], [0.5, -3.7]], dtype=F64).repeat(4, 1)
    guided = Guided(mix.velocity, fld, strength=1.0, weight=torch.sqrt)
    q, lr = smc.propagate(guided, x, 0.3, 0.28, noise_scale=1.0, generator=gen(16))
    p, lr0 = smc.propagate(mix.velocity, x, 0.3, 0.28, noise_scale=1.0, generator=gen(16))
    assert torch.equal(lr0, torch.zeros(12, dtype=F64))
    assert torch.equal(q.prediction.eps_hat, p.prediction.eps_hat)
    assert torch.allclose(q.mean - p.mean, q.h * q.prediction.delta, rtol=1e-12, atol=1e-14)
    assert float(q.prediction.delta.abs().max()) > 0
    sd = q.noise_var.sqrt().expand_as(x)
    want = torch.distributions.Normal(p.mean, sd).log_prob(q.x_next).sum(
        1
    ) - torch.distributions.Normal(q.mean, sd).log_prob(q.x_next).sum(1)
    assert torch.allclose(lr, want, rtol=1e-9, atol=1e-9)


def test_shared_particle_checks():
    for algo in ("smc", "smc-guided"):
        with pytest.raises(SearchError, match=f"{algo}: unknown resampling scheme 'x'"):
            smc.check_particle_options(algo, "x", 0.5, 1.0)
        with pytest.raises(SearchError, match="threshold must be in"):
            smc.check_particle_options(algo, "systematic", 1.5, 1.0)
        with pytest.raises(SearchError, match=r"noise_scale must be > 0; got 0\.0"):
            smc.check_particle_options(algo, "systematic", 0.5, 0.0)


# ------------------------------------------------------------------ the search registry
def test_search_registry_lists_every_algorithm_once():
    from cspace.cli.search import ALGOS
    from guidance.search import (
        auto,
        backtrack,
        paths,
        random_search,
        rejection,
        rejection_pu,
        single_pass,
        twisted,
        zero_order,
    )

    modules = (random_search, zero_order, paths, smc, smc_guided, backtrack, rejection,
               rejection_pu, twisted)  # fmt: skip
    entries = [m.ALGORITHM for m in modules]
    entries += [single_pass.NEGATION, single_pass.SAFETY_FILTER, auto.ALGORITHM]
    runs = [m.search for m in modules] + [single_pass.negation, single_pass.safety_filter]
    runs.append(auto.search)
    assert [a.name for a in entries] == list(ALGORITHMS) == list(ALGOS)
    assert len({a.name for a in entries}) == len(entries) == 12
    # only rejection-pu learns the obstacles' membership from examples of a class
    assert [a.name for a in entries if a.learns_membership] == ["rejection-pu"]
    assert all(ALGORITHMS[a.name] is a and isinstance(a, Algorithm) for a in entries)
    assert {a.name for a in entries if not a.needs_field} == {
        "best-of-n",
        "zero-order",
        "paths",
        "smc",
    }
    for a, run in zip(entries, runs, strict=True):
        assert a.run is run and a.searches_over
        params = inspect.signature(a.run).parameters
        assert list(params)[:4] == ["velocity", "shape", "verifier", "budget"]
        assert {"n_return", "steps", "generator"} <= set(params)
        assert ("field" in a.options) == a.needs_field
    # keywords: each takes what it accepts; the field is required where needed
    fld = object()
    assert ALGORITHMS["smc"].keywords(field=fld, lam=2.0, revert=3) == {"lam": 2.0}
    assert ALGORITHMS["backtrack"].keywords(field=fld, lam=2.0, revert=3) == {
        "field": fld,
        "revert": 3,
    }
    assert ALGORITHMS["best-of-n"].keywords(field=fld, data_scale=1.0) == {}
    with pytest.raises(SearchError, match="smc-guided needs the obstacles' field"):
        ALGORITHMS["smc-guided"].keywords(field=None)
    with pytest.raises(TypeError, match="no field= keyword"):
        Algorithm("odd", run=random_search.search, searches_over="x", needs_field=True)


def test_bad_arguments_name_the_value(toy):
    """Guided, Backtrack, sample and the fields' caps refuse bad values with a message naming
    the argument and the value (never a raw unpacking or indexing error deep inside)."""
    from guidance import CombinedField

    mix, _, fld = toy
    noise = torch.randn(4, 2, dtype=F64, generator=gen(0))
    cases = [
        (lambda: Backtrack(revert=2.5), ValueError, "Backtrack revert must be an integer >= 1"),
        (lambda: Backtrack(max_retries="3"), ValueError, "max_retries must be an integer"),
        (lambda: Backtrack(window=(0.5,)), ValueError, "Backtrack window must be a pair"),
        (lambda: Guided(mix.velocity, fld, window=None), ValueError, "window must be a pair"),
        (lambda: Guided(mix.velocity, fld, strength="1"), ValueError, "strength must be"),
        (lambda: CombinedField(fld, max_force="1"), ValueError, "max_force"),
        (
            lambda: sample(mix.velocity, noise, steps=3, noise_scale=-1.0),
            ValueError,
            "noise_scale must be a finite number >= 0; got -1.0",
        ),
        (
            lambda: sample(Guided(mix.velocity, fld), noise, steps=3, method="sde", backtrack=True),
            TypeError,
            "backtrack must be a Backtrack",
        ),
        (
            lambda: sample(Guided(mix.velocity, fld, weight=lambda t: t[:, None]), noise, steps=3),
            ValueError,
            r"weight\(t\) must return a tensor of the times' shape \(4,\); got \(4, 1\)",
        ),
    ]
    for make, err, msg in cases:
        with pytest.raises(err, match=msg):
            make()
    assert Backtrack(revert=3.0).revert == 3 and isinstance(Backtrack(revert=3.0).revert, int)
