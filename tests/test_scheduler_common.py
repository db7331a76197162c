"""LearnedScheduleScheduler through the checks of diffusers' generic scheduler suite (`SchedulerCommonTest` in
diffusers' tests/schedulers/test_schedulers.py: save/load, compatible schedulers, step outputs, stepping from any
timestep, add_noise, the attributes pipelines read), for every solver and every supported kind of model."""
import inspect

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr
from diffusers.utils import is_torchsde_available
from diffusers.utils import logging as diffusers_logging

from diffusers_fewstep import LearnedScheduleScheduler
from diffusers_fewstep.solvers import SOLVERS, sample
from tiny_models import fake_learned_table

SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
KINDS = {
    "epsilon": {},
    "v_prediction": dict(prediction_type="v_prediction", **SCALED_LINEAR),
    "sample": dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, **SCALED_LINEAR),
    "flow": dict(family="flow", shift=3.0),
}
VP_KINDS = [k for k in KINDS if k != "flow"]
STEPS = 6
S_DATA = 0.5  # the exact model below denoises Gaussian data N(0, S_DATA²)


def make(kind, solver="euler", **kwargs):
    base = LearnedScheduleScheduler(**KINDS[kind]).config
    tables = {n: fake_learned_table(base, n, seed=n) for n in (4, STEPS)}
    return LearnedScheduleScheduler(**KINDS[kind], sigma_tables=tables, solver=solver, **kwargs)


def exact_output(sched, sample, t):
    """The native output (ε, v, x0 or flow velocity) of the exact denoiser D(x; σ) = x·s²/(s²+σ²) of N(0, s²)."""
    schedule = sched.noise_schedule
    sigma = schedule.t_to_sigma(torch.as_tensor(t))  # float64, as is the arithmetic below
    x = sample.double() / schedule.native_scale(sigma)
    denoised = x * S_DATA**2 / (S_DATA**2 + sigma**2)
    if schedule.prediction_type == "epsilon":
        output = (x - denoised) / sigma
    elif schedule.prediction_type == "v_prediction":
        output = (x / (sigma**2 + 1) - denoised) * (sigma**2 + 1).sqrt() / sigma
    elif schedule.prediction_type == "sample":
        output = denoised
    else:
        s = sigma / (1 + sigma)
        output = (x * (1 - s) - denoised) / s
    return output.to(sample.dtype)


def noise(dtype=torch.float64):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def full_loop(sched, sample, steps=STEPS):
    sched.set_timesteps(steps)
    sample = sample * sched.init_noise_sigma
    for t in sched.timesteps:
        sample = sched.step(exact_output(sched, sched.scale_model_input(sample, t), t), t, sample).prev_sample
    return sample


def config_without_defaults_list(sched):
    return {k: v for k, v in sched.config.items() if k != "_use_default_values"}


# --- sampling ------------------------------------------------------------------------------------------
def gaussian_denoiser(x, sigma):
    return x * S_DATA**2 / (S_DATA**2 + sigma**2)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_loop_is_the_sigma_space_solve(kind, solver):
    """In the model's native scale, fed the native output of the exact model, the scheduler reproduces the shared
    σ-space solver on the same table: every prediction type and family converts to D and back exactly (up to the
    float32 timesteps the model receives)."""
    sched = make(kind, solver)
    table = torch.tensor(sched.config.sigma_tables[str(STEPS)], dtype=torch.float64)
    start = noise()
    expected = sample(gaussian_denoiser, start / sched.noise_schedule.native_scale(table[0]), table, solver)
    torch.testing.assert_close(full_loop(sched, start), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_loop_converges_to_the_exact_solution(kind, solver):
    """Gaussian data: the probability-flow ODE maps the σ-space start x_T to x_T·s/√(s²+σ_0²); 48 steps
    (the 6-step table interpolated) land within 10% (first order) or 1% (multistep solvers) of it."""
    sched = make(kind, solver, allow_interpolation=True)
    start = noise()
    sigma_0 = torch.tensor(sched.config.sigma_tables[str(STEPS)][0], dtype=torch.float64)
    exact = start / sched.noise_schedule.native_scale(sigma_0) * S_DATA / (S_DATA**2 + sigma_0**2).sqrt()
    error = float((full_loop(sched, start, 48) - exact).norm() / exact.norm())
    assert error < (0.1 if solver == "euler" else 0.01)


# --- save / load and compatible schedulers ----------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip_samples_identically(kind, solver, tmp_path):
    sched = make(kind, solver, provenance={"objective": "trajectory"})
    sched.save_pretrained(tmp_path)
    loaded = LearnedScheduleScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == config_without_defaults_list(sched)
    assert torch.equal(full_loop(loaded, noise()), full_loop(sched, noise()))


@pytest.fixture
def quiet_diffusers():
    """Compatible schedulers log every key of ours they ignore; diffusers' own schedulers do the same."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


@pytest.mark.usefixtures("quiet_diffusers")
@pytest.mark.parametrize("built", ["init", "from_config"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_compatible_schedulers_keeps_the_config(kind, built):
    """As diffusers' `test_compatibles`: our config → a compatible scheduler of the same family → ours again gives
    the same config, `_use_default_values` included, whether ours was built directly or by `from_config`."""
    sched = make(kind, "unipc", solvers={4: "ipndm"})
    if built == "from_config":
        native = FlowMatchEulerDiscreteScheduler(shift=3.0) if kind == "flow" else DDPMScheduler(**KINDS[kind])
        sched = LearnedScheduleScheduler.from_config(native.config, sigma_tables=sched.config.sigma_tables,
                                                     solver="unipc", solvers={4: "ipndm"})
    family = [c for c in sched.compatibles if (c is FlowMatchEulerDiscreteScheduler) == (kind == "flow")
              and (c.__name__ != "DPMSolverSDEScheduler" or is_torchsde_available())]
    assert len(family) >= (1 if kind == "flow" else 12)
    init_keys = set(inspect.signature(LearnedScheduleScheduler.__init__).parameters)
    for compatible in family:
        back = LearnedScheduleScheduler.from_config(compatible.from_config(sched.config).config)
        assert {k: v for k, v in back.config.items() if k in sched.config} == dict(sched.config), compatible
        assert not (set(back.config) - set(sched.config)) & init_keys


@pytest.mark.parametrize("kind", VP_KINDS)
def test_trained_betas_round_trip(kind, tmp_path):
    betas = DDPMScheduler(**KINDS[kind]).betas.numpy()
    sched = LearnedScheduleScheduler(trained_betas=betas, sigma_tables={2: [10.0, 1.0, 0.0]})
    sched.save_pretrained(tmp_path)
    loaded = LearnedScheduleScheduler.from_pretrained(tmp_path)
    assert loaded.betas.tolist() == sched.betas.tolist()
    last = -1 if kind == "zero_snr" else None  # β_T = 1: ᾱ_T = 0 is capped at 2⁻²⁴
    torch.testing.assert_close(sched.betas[:last], torch.from_numpy(betas)[:last], rtol=0, atol=2e-7)


# --- step -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_step_shapes_dtypes_and_tuple_output(kind, solver):
    outputs = {}
    for return_dict in (True, False):
        sched = make(kind, solver)
        sched.set_timesteps(STEPS)
        sample = noise(torch.float32)
        steps = []
        for t in sched.timesteps[:2]:
            out = sched.step(exact_output(sched, sample, t), t, sample, return_dict=return_dict)
            steps.append(tuple(out.values()) if return_dict else out)
            sample = steps[-1][0]
        outputs[return_dict] = steps
    for (prev, denoised), (prev_t, denoised_t) in zip(outputs[True], outputs[False]):
        assert prev.shape == denoised.shape == noise().shape and prev.dtype == torch.float32
        assert torch.equal(prev, prev_t) and torch.equal(denoised, denoised_t)
    for dtype in (torch.float16, torch.bfloat16):
        sched = make(kind, solver)
        sched.set_timesteps(STEPS)
        t = sched.timesteps[0]
        half = sched.step(exact_output(sched, noise(dtype), t), t, noise(dtype)).prev_sample
        assert half.dtype == dtype
        torch.testing.assert_close(half.double(), outputs[True][0][0].double(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_stepping_from_any_timestep_of_the_run(kind, solver):
    """A pipeline may begin at any timestep of the run (without `set_begin_index`, the scheduler locates it): the
    first step from there is the first-order (DDIM/Euler) step."""
    for begin in range(STEPS):
        sched, euler = make(kind, solver), make(kind, "euler")
        for s in (sched, euler):
            s.set_timesteps(STEPS)
        t = sched.timesteps[begin]
        sample = noise()
        output = exact_output(sched, sample, t)
        torch.testing.assert_close(sched.step(output, t, sample).prev_sample, euler.step(output, t, sample).prev_sample,
                                   rtol=1e-10, atol=1e-10)
        assert sched.step_index == begin + 1
    with pytest.raises(IndexError, match="this run has 6 steps"):
        sched.step(output, t, sample)  # the run ended with the last step
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="is not in this run's timesteps"):
        sched.step(output, float(sched.timesteps[0]) + 0.5, sample)


# --- forward process, model input, attributes ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_is_the_forward_process_at_each_timestep(kind):
    sched = make(kind)
    sched.set_timesteps(STEPS)
    x0, eps = noise(torch.float32), noise(torch.float32).flip(0)
    timesteps = sched.timesteps[:4]  # one per sample
    noised = sched.add_noise(x0, eps, timesteps)
    assert noised.shape == x0.shape and noised.dtype == x0.dtype
    sigma = sched.sigmas[:4].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noised.double() / sched.noise_schedule.native_scale(sigma), x0.double() + sigma * eps,
                               rtol=1e-5, atol=1e-5 * float(sigma.max()))
    integer_t = torch.tensor([999, 500, 20, 0])
    if kind == "flow":
        s = (integer_t / 1000.0).reshape(-1, 1, 1, 1)
        expected = (1 - s) * x0 + s * eps
    else:
        expected = DDPMScheduler(**KINDS[kind]).add_noise(x0, eps, integer_t)
    got = sched.add_noise(x0, eps, integer_t)
    if kind in ("zero_snr", "flow"):  # σ = ∞ at the last training step is capped at 4096 (ᾱ = 2⁻²⁴)
        got, expected = got[1:], expected[1:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_public_api(kind):
    sched = make(kind)
    assert sched.init_noise_sigma == 1.0 and len(sched) == 1000
    assert {"timesteps", "sigmas"} <= set(inspect.signature(sched.set_timesteps).parameters)
    sample = noise(torch.float32)
    assert sched.scale_model_input(sample, 0.0) is sample  # native scale: the identity
    sched.set_timesteps(STEPS)
    assert sched.scale_model_input(sample, sched.timesteps[2]) is sample
    assert sched.timesteps.dtype == torch.float32 and len(sched.timesteps) == len(sched.sigmas) - 1 == STEPS
    assert sched.config.solver == "euler" and sched.begin_index is None and sched.step_index is None
    with pytest.raises(AttributeError, match="'LearnedScheduleScheduler' object has no attribute 'does_not_exist'"):
        sched.does_not_exist


@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_attributes_match_diffusers(kind):
    """`betas`, `alphas`, `alphas_cumprod` as DDPMScheduler (ᾱ_T = 2⁻²⁴ with zero terminal SNR, as
    EulerDiscreteScheduler); diffusers' `compute_snr` reads them and gets 1/σ²."""
    sched, ddpm = make(kind), DDPMScheduler(**KINDS[kind])
    assert torch.equal(sched.alphas_cumprod, EulerDiscreteScheduler(**KINDS[kind]).alphas_cumprod)
    last = -1 if kind == "zero_snr" else None  # DDPM: β_T = 1, ᾱ_T = 0
    torch.testing.assert_close(sched.betas[:last], ddpm.betas[:last], rtol=0, atol=2e-7)
    torch.testing.assert_close(sched.alphas[:last], ddpm.alphas[:last], rtol=0, atol=2e-7)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(sched.alphas, 0), rtol=1e-5, atol=0)
    t = torch.tensor([0, 10, 500, 998, 999])
    snr = compute_snr(sched, t)
    torch.testing.assert_close(snr.double(), sched.noise_schedule.t_to_sigma(t) ** -2, rtol=1e-5, atol=0)
    assert not hasattr(sched, "sigma_min")


def test_flow_attributes_match_flow_match_euler():
    """`sigma_min` / `sigma_max` as FlowMatchEulerDiscreteScheduler (s ∈ (0, 1]); σ_max is capped at 4096
    (s = 4096/4097) where the flow scheduler starts at s = 1."""
    sched, flow = make("flow"), FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert sched.sigma_min == pytest.approx(flow.sigma_min, rel=1e-6)
    assert sched.sigma_max == pytest.approx(flow.sigma_max, abs=1 / 4097 + 1e-9) and sched.sigma_max < 1
    assert not hasattr(sched, "alphas_cumprod")

