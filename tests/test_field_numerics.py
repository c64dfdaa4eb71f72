"""The fields at subnormal and huge parameters: the force cap, every quotient, the pull-back, the
noise level, the pruning bounds and FAISS k-means (in a subprocess: an abort must fail the test,
not end pytest). Each case failed (NaN, Inf, a wrong finite value, a raw exception or an abort)
before the arithmetic of guidance.numerics."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance import ClassifierField, CombinedField, RepulsiveField, safe_norm
from guidance.numerics import clip_norm, over_power, over_power_np
from obstacles import ObstacleSet, PreferenceClassifier
from obstacles.clusters import ClusteredObstacles

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _set(emb, q_star, eta=1.0, radius=0.0) -> ObstacleSet:
    return ObstacleSet.from_embeddings(np.asarray(emb), q_star=q_star, eta=eta, radius=radius)


def _finite(out) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for v in (out.potential, out.force, out.nearest, out.clearance)
    )


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter from the repository root (SIGABRT shows as rc -6)."""
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


# ------------------------------------------------------------------------------ the force cap
def test_subnormal_eta_gives_the_subnormal_clamp_force():
    """Two obstacles at the origin with eta = 1e-315: each pushes with the clamp force
    eta/Q^3 (1/rho - 1)/rho^2 = 7.6e-312 (subnormal), the cap holds the sum at that force. The
    cap's quotient was max_force * (1/|F|) with 1/|F| = inf: [inf, nan]."""
    field = RepulsiveField(_set(np.zeros((2, 2)), q_star=1.0, eta=1e-315))
    out = field.evaluate(torch.tensor([[0.01, 0.0]], dtype=F64))
    assert _finite(out)
    assert field.max_force == pytest.approx(1e-315 * 19 / 0.0025, rel=1e-6, abs=0)
    assert float(out.force[0, 0]) == pytest.approx(field.max_force, rel=1e-6, abs=0)
    assert float(out.force[0, 1]) == 0.0
    assert out.active.tolist() == [2]


def test_subnormal_total_cap_of_a_combined_field():
    field = RepulsiveField(_set(np.zeros((2, 2)), q_star=1.0, eta=1e-315))
    total = CombinedField(field, max_force=5e-312)
    out = total.evaluate(torch.tensor([[0.01, 0.0], [0.0, -0.02]], dtype=F64))
    assert _finite(out)
    assert safe_norm(out.force).tolist() == pytest.approx([5e-312, 5e-312], rel=1e-6, abs=0)
    assert float(out.force[1, 1]) < 0  # direction kept


def test_clip_norm_keeps_ordinary_rows_bit_for_bit():
    """Over the cap, ordinary rows get v * (cap * (1/|v|)) exactly as before; subnormal norms,
    norms that overflow and infinite entries are scaled without NaN."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, 5, generator=g, dtype=F64) * 10
    n = safe_norm(v)
    old = v * torch.where(n > 3.0, 3.0 / n, torch.ones_like(n))[:, None]
    assert torch.equal(clip_norm(v, 3.0), old)
    odd = torch.tensor(
        [[1.52e-311, 0.0], [1.7e308, 1.7e308], [math.inf, -math.inf], [-math.inf, 2.0]], dtype=F64
    )
    got = clip_norm(odd, 7.6e-312)
    assert bool(torch.isfinite(got).all())
    assert safe_norm(got).tolist() == pytest.approx([7.6e-312] * 4, rel=1e-6, abs=0)
    assert got[2].tolist() == pytest.approx(
        [7.6e-312 / 2**0.5, -7.6e-312 / 2**0.5], rel=1e-6, abs=0
    )
    assert got[3, 0] < 0 and got[3, 1] == 0


def test_safe_norm_of_infinite_entries_is_inf_not_nan():
    v = torch.tensor([[math.inf, 1.0], [-math.inf, math.inf], [3.0, 4.0]], dtype=F64)
    assert safe_norm(v).tolist() == [math.inf, math.inf, 5.0]


# ------------------------------------------------------------------------- eta / Q^k quotients
def test_over_power_has_no_spurious_over_or_underflow():
    q = torch.tensor([1e200, 1e-110, 2.0, 5e-324], dtype=F64)
    a = torch.tensor([1e300, 1e-300, 3.0, 0.0], dtype=F64)
    got = over_power(a, q, 3)
    # 1e300/1e600 = 1e-300, 1e-300/1e-330 = 1e30 (q^3 over/underflows), 3/8, 0/q^3 = 0
    assert got.tolist() == pytest.approx([1e-300, 1e30, 0.375, 0.0], rel=1e-12, abs=0)
    assert over_power_np(1e300, 1e200, 3) == pytest.approx(1e-300, rel=1e-12, abs=0)
    assert over_power_np(np.array([1e-300]), np.array([1e-110]), 3)[0] == pytest.approx(1e30)
    # ordinary values: the plain quotient, bit for bit
    qs = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.1
    threes = torch.full_like(qs, 3.0)
    assert torch.equal(over_power(threes, qs, 3), threes / qs**3)
    assert all(over_power_np(3.0, float(v), 3) == 3.0 / float(v) ** 3 for v in qs[:50])


@pytest.mark.parametrize(("q", "eta"), [(1e200, 1e300), (1e-110, 1e-300)])
def test_huge_and_tiny_q_star_give_the_closed_form_force(q, eta):
    """At D = Q*/2 the force is eta/Q^3 (1/0.5 - 1)/0.25 = 4 eta/Q^3: 4e-300 and 4e30. Q^3
    overflowed to inf (force 0, default cap 0) or underflowed to 0 (force at the 1e300 cap)."""
    field = RepulsiveField(_set([[0.0, 0.0]], q_star=q, eta=eta))
    out = field.evaluate(torch.tensor([[q / 2, 0.0]], dtype=F64))
    want = 4 * eta / q / q / q
    assert _finite(out)
    assert float(out.force[0, 0]) == pytest.approx(want, rel=1e-9, abs=0)
    assert field.max_force == pytest.approx(eta / q / q / q * 19 / 0.0025, rel=1e-9, abs=0)


def test_zero_eta_with_a_tiny_min_distance_ratio():
    """rho_min = 1e-320: 1/D_eff overflows for a state on an obstacle; the eta = 0 obstacle
    contributed 0 * inf = NaN, the other one its capped push."""
    field = RepulsiveField(
        _set([[0.0, 0.0], [0.0, 0.0]], q_star=1.0, eta=[0.0, 1.0]), min_distance_ratio=1e-320
    )
    out = field.evaluate(torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=F64))
    assert _finite(out)
    assert float(out.potential[1]) == pytest.approx(0.5 * (1 / 0.5 - 1) ** 2)
    zero = RepulsiveField(_set([[0.0, 0.0]], q_star=1.0, eta=0.0), min_distance_ratio=1e-320)
    res = zero.evaluate(torch.tensor([[0.0, 0.0]], dtype=F64))
    assert res.potential.tolist() == [0.0] and res.force.abs().sum() == 0


def _classifier(q_star=1.0, eta=1.0, w=(1.0, 0.0), b=0.0) -> PreferenceClassifier:
    return PreferenceClassifier(np.asarray(w), b, q_star=q_star, eta=eta)


@pytest.mark.parametrize(
    ("q_star", "eta", "rho"),
    [(1e200, 1.0, 0.05), (1e-120, 1.0, 0.05), (1.0, 1.0, 1e-200), (1.0, 0.0, 1e-320)],
)
def test_classifier_prefactors_at_extreme_parameters(q_star, eta, rho):
    """Python floats raised OverflowError (Q*^3) or ZeroDivisionError (Q*^3 or rho^2 = 0), and
    eta = 0 with 1/D_eff = inf gave 0 * inf = NaN."""
    field = ClassifierField(_classifier(q_star, eta), min_distance_ratio=rho)
    x = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [0.5, 3.0], [1e300, 0.0]], dtype=F64)
    for t in (None, 0.5):
        out = field.evaluate(x, t)
        assert _finite(out), (t, out)
        assert bool((out.potential >= 0).all())


def test_classifier_with_an_infinite_offset_is_refused():
    """(logit(p0) - b)/|w| = -1e300/1e-160 = -inf: the noisy mode formed (1 - t) offset =
    0 * inf = NaN at t = 1."""
    clf = _classifier(w=(1e-160, 0.0), b=1e300)
    assert math.isinf(clf.offset)
    with pytest.raises(ValueError, match="offset"):
        ClassifierField(clf).evaluate(torch.zeros(1, 2, dtype=F64), 1.0)


# ------------------------------------------------------------------------------ the noise level
@pytest.mark.parametrize("t", [math.nan, 1.5, -0.25, 1e308])
def test_noise_level_outside_the_unit_interval_is_refused(t):
    field = RepulsiveField(_set([[10.0, 0.0]], q_star=1.0))
    with pytest.raises(ValueError, match=r"t must be finite and in \[0, 1\]"):
        field.evaluate(torch.zeros(2, 2, dtype=F64), t)


def test_noise_level_of_the_wrong_length_is_refused():
    field = RepulsiveField(_set([[10.0, 0.0]], q_star=1.0))
    with pytest.raises(ValueError, match="B=3 times"):
        field.evaluate(torch.zeros(3, 2, dtype=F64), torch.tensor([0.1, 0.2]))
    one = field.evaluate(torch.zeros(3, 2, dtype=F64), torch.tensor([0.25]))  # one for all
    assert torch.equal(one.force, field.evaluate(torch.zeros(3, 2, dtype=F64), 0.25).force)


# ------------------------------------------------------------------------------- the pull-back
def test_pull_back_that_overflows_is_held_finite():
    """P(x) = 1e305 x: J^T F = 1e305 * 7600 overflows float64 (Inf left the field); the force is
    held at finfo.max / 2 along the true direction."""
    field = RepulsiveField(_set([[0.0, 0.0]], q_star=1.0), projection=lambda s: s * 1e305)
    out = field.evaluate(torch.tensor([[1e-308, 0.0]], dtype=F64))
    assert _finite(out)
    assert float(out.force[0, 0]) == pytest.approx(float(torch.finfo(F64).max) / 2, rel=1e-9)
    assert float(out.force[0, 1]) == 0.0


def test_float32_pull_back_of_a_force_beyond_float32():
    """A float32 projection with a saturated coordinate (tanh(20) = 1, derivative 0) and a force
    beyond float32 along it: the force cast to float32 was inf and J^T F = 0 * inf = NaN."""
    obs = _set([[0.0, 3.0 - 2.0**-22]], q_star=1e-6, eta=1e40)
    field = RepulsiveField(obs, projection=lambda s: torch.tanh(s) * 3)
    out = field.evaluate(torch.tensor([[0.0, 20.0]], dtype=torch.float32))
    assert _finite(out)
    assert out.force.tolist() == [[0.0, 0.0]]  # the saturated coordinate cannot move


def test_projection_without_a_graph_is_a_clear_error():
    field = RepulsiveField(_set([[0.0, 0.0]], q_star=1.0), projection=lambda s: s.detach() * 2)
    with pytest.raises(ValueError, match="differentiabl"):
        field.evaluate(torch.zeros(1, 2, dtype=F64))
    assert field.evaluate(torch.zeros(1, 2, dtype=F64), need_force=False).active.tolist() == [1]


def test_projection_with_an_infinite_jacobian_is_a_clear_error():
    field = RepulsiveField(_set([[0.0, 0.5]], q_star=1.0), projection=lambda s: s.abs().sqrt())
    with pytest.raises(ValueError, match="Jacobian is not finite"):
        field.evaluate(torch.tensor([[0.0, 0.25]], dtype=F64))


# --------------------------------------------------------------------------------- pruning
def test_pruning_bounds_for_states_beyond_1e154():
    """|x - c|^2 overflowed for a state at 1e200: every cluster was skipped although Q* = 1e300
    puts every obstacle in range."""
    rng = np.random.default_rng(0)
    obs = _set(rng.normal(size=(40, 3)).astype(np.float32), q_star=1e300, eta=1e-300)
    x = torch.tensor([[1e200, 0.0, 0.0], [0.0, -3e250, 1e250]], dtype=F64)
    ref = RepulsiveField(obs).evaluate(x)
    out = RepulsiveField(obs, prune=4).evaluate(x)
    assert ref.active.tolist() == [40, 40]
    assert torch.equal(out.active, ref.active)
    assert torch.allclose(out.potential, ref.potential, rtol=1e-12, atol=0)
    assert torch.allclose(out.force, ref.force, rtol=1e-12, atol=0)


def test_kmeans_sees_tiny_sets_as_it_sees_unit_ones():
    """FAISS's float32 squared distances underflow at scale 2^-100: every obstacle went to one
    cluster. Centred and scaled by a power of two, the clusters are those of the unit set."""
    rng = np.random.default_rng(1)
    blobs = rng.normal(scale=10, size=(6, 4))[rng.integers(0, 6, 120)]
    unit = (blobs + rng.normal(scale=0.1, size=(120, 4))).astype(np.float32)
    a = ClusteredObstacles(_set(unit, q_star=1.0), n_clusters=6)
    b = ClusteredObstacles(_set(np.ldexp(unit, -100), q_star=1.0), n_clusters=6)
    assert a.k == 6 and b.k == 6
    assert torch.equal(a.assign, b.assign)


def test_kmeans_of_a_set_with_a_common_offset():
    """Blobs 0.1 wide around a common offset of 1e6: FAISS's float32 |x|^2 + |c|^2 - 2 x.c
    cancelled (2 clusters of radius 200 left). Centred first, the clusters are as tight as
    those of the same blobs at the origin."""
    rng = np.random.default_rng(2)
    label = rng.integers(0, 6, 240)
    blobs = rng.normal(scale=100, size=(6, 8))[label] + rng.normal(scale=0.1, size=(240, 8))
    radii = []
    for offset in (0.0, 1e6):
        oset = _set((blobs + offset).astype(np.float32), q_star=1.0)
        cl = ClusteredObstacles(oset, n_clusters=6)
        assert cl.k == 6
        radii.append(np.sort(cl.radii.numpy()))
    assert np.allclose(radii[1], radii[0], rtol=0.2)


def test_kmeans_of_coincident_obstacles_is_one_cluster():
    cl = ClusteredObstacles(_set(np.full((9, 3), 2.5), q_star=1.0), n_clusters=3)
    assert cl.k == 1 and cl.radii.tolist() == pytest.approx([0.0], abs=1e-290)


def test_prune_on_huge_float32_obstacles_does_not_abort():
    """Valid float32 obstacles at 1e19: FAISS k-means aborted the process (SIGABRT inside
    OpenMP, rc -6). Run in a subprocess so that an abort fails this test only."""
    proc = _run(
        """
        import numpy as np, torch
        from guidance import RepulsiveField
        from obstacles import ObstacleSet
        rng = np.random.default_rng(0)
        emb = (rng.normal(size=(100, 4)) * 1e19).astype(np.float32)
        oset = ObstacleSet.from_embeddings(emb, q_star=3e18)
        pruned = RepulsiveField(oset, prune=True)
        x = torch.from_numpy(emb[:16].astype(np.float64) + 1e18)
        a, b = RepulsiveField(oset).evaluate(x), pruned.evaluate(x)
        assert pruned.clusters.k > 1, pruned.clusters.k
        assert torch.equal(a.active, b.active), (a.active, b.active)
        assert torch.allclose(a.force, b.force, rtol=1e-12, atol=0)
        assert torch.allclose(a.potential, b.potential, rtol=1e-12, atol=0)
        print("pruned ok", pruned.clusters.k)
        """
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert "pruned ok" in proc.stdout
