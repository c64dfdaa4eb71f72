r"""The field of a preference classifier (a half-space obstacle), and sums of fields.

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

:meth:`ClassifierField.evaluate` returns a :class:`guidance.FieldOutput` with
``nearest = clearance = D`` (negative inside the bad region, so ``.collided`` marks states the
classifier calls bad and backtracking works) and ``active = 1`` where ``D <= Q*``. With ``t``
(the sampler's "noisy" mode) the half-space is noised like the obstacle sets' centres: the
boundary ``w . x0 + b = logit(p0)`` becomes ``w . x + (1 - t) (b - logit(p0)) = 0``, i.e.
``D_t(x) = (1 - t) offset - u . x``.

:class:`CombinedField` sums any fields with this interface (an obstacle set's and a classifier's,
say): potentials and forces add, ``nearest`` and ``clearance`` take the minimum, ``active`` adds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from guidance.field import FieldOutput, safe_norm
from obstacles.classifier import signed_distance_torch

__all__ = ["ClassifierField", "CombinedField"]

Projection = Callable[[torch.Tensor], torch.Tensor]
_HUGE = 1e300


def _finite(v: torch.Tensor, dtype: torch.dtype, norm: bool = False) -> torch.Tensor:
    """Hold float64 values within finfo(dtype).max / 2 (by row norm for (B, n) vectors)."""
    big = float(torch.finfo(dtype).max) / 2
    if norm:
        n = safe_norm(v)
        factor = torch.where(n > big, big / n, torch.ones_like(n))
        return (v * factor[:, None]).to(dtype)
    return v.clamp(-big, big).to(dtype)


def _check_states(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 1:
        raise ValueError("states must be a floating tensor (B, ...) with B >= 1")
    if x.shape[0] == 0:
        raise ValueError(f"states must have B >= 1; got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("states contain NaN or Inf; the field is defined for finite states only")


class ClassifierField:
    """The thresholded field of a preference classifier's bad half-space.

    Args:
        classifier: a :class:`~obstacles.classifier.PreferenceClassifier` (its ``unit_normal``,
            ``offset``, ``q_star``, ``eta`` and ``dim`` are copied at construction).
        projection: maps states (B, ...) to embeddings (B, d); default flattens.
        min_distance_ratio: ``rho_min`` of the distance clamp (0 < rho_min < 1).
        max_force: cap on the force norm (> 0); default the force at the clamp distance.
        max_potential: cap on the potential (> 0); default none beyond finiteness.
    """

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
        if not 0 < min_distance_ratio < 1:
            raise ValueError(f"min_distance_ratio must be in (0, 1); got {min_distance_ratio}")
        for name, val in (("max_force", max_force), ("max_potential", max_potential)):
            if val is not None and not (np.isfinite(val) and val > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None; got {val}")
        q, eta = float(classifier.q_star), float(classifier.eta)
        if not (np.isfinite(q) and q > 0) or not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"the classifier needs q_star > 0 and eta >= 0; got {q}, {eta}")
        self.classifier = classifier
        self.projection = projection
        self.rho_min = float(min_distance_ratio)
        self.q_star, self.eta = q, eta
        self._u = torch.as_tensor(np.asarray(classifier.unit_normal, dtype=np.float64))
        self._offset = float(classifier.offset)
        rho = self.rho_min
        with np.errstate(over="ignore", divide="ignore"):
            clamp_force = eta / q**3 * (1 / rho - 1) / rho**2
            self._f_pref = min(eta / q**3, _HUGE)  # eta / Q^3
            self._u_pref = min(eta / q**2, _HUGE)  # eta / Q^2
        default_cap = float(clamp_force) if np.isfinite(clamp_force) else np.inf
        self.max_force = float(max_force) if max_force is not None else default_cap
        self.max_potential = float(max_potential) if max_potential is not None else np.inf

    @property
    def dim(self) -> int:
        return int(self._u.numel())

    @property
    def max_q_star(self) -> float:
        return self.q_star

    # ------------------------------------------------------------------ public API
    def potential(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """U(x) for states (B, ...); (B,)."""
        return self.evaluate(x, t, need_force=False).potential

    def force(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """F(x) = -grad U(x) for states (B, ...); same shape as ``x``."""
        return self.evaluate(x, t).force

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        """The signed distance D to the bad region for states (B, ...); negative inside it."""
        return self.evaluate(x, need_force=False).clearance

    def evaluate(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | None = None,
        *,
        need_force: bool = True,
    ) -> FieldOutput:
        """The field at states ``x`` (B, ...); ``t`` (float or (B,)) noises the half-space to
        level t (see the module docstring)."""
        _check_states(x)
        b = x.shape[0]
        if self.projection is None:
            emb, xr = x.reshape(b, -1), None
        else:
            xr = x.detach().requires_grad_(need_force)
            with torch.enable_grad() if need_force else torch.no_grad():
                emb = self.projection(xr)
            if emb.ndim != 2 or emb.shape[0] != b:
                raise ValueError(
                    f"projection must return (B, d) = ({b}, d); got {tuple(emb.shape)}"
                )
        if emb.shape[1] != self.dim:
            raise ValueError(
                f"dimension mismatch: states embed to d={emb.shape[1]} but the classifier has "
                f"d={self.dim} (pass a projection= that maps states to its embedding space)"
            )
        e = emb.detach().to(torch.float64)
        if not bool(torch.isfinite(e).all()):
            raise ValueError("the projection returned NaN or Inf embeddings")
        scale = None
        if t is not None:
            tt = torch.as_tensor(t, dtype=torch.float64, device=x.device)
            scale = 1 - (tt.expand(b) if tt.ndim == 0 else tt.reshape(b))
        dist = signed_distance_torch(e, self._u.to(e.device), self._offset, scale)  # (B,)
        q, rho = self.q_star, self.rho_min
        inside = dist <= q
        ratio = torch.clamp(dist / q, min=rho)  # D_eff / Q* in [rho, inf)
        gap = torch.where(inside, 1 / ratio - 1, torch.zeros_like(ratio))  # Q* (1/D_eff - 1/Q*)
        pot_cap = min(self.max_potential, _HUGE)
        pot = torch.clamp(0.5 * self._u_pref * gap**2, max=pot_cap)
        if need_force:
            mag = torch.clamp(self._f_pref * gap / ratio**2, max=min(self.max_force, _HUGE))
            f_emb = -mag[:, None] * self._u.to(e.device)[None, :]  # (B, d), towards the good side
            if xr is None:
                force = f_emb
            else:
                (g,) = torch.autograd.grad(emb, xr, grad_outputs=f_emb.to(emb.dtype))
                force = g.to(torch.float64).reshape(b, -1)
            force = _finite(force.reshape(b, -1), x.dtype, norm=True).reshape(x.shape)
        else:
            force = torch.zeros_like(x)
        return FieldOutput(
            potential=_finite(pot, x.dtype),
            force=force.to(x.dtype),
            nearest=_finite(dist, x.dtype),
            clearance=_finite(dist, x.dtype),
            active=inside.long(),
        )


class CombinedField:
    """Several fields acting together (e.g. ``CombinedField(RepulsiveField(obstacles),
    ClassifierField(classifier))``).

    ``evaluate`` sums potentials and forces (in float64, held within ``finfo(dtype).max / 2``),
    takes the minimum of ``nearest`` and ``clearance`` (so ``.collided`` is true when any field
    reports a collision) and sums ``active``.
    """

    def __init__(self, *fields) -> None:
        if not fields:
            raise ValueError("CombinedField needs at least one field")
        for f in fields:
            if not callable(getattr(f, "evaluate", None)):
                raise TypeError(
                    f"CombinedField takes fields with an evaluate() method; got {type(f).__name__}"
                )
        self.fields = tuple(fields)

    @property
    def max_q_star(self) -> float:
        return max(float(getattr(f, "max_q_star", np.inf)) for f in self.fields)

    def potential(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.evaluate(x, t, need_force=False).potential

    def force(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.evaluate(x, t).force

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x, need_force=False).clearance

    def evaluate(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | None = None,
        *,
        need_force: bool = True,
    ) -> FieldOutput:
        _check_states(x)
        b = x.shape[0]
        outs = [f.evaluate(x, t, need_force=need_force) for f in self.fields]
        n = len(outs)
        big = float(torch.finfo(x.dtype).max) / 2
        # sums of n values each within finfo.max / 2 are formed as n * mean, held within big
        pot = torch.stack([o.potential.to(torch.float64) / n for o in outs]).sum(0)
        pot = pot.clamp(-big / n, big / n) * n
        nearest = torch.stack([o.nearest for o in outs]).amin(0)
        clear = torch.stack([o.clearance for o in outs]).amin(0)
        active = torch.stack([o.active.long() for o in outs]).sum(0)
        if need_force:
            mean = torch.stack([o.force.reshape(b, -1).to(torch.float64) / n for o in outs]).sum(0)
            norm = safe_norm(mean)
            factor = torch.where(norm > big / n, big / norm, torch.full_like(norm, float(n)))
            force = (mean * factor[:, None]).to(x.dtype).reshape(x.shape)
        else:
            force = torch.zeros_like(x)
        return FieldOutput(
            potential=pot.to(x.dtype),
            force=force,
            nearest=nearest.to(x.dtype),
            clearance=clear.to(x.dtype),
            active=active,
        )
