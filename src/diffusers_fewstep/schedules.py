"""σ tables: the hand-made baselines (Karras, uniform log σ / logSNR, DDIM time spacing),
validation, and the labelled log-σ interpolation fallback.

A table is a 1-D decreasing tensor `[σ_0, …, σ_N]` with `N` model evaluations; σ_N may be 0.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .adapter import NoiseSchedule


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
    the normalised step index (a final 0 is kept as the final entry)."""
    table = torch.as_tensor(table, dtype=torch.float64)
    final_zero = bool(table[-1] == 0)
    pos = table[:-1] if final_zero else table
    m = n if final_zero else n + 1
    src = torch.linspace(0, 1, len(pos), dtype=torch.float64)
    dst = torch.linspace(0, 1, m, dtype=torch.float64)
    idx = torch.searchsorted(src, dst).clamp(1, len(src) - 1)
    w = (dst - src[idx - 1]) / (src[idx] - src[idx - 1])
    logs = (1 - w) * pos[idx - 1].log() + w * pos[idx].log()
    return _append_zero(logs.exp(), final_zero)
