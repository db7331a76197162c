"""Solver steps on a closed-form problem: Gaussian data N(0, s²I), where D(x; σ) = x·s²/(s²+σ²) and the
exact probability-flow ODE solution is x(σ) = x_T·√((s²+σ²)/(s²+σ_T²))."""
import math

import pytest
import torch

from diffusers_fewstep import karras_sigmas, loguniform_sigmas, sample
from diffusers_fewstep.solvers import SOLVERS, canonical_solver, first_order_step, step

S_DATA = 0.5


def gaussian_denoiser(x, sigma):
    return x * S_DATA**2 / (S_DATA**2 + sigma**2)


def endpoint_error(solver, n, sigma_end=0.02):
    sigmas = loguniform_sigmas(n, sigma_end, 80.0, final_zero=False)
    x_t = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    out = sample(gaussian_denoiser, x_t, sigmas, solver)
    exact = x_t * math.sqrt((S_DATA**2 + sigma_end**2) / (S_DATA**2 + 80.0**2))
    return float((out - exact).pow(2).mean().sqrt())


@pytest.mark.parametrize("solver,min_ratio", [("euler", 1.6), ("dpmpp_2m", 3.0), ("unipc", 3.0), ("ipndm", 3.0)])
def test_convergence_order(solver, min_ratio):
    """Doubling the steps divides the error by ≈2 (first order) or ≥3 (the multistep solvers)."""
    e1, e2 = endpoint_error(solver, 20), endpoint_error(solver, 40)
    assert e2 < e1 / min_ratio
    if solver == "euler":
        assert e2 > e1 / 2.5  # and it is first order, not better


def test_multistep_solvers_beat_first_order_at_equal_steps():
    errors = {s: endpoint_error(s, 8) for s in SOLVERS}
    for s in ("dpmpp_2m", "unipc", "ipndm"):
        assert errors[s] < 0.5 * errors["euler"], errors


def test_final_step_to_zero_returns_the_denoised_estimate():
    sigmas = karras_sigmas(4, 0.02, 80.0)
    x_t = torch.randn(8, 3, dtype=torch.float64) * 80
    seen = []
    out = sample(gaussian_denoiser, x_t, sigmas, "dpmpp_2m", callback=lambda info: seen.append(info["denoised"]))
    assert torch.allclose(out, seen[-1])


@pytest.mark.parametrize("solver", SOLVERS)
def test_steps_are_differentiable_in_the_sigmas(solver):
    sigmas = loguniform_sigmas(5, 0.02, 80.0).requires_grad_(True)
    x_t = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    loss = sample(gaussian_denoiser, x_t, sigmas, solver).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, sigmas)
    assert torch.isfinite(grad).all() and grad[1:-1].abs().sum() > 0


def test_solver_names():
    assert canonical_solver("ddim") == "euler" and canonical_solver("unipc_bh2") == "unipc"
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        canonical_solver("rk45")


def run_from(solver, x, sigmas, begin):
    """Solve from sigmas[begin] to the end with a fresh state, as a scheduler does after `set_begin_index(begin)`."""
    state = None
    for i in range(begin, len(sigmas) - 1):
        x, state = step(solver, x, gaussian_denoiser(x, sigmas[i]), sigmas, i, state)
    return x


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("begin", [1, 2, 4])
def test_run_begun_mid_table_is_the_run_over_the_tables_tail(solver, begin):
    """Image-to-image starts part-way down the table: the order follows the history, not the index, so the run
    is bit-identical to a fresh run over sigmas[begin:] (diffusers' `lower_order_nums` warm-up)."""
    sigmas = karras_sigmas(6, 0.02, 80.0)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * sigmas[begin]
    assert torch.equal(run_from(solver, x, sigmas, begin), run_from(solver, x, sigmas[begin:], 0))


@pytest.mark.parametrize("solver", SOLVERS)
def test_first_step_of_any_run_is_the_first_order_step(solver):
    sigmas = karras_sigmas(6, 0.02, 80.0)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigmas[2]
    denoised = gaussian_denoiser(x, sigmas[2])
    x_next, _ = step(solver, x, denoised, sigmas, 2, None)
    torch.testing.assert_close(x_next, first_order_step(x, sigmas[2], sigmas[3], denoised), rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_a_solve_reads_a_sigma_back_only_at_its_last_step(solver, monkeypatch):
    """Reading a σ back from the device waits for its queued work: the multistep solvers ask whether a step ends at
    σ = 0 only at the last step of a table (only the last entry can be 0), once per solve, and sample the same."""
    from diffusers_fewstep import solvers

    table = torch.tensor([80.0, 20.0, 6.0, 2.0, 0.6, 0.2, 0.0])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 80
    denoiser = lambda x, sigma: x / (1 + torch.as_tensor(sigma) ** 2)  # noqa: E731  (Gaussian data, s = 1)
    expected = solvers.sample(denoiser, x, table, solver)
    reads = []
    original = solvers._is_zero
    monkeypatch.setattr(solvers, "_is_zero", lambda sigma: reads.append(float(sigma)) or original(sigma))
    assert torch.equal(solvers.sample(denoiser, x, table, solver), expected)
    assert reads == [0.0]
    reads.clear()
    solvers.sample(denoiser, x, table[:-1], solver)  # a table ending at a positive σ
    assert reads == [pytest.approx(0.2)]
