"""σ-space view of diffusers models (DESIGN.md §1).

Every supported model becomes a denoiser ``D(x; σ)`` in variance-exploding coordinates
``x = x0 + σ·ε``. :class:`NoiseSchedule` holds the model-free part (σ range, σ → timestep,
native ↔ σ-space scaling, model output → D); :class:`SigmaDenoiser` adds the model.
The scheduler, the optimiser, evaluation and the pipelines all use these two classes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow",)
# Zero-terminal-SNR VP schedules and flow matching reach σ = ∞ at their last training step. Like
# diffusers' Euler scheduler (ᾱ_T = 2**-24 for `rescale_betas_zero_snr`), we use σ = 4096 there instead.
SIGMA_MAX_CAP = 4096.0


def config_family(config: Mapping[str, Any]) -> str:
    """'flow' for flow-matching scheduler configs, 'vp' for discrete VP (alphas_cumprod) ones."""
    family = config.get("family")
    if family:
        return family
    name = str(config.get("_class_name", ""))
    if "FlowMatch" in name or ("shift" in config and "beta_start" not in config):
        return "flow"
    return "vp"


class NoiseSchedule:
    """The model-free part of the σ-space view, built from any diffusers scheduler config.

    Args:
        config (`Mapping`): a diffusers scheduler config (`pipe.scheduler.config` or a
            `scheduler_config.json` dict). Discrete VP configs use `num_train_timesteps`,
            `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`, `rescale_betas_zero_snr`
            and `prediction_type`; flow-matching configs use `num_train_timesteps` and `shift`.
        prediction_type (`str`, *optional*): overrides the config's prediction type.
        mu (`float`, *optional*): the resolution-dependent shift of flow configs with `use_dynamic_shifting`
            (Flux): the effective shift is `exp(mu)` (`time_shift_type="exponential"`) or `mu` (`"linear"`), as in
            `FlowMatchEulerDiscreteScheduler.set_timesteps(mu=...)`. Required for those configs (as the argument or
            as `config["mu"]`, so a scheduler config can carry it), ignored otherwise.
    """

    def __init__(self, config: Mapping[str, Any], prediction_type: Optional[str] = None, mu: Optional[float] = None):
        self.config = dict(config) if mu is None else {**config, "mu": mu}
        self.family = config_family(config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if self.family == "vp":
            # 1. ᾱ from diffusers itself (all beta schedules, trained betas, zero-SNR rescaling)
            from diffusers import DDPMScheduler

            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "rescale_betas_zero_snr")
            ddpm = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
            alphas_cumprod = ddpm.alphas_cumprod.double()
            alphas_cumprod[alphas_cumprod <= 0] = 1.0 / SIGMA_MAX_CAP**2  # zero terminal SNR only
            # 2. σ = √((1−ᾱ)/ᾱ) at every training timestep (increasing in t)
            self.train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
            self.prediction_type = prediction_type or config.get("prediction_type") or "epsilon"
            allowed = VP_PREDICTION_TYPES
        elif self.family == "flow":
            # flow matching: x_t = (1−s)·x0 + s·ε, s = σ/(1+σ); trained on shifted s in [s_min, 1]
            shift = flow_shift(config, mu if mu is not None else config.get("mu"))
            s = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
            s = shift * s / (1 + (shift - 1) * s)
            s = s.clamp(max=SIGMA_MAX_CAP / (1 + SIGMA_MAX_CAP))
            self.train_sigmas = s / (1 - s)
            self.prediction_type = prediction_type or config.get("prediction_type") or "flow"
            if self.prediction_type in ("velocity", "flow_prediction"):
                self.prediction_type = "flow"
            allowed = FLOW_PREDICTION_TYPES
        else:
            raise ValueError(f"unknown model family {self.family!r}; expected 'vp' or 'flow'")
        if self.prediction_type not in allowed:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r} for a {self.family} model; "
                f"expected one of {list(allowed)}")
        self.log_sigmas = self.train_sigmas.log()
        self._log_sigma_range = (float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        self._log_sigmas_by_device = {}
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(self.train_sigmas[-1])

    def describe(self) -> dict:
        """Plain-JSON summary of this noise schedule (stored as provenance and compared on load)."""
        return {"family": self.family, "prediction_type": self.prediction_type,
                "num_train_timesteps": self.num_train_timesteps,
                "sigma_min": round(self.sigma_min, 6), "sigma_max": round(self.sigma_max, 4)}

    # --- σ ↔ timestep ------------------------------------------------------------------
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous model timestep for σ: VP by log-σ interpolation over the training table
        (as k-diffusion and diffusers' `_sigma_to_t`), flow as `s·num_train_timesteps`."""
        sigma = torch.as_tensor(sigma)
        if self.family == "flow":
            return sigma / (1 + sigma) * self.num_train_timesteps
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-10).log().clamp(*self._log_sigma_range)
        idx = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1).reshape(log_sigma.shape)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        w = (log_sigma - lo) / (hi - lo)
        return (idx - 1 + w).to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def _log_sigmas_on(self, device) -> torch.Tensor:
        """The log-σ table on `device`, copied there once: a copy from host memory, and reading a value back, would
        each wait for the device's queued work at every model call."""
        device = torch.device(device)
        if device not in self._log_sigmas_by_device:
            self._log_sigmas_by_device[device] = self.log_sigmas.to(device)
        return self._log_sigmas_by_device[device]

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ for a (possibly fractional) model timestep; inverse of :meth:`sigma_to_t`."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.family == "flow":
            s = t / self.num_train_timesteps
            return s / (1 - s).clamp(min=1 / (1 + SIGMA_MAX_CAP))
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        log_sigmas = self._log_sigmas_on(t.device)
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()

    # --- native ↔ σ-space -----------------------------------------------------------------
    def native_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """a(σ) with x_native = a(σ)·x: 1/√(σ²+1) for VP, 1/(1+σ) for flow; 1 at σ = 0."""
        sigma = torch.as_tensor(sigma)
        return 1 / (1 + sigma) if self.family == "flow" else (sigma**2 + 1).rsqrt()

    def denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D from the model's native output, given the σ-space state x (DESIGN.md §1 table)."""
        sigma = _bcast(sigma, x)
        if self.prediction_type == "epsilon":
            return x - sigma * output
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - sigma * (sigma**2 + 1).rsqrt() * output
        if self.prediction_type == "sample":
            return output
        # flow velocity v = ε − x0: D = x_t − s·v̂
        s = sigma / (1 + sigma)
        return x * (1 - s) - s * output


def flow_shift(config: Mapping[str, Any], mu: Optional[float] = None) -> float:
    """The shift of a flow-matching config: `shift`, or with `use_dynamic_shifting` the one `mu` gives."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    if mu is None:
        raise ValueError("this flow scheduler config uses dynamic shifting; pass `mu` (compute it from the image size "
                         "with diffusers' `calculate_shift`, as the pipeline does)")
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"unknown time_shift_type {kind!r}; expected 'exponential' or 'linear'")
    return math.exp(mu) if kind == "exponential" else float(mu)


def flatten_kwargs(kwargs: Mapping[str, Any], prefix: str = "") -> dict:
    """Nested model kwargs as one flat dict with dotted keys (inverse of :func:`nest_kwargs`)."""
    flat = {}
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            flat.update(flatten_kwargs(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def nest_kwargs(flat: Mapping[str, Any]) -> dict:
    """Model kwargs from dotted keys: `{"added_cond_kwargs.time_ids": t}` → `{"added_cond_kwargs": {"time_ids": t}}`."""
    nested = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _bcast(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


class SigmaDenoiser(nn.Module):
    """``D(x; σ, **cond)`` for a diffusers model (UNet2D, UNet2DCondition, SD3 transformer, …).

    Args:
        model (`torch.nn.Module`): the diffusers model; called as
            ``model(x_native, timestep=t, **cond)`` and its `.sample` (or first output) is used.
        scheduler_config (`Mapping`): the model's scheduler config (see :class:`NoiseSchedule`).
        guidance_scale (`float`, *optional*, defaults to 1.0): classifier-free guidance on D.
            When > 1, `forward` needs `uncond` (a dict of unconditional kwargs) next to `cond`.
        prediction_type (`str`, *optional*): overrides the config's prediction type.
        mu (`float`, *optional*): the dynamic shift of flow configs with `use_dynamic_shifting` (see :class:`NoiseSchedule`).

    `cond` and `uncond` may hold nested model kwargs in flat form, one tensor per key with a batch row per
    sample: `{"added_cond_kwargs.text_embeds": t}` reaches the model as `added_cond_kwargs={"text_embeds": t}`
    (so the optimiser can pick rows of every tensor); nested dicts are accepted too.
    """

    def __init__(self, model: nn.Module, scheduler_config: Mapping[str, Any], guidance_scale: float = 1.0,
                 prediction_type: Optional[str] = None, mu: Optional[float] = None):
        super().__init__()
        self.model = model
        self.schedule = NoiseSchedule(scheduler_config, prediction_type, mu=mu)
        self.guidance_scale = guidance_scale
        self.num_evals = 0  # model evaluations (counted per batch call, guidance counts once)

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None, torch_dtype=None, **kwargs) -> "SigmaDenoiser":
        """Load a diffusers model folder or Hub id holding `scheduler/` and `unet/` or `transformer/`."""
        from .hub import load_model_and_scheduler_config

        model, config = load_model_and_scheduler_config(path, subfolder=subfolder, torch_dtype=torch_dtype)
        return cls(model, config, **kwargs)

    def model_output(self, x_native: torch.Tensor, t: torch.Tensor, cond: Optional[dict]) -> torch.Tensor:
        out = self.model(x_native, timestep=t, **nest_kwargs(cond or {}))
        out = out.sample if hasattr(out, "sample") else out[0]
        return out[:, : x_native.shape[1]]  # learned-variance models predict extra channels

    def native_output(self, x_native: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None,
                      uncond: Optional[dict] = None) -> torch.Tensor:
        """The model's native output (ε, v or flow velocity) at the native state `x_native` and diffusers timestep
        `t` (a scalar or one per sample), with classifier-free guidance as diffusers' pipelines apply it:
        `out_u + guidance_scale·(out_c − out_u)`, one model call on the batch `[uncond, cond]`."""
        t = torch.as_tensor(t, device=x_native.device)
        if t.ndim == 0:
            t = t.expand(x_native.shape[0])
        dtype = next(self.model.parameters()).dtype
        self.num_evals += 1
        if self.guidance_scale == 1.0:
            return self.model_output(x_native.to(dtype), t, cond).to(x_native.dtype)
        if uncond is None:
            raise ValueError("guidance_scale != 1 needs `uncond` (the unconditional model kwargs)")
        cond, uncond = flatten_kwargs(cond or {}), flatten_kwargs(uncond)
        both = {k: torch.cat([uncond[k], v]) if torch.is_tensor(v) else v for k, v in cond.items()}
        out = self.model_output(torch.cat([x_native, x_native]).to(dtype), torch.cat([t, t]), both)
        out_u, out_c = out.to(x_native.dtype).chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)  # linear in D for every parameterisation

    def set_timesteps_kwargs(self, num_inference_steps: int, scheduler_config: Mapping[str, Any]) -> dict:
        """What a diffusers pipeline passes to its scheduler's `set_timesteps` besides the step count: `mu` for
        flow schedulers with `use_dynamic_shifting` (SD3's pipeline)."""
        return {"mu": self.schedule.config.get("mu")} if scheduler_config.get("use_dynamic_shifting") else {}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict] = None,
                uncond: Optional[dict] = None) -> torch.Tensor:
        """D(x; σ) in σ-space. `sigma` is a scalar or one value per batch element."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        x_native = x * _bcast(self.schedule.native_scale(sigma), x)
        t = self.schedule.sigma_to_t(sigma).to(x.dtype)
        return self.schedule.denoised(self.native_output(x_native, t, cond, uncond), x, sigma)
