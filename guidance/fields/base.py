r"""What every field shares: its output, the checks of states, the projection pull-back, the force
cap and the finite range.

A field maps states ``x`` (B, ...) to a :class:`FieldOutput`: the potential U (B,), the force
``F = -grad U`` on the state (B, ...), the distance to the nearest obstacle, the clearance (negative
inside a hard collision radius, which marks a collision) and how many obstacles act. Subclasses
implement :meth:`Field._sums`, which returns float64 sums over their obstacles for the embeddings
``P(x)`` (B, d); :meth:`Field.evaluate` does the rest, in this order:

1. **checks**: a floating tensor (B, ...) with B >= 1 and finite values; the embeddings (B, d)
   from ``projection`` (default: flatten) finite and of the field's dimension ``dim``; the noise
   level ``t`` (a number, or one per state) finite and in [0, 1];
2. **sums** (float64) from the subclass, at the embeddings and, with ``t``, the noise level t
   (the obstacles noised to level t: centres ``(1 - t) o_j`` under ``x_t = (1-t) x0 + t eps``);
3. **cap**: ``U <= max_potential`` and ``|F| <= max_force`` (by norm, in the embedding space);
4. **pull-back**: for a projection P the force on the state is ``J_P(x)^T F(P(x))`` (autograd);
5. **finite range**: every output held within ``finfo(dtype).max / 2`` of the state's dtype (the
   force by norm), then cast to that dtype.

So no NaN or Inf leaves a field for a finite state, whatever the subclass computes, as long as
its sums are finite or +-inf (never NaN).

**Subnormal and huge values.** The cap and the finite range scale a force row by
``cap / |F|`` (:func:`guidance.numerics.clip_norm`): where ``1 / |F|`` is not a normal number
(a subnormal ``|F|``, e.g. with ``eta = 1e-315``, or a norm that overflows) the row is first
scaled by its largest entry, so no reciprocal overflows and no ``0 * inf`` arises; ordinary rows
get the same bits as ever. The pull-back ``J^T F`` is formed with ``F`` itself where that is
finite in the projection's dtype, else with the unit direction ``F / |F|`` and scaled by ``|F|``
after (float64, held within the finite range); a projection whose Jacobian is not finite at the
states (or overflows even for a unit ``F``) raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from guidance.checks import check_number
from guidance.numerics import clip_norm, safe_norm

__all__ = ["Field", "FieldOutput", "Projection", "check_states", "safe_norm"]

Projection = Callable[[torch.Tensor], torch.Tensor]


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
    """Hold values within finfo(dtype).max / 2 (by row norm for (B, n) vectors, direction kept,
    :func:`~guidance.numerics.clip_norm`), cast to dtype."""
    big = float(torch.finfo(dtype).max) / 2
    if norm:
        return clip_norm(v, big).to(dtype)
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
                force = self._pull_back(x, emb, xr, f_emb)
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
            if need_force and not emb.requires_grad:
                raise ValueError(
                    "the projection's output does not depend differentiably on the states (no "
                    "autograd graph: detached, or computed outside torch), so the force cannot "
                    "be pulled back: write the projection with differentiable torch operations"
                )
        dim = self.dim
        if dim is not None and emb.shape[1] != dim:
            raise ValueError(
                f"dimension mismatch: states embed to d={emb.shape[1]} but {self._what} "
                f"have d={dim} (pass a projection= that maps states to its embedding space)"
            )
        return emb, xr

    def _pull_back(self, x, emb, xr, f_emb: torch.Tensor) -> torch.Tensor:
        """``J_P(x)^T F`` (B, ...) float64 for the embedding force ``f_emb`` (B, d) float64.

        With ``F`` itself when it is finite in the projection's dtype and the product is finite;
        else with the unit rows ``F / |F|``, scaled by ``|F|`` after in float64 (the norm held
        within half the float64 range, which the finite range then narrows to the state's
        dtype). Raises ``ValueError`` when even the unit product is not finite: the projection's
        Jacobian is not finite (or overflows) at these states."""
        go = f_emb.to(emb.dtype)
        if bool(torch.isfinite(go).all()):
            (g,) = torch.autograd.grad(emb, xr, grad_outputs=go, retain_graph=True)
            if bool(torch.isfinite(g).all()):
                return g.to(torch.float64)
        n = safe_norm(f_emb)  # finite: the capped sums are
        unit = f_emb / torch.where(n > 0, n, torch.ones_like(n))[:, None]
        (g,) = torch.autograd.grad(emb, xr, grad_outputs=unit.to(emb.dtype))
        g = g.to(torch.float64).reshape(x.shape[0], -1)
        if not bool(torch.isfinite(g).all()):
            raise ValueError(
                "the projection's Jacobian is not finite at these states (J_P(x)^T F is NaN or "
                "Inf even for a unit force): use a projection that is differentiable there, "
                "with a Jacobian within the dtype's range"
            )
        big = float(torch.finfo(torch.float64).max) / 2
        limit = torch.div(torch.full_like(n, big), n)  # +inf for n = 0 or tiny n: no clip
        return (clip_norm(g, limit) * n[:, None]).reshape(x.shape)

    @staticmethod
    def _levels(t, b: int, device) -> torch.Tensor | None:
        """``1 - t`` (B,) float64 for the noisy mode (the scale of the noised centres), or None.
        Raises ``ValueError`` unless ``t`` is a number or B numbers, finite and in [0, 1]."""
        if t is None:
            return None
        try:
            tt = torch.as_tensor(t, dtype=torch.float64, device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"t must be a number or a tensor of B={b} times; got {t!r}") from err
        if tt.numel() not in (1, b):
            raise ValueError(
                f"t must be a number or B={b} times (shape ({b},)); got shape {tuple(tt.shape)}"
            )
        if not bool(((tt >= 0) & (tt <= 1)).all()):  # also false for NaN
            bad = tt.reshape(-1)[~((tt >= 0) & (tt <= 1)).reshape(-1)][:3].tolist()
            raise ValueError(f"t must be finite and in [0, 1] (1 is pure noise); got {bad}")
        return 1 - (tt.reshape(()).expand(b) if tt.numel() == 1 else tt.reshape(b))

    def _cap(self, pot: torch.Tensor, force: torch.Tensor, need_force: bool):
        """The potential and the force held to ``max_potential`` and ``max_force`` (by norm,
        without a reciprocal that overflows: :func:`~guidance.numerics.clip_norm`)."""
        pot = torch.clamp(pot, max=self.max_potential)
        if need_force and math.isfinite(self.max_force):
            force = clip_norm(force, self.max_force)
        return pot, force
