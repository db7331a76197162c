"""The one reference solve: every consumer (Phase 1's pool, Phase 2's teacher states, evaluation, GITS)
gets the same many-step solution from the same native noise, on VP and flow models alike."""
import pytest
import torch
from diffusers import UNet2DModel

from diffusers_fewstep import evaluation as ev
from diffusers_fewstep import peers, reference
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.finetune import teacher_states
from diffusers_fewstep.schedules import time_uniform_sigmas
from diffusers_fewstep.selection import Paths

VP = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
      "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
STEPS = 12
# The tiny random UNet's VP solves pass through values of several hundred before the clamp to [-1, 1]; in float32
# their last digits depend on the batching and on the CPU's kernels (1.5e-5 was seen on an AVX2 machine). The flow
# bug this guards against moved samples by O(1).
ATOL = 1e-4


def tiny_denoiser(config, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return SigmaDenoiser(unet.eval(), config)


@pytest.mark.parametrize("config", [VP, FLOW], ids=["vp", "flow"])
def test_every_consumer_gets_the_same_reference(config):
    denoiser = tiny_denoiser(config)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = ev.reference_samples(denoiser, noise, steps=STEPS)
    # Phase 1's training pool (the flow bug: its solves started from ε·a(σ_max)⁻¹ with σ_max = 4096)
    pool = Paths(4, (1, 8, 8), "cpu", torch.Generator().manual_seed(0))
    pool.noise = noise
    pool.solve_references(denoiser, reference.Reference(STEPS), batch_size=2)
    assert torch.allclose(pool.reference.clamp(-1, 1), expected, atol=ATOL)
    # Phase 2's teacher states through a 3-step table taken from the reference grid end where it ends
    table = reference.reference_sigmas(denoiser.schedule, STEPS)[[0, 4, 8, -1]]
    states = teacher_states(denoiser, noise, table, num_steps=STEPS)
    assert states.shape == (4, 4, 1, 8, 8)
    assert torch.allclose(states[-1].clamp(-1, 1), expected, atol=ATOL)
    # GITS's teacher trajectories on the reference grid
    grid = reference.reference_sigmas(denoiser.schedule, STEPS).float()
    traj, denoised = peers.teacher_trajectories(denoiser, noise, grid, batch_size=3)
    assert traj.shape == (STEPS + 1, 4, 1, 8, 8) and denoised.shape == (STEPS, 4, 1, 8, 8)
    assert torch.allclose(traj[-1].clamp(-1, 1), expected, atol=ATOL)


def test_flow_reference_matches_diffusers_dpmsolver_at_many_steps():
    """Our reference on a flow model equals diffusers' own flow DPM-Solver++(2M) on the same σ's."""
    from diffusers import DPMSolverMultistepScheduler

    denoiser = tiny_denoiser(FLOW, seed=1)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                            algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(30)
    s = scheduler.sigmas.double()  # flow time s, ending in 0
    ours = reference.solve(denoiser, noise, grid=s / (1 - s))  # σ = s/(1−s)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser.model(x, t).sample, t, x).prev_sample
    assert float((ours - x).norm() / x.norm()) < 2e-3  # diffusers rounds the model's timesteps


def test_grid_passes_through_the_table_and_starts_at_it():
    denoiser = tiny_denoiser(VP)
    schedule = denoiser.schedule
    table = torch.tensor([schedule.sigma_max, 7.3, 1.234, 0.2, 0.0], dtype=torch.float64)
    grid = reference.reference_sigmas(schedule, 50, through=table)
    index = reference.table_positions(grid, table)
    assert torch.all(grid[:-1] > grid[1:]) and torch.allclose(grid[index], table)
    fine = time_uniform_sigmas(50, schedule, "trailing")
    assert float(grid[-1]) == 0.0 and float(grid[-2]) == pytest.approx(float(fine[-2]), rel=1e-6)
    assert 50 <= len(grid) - 1 <= 54  # the fine grid plus at most the table's own entries
    no_zero = reference.reference_sigmas(schedule, 50, through=table[:-1])
    assert float(no_zero[-1]) == pytest.approx(0.2)
    assert torch.allclose(no_zero[reference.table_positions(no_zero, table[:-1])], table[:-1])
    # a table starting below σ_max: the noise enters at its σ_0
    lower = reference.reference_sigmas(schedule, 50, through=torch.tensor([20.0, 1.0, 0.0]))
    assert float(lower[0]) == pytest.approx(20.0)
