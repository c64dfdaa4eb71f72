"""Rejection sampling, twisted SMC, the negation denoiser, the safety filter and ``auto`` against
exact truth on the Gaussian-mixture toy (float64), and the measurements that score them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cspace.experiments.measure import ExactReference
from cspace.experiments.search import build_toy_problem
from cspace.experiments.toy import toy_obstacle_set
from cspace.models.toy import BallObstacles, toy_with_coverage
from guidance import ClassifierField, CombinedField, RepulsiveField, sample
from guidance.fields.regions import HardRegions, hard_regions, log_ncx2_sf
from guidance.sampling import NegationDenoiser, SafetyFilter, predict, time_grid
from guidance.search import (
    ALGORITHMS,
    Budget,
    BudgetExceeded,
    CallableVerifier,
    OracleVerifier,
    SearchError,
    auto,
    rejection,
    twisted,
)
from obstacles.classifier import PreferenceClassifier

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def toy80():
    """The 2-D toy with 80% of the mass inside the obstacles, its field and oracle."""
    mix, balls, measured = toy_with_coverage(2, 0.8)
    fld = RepulsiveField(toy_obstacle_set(balls))
    return mix, balls, fld, OracleVerifier(mix, balls), measured


def _regions(balls: BallObstacles) -> HardRegions:
    d = balls.centers.shape[1]
    return HardRegions(balls.centers.double(), balls.radii.double(),
                       torch.zeros(0, d, dtype=torch.float64),
                       torch.zeros(0, dtype=torch.float64), d)  # fmt: skip


# ------------------------------------------------------------------ geometry and membership
def test_ncx2_tail_against_scipy():
    from scipy.stats import ncx2

    for k, tol in ((2, 0.015), (5, 0.003), (16, 9e-4), (64, 2e-4)):
        for lam in (0.0, 0.5, 4.0, 30.0, 300.0):
            qs = ncx2.ppf(np.linspace(0.01, 0.99, 15), k, max(lam, 1e-9))
            exact = ncx2.sf(qs, k, max(lam, 1e-9))
            ours = log_ncx2_sf(torch.tensor(qs), k, torch.tensor(lam)).exp().numpy()
            assert np.abs(ours - exact).max() < tol, (k, lam)
    # far tails stay finite and ordered (no NaN, no 0 * inf)
    far = log_ncx2_sf(torch.tensor([1e6, 1e300]), 3, torch.tensor(0.0))
    assert bool(torch.isfinite(far).all()) and float(far[1]) < float(far[0]) < -1e4


def test_hard_regions_are_the_fields_membership(toy80):
    mix, balls, fld, _, _ = toy80
    x = mix.sample(4000, gen(1))
    reg = hard_regions(fld)
    assert torch.equal(reg.inside(x), fld.clearance(x) < 0)
    assert torch.equal(reg.inside(x), balls.inside(x))
    good, bad = mix.sample(200, gen(2)).numpy(), mix.sample(200, gen(3)).numpy() + 3.0
    clf = PreferenceClassifier.fit(good, bad, seed=0)
    cf = ClassifierField(clf)
    assert torch.equal(hard_regions(cf).inside(x), cf.clearance(x) < 0)
    both = CombinedField(fld, cf)
    assert torch.equal(hard_regions(both).inside(x), both.clearance(x) < 0)
    with pytest.raises(ValueError, match="projection"):
        hard_regions(RepulsiveField(toy_obstacle_set(balls), projection=lambda s: s))


# ------------------------------------------------------------------ rejection
def test_rejection_is_exact_and_counts_every_draw(toy80):
    mix, balls, fld, ver, measured = toy80
    n, steps = 1500, 50
    res = rejection.search(mix.velocity, (2,), ver, 40 * n * steps, field=fld, n_return=n,
                           steps=steps, generator=gen(4))  # fmt: skip
    rec = res.records
    assert res.samples.shape == (n, 2) and not bool(balls.inside(res.samples).any())
    assert res.nfe == rec["draws"] * steps  # every discarded draw is paid for
    assert rec["nfe_needed"] <= res.nfe and rec["shortfall"] == 0
    assert abs(rec["inside_estimate"] - measured) < 0.03
    # the returned law is the model's restricted to the outside: mode shares as exact samples
    p = build_toy_problem(2, 0.8)
    ref = ExactReference.build(p, 10_000, seed=0, mc=40_000)
    floor = ref.floor(n, 20, seed=0)
    tv = floor["mode_tv"]
    assert ref.mode_tv(res.samples) < tv["mean"] + 3 * tv["sd"]


def test_rejection_with_given_first_draws_keeps_them_and_pays_for_them(toy80):
    """``first``: another arm's samples of the same sampler are the first round: the ones outside
    come back first, unchanged and in order, only the rejected ones are drawn again, and every
    given draw is charged; the returned law is still the model's restricted to the outside."""
    mix, balls, fld, ver, _ = toy80
    n, steps = 1500, 50
    given = rejection.search(mix.velocity, (2,), ver, 40 * n * steps, field=fld, n_return=n,
                             steps=steps, generator=gen(8))  # fmt: skip
    first = sample(mix.velocity, torch.randn(n, 2, generator=gen(9), dtype=torch.float64),
                   steps=steps, progress=False).samples  # fmt: skip
    out = balls.inside(first)
    assert bool(out.any()) and not bool(out.all())
    res = rejection.search(mix.velocity, (2,), ver, 40 * n * steps, field=fld, n_return=n,
                           steps=steps, generator=gen(10), first=first)  # fmt: skip
    k = int((~out).sum())
    assert torch.equal(res.samples[:k], first[~out])
    assert not bool(balls.inside(res.samples).any()) and res.samples.shape == (n, 2)
    assert res.records["draws"] >= n + int(out.sum())
    assert res.nfe == res.records["draws"] * steps  # the given draws included
    # the same law as a run on its own noise (mode shares within the exact floor)
    p = build_toy_problem(2, 0.8)
    ref = ExactReference.build(p, 10_000, seed=0, mc=40_000)
    tv = ref.floor(n, 20, seed=0)["mode_tv"]
    for r in (res, given):
        assert ref.mode_tv(r.samples) < tv["mean"] + 3 * tv["sd"]
    with pytest.raises(SearchError, match=r"first must be a tensor of samples \(m, 2\)"):
        rejection.search(mix.velocity, (2,), ver, 1000, field=fld, n_return=4, steps=10,
                         first=torch.zeros(3, 5))  # fmt: skip
    with pytest.raises(BudgetExceeded, match="given first draws"):
        rejection.search(mix.velocity, (2,), ver, 100, field=fld, n_return=4, steps=10,
                         first=torch.zeros(30, 2))  # fmt: skip
    budget = Budget(1000)  # refused inputs spend nothing
    for bad, what in ((torch.zeros(3, 2, dtype=torch.long), "real floating-point"),
                      (torch.full((3, 2), 1e300, dtype=torch.float64), "NaN or infinite"),
                      (torch.full((3, 2), float("nan")), "NaN or infinite")):  # fmt: skip
        with pytest.raises(SearchError, match=what):
            rejection.search(mix.velocity, (2,), ver, budget, field=fld, n_return=4, steps=10,
                             first=bad, dtype=torch.float32)  # fmt: skip
        assert budget.spent == 0


def test_rejection_uses_the_classifier_region(toy80):
    mix, _, _, _, _ = toy80
    good, bad = mix.sample(300, gen(5)), mix.sample(300, gen(6))
    bad = bad[bad[:, 0] > 1.0]
    good = good[good[:, 0] < -1.0]
    cf = ClassifierField(PreferenceClassifier.fit(good.numpy(), bad.numpy(), seed=0))
    ver = CallableVerifier(lambda x: torch.zeros(x.shape[0]))
    res = rejection.search(mix.velocity, (2,), ver, 200 * 20 * 10, field=cf, n_return=200,
                           steps=20, generator=gen(7))  # fmt: skip
    assert res.samples.shape == (200, 2)
    assert bool((cf.clearance(res.samples) >= 0).all())
    assert 0.2 < res.records["inside_estimate"] < 0.8


def test_rejection_budget_below_one_draw_per_sample(toy80):
    mix, _, fld, ver, _ = toy80
    calls = ver.calls
    with pytest.raises(BudgetExceeded, match=r"less than one draw per returned sample.*at least "
                                             r"800"):  # fmt: skip
        rejection.search(mix.velocity, (2,), ver, 799, field=fld, n_return=8, steps=100)
    assert ver.calls == calls
    with pytest.raises(SearchError, match="field"):
        rejection.search(mix.velocity, (2,), ver, 10_000, field=None, n_return=8, steps=10)


def test_rejection_that_finds_nothing_names_the_estimate():
    mix, _, _ = toy_with_coverage(2, 0.5)
    everything = BallObstacles(torch.zeros(1, 2, dtype=torch.float64),
                               torch.tensor([100.0], dtype=torch.float64))  # fmt: skip
    fld = RepulsiveField(toy_obstacle_set(everything))
    ver = OracleVerifier(mix, everything)
    with pytest.raises(SearchError, match=r"none of 40 draws.*below 0.025"):
        rejection.search(mix.velocity, (2,), ver, 400, field=fld, n_return=4, steps=10)


# ------------------------------------------------------------------ twisted SMC
def _exact_outside_probability(mix, balls, x, t, m, g):
    """P(x0 outside | x_t = x) from the closed-form posterior, a Gaussian mixture:
    components r_k N(mu_k + a s_k^2 / S_k (x - a mu_k), s_k^2 t^2 / S_k I) (Monte Carlo, m)."""
    _, a, var, diff, logw = mix._path(x, t)
    r = torch.softmax(logw, 1)
    s2 = mix.stds**2
    out = []
    for i in range(x.shape[0]):
        comp = torch.multinomial(r[i], m, replacement=True, generator=g)
        mean = mix.means[comp] + (a[i] * s2[comp] / var[i, comp])[:, None] * diff[i, comp]
        sd = (s2[comp] * t**2 / var[i, comp]).sqrt()
        y = mean + sd[:, None] * torch.randn(m, mix.dim, generator=g, dtype=torch.float64)
        out.append(float((~balls.inside(y)).double().mean()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dim", [2, 5, 16])
def test_twist_probability_against_the_closed_form(dim):
    """Where the posterior of x0 is one mode (t <= 0.2) the twist is within 0.003 of the exact
    P(x0 outside | x_t) on average (measured: 2e-4 to 2e-3) and within 0.03 for 95% of the
    states (the largest errors, up to 0.16, are states between two modes); at t = 0.7, where the
    posterior spans several modes, the single Gaussian around x0_hat is far off (measured mean
    error 0.2 to 0.36): the weights stay exact, only their variance suffers."""
    mix, balls, _ = toy_with_coverage(dim, 0.8)
    reg = _regions(balls)
    g = gen(10 + dim)
    for t, mean_tol, q95_tol in ((0.05, 0.003, 0.03), (0.2, 0.003, 0.03)):
        x0 = mix.sample(150, g)
        x = (1 - t) * x0 + t * torch.randn(150, dim, generator=g, dtype=torch.float64)
        x0_hat = x - t * mix.velocity(x, t)
        phi = twisted.twist_log_probability(reg, x0_hat, t, float(mix.stds[0])).exp()
        exact = _exact_outside_probability(mix, balls, x, t, 4000, g)
        err = (phi - exact).abs()
        assert float(err.mean()) < mean_tol, (t, err.mean())
        assert float(err.quantile(0.95)) < q95_tol, (t, err.quantile(0.95))
    # t = 0: the exact indicator
    x = mix.sample(500, g)
    ind = twisted.twist_log_probability(reg, x, 0.0, 0.35)
    assert torch.equal(ind == 0, ~balls.inside(x)) and bool(
        torch.isneginf(ind[balls.inside(x)]).all()
    )


def test_twisted_with_phi_one_is_the_unguided_sde():
    """An obstacle so far away that phi = 1 to the last bit: no resampling, every weight 1, and
    the particles are exactly the unguided SDE's."""
    mix, _, _ = toy_with_coverage(2, 0.5)
    far = BallObstacles(torch.tensor([[1e4, 1e4]], dtype=torch.float64),
                        torch.tensor([1.0], dtype=torch.float64))  # fmt: skip
    fld = RepulsiveField(toy_obstacle_set(far))
    n, steps = 1000, 30
    ver = CallableVerifier(lambda x: torch.zeros(x.shape[0]))
    res = twisted.search(mix.velocity, (2,), ver, n * steps, field=fld, n_return=n, steps=steps,
                         generator=gen(20), data_scale=0.35)  # fmt: skip
    assert res.records["resamplings"] == 0 and res.records["unique"] == n
    assert res.records["mass_inside"] == 0.0
    seen = []
    again = twisted.search(mix.velocity, (2,), ver, n * steps, field=fld, n_return=n,
                           steps=steps, generator=gen(20), data_scale=0.35,
                           callback=lambda info: seen.append((info["step"], float(info["t"][0]))))  # fmt: skip
    assert torch.equal(again.samples, res.samples)  # the callback changes nothing
    assert [k for k, _ in seen] == list(range(1, steps + 1)) and seen[-1][1] == 0.0
    ts = [t for _, t in seen]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == steps
    g = gen(20)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ref = sample(mix.velocity, noise, steps=steps, method="sde", generator=g).samples
    assert torch.allclose(res.samples, ref)


@pytest.mark.parametrize("proposal", ["model", "field", "negation"])
def test_twisted_never_returns_a_sample_inside(toy80, proposal):
    mix, balls, fld, ver, measured = toy80
    n = 400
    res = twisted.search(mix.velocity, (2,), ver, 2 * n * 50, field=fld, n_return=n, steps=50,
                         generator=gen(21), data_scale=0.35, proposal=proposal)  # fmt: skip
    assert res.samples.shape == (n, 2) and not bool(balls.inside(res.samples).any())
    assert res.nfe == 2 * n * 50 and res.records["proposal"] == proposal
    # log Z estimates the mass outside
    assert abs(res.records["mass_inside"] - measured) < 0.1


def test_twisted_without_a_twist_above_twist_from_is_still_exact(toy80):
    """twist_from = 0: phi = 1 until the final indicator (importance sampling of the SDE with
    resampling only at the end): nothing inside, and log Z still estimates the mass outside."""
    mix, balls, fld, ver, measured = toy80
    res = twisted.search(mix.velocity, (2,), ver, 4 * 400 * 50, field=fld, n_return=400, steps=50,
                         generator=gen(22), data_scale=0.35, twist_from=0.0)  # fmt: skip
    assert not bool(balls.inside(res.samples).any()) and res.records["resamplings"] == 0
    assert abs(res.records["mass_inside"] - measured) < 0.05


def test_twisted_raises_when_no_particle_ends_outside():
    mix, _, _ = toy_with_coverage(2, 0.5)
    everything = BallObstacles(torch.zeros(1, 2, dtype=torch.float64),
                               torch.tensor([100.0], dtype=torch.float64))  # fmt: skip
    fld = RepulsiveField(toy_obstacle_set(everything))
    ver = CallableVerifier(lambda x: torch.zeros(x.shape[0]))
    with pytest.raises(SearchError, match="no particle ended outside"):
        twisted.search(mix.velocity, (2,), ver, 400, field=fld, n_return=4, steps=10)
    with pytest.raises(SearchError, match="proposal"):
        twisted.search(mix.velocity, (2,), ver, 400, field=fld, n_return=4, steps=10,
                       proposal="nope")  # fmt: skip


@pytest.mark.slow
def test_twisted_distance_falls_toward_the_floor_as_particles_grow():
    """5-D mixture, 80% covered: ED to a 10,000-sample exact reference of 500 returned samples
    at 1, 4 and 16 particles per returned sample (3 seeds); it falls, and at 16 it is within the
    exact floor's mean + 2 sd."""
    p = build_toy_problem(5, 0.8)
    ref = ExactReference.build(p, 10_000, seed=0, mc=40_000)
    n = 500
    floor = ref.floor(n, 20, seed=0)["energy_distance"]
    eds = {}
    for per in (1, 4, 16):
        vals = []
        for seed in range(3):
            res = twisted.search(p.velocity, p.shape, p.verifier, per * n * 50, field=p.field,
                                 n_return=n, steps=50, generator=gen(30 + seed),
                                 data_scale=p.data_scale)  # fmt: skip
            assert not bool(p.obstacles.inside(res.samples).any())
            vals.append(ref.energy_distance(res.samples))
        eds[per] = sum(vals) / len(vals)
    assert eds[16] < eds[4] < eds[1]
    assert eds[16] < floor["mean"] + 2 * floor["sd"]


# ------------------------------------------------------------------ negation denoiser
def test_negation_denoiser_convention_and_locality(toy80):
    mix, balls, fld, _, _ = toy80
    neg = NegationDenoiser(mix.velocity, fld, data_scale=0.35)
    # near the free mode 7 late in the path: nothing to negate, the model's velocity
    t = torch.full((3,), 0.05, dtype=torch.float64)
    free = mix.means[7] * 0.95 + torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, -0.1]])
    assert torch.allclose(neg(free, t), mix.velocity(free, t), rtol=0, atol=1e-12)
    assert float(neg.last_beta.max()) < 1e-12
    t = torch.full((3,), 0.3, dtype=torch.float64)
    x = (1 - 0.3) * balls.centers[:3].double() + 0.05
    p0, p1 = predict(mix.velocity, x, t), neg.predict(x, t)
    dx0 = neg.clean_displacement(x, p0.x0_hat, 1 - t, t)
    # replacing the denoiser: x0_hat(x, v') = x0_hat + delta_x0, i.e. v' = v - delta_x0 / t
    assert torch.allclose(x - t[:, None] * p1.v, p0.x0_hat + dx0)
    assert float(neg.last_beta.min()) > 0.5
    # it points away from the negation examples
    cos = (dx0 * (p0.x0_hat - balls.centers[:3])).sum(1)
    assert bool((cos > 0).all())
    with pytest.raises(ValueError, match="beta_max"):
        NegationDenoiser(mix.velocity, fld, beta_max=1.0)


def test_negation_denoiser_in_sample_lowers_the_hits(toy80):
    mix, balls, fld, _, _ = toy80
    noise = torch.randn(1000, 2, generator=gen(40), dtype=torch.float64)
    plain = sample(mix.velocity, noise, steps=50, method="sde", generator=gen(41)).samples
    neg = sample(NegationDenoiser(mix.velocity, fld, data_scale=0.35), noise, steps=50,
                 method="sde", generator=gen(41)).samples  # fmt: skip
    assert float(balls.inside(plain).double().mean()) > 0.7
    assert float(balls.inside(neg).double().mean()) < 0.05


@pytest.mark.parametrize("kind", ["flow", "ddim-epsilon"])
def test_negation_in_a_diffusers_pipeline(kind):
    """guide(pipe, field, mode="negation"): far examples change nothing (bit for bit); examples
    at the plain run's final latents push the guided latents away from them."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler

    from cspace.models.tiny_pipelines import tiny_unet
    from guidance.integrations.diffusers import guide
    from obstacles import ObstacleSet

    if kind == "flow":
        pipe = DDPMPipeline(tiny_unet(), FlowMatchEulerDiscreteScheduler())
    else:
        pipe = DDIMPipeline(tiny_unet(), DDIMScheduler(num_train_timesteps=100, clip_sample=False))

    def call(p):
        return p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
                 output_type="np").images  # fmt: skip

    probe = guide(pipe, None)
    plain = call(probe)
    lat = probe.stats.last_latents.reshape(2, -1).double()
    d = lat.shape[1]
    far = ObstacleSet.from_embeddings(np.full((1, d), 1e3), q_star=2.0, radius=1.0)
    off = guide(pipe, RepulsiveField(far), mode="negation")
    assert np.array_equal(call(off), plain)
    radius = 0.5 * float(lat.norm(dim=1).min())
    near = ObstacleSet.from_embeddings(lat.numpy(), q_star=2 * radius, radius=radius)
    g = guide(pipe, RepulsiveField(near), mode="negation", negation={"data_scale": 1.0})
    out = call(g)
    assert np.isfinite(out).all()
    new = g.stats.last_latents.reshape(2, -1).double()
    before = torch.cdist(lat, lat).diagonal()
    after = (new - lat).norm(dim=1)
    assert bool((after > before + 0.5 * radius).all()), after / radius
    from guidance.integrations.diffusers import GuidanceError

    with pytest.raises(GuidanceError, match="negation"):
        guide(pipe, RepulsiveField(near), negation={"data_scale": 1.0})
    with pytest.raises(GuidanceError, match="beta_max"):
        guide(pipe, RepulsiveField(near), mode="negation", negation={"beta_max": 2.0})


# ------------------------------------------------------------------ safety filter
def test_safety_filter_keeps_euler_samples_outside():
    """The 5-D toy at coverage 0.8 (neighbouring balls overlap): with steps >= alpha every Euler
    sample ends outside, including the noises that left samples inside with 5 Dykstra sweeps."""
    p = build_toy_problem(5, 0.8)
    sf = SafetyFilter(p.velocity, p.field, alpha=10.0)
    for seed in (1, 2):
        noise = torch.randn(2000, 5, generator=gen(seed), dtype=torch.float64)
        x = sample(sf, noise, steps=50).samples
        assert not bool(p.obstacles.inside(x).any())
    # the QP: the filtered velocity meets every constraint, and a feasible one is untouched
    x = torch.randn(64, 5, generator=gen(3), dtype=torch.float64) * 2
    t = torch.full((64,), 0.3, dtype=torch.float64)
    g, b = sf.constraints(x, t)
    v = p.velocity(x, t)
    v2 = sf.project(v, g, b)
    assert float(((g * v2[:, None]).sum(-1) - b).max()) < 1e-9
    ok = ((g * v[:, None]).sum(-1) - b).amax(1) <= 0
    assert torch.equal(v2[ok], v[ok])


# ------------------------------------------------------------------ auto
def test_auto_chooses_by_the_pilot():
    low = build_toy_problem(2, 0.25)
    res = auto.search(low.velocity, low.shape, low.verifier, 200 * 50 * 3, field=low.field,
                      n_return=200, steps=50, generator=gen(50), data_scale=0.35,
                      pilot=200)  # fmt: skip
    assert res.records["choice"] == "rejection" and res.records["pilot"] == 200
    assert abs(res.records["inside_estimate"] - low.coverage) < 0.1
    assert not bool(low.obstacles.inside(res.samples).any()) and res.samples.shape == (200, 2)
    high = build_toy_problem(2, 0.8)
    res = auto.search(high.velocity, high.shape, high.verifier, 200 * 50 * 3, field=high.field,
                      n_return=200, steps=50, generator=gen(51), data_scale=0.35)  # fmt: skip
    assert res.records["choice"] == "twisted-smc"
    lo, hi = res.records["inside_interval"]
    assert lo <= res.records["inside_estimate"] <= hi
    very = build_toy_problem(2, 0.99)
    res99 = auto.search(very.velocity, very.shape, very.verifier, 200 * 50 * 10,
                        field=very.field, n_return=200, steps=50, generator=gen(52),
                        data_scale=0.35, pilot=400)  # fmt: skip
    assert res99.records["choice"] == "twisted-smc/dpm-twist-ess0.3"
    assert res99.records["inside_estimate"] >= 0.95
    assert res99.records["chosen"]["proposal"] == "twist"
    for r, prob, budget in ((res, high, 200 * 50 * 3), (res99, very, 200 * 50 * 10)):
        assert r.samples.shape == (200, 2) and not bool(prob.obstacles.inside(r.samples).any())
        assert r.nfe <= budget
    with pytest.raises(SearchError, match="high_coverage"):
        auto.search(very.velocity, very.shape, very.verifier, 10_000, field=very.field,
                    n_return=10, steps=10, high_coverage=1.5)  # fmt: skip


def test_auto_pilot_that_finds_nothing_outside_names_the_estimate():
    mix, _, _ = toy_with_coverage(2, 0.5)
    everything = BallObstacles(torch.zeros(1, 2, dtype=torch.float64),
                               torch.tensor([100.0], dtype=torch.float64))  # fmt: skip
    fld = RepulsiveField(toy_obstacle_set(everything))
    ver = CallableVerifier(lambda x: torch.zeros(x.shape[0]))
    with pytest.raises(SearchError, match=r"all 32 pilot draws.*estimated mass inside 1\.000"):
        auto.search(mix.velocity, (2,), ver, 20_000, field=fld, n_return=4, steps=10)
    assert ver.calls == 0


# ------------------------------------------------------------------ measurements
def test_exact_reference_and_floor():
    p = build_toy_problem(5, 0.8)
    ref = ExactReference.build(p, 10_000, seed=0, mc=20_000)
    assert ref.size == 10_000 and abs(float(ref.shares.sum()) - 1) < 1e-12
    assert abs(ref.energy_distance(ref.samples)) < 1e-9  # itself
    floor = ref.floor(200, 20, seed=0)
    ed = floor["energy_distance"]
    assert ed["n"] == 20 and ed["sd"] > 0 and ed["mean"] > 0
    # the exact shares are those of the reference
    assert float((ref.mode_shares(ref.samples) - ref.shares).abs().max()) < 0.02
    # unguided samples (inside included) are far beyond the floor
    x = p.mixture.sample(200, gen(60))
    assert ref.energy_distance(x) > ed["mean"] + 5 * ed["sd"]
    with pytest.raises(ValueError, match="at least 2"):
        ref.floor(200, 1)


def test_problem_seed_changes_the_geometry():
    a, b = build_toy_problem(2, 0.75, 0), build_toy_problem(2, 0.75, 3)
    assert not torch.equal(a.obstacles.centers, b.obstacles.centers)
    assert torch.equal(build_toy_problem(2, 0.75, 0).obstacles.centers, a.obstacles.centers)


@pytest.mark.parametrize("algo", ["rejection", "twisted-smc", "negation", "safety-filter", "auto"])
def test_new_algorithms_are_registered(algo):
    assert ALGORITHMS[algo].needs_field
    assert time_grid(2).numel() == 3
