r"""A diffusers scheduler for flow matching with the marginal-preserving SDE.

:class:`StochasticFlowMatchScheduler` is ``FlowMatchEulerDiscreteScheduler`` (same sigmas, shift,
timesteps and config) whose ``step`` is the stochastic step of :func:`guidance.sample`'s
``method="sde"``: from ``t`` to ``t - h``, with the velocity ``v`` the model predicts,

    eps_hat = x + (1 - t) v,      g^2 = noise_scale * t,
    x <- x - h v - h (g^2 / 2t) eps_hat + g sqrt(h) z,      z ~ N(0, I).

With the score ``-eps_hat / t`` this is the probability-flow ODE plus a Langevin term
``(g^2/2) score dt + g dW``, which leaves every marginal p_t unchanged (Fokker-Planck) for any
``noise_scale >= 0``; ``noise_scale = 0`` is Euler. The last step (to t = 0) is deterministic.
Use it so that trajectory search (SMC, paths) can run on SD3/FLUX-type pipelines::

    pipe.scheduler = StochasticFlowMatchScheduler.from_config(pipe.scheduler.config, noise_scale=1.0)
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from guidance.sampling import Prediction

__all__ = ["StochasticFlowMatchScheduler"]


class StochasticFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching scheduler with the marginal-preserving SDE step (module docstring).

    Args:
        noise_scale: ``g^2 / t`` (>= 0); 0 gives the Euler ODE step.
        other arguments: those of ``FlowMatchEulerDiscreteScheduler``.
    """

    @register_to_config
    def __init__(
        self,
        noise_scale: float = 1.0,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        if not (math.isfinite(noise_scale) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be a finite number >= 0; got {noise_scale}")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **unused,
    ):
        """One SDE step from the current sigma to the next (module docstring); same call and
        output as ``FlowMatchEulerDiscreteScheduler.step``."""
        if self.step_index is None:
            self._init_step_index(timestep)
        t = float(self.sigmas[self.step_index])
        t_next = float(self.sigmas[self.step_index + 1])
        h = t - t_next
        x = sample.to(torch.float32)
        v = model_output.to(torch.float32)
        new = x - h * v
        scale = float(self.config.noise_scale)
        if scale > 0 and t > 0 and t_next > 0:
            eps_hat = Prediction.from_velocity(x, t, v).eps_hat
            z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            new = new - h * (scale / 2) * eps_hat + math.sqrt(scale * t * h) * z
        self._step_index += 1
        new = new.to(model_output.dtype)
        if not return_dict:
            return (new,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=new)
