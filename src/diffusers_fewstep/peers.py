"""The peers every benchmark table holds.

1. diffusers' own schedulers, driven exactly as BENCHMARK.md's peer script drives them
   (`set_timesteps(nfe)`, `scale_model_input`, the UNet under bf16 autocast on CUDA, `step`).
2. Published schedule optimisers, **re-implemented by us from the papers** (no code copied), each paired with
   a solver from :mod:`solvers`:

   - **GITS** (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", arXiv
     2405.11326; settings of the authors' release, zju-pi/diff-sampler `gits-main`): 256 teacher trajectories
     on a 61-point polynomial (ρ = 7) grid from σ_max to σ_min; the cost of jumping from grid point i to j is
     one Euler step from the teacher's state at i, scored by the trajectory deviation ('dev': distance from
     the straight line through the trajectory's ends, minus the teacher's own at j; 'l2' also available);
     dynamic programming with coefficient 1.15 on each later jump picks the NFE-jump path from σ_max to
     σ_min. The sample is the state at σ_min: no final jump to 0. Paired with iPNDM (orders 1 → 4), as the
     paper. One departure: the teacher is the package's one reference solve (DPM-Solver++(2M), on GITS's
     grid) where the release's pixel-model setting uses iPNDM (it uses a DPM-Solver++ teacher for SD).
   - **AYS** (Sabour et al. 2024, arXiv 2404.14507): see :mod:`ays` for the released tables, the optimiser and
     its labelled departures (data-free x0, grid quadrature of the KLUB, an endpoint-error early-stopping proxy).
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, List, Sequence

import torch

from . import reference
from .ays import ays_sigmas
from .evaluation import generate, noise_bank, sample_shape
from .reference import autocast_context  # noqa: F401
from .schedules import STOCK_SCHEDULERS, diffusers_scheduler, karras_sigmas  # noqa: F401
from .solvers import first_order_step

# --- 1. diffusers schedulers ----------------------------------------------------------------------
# the registry (per model family) and `diffusers_scheduler` live with the stock σ sets in schedules.py
@torch.no_grad()
def sample_diffusers(unet, scheduler, noise: torch.Tensor, nfe: int, batch_size: int = 2500) -> torch.Tensor:
    """Sample an unconditional model with a diffusers scheduler at `nfe` steps from native noise, clamped to
    [-1, 1] (the loop of diffusers' pipelines, :func:`~diffusers_fewstep.reference.scheduler_loop`)."""
    model_output = lambda x, t: unet(x, t).sample  # noqa: E731
    return torch.cat([reference.scheduler_loop(model_output, scheduler, noise[start:start + batch_size], nfe, clamp=True)
                      for start in range(0, len(noise), batch_size)])


# --- 2. GITS: dynamic programming over a teacher's fine grid ------------------------------------------------
def dp_optimal_path(cost: torch.Tensor, num_steps: int, start: int = 0, end: int = -1, coeff: float = 1.0) -> List[int]:
    """Indices of the path start → end on a grid with exactly `num_steps` forward jumps (i < j) minimising
    `Σ_m coeff^m · cost[i_m, i_{m+1}]` (m = 0 for the first jump; GITS weights each later jump by 1.15).
    Entries with j ≤ i are ignored.

    Args:
        cost (`torch.Tensor`): (M, M) jump costs.
        num_steps (`int`): number of jumps (model evaluations).
        coeff (`float`, *optional*, defaults to 1.0): factor on the cost of the rest of the path at every jump.
    """
    m = cost.shape[0]
    end = end % m
    if not 1 <= num_steps <= end - start:
        raise ValueError(f"cannot go from grid point {start} to {end} in {num_steps} steps")
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    cost = torch.where(upper, cost.double().cpu(), torch.full((m, m), float("inf"), dtype=torch.float64))
    # value[i]: least weighted cost from i to end in k jumps; choices[k−2][i]: the next point from i
    value, choices = cost[:, end].clone(), []
    inner = cost.clone()
    inner[:, end] = float("inf")  # with jumps left, the next point is not the end yet
    for _ in range(num_steps - 1):
        value, choice = (inner + coeff * value[None, :]).min(1)
        choices.append(choice)
    path = [start]
    for choice in reversed(choices):
        path.append(int(choice[path[-1]]))
    return path + [end]


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


def trajectory_deviation(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """GITS's 'dev': per-sample distance of x from the straight line through a trajectory's start and end.
    `start`, `end`: (n, ...); `x`: (..., n, ...); returns (..., n)."""
    lead, n = x.shape[:x.ndim - start.ndim], start.shape[0]
    start, end = start.reshape(n, -1).double(), end.reshape(n, -1).double()
    offset = end - x.reshape(*lead, n, -1).double()
    direction = (end - start) / (end - start).norm(dim=1, keepdim=True)
    along = (offset * direction).sum(-1, keepdim=True)
    return (offset - along * direction).norm(dim=-1)


def gits_cost_matrix(states: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor,
                     metric: str = "dev") -> torch.Tensor:
    """GITS jump costs on the teacher's grid: cost[i, j] scores one Euler step from the teacher state at σ_i to
    σ_j (no extra model calls), averaged over samples. `metric='dev'`: its trajectory deviation minus the
    teacher's at σ_j (the authors' default); `'l2'`: the L2 distance to the teacher's state at σ_j."""
    if metric not in ("dev", "l2"):
        raise ValueError(f"unknown GITS metric {metric!r}; expected 'dev' or 'l2'")
    m = len(sigmas)
    sigmas = sigmas.to(states.device, torch.float32)
    teacher_dev = trajectory_deviation(states, states[0], states[-1]).mean(-1)
    cost = torch.full((m, m), float("inf"), dtype=torch.float64)
    for i in range(m - 1):
        targets = sigmas[i + 1:].reshape(-1, *([1] * (states.ndim - 1)))
        jumped = first_order_step(states[i][None], sigmas[i], targets, denoised[i][None])
        if metric == "dev":
            err = trajectory_deviation(jumped, states[0], states[-1]).mean(-1) - teacher_dev[i + 1:]
        else:
            err = (jumped - states[i + 1:]).flatten(2).norm(dim=2).mean(1)
        cost[i, i + 1:] = err.double().cpu()
    return cost


def gits_grid(schedule, points: int = 61, rho: float = 7.0) -> torch.Tensor:
    """The teacher's grid: `points` σ's from σ_max to σ_min (no 0), polynomial with ρ = 7 as the authors'
    pixel-model setting (EDM's schedule)."""
    return karras_sigmas(points, schedule.sigma_min, schedule.sigma_max, rho, final_zero=False)


def gits_sigmas(denoiser, nfes: Iterable[int], num_samples: int = 256, grid_steps: int = 60, seed: int = 0,
                device="cpu", batch_size: int = 2500, metric: str = "dev",
                coeff: float = 1.15) -> Dict[int, List[float]]:
    """GITS tables: {nfe: [σ_max, …, σ_min]} (sampled to σ_min; no final 0).

    Args:
        num_samples (`int`): warm-up trajectories (noise seed `seed`, independent of evaluation).
        grid_steps (`int`): teacher steps (61 grid points for 60).
        metric, coeff: the authors' defaults ('dev', 1.15).
    """
    sigmas = gits_grid(denoiser.schedule, grid_steps + 1).float().to(device)
    noise = noise_bank(num_samples, sample_shape(denoiser), seed=seed, device=device)
    states, denoised = teacher_trajectories(denoiser, noise, sigmas, batch_size)
    cost = gits_cost_matrix(states, denoised, sigmas, metric)
    table = sigmas.double().cpu()
    return {nfe: table[dp_optimal_path(cost, nfe, coeff=coeff)].tolist() for nfe in nfes}


# --- 3. the registry used by the benchmark ----------------------------------------------------------
# name -> (optimiser, solver, label)
OPTIMISER_PEERS = {
    "gits_ipndm": ("gits", "ipndm", "GITS + iPNDM (our re-impl.)"),
    "gits_euler": ("gits", "euler", "GITS + DDIM (our re-impl.)"),
    "ays_dpmpp_2m": ("ays", "dpmpp_2m", "AYS + DPM++2M (our re-impl.)"),
    "ays_euler": ("ays", "euler", "AYS + DDIM (our re-impl.)"),
}
OPTIMISERS = {"gits": gits_sigmas, "ays": ays_sigmas}


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
           "teacher_trajectories", "trajectory_deviation", "gits_cost_matrix", "gits_sigmas", "ays_sigmas",
           "learn_peer_tables", "generate"]
