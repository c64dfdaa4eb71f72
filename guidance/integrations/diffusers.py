r"""The repulsive field inside diffusers pipelines, for every prediction type.

``guide(pipe, field, strength=...)`` returns an object called exactly like ``pipe`` (prompts,
generators, ``num_inference_steps``, ``guidance_scale``, ``output_type``, batches) that applies the
field at every denoising step. It wraps the scheduler's ``step`` for the duration of each call:
``step(model_output, timestep, sample, ...)`` is where the final model output (after
classifier-free guidance, for every prompt of the batch) meets the current latents, and
``callback_on_step_end`` cannot change it. Nothing of the pipeline is copied or modified
otherwise; with the field off (``strength=0``, outside ``window``, or no obstacle within Q*) the
scheduler receives the model output unchanged, so the result equals the plain pipeline's bit for
bit.

**The correction.** Write the latents as ``x_t = alpha_t x0 + sigma_t eps`` and ``t`` in [0, 1]
(1 = noise). From the model output ``m`` the clean estimate is

* flow matching (``FlowMatchEulerDiscreteScheduler``, or ``FlowMatchHeunDiscreteScheduler``,
  whose predictor and corrector calls are each corrected at their own sigma; ``m = v = eps - x0``,
  alpha = 1 - sigma): ``x0_hat = x - sigma m``;
* ``epsilon``: ``x0_hat = (x - sigma m) / alpha``;  ``v_prediction``: ``x0_hat = alpha x - sigma m``;
* ``sample``: ``x0_hat = m``

(DDPM/DDIM: ``alpha = sqrt(alphas_cumprod[t])``, ``sigma = sqrt(1 - alphas_cumprod[t])``).
The field gives ``delta = strength * weight(t) * F(x0_hat)``; the guided output is the one whose
clean estimate, at the same ``x_t``, is ``x0_hat + sigma_t delta``:

    flow: m' = m - delta;   epsilon: m' = m - alpha delta;   v: m' = m - delta;
    sample: m' = m + sigma delta.

For flow matching this is exactly :class:`guidance.Guided`'s ``v' = v - delta``;
for the others it is the same displacement of the clean estimate, scaled by the step's noise
level. ``mode="noisy"`` (flow matching only) evaluates the field at ``x_t`` against the obstacles
noised to level t, as ``guidance.sample`` does.

Obstacles live in the pipeline's latent space (flattened ``(C, H, W)``): build them from example
images with the pipeline's own VAE (``cspace.models.encoders.Encoder.from_diffusers`` normalises latents
exactly as the SD/SD3/FLUX pipelines do), or pass a ``projection`` to the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch

from cspace.models.encoders import Encoder
from cspace.models.space import Space, check_same_space, space_of
from guidance.checks import check_number, check_window
from guidance.sampling import Prediction

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "GuidanceError",
    "GuideStats",
    "GuidedPipeline",
    "check_pipeline_space",
    "guide",
    "pipeline_space",
]

SUPPORTED_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "DDPMScheduler",
    "DDIMScheduler",
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MODES = ("clean", "noisy", "negation")


class GuidanceError(ValueError):
    """A pipeline, scheduler, field or setting that ``guide`` cannot work with."""


def prediction_kind(scheduler) -> str:
    """``"flow"``, ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` for a supported scheduler."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler):
        return "flow"
    if isinstance(scheduler, DDPMScheduler | DDIMScheduler):
        kind = scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise GuidanceError(
                f"{type(scheduler).__name__} has prediction_type={kind!r}; guide supports "
                f"{PREDICTION_TYPES} for DDPM/DDIM schedulers and velocity for flow matching"
            )
        return kind
    raise GuidanceError(
        f"scheduler {type(scheduler).__name__} is not supported; guide works with "
        f"{', '.join(SUPPORTED_SCHEDULERS)} (swap it in with "
        "`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`)"
    )


def _coefficients(scheduler, kind: str, timestep) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, t in [0, 1]) of the current step: the sigma at which the model was
    called. For ``FlowMatchHeunDiscreteScheduler`` that is ``sigmas[step_index]`` in both of a
    step's calls too: its sigmas are interleaved (``1, s1, s1, s2, s2, ..., 0``), the predictor
    is called at ``sigmas[k]`` and the corrector, one index on, at the predicted point's
    ``sigmas[k + 1]``."""
    if kind == "flow":
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)  # what step() itself does first
        s = float(scheduler.sigmas[scheduler.step_index])
        return 1.0 - s, s, s
    t_int = int(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else int(timestep)
    ab = float(scheduler.alphas_cumprod[t_int])
    return math.sqrt(ab), math.sqrt(1.0 - ab), t_int / scheduler.config.num_train_timesteps


def pipeline_space(pipe, image_size: tuple[int, int]) -> Space | None:
    """The C-space of a pipeline's latents for images of ``image_size``: its VAE (normalised by the
    VAE's own ``scaling_factor``/``shift_factor``, as the pipelines do) as an
    :class:`~cspace.models.encoders.Encoder`; None for a pipeline without an ``AutoencoderKL``-like
    VAE (pixel-space DDPM/DDIM)."""
    vae = getattr(pipe, "vae", None)
    cfg = getattr(vae, "config", None)
    if vae is None or not all(
        hasattr(cfg, k) for k in ("in_channels", "latent_channels", "block_out_channels")
    ):
        return None
    return Encoder(vae, name=f"{type(pipe).__name__}.vae").space(image_size)


def check_pipeline_space(pipe, field) -> None:
    """Raise :class:`~cspace.models.space.SpaceMismatchError` naming both spaces when ``field``
    records a C-space that is not the one of ``pipe``'s latents (its VAE); nothing to check when
    either is unknown."""
    field_space = space_of(field)
    if field_space is None:
        return
    # a pipeline with one image size (LatentFlowPipeline.image_size) is described at that size;
    # the others (Stable Diffusion and the like take height and width) at the obstacles' size
    native = getattr(pipe, "image_size", None)
    if native is not None:
        size = tuple(native)
        fix = (f"build the obstacles with this pipeline's VAE from {size[0]}x{size[1]} images "
               "(`cspace obstacles build IMAGES --encoder PIPELINE_DIR`)")  # fmt: skip
    else:
        size = field_space.image_size
        fix = ("build the obstacles with this pipeline's VAE at this resolution "
               "(cspace.models.encoders.Encoder.from_diffusers, or `cspace obstacles build "
               "--encoder PIPELINE_DIR --size HxW`)")  # fmt: skip
    check_same_space(
        pipeline_space(pipe, size),
        field_space,
        f"the pipeline's VAE ({type(pipe).__name__})",
        "the field's obstacles",
        fix=fix,
    )


@dataclass
class GuideStats:
    """What the last call did: steps seen, steps where the field changed the output, and the
    final latents (the last ``prev_sample``)."""

    steps: int = 0
    guided_steps: int = 0
    changed_samples: list[int] = dc_field(default_factory=list)
    last_latents: torch.Tensor | None = None


class GuidedPipeline:
    """A diffusers pipeline with the field applied at every step; call it like the pipeline.

    Attributes other than ``pipe``, ``field``, ``strength``, ``window``, ``mode``, ``weight`` and
    ``stats`` are the pipeline's own.
    """

    def __init__(self, pipe, field, strength, window, mode, weight, negation=None) -> None:
        if not callable(pipe) or not hasattr(pipe, "scheduler"):
            raise GuidanceError(
                f"guide needs a diffusers pipeline with a scheduler; got {type(pipe).__name__}"
            )
        prediction_kind(pipe.scheduler)
        if field is not None and not callable(getattr(field, "evaluate", None)):
            raise GuidanceError(
                f"field must have an evaluate() method (RepulsiveField, ClassifierField, "
                f"CombinedField); got {type(field).__name__}"
            )
        strength = check_number(strength, "strength", error=GuidanceError)
        lo, hi = check_window(window, error=GuidanceError)
        if mode not in MODES:
            raise GuidanceError(f"mode must be one of {MODES}; got {mode!r}")
        if mode == "noisy" and prediction_kind(pipe.scheduler) != "flow":
            raise GuidanceError(
                "mode='noisy' noises the obstacles as (1 - t) o, the flow-matching path; use "
                "mode='clean' with DDPM/DDIM schedulers"
            )
        check_pipeline_space(pipe, field)
        self.negation = None
        if mode == "negation":
            from guidance.sampling.negation import SafeDisplacement

            if field is None:
                raise GuidanceError("mode='negation' needs obstacles (their examples to negate)")
            try:
                self.negation = SafeDisplacement(field, **(negation or {}))
            except (TypeError, ValueError) as e:
                raise GuidanceError(f"mode='negation': {e}") from None
        elif negation:
            raise GuidanceError("negation settings apply to mode='negation' only")
        self.pipe, self.field, self.strength = pipe, field, float(strength)
        self.window, self.mode, self.weight = (lo, hi), mode, weight
        self.stats = GuideStats()

    def __getattr__(self, name):
        return getattr(self.__dict__["pipe"], name)

    def __call__(self, *args, **kwargs):
        sched = self.pipe.scheduler
        kind = prediction_kind(sched)  # the scheduler may have been swapped since guide()
        had_own = "step" in sched.__dict__
        original = sched.step
        self.stats = GuideStats()

        def step(model_output, timestep, sample, *a, **kw):
            model_output = self._correct(sched, kind, model_output, timestep, sample)
            out = original(model_output, timestep, sample, *a, **kw)
            self.stats.last_latents = (
                out.prev_sample if hasattr(out, "prev_sample") else out[0]
            ).detach()
            return out

        sched.step = step
        try:
            return self.pipe(*args, **kwargs)
        finally:
            if had_own:
                sched.step = original
            else:
                del sched.step

    def _field_dim(self) -> int | None:
        """The latent dimension the field expects (None: a projection, or a combination)."""
        if getattr(self.field, "projection", None) is not None:
            return None
        dim = getattr(self.field, "dim", None)
        return int(dim) if dim is not None else None

    def _correct(self, sched, kind, m: torch.Tensor, timestep, x: torch.Tensor) -> torch.Tensor:
        self.stats.steps += 1
        alpha, sigma, t = _coefficients(sched, kind, timestep)
        lo, hi = self.window
        lam = float(self.weight(t)) if self.weight is not None else 1.0
        if self.field is None or self.strength == 0 or not (lo <= t <= hi) or lam == 0:
            return m
        d = math.prod(x.shape[1:])
        want = self._field_dim()
        if want is not None and want != d:
            raise GuidanceError(
                f"the obstacles have d={want} but the pipeline's latents {tuple(x.shape[1:])} "
                f"flatten to d={d}: build the obstacles with this pipeline's VAE at this "
                "resolution (cspace.models.encoders.Encoder.from_diffusers), or pass a projection"
            )
        mf, xf = m.float(), x.float()
        flow = Prediction.from_velocity(xf, sigma, mf) if kind == "flow" else None
        if flow is not None:  # our own convention: x0_hat = x - t v
            x0 = flow.x0_hat
        elif kind == "epsilon":
            x0 = (xf - sigma * mf) / alpha
        elif kind == "v_prediction":
            x0 = alpha * xf - sigma * mf
        else:
            x0 = mf
        if self.negation is not None:  # the safe denoiser: x0_hat + delta_x0 = sigma delta
            if not sigma > 0:
                return m
            b = xf.shape[0]
            dx0 = self.negation.clean_displacement(
                xf.reshape(b, -1), x0.reshape(b, -1), alpha, sigma, t
            )
            delta = (self.strength * lam / sigma) * dx0.reshape(x0.shape).float()
        else:
            ev = self.field.evaluate(x0) if self.mode == "clean" else self.field.evaluate(xf, t)
            delta = (self.strength * lam) * ev.force.float()
        if flow is not None:
            guided = flow.displaced(delta).v  # v - delta
        elif kind == "v_prediction":
            guided = mf - delta
        elif kind == "epsilon":
            guided = mf - alpha * delta
        else:
            guided = mf + sigma * delta
        changed = delta.reshape(delta.shape[0], -1).abs().amax(dim=1) > 0
        n_changed = int(changed.sum())
        self.stats.changed_samples.append(n_changed)
        if n_changed == 0:
            return m
        self.stats.guided_steps += 1
        mask = changed.reshape(-1, *([1] * (m.ndim - 1)))
        return torch.where(mask, guided.to(m.dtype), m)


def guide(
    pipe,
    field,
    *,
    strength: float = 1.0,
    window: tuple[float, float] = (0.0, 1.0),
    mode: str = "clean",
    weight: Callable[[float], float] | None = None,
    negation: dict | None = None,
) -> GuidedPipeline:
    """Wrap ``pipe`` so that ``field`` displaces the clean estimate at every step (module
    docstring); call the result exactly like ``pipe``.

    Args:
        pipe: a diffusers pipeline whose scheduler is one of ``SUPPORTED_SCHEDULERS``.
        field: ``RepulsiveField``, ``ClassifierField`` or ``CombinedField`` over the pipeline's
            flattened latents (B, C*H*W), or with a ``projection``; None only records
            (``stats``: steps and the final latents) and leaves the output unchanged.
        strength: >= 0; 0 gives the plain pipeline's output bit for bit.
        window: (t_lo, t_hi) in [0, 1] (1 = noise) where the field acts.
        mode: ``"clean"`` (field on x0_hat), ``"noisy"`` (flow matching: field on x_t) or
            ``"negation"`` (the safe denoiser of :mod:`guidance.sampling.negation` with the
            obstacles' examples as the negation set: the clean estimate moves by
            ``strength x weight(t) x delta_x0``).
        weight: ``lambda(t)`` scaling the displacement, default 1.
        negation: ``mode="negation"``'s settings (``data_scale``, ``temper``, ``beta_max``) of
            :class:`~guidance.sampling.negation.SafeDisplacement`.

    Raises:
        GuidanceError: an unsupported pipeline, scheduler or prediction type, bad settings;
            at call time, obstacles whose dimension does not match the latents.
    """
    return GuidedPipeline(pipe, field, strength, window, mode, weight, negation)
