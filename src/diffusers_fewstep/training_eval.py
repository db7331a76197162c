"""What the training script measures while it runs and at the end (docs/training.md, "Evaluation during training").

Fixed evaluation noises with the teacher's reference samples (:func:`eval_set`); the endpoint RMSE and FD of the
current model at every tuned count (:func:`record`, a row of `metrics.json`), with the RMSE on the model's own pool
trajectories and the warning when it fits its pool (:func:`pool_fit_warning`); and at the end the tuned model beside
the base model at every step count (:func:`compare_step_counts`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import SigmaDenoiser
from .evaluation import (REFERENCE_SOLVER, endpoint_rmse, extract_features, frechet_distance, generate,
                         load_fmnist_classifier, noise_bank, reference_sigmas, reference_statistics)
from .finetune import ema_weights
from .model_card import evaluation_name, kept_is_last, tuning_shortfall
from .reference import choose as choose_reference
from .schedules import baseline_sigmas

if TYPE_CHECKING:
    from .train import Conditioning

logger = logging.getLogger(__name__)


def trainable_by_name(model) -> Dict[str, torch.nn.Parameter]:
    """The trained parameters (all of full tuning; the adapter's under LoRA), by name, in the model's order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable(model) -> list:
    return list(trainable_by_name(model).values())


def batched(fn: Callable, noise: torch.Tensor, args, rows: Optional[Conditioning] = None) -> torch.Tensor:
    """`fn(chunk, extra_args)` over `noise` in batches of `--pool_batch_size`, clamped to [-1, 1] for images (not
    latents); sample k gets conditioning row `k % len(rows)`."""
    out = []
    for start in range(0, len(noise), args.pool_batch_size):
        chunk = noise[start: start + args.pool_batch_size]
        x = fn(chunk, None if rows is None else rows.rows(torch.arange(start, start + len(chunk))))
        out.append(x.clamp(-1, 1) if args.clamp_samples else x)
    return torch.cat(out)


def batched_samples(denoiser: SigmaDenoiser, noise: torch.Tensor, sigmas, solver: str, args,
                    rows: Optional[Conditioning] = None) -> torch.Tensor:
    """Few-step samples (`evaluation.generate`) from `noise`."""
    return batched(lambda chunk, extra: generate(denoiser, chunk, sigmas, solver, len(chunk), extra_args=extra,
                                                 clamp=False), noise, args, rows)


def eval_set(teacher: SigmaDenoiser, args, device, rows: Optional[Conditioning] = None) -> dict:
    """Fixed evaluation noises (the benchmark's bank), the teacher's reference samples (:func:`teacher_reference`) and,
    with `--fd_classifier`, the feature network and the reference statistics for FD."""
    noise = noise_bank(max(args.eval_samples, args.fd_samples if args.fd_classifier else 0), args.sample_shape,
                       device=device)
    truth = teacher_reference(teacher, args)
    reference = batched(lambda chunk, extra: truth(teacher, chunk, extra), noise[: args.eval_samples], args, rows)
    ev = {"noise": noise, "reference": reference, "rows": rows}
    if args.fd_classifier:
        ev["net"] = load_fmnist_classifier(args.fd_classifier, device)
        ev["stats"] = reference_statistics(ev["net"], args.fd_data, device)
    return ev


def scores(denoiser: SigmaDenoiser, sigmas, solver: str, ev: dict, args) -> Dict[str, float]:
    """Endpoint RMSE against the base model's reference solve (and FD) of samples from the evaluation noises."""
    samples = batched_samples(denoiser, ev["noise"], sigmas, solver, args, ev["rows"])
    out = {"rmse": round(endpoint_rmse(samples[: args.eval_samples], ev["reference"]), 5)}
    if "net" in ev:
        out["fd"] = round(frechet_distance(extract_features(ev["net"], samples), ev["stats"]), 4)
    return out


def teacher_reference(teacher: SigmaDenoiser, args):
    """The teacher's reference (`reference.choose`): `--reference_scheduler` at `--reference_steps`."""
    return choose_reference(args.reference_scheduler, teacher, args.reference_steps)


def pool_rmse(denoiser: SigmaDenoiser, pool: dict, sigmas, args, rows: Optional[Conditioning] = None) -> float:
    """Endpoint RMSE of the few-step samples (`evaluation.generate`) from the native noises behind the first
    `--eval_samples` pool trajectories against their teacher endpoints (the tables end where the teacher's states do)."""
    states = pool["states"][:, : args.eval_samples]
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=states.device)
    noise = states[0] * denoiser.schedule.native_scale(sigmas[:1].double()).to(states)  # x(σ_0) = ε / a(σ_0)
    extra = None if rows is None else rows.rows(pool["rows"][: args.eval_samples])
    samples = generate(denoiser, noise, sigmas, args.solver, len(noise), extra_args=extra, clamp=args.clamp_samples)
    reference = states[-1].float()
    return round(endpoint_rmse(samples, reference.clamp(-1, 1) if args.clamp_samples else reference), 5)


@contextlib.contextmanager
def eval_mode(*modules):
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def record(accelerator, state, phase: str, tuned: SigmaDenoiser, ev: Optional[dict], args,
            pools: Optional[dict] = None, rows: Optional[Conditioning] = None) -> None:
    """Endpoint RMSE (and FD) of the current model at every tuned count, appended to `state.metrics`, with the time
    so far and the Phase-2 throughput (`train.TrainState.throughput`). With the Phase-2 `pools`, also the same RMSE
    on trajectories the model trains on (`rmse_pool`): far below `rmse`, the model is fitting its pool, not the
    teacher (a larger `--pool_size` helps)."""
    if ev is None:
        return
    row = {"round": state.round, "phase": phase, "global_step": state.global_step,
           "elapsed_s": round(time.time() - args.start_time, 1),
           **state.throughput(args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes),
           **state.loss_summary()}
    with eval_mode(tuned.model):
        for n in args.nfe:
            row.update({f"{k}_nfe{n}": v for k, v in scores(tuned, state.tables[str(n)], args.solver, ev, args).items()})
            if pools is not None:
                row[f"rmse_pool_nfe{n}"] = pool_rmse(tuned, pools[n], state.tables[str(n)], args, rows)
    state.metrics.append(row)
    if args.keep_best and args.rounds > 0:
        keep_if_best(state, row, tuned.model, args)
    accelerator.log({k: v for k, v in row.items() if k.startswith(("rmse", "fd"))}, step=state.global_step)
    logger.info("round %d %s: %s", state.round, phase, row)
    warning = pool_fit_warning(row, args)
    if warning:
        logger.warning(warning)


BEST_WEIGHTS = "best_weights.safetensors"  # in the output folder: the weights of `TrainState.best`


def row_quality(row: dict, nfes) -> Tuple[str, float]:
    """The measure an evaluation row is ranked by (lower is better): FD summed over the tuned counts, or the endpoint
    RMSE where FD was not measured."""
    metric = "fd" if all(f"fd_nfe{n}" in row for n in nfes) else "rmse"
    return metric, float(sum(row[f"{metric}_nfe{n}"] for n in nfes))


def keep_if_best(state, row: dict, model: torch.nn.Module, args) -> None:
    """When `row` is as good as `state.best` or better (:func:`row_quality`; a tie goes to the later row, so an equal
    re-evaluation of the same weights and tables is the last one; a best of another measure, after a resume that
    changed `--fd_classifier`, does not count): the trained weights as evaluated (the EMA's) go to
    :data:`BEST_WEIGHTS` in the output folder, tagged with the row's step, and the row's step, phase, measure and tables
    to `state.best`."""
    metric, value = row_quality(row, args.nfe)
    if state.best and state.best["metric"] == metric and not value <= state.best["value"]:  # NaN: not kept
        return
    weights = {name: p.detach().contiguous().cpu() for name, p in trainable_by_name(model).items()}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, BEST_WEIGHTS)
    save_file(weights, f"{path}.tmp", metadata={"global_step": str(row["global_step"])})
    os.replace(f"{path}.tmp", path)  # whole or absent, should the run be killed while saving
    state.best = {"global_step": row["global_step"], "round": row["round"], "phase": row["phase"], "metric": metric,
                  "value": value, "tables": {k: list(v) for k, v in state.tables.items()}}


def _best_weights(path: str, step: int) -> Optional[dict]:
    """The tensors of :data:`BEST_WEIGHTS` if the file is there, readable and tagged with `step`, else None."""
    try:
        with safe_open(path, "pt") as f:
            if f.metadata().get("global_step") != str(step):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError):  # missing (a resume into another folder) or unreadable
        return None


def restore_best(args, state, model: torch.nn.Module, ema) -> None:
    """At the end, with `--keep_best`: the weights and tables of the best evaluation replace the last ones (in the
    EMA too) unless the last evaluation was the best. If the best weights cannot be read back (a resume into another
    output folder; a run killed after a better evaluation and before the checkpoint that knew of it), the last ones
    stay, `state.best` is cleared (so the card claims nothing) and the log says so; so it is under `--no-keep_best`
    (a resume of a run that kept one)."""
    if not args.keep_best:
        state.best = {}
    if kept_is_last(state.best, state.metrics):
        return
    last = state.metrics[-1]
    path = os.path.join(args.output_dir, BEST_WEIGHTS)
    best = _best_weights(path, state.best["global_step"])
    if best is None:
        logger.warning("%s does not hold the weights of %s; keeping the last weights and tables", path,
                       evaluation_name(state.best))
        state.best = {}
        return
    params = trainable_by_name(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(best[name])
        if ema is not None:  # its shadow parameters follow the same order
            for shadow, p in zip(ema.shadow_params, params.values()):
                shadow.copy_(p)
    state.tables = state.best["tables"]
    metric, value = row_quality(last, args.nfe)
    logger.warning("kept the weights and tables of %s%s (%s %.4g, the best), not of %s (%s %.4g); --no-keep_best keeps "
                   "the last", evaluation_name(state.best), " (the base model's)" if state.best["global_step"] == 0 else "",
                   metric, state.best["value"], evaluation_name(last), metric, value)


POOL_FIT_RATIO = 0.8  # RMSE on the pool below this fraction of the RMSE on fresh noises: the model fits its pool


def pool_fit_warning(row: dict, args) -> str:
    """A warning naming every tuned count whose RMSE on its pool's trajectories (`rmse_pool`) fell below
    :data:`POOL_FIT_RATIO` × its RMSE on fresh noises (on the fixture at 4 steps, FD stopped improving there:
    docs/results.md), with what builds a larger pool; "" when none did."""
    fitted = [n for n in args.nfe if row.get(f"rmse_pool_nfe{n}", float("inf")) < POOL_FIT_RATIO * row[f"rmse_nfe{n}"]]
    if not fitted:
        return ""
    found = "; ".join(f"{n} steps: RMSE {row[f'rmse_pool_nfe{n}']:.3g} on its trajectories against "
                      f"{row[f'rmse_nfe{n}']:.3g} on fresh noises" for n in fitted)
    cheaper = (f", or a cheaper teacher for the same time (--reference_steps, now {args.reference_steps})"
               if args.reference_scheduler == "ode" else "")
    return (f"Phase 2 is fitting its teacher pool ({found}); more steps may not help: raise --pool_size "
            f"(now {args.pool_size}){cheaper}")


def comparison_tables(args, tables: Dict[str, List[float]], schedule) -> List[Tuple[int, str, str, List[float]]]:
    """(steps, table name, solver, σ table) for the final comparison: the learned table of every tuned count,
    `--compare_table` at every `--compare_nfe` count, and (`--compare_reference`) the base model's reference solve."""
    rows = [(n, "learned", args.solver, tables[str(n)]) for n in sorted(set(args.nfe))]
    rows += [(n, args.compare_table, args.solver, baseline_sigmas(args.compare_table, n, schedule).tolist())
             for n in sorted(set(args.compare_nfe))]
    if args.compare_reference:
        rows.append((args.reference_steps, "reference", REFERENCE_SOLVER,
                     reference_sigmas(schedule, args.reference_steps).tolist()))
    return rows


def compare_step_counts(args, state, tuned: SigmaDenoiser, base: SigmaDenoiser, ema,
                        ev: dict) -> List[dict]:
    """The tuned model (EMA weights) next to the base model, each with the same table and solver, at every
    row of :func:`comparison_tables`: `{nfe, table, solver, tuned_count, tuned_rmse, base_rmse[, *_fd]}`."""
    rows = []
    with ema_weights(ema, trainable(tuned.model)), eval_mode(tuned.model, base.model):
        for n, name, solver, sigmas in comparison_tables(args, state.tables, tuned.schedule):
            row = {"nfe": n, "table": name, "solver": solver, "tuned_count": n in args.nfe}
            for who, denoiser in (("tuned", tuned), ("base", base)):
                row.update({f"{who}_{k}": v for k, v in scores(denoiser, sigmas, solver, ev, args).items()})
            logger.info("step counts: %s", row)
            rows.append(row)
    shortfall = tuning_shortfall(rows)
    if shortfall:
        logger.warning(shortfall.replace("**", ""))
    return rows
