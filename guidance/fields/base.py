r"""What every field shares: its output, the checks of states, the projection pull-back, the force
cap and the finite range.

A field maps states ``x`` (B, ...) to a :class:`FieldOutput`: the potential U (B,), the force
``F = -grad U`` on the state (B, ...), the distance to the nearest obstacle, the clearance (negative
inside a hard collision radius, which marks a collision) and how many obstacles act. Subclasses
implement :meth:`Field._sums`, which returns float64 sums over their obstacles for the embeddings
``P(x)`` (B, d); :meth:`Field.evaluate` does the rest, in this order:

1. **checks**: a floating tensor (B, ...) with B >= 1 and finite values; the embeddings (B, d)
   from ``projection`` (default: flatten) finite and of the field's dimension ``dim``;
2. **sums** (float64) from the subclass, at the embeddings and, with ``t``, the noise level t
   (the obstacles noised to level t: centres ``(1 - t) o_j`` under ``x_t = (1-t) x0 + t eps``);
3. **cap**: ``U <= max_potential`` and ``|F| <= max_force`` (by norm, in the embedding space);
4. **pull-back**: for a projection P the force on the state is ``J_P(x)^T F(P(x))`` (autograd);
5. **finite range**: every output held within ``finfo(dtype).max / 2`` of the state's dtype (the
   force by norm), then cast to that dtype.

So no NaN or Inf leaves a field for a finite state, whatever the subclass computes, as long as
its sums are finite or +-inf (never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from guidance.checks import check_number

__all__ = ["Field", "FieldOutput", "Projection", "check_states", "safe_norm"]

Projection = Callable[[torch.Tensor], torch.Tensor]


def safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm along ``dim`` that does not overflow (scaled by the largest |entry|)."""
    scale = x.abs().amax(dim=dim, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.linalg.vector_norm(x / safe, dim=dim, keepdim=True) * scale).squeeze(dim)


def check_states(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a finite floating tensor (B, ...) with B >= 1."""
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 1:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"states must be a floating tensor (B, ...) with B >= 1; got {what}")
    if x.shape[0] == 0:
        raise ValueError(f"states must have B >= 1; got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("states contain NaN or Inf; the field is defined for finite states only")


def _finite(v: torch.Tensor, dtype: torch.dtype, norm: bool = False) -> torch.Tensor:
    """Hold values within finfo(dtype).max / 2 (by row norm for (B, n) vectors), cast to dtype."""
    big = float(torch.finfo(dtype).max) / 2
    if norm:
        n = safe_norm(v)
        factor = torch.where(n > big, big / n, torch.ones_like(n))
        return (v * factor[:, None]).to(dtype)
    return v.clamp(-big, big).to(dtype)


@dataclass
class FieldOutput:
    """Everything one evaluation of a field gives, for B states.

    Attributes:
        potential: (B,) total potential U.
        force: (B, ...) total force -grad U on the state (same shape as the input state).
        nearest: (B,) distance to the nearest obstacle (embedding space).
        clearance: (B,) ``min_j (D_j - radius_j)``: negative inside a hard collision radius.
        active: (B,) number of obstacles within their Q* of the state.
    """

    potential: torch.Tensor
    force: torch.Tensor
    nearest: torch.Tensor
    clearance: torch.Tensor
    active: torch.Tensor

    @property
    def collided(self) -> torch.Tensor:
        """(B,) bool: inside some obstacle's hard collision radius."""
        return self.clearance < 0


class Field:
    """Base of the fields (module docstring): checks, projection, cap, pull-back, finite range.

    Args:
        projection: maps states (B, ...) to embeddings (B, d); default flattens.
        min_distance_ratio: ``rho_min`` of the subclasses' distance clamp (0 < rho_min < 1).
        max_force: cap on the force norm (> 0, or None for the subclass's default).
        max_potential: cap on the potential (> 0, or None: none beyond finiteness).

    Subclasses set ``self.max_force`` (a float, ``inf`` for no cap) after calling this, and
    implement ``dim``, ``max_q_star`` and :meth:`_sums`.
    """

    #: what the error messages call the field's obstacles
    _what = "the field"
    #: the C-space of the states the field takes (:class:`cspace.models.space.Space`): its
    #: obstacles' space; None when unknown, or when a ``projection`` maps states from another
    #: space into the obstacles' (the checks then accept any model)
    space = None

    def __init__(
        self,
        *,
        projection: Projection | None = None,
        min_distance_ratio: float = 0.05,
        max_force: float | None = None,
        max_potential: float | None = None,
    ) -> None:
        rho = check_number(min_distance_ratio, "min_distance_ratio", strict=True)
        if not rho < 1:
            raise ValueError(f"min_distance_ratio must be in (0, 1); got {min_distance_ratio!r}")
        for name, val in (("max_force", max_force), ("max_potential", max_potential)):
            if val is not None:
                check_number(val, f"{name} (or None)", strict=True)
        self.projection = projection
        self.rho_min = float(min_distance_ratio)
        self.max_force = float(max_force) if max_force is not None else math.inf
        self.max_potential = float(max_potential) if max_potential is not None else math.inf

    # ------------------------------------------------------------------ what subclasses give
    @property
    def dim(self) -> int | None:
        """The embedding dimension the field expects (None: any)."""
        raise NotImplementedError

    @property
    def max_q_star(self) -> float:
        """The largest influence range Q* of the field's obstacles."""
        raise NotImplementedError

    def _sums(self, x: torch.Tensor, emb: torch.Tensor, t, need_force: bool):
        """Float64 ``(potential (B,), force (B, d), nearest (B,), clearance (B,), active (B,))``
        at the embeddings ``emb`` (B, d) of the states ``x`` (noised to level ``t`` if given)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    def potential(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """U(x) for states (B, ...); (B,)."""
        return self.evaluate(x, t, need_force=False).potential

    def force(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """F(x) = -grad U(x) for states (B, ...); same shape as ``x``."""
        return self.evaluate(x, t).force

    def clearance(self, x: torch.Tensor) -> torch.Tensor:
        """``min_j (D_j - radius_j)`` for states (B, ...); (B,). Negative means a collision."""
        return self.evaluate(x, need_force=False).clearance

    def evaluate(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | None = None,
        *,
        need_force: bool = True,
    ) -> FieldOutput:
        """The field at states ``x`` (B, ...); ``t`` (float or (B,)) evaluates it against the
        obstacles noised to level t (the sampler's "noisy" mode). See the module docstring."""
        check_states(x)
        b = x.shape[0]
        emb, xr = self._embed(x, need_force)
        pot, f_emb, nearest, clear, active = self._sums(x, emb.detach(), t, need_force)
        pot, f_emb = self._cap(pot, f_emb, need_force)
        if need_force:
            if xr is None:
                force = f_emb.reshape(x.shape)
            else:
                (g,) = torch.autograd.grad(emb, xr, grad_outputs=f_emb.to(emb.dtype))
                force = g.to(torch.float64)
            force = _finite(force.reshape(b, -1), x.dtype, norm=True).reshape(x.shape)
        else:
            force = torch.zeros_like(x)
        return FieldOutput(
            potential=_finite(pot, x.dtype),
            force=force.to(x.dtype),
            nearest=_finite(nearest, x.dtype),
            clearance=_finite(clear, x.dtype),
            active=active,
        )

    # ------------------------------------------------------------------ shared steps
    def _embed(self, x: torch.Tensor, need_force: bool):
        """Embeddings (B, d) of the states and the leaf tensor the pull-back differentiates
        (None without a projection)."""
        b = x.shape[0]
        if self.projection is None:
            emb, xr = x.reshape(b, -1), None
        else:
            xr = x.detach().requires_grad_(need_force)
            with torch.enable_grad() if need_force else torch.no_grad():
                emb = self.projection(xr)
            if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != b:
                got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ValueError(f"projection must return (B, d) = ({b}, d); got {got}")
            if not bool(torch.isfinite(emb.detach()).all()):
                raise ValueError("the projection returned NaN or Inf embeddings")
        dim = self.dim
        if dim is not None and emb.shape[1] != dim:
            raise ValueError(
                f"dimension mismatch: states embed to d={emb.shape[1]} but {self._what} "
                f"have d={dim} (pass a projection= that maps states to its embedding space)"
            )
        return emb, xr

    @staticmethod
    def _levels(t, b: int, device) -> torch.Tensor | None:
        """``1 - t`` (B,) float64 for the noisy mode (the scale of the noised centres), or None."""
        if t is None:
            return None
        tt = torch.as_tensor(t, dtype=torch.float64, device=device)
        return 1 - (tt.expand(b) if tt.ndim == 0 else tt.reshape(b))

    def _cap(self, pot: torch.Tensor, force: torch.Tensor, need_force: bool):
        """The potential and the force held to ``max_potential`` and ``max_force`` (by norm)."""
        pot = torch.clamp(pot, max=self.max_potential)
        if need_force and math.isfinite(self.max_force):
            n = safe_norm(force)
            factor = torch.where(n > self.max_force, self.max_force / n, torch.ones_like(n))
            force = force * factor[:, None]
        return pot, force
