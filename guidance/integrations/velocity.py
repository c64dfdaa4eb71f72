r"""A diffusers denoiser as a velocity ``v(x, t)`` in cspace's convention, for search and samplers.

Every sampler and search of :mod:`guidance` calls ``velocity(x, t)`` with the flow-matching
convention (t = 1 noise, ``x_t = (1-t) x0 + t eps``, ``v = eps - x0``). :class:`DiffusersVelocity`
turns a diffusers denoiser into that, for every prediction type, so that best-of-N, zero-order,
paths, SMC and the guided samplers run on a pipeline's latents unchanged:

* flow matching (``FlowMatchEulerDiscreteScheduler``): the model is called at
  ``timestep = t * num_train_timesteps`` and its output is ``v``;
* DDPM/DDIM (``epsilon``, ``v_prediction``, ``sample``), a variance-preserving path
  ``x_vp = alpha x0 + sigma eps``: the same state at the same signal-to-noise ratio is
  ``x_vp = (alpha + sigma) x`` with ``sigma / (alpha + sigma) = t``, i.e.
  ``alphas_cumprod = 1 / (1 + (t / (1 - t))^2)``; the model is called at the (fractional)
  timestep where the scheduler's ``alphas_cumprod`` takes that value (linear interpolation of the
  table), its clean estimate ``x0_hat`` is formed with that step's alpha and sigma, and
  ``v = (x - x0_hat) / t``. Beyond the schedule's noisiest step (t above
  ``sigma_T / (alpha_T + sigma_T)``, e.g. 0.937 for Stable Diffusion) the model is evaluated at
  its noisiest step on the state rescaled to it: an approximation, documented in ``t_max``.

``denoise(model_input, timestep) -> model_output`` is the pipeline-specific part (conditioning,
classifier-free guidance); :func:`unconditional`, :func:`stable_diffusion` and
:func:`stable_diffusion_3` build it for the common pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from guidance.integrations.diffusers import GuidanceError, prediction_kind
from guidance.sampling import Prediction

__all__ = ["DiffusersVelocity", "stable_diffusion", "stable_diffusion_3", "unconditional"]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusersVelocity:
    """``v(x, t)`` (module docstring) from ``denoise`` and the pipeline's ``scheduler``.

    Args:
        denoise: ``denoise(x_model, timestep) -> model_output``; ``timestep`` is a (B,) float
            tensor on the model's scale (0 .. num_train_timesteps).
        scheduler: the pipeline's scheduler (its type and config give the prediction type and
            the noise schedule; it is not stepped).
        dtype: the dtype the model runs in (inputs are cast to it, outputs back).
    """

    def __init__(self, denoise: Denoise, scheduler, dtype: torch.dtype = torch.float32) -> None:
        self.denoise, self.dtype = denoise, dtype
        self.kind = prediction_kind(scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.calls = 0  # model evaluations (states), i.e. NFE
        if self.kind != "flow":
            ab = scheduler.alphas_cumprod.double().cpu().numpy()
            if not np.all(np.diff(ab) < 0):
                raise GuidanceError("the scheduler's alphas_cumprod must decrease with t")
            self._ab = ab
            a_t, s_t = math.sqrt(ab[-1]), math.sqrt(1 - ab[-1])
            self.t_max = s_t / (a_t + s_t)
        else:
            self.t_max = 1.0

    def _vp_step(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timestep, alpha, sigma) for FM times t (B,), t in (0, t_max]."""
        r = (t / (1 - t)).double()
        ab = 1 / (1 + r**2)
        ab_np = ab.cpu().numpy()
        steps = np.arange(self._ab.size, dtype=np.float64)
        tau = np.interp(-ab_np, -self._ab, steps)  # ab decreases with the step index
        tau_t = torch.as_tensor(tau, dtype=torch.float64, device=t.device)
        return tau_t, ab.sqrt(), (1 - ab).sqrt()

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        b = x.shape[0]
        tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(b)
        self.calls += b
        if self.kind == "flow":
            ts = (tt * self.num_train_timesteps).to(self.dtype)
            return self.denoise(x.to(self.dtype), ts).to(x.dtype)
        tc = tt.clamp(1e-6, self.t_max)  # beyond t_max: the noisiest step (module docstring)
        tau, alpha, sigma = self._vp_step(tc)
        shape = (b, *([1] * (x.ndim - 1)))
        al, si = alpha.reshape(shape), sigma.reshape(shape)
        xd = x.double()
        x_vp = (al + si) * xd
        m = self.denoise(x_vp.to(self.dtype), tau.to(self.dtype)).double()
        if self.kind == "epsilon":
            x0 = (x_vp - si * m) / al
        elif self.kind == "v_prediction":
            x0 = al * x_vp - si * m
        else:
            x0 = m
        # v = (x - x0_hat) / t in our convention (t clamped away from 0)
        return Prediction.from_clean(xd, tt.reshape(shape).clamp(min=1e-6), x0).v.to(x.dtype)


# ---------------------------------------------------------------------- denoisers
def unconditional(model) -> Denoise:
    """For ``UNet2DModel`` pipelines (DDPM, DDIM): ``model(x, timestep).sample``."""

    @torch.no_grad()
    def denoise(x, timestep):
        return model(x, timestep).sample

    return denoise


def _cfg(out: torch.Tensor, scale: float) -> torch.Tensor:
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def stable_diffusion(unet, prompt_embeds, negative_prompt_embeds=None, guidance_scale=7.5):
    """For Stable Diffusion 1.x/2.x (``UNet2DConditionModel``): one prompt embedding per state
    (``prompt_embeds`` (B, L, D), or (1, L, D) for all), classifier-free guidance when
    ``negative_prompt_embeds`` is given and ``guidance_scale > 1``."""
    use_cfg = negative_prompt_embeds is not None and guidance_scale > 1

    @torch.no_grad()
    def denoise(x, timestep):
        b = x.shape[0]
        cond = prompt_embeds.expand(b, -1, -1) if prompt_embeds.shape[0] == 1 else prompt_embeds
        if not use_cfg:
            return unet(x, timestep, encoder_hidden_states=cond).sample
        neg = negative_prompt_embeds
        neg = neg.expand(b, -1, -1) if neg.shape[0] == 1 else neg
        out = unet(torch.cat([x, x]), torch.cat([timestep, timestep]),
                   encoder_hidden_states=torch.cat([neg, cond])).sample  # fmt: skip
        return _cfg(out, guidance_scale)

    return denoise


def stable_diffusion_3(transformer, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                       negative_pooled_prompt_embeds=None, guidance_scale=7.0):  # fmt: skip
    """For SD3 (``SD3Transformer2DModel``): prompt and pooled embeddings per state (or one for
    all), classifier-free guidance when the negative embeddings are given and the scale > 1."""
    use_cfg = negative_prompt_embeds is not None and guidance_scale > 1

    def per_state(e, b):
        return e.expand(b, *e.shape[1:]) if e.shape[0] == 1 else e

    @torch.no_grad()
    def denoise(x, timestep):
        b = x.shape[0]
        pe, pp = per_state(prompt_embeds, b), per_state(pooled_prompt_embeds, b)
        if not use_cfg:
            return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=pe,
                               pooled_projections=pp).sample  # fmt: skip
        ne = per_state(negative_prompt_embeds, b)
        npp = per_state(negative_pooled_prompt_embeds, b)
        out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
                          encoder_hidden_states=torch.cat([ne, pe]),
                          pooled_projections=torch.cat([npp, pp])).sample  # fmt: skip
        return _cfg(out, guidance_scale)

    return denoise
