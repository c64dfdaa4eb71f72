r"""The flow convention, in one place: clean and noise estimates and the velocity from them.

Time runs from t = 1 (noise) to t = 0 (data), ``x_t = (1-t) x0 + t eps`` and the model predicts
the velocity ``v = eps - x0`` (diffusers' flow-matching convention). From one
velocity at a state ``x`` (B, ...) and time ``t`` (B,) the estimates are

    x0_hat = x - t v,        eps_hat = x + (1 - t) v,        v = eps_hat - x0_hat,

and from a clean estimate alone ``v = (x - x0_hat) / t``. Guidance is a displacement ``delta``
of the clean estimate with ``eps_hat`` fixed, which is ``v' = v - delta`` (``eps_hat - (x0_hat +
delta)``). Every module of :mod:`guidance` that turns one of these quantities into another goes
through :class:`Prediction`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "NonFiniteVelocityError",
    "Prediction",
    "Predictor",
    "Velocity",
    "batch_times",
    "check_velocity",
    "predict",
]

#: ``v(x, t)`` for states (B, ...) and times (B,), returning (B, ...)
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Time = torch.Tensor | float


def _per_state(t: Time, x: torch.Tensor) -> Time:
    """``t`` ready to multiply states ``x`` (B, ...): a number stays a number (the arithmetic is
    then exactly ``x - t * v``), a tensor of times becomes (B, 1, ..., 1) in ``x``'s dtype."""
    if isinstance(t, torch.Tensor) and t.ndim > 0:
        return t.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return t


def batch_times(t: Time, x: torch.Tensor) -> torch.Tensor:
    """Times for the B states of ``x`` as a (B,) tensor in ``x``'s dtype and device (a number or
    a one-element tensor is repeated; a tensor of B values is kept, cast)."""
    b = x.shape[0]
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if tt.numel() == 1:
        return tt.reshape(1).repeat(b)
    if tt.numel() != b:
        raise ValueError(
            f"got {tt.numel()} times for {b} states; pass one time per state (shape ({b},)) "
            "or a single number"
        )
    return tt.reshape(b)


class NonFiniteVelocityError(ValueError):
    """A velocity returned NaN or Inf for finite states; :attr:`largest_state` is the largest
    ``|x|`` among the states concerned."""

    def __init__(self, message: str, largest_state: float) -> None:
        super().__init__(message)
        self.largest_state = largest_state


def check_velocity(v: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``v`` checked as a velocity for states ``x`` (same shape, finite), cast to ``x``'s dtype.

    Raises:
        ValueError: naming the returned shape; :class:`NonFiniteVelocityError` (a ValueError)
            naming how many states got NaN/Inf, at which t, and their largest ``|x|``.
    """
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(
            f"velocity returned {shape} for states of shape {tuple(x.shape)}; it must return a "
            "tensor of the same shape (v = eps - x0)"
        )
    if not bool(torch.isfinite(v).all()):
        bad = ~torch.isfinite(v).reshape(v.shape[0], -1).all(dim=1)
        tb = torch.as_tensor(t).reshape(-1).expand(v.shape[0])
        big = float(x.detach().reshape(x.shape[0], -1)[bad].abs().max())
        raise NonFiniteVelocityError(
            f"velocity returned NaN or Inf for {int(bad.sum())} of {v.shape[0]} states at "
            f"t={float(tb[bad][0]):.4g} (largest |x| among them {big:.3g}); check the model and "
            "its inputs",
            big,
        )
    return v.to(x.dtype)


@dataclass(frozen=True)
class Prediction:
    """One velocity evaluation in the flow convention (module docstring).

    Attributes:
        v: (B, ...) the velocity to step with: the model's, or the guided ``v - delta``.
        x0_hat: (B, ...) the model's clean estimate ``x - t v_model`` (before any displacement).
        eps_hat: (B, ...) the model's noise estimate ``x + (1 - t) v_model``.
        delta: (B, ...) the displacement of the clean estimate that guidance applied
            (``v = v_model - delta``), or None when nothing displaced it.
        field: the ``FieldOutput`` the guidance evaluated (reusable, e.g. for a collision check),
            or None.
        field_mode: where ``field`` was evaluated: ``"clean"`` (at ``x0_hat``) or ``"noisy"``
            (at ``x_t`` against the obstacles noised to level t); None without ``field``.
        field_source: the field object that produced ``field`` (None without it).
    """

    v: torch.Tensor
    x0_hat: torch.Tensor
    eps_hat: torch.Tensor
    delta: torch.Tensor | None = None
    field: Any = None
    field_mode: str | None = None
    field_source: Any = None

    @classmethod
    def from_velocity(cls, x: torch.Tensor, t: Time, v: torch.Tensor) -> Prediction:
        """From a velocity: ``x0_hat = x - t v``, ``eps_hat = x + (1 - t) v``.

        Args:
            x: (B, ...) states; t: a number or (B,) times; v: (B, ...) velocities.
        """
        tb = _per_state(t, x)
        return cls(v=v, x0_hat=x - tb * v, eps_hat=x + (1 - tb) * v)

    @classmethod
    def from_clean(cls, x: torch.Tensor, t: Time, x0_hat: torch.Tensor) -> Prediction:
        """From a clean estimate: ``v = (x - x0_hat) / t``, ``eps_hat = x + (1 - t) v``
        (t > 0; a number or (B,) times)."""
        tb = _per_state(t, x)
        v = (x - x0_hat) / tb
        return cls(v=v, x0_hat=x0_hat, eps_hat=x + (1 - tb) * v)

    @staticmethod
    def velocity(x0_hat: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """The velocity of a clean and a noise estimate: ``v = eps_hat - x0_hat``."""
        return eps_hat - x0_hat

    def displaced(
        self,
        delta: torch.Tensor,
        *,
        field: Any = None,
        field_mode: str | None = None,
        field_source: Any = None,
    ) -> Prediction:
        """The clean estimate moved by ``delta`` with ``eps_hat`` fixed: ``v' = v - delta``.

        ``x0_hat`` and ``eps_hat`` stay the model's; ``delta`` accumulates over nested
        displacements; the field evaluation that gave ``delta`` is kept for reuse.
        """
        total = delta if self.delta is None else self.delta + delta
        return dataclasses.replace(
            self,
            v=self.v - delta,
            delta=total,
            field=field,
            field_mode=field_mode,
            field_source=field_source,
        )


@runtime_checkable
class Predictor(Protocol):
    """A velocity that also gives its whole :class:`Prediction` (e.g. :class:`~guidance.Guided`)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> Prediction: ...


def predict(velocity: Velocity | Predictor, x: torch.Tensor, t: torch.Tensor) -> Prediction:
    """The :class:`Prediction` of ``velocity`` at states ``x`` (B, ...) and times ``t`` (B,): its
    own ``predict`` when it has one (a guidance wrapper), else the checked ``v(x, t)`` read
    through the convention. One model evaluation per state either way."""
    own = getattr(velocity, "predict", None)
    if callable(own):
        p = own(x, t)
        if not isinstance(p, Prediction):
            raise TypeError(
                f"{type(velocity).__name__}.predict returned {type(p).__name__}; a velocity with "
                "a predict() method must return a guidance.sampling.Prediction (or drop predict "
                "and return v from __call__)"
            )
        return p
    return Prediction.from_velocity(x, t, check_velocity(velocity(x, t), x, t))
