"""Peers: the dynamic programme, GITS and AYS (costs, search, released tables, whole procedures on an exact
denoiser), and the diffusers driver against our σ-space solver."""
import itertools
import math

import pytest
import torch

from diffusers_fewstep import ays
from diffusers_fewstep import evaluation as ev
from diffusers_fewstep import peers
from diffusers_fewstep.adapter import NoiseSchedule, SigmaDenoiser
from diffusers_fewstep.schedules import baseline_sigmas, karras_sigmas, loguniform_sigmas
from gaussian_mixture import exact_solution, random_mixture

DDPM_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False}


def path_cost(cost, path, coeff=1.0):
    return sum(coeff**m * float(cost[i, j]) for m, (i, j) in enumerate(zip(path, path[1:])))


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_dp_recovers_the_brute_force_optimum(coeff):
    torch.manual_seed(0)
    m = 9
    cost = torch.rand(m, m) * 10 - 3  # GITS's deviation costs can be negative
    for k in (1, 2, 3, 5, 8):
        path = peers.dp_optimal_path(cost, k, coeff=coeff)
        assert path[0] == 0 and path[-1] == m - 1 and len(path) == k + 1
        assert all(a < b for a, b in zip(path, path[1:]))
        best = min(path_cost(cost, [0, *mid, m - 1], coeff) for mid in itertools.combinations(range(1, m - 1), k - 1))
        assert path_cost(cost, path, coeff) == pytest.approx(best, rel=1e-12)


def test_dp_coefficient_weights_later_jumps():
    # two 2-jump paths 0→1→3 (costs 1, 3) and 0→2→3 (costs 2.5, 1): plain sum prefers the second (3.5 < 4);
    # with a small factor on later jumps the first wins (1 + 0.2·3 = 1.6 < 2.5 + 0.2·1 = 2.7)
    cost = torch.full((4, 4), 100.0)
    cost[0, 1], cost[1, 3], cost[0, 2], cost[2, 3] = 1.0, 3.0, 2.5, 1.0
    assert peers.dp_optimal_path(cost, 2) == [0, 2, 3]
    assert peers.dp_optimal_path(cost, 2, coeff=0.2) == [0, 1, 3]


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


@pytest.mark.parametrize("metric", ["dev", "l2"])
def test_gits_cost_is_zero_when_the_first_order_step_is_exact(metric):
    # a single data point x0: D ≡ x0, the first-order step is the exact ODE flow
    sigmas = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.01])
    x0 = torch.randn(3, 1, 2, 2)
    eps = torch.randn(3, 1, 2, 2)
    states = torch.stack([x0 + s * eps for s in sigmas])
    denoised = x0.expand(len(sigmas) - 1, *x0.shape)
    cost = peers.gits_cost_matrix(states, denoised, sigmas, metric)
    upper = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    assert float(cost[upper].abs().max()) < 1e-5
    assert torch.isinf(cost[~upper]).all()


def test_gits_l2_cost_measures_one_step_error():
    sigmas = torch.tensor([4.0, 1.0, 0.0])
    states = torch.zeros(3, 1, 1, 1, 1)
    states[1] = 1.0  # the teacher is at 1 at σ=1
    denoised = torch.zeros(2, 1, 1, 1, 1)
    cost = peers.gits_cost_matrix(states, denoised, sigmas, "l2")
    # one step from x=0 with D=0 stays at 0: distance to the teacher at σ=1 is 1, at σ=0 is 0
    assert float(cost[0, 1]) == pytest.approx(1.0) and float(cost[0, 2]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown GITS metric"):
        peers.gits_cost_matrix(states, denoised, sigmas, "l1")


def test_trajectory_deviation_is_the_distance_from_the_chord():
    start = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    end = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    x = torch.tensor([[[1.0, 3.0], [4.0, 2.0]], [[5.0, -0.5], [1.0, 7.0]]])  # (2 points, 2 samples, 2 dims)
    dev = peers.trajectory_deviation(x, start, end)
    assert dev.shape == (2, 2) and dev.flatten().tolist() == pytest.approx([3.0, 3.0, 0.5, 0.0])


def test_gits_dev_cost_is_the_jump_deviation_minus_the_teachers():
    # 2-D trajectory (0, 0) → (1, 1) → (2, 0) on σ = 2, 1, 0.5; from (0, 0) with D = (4, 0), the Euler jump
    # to σ = 1 lands at (2, 0), on the chord (deviation 0) where the teacher deviates by 1: cost −1
    sigmas = torch.tensor([2.0, 1.0, 0.5])
    states = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]])
    denoised = torch.tensor([[[4.0, 0.0]], [[3.0, -1.0]]])
    cost = peers.gits_cost_matrix(states, denoised, sigmas, "dev")
    assert float(cost[0, 1]) == pytest.approx(-1.0)
    # from (1, 1) with D = (3, −1), the jump to σ = 0.5 lands at (2, 0): the teacher's end, cost 0
    assert float(cost[1, 2]) == pytest.approx(0.0, abs=1e-6)


def test_ays_cost_matches_direct_quadrature():
    torch.manual_seed(1)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    denoised = torch.randn(5, 3, 2)  # D at each grid σ for 3 (x0, ε) pairs
    cost = ays.ays_cost_matrix(denoised, sigmas)
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
    ays_tables = ays.ays_sigmas(tiny_denoiser, [3, 5], num_samples=4, grid_size=100, proxy_samples=4)
    for tables in (gits, ays_tables):
        for nfe, table in tables.items():
            assert len(table) == nfe + 1 and all(a > b for a, b in zip(table, table[1:]))
            assert table[0] == pytest.approx(schedule.sigma_max, rel=1e-4)
    grid = peers.gits_grid(schedule, 21).double()
    for table in gits.values():  # GITS picks points of its teacher grid and ends at σ_min: no jump to 0
        assert table[-1] == pytest.approx(schedule.sigma_min, rel=1e-5)
        assert all(torch.isclose(grid, torch.tensor(s, dtype=torch.float64), rtol=1e-6).any() for s in table)
    assert all(table[-1] == 0.0 and table[-2] > schedule.sigma_min for table in ays_tables.values())


# --- GITS and AYS on an exact denoiser -------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixture_problem():
    gm = random_mixture(dim=4, components=4, seed=0)
    noise = ev.noise_bank(512, (4,), seed=1234)
    exact = exact_solution(gm, noise / gm.schedule.native_scale(torch.tensor(gm.schedule.sigma_max)),
                           gm.schedule.sigma_max).float()
    return gm, noise, lambda table, solver: ev.endpoint_rmse(ev.generate(gm, noise, table, solver), exact)


def test_gits_beats_ddim_trailing_on_an_exact_denoiser(mixture_problem):
    gm, _, error = mixture_problem
    table = peers.gits_sigmas(gm, [5])[5]
    assert table[-1] == pytest.approx(gm.schedule.sigma_min, rel=1e-5) and len(table) == 6
    trailing = baseline_sigmas("ddim_trailing", 5, gm.schedule)
    # measured: iPNDM 0.057 and DDIM 0.101 on the GITS table; DDIM 0.205 and iPNDM 0.121 on the trailing one
    assert error(table, "ipndm") < 0.6 * error(trailing, "ipndm")
    assert error(table, "euler") < 0.6 * error(trailing, "euler")


def test_ays_with_early_stopping_beats_ddim_trailing_and_the_converged_klub(mixture_problem):
    gm, _, error = mixture_problem
    tables = ays.ays_sigmas(gm, [5, 10], num_samples=512, grid_size=200)
    converged = ays.ays_sigmas(gm, [5], num_samples=512, grid_size=200, proxy_samples=0)
    trailing = baseline_sigmas("ddim_trailing", 5, gm.schedule)
    # measured: 0.030 early-stopped, 0.132 converged (over-optimised: steps pile up at small σ), 0.201 trailing
    assert error(tables[5], "dpmpp_2m") < 0.3 * error(trailing, "dpmpp_2m")
    assert error(tables[5], "dpmpp_2m") < 0.5 * error(converged[5], "dpmpp_2m")
    # the 5-step table is the 10-step one's every other point (interpolating the 40-step table)
    assert tables[5][:-1] == pytest.approx(tables[10][:-1:2], rel=1e-9)


# --- AYS pieces --------------------------------------------------------------------------------------------
C = 0.5  # std of the Gaussian data below, as the paper's importance-sampling prior


def gaussian_klub_cost(grid, d=1):
    """Exact E‖D(σ_k) − D(σ_i)‖² for Gaussian data N(0, C²I) along forward paths (AYS App. A.3)."""
    s = grid.double()
    dist = C**4 * d * (1 / (s[None, :] ** 2 + C**2) - 1 / (s[:, None] ** 2 + C**2)).abs()
    return ays.klub_cost(dist, grid)


def test_forward_paths_have_the_forward_process_joint_law():
    d, n = 64, 400
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * C
    grid = loguniform_sigmas(12, 0.02, 20.0, final_zero=False)
    denoised = ays.forward_path_denoised(lambda x, sigma: C**2 / (C**2 + sigma**2) * x, x0, grid, seed=1)
    measured = (denoised[:, None] - denoised[None]).pow(2).sum(-1).mean(-1).double()
    s = grid.double()
    expected = C**4 * d * (1 / (s[None, :] ** 2 + C**2) - 1 / (s[:, None] ** 2 + C**2)).abs()
    off = ~torch.eye(len(grid), dtype=torch.bool)
    # one ε for every σ (x0 + σ·ε) gives up to 3× less here; the forward process's fresh noise gives this
    assert (measured[off] / expected[off] - 1).abs().max() < 0.06


def test_klub_search_reaches_the_gaussian_klub_optimum():
    from scipy import integrate, optimize

    def klub(a, b):  # the continuous KLUB of one step a → b for Gaussian data (d = 1)
        return integrate.quad(lambda s: s**-3 * C**4 * (1 / (s**2 + C**2) - 1 / (a**2 + C**2)), b, a, limit=200)[0]

    grid = loguniform_sigmas(400, 0.002, 80.0, final_zero=False)
    start = ays.snap_to_grid(karras_sigmas(11, 0.002, 80.0, final_zero=False), grid)
    table = ays.klub_search(gaussian_klub_cost(grid), start, range(1, 10), max_sweeps=2000)
    t = grid.double()[table].tolist()
    step = float(grid[0].log() - grid[1].log())
    for i in range(1, 10):  # every point sits at the continuous optimum given its neighbours (measured ≤ 0.17 steps)
        lo, hi = math.log(t[i + 1]), math.log(t[i - 1])
        best = optimize.minimize_scalar(lambda u: klub(t[i - 1], math.exp(u)) + klub(math.exp(u), t[i + 1]),
                                        bounds=(lo, hi), method="bounded", options={"xatol": 1e-9}).x
        assert abs(math.log(t[i]) - best) <= 0.5 * step
    assert table != start and table[0] == start[0] and table[-1] == start[-1]


def test_klub_search_early_stopping_keeps_the_best_sweep():
    grid = loguniform_sigmas(400, 0.002, 80.0, final_zero=False)
    cost = gaussian_klub_cost(grid)
    start = ays.snap_to_grid(karras_sigmas(11, 0.002, 80.0, final_zero=False), grid)
    sweeps = [start]
    for _ in range(5):
        sweeps.append(ays.klub_sweep(cost, sweeps[-1], range(1, 10))[0])
    scores = iter([5.0, 3.0, 1.0, 2.0, 4.0, 0.5])  # the proxy at the start and after sweeps 1–5
    calls = []

    def proxy(table):
        calls.append(list(table))
        return next(scores)

    assert ays.klub_search(cost, start, range(1, 10), proxy=proxy, patience=2) == sweeps[2]
    assert calls == sweeps[:5]  # stopped after two sweeps without improvement
    scores = iter([5.0, 3.0, 1.0, 2.0, 4.0, 0.5, 9.0, 9.0, 9.0])
    assert ays.klub_search(cost, start, range(1, 10), proxy=lambda table: next(scores), patience=3) == sweeps[5]


def test_hierarchy_subdivides_and_keeps_the_first_stage_points():
    assert ays.subdivide([0, 8, 20]) == [0, 4, 8, 14, 20]
    grid = loguniform_sigmas(400, 0.002, 80.0, final_zero=False)
    cost = gaussian_klub_cost(grid)
    start = ays.snap_to_grid(karras_sigmas(11, 0.002, 80.0, final_zero=False), grid)
    table = ays.ays_hierarchy(cost, start)
    assert len(table) == 41 and all(a < b for a, b in zip(table, table[1:]))
    assert table[::4] == ays.klub_search(cost, start, range(1, 10), gap=4)
    with pytest.raises(ValueError, match="finer grid"):
        ays.ays_hierarchy(cost, [0, 2, 399])


@pytest.mark.parametrize("config", [DDPM_CONFIG, {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                  "num_train_timesteps": 1000, "shift": 3.0}])
def test_ays_start_is_uniform_in_the_models_timestep(config):
    schedule = NoiseSchedule(config)
    start = ays.ays_start(schedule)
    assert len(start) == 11 and float(start[0]) == pytest.approx(schedule.sigma_max, rel=1e-6)
    assert float(start[-1]) == pytest.approx(schedule.sigma_min, rel=1e-6)
    steps = schedule.sigma_to_t(start)[:-1] - schedule.sigma_to_t(start)[1:]
    assert float(steps.max() - steps.min()) < 1e-6 * float(steps.mean())
    assert ays.ays_start(schedule, "karras").tolist() == pytest.approx(
        karras_sigmas(11, schedule.sigma_min, schedule.sigma_max, final_zero=False).tolist())


SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon"}


@pytest.mark.parametrize("model", ["StableDiffusion", "StableDiffusionXL"])
def test_ays_released_tables_and_their_interpolation(model):
    from diffusers.schedulers import AysSchedules

    released = AysSchedules[f"{model}Sigmas"]
    tables = ays.ays_released_sigmas(model, [10, 5, 7], NoiseSchedule(SD_CONFIG))
    assert tables[10] == pytest.approx(released, abs=1e-9)  # the 10-step table itself
    assert tables[5] == pytest.approx(released[:-1:2] + [0.0], abs=1e-9)  # every other point, then 0
    assert len(tables[7]) == 8 and tables[7][-1] == 0.0 and all(a > b for a, b in zip(tables[7], tables[7][1:]))
    with pytest.raises(ValueError, match="scaled_linear"):
        ays.ays_released_sigmas(model, [5], NoiseSchedule(DDPM_CONFIG))
    with pytest.raises(ValueError, match="no released AYS table"):
        ays.ays_released_sigmas("DeepFloyd", [5], NoiseSchedule(SD_CONFIG))


def test_flow_peers_sample_through_the_stock_loop_and_match_our_solvers():
    """Flow-matching schedulers have no `init_noise_sigma`/`scale_model_input`; the stock loop must still run them,
    and FlowMatch Euler equals our first-order solver on its own σ's (schedules.stock_sigmas)."""
    from diffusers import UNet2DModel

    from diffusers_fewstep.adapter import SigmaDenoiser
    from diffusers_fewstep.schedules import stock_sigmas

    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    denoiser = SigmaDenoiser(unet, flow)
    noise = ev.noise_bank(4, (1, 8, 8), seed=3)
    for name in peers.STOCK_SCHEDULERS["flow"]:
        x = peers.sample_diffusers(unet, peers.diffusers_scheduler(name, flow), noise, 4)
        assert x.shape == noise.shape and torch.isfinite(x).all(), name
    theirs = peers.sample_diffusers(unet, peers.diffusers_scheduler("flow_euler", flow), noise, 4)
    ours = ev.generate(denoiser, noise, stock_sigmas("flow_euler", 4, flow), "euler")
    # s = 1 is σ = ∞: we start at the cap σ = 4096 (the model sees t = 999.76 instead of 1000)
    assert ev.endpoint_rmse(ours, theirs) < 2e-3
