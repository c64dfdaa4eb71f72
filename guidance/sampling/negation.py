r"""The negation denoiser (Safe Denoiser, Kim et al. 2025, arXiv 2502.08011) as a velocity
wrapper.

Split the data into a safe and an unsafe part. The model's denoiser is the mixture of both,

    E[x0 | x_t] = (1 - beta) E_safe[x0 | x_t] + beta E_unsafe[x0 | x_t],
    beta = P(unsafe | x_t),

so the safe denoiser is ``E_safe = (E - beta E_unsafe) / (1 - beta)``, a displacement of the
model's clean estimate by

    delta_x0 = E_safe - x0_hat = beta / (1 - beta) (x0_hat - E_unsafe).

**The negation set is the obstacles' own examples** ``y_i`` (an obstacle set's embeddings, the
toy's ball centres), and ``E_unsafe`` their kernel-weighted mean under the forward kernel of our
path, ``x_t | x0 = y ~ N((1 - t) y, t^2 I)``:

    E_unsafe = sum_i w_i y_i,   w_i proportional to exp(-|x_t - (1 - t) y_i|^2 / (2 t^2)).

**The unsafe probability without the exact density.** The paper's ``beta`` is a ratio of the
unsafe part's density to the data density at ``x_t``, which a user with a trained model and a
few examples does not have (a kernel density of 40 examples in 32 dimensions is not a density
estimate of a class). We use instead the quantity the twisted SMC already estimates, from the
same hard regions that define a collision: ``beta = 1 - phi_t``, the probability that a Gaussian
of spread ``s(t)`` around ``x0_hat`` lies inside some hard region
(:func:`guidance.search.twisted.twist_log_probability`'s geometry, ``s(t)^2 = a^2 t^2 / ((1-t)^2
a^2 + t^2)``, ``a = data_scale``). It is 0 far from the obstacles (the model's velocity, bit for
bit), grows as the clean estimate approaches one, and needs nothing but the model and the
obstacles. It is capped at ``beta_max`` (< 1) because ``1 / (1 - beta)`` diverges.

**As a velocity.** Replacing the denoiser (``x0_hat(x_t, v') = E_safe``) is, in our convention
``x0_hat = x - t v``, the velocity

    v' = v - delta_x0 / t,

not ``v - delta_x0`` (which moves ``x0_hat`` with ``eps_hat`` fixed, :class:`~guidance.Guided`'s
displacement). :meth:`NegationDenoiser.predict` returns the model's ``x0_hat`` and ``eps_hat``
with ``delta = strength x delta_x0 / t``, so SMC's proposal correction
(:func:`guidance.search.smc.proposal_log_ratio`) applies unchanged. Inside ``window`` only; at
``t = 0`` nothing is displaced.

For diffusers pipelines :meth:`NegationDenoiser.clean_displacement` gives ``delta_x0`` for any
``x_t = alpha x0 + sigma eps`` (kernel ``N(alpha y, sigma^2 I)``), which
:func:`guidance.integrations.guide` turns into each prediction type's output.
"""

from __future__ import annotations

import torch

from cspace.models.space import space_of
from guidance.checks import check_number, check_window
from guidance.fields.regions import HardRegions, hard_regions
from guidance.sampling.convention import Prediction, Velocity, batch_times, predict

__all__ = ["NegationDenoiser", "SafeDisplacement", "clean_spread"]


def clean_spread(t: torch.Tensor, data_scale: float, alpha: torch.Tensor | None = None):
    """The posterior std of x0 given ``x_t = alpha x0 + t eps`` for data locally ``N(m, a^2 I)``:
    ``a t / sqrt(alpha^2 a^2 + t^2)`` (``alpha = 1 - t`` by default); (B,)."""
    a = float(data_scale)
    alpha = 1 - t if alpha is None else alpha
    return a * t / torch.sqrt(alpha**2 * a**2 + t**2)


class SafeDisplacement:
    """The displacement of the clean estimate that replaces the model's denoiser by the safe one
    (module docstring), without a model: :class:`NegationDenoiser` and
    :func:`guidance.integrations.guide` (``mode="negation"``) share it.

    Args:
        obstacles: a :class:`~guidance.RepulsiveField` (or a CombinedField of them, or
            :class:`~guidance.fields.regions.HardRegions`): its examples are the negation set,
            its hard regions define ``beta``.
        data_scale: ``a`` of the spread ``s(t)`` (the data's local scale, > 0).
        temper: multiplies ``s(t)`` (> 0).
        beta_max: cap on ``beta`` (0 < beta_max < 1).
    """

    def __init__(
        self, obstacles, *, data_scale: float = 1.0, temper: float = 1.0, beta_max: float = 0.9
    ) -> None:
        self.regions: HardRegions = hard_regions(obstacles)
        if self.regions.balls == 0:
            raise ValueError(
                "the negation denoiser needs examples to negate (an obstacle set's field); a "
                "classifier's half-space has none"
            )
        self.data_scale = check_number(data_scale, "data_scale", strict=True)
        self.temper = check_number(temper, "temper", strict=True)
        self.beta_max = check_number(beta_max, "beta_max", strict=True)
        if not self.beta_max < 1:
            raise ValueError(f"beta_max must be in (0, 1); got {beta_max!r}")
        #: the beta of each state of the last call (B,) (for reports)
        self.last_beta: torch.Tensor | None = None

    def beta(self, x0_hat: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """``beta = min(1 - phi, beta_max)``, ``phi = P(N(x0_hat, spread^2 I) free)``; (B,)."""
        log_free = self.regions.log_outside_probability(x0_hat, spread)
        return (-torch.expm1(log_free)).clamp(0.0, self.beta_max)

    def clean_displacement(
        self, x: torch.Tensor, x0_hat: torch.Tensor, alpha, sigma, t=None
    ) -> torch.Tensor:
        """``delta_x0 = beta / (1 - beta) (x0_hat - E_unsafe)`` (B, ...) for states
        ``x = alpha x0 + sigma eps`` (``alpha``, ``sigma`` numbers or (B,), sigma > 0); ``t`` is
        the noise level of the spread (default ``sigma``)."""
        b = x.shape[0]
        dev = x.device
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=dev).reshape(-1).expand(b)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=dev).reshape(-1).expand(b)
        tt = sigma if t is None else torch.as_tensor(t, dtype=torch.float64, device=dev)
        tt = tt.reshape(-1).expand(b)
        spread = self.temper * clean_spread(tt, self.data_scale, alpha)
        x0 = x0_hat.reshape(b, -1).to(torch.float64)
        beta = self.beta(x0, spread)
        self.last_beta = beta
        unsafe = self.unsafe_mean(x, alpha, sigma)
        factor = beta / (1 - beta)
        return (factor[:, None] * (x0 - unsafe)).reshape(x0_hat.shape)

    def unsafe_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """``E_unsafe`` (B, d): the negation examples ``y_i`` weighted by
        ``N(x; alpha y_i, sigma^2 I)`` (softmax of ``-|x - alpha y_i|^2 / 2 sigma^2``, distances
        from differences, in blocks of states)."""
        e = x.reshape(x.shape[0], -1).to(torch.float64)
        y = self.regions.centres.to(e.device)  # (N, d)
        out = torch.empty_like(e)
        rows = max(1, (1 << 24) // max(1, y.shape[0] * y.shape[1]))
        for lo in range(0, e.shape[0], rows):
            sl = slice(lo, lo + rows)
            diff = e[sl, None, :] - alpha[sl, None, None] * y[None]  # (b, N, d)
            d2 = (diff * diff).sum(-1)
            logits = -d2 / (2 * sigma[sl, None] ** 2)
            out[sl] = torch.softmax(logits, dim=1) @ y
        return out


class NegationDenoiser:
    """The safe denoiser around ``velocity`` (module docstring); call it as ``v'(x, t)``.

    Args:
        velocity: the model ``v(x, t)``.
        obstacles: a :class:`~guidance.RepulsiveField` (or a CombinedField of them, or
            :class:`~guidance.fields.regions.HardRegions`): its examples are the negation set,
            its hard regions define ``beta``.
        data_scale: ``a`` of the spread ``s(t)`` (the data's local scale).
        temper: multiplies ``s(t)``.
        beta_max: cap on ``beta`` (0 < beta_max < 1).
        strength: multiplies the displacement (1: the safe denoiser itself).
        window: ``(t_lo, t_hi)``: where the denoiser is replaced.
    """

    def __init__(
        self,
        velocity: Velocity,
        obstacles,
        *,
        data_scale: float = 1.0,
        temper: float = 1.0,
        beta_max: float = 0.9,
        strength: float = 1.0,
        window: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if not callable(velocity):
            raise TypeError(f"NegationDenoiser needs a velocity v(x, t); got {velocity!r}")
        self.velocity = velocity
        self.safe = SafeDisplacement(
            obstacles, data_scale=data_scale, temper=temper, beta_max=beta_max
        )
        self.regions = self.safe.regions
        self.data_scale, self.beta_max = self.safe.data_scale, self.safe.beta_max
        self.strength = check_number(strength, "strength")
        self.window = check_window(window)
        self.space = space_of(velocity) or space_of(obstacles)

    @property
    def last_beta(self) -> torch.Tensor | None:
        """The beta of each state of the last call (B,)."""
        return self.safe.last_beta

    def clean_displacement(self, x, x0_hat, alpha, sigma, t=None) -> torch.Tensor:
        """:meth:`SafeDisplacement.clean_displacement`."""
        return self.safe.clean_displacement(x, x0_hat, alpha, sigma, t)

    def in_window(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.window
        return (t >= lo) & (t <= hi) & (t > 0)

    def predict(self, x: torch.Tensor, t: torch.Tensor | float) -> Prediction:
        """The model's prediction with ``delta = strength delta_x0 / t`` inside the window."""
        t = batch_times(t, x)
        p = predict(self.velocity, x, t)
        inwin = self.in_window(t)
        if self.strength == 0 or not bool(inwin.any()):
            return p
        tt = t.to(torch.float64)
        t_safe = torch.where(inwin, tt, torch.ones_like(tt))
        dx0 = self.clean_displacement(x, p.x0_hat, 1 - t_safe, t_safe)
        scale = torch.where(inwin, self.strength / t_safe, torch.zeros_like(tt))
        delta = (scale.reshape((-1,) + (1,) * (x.ndim - 1)) * dx0.to(torch.float64)).to(x.dtype)
        if not bool(torch.isfinite(delta).all()):  # pragma: no cover - beta is capped
            raise ValueError("the negation denoiser's displacement is not finite")
        return p.displaced(delta)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.predict(x, t).v

    def __repr__(self) -> str:
        return (
            f"NegationDenoiser({self.velocity!r}, {self.regions.balls} examples, "
            f"data_scale={self.data_scale:g}, beta_max={self.beta_max:g})"
        )
