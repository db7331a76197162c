"""Text-to-image conditioning: nested model kwargs and dynamic shifting (`mu`) in the σ-space adapter."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_fewstep import NoiseSchedule, SigmaDenoiser
from diffusers_fewstep.adapter import SIGMA_MAX_CAP, flatten_kwargs, nest_kwargs
from tiny_models import tiny_sdxl

# --- nested kwargs ---------------------------------------------------------------------------------
def test_flat_and_nested_kwargs_reach_the_model_alike():
    nested = {"encoder_hidden_states": torch.ones(2, 3), "added_cond_kwargs": {"text_embeds": torch.zeros(2, 4),
                                                                               "time_ids": torch.ones(2, 6)}}
    flat = flatten_kwargs(nested)
    assert set(flat) == {"encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"}
    assert nest_kwargs(flat).keys() == nested.keys() and nest_kwargs(flat)["added_cond_kwargs"] == nested["added_cond_kwargs"]
    components = tiny_sdxl()
    den = SigmaDenoiser(components["unet"], components["scheduler"].config, guidance_scale=3.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 16, 64, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6) * 32}}
    uncond = {**cond, "added_cond_kwargs": {**cond["added_cond_kwargs"], "text_embeds": torch.zeros(2, 32)}}
    with torch.no_grad():
        d_nested, d_flat = den(x, 2.0, cond, uncond), den(x, 2.0, flatten_kwargs(cond), flatten_kwargs(uncond))
        d_cond = SigmaDenoiser(components["unet"], components["scheduler"].config)(x, 2.0, flatten_kwargs(cond))
    torch.testing.assert_close(d_nested, d_flat, rtol=0, atol=0)
    assert float((d_flat - d_cond).abs().max()) > 1e-3  # the pooled embedding reached the model


# --- dynamic shifting -----------------------------------------------------------------------------
@pytest.mark.parametrize("time_shift_type,mu", [("exponential", 0.8), ("exponential", 1.15), ("linear", 2.5)])
def test_dynamic_shifting_mu_matches_flow_match_euler(time_shift_type, mu):
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift_type).config
    schedule = NoiseSchedule(config, mu=mu)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(1000, mu=mu)  # t = 1000 … 1, i.e. unshifted s = k/1000 as the training grid
    s = scheduler.sigmas[:-1].flip(0).double()  # float32 s; compared in s = σ/(1+σ), where float32 is exact to 1e-7
    ours = schedule.train_sigmas / (1 + schedule.train_sigmas)
    torch.testing.assert_close(ours[:-1], s[:-1], rtol=1e-6, atol=0)  # s = 1 (σ = ∞) is capped at σ = 4096 by us
    assert s[-1] == 1 and schedule.sigma_max == pytest.approx(SIGMA_MAX_CAP)
    other = NoiseSchedule(config, mu=mu + 0.5)
    assert other.sigma_min > schedule.sigma_min * 1.1  # mu moves the σ range
    with pytest.raises(ValueError, match="pass `mu`"):
        NoiseSchedule(config)
    assert NoiseSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config, mu=5.0).sigma_min == pytest.approx(
        NoiseSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config).sigma_min)  # mu only for dynamic configs
