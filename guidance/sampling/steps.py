r"""One step of each sampling method, shared by :func:`~guidance.sample`, backtracking and SMC.

Every step function is ``step(velocity, x, t, t_next, *, noise_scale=1.0, generator=None) ->
Step`` for states ``x`` (B, ...) at times ``t`` (B,) going to ``t_next`` (B,) (numbers are
repeated for every state); write ``h = t - t_next > 0`` and ``v``, ``eps_hat`` for the
:class:`~guidance.sampling.Prediction` of ``velocity`` at ``(x, t)`` (guided when ``velocity`` is
a :class:`~guidance.Guided`):

* ``euler_step``: ``x' = x - h v`` (1 NFE per state);
* ``heun_step``: ``x~ = x - h v(x, t)``, ``x' = x - h (v(x, t) + v(x~, t_next)) / 2`` (2 NFE);
* ``sde_step``: the Euler-Maruyama step of the marginal-preserving SDE,

      mean = x - h v - h (g^2 / 2t) eps_hat,        x' = mean + sqrt(g^2 h) z,

  with ``g^2 = noise_scale * t`` (so ``g^2 / 2t = noise_scale / 2``) and ``z ~ N(0, I)``
  (1 NFE). With score ``= -eps_hat / t`` this is the probability-flow ODE plus a Langevin term
  ``(g^2/2) score ds + g dW``, which leaves every marginal p_t unchanged (Fokker-Planck) for any
  ``noise_scale >= 0``; ``noise_scale = 0`` is Euler. The score keeps the *unguided*
  ``eps_hat``: guidance changes only ``v``.

``euler_step`` and ``heun_step`` ignore ``noise_scale`` and ``generator``. The returned
:class:`Step` holds the next state, the step's deterministic part ``mean`` (the next state for
the ODE steps), the model's ``x0_hat`` at ``(x, t)``, the whole prediction, the NFE and the noise
variance per coordinate (SDE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from guidance.checks import check_number
from guidance.sampling.convention import Prediction, Time, Velocity, batch_times, predict

__all__ = ["STEPS", "Step", "euler_step", "heun_step", "sde_step"]


@dataclass
class Step:
    """One step from ``t`` to ``t_next`` for B states.

    Attributes:
        x_next: (B, ...) the next states.
        mean: (B, ...) the deterministic part of the step (``x_next`` for Euler and Heun; for the
            SDE ``x - h v - h (g^2/2t) eps_hat``, before the noise is added).
        x0_hat: (B, ...) the model's clean estimate at the current states (unguided).
        prediction: the :class:`~guidance.sampling.Prediction` at the current states (the first
            one for Heun): guided ``v``, ``x0_hat``, ``eps_hat``, ``delta``, the field output.
        nfe: velocity evaluations of single states (B per evaluation).
        calls: batched velocity calls.
        h: (B, 1, ..., 1) the step sizes ``t - t_next``.
        noise_var: (B, 1, ..., 1) the variance ``g^2 h`` of the noise added per coordinate
            (SDE), None for the ODE steps.
    """

    x_next: torch.Tensor
    mean: torch.Tensor
    x0_hat: torch.Tensor
    prediction: Prediction
    nfe: int
    calls: int
    h: torch.Tensor
    noise_var: torch.Tensor | None = None


def _shape1(x: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.ndim - 1)


def _begin(velocity: Velocity, x: torch.Tensor, t: Time, t_next: Time):
    """What every step starts with: the times as (B,), the step ``h = t - t_next`` shaped to
    broadcast over ``x``, and the prediction at ``(x, t)``."""
    t, t_next = batch_times(t, x), batch_times(t_next, x)
    h = (t - t_next).reshape(_shape1(x))
    return t, t_next, h, predict(velocity, x, t)


def euler_step(
    velocity: Velocity,
    x: torch.Tensor,
    t: Time,
    t_next: Time,
    *,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Step:
    """``x' = x - h v(x, t)`` (module docstring); ``noise_scale`` and ``generator`` unused."""
    t, t_next, h, p = _begin(velocity, x, t, t_next)
    x_next = x - h * p.v
    return Step(x_next, x_next, p.x0_hat, p, nfe=x.shape[0], calls=1, h=h)


def heun_step(
    velocity: Velocity,
    x: torch.Tensor,
    t: Time,
    t_next: Time,
    *,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Step:
    """``x' = x - h (v(x, t) + v(x - h v(x, t), t_next)) / 2`` (module docstring)."""
    t, t_next, h, p = _begin(velocity, x, t, t_next)
    p2 = predict(velocity, x - h * p.v, t_next)
    x_next = x - h * (p.v + p2.v) / 2
    return Step(x_next, x_next, p.x0_hat, p, nfe=2 * x.shape[0], calls=2, h=h)


def sde_step(
    velocity: Velocity,
    x: torch.Tensor,
    t: Time,
    t_next: Time,
    *,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> Step:
    """``x' = x - h v - h (noise_scale/2) eps_hat + sqrt(noise_scale t h) z`` (module
    docstring); ``z`` is drawn from ``generator`` after the velocity is evaluated, or is
    ``noise`` (same shape as ``x``) when given (a distributed run draws every particle's noise
    on every rank and passes each rank its rows)."""
    noise_scale = check_number(noise_scale, "noise_scale")
    t, t_next, h, p = _begin(velocity, x, t, t_next)
    tb = t.reshape(_shape1(x))
    if noise is None:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(
            f"noise must have the states' shape {tuple(x.shape)}; got {tuple(noise.shape)}"
        )
    else:
        z = noise.to(device=x.device, dtype=x.dtype)
    mean = x - h * p.v - h * (noise_scale / 2) * p.eps_hat
    var = noise_scale * tb * h
    x_next = mean + torch.sqrt(var) * z
    return Step(x_next, mean, p.x0_hat, p, nfe=x.shape[0], calls=1, h=h, noise_var=var)


StepFunction = Callable[..., Step]
#: method name -> step function
STEPS: dict[str, StepFunction] = {"euler": euler_step, "heun": heun_step, "sde": sde_step}
