r"""The sampler: integrate a (possibly guided) velocity over a time grid, with backtracking.

Convention (:mod:`guidance.sampling.convention`): t = 1 is noise, t = 0 is data,
``x_t = (1-t) x0 + t eps``, the model predicts ``v = eps - x0``. Time runs down a grid
``1 = t_0 > t_1 > ... > t_S = 0`` (uniform by default); each step is one of
:mod:`guidance.sampling.steps` (``euler``, ``heun``, ``sde``). Guidance is not a keyword of the
sampler: pass a :class:`~guidance.Guided` velocity.

Backtracking ("feel the pain and revert": undo the steps that led into an obstacle). With ``backtrack=Backtrack(revert=k,
max_retries=r, field=...)`` and the SDE, whenever a sample's ``x0_hat`` (at a time inside the
backtracking window, and the final sample itself when the window reaches t = 0) lies inside a
hard collision radius of the field, that sample goes back k steps and the noise of that segment
is drawn again; after r retries it goes on unchecked. ``field=None`` means the field of the
:class:`~guidance.Guided` velocity, ``window=None`` its window (else ``(0, 1)``). When the guided
step already evaluated that field at ``x0_hat`` (clean mode) its output is reused: no second
evaluation. Retries and NFE are reported.

NFE are counted per sample: one velocity evaluation of one state is one NFE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from cspace.io.checks import check_memory
from cspace.models.space import check_same_space, space_of
from guidance.checks import check_count, check_number, check_window
from guidance.sampling.convention import Velocity
from guidance.sampling.guided import Guided
from guidance.sampling.steps import STEPS, Step

__all__ = ["METHODS", "Backtrack", "SampleOutput", "sample", "time_grid"]

METHODS = tuple(STEPS)


@dataclass(frozen=True)
class Backtrack:
    """Collision backtracking settings.

    Attributes:
        revert: steps a colliding sample goes back (>= 1).
        max_retries: retries per sample (>= 0); after them it goes on unchecked.
        field: the field whose hard radii define a collision; None: the
            :class:`~guidance.Guided` velocity's field.
        window: ``(t_lo, t_hi)``: times at which ``x0_hat`` is checked; None: the Guided
            velocity's window, or ``(0, 1)`` without one.
    """

    revert: int = 10
    max_retries: int = 20
    field: Any = None
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "revert", check_count(self.revert, "Backtrack revert", minimum=1))
        retries = check_count(self.max_retries, "Backtrack max_retries", minimum=0)
        object.__setattr__(self, "max_retries", retries)
        if self.field is not None and not callable(getattr(self.field, "evaluate", None)):
            raise TypeError(
                f"Backtrack field must have an evaluate() method (RepulsiveField, ...); got "
                f"{type(self.field).__name__}"
            )
        if self.window is not None:
            object.__setattr__(self, "window", check_window(self.window, "Backtrack window"))


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
            field is known (a :class:`~guidance.Guided` velocity or a :class:`Backtrack` field),
            else None.
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
    steps: int,
    t_start: float = 1.0,
    t_end: float = 0.0,
    dtype=torch.float64,
    shift: float = 1.0,
) -> torch.Tensor:
    """Grid of ``steps + 1`` times from ``t_start`` down to ``t_end``: uniform in ``u``, then
    shifted as diffusers' ``FlowMatchEulerDiscreteScheduler`` does,

        t = shift u / (1 + (shift - 1) u),

    which keeps both ends and puts more steps near noise when ``shift > 1`` (near data when
    ``shift < 1``; ``shift = 1`` is the uniform grid).

    A grid larger than this machine's memory is refused before it is allocated
    (:class:`~cspace.io.checks.SizeLimitError`)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    check_memory(
        (int(steps) + 1) * torch.finfo(dtype).bits // 8,
        f"a time grid of {int(steps):,} steps",
        "use fewer steps (--steps)",
    )
    if not 0 <= t_end < t_start <= 1:
        raise ValueError(f"need 0 <= t_end < t_start <= 1; got t_start={t_start}, t_end={t_end}")
    if not (math.isfinite(float(shift)) and float(shift) > 0):
        raise ValueError(f"the time shift must be a finite number > 0 (1: uniform); got {shift}")
    u = torch.linspace(t_start, t_end, int(steps) + 1, dtype=dtype)
    if float(shift) == 1.0:
        return u
    if (t_start, t_end) != (1.0, 0.0):
        raise ValueError(
            f"a shifted grid runs from 1 to 0 (shift {shift}); got t_start={t_start}, "
            f"t_end={t_end}: pass your own decreasing grid as times instead"
        )
    out = float(shift) * u / (1 + (float(shift) - 1) * u)
    out[0], out[-1] = 1.0, 0.0  # exact ends (the formula is off by rounding)
    return out


class _CollisionCheck:
    """Backtracking's check of ``x0_hat`` against a field's hard radii inside a window."""

    def __init__(self, field, window: tuple[float, float]) -> None:
        self.field = field
        self.lo, self.hi = window

    def __call__(self, step: Step, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which states' ``x0_hat`` collide at times ``t`` inside the window; the
        guided prediction's field output is reused when it is this field's at ``x0_hat``."""
        inwin = (t >= self.lo) & (t <= self.hi)
        if not bool(inwin.any()):
            return torch.zeros_like(inwin)
        p = step.prediction
        if p.field is not None and p.field_mode == "clean" and p.field_source is self.field:
            ev = p.field
        else:
            ev = self.field.evaluate(step.x0_hat, need_force=False)
        return ev.collided & inwin


def _check_times(times: torch.Tensor | None, steps: int) -> torch.Tensor:
    if times is None:
        times = time_grid(steps)
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if times.numel() < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must hold at least 2 strictly decreasing values")
    if float(times[0]) > 1 or float(times[-1]) < 0:
        raise ValueError(f"times must lie in [0, 1]; got {float(times[0])} .. {float(times[-1])}")
    return times


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    *,
    steps: int = 50,
    method: str = "euler",
    times: torch.Tensor | None = None,
    noise_scale: float = 1.0,
    backtrack: Backtrack | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool | None = None,
    callback: Callable[[dict], None] | None = None,
) -> SampleOutput:
    """Integrate from ``noise`` (the state at ``times[0]``, 1 by default) down to ``times[-1]``.

    Args:
        velocity: ``v(x, t)`` for states (b, ...) and times (b,), returning (b, ...); a
            :class:`~guidance.Guided` velocity for guidance.
        noise: (B, ...) starting states.
        steps: number of steps on the uniform grid (ignored if ``times`` is given).
        method: ``"euler"``, ``"heun"``, ``"sde"``, ``"sde-heun"`` or ``"dpm-sde"`` (second
            order multistep: each state carries its previous clean estimate)
            (:mod:`guidance.sampling.steps`).
        times: optional decreasing grid in [0, 1] (overrides ``steps``).
        noise_scale: the SDE's ``g^2 / t`` (>= 0; unused by ``"dpm-sde"``, whose SDE has its
            own noise).
        backtrack: :class:`Backtrack` settings (SDE only; needs a field with hard radii: its
            own or the Guided velocity's).
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
    noise_scale = check_number(noise_scale, "noise_scale")
    if backtrack is not None and not isinstance(backtrack, Backtrack):
        raise TypeError(
            f"backtrack must be a Backtrack(revert=..., max_retries=..., field=...) or None; got "
            f"{backtrack!r}"
        )
    times = _check_times(times, steps)
    guided = velocity if isinstance(velocity, Guided) else None
    check = None
    if backtrack is not None:
        if method not in ("sde", "sde-heun") or noise_scale == 0:
            raise ValueError(
                "backtracking re-draws the noise of a segment, so it needs method='sde' or "
                "'sde-heun' with "
                "noise_scale > 0 (with an ODE the re-run segment would be identical)"
            )
        bt_field = (
            backtrack.field if backtrack.field is not None else getattr(guided, "field", None)
        )
        if bt_field is None:
            raise ValueError(
                "backtracking needs a field whose obstacles have hard collision radii: pass "
                "Backtrack(field=...) or a Guided velocity"
            )
        check_same_space(
            space_of(velocity),
            space_of(bt_field),
            f"the velocity ({type(velocity).__name__})",
            "the backtracking field",
            fix="check collisions against obstacles built in the model's own latent space",
        )
        window = backtrack.window or (guided.window if guided is not None else (0.0, 1.0))
        check = _CollisionCheck(bt_field, tuple(float(w) for w in window))
    known_field = check.field if check is not None else getattr(guided, "field", None)
    step_fn = STEPS[method]
    n_steps = times.numel() - 1
    dev, dt = noise.device, noise.dtype
    grid = times.to(device=dev, dtype=dt)
    b = noise.shape[0]
    shape1 = (-1,) + (1,) * (noise.ndim - 1)

    # ------------------------------------------------------------------ the loop
    keep_path = return_trajectory or check is not None
    path = torch.empty((n_steps + 1, *noise.shape), dtype=dt, device=dev) if keep_path else None
    x = noise.clone()
    if keep_path:
        path[0] = x
    idx = torch.zeros(b, dtype=torch.long, device=dev)
    history = method == "dpm-sde"  # the 2M step's previous clean estimate (t = 1: none yet)
    prev_x0 = torch.zeros_like(noise) if history else None
    prev_t = torch.ones(b, dtype=dt, device=dev) if history else None
    retries = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    nfe = calls = 0
    it = 0
    bar = tqdm(
        total=n_steps,
        desc="sampling",
        unit="step",
        disable=(not progress) if progress is not None else None,
    )
    while not bool(done.all()):
        act = torch.nonzero(~done).squeeze(1)
        xa, ia = x[act], idx[act]
        ta, tn = grid[ia], grid[ia + 1]
        extra = {"previous": (prev_x0[act], prev_t[act])} if history else {}
        st = step_fn(velocity, xa, ta, tn, noise_scale=noise_scale, generator=generator, **extra)
        xn = st.x_next
        nfe += st.nfe
        calls += st.calls
        if callback is not None:
            callback({"step": it, "t": ta, "x": xn, "x0_hat": st.x0_hat, "index": act})
        if check is None:
            back = torch.zeros_like(ia, dtype=torch.bool)
            ia_new, x_new = ia + 1, xn
        else:
            can_retry = (retries[act] < backtrack.max_retries) & (ia > 0)
            back = check(st, ta) & can_retry
            fwd = ~back
            ia_new = torch.where(fwd, ia + 1, torch.clamp(ia - backtrack.revert, min=0))
            x_new = torch.where(back.reshape(shape1), path[ia_new, act], xn)
            finished = fwd & (ia_new == n_steps)
            if bool(finished.any()):  # the final sample is its own x0_hat: check it too
                ev = check.field.evaluate(xn[finished], need_force=False)
                again = (
                    ev.collided & (retries[act][finished] < backtrack.max_retries) & (check.lo <= 0)
                )
                if bool(again.any()):
                    pos = torch.nonzero(finished).squeeze(1)[again]
                    back[pos] = True
                    ia_new[pos] = torch.clamp(ia[pos] - backtrack.revert, min=0)
                    x_new[pos] = path[ia_new[pos], act[pos]]
            retries[act] += back.long()
        fwd = ~back
        if history:  # (no backtracking with this method: every state moved forward)
            prev_x0[act], prev_t[act] = st.x0_hat, ta
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
    if known_field is not None:
        collided_final = known_field.evaluate(x, need_force=False).collided
    return SampleOutput(
        samples=x,
        nfe=int(nfe),
        model_calls=calls,
        times=times,
        trajectory=path if return_trajectory else None,
        retries=retries,
        collided=collided_final,
    )
