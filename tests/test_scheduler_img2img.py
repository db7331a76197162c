"""Runs that start part-way down the table (image-to-image, inpainting, the SDXL refiner: pipelines call
`set_begin_index`): every solver warms up from first order there, as diffusers' multistep schedulers do."""
import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       UniPCMultistepScheduler)

from diffusers_fewstep import LearnedScheduleScheduler
from diffusers_fewstep.solvers import SOLVERS
from tiny_models import fake_learned_table, tiny_sd

STEPS = 6


@pytest.fixture(scope="module")
def components():
    return tiny_sd()


def img2img(components, scheduler, strength):
    pipe = StableDiffusionImg2ImgPipeline(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return pipe(prompt="a red shirt", image=image, strength=strength, num_inference_steps=STEPS, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("ref_cls,kwargs,solver", [
    (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, "euler"),
    (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing", "algorithm_type": "dpmsolver++", "solver_order": 2},
     "dpmpp_2m"),
    (UniPCMultistepScheduler, {"timestep_spacing": "trailing", "solver_order": 2}, "unipc"),
])
@pytest.mark.parametrize("strength", [0.5, 0.7])
def test_img2img_reproduces_diffusers_on_their_sigmas(components, ref_cls, kwargs, solver, strength):
    """Given diffusers' own σ's, our scheduler reproduces diffusers' img2img output, which begins at step 3 (or 2)
    of 6 with a first-order step and raises the order as model outputs accumulate."""
    base = components["scheduler"].config
    ref = ref_cls.from_config(base, **kwargs)
    ref.set_timesteps(STEPS)
    ours = LearnedScheduleScheduler.from_config(base, sigma_tables={STEPS: ref.sigmas.double().tolist()}, solver=solver)
    expected = img2img(components, ref, strength)
    out = img2img(components, ours, strength)
    assert ours.begin_index == STEPS - int(STEPS * strength) and ours.step_index == STEPS
    assert np.abs(out - expected).max() < 1e-4
    assert np.abs(out - img2img(components, ours, 1.0)).max() > 1e-2  # the start mattered


def sched_for(table, solver):
    return LearnedScheduleScheduler(sigma_tables={len(table) - 1: table}, solver=solver)


def gaussian_eps(sample, t, schedule):
    """ε̂ of the exact denoiser for data N(0, 0.5²) (native VP scale in, ε out)."""
    sigma = schedule.t_to_sigma(t).to(sample.dtype)
    x = sample * (sigma**2 + 1).sqrt()
    return (x - x * 0.25 / (0.25 + sigma**2)) / sigma


def loop(sched, sample, timesteps):
    for t in timesteps:
        sample = sched.step(gaussian_eps(sample, t, sched.noise_schedule), t, sample).prev_sample
    return sample


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("locate", ["set_begin_index", "timestep"])
def test_run_from_the_third_timestep_is_a_run_over_the_tables_tail(solver, locate):
    """Begun at index 2 of a 6-step table (by `set_begin_index`, or by the first timestep passed), the run equals a
    fresh run on σ_2 … σ_6: its first step is the first-order step."""
    table = fake_learned_table(LearnedScheduleScheduler().config, STEPS)
    sched = sched_for(table, solver)
    sched.set_timesteps(STEPS)
    if locate == "set_begin_index":
        sched.set_begin_index(2)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = loop(sched, sample, sched.timesteps[2:])
    tail = sched_for(table[2:], solver)
    tail.set_timesteps(STEPS - 2)
    torch.testing.assert_close(out, loop(tail, sample, tail.timesteps), rtol=1e-12, atol=1e-12)
    first, euler = sched_for(table, solver), sched_for(table, "euler")
    for s in (first, euler):
        s.set_timesteps(STEPS)
        s.set_begin_index(2)
    t = first.timesteps[2]
    torch.testing.assert_close(loop(first, sample, [t]), loop(euler, sample, [t]), rtol=1e-12, atol=1e-12)
