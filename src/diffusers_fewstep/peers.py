"""The peers every benchmark table holds.

1. diffusers' own schedulers, driven exactly as BENCHMARK.md's peer script drives them
   (`set_timesteps(nfe)`, `scale_model_input`, the UNet under bf16 autocast on CUDA, `step`).
2. Published schedule optimisers, **re-implemented by us from the papers' descriptions** (no code
   copied), each paired with a solver from :mod:`solvers`:

   - **GITS** (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling",
     arXiv 2405.11326): a few teacher trajectories on a fine time grid give the cost of jumping
     from grid point i to j in one first-order step (distance to the teacher's state at j); dynamic
     programming picks the K-step path of least total cost. The paper pairs it with iPNDM.
   - **AYS** (Sabour et al. 2024, "Align Your Steps", arXiv 2404.14507): minimise the KL-divergence
     upper bound (KLUB) between the generative SDE and its discretisation with the denoiser held at
     the start of each interval, `Σ_i ∫_{σ_{i+1}}^{σ_i} σ⁻³ E‖D(x0 + σε; σ) − D(x0 + σ_i ε; σ_i)‖² dσ`,
     estimated along forward-process paths. Our deviations: x0 are the model's own many-step samples
     (data-free, like our optimiser), and, because the estimate is a sum of per-interval terms, we
     minimise it exactly on a fine log-σ grid with the same dynamic programme instead of the paper's
     iterative coordinate search. As in the paper the table runs from σ_max to σ_min, then 0.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, List, Sequence

import torch

from . import reference
from .evaluation import generate, noise_bank
from .reference import autocast_context
from .schedules import STOCK_SCHEDULERS, diffusers_scheduler, loguniform_sigmas, time_uniform_sigmas  # noqa: F401
from .solvers import first_order_step

# --- 1. diffusers schedulers ----------------------------------------------------------------------
# the registry (per model family) and `diffusers_scheduler` live with the stock σ sets in schedules.py
@torch.no_grad()
def sample_diffusers(unet, scheduler, noise: torch.Tensor, nfe: int, batch_size: int = 2500) -> torch.Tensor:
    """Sample with a diffusers scheduler at `nfe` steps from native noise, clamped to [-1, 1]."""
    out = []
    for start in range(0, len(noise), batch_size):
        scheduler.set_timesteps(nfe, device=noise.device)
        x = noise[start:start + batch_size] * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            with autocast_context(noise.device):
                eps = unet(x_in, t).sample
            x = scheduler.step(eps.float(), t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


# --- 2. dynamic programming over a fine grid --------------------------------------------------------
def dp_optimal_path(cost: torch.Tensor, num_steps: int, start: int = 0, end: int = -1) -> List[int]:
    """Indices of the path start → end on a grid with exactly `num_steps` forward jumps (i < j)
    minimising the summed `cost[i, j]` (entries with j ≤ i are ignored).

    Args:
        cost (`torch.Tensor`): (M, M) jump costs.
        num_steps (`int`): number of jumps (model evaluations).
    """
    m = cost.shape[0]
    end = end % m
    if not 1 <= num_steps <= end - start:
        raise ValueError(f"cannot go from grid point {start} to {end} in {num_steps} steps")
    cost = cost.double().cpu()
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    cost = torch.where(upper, cost, torch.full_like(cost, float("inf")))
    # best[k][j]: least cost of reaching j from start in k jumps; parent[k][j]: the previous point
    best = torch.full((m,), float("inf"), dtype=torch.float64)
    best[start] = 0.0
    parents = []
    for _ in range(num_steps):
        total = best[:, None] + cost  # total[i, j] = best[i] + cost[i, j]
        best, parent = total.min(0)
        parents.append(parent)
    path = [end]
    for parent in reversed(parents):
        path.append(int(parent[path[-1]]))
    return path[::-1]


@torch.no_grad()
def teacher_trajectories(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, batch_size: int = 2500):
    """States x_k (σ-space) at every grid σ_k and denoised D_k = D(x_k; σ_k) along the reference solve
    (:func:`diffusers_fewstep.reference.solve`) on the grid `sigmas`.

    Returns `(states, denoised)` of shapes (M+1, n, ...) and (M, n, ...) for a grid of M steps.
    """
    states, denoised = [], []
    for start in range(0, len(noise), batch_size):
        xs, ds = [], []

        def record(info):
            ds.append(info["denoised"].float())
            xs.append(info["x"].float())

        chunk = noise[start:start + batch_size]
        reference.solve(denoiser, chunk, grid=sigmas, callback=record)
        states.append(torch.stack([reference.start_state(chunk.float(), denoiser.schedule, sigmas[0])] + xs))
        denoised.append(torch.stack(ds))
    return torch.cat(states, 1), torch.cat(denoised, 1)


def gits_cost_matrix(states: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor,
                     scale=None) -> torch.Tensor:
    """GITS jump costs: cost[i, j] = mean over samples of the RMS distance between the teacher state at
    σ_j and one first-order step from the teacher state at σ_i to σ_j (no extra model calls).

    `scale` (a function of σ) multiplies the distance at σ_j; GITS measures it in σ-space (`None`).
    """
    m = len(sigmas)
    sigmas = sigmas.to(states.device, torch.float32)
    cost = torch.full((m, m), float("inf"), dtype=torch.float64)
    for i in range(m - 1):
        targets = sigmas[i + 1:].reshape(-1, *([1] * (states.ndim - 1)))
        jumped = first_order_step(states[i][None], sigmas[i], targets, denoised[i][None])
        err = (jumped - states[i + 1:]).pow(2).flatten(2).mean(2).sqrt().mean(1)
        if scale is not None:
            err = err * scale(sigmas[i + 1:])
        cost[i, i + 1:] = err.double().cpu()
    return cost


def ays_cost_matrix(denoised: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """AYS KLUB per interval on a grid of positive σ's (decreasing): cost[i, j] ≈
    ∫_{σ_j}^{σ_i} σ⁻³ E‖D(σ) − D(σ_i)‖² dσ by the trapezoidal rule on the grid, where `denoised[k]`
    holds D(x0 + σ_k ε; σ_k) for a fixed set of (x0, ε)."""
    flat = denoised.flatten(1).double()
    n = denoised.shape[1]
    sq = flat.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp(min=0) / n  # E‖D_k − D_i‖² (summed over pixels)
    s = sigmas.double().cpu()
    weights = (s[1:].pow(-2) - s[:-1].pow(-2)) / 2  # ∫_{σ_{k+1}}^{σ_k} σ⁻³ dσ
    dist = dist.cpu()
    pieces = weights[None, :] * (dist[:, :-1] + dist[:, 1:]) / 2  # piece [i, k]: sub-interval k→k+1
    cumulative = torch.cat([torch.zeros(len(s), 1, dtype=torch.float64), pieces.cumsum(1)], 1)
    cost = cumulative - torch.diagonal(cumulative)[:, None]  # cost[i, j] = Σ_{k=i}^{j−1} piece[i, k]
    return torch.where(torch.triu(torch.ones_like(cost, dtype=torch.bool), 1), cost, torch.full_like(cost, float("inf")))


def gits_sigmas(denoiser, nfes: Iterable[int], num_samples: int = 256, grid_steps: int = 100, seed: int = 0,
                device="cpu", batch_size: int = 2500, native_scale_costs: bool = False) -> Dict[int, List[float]]:
    """GITS tables (our re-implementation): teacher DPM-Solver++(2M) trajectories on a `grid_steps`
    time-uniform grid (plus σ = 0) from `num_samples` noises (seed `seed`, independent of evaluation),
    first-order jump costs, and the least-cost path with `nfe` steps for every NFE.

    `native_scale_costs=True` is our variant, not the paper's: distances measured in the model's native
    scale (σ-space distance at σ_j times a(σ_j)), so that large-σ states do not dominate the cost.
    """
    sigmas = time_uniform_sigmas(grid_steps, denoiser.schedule, "trailing").float().to(device)
    noise = noise_bank(num_samples, _sample_shape(denoiser), seed=seed, device=device)
    states, denoised = teacher_trajectories(denoiser, noise, sigmas, batch_size=batch_size)
    cost = gits_cost_matrix(states, denoised, sigmas, denoiser.schedule.native_scale if native_scale_costs else None)
    grid = sigmas.double().cpu()
    return {nfe: grid[dp_optimal_path(cost, nfe)].tolist() for nfe in nfes}


def gits_native_sigmas(denoiser, nfes: Iterable[int], **kwargs) -> Dict[int, List[float]]:
    """Our GITS variant with native-scale costs (see :func:`gits_sigmas`)."""
    return gits_sigmas(denoiser, nfes, native_scale_costs=True, **kwargs)


@torch.no_grad()
def ays_sigmas(denoiser, nfes: Iterable[int], num_samples: int = 256, grid_size: int = 200, seed: int = 0,
               device="cpu", x0: torch.Tensor = None, batch_size: int = 2500) -> Dict[int, List[float]]:
    """AYS tables (our re-implementation, see the module docstring): σ_max → … → σ_min on a log-uniform
    grid of `grid_size` points by exact minimisation of the KLUB estimate, then a final 0.

    Args:
        x0 (`torch.Tensor`, *optional*): clean samples; by default the model's own 200-step samples from
            `num_samples` noises drawn with `seed`.
    """
    from .evaluation import reference_samples

    schedule = denoiser.schedule
    shape = _sample_shape(denoiser)
    if x0 is None:
        x0 = reference_samples(denoiser, noise_bank(num_samples, shape, seed=seed, device=device), batch_size=batch_size)
    eps = noise_bank(len(x0), shape, seed=seed + 1, device=device)
    grid = loguniform_sigmas(grid_size, schedule.sigma_min, schedule.sigma_max, final_zero=False).float().to(device)
    denoised = []
    for sigma in grid:
        with autocast_context(device):
            denoised.append(torch.cat([denoiser(x0[j:j + batch_size] + sigma * eps[j:j + batch_size], sigma).float()
                                       for j in range(0, len(x0), batch_size)]))
    cost = ays_cost_matrix(torch.stack(denoised), grid)
    grid = grid.double().cpu()
    return {nfe: grid[dp_optimal_path(cost, nfe - 1)].tolist() + [0.0] for nfe in nfes}


def _sample_shape(denoiser) -> Sequence[int]:
    config = getattr(denoiser.model, "config", None)
    size = getattr(config, "sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (getattr(config, "in_channels", 1), *size)


# --- 3. the registry used by the benchmark ----------------------------------------------------------
# name -> (optimiser, solver, label)
OPTIMISER_PEERS = {
    "gits_ipndm": ("gits", "ipndm", "GITS + iPNDM (our re-impl.)"),
    "gits_euler": ("gits", "euler", "GITS + DDIM (our re-impl.)"),
    "ays_dpmpp_2m": ("ays", "dpmpp_2m", "AYS + DPM++2M (our re-impl.)"),
    "ays_euler": ("ays", "euler", "AYS + DDIM (our re-impl.)"),
    "gits_native_ipndm": ("gits_native", "ipndm", "GITS, native-scale costs (our variant) + iPNDM"),
}
OPTIMISERS = {"gits": gits_sigmas, "ays": ays_sigmas, "gits_native": gits_native_sigmas}


def learn_peer_tables(denoiser, nfes: Sequence[int], device="cpu", seed: int = 0, num_samples: int = 256,
                      batch_size: int = 2500, optimisers: Sequence[str] = ("gits", "ays")):
    """Tables and learning seconds of the published optimisers: `{name: (tables, seconds)}`."""
    out = {}
    for name in optimisers:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tables = OPTIMISERS[name](denoiser, nfes, num_samples=num_samples, seed=seed, device=device,
                                  batch_size=batch_size)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        out[name] = (tables, time.perf_counter() - start)
    return out


__all__ = ["STOCK_SCHEDULERS", "OPTIMISER_PEERS", "diffusers_scheduler", "sample_diffusers", "dp_optimal_path",
           "teacher_trajectories", "gits_cost_matrix", "ays_cost_matrix", "gits_sigmas", "ays_sigmas",
           "learn_peer_tables", "generate"]
