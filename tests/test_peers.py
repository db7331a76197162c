"""Peers: the dynamic programme, GITS and AYS costs, and the diffusers driver against our σ-space solver."""
import itertools

import pytest
import torch

from diffusers_fewstep import evaluation as ev
from diffusers_fewstep import peers
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.schedules import baseline_sigmas

DDPM_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False}


def path_cost(cost, path):
    return sum(float(cost[i, j]) for i, j in zip(path, path[1:]))


def test_dp_recovers_the_brute_force_optimum():
    torch.manual_seed(0)
    m = 9
    cost = torch.rand(m, m) * 10
    for k in (1, 2, 3, 5, 8):
        path = peers.dp_optimal_path(cost, k)
        assert path[0] == 0 and path[-1] == m - 1 and len(path) == k + 1
        assert all(a < b for a, b in zip(path, path[1:]))
        best = min(path_cost(cost, [0, *mid, m - 1]) for mid in itertools.combinations(range(1, m - 1), k - 1))
        assert path_cost(cost, path) == pytest.approx(best, rel=1e-12)


def test_dp_finds_a_planted_path():
    m = 7
    cost = torch.full((m, m), 5.0)
    for i, j in [(0, 2), (2, 3), (3, 6)]:
        cost[i, j] = 1.0
    assert peers.dp_optimal_path(cost, 3) == [0, 2, 3, 6]
    # costs below the diagonal (backward jumps) are never used, however cheap
    cost.fill_(5.0)
    cost[3, 1] = -100.0
    assert peers.dp_optimal_path(cost, 2)[1] in range(1, 6)
    with pytest.raises(ValueError, match="cannot go"):
        peers.dp_optimal_path(cost, 7)


def test_gits_cost_is_zero_when_the_first_order_step_is_exact():
    # a single data point x0: D ≡ x0, the first-order step is the exact ODE flow
    sigmas = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0])
    x0 = torch.randn(3, 1, 2, 2)
    eps = torch.randn(3, 1, 2, 2)
    states = torch.stack([x0 + s * eps for s in sigmas])
    denoised = x0.expand(len(sigmas) - 1, *x0.shape)
    cost = peers.gits_cost_matrix(states, denoised, sigmas)
    upper = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    assert float(cost[upper].abs().max()) < 1e-5
    assert torch.isinf(cost[~upper]).all()


def test_gits_cost_measures_one_step_error():
    sigmas = torch.tensor([4.0, 1.0, 0.0])
    states = torch.zeros(3, 1, 1, 1, 1)
    states[1] = 1.0  # the teacher is at 1 at σ=1
    denoised = torch.zeros(2, 1, 1, 1, 1)
    cost = peers.gits_cost_matrix(states, denoised, sigmas)
    # one step from x=0 with D=0 stays at 0: distance to the teacher at σ=1 is 1, at σ=0 is 0
    assert float(cost[0, 1]) == pytest.approx(1.0) and float(cost[0, 2]) == pytest.approx(0.0)


def test_ays_cost_matches_direct_quadrature():
    torch.manual_seed(1)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    denoised = torch.randn(5, 3, 2)  # D at each grid σ for 3 (x0, ε) pairs
    cost = peers.ays_cost_matrix(denoised, sigmas)
    for i, j in [(0, 1), (0, 4), (1, 3), (2, 4)]:
        expected = 0.0
        for k in range(i, j):
            w = (sigmas[k + 1] ** -2 - sigmas[k] ** -2) / 2
            d_k = (denoised[k] - denoised[i]).pow(2).sum() / 3
            d_k1 = (denoised[k + 1] - denoised[i]).pow(2).sum() / 3
            expected += float(w * (d_k + d_k1) / 2)
        assert float(cost[i, j]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert torch.isinf(cost[2, 1]) and torch.isinf(cost[3, 3])


@pytest.fixture(scope="module")
def tiny_denoiser():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    return SigmaDenoiser(unet, DDPM_CONFIG)


def test_diffusers_ddim_trailing_equals_our_sigma_space_ddim(tiny_denoiser):
    noise = ev.noise_bank(6, (1, 8, 8), seed=2)
    for nfe in (3, 5):
        theirs = peers.sample_diffusers(tiny_denoiser.model, peers.diffusers_scheduler("ddim_trailing", DDPM_CONFIG),
                                        noise, nfe, batch_size=4)
        table = baseline_sigmas("ddim_trailing", nfe, tiny_denoiser.schedule)
        ours = ev.generate(tiny_denoiser, noise, table, "euler", batch_size=4)
        assert ev.endpoint_rmse(ours, theirs) < 1e-4


def test_every_diffusers_peer_builds_and_samples(tiny_denoiser):
    noise = ev.noise_bank(2, (1, 8, 8))
    for name in peers.STOCK_SCHEDULERS["vp"]:
        x = peers.sample_diffusers(tiny_denoiser.model, peers.diffusers_scheduler(name, DDPM_CONFIG), noise, 4)
        assert x.shape == noise.shape and torch.isfinite(x).all(), name
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        peers.diffusers_scheduler("lms", DDPM_CONFIG)


def test_gits_and_ays_tables_are_valid(tiny_denoiser):
    schedule = tiny_denoiser.schedule
    gits = peers.gits_sigmas(tiny_denoiser, [3, 5], num_samples=4, grid_steps=20)
    ays = peers.ays_sigmas(tiny_denoiser, [3, 5], num_samples=4, grid_size=24)
    for tables in (gits, ays):
        for nfe, table in tables.items():
            assert len(table) == nfe + 1 and table[-1] == 0.0
            assert all(a > b for a, b in zip(table, table[1:]))
            assert table[0] == pytest.approx(schedule.sigma_max, rel=1e-4)
    assert ays[3][-2] == pytest.approx(schedule.sigma_min, rel=1e-4)  # AYS ends at σ_min, then 0
    grid = peers.time_uniform_sigmas(20, schedule).double()
    for s in gits[5]:  # GITS picks points of its time-uniform grid
        assert torch.isclose(grid, torch.tensor(s, dtype=torch.float64), rtol=1e-5).any()
