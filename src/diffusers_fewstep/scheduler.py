"""`LearnedScheduleScheduler`: a diffusers scheduler that samples on learned σ tables (DESIGN.md §5).

The sample stays in the model's native scale, like `DDIMScheduler` for VP models and
`FlowMatchEulerDiscreteScheduler` for flow models (`init_noise_sigma = 1`, `scale_model_input` is the
identity), so it drops into any pipeline. Each step converts to σ-space, applies the shared solver step
of :mod:`diffusers_fewstep.solvers`, and converts back.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .adapter import SIGMA_MAX_CAP, NoiseSchedule, config_family
from .schedules import interpolate_sigmas, validate_sigmas
from .solvers import canonical_solver
from .solvers import step as solver_step

logger = logging.getLogger(__name__)


@dataclass
class LearnedScheduleSchedulerOutput(BaseOutput):
    """Output of `LearnedScheduleScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next σ, in the model's native scale.
        pred_original_sample (`torch.Tensor`): the denoised estimate D(x; σ_i).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _step_count(key, name: str) -> int:
    """The step count that a config key (`4` or `"4"`) names; raise if it names none."""
    text = str(key).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} key {key!r} is not a step count (keys are numbers of model evaluations, e.g. '4')")
    return int(text)


def _checked_tables(sigma_tables: Mapping, schedule: NoiseSchedule) -> Dict[str, List[float]]:
    """The `sigma_tables` config entry validated against the model's σ range, as plain JSON ({"<nfe>": [σ…]})."""
    checked = {}
    for key, table in sigma_tables.items():
        nfe = _step_count(key, "σ table")
        values = validate_sigmas(table, schedule.sigma_min, schedule.sigma_max, name=f"σ table for {nfe} steps")
        if len(values) - 1 != nfe:
            raise ValueError(f"σ table for {nfe} steps has {len(values)} entries; a table for N steps has N+1")
        checked[nfe] = values
    return {str(nfe): checked[nfe] for nfe in sorted(checked)}


def _checked_solvers(solvers: Mapping, nfes: Sequence[int]) -> Dict[str, str]:
    """The `solvers` config entry validated against the table step counts `nfes`, as plain JSON ({"<nfe>": name})."""
    checked = {}
    for key, name in solvers.items():
        nfe = _step_count(key, "solvers")
        if nfe not in nfes:
            raise ValueError(f"solvers lists {name!r} for {nfe} steps but there is no {nfe}-step σ table; tables exist "
                             f"for {sorted(nfes)}; drop the entry or add the table")
        try:
            canonical_solver(name)
        except ValueError as err:
            raise ValueError(f"solvers[{str(nfe)!r}]: {err}") from None
        checked[nfe] = name
    return {str(nfe): checked[nfe] for nfe in sorted(checked)}


class LearnedScheduleScheduler(SchedulerMixin, ConfigMixin):
    """Few-step sampling on σ tables learned for one model and one solver
    ("Optimizing Few-Step Sampler for Diffusion Probabilistic Model", [arXiv 2412.10786](https://arxiv.org/abs/2412.10786)).

    Args:
        num_train_timesteps (`int`, defaults to 1000): training timesteps of the base model.
        beta_start (`float`, defaults to 0.0001): VP models: first β.
        beta_end (`float`, defaults to 0.02): VP models: last β.
        beta_schedule (`str`, defaults to `"linear"`): VP models: `linear`, `scaled_linear` or `squaredcos_cap_v2`.
        trained_betas (`list[float]`, *optional*): VP models: explicit β's.
        prediction_type (`str`, *optional*): `epsilon`, `v_prediction` or `sample` (VP), `flow` (flow matching);
            defaults to `epsilon` for VP and `flow` for flow models.
        rescale_betas_zero_snr (`bool`, defaults to `False`): VP models: zero terminal SNR (σ_max capped at 4096).
        family (`str`, defaults to `"vp"`): `vp` (discrete `alphas_cumprod`) or `flow` (flow matching); set
            automatically by `from_config` from a flow-matching scheduler's config.
        shift (`float`, defaults to 1.0): flow models: the timestep shift of the base scheduler.
        sigma_tables (`dict[str, list[float]]`, *optional*): `{"<nfe>": [σ_0, …, σ_nfe]}` in σ-space
            (`x = x0 + σ·ε`); σ_nfe may be 0.
        solver (`str`, defaults to `"euler"`): the solver the tables were learned for: `euler` (≡ DDIM),
            `dpmpp_2m`, `unipc` or `ipndm`; with `solvers`, the solver for step counts it does not list.
        solvers (`dict[str, str]`, *optional*): `{"<nfe>": solver}`, the solver each table was learned for where it
            differs by step count; `set_timesteps` picks the run's solver (see `active_solver`).
        allow_interpolation (`bool`, defaults to `False`): for a step count without a table, resample the nearest
            table in log σ (a labelled fallback) instead of raising.
        provenance (`dict`, *optional*): where the tables came from (base model, objective, metrics).
        use_flow_sigmas (`bool`, *optional*): tells Flux-family pipelines (`FluxPipeline`, Flux 2, …) not to pass
            their own `sigmas` (the convention of `DPMSolverMultistepScheduler(use_flow_sigmas=True)`), so that the
            learned tables are used. Defaults to `True` for flow-matching tables, `False` otherwise.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: Optional[str] = None,
        rescale_betas_zero_snr: bool = False,
        family: str = "vp",
        shift: float = 1.0,
        sigma_tables: Optional[Dict[str, List[float]]] = None,
        solver: str = "euler",
        solvers: Optional[Dict[str, str]] = None,
        allow_interpolation: bool = False,
        provenance: Optional[Dict[str, Any]] = None,
        use_flow_sigmas: Optional[bool] = None,
    ):
        self.noise_schedule = NoiseSchedule(self.config)
        self._active_solver = canonical_solver(solver)
        # plain JSON: string keys in step order, lists of floats
        self.register_to_config(sigma_tables=_checked_tables(sigma_tables or {}, self.noise_schedule))
        if solvers is not None:
            self.register_to_config(solvers=_checked_solvers(solvers, self.available_nfes))
        if use_flow_sigmas is None:
            self.register_to_config(use_flow_sigmas=family == "flow")
        self._expose_noise_schedule()
        self.init_noise_sigma = 1.0
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self.table_source = None
        self._step_index = None
        self._begin_index = None
        self._state = None

    @classmethod
    def from_folder(cls, folder: str) -> "LearnedScheduleScheduler":
        """The scheduler saved in a local run folder (`folder/scheduler/`, as `optimize` and the training script write
        it) or in a scheduler folder itself."""
        sub = "scheduler" if os.path.isdir(os.path.join(folder, "scheduler")) else None
        return cls.from_pretrained(folder, subfolder=sub, local_files_only=True)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Like `ConfigMixin.from_config`, but recognises flow-matching configs (sets `family="flow"`; a VP config
        leaves `family` at its default, so a round trip through a compatible scheduler keeps the config)."""
        if isinstance(config, dict) and "family" not in kwargs and "family" not in config:
            if config_family(config) == "flow":
                kwargs["family"] = "flow"
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _expose_noise_schedule(self):
        """The attributes diffusers' schedulers expose, derived from the one noise schedule sampled with: VP `betas`,
        `alphas`, `alphas_cumprod` as `DDPMScheduler` (read by `training_utils.compute_snr`; ᾱ_T = 2⁻²⁴ with zero
        terminal SNR, as `EulerDiscreteScheduler`); flow `sigma_min`, `sigma_max` as `FlowMatchEulerDiscreteScheduler`
        (s ∈ (0, 1]; σ_max is capped, so `sigma_max` = 4096/4097)."""
        train_sigmas = self.noise_schedule.train_sigmas
        if self.noise_schedule.family == "flow":
            s = train_sigmas / (1 + train_sigmas)
            self.sigma_min, self.sigma_max = float(s[0]), float(s[-1])
            return
        alphas_cumprod = (1 + train_sigmas**2).reciprocal()
        alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
        self.alphas_cumprod, self.alphas, self.betas = alphas_cumprod.float(), alphas.float(), (1 - alphas).float()

    # --- bookkeeping ----------------------------------------------------------------------
    @property
    def available_nfes(self) -> List[int]:
        return [int(k) for k in self.config.sigma_tables]

    @property
    def active_solver(self) -> str:
        """The solver `step` uses: chosen by `set_timesteps` from `solvers` for the run's table, else `solver`."""
        return self._active_solver

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Index of the first step to run (img2img pipelines start part-way down the table)."""
        self._begin_index = begin_index

    def __len__(self):
        return self.config.num_train_timesteps

    def check_compatible(self, scheduler_config) -> None:
        """Raise `ValueError` if `scheduler_config` (a pipeline's scheduler config) describes another model
        family, prediction type or noise schedule than the one these tables were learned for."""
        mine = self.noise_schedule.describe()
        theirs = NoiseSchedule(scheduler_config).describe()
        diffs = [f"{k}: tables learned for {mine[k]!r}, pipeline has {theirs[k]!r}" for k in mine
                 if (abs(mine[k] - theirs[k]) > 1e-3 * abs(mine[k]) if isinstance(mine[k], float) else mine[k] != theirs[k])]
        if diffs:
            raise ValueError("these σ tables were learned for a different model: " + "; ".join(diffs))

    # --- tables -----------------------------------------------------------------------------
    def _table_nfe(self, num_inference_steps: int) -> int:
        """The step count of the table a run of `num_inference_steps` uses: its own, or with `allow_interpolation`
        the nearest one."""
        if num_inference_steps in self.available_nfes:
            return num_inference_steps
        if not self.available_nfes:
            raise ValueError("this scheduler holds no σ tables; learn some with `diffusers-fewstep optimize` "
                             "or pass `sigmas=`")
        if not self.config.allow_interpolation:
            raise ValueError(
                f"no σ table for {num_inference_steps} steps; tables exist for {self.available_nfes}; "
                "pass allow_interpolation=True (log-σ fallback) or learn one with `diffusers-fewstep optimize`")
        return min(self.available_nfes, key=lambda n: (abs(n - num_inference_steps), -n))

    def table_for(self, num_inference_steps: int) -> List[float]:
        """The σ table for a step count (or, with `allow_interpolation`, the labelled log-σ fallback)."""
        nfe = self._table_nfe(num_inference_steps)
        table = self.config.sigma_tables[str(nfe)]
        if nfe == num_inference_steps:
            self.table_source = f"learned ({nfe} steps)"
            return table
        self.table_source = f"interpolated in log σ from the {nfe}-step table"
        logger.warning("no σ table for %d steps: %s (fallback, not learned)", num_inference_steps, self.table_source)
        return interpolate_sigmas(table, num_inference_steps).tolist()

    def solver_for(self, num_inference_steps: int) -> str:
        """The solver for a run of that many steps: `solvers`' entry for the table used, else `solver`."""
        nfe = self._table_nfe(num_inference_steps)
        return canonical_solver((self.config.solvers or {}).get(str(nfe), self.config.solver))

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device] = None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
        mu: Optional[float] = None,
    ):
        """Select the σ table and the solver (`active_solver`) for this run.

        Args:
            num_inference_steps (`int`, *optional*): picks the learned table for that many model evaluations.
            device (`str` or `torch.device`, *optional*): where `timesteps` and `sigmas` live.
            timesteps (`list[float]`, *optional*): explicit model timesteps (one per evaluation); the last step goes to σ=0.
            sigmas (`list[float]`, *optional*): explicit σ's in the base scheduler's convention (VP: σ-space σ as
                `EulerDiscreteScheduler`; flow: s ∈ (0, 1] as `FlowMatchEulerDiscreteScheduler`), one per evaluation,
                used as given (no shift); a final 0 is appended unless present. Explicit `timesteps` or `sigmas` run
                with `solver`.
            mu (`float`, *optional*): accepted for flow pipelines with dynamic shifting and ignored (tables are fixed).
        """
        if sum(a is not None for a in (timesteps, sigmas)) > 1:
            raise ValueError("pass only one of `timesteps` or `sigmas`")
        schedule = self.noise_schedule
        solver = self.config.solver
        if sigmas is not None:
            values = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
            if schedule.family == "flow":
                values = values.clamp(max=SIGMA_MAX_CAP / (1 + SIGMA_MAX_CAP))
                values = values / (1 - values)
            table = values.tolist() + ([] if float(values[-1]) == 0 else [0.0])
            self.table_source = "sigmas passed to set_timesteps"
        elif timesteps is not None:
            table = schedule.t_to_sigma(torch.as_tensor(np.asarray(timesteps, dtype=np.float64))).tolist() + [0.0]
            self.table_source = "timesteps passed to set_timesteps"
        elif num_inference_steps is not None:
            table = self.table_for(int(num_inference_steps))
            solver = self.solver_for(int(num_inference_steps))
        else:
            raise ValueError("pass `num_inference_steps`, `timesteps` or `sigmas`")
        table = validate_sigmas(table, schedule.sigma_min, schedule.sigma_max, name="σ table")
        dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
        self.sigmas = torch.tensor(table, dtype=dtype, device=device)
        self.timesteps = schedule.sigma_to_t(self.sigmas[:-1]).to(torch.float32)
        self.num_inference_steps = len(table) - 1
        self._active_solver = canonical_solver(solver)
        self._step_index = None
        self._begin_index = None
        self._state = None

    # --- stepping ---------------------------------------------------------------------------
    def index_for_timestep(self, timestep) -> int:
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=self.timesteps.device)
        hits = (self.timesteps - timestep).abs() < 1e-3
        if not hits.any():
            raise ValueError(f"timestep {float(timestep):.4f} is not in this run's timesteps {self.timesteps.tolist()}")
        return int(hits.nonzero()[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the sample is kept in the model's native scale."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        **kwargs,
    ) -> Union[LearnedScheduleSchedulerOutput, tuple]:
        """Advance `sample` (native scale, at the current σ) by one solver step.

        Args:
            model_output (`torch.Tensor`): the model's direct output (ε, v, x0 or flow velocity).
            timestep (`float` or `torch.Tensor`): the current timestep (from `self.timesteps`).
            sample (`torch.Tensor`): the current sample in the model's native scale.
            generator (`torch.Generator`, *optional*): unused (deterministic ODE solvers); kept for pipelines.
            return_dict (`bool`, defaults to `True`): return a `LearnedScheduleSchedulerOutput` or a tuple.
        """
        if self.sigmas is None:
            raise ValueError("call `set_timesteps` before `step`")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"step {i + 1} requested but this run has {self.num_inference_steps} steps")
        schedule = self.noise_schedule
        sigmas = self.sigmas.to(sample.device)
        # 1. native → σ-space (float32 at least, as diffusers' schedulers upcast)
        work = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(work) / schedule.native_scale(sigmas[i]).to(work)
        denoised = schedule.denoised(model_output.to(work), x, sigmas[i])
        # 2. the shared solver step in σ-space
        x_next, self._state = solver_step(self._active_solver, x, denoised, sigmas, i, self._state)
        # 3. back to the native scale
        prev_sample = (x_next * schedule.native_scale(sigmas[i + 1]).to(work)).to(sample.dtype)
        self._step_index += 1
        denoised = denoised.to(sample.dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return LearnedScheduleSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process at `timesteps`, native scale: a(σ)·(x0 + σ·ε)."""
        sigma = self.noise_schedule.t_to_sigma(torch.as_tensor(timesteps).cpu()).to(original_samples.device)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1))) if sigma.ndim else sigma
        scale = self.noise_schedule.native_scale(sigma)
        return (scale * (original_samples.double() + sigma * noise.double())).to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching pipelines' name for :meth:`add_noise` (SD3 img2img)."""
        return self.add_noise(sample, noise, timestep)
