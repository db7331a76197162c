"""Phase 1: learn the σ table of a model for a solver and a step count (DESIGN.md §3, docs/method.md).

    result = optimize_schedule(denoiser, nfes=[4, 6], solver="euler")
    result.save("out", base_scheduler_config)   # out/scheduler/, out/schedule.png, out/optimize_log.json

Two solvers of the objectives in :mod:`~diffusers_fewstep.objectives`:

- `method="adam"`: gradient descent through the model on a monotone parameterisation
  (:class:`MonotoneSigmas`), so every iterate is a valid table;
- `method="fixed_point"`: the gradient-free iteration on the bound's stationarity condition
  (forward passes only), for models too large to back-propagate through.

Every NFE of a run shares one pool of initial noises, their many-step reference solutions and
(data-free) the clean samples those give.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import objectives
from . import reference
from .reference import REFERENCE_SOLVER
from .schedules import baseline_sigmas, validate_sigmas
from .solvers import canonical_solver, sample

logger = logging.getLogger(__name__)

OBJECTIVES = ("trajectory", "bound_propagated", "bound")
METHODS = ("adam", "fixed_point")
DEFAULT_LR = {"trajectory": 0.05, "bound_propagated": 0.05, "bound": 0.05}
MAX_STEP_RATIO = 20.0
# CLI defaults by device: the reference solves dominate the cost, and a CPU is ~100× slower
GPU_DEFAULTS = {"batch_size": 128, "reference_steps": 200, "pool_size": None}
CPU_DEFAULTS = {"batch_size": 8, "reference_steps": 50, "pool_size": 32}
MIN_INCREMENT = 1e-4  # smallest share of the log-σ span one increment can take (divided by N)  # fixed point: largest change of one u-step relative to its neighbour per iteration


# --- the monotone parameterisation ------------------------------------------------------------
class MonotoneSigmas(nn.Module):
    """A σ table as a softmax over log-σ increments between fixed endpoints.

    ``log σ_i = log σ_max − span·Σ_{k<i} p_k`` with ``span = log σ_max − log σ_min`` and
    ``p = floor + (1 − N·floor)·softmax(logits)`` (floor = 10⁻⁴/N keeps steps apart in floating point).
    With `final_zero=True` (sampling tables) the N positive σ's are σ_0 … σ_{N−1}, the last logit
    is the slack between σ_{N−1} and σ_min, and σ_N = 0. With `final_zero=False` (the bound) the
    N increments end exactly at σ_N = σ_min. Every value of `logits` gives a strictly decreasing
    table inside [σ_min, σ_max].

    Args:
        init (`Sequence[float]`): a valid table `[σ_0, …, σ_N]` to start from (σ_0 is replaced by
            σ_max, a final σ ≤ σ_min by σ_min or 0).
        sigma_min (`float`), sigma_max (`float`): the model's σ range.
        final_zero (`bool`, *optional*, defaults to `True`): whether the table ends in 0.
        learn_start (`bool`, *optional*, defaults to `False`): let σ_0 move below σ_max (the sample then
            starts from native noise at σ_0, as diffusers' `leading` spacings do).
    """

    def __init__(self, init: Sequence[float], sigma_min: float, sigma_max: float, final_zero: bool = True,
                 learn_start: bool = False):
        super().__init__()
        self.sigma_min, self.sigma_max, self.final_zero = float(sigma_min), float(sigma_max), final_zero
        self.learn_start = learn_start
        table = torch.as_tensor([float(s) for s in init], dtype=torch.float64)
        positive = table[:-1]  # the final entry is replaced by 0 or σ_min
        logs = positive.clamp(sigma_min, sigma_max).log()
        # with `learn_start`, σ_0 is free too: the first logit is the slack between σ_max and σ_0
        logs = torch.cat([logs.new_tensor([math.log(sigma_max)]), logs if learn_start else logs[1:],
                          logs.new_tensor([math.log(sigma_min)])])
        self.span = math.log(sigma_max) - math.log(sigma_min)
        n = len(logs) - 1
        self.floor = MIN_INCREMENT / n  # every increment ≥ floor·span: strictly decreasing in floating point
        fractions = ((logs[:-1] - logs[1:]) / self.span).clamp(min=10 * self.floor)
        fractions = fractions / fractions.sum()
        self.logits = nn.Parameter(((fractions - self.floor) / (1 - n * self.floor)).log())

    @property
    def nfe(self) -> int:
        return len(self.logits) - int(self.learn_start)

    def forward(self) -> torch.Tensor:
        """The table (float64), differentiable w.r.t. `logits`."""
        n = len(self.logits)
        steps = self.span * (self.floor + (1 - n * self.floor) * self.logits.softmax(0))
        logs = math.log(self.sigma_max) - torch.cat([steps.new_zeros(1), steps.cumsum(0)])
        sigmas = logs[1:].exp() if self.learn_start else logs.exp()
        if self.final_zero:
            return torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
        return torch.cat([sigmas[:-1], sigmas.new_tensor([self.sigma_min])])


# --- result ---------------------------------------------------------------------------------
@dataclass
class ScheduleResult:
    """What :func:`optimize_schedule` learned.

    Attributes:
        tables (`dict[int, list[float]]`): `{nfe: [σ_0, …, σ_nfe]}`, plain floats, ending in 0.
        history (`dict[int, list[float]]`): the objective per iteration (`fixed_point`: the largest
            relative stationarity residual).
        seconds (`dict[int, float]`): wall time of each table's optimisation loop.
        num_evals (`dict[int, int]`): batched model calls of each loop (backward passes not counted).
        settings (`dict`): every setting of the run (JSON-able).
        shared (`dict`): the cost shared by all NFEs (reference solves): `seconds`, `num_evals`.
        validation (`dict[int, dict]`): with `validation_size`, the held-out objective of the initial and
            the learned table and which one was kept (`{"init": …, "learned": …, "kept": "learned"|"init"}`).
    """

    tables: Dict[int, List[float]]
    history: Dict[int, List[float]]
    seconds: Dict[int, float]
    num_evals: Dict[int, int]
    settings: Dict[str, Any]
    shared: Dict[str, Any] = field(default_factory=dict)
    validation: Dict[int, Dict[str, Any]] = field(default_factory=dict)

    def provenance(self, base_model: Optional[str] = None) -> dict:
        prov = {"objective": self.settings["objective"], "method": self.settings["method"],
                "solver": self.settings["solver"], "seconds": {str(k): round(v, 2) for k, v in self.seconds.items()},
                "final_objective": {str(k): h[-1] for k, h in self.history.items() if h},
                "settings": self.settings, "tool": "diffusers-fewstep optimize"}
        if self.settings.get("model_class"):
            prov["model_class"] = self.settings["model_class"]  # bundles are refused for another architecture
        if base_model is not None:
            prov["base_model"] = base_model
        return prov

    def to_scheduler(self, base_scheduler_config, provenance: Optional[dict] = None):
        """A :class:`~diffusers_fewstep.LearnedScheduleScheduler` holding the learned tables."""
        from .scheduler import LearnedScheduleScheduler

        config = dict(base_scheduler_config)
        return LearnedScheduleScheduler.from_config(
            config, sigma_tables={str(k): v for k, v in self.tables.items()}, solver=self.settings["solver"],
            provenance=provenance if provenance is not None else self.provenance())

    def save(self, output_dir: str, base_scheduler_config, base_model: Optional[str] = None) -> str:
        """Write `output_dir/scheduler/` (save_pretrained), `schedule.png` and `optimize_log.json`."""
        from .plotting import plot_schedule_comparison

        os.makedirs(output_dir, exist_ok=True)
        scheduler = self.to_scheduler(base_scheduler_config, self.provenance(base_model))
        scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
        plot_schedule_comparison(self.tables, scheduler.noise_schedule, os.path.join(output_dir, "schedule.png"),
                                 title=f"{self.settings['solver']} · {self.settings['objective']}")
        log = {"base_model": base_model, "tables": {str(k): v for k, v in self.tables.items()},
               "history": {str(k): v for k, v in self.history.items()},
               "seconds": {str(k): v for k, v in self.seconds.items()},
               "num_evals": {str(k): v for k, v in self.num_evals.items()},
               "shared": self.shared, "validation": {str(k): v for k, v in self.validation.items()},
               "settings": self.settings}
        with open(os.path.join(output_dir, "optimize_log.json"), "w") as f:
            json.dump(log, f, indent=2)
        return output_dir


# --- helpers ----------------------------------------------------------------------------------
class _CountingDenoiser:
    """Wraps D for the optimiser: counts batched calls, optional autocast and gradient checkpointing."""

    def __init__(self, denoiser, autocast_dtype=None, device_type="cpu", checkpointing=False):
        self.denoiser, self.autocast_dtype, self.device_type = denoiser, autocast_dtype, device_type
        self.checkpointing, self.calls = checkpointing, 0
        self.schedule = denoiser.schedule

    def _call(self, x, sigma, extra):
        if self.autocast_dtype is None:
            return self.denoiser(x, sigma, **extra)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            return self.denoiser(x, sigma, **extra).float()

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(lambda x_, s_: self._call(x_, s_, extra), x, sigma, use_reentrant=False)
        return self._call(x, sigma, extra)


def _select_cond(cond: Optional[dict], idx: torch.Tensor) -> Optional[dict]:
    """Per-batch conditioning: tensors with one row are broadcast, others indexed (cyclically) by sample."""
    if cond is None:
        return None
    out = {}
    for key, value in cond.items():
        if torch.is_tensor(value) and value.ndim > 0:
            rows = value.shape[0]
            value = value.expand(len(idx), *value.shape[1:]) if rows == 1 else value[idx.to(value.device) % rows]
        out[key] = value
    return out


def _extra_args(cond, uncond, idx):
    extra = {}
    if cond is not None:
        extra["cond"] = _select_cond(cond, idx)
    if uncond is not None:
        extra["uncond"] = _select_cond(uncond, idx)
    return extra


def _infer_sample_shape(denoiser) -> tuple:
    shape = getattr(denoiser, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    config = getattr(getattr(denoiser, "model", None), "config", None)
    if config is not None and "sample_size" in config and "in_channels" in config:
        size = config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config["in_channels"], *size)
    raise ValueError("cannot infer the sample shape from the denoiser; pass sample_shape=(C, H, W)")


def _initial_table(init, nfe: int, schedule) -> List[float]:
    if isinstance(init, str):
        return baseline_sigmas(init, nfe, schedule).tolist()
    if isinstance(init, dict):
        table = init.get(nfe, init.get(str(nfe)))
        if table is None:
            raise ValueError(f"init has no table for {nfe} steps (it has {sorted(init)})")
        init = table
    table = [float(s) for s in init]
    if len(table) != nfe + 1:
        raise ValueError(f"init table has {len(table)} entries; {nfe} steps need {nfe + 1}")
    return table


@contextlib.contextmanager
def _frozen(denoiser):
    """Switch off the model's `requires_grad` for the run and restore the flags afterwards."""
    params = list(denoiser.parameters()) if isinstance(denoiser, nn.Module) else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _resolve_precision(mixed_precision, device) -> Optional[torch.dtype]:
    if mixed_precision is None:
        mixed_precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    dtypes = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}; expected one of {list(dtypes)}")
    return dtypes[mixed_precision]


class _Pool:
    """The training paths of a run, shared by every NFE: native noises, their many-step references
    (trajectory objective, data-free x0) and the clean samples x0 (bound)."""

    def __init__(self, size, sample_shape, device, generator):
        self.noise = torch.randn(size, *sample_shape, generator=generator).to(device)
        self.path_noise = torch.randn(size, *sample_shape, generator=generator).to(device)  # ε of x0 + σ·ε
        self.reference = None
        self.x0 = None

    def __len__(self):
        return self.noise.shape[0]


@torch.no_grad()
def _reference_solves(model_fn, pool, steps, batch_size, cond, uncond, progress):
    """The one reference solve (:func:`diffusers_fewstep.reference.solve`) of every path of the pool."""
    refs = []
    for start in tqdm(range(0, len(pool), batch_size), desc="reference solves", disable=not progress):
        idx = torch.arange(start, min(start + batch_size, len(pool)))
        refs.append(reference.solve(model_fn, pool.noise[idx.to(pool.noise.device)], steps,
                                    extra_args=_extra_args(cond, uncond, idx)))
    return torch.cat(refs)


def _batches(n, batch_size, generator):
    """Endless mini-batches of indices into a pool of n, reshuffled every epoch."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


def _adam(loss_fn, param: MonotoneSigmas, num_iters, lr, patience, bar):
    """Adam on the logits with a cosine learning-rate decay to lr/10; early stopping on an EMA."""
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(num_iters, 1), eta_min=lr / 10)
    history, ema, best, since = [], None, math.inf, 0
    for _ in bar:
        loss = loss_fn(param())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        history.append(value)
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        bar.set_postfix(objective=f"{value:.4g}", smoothed=f"{ema:.4g}")
        if ema < best * (1 - 1e-3):
            best, since = ema, 0
        else:
            since += 1
        if patience is not None and since >= patience:
            break
    with torch.no_grad():
        return param().tolist(), history


def _fixed_point(targets_fn, table: Sequence[float], num_iters, tol, damping, bar):
    """Gradient-free iteration on the stationarity condition (docs/method.md).

    In u = 1/σ with fixed ends, the condition asks for step lengths Δ_i = T_i(u) (i ≥ 1). Each
    iteration sets Δ_i ∝ Δ_{i−1}·T_i/Δ_{i−1} (the ratio the condition wants between neighbouring
    steps), rescales to the fixed total u_N − u_0 and mixes in log Δ with weight `damping`. A table
    is a fixed point exactly when Δ_i = T_i for every interior i.
    """
    u = 1 / torch.as_tensor(table, dtype=torch.float64)
    total = u[-1] - u[0]
    log_steps = (u[1:] - u[:-1]).log()
    history = []
    for _ in bar:
        steps = log_steps.exp()
        sigmas = 1 / (u[0] + torch.cat([steps.new_zeros(1), steps.cumsum(0)]))
        targets = targets_fn(sigmas)
        residual = float(((steps[1:] - targets).abs() / steps[1:]).max()) if len(targets) else 0.0
        history.append(residual)
        bar.set_postfix(residual=f"{residual:.3g}")
        if residual < tol:
            break
        ratios = (targets / steps[:-1]).clamp(1 / MAX_STEP_RATIO, MAX_STEP_RATIO)
        wanted = torch.cat([steps.new_zeros(1), ratios.log().cumsum(0)])
        wanted = wanted - torch.logsumexp(wanted, 0) + total.log()
        log_steps = (1 - damping) * log_steps + damping * wanted
        log_steps = log_steps - torch.logsumexp(log_steps, 0) + total.log()
    steps = log_steps.exp()
    return (1 / (u[0] + torch.cat([steps.new_zeros(1), steps.cumsum(0)]))).tolist(), history


# --- the API --------------------------------------------------------------------------------
def optimize_schedule(denoiser: Callable, nfes: Union[int, Sequence[int]] = (4, 6), solver: str = "euler",
                      objective: str = "trajectory", method: str = "adam", num_iters: int = 150,
                      batch_size: int = 128, lr: Optional[float] = None, data: Optional[torch.Tensor] = None,
                      cond: Optional[dict] = None, uncond: Optional[dict] = None,
                      sample_shape: Optional[Sequence[int]] = None, init: Union[str, dict, Sequence[float]] = "ddim_trailing",
                      reference_steps: int = 200, seed: int = 0, device: Optional[Union[str, torch.device]] = None,
                      progress: bool = True, patience: Optional[int] = 30, mixed_precision: Optional[str] = None,
                      gradient_checkpointing: bool = False, pool_size: Optional[int] = None,
                      sigma_data: float = 0.5, strata: int = 1, damping: float = 0.5,
                      tol: float = 1e-3, learn_start: bool = False,
                      reference_denoiser: Optional[Callable] = None, validation_size: int = 0) -> ScheduleResult:
    """Learn one σ table per step count for `denoiser` and `solver` (Phase 1, DESIGN.md §3).

    Args:
        denoiser (`Callable`): `D(x, sigma, cond=None, uncond=None)` in σ-space with a `.schedule`
            (:class:`~diffusers_fewstep.NoiseSchedule`), e.g. :class:`~diffusers_fewstep.SigmaDenoiser`.
        nfes (`int` or `list[int]`, *optional*, defaults to `(4, 6)`): step counts (model evaluations).
        solver (`str`, *optional*, defaults to `"euler"`): the solver the tables are for (`euler` ≡ DDIM,
            `dpmpp_2m`, `unipc`, `ipndm`); the bound objectives describe the first-order solver only.
        objective (`str`, *optional*, defaults to `"trajectory"`): `trajectory` (endpoint error against
            a `reference_steps` DPM-Solver++(2M) solution, back-propagated through the solver),
            `bound_propagated` (the bound with propagation weights) or `bound` (the literal bound; degenerate).
        method (`str`, *optional*, defaults to `"adam"`): `adam` (gradients through the model) or
            `fixed_point` (forward passes only; bound objectives).
        num_iters (`int`, *optional*, defaults to 150): iterations per table (an upper limit with `patience`).
        batch_size (`int`, *optional*, defaults to 128): paths per iteration (and per reference batch).
        lr (`float`, *optional*): Adam learning rate on the logits (default 0.05), cosine-decayed to lr/10.
        data (`torch.Tensor`, *optional*): clean samples x0 (model-native scale) for the bound; without
            it the bound uses the model's own `reference_steps` samples (data-free). Unused by `trajectory`.
        cond (`dict`, *optional*): model keyword arguments passed to the denoiser as `cond` (e.g.
            `encoder_hidden_states`, `class_labels`); tensors with one row are broadcast, others are
            taken row by row (cyclically) for the training paths. `uncond`: the same for guidance.
        sample_shape (`tuple`, *optional*): shape of one sample; read from `denoiser.sample_shape` or
            the model config (`in_channels`, `sample_size`) when not given.
        init (`str`, `dict` or `list`, *optional*, defaults to `"ddim_trailing"`): the starting table:
            a baseline name of :func:`~diffusers_fewstep.schedules.baseline_sigmas`, a table, or `{nfe: table}`.
        reference_steps (`int`, *optional*, defaults to 200): steps of the reference solver
            (DPM-Solver++(2M), DDIM-trailing spacing).
        seed (`int`, *optional*, defaults to 0): seeds every random draw (results are deterministic).
        device (`str`, *optional*): where to run; defaults to the denoiser's device.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars with the current objective.
        patience (`int`, *optional*, defaults to 30): stop a table after this many iterations without a
            0.1% improvement of the smoothed (EMA 0.9) objective; `None` disables early stopping.
        mixed_precision (`str`, *optional*): `"no"`, `"bf16"` or `"fp16"` autocast of the model calls of
            the optimisation (references stay in full precision); defaults to bf16 on CUDA, off on CPU.
        gradient_checkpointing (`bool`, *optional*, defaults to `False`): recompute each model call in the
            backward pass instead of storing its activations (memory for time).
        pool_size (`int`, *optional*): number of training paths (noises with references) shared by
            all NFEs; defaults to `min(8·batch_size, 1024)` (at least `batch_size`).
        sigma_data (`float`, *optional*, defaults to 0.5): σ_d of the propagation weights.
        strata (`int`, *optional*, defaults to 1): Monte-Carlo samples per interval of the bound.
        damping (`float`, *optional*, defaults to 0.5): fixed point: mixing weight of the new steps.
        tol (`float`, *optional*, defaults to 1e-3): fixed point: stop when the largest relative
            stationarity residual is below it.
        learn_start (`bool`, *optional*, defaults to `False`): trajectory objective: learn σ_0 too (native
            noise then enters at σ_0 ≤ σ_max, as in diffusers' `leading` spacings); the reference still
            starts at σ_max.
        reference_denoiser (`Callable`, *optional*): the model whose many-step solutions are the targets
            (reference and data-free x0); defaults to `denoiser`. After Phase 2 this is the frozen teacher, so
            the tuned model's tables are fitted to the teacher's trajectories, not to its own.
        validation_size (`int`, *optional*, defaults to 0): trajectory objective: this many held-out noises
            (seed + 1) with their own references; after learning, a table is kept only if its held-out
            objective beats the initial table's, otherwise the initial table is returned (`result.validation`).

    Returns:
        :class:`ScheduleResult`
    """
    # 1. settings
    solver = canonical_solver(solver)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if method == "fixed_point" and objective == "trajectory":
        raise ValueError("method='fixed_point' solves the bound's stationarity condition; use "
                         "objective='bound_propagated' (or 'bound'), or method='adam' for 'trajectory'")
    if objective == "trajectory" and data is not None:
        logger.warning("`data` is unused by the trajectory objective (it needs only noise); it feeds the bound objectives")
    nfes = [int(nfes)] if isinstance(nfes, int) else [int(n) for n in nfes]
    if not nfes or min(nfes) < 1:
        raise ValueError(f"nfes must be positive step counts, got {nfes}")
    if device is None:
        params = list(denoiser.parameters()) if isinstance(denoiser, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    schedule = denoiser.schedule
    sample_shape = tuple(sample_shape) if sample_shape is not None else _infer_sample_shape(denoiser)
    lr = DEFAULT_LR[objective] if lr is None else lr
    pool_size = pool_size or max(batch_size, min(8 * batch_size, 1024))
    weighting = "literal" if objective == "bound" else "propagated"
    model_fn = _CountingDenoiser(denoiser, _resolve_precision(mixed_precision, device), device.type,
                                 gradient_checkpointing)
    full_fn = _CountingDenoiser(reference_denoiser or denoiser)
    settings = {"nfes": nfes, "solver": solver, "objective": objective, "method": method, "num_iters": num_iters,
                "batch_size": batch_size, "lr": lr, "init": init if isinstance(init, str) else "custom",
                "reference_steps": reference_steps, "reference_solver": REFERENCE_SOLVER, "seed": seed,
                "patience": patience, "mixed_precision": str(model_fn.autocast_dtype or "no"),
                "gradient_checkpointing": gradient_checkpointing, "pool_size": pool_size,
                "x0_source": "none" if objective == "trajectory" else ("data" if data is not None else "model"),
                "sigma_data": sigma_data, "strata": strata, "damping": damping, "tol": tol,
                "sample_shape": list(sample_shape), "device": str(device), "noise_schedule": schedule.describe(),
                "model_class": type(getattr(denoiser, "model", denoiser)).__name__,
                "validation_size": validation_size, "learn_start": learn_start, "reference_model": "teacher" if reference_denoiser is not None else "self"}

    with _frozen(denoiser):  # gradients flow to the table only; the model's flags are restored after
        # 2. the shared pool: noises, references (trajectory, or data-free x0), x0
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        pool = _Pool(pool_size, sample_shape, device, generator)
        if objective == "trajectory" or data is None:
            pool.reference = _reference_solves(full_fn, pool, reference_steps, batch_size, cond, uncond, progress)
        if objective != "trajectory":
            if data is None:
                pool.x0 = pool.reference
            else:
                pick = torch.randint(0, data.shape[0], (pool_size,), generator=generator)
                pool.x0 = data[pick].to(device=device, dtype=torch.float32)
        held_out = None
        if validation_size and objective == "trajectory":
            held_out = _Pool(validation_size, sample_shape, device, torch.Generator().manual_seed(seed + 1))
            held_out.reference = _reference_solves(full_fn, held_out, reference_steps, batch_size, cond, uncond,
                                                   progress)
        shared = {"seconds": time.perf_counter() - start, "num_evals": full_fn.calls}

        # 3. one table per NFE
        tables, history, seconds, num_evals, validation = {}, {}, {}, {}, {}
        for nfe in nfes:
            start, calls_before = time.perf_counter(), model_fn.calls
            init_table = _initial_table(init, nfe, schedule)
            desc = f"NFE {nfe} · {objective} · {method}"
            if method == "adam":
                table, history[nfe] = _learn_adam(model_fn, pool, init_table, nfe, solver, objective, weighting,
                                                   schedule, num_iters, batch_size, lr, patience, sigma_data, strata,
                                                   cond, uncond, generator, progress, desc, learn_start)
            else:
                table, history[nfe] = _learn_fixed_point(model_fn, pool, init_table, schedule, num_iters, batch_size,
                                                          weighting, sigma_data, strata, damping, tol, cond, uncond,
                                                          generator, progress, desc)
            if held_out is not None:  # keep the learned table only if it generalises better than its start
                losses = {name: _held_out_loss(model_fn, held_out, t, solver, batch_size, cond, uncond, schedule)
                          for name, t in (("init", init_table), ("learned", table))}
                kept = "learned" if losses["learned"] <= losses["init"] else "init"
                validation[nfe] = {**losses, "kept": kept}
                table = table if kept == "learned" else init_table
            tables[nfe] = validate_sigmas(table, schedule.sigma_min, schedule.sigma_max, name=f"learned {nfe}-step table")
            seconds[nfe] = time.perf_counter() - start
            num_evals[nfe] = model_fn.calls - calls_before
        return ScheduleResult(tables, history, seconds, num_evals, settings, shared, validation)


@torch.no_grad()
def _held_out_loss(model_fn, pool, table, solver, batch_size, cond, uncond, schedule) -> float:
    """The trajectory objective of `table` over every path of a held-out pool."""
    sigmas = torch.as_tensor(table, dtype=pool.noise.dtype, device=pool.noise.device)
    total = 0.0
    for start in range(0, len(pool), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(pool)))
        dev_idx = idx.to(pool.noise.device)
        x_start = reference.start_state(pool.noise[dev_idx], schedule, sigmas[0])
        loss = objectives.trajectory_loss(model_fn, x_start, sigmas, pool.reference[dev_idx], solver,
                                          extra_args=_extra_args(cond, uncond, idx))
        total += float(loss) * len(idx)
    return total / len(pool)


def _learn_adam(model_fn, pool, init_table, nfe, solver, objective, weighting, schedule, num_iters, batch_size, lr,
                patience, sigma_data, strata, cond, uncond, generator, progress, desc, learn_start=False):
    final_zero = objective == "trajectory"
    if learn_start and not final_zero:
        raise ValueError("learn_start applies to the trajectory objective only (the bound fixes σ_0 = σ_max)")
    param = MonotoneSigmas(init_table, schedule.sigma_min, schedule.sigma_max, final_zero=final_zero,
                           learn_start=learn_start).to(pool.noise.device)
    batches = _batches(len(pool), min(batch_size, len(pool)), generator)
    dtype = pool.noise.dtype

    def loss_fn(sigmas):
        idx = next(batches)
        dev_idx = idx.to(pool.noise.device)
        extra = _extra_args(cond, uncond, idx)
        if objective == "trajectory":
            sigmas = sigmas.to(dtype)
            # native noise enters at σ_0 (σ_max unless `learn_start`): x = ε / a(σ_0)
            x_start = reference.start_state(pool.noise[dev_idx], schedule, sigmas[0])
            return objectives.trajectory_loss(model_fn, x_start, sigmas, pool.reference[dev_idx],
                                              solver, extra_args=extra)
        return objectives.bound(model_fn, pool.x0[dev_idx], pool.path_noise[dev_idx], sigmas.to(dtype), weighting,
                                sigma_data, strata, generator=generator, extra_args=extra)

    bar = tqdm(range(num_iters), desc=desc, disable=not progress)
    table, history = _adam(loss_fn, param, num_iters, lr, patience, bar)
    table[-1] = 0.0  # the bound ends at σ_min; sampling takes the last step to 0 (DESIGN.md §3)
    return table, history


def _learn_fixed_point(model_fn, pool, init_table, schedule, num_iters, batch_size, weighting, sigma_data, strata,
                       damping, tol, cond, uncond, generator, progress, desc):
    # common random numbers: the same paths and stratum offsets at every iteration
    idx = torch.arange(min(batch_size, len(pool)))
    dev_idx = idx.to(pool.noise.device)
    x0, noise = pool.x0[dev_idx], pool.path_noise[dev_idx]
    extra = _extra_args(cond, uncond, idx)
    offsets = torch.rand(len(init_table) - 1, strata, len(idx), generator=generator, dtype=torch.float64)
    table = list(init_table[:-1]) + [schedule.sigma_min]
    table[0] = schedule.sigma_max
    table = MonotoneSigmas(table, schedule.sigma_min, schedule.sigma_max, final_zero=False)().tolist()

    def targets_fn(sigmas):
        return objectives.stationarity_targets(model_fn, x0, noise, sigmas.to(x0.device), weighting, sigma_data,
                                               strata=strata, offsets=offsets, extra_args=extra).cpu()

    bar = tqdm(range(num_iters), desc=desc, disable=not progress)
    table, history = _fixed_point(targets_fn, table, num_iters, tol, damping, bar)
    table[-1] = 0.0
    return table, history


# --- data for the bound ------------------------------------------------------------------------
# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffusers-fewstep optimize`."""
    from . import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="diffusers pipeline folder or Hub id (default: the vendored Fashion-MNIST DDPM)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8], help="step counts to learn tables for")
    parser.add_argument("--solver", default="euler", help="euler (= DDIM), dpmpp_2m, unipc or ipndm")
    parser.add_argument("--objective", default="trajectory", choices=OBJECTIVES, help="what the table minimises")
    parser.add_argument("--method", default="adam", choices=METHODS, help="adam (gradients) or fixed_point")
    parser.add_argument("--output-dir", required=True, help="writes scheduler/, schedule.png, optimize_log.json")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-iters", type=int, default=150, help="iterations per table (upper limit)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"paths per iteration (default: {GPU_DEFAULTS['batch_size']} on cuda, "
                             f"{CPU_DEFAULTS['batch_size']} on cpu)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="training paths shared by all NFEs (default: min(8·batch, 1024) on cuda, 32 on cpu)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate on the logits")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help=f"steps of the DPM-Solver++(2M) reference (default: {GPU_DEFAULTS['reference_steps']} "
                             f"on cuda, {CPU_DEFAULTS['reference_steps']} on cpu)")
    parser.add_argument("--init", default="ddim_trailing",
                        help="table to start from: a baseline (ddim_trailing, karras, loguniform, ddim_leading) or "
                             "peer:<row> for a diffusers scheduler's own σ's (e.g. peer:unipc_bh2)")
    parser.add_argument("--validation-size", type=int, default=0,
                        help="held-out noises: keep a learned table only if it beats its start on them (0: off)")
    parser.add_argument("--learn-start", action="store_true",
                        help="learn σ_0 too (noise enters at σ_0 ≤ σ_max, as diffusers' leading spacings do)")
    parser.add_argument("--data", default=None, help="clean data for the bound: IDX file, .pt tensor or image folder")
    parser.add_argument("--patience", type=int, default=30, help="early stopping patience (iterations)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                        help="autocast of the optimisation's model calls (default: bf16 on cuda)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute model calls in backward")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """`diffusers-fewstep optimize`: learn the tables and write OUT/scheduler/, OUT/schedule.png, OUT/optimize_log.json."""
    from .adapter import SigmaDenoiser
    from .benchmark import initial_tables
    from .data import load_images
    from .hub import load_model_and_scheduler_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    batch_size = args.batch_size or defaults["batch_size"]
    reference_steps = args.reference_steps or defaults["reference_steps"]
    model, config = load_model_and_scheduler_config(args.model)
    denoiser = SigmaDenoiser(model.to(device).eval(), config)
    sample_shape = _infer_sample_shape(denoiser)
    data = load_images(args.data, sample_shape) if args.data else None
    result = optimize_schedule(
        denoiser, nfes=args.nfe, solver=args.solver, objective=args.objective, method=args.method,
        num_iters=args.max_iters, batch_size=batch_size, lr=args.lr, data=data,
        init=initial_tables(args.init, args.nfe, config), learn_start=args.learn_start,
        validation_size=args.validation_size,
        reference_steps=reference_steps, seed=args.seed, device=device, progress=not args.quiet,
        patience=args.patience, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, pool_size=args.pool_size or defaults["pool_size"])
    result.save(args.output_dir, config, base_model=args.model)
    for nfe, table in result.tables.items():
        print(f"NFE {nfe}: {[round(s, 4) for s in table]}  ({result.seconds[nfe]:.1f} s, objective "
              f"{result.history[nfe][0]:.4g} -> {result.history[nfe][-1]:.4g})")
    print(f"wrote {args.output_dir}/scheduler, schedule.png, optimize_log.json")
    return 0
