r"""Measurements that can separate sampling methods on the exact toy.

The energy distance between two exact n-sets of a target with few, well separated modes moves
several-fold between draws (it is dominated by how the samples split between the modes), so one
floor from one pair of sets cannot tell two methods apart. :class:`ExactReference` fixes that:

* **one large reference**: ``size`` (>= 10,000) exact samples of the obstacle-free target (rejection
  sampling of the exact mixture, :meth:`cspace.models.toy.GaussianMixture.sample_outside`), and
  every method's samples are scored against it (its self-distance computed once);
* **the floor as a distribution**: the energy distance of ``draws`` (>= 20) independent exact
  n-sets to the same reference, reported as mean and sd; a method whose distance lies within the
  floor's spread is as close as exact samples can show at that n;
* **mode-share total variation**: each sample is assigned to its mixture component (the largest
  responsibility at t = 0), and ``TV = 1/2 sum_k |share_k - exact share_k|``; the exact shares
  are ``pi_k P_k(outside) / Z`` with ``P_k(outside)`` measured by Monte Carlo on ``mc`` draws of
  each component (independent of the reference). The floor's TV is reported the same way.

Energy distance (V-statistic, as :func:`cspace.models.metrics.energy_distance`, but without its
4,096-point cap and in blocks of ``block`` rows):

    ED(x, r) = 2 mean|x_i - r_j| - mean|x_i - x_k| - mean|r_j - r_l|.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

__all__ = ["ExactReference", "mean_distance", "summary"]


def mean_distance(a: torch.Tensor, b: torch.Tensor, block: int = 2048) -> float:
    """``mean_{i,j} |a_i - b_j|`` for ``a`` (n, d), ``b`` (m, d), float64, in blocks (memory
    ``block x m``)."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    total = 0.0
    for s in range(0, a.shape[0], block):
        d = torch.cdist(a[s : s + block], b, compute_mode="use_mm_for_euclid_dist")
        total += float(d.clamp(min=0).sum())
    return total / (a.shape[0] * b.shape[0])


def summary(values) -> dict:
    """``{"mean", "sd", "n"}`` of a list of numbers (sd 0 for one value)."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


@dataclass
class ExactReference:
    """A large exact reference of a toy problem's obstacle-free target (module docstring).

    Build with :meth:`build`; :meth:`score` measures samples, :meth:`floor` the exact n-sets.
    """

    samples: torch.Tensor
    self_distance: float
    shares: torch.Tensor  # exact mode shares of the target (K,)
    mixture: object
    obstacles: object
    seed: int

    @classmethod
    def build(cls, problem, size: int = 10_000, seed: int = 0, mc: int = 200_000):
        """The reference of ``problem`` (a toy :class:`~cspace.experiments.search.SearchProblem`)
        from seed ``seed``: ``size`` exact samples, their self-distance and the exact shares."""
        if problem.mixture is None:
            raise ValueError("an exact reference needs the toy problem (an exact mixture)")
        if int(size) < 2:
            raise ValueError(f"the reference needs at least 2 samples; got {size}")
        mix, balls = problem.mixture, problem.obstacles
        g = torch.Generator().manual_seed(1_000_000 + int(seed))
        ref = mix.sample_outside(int(size), balls, g)
        shares = _exact_shares(mix, balls, int(mc), g)
        return cls(ref, mean_distance(ref, ref), shares, mix, balls, int(seed))

    @property
    def size(self) -> int:
        return int(self.samples.shape[0])

    def modes(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) the component of each sample (largest responsibility at t = 0)."""
        *_, logw = self.mixture._path(x.reshape(x.shape[0], -1).to(torch.float64), 0.0)
        return logw.argmax(dim=1)

    def mode_shares(self, x: torch.Tensor) -> torch.Tensor:
        k = self.shares.numel()
        return torch.bincount(self.modes(x), minlength=k).double() / x.shape[0]

    def energy_distance(self, x: torch.Tensor) -> float:
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        return 2 * mean_distance(x, self.samples) - mean_distance(x, x) - self.self_distance

    def mode_tv(self, x: torch.Tensor) -> float:
        return 0.5 * float((self.mode_shares(x) - self.shares).abs().sum())

    def score(self, x: torch.Tensor) -> dict:
        """``{"energy_distance_ref", "mode_tv", "hit_rate"}`` of samples ``x`` (B, d)."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        return {
            "energy_distance_ref": self.energy_distance(flat),
            "mode_tv": self.mode_tv(flat),
            "hit_rate": float(self.obstacles.inside(flat).double().mean()),
        }

    def floor(self, n: int, draws: int = 20, seed: int = 0) -> dict:
        """Energy distance and mode-share TV of ``draws`` exact ``n``-sets to the reference:
        ``{"energy_distance": {"mean", "sd", "n"}, "mode_tv": {...}, "values": [...]}``."""
        if int(draws) < 2:
            raise ValueError(f"the floor needs at least 2 exact sets; got draws={draws}")
        g = torch.Generator().manual_seed(2_000_000 + int(seed))
        eds, tvs = [], []
        for _ in range(int(draws)):
            x = self.mixture.sample_outside(int(n), self.obstacles, g)
            eds.append(self.energy_distance(x))
            tvs.append(self.mode_tv(x))
        return {
            "energy_distance": summary(eds),
            "mode_tv": summary(tvs),
            "values": eds,
            "n": int(n),
        }


def _exact_shares(mix, balls, mc: int, g: torch.Generator, chunk: int = 50_000) -> torch.Tensor:
    """``pi_k P_k(outside) / Z`` with ``P_k(outside)`` from ``mc`` draws of each component."""
    k = mix.means.shape[0]
    outside = torch.zeros(k, dtype=torch.float64)
    for j in range(k):
        hits, done = 0, 0
        while done < mc:
            m = min(chunk, mc - done)
            z = torch.randn(m, mix.dim, generator=g, dtype=torch.float64)
            x = mix.means[j].to(torch.float64) + float(mix.stds[j]) * z
            hits += int((~balls.inside(x)).sum())
            done += m
        outside[j] = hits / mc
    w = mix.weights.to(torch.float64) * outside
    if not float(w.sum()) > 0:
        raise ValueError("no Monte-Carlo draw of any component fell outside the obstacles")
    return w / w.sum()
