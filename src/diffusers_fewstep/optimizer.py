"""Phase 1: learn a model's σ tables and keep, per step count, the best table (DESIGN.md §3, docs/method.md).

    result = optimize_schedule(denoiser, nfes=[4, 6])     # solver="auto": solver and table per step count
    result.save("out", base_scheduler_config)             # out/scheduler/, out/schedule.png, out/optimize_log.json

Per step count N:

1. candidates: the stock tables at N steps (diffusers' own schedulers' σ's and the hand-made baselines,
   :func:`~diffusers_fewstep.schedules.stock_tables`) with every solver asked for, plus `init` and `existing`, and
   the table kept at each smaller count resampled to N steps (log-linear, as AYS extends its tables; step counts
   run in increasing order);
2. each is scored on held-out noises against their reference solutions (:mod:`~diffusers_fewstep.selection`);
3. the `starts` best are learned further: first the end search lowers each one's last positive σ while the held-out
   measure improves (tables that stop at t = T/N end far above σ_min), then Adam through the solver on the training
   paths, both ends of the table fixed (:class:`~diffusers_fewstep.learning.MonotoneSigmas`,
   :mod:`~diffusers_fewstep.learning`), and scored too;
4. the best by `select_by` is kept, so the result is never worse, on that held-out measure, than any
   stock table of the solvers asked for.

The bound objectives (`bound_propagated`, `bound`) learn one table from `init` instead (gradient descent,
or the gradient-free `fixed_point` iteration on the bound's stationarity condition).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import evaluation, learning, objectives, reference
from .learning import MonotoneSigmas  # noqa: F401  (part of this module's API)
from .schedules import baseline_sigmas, interpolate_sigmas, stock_tables, validate_sigmas
from .selection import Candidate, Paths, best, check_measure, score
from .solvers import SOLVERS, canonical_solver

logger = logging.getLogger(__name__)

OBJECTIVES = ("trajectory", "bound_propagated", "bound")
METHODS = ("adam", "fixed_point")
END_STEP = 0.7  # the end search lowers the last positive σ by this factor per try


# --- result ---------------------------------------------------------------------------------
@dataclass
class ScheduleResult:
    """What :func:`optimize_schedule` learned and kept.

    Attributes:
        tables (`dict[int, list[float]]`): `{nfe: [σ_0, …, σ_nfe]}`, plain floats: the kept table per NFE.
        solvers (`dict[int, str]`): the solver each kept table is for.
        candidates (`dict[int, list[dict]]`): every candidate per NFE with its held-out scores (`Candidate.to_dict`);
            the kept one has `"kept": True`.
        history (`dict[int, dict[str, list[float]]]`): the training objective per iteration of each learned
            start (`fixed_point`: the largest relative stationarity residual).
        seconds (`dict[int, float]`): wall time per NFE (scoring and learning).
        num_evals (`dict[int, int]`): batched model calls per NFE (backward passes not counted).
        settings (`dict`): every setting of the run (JSON-able).
        shared (`dict`): the cost shared by all NFEs (reference solves): `seconds`, `num_evals`.
    """

    tables: Dict[int, List[float]]
    solvers: Dict[int, str]
    candidates: Dict[int, List[dict]]
    history: Dict[int, Dict[str, List[float]]]
    seconds: Dict[int, float]
    num_evals: Dict[int, int]
    settings: Dict[str, Any]
    shared: Dict[str, Any] = field(default_factory=dict)

    @property
    def solver(self) -> str:
        """The default solver of the scheduler: the one most step counts kept."""
        counts = {s: list(self.solvers.values()).count(s) for s in self.solvers.values()}
        return max(sorted(counts), key=counts.get) if counts else canonical_solver("euler")

    def nfe_record(self, nfe: int) -> dict:
        """Provenance of one step count: the kept candidate and every candidate's held-out scores."""
        kept = next(c for c in self.candidates[nfe] if c.get("kept"))
        return {"solver": self.solvers[nfe], "kept": kept["name"], "source": kept["source"],
                "select_by": self.settings["select_by"], "seconds": round(self.seconds[nfe], 2),
                "candidates": [{k: c[k] for k in ("name", "solver", "source", "scores")} for c in self.candidates[nfe]]}

    def provenance(self, base_model: Optional[str] = None) -> dict:
        prov = {"tool": "diffusers-fewstep optimize", "objective": self.settings["objective"],
                "loss": self.settings["loss"], "select_by": self.settings["select_by"],
                "per_nfe": {str(n): self.nfe_record(n) for n in self.tables}, "settings": self.settings}
        if self.settings.get("model_class"):
            prov["model_class"] = self.settings["model_class"]  # bundles are refused for another architecture
        if base_model is not None:
            prov["base_model"] = base_model
        return prov

    def to_scheduler(self, base_scheduler_config, provenance: Optional[dict] = None):
        """A :class:`~diffusers_fewstep.LearnedScheduleScheduler` holding the kept tables and their solvers."""
        from .outputs import _build_scheduler

        return _build_scheduler(base_scheduler_config, self.tables, self.solvers, self.solver,
                                provenance if provenance is not None else self.provenance())

    def log(self, base_model: Optional[str] = None) -> dict:
        """Everything of the run as plain JSON (`optimize_log.json`)."""
        keyed = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731
        return {"base_model": base_model, "tables": keyed(self.tables), "solvers": keyed(self.solvers),
                "candidates": keyed(self.candidates), "history": keyed(self.history), "seconds": keyed(self.seconds),
                "num_evals": keyed(self.num_evals), "shared": self.shared, "settings": self.settings}

    def save(self, output_dir: str, base_scheduler_config, base_model: Optional[str] = None) -> str:
        """Write `output_dir/scheduler/`, `schedule.png`, `optimize_log.json` (each write atomic) and `README.md`. The
        `optimize` CLI adds its tables to those already in the folder instead (:mod:`~diffusers_fewstep.optimize_cli`)."""
        from .model_card import save_optimize_card
        from .outputs import atomic_write_json, write_scheduler
        from .plotting import plot_schedule_comparison

        prov = self.provenance(base_model)
        scheduler = write_scheduler(output_dir, base_scheduler_config, self.tables, self.solvers, self.solver, prov)
        plot_schedule_comparison(self.tables, scheduler.noise_schedule, os.path.join(output_dir, "schedule.png"),
                                 title=f"kept tables · {self.settings['loss']} loss · {self.settings['select_by']}")
        atomic_write_json(os.path.join(output_dir, "optimize_log.json"), self.log(base_model))
        save_optimize_card(output_dir, dict(scheduler.config))
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

    def native_output(self, x_native, t, **extra):
        """The model's native output at a diffusers timestep (the pipeline reference's loop), counted."""
        self.calls += 1
        return self.denoiser.native_output(x_native, t, **extra)

    def set_timesteps_kwargs(self, num_inference_steps, scheduler_config):
        return self.denoiser.set_timesteps_kwargs(num_inference_steps, scheduler_config)

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(lambda x_, s_: self._call(x_, s_, extra), x, sigma, use_reentrant=False)
        return self._call(x, sigma, extra)


def _init_tables(init, nfe: int, schedule) -> Optional[List[float]]:
    """`init` at `nfe` steps: a baseline name, a table, or `{nfe: table}` (None when it has no such entry)."""
    if init is None:
        return None
    if isinstance(init, str):
        return baseline_sigmas(init, nfe, schedule).tolist()
    if isinstance(init, dict):
        init = init.get(nfe, init.get(str(nfe)))
        return None if init is None else [float(s) for s in init]
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


# --- the API --------------------------------------------------------------------------------
def optimize_schedule(denoiser: Callable, nfes: Union[int, Sequence[int]] = (4, 6), solver: str = "auto",
                      objective: str = "trajectory", loss: str = "feature", select_by: str = "fd_self",
                      starts: int = 2, free_last: bool = False, method: str = "adam", num_iters: int = 60,
                      batch_size: int = 64, lr: float = 0.05, validation_size: int = 512,
                      pool_size: Optional[int] = None, data: Optional[torch.Tensor] = None,
                      cond: Optional[dict] = None, uncond: Optional[dict] = None,
                      sample_shape: Optional[Sequence[int]] = None, init: Union[None, str, dict, Sequence[float]] = None,
                      existing: Optional[Dict[int, tuple]] = None, reference_steps: Optional[int] = None,
                      reference_scheduler: Any = "ode", seed: int = 0,
                      device: Optional[Union[str, torch.device]] = None, progress: bool = True,
                      patience: Optional[int] = 30, mixed_precision: Optional[str] = None,
                      gradient_checkpointing: bool = False, sigma_data: float = 0.5, strata: int = 1,
                      damping: float = 0.5, tol: float = 1e-3, reference_denoiser: Optional[Callable] = None,
                      decode: Optional[Callable] = None,
                      on_table: Optional[Callable[[int, "ScheduleResult"], None]] = None) -> ScheduleResult:
    """Learn and select one σ table (and solver) per step count for `denoiser` (Phase 1, DESIGN.md §3).

    Args:
        denoiser (`Callable`): `D(x, sigma, cond=None, uncond=None)` in σ-space with a `.schedule`
            (:class:`~diffusers_fewstep.NoiseSchedule`), e.g. :class:`~diffusers_fewstep.SigmaDenoiser`.
        nfes (`int` or `list[int]`, *optional*, defaults to `(4, 6)`): step counts (model evaluations).
        solver (`str`, *optional*, defaults to `"auto"`): `auto` (every solver competes per step count) or one
            of `euler` (≡ DDIM), `dpmpp_2m`, `unipc`, `ipndm`.
        objective (`str`, *optional*, defaults to `"trajectory"`): `trajectory` (the endpoint `loss` against a
            `reference_steps` reference solve, back-propagated through the solver), or the first-order bound
            (`bound_propagated`; `bound`, the literal and degenerate one), learned from `init` (default
            `ddim_trailing`) with the first-order solver.
        loss (`str`, *optional*, defaults to `"feature"`): the trajectory objective's endpoint loss: `feature`
            (the model's own features, :mod:`~diffusers_fewstep.features`), `l2` or `pseudo_huber`.
        select_by (`str`, *optional*, defaults to `"fd_self"`): the held-out measure that picks the kept table
            (:data:`~diffusers_fewstep.selection.MEASURES`: `fd_self`, `feature`, `rmse`, or `fd_data`, which
            needs `data`).
        starts (`int`, *optional*, defaults to 2): how many of the best-scoring candidates are learned further.
        free_last (`bool`, *optional*, defaults to `False`): also learn the last positive σ (tables ending in 0);
            by default both ends of each start table stay fixed.
        method (`str`, *optional*, defaults to `"adam"`): bound objectives: `adam` or `fixed_point`.
        num_iters (`int`, *optional*, defaults to 60): iterations per learned table (an upper limit with `patience`).
        batch_size (`int`, *optional*, defaults to 64): paths per iteration (and per scoring/reference batch ×4).
        lr (`float`, *optional*, defaults to 0.05): Adam learning rate on the logits, cosine-decayed to lr/10.
        validation_size (`int`, *optional*, defaults to 512): held-out noises (seed + 1) that score every
            candidate; 0 skips scoring and returns the table learned from `init` (with `solver`, not `auto`).
        pool_size (`int`, *optional*): training paths shared by all NFEs; defaults to `min(8·batch_size, 1024)`.
        data (`torch.Tensor`, *optional*): clean samples `(n, *sample_shape)`: x0 for the bound (default: the model's
            own samples) and, with the feature measures and no `cond`, the reference set of the held-out `fd_data`
            (scored for every candidate; it keeps the table only with `select_by="fd_data"`). The trajectory
            objective does not use them.
        cond, uncond (`dict`, *optional*): model keyword arguments passed to the denoiser (`cond`, and
            `uncond` for guidance); tensors with one row are broadcast, others are cycled over the paths.
        sample_shape (`tuple`, *optional*): shape of one sample (read from the model config when not given).
        init (`str`, `dict` or `list`, *optional*): one more candidate (a baseline name, a table or
            `{nfe: table}`), e.g. the previous round's tables; the start of the bound objectives.
        existing (`dict[int, tuple]`, *optional*): `{nfe: (table, solver)}` already saved in the output folder:
            candidates too, so a table is replaced only by a better one.
        reference_steps (`int`, *optional*): steps of the reference; defaults to 200 (`ode`) or 50 (`pipeline`).
        reference_scheduler (`str` or `SchedulerMixin`, *optional*, defaults to `"ode"`): what the targets and the
            held-out scores compare the few-step samples with, from the same native noises: `ode` (the
            DPM-Solver++(2M) solve of the probability-flow ODE, :func:`~diffusers_fewstep.reference.solve`) or
            `pipeline` (the image the pipeline makes by default: the diffusers scheduler its scheduler config names,
            driven as diffusers' pipelines drive it, :func:`~diffusers_fewstep.reference.solve_pipeline`); a
            diffusers scheduler instance (e.g. `pipe.scheduler`) is driven as `pipeline`.
        seed (`int`, *optional*, defaults to 0): seeds every random draw (results are deterministic).
        device (`str`, *optional*): where to run; defaults to the denoiser's device.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.
        patience (`int`, *optional*, defaults to 30): stop a table after this many iterations without a 0.1%
            improvement of the smoothed (EMA 0.9) objective; `None` disables early stopping.
        mixed_precision (`str`, *optional*): `"no"`, `"bf16"` or `"fp16"` autocast of the model calls (default
            bf16 on CUDA, off on CPU).
        gradient_checkpointing (`bool`, *optional*, defaults to `False`): recompute each model call in backward.
        sigma_data, strata, damping, tol: the bound's σ_d, Monte-Carlo strata, and the fixed point's damping
            and tolerance.
        reference_denoiser (`Callable`, *optional*): the model whose reference solves are the targets (after
            Phase 2: the frozen teacher); defaults to `denoiser`.
        decode (`Callable`, *optional*): native latents → images (a latent pipeline's VAE,
            `TextToImage.decode`); the held-out `rmse` then compares decoded images.
        on_table (`Callable`, *optional*): called as `on_table(nfe, result_so_far)` after each step count (e.g.
            to save it at once).

    Returns:
        :class:`ScheduleResult`
    """
    # 1. settings
    solver_list = list(SOLVERS) if solver == "auto" else [canonical_solver(solver)]
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if method == "fixed_point" and objective == "trajectory":
        raise ValueError("method='fixed_point' solves the bound's stationarity condition; use "
                         "objective='bound_propagated' (or 'bound'), or method='adam' for 'trajectory'")
    if loss not in objectives.LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(objectives.LOSSES)}")
    check_measure(select_by, has_data=data is not None, conditional=cond is not None)
    if not validation_size and solver == "auto":
        raise ValueError("solver='auto' picks the solver on held-out noises; give validation_size > 0 or a solver")
    nfes = [int(nfes)] if isinstance(nfes, int) else [int(n) for n in nfes]
    if not nfes or min(nfes) < 1:
        raise ValueError(f"nfes must be positive step counts, got {nfes}")
    if device is None:
        params = list(denoiser.parameters()) if isinstance(denoiser, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    schedule = denoiser.schedule
    sample_shape = tuple(sample_shape) if sample_shape is not None else evaluation.sample_shape(denoiser)
    if data is not None and tuple(data.shape[1:]) != sample_shape:
        raise ValueError(f"data images have shape {tuple(data.shape[1:])}; the model's samples have {sample_shape}")
    truth = reference.choose(reference_scheduler, reference_denoiser or denoiser, reference_steps)
    pool_size = pool_size or max(batch_size, min(8 * batch_size, 1024))
    model_fn = _CountingDenoiser(denoiser, _resolve_precision(mixed_precision, device), device.type,
                                 gradient_checkpointing)
    full_fn = _CountingDenoiser(reference_denoiser or denoiser)
    needs_features = loss == "feature" or (validation_size and select_by != "rmse")
    features = _features(denoiser, model_fn.autocast_dtype) if needs_features else None
    settings = {"nfes": nfes, "solver": solver, "objective": objective, "loss": loss, "select_by": select_by,
                "starts": starts, "free_last": free_last, "method": method, "num_iters": num_iters,
                "batch_size": batch_size, "lr": lr, "validation_size": validation_size, "pool_size": pool_size,
                "init": init if isinstance(init, str) or init is None else "custom",
                **truth.settings(), "seed": seed,
                "patience": patience, "mixed_precision": str(model_fn.autocast_dtype or "no"),
                "gradient_checkpointing": gradient_checkpointing, "sigma_data": sigma_data, "strata": strata,
                "damping": damping, "tol": tol, "sample_shape": list(sample_shape), "device": str(device),
                "x0_source": "none" if objective == "trajectory" else ("data" if data is not None else "model"),
                "noise_schedule": schedule.describe(), "model_class": type(getattr(denoiser, "model", denoiser)).__name__,
                "reference_model": "teacher" if reference_denoiser is not None else "self", "fd_data_images": 0,
                "rmse_of": "decoded images" if decode is not None else "samples"}

    with _frozen(denoiser):  # gradients flow to the table only; the model's flags are restored after
        # 2. the paths: training pool and held-out set, with their reference solves
        start_time = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        pool = Paths(pool_size, sample_shape, device, generator, cond, uncond)
        if objective == "trajectory" or data is None:
            pool.solve_references(full_fn, truth, batch_size, progress)
        if objective != "trajectory":
            pick = torch.randint(0, len(data), (pool_size,), generator=generator) if data is not None else None
            pool.x0 = pool.reference if data is None else data[pick].to(device=device, dtype=torch.float32)
        held_out = None
        if validation_size:
            held_out = Paths(validation_size, sample_shape, device, torch.Generator().manual_seed(seed + 1), cond, uncond)
            held_out.solve_references(full_fn, truth, 4 * batch_size, progress)
            if decode is not None:
                held_out.decode_references(decode)
            if features is not None:
                held_out.featurize_references(features, 4 * batch_size)
            if features is not None and data is not None and cond is None:  # fd_data, its own draws
                held_out.featurize_data(features, data, 4 * batch_size, torch.Generator().manual_seed(seed + 2))
                settings["fd_data_images"] = len(held_out.data_features)
        shared = {"seconds": time.perf_counter() - start_time, "num_evals": full_fn.calls}
        run = learning.Run(model_fn, pool, schedule, features, settings, generator, progress)
        result = ScheduleResult({}, {}, {}, {}, {}, {}, settings, shared)

        # 3. one kept table per NFE
        for nfe in sorted(nfes):
            start_time, calls = time.perf_counter(), model_fn.calls
            smaller = {n: (result.tables[n], result.solvers[n]) for n in result.tables if n < nfe}
            candidates, history = _candidates_for(nfe, run, solver_list, init, existing, held_out, smaller)
            chosen = best(candidates, select_by) if held_out is not None else candidates[-1]
            result.tables[nfe] = validate_sigmas(chosen.table, schedule.sigma_min, schedule.sigma_max,
                                                 name=f"kept {nfe}-step table")
            result.solvers[nfe] = chosen.solver
            result.candidates[nfe] = [dict(c.to_dict(), kept=c is chosen) for c in candidates]
            result.history[nfe] = history
            result.seconds[nfe] = time.perf_counter() - start_time
            result.num_evals[nfe] = model_fn.calls - calls
            if on_table is not None:
                on_table(nfe, result)
        return result


def _features(denoiser, autocast_dtype):
    from .features import ModelFeatures

    if not isinstance(getattr(denoiser, "model", None), nn.Module):
        raise ValueError("loss='feature' and select_by='feature'/'fd_self'/'fd_data' use the model's own features; "
                         "this denoiser has no diffusers model: pass loss='l2' and select_by='rmse'")
    return ModelFeatures(denoiser, autocast_dtype=autocast_dtype)


def _candidates_for(nfe, run: learning.Run, solver_list, init, existing, held_out, smaller) -> tuple:
    """Every candidate at `nfe` steps, scored on `held_out` (when given), the learned ones last; `smaller`:
    `{n: (table, solver)}` kept at smaller counts, resampled to `nfe` steps."""
    s, schedule = run.settings, run.schedule
    config = getattr(schedule, "config", None)
    tables = stock_tables(nfe, config) if config is not None else {
        name: baseline_sigmas(name, nfe, schedule).tolist() for name in ("ddim_trailing", "karras", "loguniform")}
    candidates = []  # the table already saved comes first: it wins ties
    if existing and nfe in existing:
        table, solver = existing[nfe]
        candidates.append(Candidate(f"existing+{solver}", canonical_solver(solver), list(table), "existing"))
    if held_out is not None:
        candidates += [Candidate(f"{name}+{solver}", solver, table, "stock")
                       for name, table in tables.items() for solver in solver_list]
        candidates += [Candidate(f"kept {n}-step+{solver}, resampled", solver, interpolate_sigmas(table, nfe).tolist(),
                                 "resampled") for n, (table, solver) in smaller.items() if n > 1]
    init_table = _init_tables(init, nfe, schedule)
    if init_table is not None:
        candidates += [Candidate(f"init+{solver}", solver, init_table, "init") for solver in solver_list]
    _score_all(candidates, run, held_out, nfe)
    history = {}
    if s["objective"] != "trajectory":
        table, history["bound"] = learning.learn_bound(run.stream(nfe), init_table or baseline_sigmas("ddim_trailing", nfe, schedule).tolist())
        learned = [Candidate(f"learned:{s['objective']}", "euler", table, "learned")]
    else:
        if held_out is None:
            first = init_table or baseline_sigmas("ddim_trailing", nfe, schedule).tolist()
            starts = [Candidate(f"init+{solver_list[0]}", solver_list[0], first, "init")]
        else:
            starts = []
            for start in sorted(candidates, key=lambda c: c.scores[s["select_by"]])[: s["starts"]]:
                lowered = _search_end(start, run, held_out)
                candidates += lowered
                starts.append(min([start] + lowered, key=lambda c: c.scores[s["select_by"]]))
        learned = []
        for i, start in enumerate(starts):
            table, history[start.name] = learning.learn_trajectory(run.stream(nfe, i), start)
            learned.append(Candidate(f"learned:{start.name}", start.solver, table, "learned", start=start.name))
    _score_all(learned, run, held_out, nfe)
    return candidates + learned, history


def _search_end(start: Candidate, run: learning.Run, held_out) -> List[Candidate]:
    """The end search (docs/method.md): `start` with its last positive σ lowered by `END_STEP` at a time, each
    scored on `held_out`, while the held-out measure improves and σ stays ≥ σ_min. Tables that stop at t = T/N
    (diffusers' leading and trailing spacings) end far above σ_min, and learning keeps that end fixed."""
    measure, tried, current = run.settings["select_by"], [], start
    while current.table[-1] == 0 and len(current.table) > 2:
        last = current.table[-2] * END_STEP
        if last < run.schedule.sigma_min:
            break
        lowered = Candidate(f"{start.name}, end {last:.3g}", start.solver, current.table[:-2] + [last, 0.0], "end",
                            start=start.name)
        _score(lowered, run, held_out)
        tried.append(lowered)
        if lowered.scores[measure] >= current.scores[measure]:
            break
        current = lowered
    return tried


def _score_all(candidates, run: learning.Run, held_out, nfe) -> None:
    if held_out is None:
        return
    for c in tqdm(candidates, desc=f"NFE {nfe} · scoring {len(candidates)} tables on held-out noises",
                  disable=not run.progress or not candidates):
        _score(c, run, held_out)


def _score(c: Candidate, run: learning.Run, held_out) -> None:
    c.scores = score(run.model_fn, held_out, c.table, c.solver, 4 * run.settings["batch_size"], run.features)
