"""rejection-pu on an exact Gaussian mixture: the learnt region removes the class the examples
stand for where rejection with their small hard radii cannot; every draw is paid for; bad input
is refused before anything is drawn."""

from __future__ import annotations

import math

import pytest
import torch

from cspace.models.toy import GaussianMixture
from guidance import RepulsiveField
from guidance.search import (
    Budget,
    BudgetExceeded,
    CallableVerifier,
    SearchError,
    rejection,
    rejection_pu,
)
from obstacles import KernelRegion, ObstacleSet

F64 = torch.float64


def _problem(d: int = 5, m: int = 40, k: int = 4):
    """``k`` equal modes (std 0.4) on a circle of radius 3 in the first two coordinates; the class
    to avoid is mode 0; its examples are ``m`` exact draws of that mode, each an obstacle whose
    hard radius (0.3) holds a small part of the mode (rejection with it removes little). With 4
    modes a hyperplane separates mode 0 from the others; with 8 the neighbours at 45 degrees lie
    partly on its side (the region is a half-space: it takes part of them too)."""
    ang = torch.arange(k, dtype=F64) * (2 * math.pi / k)
    means = torch.zeros(k, d, dtype=F64)
    means[:, 0], means[:, 1] = 3 * torch.cos(ang), 3 * torch.sin(ang)
    mix = GaussianMixture(means, 0.4)
    g = torch.Generator().manual_seed(0)
    examples = means[0] + 0.4 * torch.randn(m, d, generator=g, dtype=F64)
    oset = ObstacleSet.from_embeddings(examples.numpy(), q_star=0.6, radius=0.3)
    return mix, RepulsiveField(oset), CallableVerifier(lambda x: torch.zeros(x.shape[0]))


def _share_of_mode(mix, x, mode: int = 0) -> float:
    """The share of ``x`` whose most likely component is ``mode`` (equal weights and stds: the
    nearest mean)."""
    return float((torch.cdist(x, mix.means).argmin(1) == mode).double().mean())


@pytest.mark.parametrize("region", ["kernel", "linear"])
def test_the_learnt_region_removes_the_class_where_the_hard_radii_cannot(region):
    mix, field, ver = _problem()
    n, steps = 800, 30
    g = torch.Generator().manual_seed(1)
    plain = mix.sample(20_000, g)
    base = _share_of_mode(mix, plain)
    assert 0.22 < base < 0.28  # one mode of four
    res = rejection_pu.search(mix.velocity, (5,), ver, 4 * n * steps, field=field, n_return=n,
                              steps=steps, generator=torch.Generator().manual_seed(2),
                              region=region)  # fmt: skip
    assert res.records["region"] == region
    hard = rejection.search(mix.velocity, (5,), ver, 4 * n * steps, field=field, n_return=n,
                            steps=steps, generator=torch.Generator().manual_seed(2))  # fmt: skip
    left_pu, left_hard = _share_of_mode(mix, res.samples), _share_of_mode(mix, hard.samples)
    assert left_pu < 0.2 * base, (left_pu, base)  # at most a fifth of the class left
    assert left_hard > 0.5 * base, (left_hard, base)  # the small radii keep most of it
    # the other three modes keep their proportions (each about 1/3 of what is returned)
    others = torch.cdist(res.samples, mix.means).argmin(1)
    shares = torch.bincount(others, minlength=4)[1:].double() / len(others)
    assert float((shares - 1 / 3).abs().max()) < 0.05, shares
    rec = res.records
    assert res.samples.shape == (n, 5) and rec["shortfall"] == 0
    assert res.nfe == rec["draws"] * steps  # the first round included: every draw is paid for
    assert rec["draws"] >= n and rec["examples"] == 40 and 0 < rec["c"] < 1
    assert 0.15 < rec["first_inside"] < 0.4 and rec["example_recall"] >= 0.9


def test_the_kernel_region_leaves_the_neighbours_that_a_half_space_takes():
    """8 modes on a circle: the neighbours of mode 0 at 45 degrees lie partly on its side of any
    hyperplane; the kernel region holds mode 0 alone."""
    mix, field, ver = _problem(k=8)
    n, steps = 800, 30

    def shares(region):
        res = rejection_pu.search(mix.velocity, (5,), ver, 4 * n * steps, field=field,
                                  n_return=n, steps=steps, region=region,
                                  generator=torch.Generator().manual_seed(2))  # fmt: skip
        modes = torch.cdist(res.samples, mix.means).argmin(1)
        return torch.bincount(modes, minlength=8).double() / n

    kernel, linear = shares("kernel"), shares("linear")
    assert kernel[0] < 0.01 and linear[0] < 0.01  # both remove the class
    # the kernel region keeps every other mode near 1/7 of what is returned
    assert float((kernel[1:] - 1 / 7).abs().max()) < 0.045, kernel
    # the half-space takes most of a neighbour
    assert float(min(linear[1], linear[7])) < 0.07, linear


def test_bad_input_is_refused_before_any_draw():
    mix, field, ver = _problem()
    calls = []

    def counted(x, t):
        calls.append(1)
        return mix.velocity(x, t)

    budget = Budget(100 * 10 - 1)
    with pytest.raises(BudgetExceeded, match=r"less than the first round \(100 x 10 NFE = 1000\)"):
        rejection_pu.search(counted, (5,), ver, budget, field=field, n_return=100, steps=10)
    assert budget.spent == 0 and not calls
    small = RepulsiveField(ObstacleSet.from_embeddings(torch.zeros(3, 5).numpy(), q_star=1.0))
    with pytest.raises(SearchError, match=r"5-fold.*at least 5 examples"):
        rejection_pu.search(mix.velocity, (5,), ver, 10_000, field=small, n_return=50, steps=5)
    with pytest.raises(SearchError, match=r"examples must be \(M, 5\)"):
        rejection_pu.search(mix.velocity, (5,), ver, 10_000, field=field, n_return=50, steps=5,
                            examples=torch.zeros(10, 3))  # fmt: skip
    with pytest.raises(SearchError, match="needs the obstacle set's field"):
        rejection_pu.search(mix.velocity, (5,), ver, 10_000, field=None, n_return=50, steps=5)
    with pytest.raises(SearchError, match="region must be one of"):
        rejection_pu.search(mix.velocity, (5,), ver, 10_000, field=field, n_return=50, steps=5,
                            region="quadratic")  # fmt: skip
    with pytest.raises(SearchError, match="membership must have a method inside"):
        rejection.search(counted, (5,), ver, 10_000, n_return=50, steps=5,
                         membership=object())  # fmt: skip
    # a membership test of another space is refused before any draw
    wrong = KernelRegion.fit_positive_unlabelled(torch.randn(40, 3).numpy() + 3,
                                                 torch.randn(200, 3).numpy())  # fmt: skip
    with pytest.raises(SearchError, match=r"for states of d=3, the samples flatten to d=5"):
        rejection.search(counted, (5,), ver, 10_000, n_return=50, steps=5, membership=wrong)
    assert not calls
