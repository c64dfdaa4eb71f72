"""Exact flow-matching toy: an isotropic Gaussian mixture and its closed-form velocity.

Time convention (the whole library's): t = 1 is noise, t = 0 is data,

    x_t = (1 - t) x0 + t eps,   eps ~ N(0, I),   v = eps - x0.

For a mixture ``p0 = sum_k pi_k N(mu_k, s_k^2 I)`` every component stays Gaussian along the path,

    x_t | k ~ N(a mu_k, S_k I),   a = 1 - t,   S_k = a^2 s_k^2 + t^2,

and the velocity that flow matching learns is the posterior mean of ``eps - x0``:

    v(x, t) = sum_k r_k(x, t) [ (t - a s_k^2) / S_k (x - a mu_k) - mu_k ],
    r_k(x, t) = pi_k N(x; a mu_k, S_k I) / p_t(x)          (responsibilities).

The score is ``grad log p_t(x) = -sum_k r_k (x - a mu_k) / S_k`` and, for every t in (0, 1],
``score = -eps_hat / t`` with ``eps_hat = x + (1 - t) v`` (tested). Everything is computed in the
dtype of the inputs (use float64 where exactness matters).

The mixture restricted to the outside of ball obstacles, ``p0(x) 1[x outside all balls] / Z``,
is the exact target of obstacle avoidance; :meth:`GaussianMixture.sample_outside` draws exact
samples of it by rejection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cspace.io.checks import check_memory

__all__ = [
    "BallObstacles",
    "GaussianMixture",
    "RejectionSamplingError",
    "default_toy",
    "toy_with_coverage",
]


class RejectionSamplingError(RuntimeError):
    """Rejection sampling outside the obstacles would need more proposals than allowed: the
    obstacles cover almost all of the mixture's mass."""


@dataclass(frozen=True)
class BallObstacles:
    """Hard ball obstacles in data space: ``centers`` (N, d) and ``radii`` (N,)."""

    centers: torch.Tensor
    radii: torch.Tensor

    def __post_init__(self) -> None:
        if self.centers.ndim != 2 or self.radii.shape != (self.centers.shape[0],):
            raise ValueError(
                f"BallObstacles needs centers (N, d) and radii (N,); got {tuple(self.centers.shape)} "
                f"and {tuple(self.radii.shape)}"
            )
        if not bool(torch.all(self.radii > 0)):
            raise ValueError(f"ball radii must be > 0; got {self.radii.tolist()}")

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean (B,): whether each row of ``x`` (B, d) lies inside any ball (distance < radius)."""
        c = self.centers.to(x)
        dist = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist")
        return (dist < self.radii.to(x)).any(dim=1)


class GaussianMixture:
    """Isotropic Gaussian mixture ``sum_k pi_k N(mu_k, s_k^2 I)`` with its exact flow.

    Args:
        means: (K, d) component means ``mu_k``.
        stds: (K,) component standard deviations ``s_k`` (> 0), or a float for all.
        weights: (K,) mixture weights ``pi_k`` (normalised here), default uniform.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float,
        weights: torch.Tensor | None = None,
    ) -> None:
        means = torch.as_tensor(means)
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means must be (K, d) with K >= 1; got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=means.dtype)
        if stds.ndim == 0:
            stds = stds.expand(k).clone()
        weights = (
            torch.full((k,), 1.0 / k, dtype=means.dtype)
            if weights is None
            else torch.as_tensor(weights, dtype=means.dtype)
        )
        if stds.shape != (k,) or weights.shape != (k,):
            raise ValueError(f"stds and weights must have shape ({k},)")
        if not bool(torch.all(stds > 0)):
            raise ValueError(f"component stds must be > 0; got {stds.tolist()}")
        if not bool(torch.all(weights >= 0)) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum; got {weights.tolist()}")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        """A copy of the mixture on ``device`` in ``dtype``."""
        return GaussianMixture(
            self.means.to(device=device, dtype=dtype),
            self.stds.to(device=device, dtype=dtype),
            self.weights.to(device=device, dtype=dtype),
        )

    # ------------------------------------------------------------------ path quantities
    def _path(self, x: torch.Tensor, t: torch.Tensor | float):
        """Per-component quantities at time t for states ``x`` (B, d)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"states must have shape (B, {self.dim}); got {tuple(x.shape)}")
        b, d = x.shape
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim > 0 and t.numel() != b:
            raise ValueError(f"t must be a number or have {b} entries; got shape {tuple(t.shape)}")
        t = t.expand(b) if t.ndim == 0 else t.reshape(b)
        mu = self.means.to(x)
        s2 = self.stds.to(x) ** 2
        a = (1 - t)[:, None]  # (B, 1)
        var = a**2 * s2[None, :] + t[:, None] ** 2  # (B, K)
        diff = x[:, None, :] - a[:, :, None] * mu[None]  # (B, K, d)
        sq = diff.pow(2).sum(-1)  # (B, K)
        logn = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        logw = torch.log(self.weights.to(x))[None, :] + logn
        return t, a, var, diff, logw

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Exact ``log p_t(x)`` for ``x`` (B, d); (B,)."""
        *_, logw = self._path(x, t)
        return torch.logsumexp(logw, dim=1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Exact flow-matching velocity ``v(x, t) = E[eps - x0 | x_t = x]``; (B, d).

        ``t`` is a float or a tensor of shape (B,) with values in [0, 1].
        """
        t, a, var, diff, logw = self._path(x, t)
        r = torch.softmax(logw, dim=1)  # (B, K)
        coef = (t[:, None] - a * self.stds.to(x)[None] ** 2) / var  # (B, K)
        vk = coef[..., None] * diff - self.means.to(x)[None]  # (B, K, d)
        return (r[..., None] * vk).sum(1)

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Exact score ``grad_x log p_t(x)``; (B, d)."""
        _, _, var, diff, logw = self._path(x, t)
        r = torch.softmax(logw, dim=1)
        return -(r[..., None] * diff / var[..., None]).sum(1)

    __call__ = velocity

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples of the data distribution p0; (n, d).

        Raises :class:`~cspace.io.checks.SizeLimitError` (nothing allocated) when ``n x d``
        numbers do not fit in this machine's memory."""
        check_memory(
            3 * int(n) * self.dim * self.means.dtype.itemsize,
            f"{int(n):,} samples of the {self.dim}-dimensional mixture",
            "ask for fewer samples or a lower dimension",
        )
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(
            n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device
        )
        return self.means[comp] + self.stds[comp, None] * z

    def sample_outside(
        self,
        n: int,
        obstacles: BallObstacles,
        generator: torch.Generator | None = None,
        max_draws: int = 50_000_000,
    ) -> torch.Tensor:
        """``n`` exact samples of p0 restricted to the outside of ``obstacles`` (rejection).

        Raises ValueError when ``n`` alone needs more than ``max_draws`` proposals (2 per
        sample in the first round), and :class:`RejectionSamplingError` (a RuntimeError) when
        more than ``max_draws`` proposals would be needed (the obstacles cover almost all of the
        mass).
        """
        if 2 * int(n) > max_draws:
            raise ValueError(
                f"{int(n):,} exact samples need at least {2 * int(n):,} proposals, more than "
                f"max_draws={max_draws:,}; ask for at most {max_draws // 2:,} samples"
            )
        out, have, drawn = [], 0, 0
        while have < n:
            m = max(1024, 2 * (n - have))
            if drawn + m > max_draws:
                raise RejectionSamplingError(
                    f"rejection sampling accepted {have} of {drawn} draws; the obstacles cover "
                    f"almost all of the mixture's mass (raise max_draws={max_draws} or shrink them)"
                )
            x = self.sample(m, generator)
            drawn += m
            keep = x[~obstacles.inside(x)]
            out.append(keep)
            have += keep.shape[0]
        return torch.cat(out)[:n]

    def mass_inside(self, obstacles: BallObstacles, n: int = 200_000, seed: int = 0) -> float:
        """Monte-Carlo estimate of the mixture mass inside the obstacles."""
        g = torch.Generator(device=self.means.device).manual_seed(seed)
        return float(obstacles.inside(self.sample(n, g)).double().mean())


def default_toy(
    dim: int = 2, dtype: torch.dtype = torch.float64
) -> tuple[GaussianMixture, BallObstacles]:
    """The default toy problem of ``cspace toy``.

    Eight equal modes (std 0.35) on a circle of radius 4 in the first two coordinates (the others
    zero); ball obstacles on modes 0 and 3 whose radius holds 99.7% of a mode's mass (1.2 in 2-D,
    from the chi-square quantile, Wilson-Hilferty approximation), and one of half that radius on
    the circle midway between modes 5 and 6, where almost no mass lies. The mass inside the
    obstacles is about 25%.
    """
    if dim < 2:
        raise ValueError(f"the toy needs dim >= 2; got dim={dim}")
    check_memory(
        64 * int(dim) * torch.finfo(dtype).bits // 8,
        f"the {dim}-dimensional toy (8 modes, 3 obstacles)",
        "lower the dimension (--dim)",
    )
    k = 8
    ang = torch.arange(k, dtype=dtype) * (2 * math.pi / k)
    means = torch.zeros(k, dim, dtype=dtype)
    means[:, 0], means[:, 1] = 4 * torch.cos(ang), 4 * torch.sin(ang)
    std = 0.35
    mix = GaussianMixture(means, std)
    z = 2.748  # standard normal 99.7% quantile
    chi2 = dim * (1 - 2 / (9 * dim) + z * math.sqrt(2 / (9 * dim))) ** 3
    r = std * math.sqrt(chi2)
    mid = 0.5 * (means[5] + means[6])
    mid = mid / mid.norm() * 4
    centers = torch.stack([means[0], means[3], mid])
    radii = torch.tensor([r, r, r / 2], dtype=dtype)
    return mix, BallObstacles(centers, radii)


def _ball_radius_for_mass(std: float, dim: int, mass: float) -> float:
    """Radius of the ball around a mode N(mu, std^2 I_dim) that holds ``mass`` of it (exact:
    ``|x - mu|^2 / std^2`` is chi-square with ``dim`` degrees of freedom; solved by bisection on
    its CDF, the regularised incomplete gamma function)."""
    if not 0 < mass < 1:
        raise ValueError(f"mass must be in (0, 1); got {mass}")
    k = torch.tensor(dim / 2, dtype=torch.float64)
    lo, hi = 0.0, float(dim + 40 * math.sqrt(2 * dim) + 100)  # bracket of the chi-square quantile
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(k, torch.tensor(mid / 2, dtype=torch.float64))) < mass:
            lo = mid
        else:
            hi = mid
    return std * math.sqrt(0.5 * (lo + hi))


def toy_with_coverage(
    dim: int = 2,
    coverage: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    full_mass: float = 0.999,
    n_measure: int = 400_000,
) -> tuple[GaussianMixture, BallObstacles, float]:
    """The 8-mode toy with ball obstacles covering about ``coverage`` of the mixture's mass.

    The mixture is :func:`default_toy`'s (8 equal modes, std 0.35, on a circle of radius 4 in the
    first two coordinates). Obstacles are balls centred on modes: ``floor(8 coverage)`` full balls,
    each holding ``full_mass`` (99.9%) of its mode, and, if a remainder is left, one partial ball
    on the next mode holding the rest of that mode's share (radius from the exact chi-square
    quantile). Modes are taken in the order 0, 4, 2, 6, 1, 5, 3, 7 (spread around the circle),
    rotated by ``seed``. E.g. coverage 0.25 covers 2 of 8 modes, 0.75 covers 6 of 8.

    Returns ``(mixture, obstacles, measured)``: ``measured`` is the mass inside the obstacles,
    measured by Monte Carlo with ``n_measure`` exact samples (seeded by ``seed``); in high
    dimension neighbouring modes leak a little mass into the balls and it can exceed the request.
    """
    if dim < 2:
        raise ValueError(f"the toy needs dim >= 2; got dim={dim}")
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1); got {coverage}")
    mix, _ = default_toy(dim, dtype)
    k = mix.means.shape[0]
    std = float(mix.stds[0])
    order = [0, 4, 2, 6, 1, 5, 3, 7]
    rot = int(seed) % k
    modes = [(m + rot) % k for m in order]
    share = 1.0 / k
    n_full = min(math.floor(coverage * k + 1e-9), k - 1)
    remainder = coverage - n_full * share * full_mass
    centers, radii = [], []
    r_full = _ball_radius_for_mass(std, dim, full_mass)
    for m in modes[:n_full]:
        centers.append(mix.means[m])
        radii.append(r_full)
    if remainder > 0.01 * share:
        frac = min(remainder / share, full_mass)
        centers.append(mix.means[modes[n_full]])
        radii.append(_ball_radius_for_mass(std, dim, frac))
    if not centers:
        raise ValueError(
            f"coverage {coverage:g} is below the smallest ball the toy places (1% of one mode's "
            f"share: {0.01 * share * full_mass:g}); raise the coverage (--coverage)"
        )
    balls = BallObstacles(torch.stack(centers), torch.tensor(radii, dtype=dtype))
    measured = mix.mass_inside(balls, n=n_measure, seed=seed)
    return mix, balls, measured
