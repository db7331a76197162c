"""A closed-form test model: the exact denoiser of a Gaussian mixture, in σ-space.

Data: ``x0 ~ Σ_k π_k N(μ_k, s_k² I)`` in a few dimensions. Its noised marginal at σ is the
mixture with variances ``s_k² + σ²``, so the ideal denoiser ``D(x; σ) = E[x0 | x]`` is

    D(x; σ) = Σ_k r_k(x; σ) · (μ_k + s_k² / (s_k² + σ²) · (x − μ_k)),

with posterior responsibilities ``r_k``. :class:`GaussianMixtureDenoiser` looks like a
:class:`~diffusers_fewstep.SigmaDenoiser` (``D(x, sigma, cond=None, uncond=None)``, a
``.schedule`` NoiseSchedule, ``.num_evals``, ``.sample_shape``); :func:`exact_solution` solves
its probability-flow ODE to high accuracy (classical RK4 in log σ, float64).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffusers_fewstep.adapter import NoiseSchedule

# the fixture's noise schedule: linear β, 1000 steps (σ_min ≈ 0.01, σ_max ≈ 157)
LINEAR_VP_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                    "beta_schedule": "linear", "prediction_type": "epsilon"}


class GaussianMixtureDenoiser(nn.Module):
    """Exact D(x; σ) of an isotropic Gaussian mixture.

    Args:
        means (`torch.Tensor` of shape `(K, d)`): component means μ_k.
        stds (`torch.Tensor` of shape `(K,)`): component standard deviations s_k.
        weights (`torch.Tensor` of shape `(K,)`): mixture weights π_k (normalised here).
        scheduler_config (`dict`, *optional*): noise schedule giving σ_min/σ_max and the
            baseline tables; defaults to the fixture's linear-β VP schedule.
    """

    def __init__(self, means, stds, weights, scheduler_config=None):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float64))
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("log_weights", (w / w.sum()).log())
        self.schedule = NoiseSchedule(scheduler_config or LINEAR_VP_CONFIG)
        self.sample_shape = (self.means.shape[1],)
        self.num_evals = 0

    def forward(self, x, sigma, cond=None, uncond=None):
        """D(x; σ); `sigma` is a scalar or one value per row of x. Computed in float64."""
        self.num_evals += 1
        dtype = x.dtype
        x = x.double()
        sigma = torch.as_tensor(sigma, device=x.device).double().reshape(-1, 1)  # (B or 1, 1)
        var = self.stds**2 + sigma**2  # (B, K)
        diff = x[:, None, :] - self.means  # (B, K, d)
        d = x.shape[1]
        logp = self.log_weights - 0.5 * d * var.log() - 0.5 * (diff**2).sum(-1) / var
        r = logp.softmax(-1)  # (B, K)
        shrink = (self.stds**2 / var)[..., None]  # (B, K, 1)
        d_k = self.means + shrink * diff
        return (r[..., None] * d_k).sum(1).to(dtype)

    def sample_data(self, n: int, generator=None) -> torch.Tensor:
        """n draws of x0 from the mixture."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()


def random_mixture(dim: int = 4, components: int = 4, seed: int = 0) -> GaussianMixtureDenoiser:
    """A fixed, well-separated mixture with data in about [-1, 1] and stds 0.05–0.3."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(components, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8
    stds = torch.linspace(0.05, 0.3, components, dtype=torch.float64)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixtureDenoiser(means, stds, weights)


@torch.no_grad()
def exact_solution(gm: GaussianMixtureDenoiser, x: torch.Tensor, sigma_start: float, steps: int = 2000,
                   sigma_stop: float = 1e-5) -> torch.Tensor:
    """x(σ = 0) of the probability-flow ODE from the state x at `sigma_start`.

    RK4 on ``dx/d log σ = x − D(x; σ)`` from log σ_start to log σ_stop, then one denoiser call
    (x(0) = D(x(σ); σ) + O(σ²)). Float64 throughout.
    """
    x = x.double()
    grid = torch.linspace(math.log(sigma_start), math.log(sigma_stop), steps + 1, dtype=torch.float64)

    def f(x, log_sigma):
        return x - gm(x, log_sigma.exp())

    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + 0.5 * h * k1, a + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, a + 0.5 * h)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return gm(x, torch.tensor(sigma_stop, dtype=torch.float64))
