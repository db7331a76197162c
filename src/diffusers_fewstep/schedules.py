"""σ tables: the hand-made baselines (Karras, uniform log σ / logSNR, DDIM time spacing), the stock
tables of diffusers' own schedulers, validation, and the labelled log-σ interpolation fallback.

A table is a 1-D decreasing tensor `[σ_0, …, σ_N]` with `N` model evaluations; σ_N may be 0.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .adapter import SIGMA_MAX_CAP, NoiseSchedule


class StockScheduler(NamedTuple):
    """A diffusers scheduler as users configure it: class, config overrides, the solver of ours that
    computes the same step (:mod:`~diffusers_fewstep.solvers`), and a label."""

    cls: str
    overrides: dict
    solver: str
    label: str


_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# diffusers' schedulers at their usual settings, per model family (the benchmark's peers, BENCHMARK.md)
STOCK_SCHEDULERS: Dict[str, Dict[str, StockScheduler]] = {
    "vp": {
        "ddim_leading": StockScheduler("DDIMScheduler", {"timestep_spacing": "leading", "set_alpha_to_one": True},
                                       "euler", "DDIM leading"),
        "ddim_trailing": StockScheduler("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True},
                                        "euler", "DDIM trailing"),
        "euler_karras": StockScheduler("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", "Euler Karras"),
        "dpmpp2m_karras": StockScheduler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                         "algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m", "DPM++2M Karras"),
        "dpmpp2m_lu": StockScheduler("DPMSolverMultistepScheduler", {"use_lu_lambdas": True,
                                     "algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m", "DPM++2M logSNR"),
        "unipc_bh2": StockScheduler("UniPCMultistepScheduler", {"solver_order": 2}, "unipc", "UniPC bh2"),
        "unipc_bh2_karras": StockScheduler("UniPCMultistepScheduler", {"solver_order": 2, "use_karras_sigmas": True},
                                           "unipc", "UniPC bh2 Karras"),
    },
    "flow": {
        "flow_euler": StockScheduler("FlowMatchEulerDiscreteScheduler", {}, "euler", "FlowMatch Euler"),
        "flow_euler_karras": StockScheduler("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler",
                                            "FlowMatch Euler Karras"),
        "flow_dpmpp2m": StockScheduler("DPMSolverMultistepScheduler", {**_FLOW, "algorithm_type": "dpmsolver++",
                                       "solver_order": 2}, "dpmpp_2m", "DPM++2M (flow σ)"),
        "flow_unipc": StockScheduler("UniPCMultistepScheduler", {**_FLOW, "solver_order": 2}, "unipc",
                                     "UniPC bh2 (flow σ)"),
    },
}


def diffusers_scheduler(name: str, base_config):
    """A fresh diffusers scheduler `name` of :data:`STOCK_SCHEDULERS`, built from the model's scheduler config."""
    import inspect

    import diffusers

    family = NoiseSchedule(base_config).family
    if name not in STOCK_SCHEDULERS[family]:
        raise ValueError(f"unknown diffusers scheduler {name!r} for a {family} model; choose from "
                         f"{list(STOCK_SCHEDULERS[family])}")
    stock = STOCK_SCHEDULERS[family][name]
    cls = getattr(diffusers, stock.cls)
    accepted = inspect.signature(cls.__init__).parameters
    config = {**dict(base_config), **stock.overrides}
    if stock.overrides.get("use_flow_sigmas"):
        config["flow_shift"] = float(base_config.get("shift", 1.0))
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def stock_sigmas(name: str, nfe: int, base_config) -> List[float]:
    """The σ-space table diffusers' scheduler `name` samples on at `nfe` steps (ending in 0)."""
    schedule = NoiseSchedule(base_config)
    scheduler = diffusers_scheduler(name, base_config)
    dynamic = base_config.get("use_dynamic_shifting") and "mu" in scheduler.set_timesteps.__code__.co_varnames
    scheduler.set_timesteps(nfe, **({"mu": base_config.get("mu")} if dynamic else {}))
    if schedule.family == "flow":  # flow time s → σ = s/(1−s), s = 1 capped as everywhere (adapter.SIGMA_MAX_CAP)
        s = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).clamp(max=SIGMA_MAX_CAP / (1 + SIGMA_MAX_CAP))
        table = s / (1 - s)
    elif getattr(scheduler, "sigmas", None) is not None:
        table = torch.as_tensor(scheduler.sigmas, dtype=torch.float64)
    else:  # DDIM: its timesteps, then ᾱ = 1 (set_alpha_to_one)
        table = _append_zero(schedule.t_to_sigma(torch.as_tensor(scheduler.timesteps, dtype=torch.float64)), True)
    return [float(v) for v in table]


def stock_tables(nfe: int, base_config) -> Dict[str, List[float]]:
    """Every distinct stock table at `nfe` steps: diffusers' schedulers (:data:`STOCK_SCHEDULERS`) and the
    hand-made baselines, by name (a table that repeats an earlier one, to 4 significant digits, is left out)."""
    schedule = NoiseSchedule(base_config)
    tables = {name: stock_sigmas(name, nfe, base_config) for name in STOCK_SCHEDULERS[schedule.family]}
    for name in ("karras", "loguniform", "ddim_trailing"):
        tables.setdefault(name, baseline_sigmas(name, nfe, schedule).tolist())
    out, seen = {}, set()
    for name, table in tables.items():
        key = tuple(float(f"{v:.4g}") for v in table)
        if key not in seen:
            seen.add(key)
            out[name] = table
    return out


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, final_zero: bool = True):
    """Karras et al. 2022 (arXiv 2206.00364), eq. 5: n evaluation σ's, ρ-spaced, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return _append_zero(s, final_zero)


def loguniform_sigmas(n: int, sigma_min: float, sigma_max: float, final_zero: bool = True):
    """n σ's uniform in log σ (≡ uniform in logSNR = −2 log σ, diffusers' `use_lu_lambdas`), then 0."""
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return _append_zero(s, final_zero)


def time_uniform_sigmas(n: int, schedule: NoiseSchedule, spacing: str = "trailing", final_zero: bool = True):
    """DDIM's timestep spacings (`trailing` or `leading`) mapped to σ, then 0."""
    big_t = schedule.num_train_timesteps
    if spacing == "trailing":
        t = torch.arange(big_t, 0, -big_t / n).round() - 1
    elif spacing == "leading":
        t = torch.arange(0, n).flip(0) * (big_t // n)
    elif spacing == "linspace":
        t = torch.linspace(0, big_t - 1, n).round().flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'trailing', 'leading' or 'linspace'")
    return _append_zero(schedule.t_to_sigma(t), final_zero)


def _append_zero(s, final_zero):
    return torch.cat([s, s.new_zeros(1)]) if final_zero else s


def baseline_sigmas(name: str, n: int, schedule: NoiseSchedule) -> torch.Tensor:
    """One of the hand-made tables by name: 'karras', 'loguniform' (= 'logsnr'), 'ddim_trailing', 'ddim_leading'."""
    if name == "karras":
        return karras_sigmas(n, schedule.sigma_min, schedule.sigma_max)
    if name in ("loguniform", "logsnr"):
        return loguniform_sigmas(n, schedule.sigma_min, schedule.sigma_max)
    if name.startswith("ddim_") or name.startswith("time_"):
        return time_uniform_sigmas(n, schedule, name.split("_", 1)[1])
    raise ValueError(f"unknown baseline schedule {name!r}; expected karras, loguniform, ddim_trailing or ddim_leading")


def validate_sigmas(sigmas: Sequence[float], sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                    name: str = "σ table", rtol: float = 1e-3) -> list:
    """Check a σ table and return it as a list of floats; raise ValueError saying what is wrong.

    Rules: at least two entries, all finite, strictly decreasing, the last ≥ 0; every σ except a
    final 0 lies within [sigma_min, sigma_max] of the model (with a relative tolerance `rtol`).
    """
    values = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) < 2:
        raise ValueError(f"{name} needs at least 2 entries (σ_0 and a final σ), got {values}")
    bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"{name} has non-finite values at positions {bad}: {values}")
    ups = [i for i in range(len(values) - 1) if not values[i + 1] < values[i]]
    if ups:
        i = ups[0]
        raise ValueError(f"{name} must be strictly decreasing; σ[{i}]={values[i]:.6g} ≤ σ[{i + 1}]={values[i + 1]:.6g}")
    if values[-1] < 0:
        raise ValueError(f"{name} ends at a negative σ ({values[-1]:.6g})")
    if sigma_max is not None and values[0] > sigma_max * (1 + rtol):
        raise ValueError(f"{name} starts at σ={values[0]:.6g}, above the model's σ_max={sigma_max:.6g}")
    positive = [s for s in values if s > 0]
    if sigma_min is not None and positive and positive[-1] < sigma_min * (1 - rtol):
        raise ValueError(f"{name} has σ={positive[-1]:.6g} below the model's σ_min={sigma_min:.6g} "
                         "(only the final entry may go below it, and then only to 0)")
    return values


def interpolate_sigmas(table: Sequence[float], n: int) -> torch.Tensor:
    """Labelled fallback: resample a table to n evaluations by linear interpolation of log σ over
    the normalised step index (a final 0 is kept as the final entry); needs at least two positive σ's."""
    table = torch.as_tensor(table, dtype=torch.float64)
    final_zero = bool(table[-1] == 0)
    pos = table[:-1] if final_zero else table
    if len(pos) < 2:
        raise ValueError(f"interpolating needs at least two positive σ's; got the table {table.tolist()}")
    m = n if final_zero else n + 1
    src = torch.linspace(0, 1, len(pos), dtype=torch.float64)
    dst = torch.linspace(0, 1, m, dtype=torch.float64)
    idx = torch.searchsorted(src, dst).clamp(1, len(src) - 1)
    w = (dst - src[idx - 1]) / (src[idx] - src[idx - 1])
    logs = (1 - w) * pos[idx - 1].log() + w * pos[idx].log()
    return _append_zero(logs.exp(), final_zero)


def starting_tables(init: Optional[str], nfes: Sequence[int], base_config) -> Optional[Dict[int, List[float]]]:
    """The tables a run starts from (`optimize --init`, the training script's `--phase1_init`), when `init` is more
    than a baseline name (:func:`baseline_sigmas`, returned as is): `peer:<name>`, the σ's diffusers' scheduler
    `<name>` samples on (:data:`STOCK_SCHEDULERS`), or a folder holding learned tables (`scheduler/` of an `optimize`
    or training run), which must have one for every count of `nfes` and fit `base_config`'s model."""
    if init is None or not (init.startswith("peer:") or os.path.isdir(init)):
        return init
    if init.startswith("peer:"):
        return {nfe: stock_sigmas(init[len("peer:"):], nfe, base_config) for nfe in nfes}
    from .scheduler import LearnedScheduleScheduler

    learned = LearnedScheduleScheduler.from_folder(init)
    learned.check_compatible(base_config)
    tables = {int(k): [float(s) for s in v] for k, v in learned.config.sigma_tables.items()}
    missing = [n for n in nfes if n not in tables]
    if missing:
        raise ValueError(f"{init} has learned tables for {sorted(tables)} steps, not for {missing}; "
                         "learn them first (diffusers-fewstep optimize --nfe ...) or leave those counts out")
    return {n: tables[n] for n in nfes}
