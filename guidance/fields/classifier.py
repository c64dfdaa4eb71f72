r"""The field of a preference classifier (a half-space obstacle).

A :class:`~obstacles.classifier.PreferenceClassifier` defines the bad region
``{x : p(bad | x) >= p0}``, a half-space bounded by a hyperplane with unit normal ``u = w/|w|``
(pointing into the bad region). With ``D(x)`` the signed distance to that hyperplane (positive on
the good side), the field uses the obstacle sets' thresholded potential,

    U(x) = 1/2 eta (1/D - 1/Q*)^2                            for D <= Q*, else 0,
    F(x) = -grad U = eta (1/D - 1/Q*) / D^2 * (-u)            (towards the good side).

**Bounds** (the same as :class:`guidance.RepulsiveField`'s):

1. Distance clamp. ``D_eff = max(D, rho_min Q*)`` with ``rho_min = min_distance_ratio`` (default
   0.05). This includes the whole bad side (``D <= 0``): inside the bad region U and |F| stay at
   their value at ``rho_min Q*`` and the force still points along ``-u``, out of the bad region.
2. Force cap. ``|F| <= max_force``, by default the force at the clamp distance,
   ``eta/Q*^3 (1/rho_min - 1)/rho_min^2`` (which the clamped force equals); ``U <= max_potential``
   when given.
3. Finite range. D is computed without overflow for inputs up to the dtype's largest values and
   every output is held within ``finfo(dtype).max / 2`` (the force by norm). No NaN or Inf leaves
   the field for a finite input.

The prefactors ``eta/Q*^2`` and ``eta/Q*^3`` and the clamp force are computed without an
exception or a spurious over- or underflow for any ``Q* > 0`` and ``eta >= 0``
(:func:`guidance.numerics.over_power_np`; a Python ``Q* ** 3`` raised ``OverflowError`` for
``Q* > 5.6e102`` and ``ZeroDivisionError`` followed for ``Q* < 1e-108``); each is held at 1e300.
A zero prefactor (``eta = 0``, or one below the subnormals) gives a zero potential and force even
where ``1/D_eff`` overflows (``min_distance_ratio`` below 1e-154), never ``0 * inf``. A
classifier whose boundary offset ``(logit(p0) - b)/|w|`` is not finite (``b`` huge against a tiny
``w``) is refused with ``ValueError``: the noisy mode multiplies that offset by ``1 - t``.

:meth:`ClassifierField.evaluate` returns a :class:`guidance.FieldOutput` with
``nearest = clearance = D`` (negative inside the bad region, so ``.collided`` marks states the
classifier calls bad and backtracking works) and ``active = 1`` where ``D <= Q*``. With ``t``
(the sampler's "noisy" mode) the half-space is noised like the obstacle sets' centres: the
boundary ``w . x0 + b = logit(p0)`` becomes ``w . x + (1 - t) (b - logit(p0)) = 0``, i.e.
``D_t(x) = (1 - t) offset - u . x``.

The checks, the force cap, the projection pull-back and the finite range are
:class:`guidance.fields.base.Field`'s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cspace.models.space import space_of
from guidance.fields.base import Field, Projection
from guidance.numerics import over_power_np
from obstacles.classifier import signed_distance_torch

__all__ = ["ClassifierField"]

_HUGE = 1e300


class ClassifierField(Field):
    """The thresholded field of a preference classifier's bad half-space.

    Args:
        classifier: a :class:`~obstacles.classifier.PreferenceClassifier` (its ``unit_normal``,
            ``offset``, ``q_star``, ``eta`` and ``dim`` are copied at construction).
        projection: maps states (B, ...) to embeddings (B, d); default flattens.
        min_distance_ratio: ``rho_min`` of the distance clamp (0 < rho_min < 1).
        max_force: cap on the force norm (> 0); default the force at the clamp distance.
        max_potential: cap on the potential (> 0); default none beyond finiteness.
    """

    _what = "the classifier's embeddings"

    def __init__(
        self,
        classifier,
        *,
        projection: Projection | None = None,
        min_distance_ratio: float = 0.05,
        max_force: float | None = None,
        max_potential: float | None = None,
    ) -> None:
        for attr in ("unit_normal", "offset", "q_star", "eta", "dim"):
            if not hasattr(classifier, attr):
                raise TypeError(
                    f"ClassifierField needs an obstacles.PreferenceClassifier; got "
                    f"{type(classifier).__name__} (train one with PreferenceClassifier.fit)"
                )
        super().__init__(
            projection=projection,
            min_distance_ratio=min_distance_ratio,
            max_force=max_force,
            max_potential=max_potential,
        )
        q, eta = float(classifier.q_star), float(classifier.eta)
        if not (np.isfinite(q) and q > 0) or not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"the classifier needs q_star > 0 and eta >= 0; got {q}, {eta}")
        self.classifier = classifier
        # with a projection the states live in another space, which the field cannot name
        self.space = space_of(classifier) if projection is None else None
        self.q_star, self.eta = q, eta
        with np.errstate(all="ignore"):
            unit = np.asarray(classifier.unit_normal, dtype=np.float64)
            offset = float(classifier.offset)
        if not (np.all(np.isfinite(unit)) and math.isfinite(offset)):
            raise ValueError(
                f"the classifier's boundary is not finite (offset (logit(p0) - b)/|w| = {offset}, "
                "unit normal w/|w| finite: "
                f"{bool(np.all(np.isfinite(unit)))}): refit it on rescaled embeddings, or "
                "rescale w and b together"
            )
        self._u = torch.as_tensor(unit)
        self._offset = offset
        rho = self.rho_min
        with np.errstate(all="ignore"):  # numpy scalars: inf or 0, never an exception
            f_pref = over_power_np(eta, q, 3)  # eta / Q^3, the bits of Python's eta / q**3
            clamp_force = float(np.float64(f_pref) * (1 / rho - 1) / np.float64(rho) ** 2)
            self._f_pref = min(f_pref, _HUGE)  # eta / Q^3
            self._u_pref = min(over_power_np(eta, q, 2), _HUGE)  # eta / Q^2
        if max_force is None:  # the force at the clamp distance, which the clamped force equals
            self.max_force = float(clamp_force) if math.isfinite(clamp_force) else math.inf

    @property
    def dim(self) -> int:
        return int(self._u.numel())

    @property
    def max_q_star(self) -> float:
        return self.q_star

    def _sums(self, x: torch.Tensor, emb: torch.Tensor, t, need_force: bool):
        """The single half-space term at the embeddings (module docstring): D, U, F and
        ``nearest = clearance = D``."""
        e = emb.to(torch.float64)
        scale = self._levels(t, x.shape[0], x.device)
        dist = signed_distance_torch(e, self._u.to(e.device), self._offset, scale)  # (B,)
        q, rho = self.q_star, self.rho_min
        inside = dist <= q
        ratio = torch.clamp(dist / q, min=rho)  # D_eff / Q* in [rho, inf)
        gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))  # Q* (1/D_eff - 1/Q*)
        # a zero prefactor wins over gap = inf (min_distance_ratio below the subnormals' inverse)
        half = 0.5 * self._u_pref
        pot = torch.clamp(half * gap**2, max=_HUGE) if half > 0 else torch.zeros_like(gap)
        force = None
        if need_force:
            if self._f_pref > 0:
                mag = torch.clamp(self._f_pref * gap / ratio**2, max=_HUGE)
            else:
                mag = torch.zeros_like(gap)
            force = -mag[:, None] * self._u.to(e.device)[None, :]  # (B, d), towards the good side
        return pot, force, dist, dist, inside.long()
