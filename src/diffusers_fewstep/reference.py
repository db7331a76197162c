"""The one many-step reference solve: the "truth" every few-step sampler is compared with.

Phase 1 (training and held-out references), Phase 2 (the teacher's states), evaluation, the
benchmark and the peers (GITS) all call :func:`solve`. One convention for everybody:

- native noise ε enters at the first σ of the grid as the σ-space state ``x = ε / a(σ_0)``
  (:func:`start_state`; `a` is the native scale of :class:`~diffusers_fewstep.adapter.NoiseSchedule`);
- the grid is `steps` time-uniform ("trailing") σ's ending in 0, DPM-Solver++(2M) solves it, and the
  model runs under bf16 autocast on CUDA (as the benchmark's peers do);
- a few-step table the solve must pass through (`through`) is merged into the grid, which then starts
  at the table's σ_0 and ends where the table ends.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedules import time_uniform_sigmas
from .solvers import sample

REFERENCE_STEPS = 200
REFERENCE_SOLVER = "dpmpp_2m"


def start_state(noise: torch.Tensor, schedule, sigma_0) -> torch.Tensor:
    """σ-space state at σ_0 for native noise ε: ``x = ε / a(σ_0)`` (the one noise-to-σ convention)."""
    scale = schedule.native_scale(torch.as_tensor(sigma_0, dtype=torch.float64))
    return noise / scale.to(device=noise.device, dtype=noise.dtype)


def reference_sigmas(schedule, steps: int = REFERENCE_STEPS, through=None) -> torch.Tensor:
    """The reference grid (float64): `steps` time-uniform ("trailing") σ's, then 0.

    With `through` (a table ``[σ_0, …, σ_N]``), the grid starts at the table's σ_0, contains each of its
    σ's exactly (grid points within 1e-4 relative of one are dropped) and ends where the table ends
    (in 0, or at its last positive σ).
    """
    fine = time_uniform_sigmas(steps, schedule, "trailing", final_zero=False)
    if through is None:
        return torch.cat([fine, fine.new_zeros(1)])
    table = torch.as_tensor(through, dtype=torch.float64).cpu()
    positive = table[table > 0]
    fine = fine[fine < positive[0] * (1 - 1e-4)]
    close = ((fine[:, None] - positive[None, :]).abs() <= 1e-4 * positive[None, :]).any(1)
    grid = torch.cat([fine[~close], positive]).sort(descending=True).values
    if table[-1] == 0:  # the last interval runs down the fine grid to σ_min, then to 0
        return torch.cat([grid, grid.new_zeros(1)])
    return grid[grid >= positive[-1] * (1 - 1e-9)]


def table_positions(grid: torch.Tensor, table) -> list:
    """Index in `grid` of every entry of `table` (both from :func:`reference_sigmas`)."""
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    return [int((grid - float(s)).abs().argmin()) for s in torch.as_tensor(table, dtype=torch.float64)]


def autocast_context(device, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast on CUDA (as the peer script runs the model), a no-op elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")


@torch.no_grad()
def solve(denoiser, noise: torch.Tensor, steps: int = REFERENCE_STEPS, through=None, grid: Optional[torch.Tensor] = None,
          extra_args: Optional[dict] = None, callback: Optional[Callable] = None) -> torch.Tensor:
    """The reference solution of the probability-flow ODE from native noise (one batch).

    Args:
        denoiser: `D(x, sigma, **extra_args)` in σ-space with a `.schedule` (a `SigmaDenoiser`).
        noise (`torch.Tensor`): native initial noise ε.
        steps (`int`, *optional*, defaults to 200): steps of the time-uniform grid.
        through (*optional*): a few-step table the solve must pass through (see :func:`reference_sigmas`).
        grid (`torch.Tensor`, *optional*): an explicit decreasing σ grid instead (e.g. GITS's fine grid).
        extra_args (`dict`, *optional*): conditioning keyword arguments of the denoiser.
        callback (*optional*): called after every step as in :func:`~diffusers_fewstep.solvers.sample`
            (`{"x", "i", "sigma", "denoised"}`; `x` is the state at grid point i + 1).

    Returns:
        `torch.Tensor` (float32): the σ-space state at the grid's last σ (the native sample when it is 0).
    """
    if grid is None:
        grid = reference_sigmas(denoiser.schedule, steps, through)
    grid = torch.as_tensor(grid).to(device=noise.device, dtype=torch.float32)
    x = start_state(noise.float(), denoiser.schedule, grid[0])
    with autocast_context(noise.device):
        x = sample(denoiser, x, grid, REFERENCE_SOLVER, extra_args=extra_args, callback=callback)
    return x.float()


@torch.no_grad()
def trajectory(denoiser, noise: torch.Tensor, table, steps: int = REFERENCE_STEPS,
               extra_args: Optional[dict] = None) -> torch.Tensor:
    """The reference trajectory at every σ of `table`: shape `(N + 1, B, …)`, σ-space; entry 0 is the start
    `ε / a(σ_0)` and, for a table ending in 0, entry N is the reference sample (Phase 2's teacher states)."""
    grid = reference_sigmas(denoiser.schedule, steps, through=table)
    keep = set(table_positions(grid, table)[1:])
    states = [start_state(noise.float(), denoiser.schedule, grid[0])]

    def record(info):
        if info["i"] + 1 in keep:
            states.append(info["x"].float())

    solve(denoiser, noise, grid=grid, extra_args=extra_args, callback=record)
    return torch.stack(states)
