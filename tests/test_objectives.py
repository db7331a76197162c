"""Phase-1 objectives: gradients, the Monte-Carlo bound, the stationarity condition."""
import math

import pytest
import torch

from diffusers_fewstep import objectives
from diffusers_fewstep.solvers import sample
from diffusers_fewstep.schedules import baseline_sigmas, time_uniform_sigmas
from gaussian_mixture import random_mixture


class PathDenoiser:
    """D(x; σ) = a·(1/σ)^p·1, independent of x: along every path τ(u) = a·u^p."""

    def __init__(self, a=1.0, power=1):
        self.a, self.power = a, power

    def __call__(self, x, sigma, **_):
        u = 1 / torch.as_tensor(sigma, dtype=torch.float64)
        u = u.reshape(-1, *([1] * (x.ndim - 1))) if u.ndim else u
        return (self.a * u**self.power * torch.ones_like(x, dtype=torch.float64)).to(x.dtype)


@pytest.fixture(scope="module")
def gm():
    return random_mixture(dim=4, components=4, seed=0)


def test_trajectory_loss_gradient_matches_finite_differences(gm):
    # the loss is differentiable in every σ of the table, through the solver and the model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64) * gm.schedule.sigma_max
    reference = sample(gm, x, time_uniform_sigmas(200, gm.schedule).double(), "dpmpp_2m")
    base = baseline_sigmas("karras", 5, gm.schedule).double()
    for solver in ("euler", "dpmpp_2m", "unipc"):
        sigmas = base.clone().requires_grad_(True)
        loss = objectives.trajectory_loss(gm, x, sigmas, reference, solver)
        (grad,) = torch.autograd.grad(loss, sigmas)
        for i in (1, 3):
            h = 1e-5 * float(base[i])
            plus, minus = base.clone(), base.clone()
            plus[i] += h
            minus[i] -= h
            fd = (objectives.trajectory_loss(gm, x, plus, reference, solver)
                  - objectives.trajectory_loss(gm, x, minus, reference, solver)) / (2 * h)
            assert float(grad[i]) == pytest.approx(float(fd), rel=1e-3, abs=1e-9), (solver, i)


def test_trajectory_loss_is_zero_on_the_reference_table(gm):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)) * gm.schedule.sigma_max
    table = baseline_sigmas("loguniform", 6, gm.schedule).float()
    reference = sample(gm, x, table, "euler")
    assert float(objectives.trajectory_loss(gm, x, table, reference, "euler")) < 1e-12


def test_local_errors_match_the_integral():
    # τ(u) = a·u² ⇒ L_i = ∫_{u_i}^{u_{i+1}} a·(u² − u_i²) du, known in closed form
    den = PathDenoiser(a=0.3, power=2)
    sigmas = torch.tensor([8.0, 2.0, 0.7, 0.2], dtype=torch.float64)
    x0, noise = torch.zeros(32, 3, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    errors, _ = objectives.local_errors(den, x0, noise, sigmas, strata=64,
                                        generator=torch.Generator().manual_seed(0))
    u = 1 / sigmas
    for i, err in enumerate(errors):
        lo, hi = float(u[i]), float(u[i + 1])
        exact = 0.3 * ((hi**3 - lo**3) / 3 - lo**2 * (hi - lo))
        assert float(err.mean()) == pytest.approx(exact, rel=2e-3)
        assert float(err.std()) < 0.02 * exact  # stratification: 64 samples per interval, tiny spread


def test_bound_weights():
    sigmas = torch.tensor([80.0, 3.0, 0.5, 0.01], dtype=torch.float64)
    literal = objectives.interval_weights(sigmas, "literal")
    assert torch.allclose(literal, torch.full((3,), 0.01, dtype=torch.float64))
    prop = objectives.interval_weights(sigmas, "propagated", sigma_data=0.5)
    expected = [s * math.sqrt((0.25 + 1e-4) / (0.25 + s**2)) for s in (3.0, 0.5, 0.01)]
    assert prop.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(objectives.propagation_factors(sigmas)[-1]) == pytest.approx(1.0)
    # the two agree on the last interval; the literal weights make the early ones ~50× lighter
    assert float(literal[-1]) == pytest.approx(float(prop[-1]))
    assert float(literal[0] / prop[0]) < 0.03


def test_bound_is_differentiable_and_needs_a_positive_end(gm):
    g = torch.Generator().manual_seed(2)
    x0 = gm.sample_data(32, g)
    noise = torch.randn(32, 4, generator=g)
    sigmas = baseline_sigmas("karras", 4, gm.schedule)[:-1].tolist() + [gm.schedule.sigma_min]
    sigmas = torch.tensor(sigmas, requires_grad=True)
    for weighting in ("literal", "propagated"):
        value = objectives.bound(gm, x0, noise, sigmas, weighting, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad(value, sigmas)
        assert float(value.detach()) > 0 and torch.isfinite(grad).all() and float(grad[1:-1].abs().sum()) > 0
    with pytest.raises(ValueError, match="positive final σ"):
        objectives.bound(gm, x0, noise, torch.tensor([80.0, 1.0, 0.0]))


def test_stationarity_of_a_linear_path_is_uniform_in_u():
    # τ(u) = a·u: τ(u_i) − τ(u_{i−1}) = (u_{i+1} − u_i)·τ'(u_i) ⇔ equal steps in u
    den = PathDenoiser(a=2.0, power=1)
    x0, noise = torch.zeros(8, 2), torch.randn(8, 2)
    u = torch.tensor([0.1, 0.6, 1.1, 1.6, 2.1], dtype=torch.float64)  # uniform: stationary
    residual = objectives.stationarity_residual(den, x0, noise, 1 / u, weighting="literal", strata=16)
    assert float(residual.max()) < 1e-4
    u_bad = torch.tensor([0.1, 0.3, 1.1, 1.9, 2.1], dtype=torch.float64)
    targets = objectives.stationarity_targets(den, x0, noise, 1 / u_bad, weighting="literal", strata=16)
    # the condition asks each step to equal the previous one
    assert targets.tolist() == pytest.approx((u_bad[1:-1] - u_bad[:-2]).tolist(), rel=1e-4)
