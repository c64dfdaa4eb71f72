"""``DiffusersVelocity``: diffusers denoisers as cspace velocities, against the exact mixture flow,
and search on tiny pipelines built offline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from cspace.models.tiny_pipelines import tiny_conditional_unet, tiny_unet
from cspace.models.toy import default_toy
from guidance import sample
from guidance.integrations.velocity import DiffusersVelocity, stable_diffusion, unconditional
from guidance.search import ALGORITHMS, CallableVerifier

torch.set_num_threads(1)


def _exact_denoiser(sched, kind: str):
    """The exact model output of the toy mixture for a VP scheduler: at (fractional) timestep
    tau, alpha and sigma from the interpolated alphas_cumprod, the FM state at the same SNR."""
    mix, _ = default_toy()
    table = sched.alphas_cumprod.double()

    def denoise(x_vp, tau):
        tau = tau.double()
        lo = tau.floor().long().clamp(0, table.numel() - 1)
        hi = (lo + 1).clamp(max=table.numel() - 1)
        ab = table[lo] + (tau - lo) * (table[hi] - table[lo])
        a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
        t = (s / (a + s))[:, 0]
        x = x_vp.double() / (a + s)
        v = mix.velocity(x, t)
        x0 = x - t[:, None] * v
        eps = x + (1 - t[:, None]) * v
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[kind]
        return out.float()

    return denoise


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_vp_models_give_the_exact_velocity(kind):
    mix, _ = default_toy()
    sched = DDPMScheduler(prediction_type=kind)
    vel = DiffusersVelocity(_exact_denoiser(sched, kind), sched, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    for t in (0.05, 0.3, 0.6, 0.9):
        assert t <= vel.t_max
        tt = torch.full((64,), t, dtype=torch.float64)
        want = mix.velocity(x, tt)
        got = vel(x, tt)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), t
    assert vel.calls == 4 * 64
    # beyond the schedule's noisiest step: finite, and the documented t_max < 1
    assert vel.t_max < 1 and bool(torch.isfinite(vel(x, torch.ones(64))).all())


def test_flow_models_are_called_on_their_timestep_scale():
    mix, _ = default_toy()
    seen = []

    def denoise(x, ts):
        seen.append(ts)
        return mix.velocity(x.double(), ts.double() / 1000).float()

    vel = DiffusersVelocity(denoise, FlowMatchEulerDiscreteScheduler())
    x = torch.randn(8, 2, dtype=torch.float64)
    assert torch.allclose(vel(x, 0.4), mix.velocity(x, 0.4), atol=1e-5)
    assert torch.allclose(seen[0], torch.full((8,), 400.0))


def test_euler_with_the_adapter_reproduces_a_flow_pipeline():
    unet = tiny_unet()
    pipe = DDPMPipeline(unet, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    from guidance.integrations.diffusers import guide

    probe = guide(pipe, None)
    probe(batch_size=2, num_inference_steps=6, output_type="np",
          generator=torch.Generator().manual_seed(0))  # fmt: skip
    want = probe.stats.last_latents
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(6)
    times = torch.cat([pipe.scheduler.sigmas[:-1], torch.zeros(1)]).double()
    vel = DiffusersVelocity(unconditional(unet), pipe.scheduler)
    got = sample(vel, noise, times=times, progress=False).samples
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_best_of_n_on_a_ddim_unet_within_budget():
    unet = tiny_unet()
    vel = DiffusersVelocity(unconditional(unet), DDIMScheduler(num_train_timesteps=100))
    target = torch.zeros(3 * 8 * 8)
    ver = CallableVerifier(lambda x0: -(x0.reshape(x0.shape[0], -1) - target).norm(dim=1).double())
    res = ALGORITHMS["best-of-n"](vel, (3, 8, 8), ver, budget=4 * 5 * 3, n_return=3, steps=5,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert res.samples.shape == (3, 3, 8, 8) and res.nfe <= 60 and vel.calls == res.nfe
    # the best of 4 candidates scores at least as well as a single draw from the same noises
    single = ALGORITHMS["best-of-n"](vel, (3, 8, 8), ver, budget=15, n_return=3, steps=5,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float(res.scores.mean()) >= float(single.scores.mean())


def test_stable_diffusion_denoiser_with_cfg():
    unet = tiny_conditional_unet()
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    den = stable_diffusion(unet, pe, ne, guidance_scale=3.0)
    x, ts = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        u = unet(x, ts, encoder_hidden_states=ne.expand(2, -1, -1)).sample
        c = unet(x, ts, encoder_hidden_states=pe.expand(2, -1, -1)).sample
    assert torch.allclose(den(x, ts), u + 3.0 * (c - u), atol=1e-5)
    vel = DiffusersVelocity(den, DDIMScheduler())
    assert vel(x.double(), 0.5).shape == x.shape
