"""Align Your Steps (Sabour et al. 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion
Models", arXiv 2404.14507), re-implemented from the paper (no code copied).

1. **Released tables** (`ays_released_sigmas`): the paper's optimised 10-step σ tables for Stable Diffusion
   1.5 and SDXL (as diffusers ships them in `AysSchedules`), resampled to other step counts by the authors'
   recipe: log-linear interpolation of the 11 σ's from σ_max to the model's σ_min, then the last σ → 0.
2. **The optimiser** (`ays_sigmas`) for models without released tables, as the paper's Sec. 3 and App. B.1:
   the KL-divergence upper bound (KLUB) of stochastic DDIM,
   `Σ_i ∫_{σ_{i+1}}^{σ_i} σ⁻³ E‖D(x_σ; σ) − D(x_{σ_i}; σ_i)‖² dσ` with `(x_σ, x_{σ_i})` drawn jointly from the
   forward process (`x_{σ_i} = x_σ + √(σ_i² − σ²)·z`); a 10-step start (time-uniform for discrete-time models,
   EDM's ρ = 7 for continuous ones); Algorithm 1 (each interior point in turn moves to the best of 11
   candidates around it, the current value among them, until nothing moves) with early stopping; two
   subdivisions at log-σ midpoints (10 → 20 → 40 steps) that optimise only the new points; every other step
   count by log-linear interpolation of the 40-step table; the final σ_min sampled as 0, as the release does.

Our departures, each forced by the setting or by cost:
- x0 are the model's own many-step samples (data-free, as our optimiser), unless data are passed.
- The KLUB integrals are computed by quadrature on a fine log-σ grid along forward-process paths (one model
  call per grid point and path), not by importance-sampled Monte Carlo per candidate; candidates are grid
  points, the 11 nearest the current one. Same objective, common random numbers across candidates.
- Early stopping: the paper names perceptual metrics or inspection as proxies; we stop when the endpoint
  RMSE of a 10-step DDIM solve against the reference samples stops improving, and keep the best sweep.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .evaluation import endpoint_rmse, generate, noise_bank, reference_samples, sample_shape
from .reference import autocast_context
from .schedules import interpolate_sigmas, karras_sigmas, loguniform_sigmas

BASE_STEPS, SUBDIVISIONS, CANDIDATES = 10, 2, 11  # the paper's 10 → 20 → 40 steps, 11 candidates per point
RELEASED = {"StableDiffusion": "StableDiffusionSigmas", "StableDiffusionXL": "StableDiffusionXLSigmas"}


# --- 1. the released tables ---------------------------------------------------------------------------
def ays_released_sigmas(model: str, nfes: Iterable[int], schedule) -> Dict[int, List[float]]:
    """The released AYS tables of `model` ('StableDiffusion' or 'StableDiffusionXL') for each NFE.

    The 10-step table (diffusers' `AysSchedules`, which ends in 0) regains its last σ, the model's σ_min,
    is interpolated log-linearly to NFE + 1 σ's, and the last σ is set to 0.
    """
    from diffusers.schedulers import AysSchedules

    if model not in RELEASED:
        raise ValueError(f"no released AYS table for {model!r}; released: {list(RELEASED)}; "
                         "learn one with ays_sigmas(denoiser, nfes)")
    table = AysSchedules[RELEASED[model]]
    if schedule.family != "vp" or abs(schedule.sigma_max / table[0] - 1) > 1e-3:
        raise ValueError(f"AYS's {model} table is for SD-family scaled_linear β (σ_max = {table[0]}); this model has "
                         f"σ_max = {schedule.sigma_max:.4g}; learn a table with ays_sigmas(denoiser, nfes)")
    positive = table[:-1] + [schedule.sigma_min]
    return {nfe: _sample_final_zero(interpolate_sigmas(positive, nfe)) for nfe in nfes}


def _sample_final_zero(table: torch.Tensor) -> List[float]:
    """An AYS table ends at σ_min; it is sampled with that last σ set to 0."""
    return table.tolist()[:-1] + [0.0]


# --- 2. the KLUB along forward-process paths ---------------------------------------------------------------
@torch.no_grad()
def forward_path_denoised(denoiser, x0: torch.Tensor, grid: torch.Tensor, seed: int = 0,
                          batch_size: int = 2500) -> torch.Tensor:
    """D(x_k; σ_k) at every σ_k of a decreasing grid along one forward-process path per x0:
    x at the last (smallest) σ is x0 + σ·z, and each larger σ_k adds fresh noise of variance σ_k² − σ_{k+1}²,
    so any two points of a path have the forward process's joint law. Returns (len(grid), n, ...)."""
    g = torch.Generator(device=x0.device).manual_seed(seed)
    sigmas = grid.to(x0.device, torch.float64)
    scales = torch.cat([(sigmas[:-1] ** 2 - sigmas[1:] ** 2).sqrt(), sigmas[-1:]]).float()  # noise added at σ_k
    x, out = x0.float().clone(), [None] * len(grid)
    for k in reversed(range(len(grid))):  # from σ_min upwards
        x = x + scales[k] * torch.randn(x.shape, generator=g, device=x.device)
        with autocast_context(x.device):
            out[k] = torch.cat([denoiser(x[j:j + batch_size], grid[k]).float() for j in range(0, len(x), batch_size)])
    return torch.stack(out)


def ays_cost_matrix(denoised: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """KLUB of one step per pair of grid points (σ decreasing) from D at every σ_k along the same
    forward-process paths (:func:`forward_path_denoised`); see :func:`klub_cost`."""
    flat = denoised.flatten(1).double()
    sq = flat.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp(min=0) / denoised.shape[1]
    return klub_cost(dist.cpu(), sigmas)


def klub_cost(dist: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """cost[i, j] ≈ ∫_{σ_j}^{σ_i} σ⁻³ E‖D(σ) − D(σ_i)‖² dσ for i < j (inf elsewhere) by the trapezoidal rule
    on the grid, from `dist[i, k]` = E‖D_k − D_i‖² (summed over pixels)."""
    s = sigmas.double().cpu()
    weights = (s[1:].pow(-2) - s[:-1].pow(-2)) / 2  # ∫_{σ_{k+1}}^{σ_k} σ⁻³ dσ
    dist = dist.double()
    pieces = weights[None, :] * (dist[:, :-1] + dist[:, 1:]) / 2  # piece [i, k]: sub-interval k→k+1
    cumulative = torch.cat([torch.zeros(len(s), 1, dtype=torch.float64), pieces.cumsum(1)], 1)
    cost = cumulative - torch.diagonal(cumulative)[:, None]  # cost[i, j] = Σ_{k=i}^{j−1} piece[i, k]
    return torch.where(torch.triu(torch.ones_like(cost, dtype=torch.bool), 1), cost, torch.full_like(cost, float("inf")))


# --- 3. the paper's optimisation on grid indices ---------------------------------------------------------------
def klub_sweep(cost: torch.Tensor, table: Sequence[int], movable: Iterable[int], gap: int = 1):
    """One pass of AYS's Algorithm 1: each movable point in turn takes the best of the 11 grid points nearest it
    (itself included, ties keep it) for KLUB(previous, point) + KLUB(point, next), staying `gap` grid points
    away from its neighbours. `table` holds increasing grid indices. Returns (new table, whether any moved)."""
    table, moved = list(table), False
    half = CANDIDATES // 2
    for i in movable:
        prev, nxt = table[i - 1], table[i + 1]
        low, high = max(prev + gap, table[i] - half), min(nxt - gap, table[i] + half)
        candidates = [table[i]] + [c for c in range(low, high + 1) if c != table[i]]
        best = min(candidates, key=lambda c: float(cost[prev, c] + cost[c, nxt]))
        moved |= best != table[i]
        table[i] = best
    return table, moved


def klub_search(cost: torch.Tensor, table: Sequence[int], movable: Sequence[int], gap: int = 1,
                max_sweeps: int = 100, proxy: Optional[Callable] = None, patience: int = 2) -> List[int]:
    """Sweeps of :func:`klub_sweep` until nothing moves. With `proxy` (table → error), early stopping: stop after
    `patience` sweeps without a better proxy value and return the best table seen."""
    table = list(table)
    best, best_score, worse = table, proxy(table) if proxy else None, 0
    for _ in range(max_sweeps):
        table, moved = klub_sweep(cost, table, movable, gap)
        if not moved:
            break
        if proxy is None:
            best = table
            continue
        score = proxy(table)
        if score < best_score:
            best, best_score, worse = table, score, 0
        else:
            worse += 1
            if worse >= patience:
                break
    return best


def subdivide(table: Sequence[int]) -> List[int]:
    """Twice the steps: the log-σ midpoint between neighbours (on a log-uniform grid, the middle index)."""
    out = [table[0]]
    for a, b in zip(table, table[1:]):
        out += [(a + b) // 2, b]
    return out


def ays_hierarchy(cost: torch.Tensor, start: Sequence[int], proxy: Optional[Callable] = None, patience: int = 2,
                  subdivisions: int = SUBDIVISIONS) -> List[int]:
    """The paper's hierarchical schedule: all interior points of the start table with early stopping, then
    `subdivisions` rounds of subdivision optimising only the new points. Grid indices in, grid indices out."""
    gap = 2 ** subdivisions  # room for the midpoints to come
    if min(b - a for a, b in zip(start, start[1:])) < gap:
        raise ValueError(f"the start table has neighbours closer than {gap} grid points; use a finer grid (grid_size)")
    table = klub_search(cost, start, range(1, len(start) - 1), gap, proxy=proxy, patience=patience)
    for _ in range(subdivisions):
        table = subdivide(table)
        gap //= 2
        table = klub_search(cost, table, range(1, len(table) - 1, 2), gap)
    return table


def snap_to_grid(sigmas: Sequence[float], grid: torch.Tensor) -> List[int]:
    """Indices of the grid points nearest (in log σ) to each σ."""
    log_grid = grid.double().log()
    return [int((log_grid - torch.tensor(float(s)).double().log()).abs().argmin()) for s in sigmas]


# --- 4. the whole procedure on a model -------------------------------------------------------------------------------
def ays_start(schedule, init: str = "time_uniform", steps: int = BASE_STEPS) -> torch.Tensor:
    """The paper's hand-made start, σ_max … σ_min: time-uniform for discrete-time models, EDM (ρ = 7) otherwise."""
    if init == "time_uniform":  # uniform in the model's continuous timestep, t(σ_max) → t(σ_min)
        ends = schedule.sigma_to_t(torch.tensor([schedule.sigma_max, schedule.sigma_min], dtype=torch.float64))
        return schedule.t_to_sigma(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64))
    if init == "karras":
        return karras_sigmas(steps + 1, schedule.sigma_min, schedule.sigma_max, final_zero=False)
    raise ValueError(f"unknown AYS start {init!r}; expected 'time_uniform' (discrete-time) or 'karras' (EDM)")


@torch.no_grad()
def ays_sigmas(denoiser, nfes: Iterable[int], num_samples: int = 256, grid_size: int = 200, seed: int = 0,
               device="cpu", x0: torch.Tensor = None, batch_size: int = 2500, init: str = "time_uniform",
               proxy_samples: int = 64, patience: int = 2) -> Dict[int, List[float]]:
    """AYS tables for a model without released ones (see the module docstring): {nfe: [σ_max, …, σ, 0]}.

    Args:
        num_samples (`int`): forward-process paths (and noises of the model's own samples when `x0` is None).
        grid_size (`int`): log-uniform σ grid from σ_max to σ_min on which the KLUB is integrated.
        x0 (`torch.Tensor`, *optional*): clean samples; by default the model's 200-step samples from
            `num_samples` noises drawn with `seed`.
        proxy_samples (`int`): reference samples of the early-stopping proxy (0 turns early stopping off).
    """
    schedule, shape = denoiser.schedule, sample_shape(denoiser)
    noise = noise_bank(num_samples if x0 is None else proxy_samples, shape, seed=seed, device=device)
    reference = reference_samples(denoiser, noise, batch_size=batch_size) if (x0 is None or proxy_samples) else None
    x0 = reference if x0 is None else x0.to(device)
    grid = loguniform_sigmas(grid_size, schedule.sigma_min, schedule.sigma_max, final_zero=False).float().to(device)
    cost = ays_cost_matrix(forward_path_denoised(denoiser, x0, grid, seed + 1, batch_size), grid)
    grid = grid.double().cpu()
    proxy = None
    if proxy_samples:
        def proxy(table):
            tables = _sample_final_zero(grid[table])
            return endpoint_rmse(generate(denoiser, noise[:proxy_samples], tables, "euler", batch_size),
                                 reference[:proxy_samples])
    table = ays_hierarchy(cost, snap_to_grid(ays_start(schedule, init), grid), proxy, patience)
    return {nfe: _sample_final_zero(interpolate_sigmas(grid[table], nfe)) for nfe in nfes}

