"""Learning one σ table (Phase 1, DESIGN.md §3, docs/method.md §5–7): the monotone parameterisation with fixed
ends, Adam through the solver on the trajectory objective, and the bound objectives (Adam or the gradient-free
fixed point). :func:`~diffusers_fewstep.optimizer.optimize_schedule` decides which tables to learn and keeps the best.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, List, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import objectives, reference
from .selection import Candidate, Paths, extra_args

MAX_STEP_RATIO = 20.0  # fixed point: largest change of one u-step relative to its neighbour per iteration
MIN_INCREMENT = 1e-4  # smallest share of the log-σ span one increment can take (divided by their number)


# --- the monotone parameterisation ------------------------------------------------------------
class MonotoneSigmas(nn.Module):
    """A σ table as a softmax over log-σ increments between fixed ends.

    The positive entries σ_0 > … > σ_K of `init` are ``log σ_k = log σ_0 − span·Σ_{j<k} p_j`` with
    ``p = floor + (1 − m·floor)·softmax(logits)`` (m increments, floor = 10⁻⁴/m keeps steps apart in floating
    point). σ_0 stays where `init` has it. With `free_last=False` the span ends at σ_K, so both ends stay
    and only the interior moves (as every published schedule learner does); with `free_last=True` it ends at
    σ_min and the last logit is the slack between σ_K and σ_min, so σ_K moves too. A final 0 stays the final
    entry. Every value of `logits` gives a strictly decreasing table inside [σ_min, σ_0].

    Args:
        init (`Sequence[float]`): a valid table `[σ_0, …, σ_N]` to start from.
        sigma_min (`float`): the model's smallest σ.
        free_last (`bool`, *optional*, defaults to `False`): let the last positive σ move (tables ending in 0).
    """

    def __init__(self, init: Sequence[float], sigma_min: float, free_last: bool = False):
        super().__init__()
        table = torch.as_tensor([float(s) for s in init], dtype=torch.float64)
        self.final_zero = bool(table[-1] == 0)
        self.free_last = free_last and self.final_zero
        logs = (table[:-1] if self.final_zero else table).clamp(min=sigma_min).log()
        if self.free_last:
            logs = torch.cat([logs, logs.new_tensor([math.log(sigma_min)])])
        self.log_start, self.span = float(logs[0]), float(logs[0] - logs[-1])
        n = len(logs) - 1
        self.floor = MIN_INCREMENT / max(n, 1)
        fractions = ((logs[:-1] - logs[1:]) / max(self.span, 1e-12)).clamp(min=10 * self.floor)
        fractions = fractions / fractions.sum()
        self.logits = nn.Parameter(((fractions - self.floor) / (1 - n * self.floor)).log())

    @property
    def learnable(self) -> bool:
        """False when the ends leave nothing to move (fewer than two increments)."""
        return len(self.logits) >= 2

    def forward(self) -> torch.Tensor:
        """The table (float64), differentiable w.r.t. `logits`."""
        n = len(self.logits)
        steps = self.span * (self.floor + (1 - n * self.floor) * self.logits.softmax(0))
        sigmas = (self.log_start - torch.cat([steps.new_zeros(1), steps.cumsum(0)])).exp()
        if self.free_last:
            sigmas = sigmas[:-1]  # σ_min only bounded the slack
        return torch.cat([sigmas, sigmas.new_zeros(1)]) if self.final_zero else sigmas



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
    history, ema, best_ema, since = [], None, math.inf, 0
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
        if ema < best_ema * (1 - 1e-3):
            best_ema, since = ema, 0
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


# --- learning one table -------------------------------------------------------------------------
@dataclass
class Run:
    """What every learner of one `optimize_schedule` call shares."""

    model_fn: Any
    pool: Paths
    schedule: Any
    features: Any
    settings: dict
    generator: torch.Generator
    progress: bool

    def stream(self, nfe: int, index: int = 0) -> "Run":
        """This run with its own random stream for learner `index` at `nfe` steps: a table learned at one step
        count does not depend on which other counts or starts were learned before it."""
        return replace(self, generator=torch.Generator().manual_seed(self.settings["seed"] + 1000 * nfe + index + 3))


def learn_trajectory(run: Run, start: Candidate) -> tuple:
    """Adam on the table `start` (ends fixed) through its solver, against the pool's references."""
    s = run.settings
    param = MonotoneSigmas(start.table, run.schedule.sigma_min, s["free_last"]).to(run.pool.noise.device)
    if not param.learnable:
        return list(start.table), []
    batches = _batches(len(run.pool), min(s["batch_size"], len(run.pool)), run.generator)
    pool = run.pool

    def loss_fn(sigmas):
        idx = next(batches)
        dev = idx.to(pool.noise.device)
        sigmas = sigmas.to(pool.noise.dtype)
        x = reference.start_state(pool.noise[dev], run.schedule, sigmas[0])
        return objectives.trajectory_loss(run.model_fn, x, sigmas, pool.reference[dev], start.solver,
                                          extra_args(pool.cond, pool.uncond, idx), s["loss"], run.features,
                                          pool.path_noise[dev])

    bar = tqdm(range(s["num_iters"]), desc=f"NFE {len(start.table) - 1} · learn from {start.name}",
               disable=not run.progress)
    return _adam(loss_fn, param, s["num_iters"], s["lr"], s["patience"], bar)


def learn_bound(run: Run, init_table: List[float]) -> tuple:
    """The first-order solver's error bound from `init_table` (σ_0 = σ_max, ending at σ_min), by Adam or
    the fixed-point iteration; the sampling table then takes its last step to 0."""
    s, pool, schedule = run.settings, run.pool, run.schedule
    weighting = "literal" if s["objective"] == "bound" else "propagated"
    table = [schedule.sigma_max] + list(init_table[1:-1]) + [schedule.sigma_min]
    table = MonotoneSigmas(table, schedule.sigma_min)().tolist()
    bar = tqdm(range(s["num_iters"]), desc=f"NFE {len(table) - 1} · {s['objective']}", disable=not run.progress)
    if s["method"] == "fixed_point":
        # common random numbers: the same paths and stratum offsets at every iteration
        idx = torch.arange(min(s["batch_size"], len(pool)))
        dev = idx.to(pool.noise.device)
        x0, noise, extra = pool.x0[dev], pool.path_noise[dev], extra_args(pool.cond, pool.uncond, idx)
        offsets = torch.rand(len(table) - 1, s["strata"], len(idx), generator=run.generator, dtype=torch.float64)

        def targets_fn(sigmas):
            return objectives.stationarity_targets(run.model_fn, x0, noise, sigmas.to(x0.device), weighting,
                                                   s["sigma_data"], strata=s["strata"], offsets=offsets,
                                                   extra_args=extra).cpu()

        table, history = _fixed_point(targets_fn, table, s["num_iters"], s["tol"], s["damping"], bar)
    else:
        param = MonotoneSigmas(table, schedule.sigma_min).to(pool.noise.device)
        batches = _batches(len(pool), min(s["batch_size"], len(pool)), run.generator)

        def loss_fn(sigmas):
            idx = next(batches)
            dev = idx.to(pool.noise.device)
            return objectives.bound(run.model_fn, pool.x0[dev], pool.path_noise[dev], sigmas.to(pool.noise.dtype),
                                    weighting, s["sigma_data"], s["strata"], generator=run.generator,
                                    extra_args=extra_args(pool.cond, pool.uncond, idx))

        table, history = _adam(loss_fn, param, s["num_iters"], s["lr"], s["patience"], bar)
    table[-1] = 0.0  # the bound ends at σ_min; sampling takes the last step to 0 (DESIGN.md §3)
    return table, history
