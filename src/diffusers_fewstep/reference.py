"""The one many-step reference solve: the "truth" every few-step sampler is compared with.

Phase 1 (training and held-out references), Phase 2 (the teacher's states), evaluation, the
benchmark and the peers (GITS) all call :func:`solve`. One convention for everybody:

- native noise ε enters at the first σ of the grid as the σ-space state ``x = ε / a(σ_0)``
  (:func:`start_state`; `a` is the native scale of :class:`~diffusers_fewstep.adapter.NoiseSchedule`);
- the grid is `steps` time-uniform ("trailing") σ's ending in 0, DPM-Solver++(2M) solves it, and the
  model runs under bf16 autocast on CUDA (as the benchmark's peers do);
- a few-step table the solve must pass through (`through`) is merged into the grid, which then starts
  at the table's σ_0 and ends where the table ends.

Phase 1 can fit its tables to another truth instead (:class:`Reference`, `reference_scheduler="pipeline"`): the
image the pipeline itself makes by default, i.e. the model's own diffusers scheduler driven by the pipelines' loop
(:func:`scheduler_loop`, which also samples the benchmark's diffusers peers) from the same native noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch

from .schedules import time_uniform_sigmas
from .solvers import sample

REFERENCE_STEPS = 200
REFERENCE_SOLVER = "dpmpp_2m"
PIPELINE_STEPS = 50  # diffusers pipelines' default num_inference_steps
REFERENCE_SCHEDULERS = ("ode", "pipeline")
# schedulers that draw fresh noise at every step: a noise has no single solution under them
STOCHASTIC_SCHEDULERS = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


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


# --- the pipeline's own scheduler ------------------------------------------------------------------
@torch.no_grad()
def scheduler_loop(model_output: Callable, scheduler, noise: torch.Tensor, steps: int, clamp: bool = False,
                   **set_timesteps_kwargs) -> torch.Tensor:
    """Sample from native noise with a diffusers scheduler, driven as diffusers' pipelines drive it:
    `set_timesteps(steps)`, `init_noise_sigma`, `scale_model_input`, the model (bf16 autocast on CUDA),
    `step(...).prev_sample` (flow-matching schedulers have neither `init_noise_sigma` nor `scale_model_input`).

    Args:
        model_output (`Callable`): `model_output(x, t)`, the model's native output (ε, v or flow velocity) at the
            native state `x` and the scheduler's timestep `t`.
        scheduler: a diffusers scheduler (`set_timesteps` resets its state).
        noise (`torch.Tensor`): native initial noise ε (one batch).
        steps (`int`): the pipeline's `num_inference_steps`.
        clamp (`bool`, *optional*, defaults to `False`): clamp the sample to [-1, 1] (pixel models).
        set_timesteps_kwargs: what the pipeline also passes to `set_timesteps` (`mu`, `sigmas`).

    Returns:
        `torch.Tensor`: the last `prev_sample` (the native sample the pipeline decodes).
    """
    scheduler.set_timesteps(steps, device=noise.device, **set_timesteps_kwargs)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        with autocast_context(noise.device):
            out = model_output(x_in, t)
        x = scheduler.step(out.float(), t, x).prev_sample
    return x.clamp(-1, 1) if clamp else x


@torch.no_grad()
def solve_pipeline(denoiser, noise: torch.Tensor, scheduler, steps: int = PIPELINE_STEPS,
                   extra_args: Optional[dict] = None) -> torch.Tensor:
    """The image the pipeline makes by default: `steps` steps of the model's own diffusers `scheduler`
    (:func:`scheduler_loop`) on the denoiser's native output with its classifier-free guidance
    (`SigmaDenoiser.native_output`), from native noise ε.

    Returns:
        `torch.Tensor` (float32): the native sample the pipeline decodes. When the scheduler ends at σ = 0 it is
        the σ-space state at 0, as :func:`solve` returns; schedulers that stop at σ_min (PNDM or DDIM with
        `set_alpha_to_one=False`) return their last native state, which is what their pipeline decodes.
    """
    kwargs = denoiser.set_timesteps_kwargs(steps, scheduler.config)
    model_output = partial(denoiser.native_output, **(extra_args or {}))
    return scheduler_loop(model_output, scheduler, noise.float(), steps, **kwargs).float()


def pipeline_steps(steps: Optional[int], t2i=None) -> int:
    """Steps of the pipeline reference: `steps` when given, else the text-to-image pipeline's own default
    `num_inference_steps` (`TextToImage.default_steps`: SD and SDXL 50, SD3 and Flux 28), else 50."""
    return steps or (t2i.default_steps if t2i is not None else PIPELINE_STEPS)


def pipeline_scheduler(config: Mapping[str, Any]):
    """A fresh instance of the diffusers scheduler a pipeline's scheduler config names (`_class_name`), built
    from that config; refuses configs naming no stock diffusers scheduler and schedulers that add noise at every
    step (a noise has no single solution under them)."""
    import diffusers

    name = config.get("_class_name")
    if not name:
        raise ValueError("reference_scheduler='pipeline' needs the model's scheduler config with its `_class_name` "
                         "(scheduler/scheduler_config.json of the pipeline folder), and this one names no class; "
                         "pass a pipeline folder with one, or use reference_scheduler='ode'")
    cls = getattr(diffusers, name, None)
    if name == "LearnedScheduleScheduler" or not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"reference_scheduler='pipeline': the model's scheduler config names {name!r}, not a stock "
                         "diffusers scheduler; pass the base model's pipeline folder, or use reference_scheduler='ode'")
    scheduler = cls.from_config({k: v for k, v in config.items() if k not in ("mu", "family")})
    if name in STOCHASTIC_SCHEDULERS or "sde" in str(scheduler.config.get("algorithm_type", "")):
        raise ValueError(f"reference_scheduler='pipeline': the model's {name} adds fresh noise at every step, so a "
                         "noise has no single reference solution; use reference_scheduler='ode'")
    return scheduler


@dataclass(frozen=True)
class Reference:
    """What a run's few-step samples are compared with: the ODE solve (:func:`solve`, `scheduler=None`) or the
    model's own diffusers scheduler at `steps` steps (:func:`solve_pipeline`). Build one with :func:`choose`."""

    steps: int = REFERENCE_STEPS
    scheduler: Any = None

    def __call__(self, denoiser, noise: torch.Tensor, extra_args: Optional[dict] = None) -> torch.Tensor:
        """The reference solution of one batch of native noise (float32, native sample)."""
        if self.scheduler is None:
            return solve(denoiser, noise, self.steps, extra_args=extra_args)
        return solve_pipeline(denoiser, noise, self.scheduler, self.steps, extra_args)

    def settings(self) -> dict:
        """The run settings that say what the tables were fitted to."""
        if self.scheduler is None:
            return {"reference_scheduler": "ode", "reference_solver": REFERENCE_SOLVER, "reference_steps": self.steps}
        return {"reference_scheduler": "pipeline", "reference_solver": type(self.scheduler).__name__,
                "reference_steps": self.steps}


def default_reference(t2i, quiet: bool = False) -> str:
    """`pipeline` for a text-to-image pipeline (`t2i`: its encoded prompts, with the pipeline's `scheduler_config`;
    users compare with the image it makes by default) whose scheduler has one solution per noise, else `ode`."""
    if t2i is None:
        return "ode"
    try:
        pipeline_scheduler(t2i.scheduler_config)
    except ValueError as err:
        if not quiet:
            print(f"reference: the ODE solve, not the pipeline's scheduler ({str(err).split(';')[0]})")
        return "ode"
    return "pipeline"


def choose(reference_scheduler, denoiser, steps: Optional[int] = None) -> Reference:
    """The :class:`Reference` of `reference_scheduler`: `"ode"` (the `steps`-step DPM-Solver++(2M) solve, 200 by
    default), `"pipeline"` (the scheduler the denoiser's scheduler config names, `steps` defaulting to 50 as
    diffusers' pipelines), or a diffusers scheduler instance (a fresh copy of it is driven as `"pipeline"`)."""
    if isinstance(reference_scheduler, str) and reference_scheduler not in REFERENCE_SCHEDULERS:
        raise ValueError(f"unknown reference_scheduler {reference_scheduler!r}; choose 'ode' (a 200-step "
                         "DPM-Solver++(2M) solve of the ODE) or 'pipeline' (the model's own diffusers scheduler)")
    if reference_scheduler == "ode":
        return Reference(steps or REFERENCE_STEPS)
    if not hasattr(denoiser, "native_output"):
        raise ValueError(f"reference_scheduler='pipeline' drives a diffusers model; {type(denoiser).__name__} has no "
                         "`native_output` (use a SigmaDenoiser, or reference_scheduler='ode')")
    if reference_scheduler == "pipeline":
        return Reference(steps or PIPELINE_STEPS, pipeline_scheduler(denoiser.schedule.config))
    config = {**reference_scheduler.config, "_class_name": type(reference_scheduler).__name__}
    return Reference(steps or PIPELINE_STEPS, pipeline_scheduler(config))
