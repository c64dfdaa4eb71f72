r"""The hard regions of a field as geometry: balls and half-spaces, their membership, and the
probability that a Gaussian point lies outside them.

Every field marks a collision by ``clearance < 0``: inside a hard radius of an obstacle set
(``|x - o_j| < radius_j``), on the bad side of a classifier's boundary (``D(x) < 0``), or either
for a :class:`~guidance.fields.CombinedField`. :func:`hard_regions` reads that geometry out of a
field (balls ``(c_j, r_j)`` and half-spaces ``{x : D(x) = offset - u . x < 0}``), so that the
methods which need more than a clearance (rejection's membership test, the twist of twisted SMC,
the unsafe probability of the negation denoiser, the barrier of the safety filter) use exactly
the field's membership.

**Outside probability.** For ``x0 ~ N(m, s^2 I_d)`` (the clean estimate ``m = x0_hat`` of a state
and its spread ``s``):

* one ball: ``|x0 - c|^2 / s^2`` is noncentral chi-square with ``k = d`` degrees of freedom and
  noncentrality ``lambda = |m - c|^2 / s^2``, so ``P(outside) = P(chi'^2_k(lambda) >= r^2/s^2)``;
* one half-space: ``D(x0) ~ N(D(m), s^2)``, so ``P(outside) = Phi(D(m) / s)``;
* several regions: the product of the single-region probabilities (exact for one region, and
  for disjoint balls it differs from ``1 - sum_j P(inside j)`` by second-order terms only).

The noncentral chi-square tail is Sankaran's (1963) normal approximation of a power transform:
with ``h = 1 - 2/3 (k + lambda)(k + 3 lambda) / (k + 2 lambda)^2``, ``p = (k + 2 lambda) /
(k + lambda)^2``, ``m2 = (h - 1)(1 - 3h)``,

    z = [(x / (k + lambda))^h - (1 + h p (h - 1 - (2 - h) m2 p / 2))] / [h sqrt(2p) (1 + m2 p / 2)],
    P(chi'^2 <= x) ~ Phi(z),

computed as ``log Phi(-z)`` (``torch.special.log_ndtr``), so the log-probability is finite and
smooth from 1 down to far below the smallest double. Measured against scipy's exact
``ncx2`` on a grid of ``lambda`` in [0, 1000] and quantiles 0.001 to 0.999: absolute error at
most 0.015 for ``k = 2``, 0.003 for ``k = 5``, 9e-4 for ``k = 16`` and 2e-4 for ``k = 64``
(``tests/test_avoidance.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HardRegions", "hard_regions", "log_ncx2_sf"]


def log_ncx2_sf(x: torch.Tensor, k: int, lam: torch.Tensor) -> torch.Tensor:
    """``log P(chi'^2_k(lam) >= x)`` by Sankaran's approximation (module docstring); float64,
    broadcast over ``x`` and ``lam`` (both >= 0), finite for finite inputs."""
    x = torch.as_tensor(x, dtype=torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64).clamp(min=0.0)
    k = float(k)
    kl = k + lam
    k2 = k + 2 * lam
    h = 1 - (2.0 / 3.0) * kl * (k + 3 * lam) / k2**2
    p = k2 / kl**2
    m2 = (h - 1) * (1 - 3 * h)
    ratio = (x.clamp(min=0.0) / kl).clamp(max=1e300)
    num = ratio**h - (1 + h * p * (h - 1 - 0.5 * (2 - h) * m2 * p))
    den = h * torch.sqrt(2 * p) * (1 + 0.5 * m2 * p)
    z = torch.nan_to_num(num / den, nan=0.0, posinf=1e30, neginf=-1e30).clamp(-1e30, 1e30)
    return torch.special.log_ndtr(-z)


@dataclass(frozen=True)
class HardRegions:
    """Balls ``|x - centres_j| < radii_j`` and half-spaces ``offsets_i - normals_i . x < 0`` in
    the field's embedding space (flattened states), float64.

    Attributes:
        centres: (N, d) ball centres; radii: (N,) hard radii (N may be 0).
        normals: (M, d) unit normals pointing into the bad side; offsets: (M,) (M may be 0).
        dim: d.
    """

    centres: torch.Tensor
    radii: torch.Tensor
    normals: torch.Tensor
    offsets: torch.Tensor
    dim: int

    def __post_init__(self) -> None:
        if self.centres.shape[0] + self.normals.shape[0] == 0:
            raise ValueError("no hard region: the field has neither obstacles nor a boundary")

    @property
    def balls(self) -> int:
        return int(self.centres.shape[0])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        e = x.reshape(x.shape[0], -1).to(torch.float64)
        if e.shape[1] != self.dim:
            raise ValueError(
                f"states flatten to d={e.shape[1]} but the hard regions have d={self.dim}"
            )
        return e

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) distances of the states (B, ...) to the ball centres (from differences)."""
        e = self._flat(x)
        c = self.centres.to(e.device)
        return torch.cdist(e, c, compute_mode="donot_use_mm_for_euclid_dist")

    def signed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M) signed distances ``offset - u . x`` to the half-spaces (negative: bad side)."""
        e = self._flat(x)
        return self.offsets.to(e.device)[None] - e @ self.normals.to(e.device).T

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) ``min(min_j (D_j - r_j), min_i D_i)``: negative inside (the field's clearance)."""
        b = x.shape[0]
        c = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)
        if self.balls:
            c = torch.minimum(c, (self.distances(x) - self.radii.to(x.device)[None]).amin(1))
        if self.normals.shape[0]:
            c = torch.minimum(c, self.signed(x).amin(1))
        return c

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) bool: inside some hard region (the field's ``clearance < 0``)."""
        return self.clearance(x) < 0

    def log_outside_probability(
        self, mean: torch.Tensor, spread: torch.Tensor | float, chunk: int = 1 << 22
    ) -> torch.Tensor:
        """``log P(x0 outside every region)`` for ``x0 ~ N(mean, spread^2 I)`` (module docstring);
        ``mean`` (B, ...), ``spread`` a number or (B,) (> 0; 0 gives the exact indicator, log 1
        or -inf); (B,) float64."""
        e = self._flat(mean)
        b, d = e.shape
        s = torch.as_tensor(spread, dtype=torch.float64, device=e.device).reshape(-1)
        s = s.expand(b) if s.numel() == 1 else s.reshape(b)
        exact = s <= 0
        s_safe = torch.where(exact, torch.ones_like(s), s)
        out = torch.zeros(b, dtype=torch.float64, device=e.device)
        if self.balls:
            rows = max(1, chunk // max(1, self.balls))
            for lo in range(0, b, rows):
                sl = slice(lo, lo + rows)
                dist = self.distances(e[sl])  # (b', N)
                ss = s_safe[sl, None]
                lam = (dist / ss) ** 2
                xq = (self.radii.to(e.device)[None] / ss) ** 2
                out[sl] += log_ncx2_sf(xq, d, lam).sum(1)
        if self.normals.shape[0]:
            out += torch.special.log_ndtr(self.signed(e) / s_safe[:, None]).sum(1)
        if bool(exact.any()):
            ind = torch.where(self.inside(e[exact]), -math.inf, 0.0).to(out)
            out[exact] = ind
        return out


def _as64(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64).detach().cpu()


def hard_regions(field) -> HardRegions:
    """The hard regions of a :class:`~guidance.RepulsiveField` (its obstacles' hard radii), a
    :class:`~guidance.ClassifierField` (its bad half-space) or a
    :class:`~guidance.CombinedField` of them (all of its members').

    Raises:
        ValueError: a field with a projection (its regions are not in the states' space) or of
            another kind.
    """
    from guidance.fields.classifier import ClassifierField
    from guidance.fields.combined import CombinedField
    from guidance.fields.repulsive import RepulsiveField

    if isinstance(field, HardRegions):
        return field
    if getattr(field, "projection", None) is not None:
        raise ValueError(
            f"{type(field).__name__} maps states through a projection: its hard regions are not "
            "in the states' space (use a field without projection)"
        )
    if isinstance(field, RepulsiveField):
        c, r = _as64(field._emb), _as64(field._radius)
        return HardRegions(c, r, torch.zeros(0, c.shape[1], dtype=torch.float64),
                           torch.zeros(0, dtype=torch.float64), int(c.shape[1]))  # fmt: skip
    if isinstance(field, ClassifierField):
        u = _as64(field._u).reshape(1, -1)
        return HardRegions(torch.zeros(0, u.shape[1], dtype=torch.float64),
                           torch.zeros(0, dtype=torch.float64), u,
                           torch.tensor([float(field._offset)], dtype=torch.float64),
                           int(u.shape[1]))  # fmt: skip
    if isinstance(field, CombinedField):
        parts = [hard_regions(f) for f in field.fields]
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"the combined fields' regions have different dimensions {dims}")
        return HardRegions(
            torch.cat([p.centres for p in parts]),
            torch.cat([p.radii for p in parts]),
            torch.cat([p.normals for p in parts]),
            torch.cat([p.offsets for p in parts]),
            dims.pop(),
        )
    raise ValueError(
        f"no hard regions known for {type(field).__name__}: pass a RepulsiveField, "
        "ClassifierField or CombinedField"
    )
