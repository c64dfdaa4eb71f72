r"""Samplers for flow-matching models, with the repulsive field and collision backtracking.

Convention: t = 1 is noise, t = 0 is data, ``x_t = (1-t) x0 + t eps``, the model predicts
``v = eps - x0``. Time runs down a grid ``1 = t_0 > t_1 > ... > t_S = 0`` (uniform by default).
Write ``h = t_i - t_{i+1} > 0``. From one velocity the clean and noise estimates are

    x0_hat = x - t v,        eps_hat = x + (1 - t) v.

Methods (one step from t to t - h):

* ``euler``:  ``x <- x - h v``  (1 NFE);
* ``heun``:   ``x' = x - h v(x, t)``, ``x <- x - h (v(x, t) + v(x', t - h)) / 2``  (2 NFE);
* ``sde``:    ``x <- x - h v - h (g^2 / 2t) eps_hat + g sqrt(h) z``, ``g^2 = noise_scale * t``,
  ``z ~ N(0, I)`` (1 NFE). With score ``= -eps_hat / t`` this is the probability-flow ODE plus a
  Langevin term ``(g^2/2) score ds + g dW``, which leaves every marginal p_t unchanged (Fokker-Planck),
  for any ``noise_scale >= 0``; ``noise_scale = 0`` is Euler.

Guidance. Inside ``window = (t_lo, t_hi)`` the field displaces the clean estimate,

    v' = v - strength * weight(t) * F(x0_hat)          ("clean" mode, the default),

which moves ``x0_hat`` by ``delta = strength * weight(t) * F`` while keeping ``eps_hat`` fixed
(``eps' - (x0_hat + delta) = v - delta``). In "noisy" mode ``F`` is evaluated at ``x_t`` itself against
the obstacles noised to level t (centres ``(1-t) o_j``): the seed's literal ``D(x_t, t)``.
In the SDE step the score keeps the unguided ``eps_hat``.

Backtracking (seed 002: "feel the pain and revert"). With ``backtrack=Backtrack(revert=k,
max_retries=r)`` and the SDE, whenever a sample's ``x0_hat`` (inside ``window``, and the final
sample itself) lies inside a hard collision radius, that sample goes back k steps and the noise of
that segment is drawn again; after r retries it goes on unchecked. Retries and NFE are reported.

NFE are counted per sample: one velocity evaluation of one state is one NFE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

__all__ = ["METHODS", "Backtrack", "SampleOutput", "sample", "time_grid"]

METHODS = ("euler", "heun", "sde")
MODES = ("clean", "noisy")
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backtrack:
    """Collision backtracking settings: revert ``revert`` steps, at most ``max_retries`` times
    per sample."""

    revert: int = 10
    max_retries: int = 20

    def __post_init__(self) -> None:
        if int(self.revert) < 1 or int(self.max_retries) < 0:
            raise ValueError(
                f"Backtrack needs revert >= 1 and max_retries >= 0; got revert={self.revert}, "
                f"max_retries={self.max_retries}"
            )


@dataclass
class SampleOutput:
    """What a sampler run returns.

    Attributes:
        samples: (B, ...) the final states (t = last grid time, 0 by default).
        nfe: total velocity evaluations, summed over samples.
        model_calls: number of (batched) calls of ``velocity``.
        times: (S + 1,) the time grid.
        trajectory: (S + 1, B, ...) the states on the grid (the accepted path when
            backtracking), if ``return_trajectory``.
        retries: (B,) backtracking retries per sample (zeros without backtracking).
        collided: (B,) whether each final sample lies inside a hard collision radius, when a
            field was given, else None.
    """

    samples: torch.Tensor
    nfe: int
    model_calls: int
    times: torch.Tensor
    trajectory: torch.Tensor | None = None
    retries: torch.Tensor | None = None
    collided: torch.Tensor | None = None

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe / self.samples.shape[0]


def time_grid(
    steps: int, t_start: float = 1.0, t_end: float = 0.0, dtype=torch.float64
) -> torch.Tensor:
    """Uniform grid of ``steps + 1`` times from ``t_start`` down to ``t_end``."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if not 0 <= t_end < t_start <= 1:
        raise ValueError(f"need 0 <= t_end < t_start <= 1; got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, int(steps) + 1, dtype=dtype)


def _check_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(
            f"velocity returned {shape} for states of shape {tuple(x.shape)}; it must return a "
            "tensor of the same shape (v = eps - x0)"
        )
    if not bool(torch.isfinite(v).all()):
        bad = ~torch.isfinite(v).reshape(v.shape[0], -1).all(dim=1)
        raise ValueError(
            f"velocity returned NaN or Inf for {int(bad.sum())} of {v.shape[0]} states at "
            f"t={float(t[bad][0]):.4g}; check the model and its inputs"
        )
    return v.to(x.dtype)


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    *,
    steps: int = 50,
    method: str = "euler",
    times: torch.Tensor | None = None,
    noise_scale: float = 1.0,
    field=None,
    strength: float = 1.0,
    window: tuple[float, float] = (0.0, 1.0),
    mode: str = "clean",
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backtrack: Backtrack | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool | None = None,
    callback: Callable[[dict], None] | None = None,
) -> SampleOutput:
    """Integrate from ``noise`` (the state at ``times[0]``, 1 by default) down to ``times[-1]``.

    Args:
        velocity: ``v(x, t)`` for states (b, ...) and times (b,), returning (b, ...).
        noise: (B, ...) starting states.
        steps: number of steps on the uniform grid (ignored if ``times`` is given).
        method: ``"euler"``, ``"heun"`` or ``"sde"``.
        times: optional decreasing grid in [0, 1] (overrides ``steps``).
        noise_scale: the SDE's ``g^2 / t`` (>= 0).
        field: a :class:`~guidance.RepulsiveField` (or anything with its ``evaluate``), or None.
        strength: guidance strength (>= 0); 0 switches the displacement off.
        window: guidance acts while ``t_lo <= t <= t_hi``.
        mode: ``"clean"`` (field on x0_hat) or ``"noisy"`` (field on x_t).
        weight: ``lambda(t)`` for times (b,), default 1.
        backtrack: :class:`Backtrack` settings (SDE only; needs a field with hard radii).
        generator: random generator for the SDE noise.
        return_trajectory: also return the states on the grid.
        progress: show a tqdm bar (None: only on a terminal).
        callback: called after every step with a dict ``{"step", "t", "x", "x0_hat", "index"}``
            (``index`` holds the batch positions of the states in it).

    Returns:
        :class:`SampleOutput`.
    """
    # ------------------------------------------------------------------ validation
    if not isinstance(noise, torch.Tensor) or not torch.is_floating_point(noise) or noise.ndim < 1:
        raise ValueError("noise must be a floating tensor of shape (B, ...)")
    if noise.shape[0] == 0:
        raise ValueError("noise has batch size 0; nothing to sample")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or Inf")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if not (math.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(f"noise_scale must be a finite number >= 0; got {noise_scale}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0; got {strength}")
    t_lo, t_hi = (float(w) for w in window)
    if not 0 <= t_lo <= t_hi <= 1:
        raise ValueError(f"window must satisfy 0 <= t_lo <= t_hi <= 1; got {window}")
    if times is None:
        times = time_grid(steps)
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if times.numel() < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must hold at least 2 strictly decreasing values")
    if float(times[0]) > 1 or float(times[-1]) < 0:
        raise ValueError(f"times must lie in [0, 1]; got {float(times[0])} .. {float(times[-1])}")
    if backtrack is not None:
        if method != "sde" or noise_scale == 0:
            raise ValueError(
                "backtracking re-draws the noise of a segment, so it needs method='sde' with "
                "noise_scale > 0 (with an ODE the re-run segment would be identical)"
            )
        if field is None:
            raise ValueError("backtracking needs a field whose obstacles have hard collision radii")
    n_steps = times.numel() - 1
    dev, dt = noise.device, noise.dtype
    grid = times.to(device=dev, dtype=dt)
    guided = field is not None and strength > 0
    b = noise.shape[0]
    shape1 = (-1,) + (1,) * (noise.ndim - 1)

    # ------------------------------------------------------------------ one step
    calls = 0

    def vel(x: torch.Tensor, t: torch.Tensor, check: bool):
        """Guided velocity, its x0_hat, eps_hat and the collision flags (or None)."""
        nonlocal calls
        calls += 1
        v = _check_velocity(velocity(x, t), x, t)
        tb = t.reshape(shape1)
        x0 = x - tb * v
        eps = x + (1 - tb) * v
        collided = None
        if guided or check:
            inwin = (t >= t_lo) & (t <= t_hi)
            if mode == "clean":
                ev = field.evaluate(x0, need_force=guided)
            else:
                ev = field.evaluate(x, t) if guided else None
            if guided and bool(inwin.any()):
                lam = weight(t) if weight is not None else torch.ones_like(t)
                scale = torch.where(inwin, strength * lam, torch.zeros_like(t)).reshape(shape1)
                v = v - scale * ev.force
            if check:
                if mode != "clean":
                    ev = field.evaluate(x0, need_force=False)
                collided = ev.collided & inwin
        return v, x0, eps, collided

    def step(x: torch.Tensor, t: torch.Tensor, tn: torch.Tensor, check: bool):
        h = (t - tn).reshape(shape1)
        v, x0, eps, collided = vel(x, t, check)
        nfe = x.shape[0]
        if method == "euler":
            xn = x - h * v
        elif method == "heun":
            v2, *_ = vel(x - h * v, tn, False)
            nfe *= 2
            xn = x - h * (v + v2) / 2
        else:
            tb = t.reshape(shape1)
            z = torch.randn(x.shape, generator=generator, device=dev, dtype=dt)
            xn = x - h * v - h * (noise_scale / 2) * eps + torch.sqrt(noise_scale * tb * h) * z
        return xn, x0, collided, nfe

    # ------------------------------------------------------------------ the loop
    keep_path = return_trajectory or backtrack is not None
    path = torch.empty((n_steps + 1, *noise.shape), dtype=dt, device=dev) if keep_path else None
    x = noise.clone()
    if keep_path:
        path[0] = x
    idx = torch.zeros(b, dtype=torch.long, device=dev)
    retries = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    nfe = 0
    it = 0
    bar = tqdm(
        total=n_steps,
        desc="sampling",
        unit="step",
        disable=(not progress) if progress is not None else None,
    )
    check_bt = backtrack is not None
    while not bool(done.all()):
        act = torch.nonzero(~done).squeeze(1)
        xa, ia = x[act], idx[act]
        ta, tn = grid[ia], grid[ia + 1]
        can_retry = (
            check_bt & (retries[act] < (backtrack.max_retries if check_bt else 0)) & (ia > 0)
        )
        xn, x0, collided, used = step(xa, ta, tn, check_bt)
        nfe += used
        if callback is not None:
            callback({"step": it, "t": ta, "x": xn, "x0_hat": x0, "index": act})
        back = collided & can_retry if check_bt else torch.zeros_like(ia, dtype=torch.bool)
        fwd = ~back
        # samples that advance
        ia_new = torch.where(
            fwd, ia + 1, torch.clamp(ia - backtrack.revert, min=0) if check_bt else ia
        )
        x_new = torch.where(back.reshape(shape1), path[ia_new, act] if check_bt else xn, xn)
        if check_bt:
            finished = fwd & (ia_new == n_steps)
            if bool(finished.any()):  # the final sample is its own x0_hat: check it too
                ev = field.evaluate(xn[finished], need_force=False)
                again = ev.collided & (retries[act][finished] < backtrack.max_retries) & (t_lo <= 0)
                if bool(again.any()):
                    pos = torch.nonzero(finished).squeeze(1)[again]
                    back[pos] = True
                    ia_new[pos] = torch.clamp(ia[pos] - backtrack.revert, min=0)
                    x_new[pos] = path[ia_new[pos], act[pos]]
            retries[act] += back.long()
        fwd = ~back
        x[act] = x_new
        idx[act] = ia_new
        if keep_path:
            path[ia_new[fwd], act[fwd]] = x_new[fwd]
        done[act] = idx[act] >= n_steps
        it += 1
        bar.n = int(idx.min())
        bar.refresh()
    bar.close()
    collided_final = None
    if field is not None:
        collided_final = field.evaluate(x, need_force=False).collided
    return SampleOutput(
        samples=x,
        nfe=int(nfe),
        model_calls=calls,
        times=times,
        trajectory=path if return_trajectory else None,
        retries=retries,
        collided=collided_final,
    )
