"""``StochasticFlowMatchScheduler``: marginals preserved, checked against the exact mixture flow."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cspace.models.metrics import energy_distance
from cspace.models.toy import default_toy
from guidance.integrations.diffusers import prediction_kind
from guidance.integrations.sde_scheduler import StochasticFlowMatchScheduler

torch.set_num_threads(1)
N = 1500


def _run(sched, stop_sigma: float = 0.0, seed: int = 0, drift: bool = True) -> torch.Tensor:
    """Integrate the exact mixture velocity with the scheduler's own step loop, as a pipeline
    does, down to ``stop_sigma``; ``drift=False`` drops the SDE's correction term (a wrong
    scheduler the test must catch)."""
    mix, _ = default_toy()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, generator=g)
    sched.set_timesteps(60)
    for t in sched.timesteps:
        sigma = float(t) / sched.config.num_train_timesteps
        if sigma <= stop_sigma + 1e-9:
            break
        v = mix.velocity(x.double(), sigma).float()
        if not drift:  # add noise only: the marginals must drift away from p_t
            idx = sched.step_index if sched.step_index is not None else 0
            h = float(sched.sigmas[idx] - sched.sigmas[idx + 1])
            x = (
                x
                - h * v
                + (sched.config.noise_scale * sigma * h) ** 0.5 * torch.randn(x.shape, generator=g)
            )
            sched._step_index = idx + 1
            continue
        x = sched.step(v, t, x, generator=g).prev_sample
    return x.double()


def _exact(sigma: float, seed: int) -> torch.Tensor:
    mix, _ = default_toy()
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(N, g)
    return (1 - sigma) * x0 + sigma * torch.randn(N, 2, generator=g, dtype=x0.dtype)


@pytest.mark.parametrize("noise_scale", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("stop", [0.5, 0.0])
def test_marginals_match_the_exact_flow(noise_scale, stop):
    x = _run(StochasticFlowMatchScheduler(noise_scale=noise_scale), stop_sigma=stop)
    sigma_end = max(stop, 0.0)
    floor = energy_distance(_exact(sigma_end, 1), _exact(sigma_end, 2))
    ed = energy_distance(x, _exact(sigma_end, 3))
    assert ed < 3 * floor + 2e-3, (ed, floor)


def test_noise_without_the_drift_correction_is_caught():
    x = _run(StochasticFlowMatchScheduler(noise_scale=3.0), drift=False)
    floor = energy_distance(_exact(0.0, 1), _exact(0.0, 2))
    # the bound the right scheduler meets above, failed by the wrong one
    assert energy_distance(x, _exact(0.0, 3)) > 3 * floor + 2e-3


def test_noise_scale_zero_is_euler_and_guide_accepts_it():
    a = _run(StochasticFlowMatchScheduler(noise_scale=0.0))
    b = _run(FlowMatchEulerDiscreteScheduler())
    assert torch.allclose(a, b, atol=1e-5)
    sched = StochasticFlowMatchScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(shift=3.0).config, noise_scale=0.5
    )
    assert sched.config.shift == 3.0 and sched.config.noise_scale == 0.5
    assert prediction_kind(sched) == "flow"
    with pytest.raises(ValueError, match="noise_scale"):
        StochasticFlowMatchScheduler(noise_scale=-1.0)
