r"""Guidance as a wrapper of the velocity (the pattern of k-diffusion's ``CFGDenoiser``).

``Guided(velocity, field, strength=..., window=..., mode=..., weight=...)`` is itself a velocity
``v'(x, t)``: every sampler, step function and search takes it where it takes a model. Inside the
window ``t_lo <= t <= t_hi`` it displaces the clean estimate by the field's force,

    delta = strength * weight(t) * F,        v' = v - delta,

which moves ``x0_hat`` by ``delta`` while keeping ``eps_hat`` fixed
(:mod:`guidance.sampling.convention`). ``F`` is evaluated once per call:

* ``mode="clean"`` (default): at the model's clean estimate, ``F = F(x0_hat)``;
* ``mode="noisy"``: at the state ``x_t`` itself against the obstacles noised to level t (centres
  ``(1-t) o_j``; ``field.evaluate(x, t)``), the distance ``D(x_t, t)`` read literally on the
  noisy state.

:meth:`Guided.predict` returns the whole :class:`~guidance.sampling.Prediction`: the guided
``v``, the model's (unguided) ``x0_hat`` and ``eps_hat``, ``delta`` and the field's output, so
that a caller can reuse that one evaluation (backtracking's collision check, SMC's proposal
correction and clearance potential). With ``strength = 0``, or when no state is inside the window,
the field is not evaluated and ``v'`` is the model's ``v`` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cspace.models.space import check_same_space, space_of
from guidance.checks import check_number, check_window
from guidance.sampling.convention import (
    NonFiniteVelocityError,
    Prediction,
    Velocity,
    batch_times,
    predict,
)

__all__ = ["MODES", "Guided"]

MODES = ("clean", "noisy")


class Guided:
    """A velocity guided by a field (module docstring); call it as ``v'(x, t)``.

    Args:
        velocity: the model ``v(x, t)`` (or another guidance wrapper).
        field: ``RepulsiveField``, ``ClassifierField``, ``CombinedField`` (anything with
            ``evaluate(x, t=None, *, need_force=True) -> FieldOutput``).
        strength: >= 0; 0 switches the displacement off.
        window: ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1``; guidance acts while
            ``t_lo <= t <= t_hi``.
        mode: ``"clean"`` (field on x0_hat) or ``"noisy"`` (field on x_t).
        weight: ``lambda(t)`` for times (B,), returning (B,); default 1.

    Raises:
        ValueError: a bad strength, window or mode (the message names the value).
        TypeError: a velocity that is not callable or a field without ``evaluate``.
    """

    def __init__(
        self,
        velocity: Velocity,
        field,
        *,
        strength: float = 1.0,
        window: tuple[float, float] = (0.0, 1.0),
        mode: str = "clean",
        weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not callable(velocity):
            raise TypeError(
                f"Guided needs a velocity callable v(x, t); got {type(velocity).__name__}"
            )
        if not callable(getattr(field, "evaluate", None)):
            raise TypeError(
                f"Guided needs a field with an evaluate() method (RepulsiveField, "
                f"ClassifierField, CombinedField); got {type(field).__name__}"
            )
        strength = check_number(strength, "strength")
        lo, hi = check_window(window)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if weight is not None and not callable(weight):
            raise TypeError(f"weight must be a callable lambda(t) or None; got {weight!r}")
        check_same_space(
            space_of(velocity),
            space_of(field),
            f"the velocity ({type(velocity).__name__})",
            f"the field ({type(field).__name__})",
            fix="guide a model with obstacles built in its own latent space (the encoder its "
            "latents come from, at its image size)",
        )
        self.velocity, self.field, self.strength = velocity, field, strength
        self.window, self.mode, self.weight = (lo, hi), mode, weight
        #: the C-space of the model and the field (None: neither records one)
        self.space = space_of(velocity) or space_of(field)
        #: the largest |delta| this wrapper has applied (to name it when the model then fails)
        self.largest_displacement = 0.0

    def in_window(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which of the times ``t`` (B,) lie inside the window."""
        lo, hi = self.window
        return (t >= lo) & (t <= hi)

    def predict(self, x: torch.Tensor, t: torch.Tensor | float) -> Prediction:
        """The guided prediction at states ``x`` (B, ...) and times ``t`` (B,) (or a number):
        ``v' = v - strength * weight(t) * F`` inside the window (module docstring)."""
        t = batch_times(t, x)
        try:
            p = predict(self.velocity, x, t)
        except NonFiniteVelocityError as err:
            self._blame_displacement(err)
            raise
        if self.strength == 0:
            return p
        inwin = self.in_window(t)
        if not bool(inwin.any()):
            return p
        if self.mode == "clean":
            ev = self.field.evaluate(p.x0_hat, need_force=True)
        else:
            ev = self.field.evaluate(x, t)
        lam = torch.ones_like(t) if self.weight is None else self.weight(t)
        if not isinstance(lam, torch.Tensor) or lam.shape != t.shape:
            got = tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__
            raise ValueError(
                f"weight(t) must return a tensor of the times' shape {tuple(t.shape)}; got {got}"
            )
        self._check_finite(lam, inwin, ev.force, t)
        scale = torch.where(inwin, self.strength * lam, torch.zeros_like(t))
        delta = scale.reshape((-1,) + (1,) * (x.ndim - 1)) * ev.force
        out = p.displaced(delta, field=ev, field_mode=self.mode, field_source=self.field)
        if not bool(torch.isfinite(out.v).all()):
            self._overflow(out.v, delta, lam, ev.force, t)
        self.largest_displacement = max(self.largest_displacement, float(delta.abs().max()))
        return out

    def _blame_displacement(self, err: NonFiniteVelocityError) -> None:
        """The model failed at states beyond ``sqrt(float max)`` (where squared distances
        overflow) after this wrapper displaced states by as much: name the displacement."""
        limit = math.sqrt(torch.finfo(torch.float32).max)  # 1.8e19: float32 models overflow
        if err.largest_state > limit and self.largest_displacement > limit:
            raise ValueError(
                f"{err}. Guidance had displaced states by up to {self.largest_displacement:.3g} "
                f"(strength {self.strength:g} x weight(t) x the field's force), beyond what the "
                "model can take: lower the strength or the field's eta (or cap its force with "
                "max_force)"
            ) from err

    def _check_finite(self, lam, inwin, force, t) -> None:
        """Name the culprit of a non-finite displacement before it is applied: the weight
        (inside the window) or the field's force."""
        bad = inwin & ~torch.isfinite(lam)
        if bool(bad.any()):
            raise ValueError(
                f"the weight function returned NaN or Inf for {int(bad.sum())} of {t.numel()} "
                f"times (first at t={float(t[bad][0]):.4g}, value {float(lam[bad][0])}); "
                "weight(t) must return finite numbers"
            )
        rows = ~torch.isfinite(force).reshape(force.shape[0], -1).all(dim=1)
        if bool(rows.any()):
            raise ValueError(
                f"the field ({type(self.field).__name__}) returned a NaN or Inf force for "
                f"{int(rows.sum())} of {force.shape[0]} states at t={float(t[rows][0]):.4g}; "
                "check the field's parameters (Q*, eta, max_force)"
            )

    def _overflow(self, v, delta, lam, force, t) -> None:
        """The guided velocity is not finite although the weight and the force are: the
        displacement ``strength * weight(t) * F`` (or ``v - delta``) overflowed."""
        rows = ~torch.isfinite(v).reshape(v.shape[0], -1).all(dim=1)
        what = (
            "the displacement strength x weight(t) x force"
            if not bool(torch.isfinite(delta).all())
            else "the guided velocity v - strength x weight(t) x force"
        )
        raise ValueError(
            f"{what} overflowed to NaN or Inf for {int(rows.sum())} of {v.shape[0]} states at "
            f"t={float(t[rows][0]):.4g} (strength={self.strength:g}, largest |weight| "
            f"{float(lam.abs().max()):.4g}, largest |force| {float(force.abs().max()):.4g}); "
            "lower the strength"
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The guided velocity ``v'(x, t)``; (B, ...)."""
        return self.predict(x, t).v

    def __repr__(self) -> str:
        return (
            f"Guided({self.velocity!r}, {type(self.field).__name__}, strength={self.strength}, "
            f"window={self.window}, mode={self.mode!r})"
        )
