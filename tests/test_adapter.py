"""σ-space adapter: noise schedules, parameterisations, timestep mapping, guidance; scheduler on other families."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from diffusers_fewstep import LearnedScheduleScheduler, NoiseSchedule, SigmaDenoiser, time_uniform_sigmas
from diffusers_fewstep.adapter import SIGMA_MAX_CAP

VP_CONFIGS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained": {"trained_betas": torch.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500},
    "zero_snr": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
}


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_sigmas_match_diffusers_alphas_and_timesteps_invert(name):
    config = DDPMScheduler(**VP_CONFIGS[name]).config
    schedule = NoiseSchedule(config)
    acp = DDPMScheduler.from_config(config).alphas_cumprod.double()
    expected = ((1 - acp) / acp).sqrt()
    finite = torch.isfinite(expected)
    assert torch.allclose(schedule.train_sigmas[finite], expected[finite], rtol=1e-9)
    if name == "zero_snr":
        assert schedule.sigma_max == pytest.approx(SIGMA_MAX_CAP, rel=1e-6)
    t = torch.tensor([0.0, 0.25, 17.5, 123.4, schedule.num_train_timesteps - 1.0], dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-6)
    # a fine σ grid never rounds two σ's onto one timestep: the map is strictly monotone
    sigmas = torch.logspace(math.log10(schedule.sigma_min), math.log10(schedule.sigma_max), 5000, dtype=torch.float64)
    assert (schedule.sigma_to_t(sigmas).diff() > 0).all()


def _native_targets(schedule, x0, eps, sigma):
    """The exact native model outputs of every parameterisation for x0, ε at σ."""
    a = schedule.native_scale(sigma)
    x_native = a * (x0 + sigma * eps)
    if schedule.family == "flow":
        return x_native, {"flow": eps - x0}
    alpha, sigma_vp = a, a * sigma  # √ᾱ, √(1−ᾱ)
    return x_native, {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}


@pytest.mark.parametrize("family_config", [DDPMScheduler(beta_schedule="squaredcos_cap_v2").config,
                                           FlowMatchEulerDiscreteScheduler(shift=3.0).config])
def test_every_parameterisation_recovers_x0_exactly(family_config):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    probe = NoiseSchedule(family_config)
    types = ["flow"] if probe.family == "flow" else ["epsilon", "v_prediction", "sample"]
    for prediction_type in types:
        schedule = NoiseSchedule(family_config, prediction_type=prediction_type)
        for sigma in (schedule.sigma_min, 0.3, 2.0, 50.0):
            x_native, outputs = _native_targets(schedule, x0, eps, torch.tensor(sigma, dtype=torch.float64))
            x = x_native / schedule.native_scale(torch.tensor(sigma, dtype=torch.float64))
            assert torch.allclose(schedule.denoised(outputs[prediction_type], x, sigma), x0, atol=1e-9)


def test_unknown_prediction_type_and_family_are_clear_errors():
    with pytest.raises(ValueError, match="unknown prediction_type 'mu'"):
        NoiseSchedule(DDPMScheduler().config, prediction_type="mu")
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon' for a flow model"):
        NoiseSchedule(FlowMatchEulerDiscreteScheduler().config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="unknown model family"):
        NoiseSchedule({"family": "ve"})


class PointMassModel(torch.nn.Module):
    """The exact model for data concentrated at one point c, in any parameterisation: D(x; σ) = c."""

    def __init__(self, schedule, c):
        super().__init__()
        self.schedule, self.c = schedule, c
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_native, timestep, offset=0.0):
        sigma = self.schedule.t_to_sigma(timestep.double()).float().reshape(-1, 1, 1, 1)
        a = self.schedule.native_scale(sigma)
        eps = (x_native / a - self.c - offset) / sigma
        _, outputs = _native_targets(self.schedule, self.c + offset, eps, sigma)
        return (outputs[self.schedule.prediction_type],)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sigma_denoiser_plumbing_gives_the_exact_denoiser(prediction_type):
    config = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type).config
    schedule = NoiseSchedule(config)
    c = torch.full((1, 1, 2, 2), 0.7)
    den = SigmaDenoiser(PointMassModel(schedule, c), config)
    x = torch.randn(3, 1, 2, 2) * 5
    for sigma in (0.05, 1.0, 20.0):
        assert torch.allclose(den(x, sigma), c.expand_as(x), atol=1e-4)
    # classifier-free guidance acts on D: u + w·(c − u)
    guided = SigmaDenoiser(PointMassModel(schedule, c), config, guidance_scale=3.0)
    d = guided(x, 1.0, cond={"offset": torch.full((3, 1, 1, 1), 0.2)}, uncond={"offset": torch.zeros(3, 1, 1, 1)})
    assert torch.allclose(d, (c + 3.0 * 0.2).expand_as(x), atol=1e-4)
    with pytest.raises(ValueError, match="needs `uncond`"):
        guided(x, 1.0, cond={"offset": torch.zeros(3, 1, 1, 1)})


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _loop(model_fn, scheduler, noise):
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model_fn(x, t), t, x).prev_sample  # both keep x in the native scale
    return x


@pytest.mark.parametrize("config,tol", [
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, 1e-4),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "sample"}, 1e-4),
    # zero terminal SNR: DDIM starts at ᾱ = 0 exactly, we at the capped σ_max = 4096 (as diffusers' Euler does)
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
      "rescale_betas_zero_snr": True}, 2e-3),
])
def test_scheduler_matches_ddim_for_v_and_sample_prediction(config, tol):
    unet = _tiny_unet()
    ddim = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, **config)
    ours = LearnedScheduleScheduler.from_config(ddim.config)
    ours = LearnedScheduleScheduler.from_config(
        ddim.config, sigma_tables={5: time_uniform_sigmas(5, ours.noise_schedule).tolist()})
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim.set_timesteps(5)
    ours.set_timesteps(5)
    fn = lambda x, t: unet(x, t).sample
    ref, out = _loop(fn, ddim, noise), _loop(fn, ours, noise)
    assert (out - ref).abs().max() < tol
    assert (ref.abs().max() > 0.1)


def test_flow_matching_scheduler_matches_flow_match_euler():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    base.set_timesteps(6)
    ours = LearnedScheduleScheduler.from_config(base.config)
    assert ours.noise_schedule.family == "flow" and ours.noise_schedule.prediction_type == "flow"
    # the flow scheduler's own sigmas (s in (0, 1], s = 1 capped at σ = 4096)
    ours.set_timesteps(sigmas=base.sigmas[:-1].tolist())
    assert torch.allclose(ours.timesteps, base.timesteps.float(), rtol=1e-3)
    unet = _tiny_unet()
    fn = lambda x, t: unet(x, t).sample
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    ref, out = _loop(fn, base, noise), _loop(fn, ours, noise)
    assert (out - ref).abs().max() < 2e-3 * ref.abs().max()
    # add_noise is the flow interpolation (1 − s)·x0 + s·ε
    x0 = torch.randn(2, 2, 8, 8)
    t = ours.timesteps[2:3]
    s = t / 1000
    assert torch.allclose(ours.add_noise(x0, noise, t), (1 - s) * x0 + s * noise, atol=1e-5)


def test_the_log_sigma_table_reaches_a_device_once(monkeypatch):
    """σ ↔ t at every model call reads the log-σ table on the call's device; it is copied there once (a copy from
    host memory, or reading a bound back, would wait for the GPU at every call), with the same values."""
    schedule = NoiseSchedule(DDPMScheduler().config)
    expected = schedule.sigma_to_t(torch.tensor([0.5, 3.0, 40.0]))
    copies, original = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self is schedule.log_sigmas:
            copies.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    for _ in range(5):
        t = schedule.sigma_to_t(torch.tensor([0.5, 3.0, 40.0]))
        schedule.t_to_sigma(t)
    assert copies == []  # the first call above already put it on the CPU
    assert torch.equal(t, expected)
    assert torch.allclose(schedule.t_to_sigma(t), torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64), rtol=1e-6)
    schedule._log_sigmas_by_device.clear()
    schedule.sigma_to_t(torch.tensor([1.0]))
    schedule.sigma_to_t(torch.tensor([2.0]))
    assert len(copies) == 1
