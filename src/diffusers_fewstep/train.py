"""Phase 2 (tune the model on σ tables), alternated with Phase 1 (learn the tables) on request, under `accelerate launch`.

    accelerate launch scripts/train_fewstep.py --nfe 4 --output_dir fmnist-fewstep

By default one round of Phase 2 (:mod:`diffusers_fewstep.finetune`, `--phase2_steps` optimiser steps) on the
`--phase1_init` tables held fixed (DDIM trailing): alternating lost to it on the fixture (docs/training.md). With
`--phase1_iters N` every round starts with Phase 1 (:func:`diffusers_fewstep.optimizer.optimize_schedule` on the current,
EMA model: the current table, the stock ones and learned ones scored on held-out noises, the best kept) and a final
Phase 1 re-selects the tables for the tuned model. Conventions follow diffusers'
`examples/unconditional_image_generation/train_unconditional.py`: `checkpoint-{step}` folders,
`--checkpoints_total_limit`, `--resume_from_checkpoint latest`, trackers through `--report_to`,
`--push_to_hub`. Every random draw comes from a generator seeded by (seed, round, step), so a
resumed run continues exactly where a killed one stopped. A run stops early in one line, with
nothing lost (:mod:`diffusers_fewstep.checkpoints`): on SIGTERM/SIGINT or an error it saves a
checkpoint first; when the Phase-2 loss diverges it keeps the last good checkpoint. What the run measures
(every evaluation row, and at the end the tuned model next to the base model at the counts it was tuned for and at
others) is :mod:`diffusers_fewstep.training_eval`.

Text-to-image pipelines (SD, SDXL, SD3) train on prompts (`--prompts_file` or a captioned `--train_data_dir`)
with guidance inside teacher and student and a LoRA adapter by default (:mod:`.text_to_image_training`).

The output folder holds `scheduler/` (a `LearnedScheduleScheduler` with a table for every NFE),
the tuned `unet/` (full fine-tuning; with the base pipeline's `model_index.json` when the base
is an unconditional pipeline) or the LoRA adapter (`unet_lora/`; text-to-image: diffusers'
`pytorch_lora_weights.safetensors` for `pipe.load_lora_weights`), `metrics.json`, `sigmas.png`
and a model card `README.md`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import DEFAULT_MODEL, solvers
from .adapter import SigmaDenoiser
from .checkpoints import (StopSignals, TrainingStopped, resume, save_after_error, save_or_stop, set_learning_rate,
                          step_outcome, stop_if_diverged)
from .data import load_images
from .evaluation import sample_shape
from .finetune import (LORA_TARGET_MODULES, PHASE2_LOSSES, PHASE2_TARGETS, TEXT_TO_IMAGE_LORA_MODULES, adapter_only_checkpoints, add_lora, auto_target,
                       ema_weights, lora_target_modules, make_teacher, phase2_loss, teacher_states)
from .schedules import starting_tables
from .reference import REFERENCE_STEPS, default_reference, pipeline_steps, start_state
from .selection import extra_args, phase1_measures
from .text_to_image_training import add_arguments as add_text_to_image_arguments
from .text_to_image_training import check_arguments as check_text_to_image_arguments
from .training_eval import compare_step_counts, eval_set, record, restore_best, teacher_reference, trainable

logger = logging.getLogger(__name__)
# default --learning_rate, by --use_lora: at 1e-4 LoRA (rank 64) kept pace with full tuning at 2e-5 on the fixture
# at equal wall time (docs/training.md); 1e-4 is also diffusers' LoRA scripts' default
LEARNING_RATES = {False: 2e-5, True: 1e-4}


# --- arguments --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options (one per line, as diffusers' training examples)."""
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=DEFAULT_MODEL, help="Pipeline folder or Hub id of the model (default: the vendored Fashion-MNIST DPM).")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4], help="Step counts (model evaluations) to learn tables for.")
    parser.add_argument("--solver", type=str, default="euler", choices=list(solvers.SOLVERS), help="Few-step solver the tables and the model are tuned for.")
    parser.add_argument("--rounds", type=int, default=1, help="Phase-2 rounds; Phase 1 runs before each and once more at the end (0: Phase 1 only). Alternating (2 rounds with --phase1_iters 150) lost to a fixed table on the fixture (docs/training.md).")
    parser.add_argument("--output_dir", type=str, default="fewstep-model", help="Where checkpoints and the final model go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random draw (noises, batches, Phase 1).")
    parser.add_argument("--phase1_objective", type=str, default="trajectory", help="Phase-1 objective (see `diffusers-fewstep optimize`).")
    parser.add_argument("--phase1_iters", type=int, default=0, help="Adam steps of Phase 1 per NFE and round (e.g. 150); 0 (default): the --phase1_init tables held fixed, what won on the fixture.")
    parser.add_argument("--phase1_validation_size", type=int, default=512, help="Held-out noises that score every Phase-1 candidate (the current table, the stock ones, the learned ones) to keep the best; 0: keep the learned table unscored.")
    parser.add_argument("--phase1_batch_size", type=int, default=128, help="Noises per Phase-1 step.")
    parser.add_argument("--phase1_pool_size", type=int, default=None, help="Noises (with teacher references) Phase 1 draws its batches from (default: optimize_schedule's).")
    parser.add_argument("--phase1_init", type=str, default="ddim_trailing", help="Tables Phase 1 starts from (held fixed with --phase1_iters 0): a hand-made one (ddim_trailing, karras, loguniform, ddim_leading), peer:<diffusers scheduler> or a folder of learned tables (an optimize output).")
    parser.add_argument("--phase2_target", type=str, default="auto", choices=["auto", *PHASE2_TARGETS], help="Phase-2 target: the teacher's interval average at its own states, the landing D at the solver's states, or the teacher's endpoint at the end of the whole solve (back-propagated through every step); auto (default): endpoint at 2 steps or fewer and with --reference_scheduler pipeline, trajectory otherwise (finetune.auto_target; the smallest worst case over three model families, docs/training.md), and for a text-to-image pipeline the pipeline's own image as the teacher.")
    parser.add_argument("--phase2_batch_steps", action=argparse.BooleanOptionalAction, default=None, help="Counts trained with the trajectory target: the student's solve without gradients, then all N steps in one batched call with gradients (the same loss and gradient; with dropout, fresh masks for the batched call; a 4-step step on the fixture took 196 instead of 270 ms on an H100). On by default; --no-phase2_batch_steps runs the steps one by one (less memory: one step's activations at a time).")
    parser.add_argument("--phase2_loss", type=str, default="l2", choices=list(PHASE2_LOSSES), help="Per-sample distance of the Phase-2 target losses: squared error, or pseudo-Huber (√(MSE + c²) − c, as consistency training).")
    parser.add_argument("--phase2_step_weighting", type=str, default="propagated", choices=["propagated", "uniform"], help="Weights of the per-step losses: the squared propagation of each D error to the sample, or uniform.")
    parser.add_argument("--phase2_steps", type=int, default=1000, help="Optimiser steps of Phase 2 per round.")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Trajectories per device and micro-batch.")
    parser.add_argument("--pool_size", type=int, default=4096, help="Teacher trajectories drawn per NFE and round (split over processes).")
    parser.add_argument("--pool_batch_size", type=int, default=512, help="Batch size of the teacher solves that build the pool.")
    parser.add_argument("--reference_steps", type=int, default=None, help="Steps of the teacher's reference (default: ode 200; pipeline: the pipeline's own num_inference_steps, SD 50, SD3 28).")
    parser.add_argument("--reference_scheduler", type=str, default=None, choices=["ode", "pipeline"], help="What the teacher's endpoints are: its DPM-Solver++(2M) solve of the ODE, or the image the pipeline itself makes from the same noise (its own diffusers scheduler at --reference_steps, as optimize --reference-scheduler pipeline); pipeline gives endpoints only, so it needs --phase2_target endpoint (or auto). Default: with --phase2_target auto (the default), pipeline for a text-to-image pipeline whose scheduler is deterministic, ode otherwise; with another target, ode.")
    parser.add_argument("--pool_cache_dir", type=str, default=None, help="Keep every built teacher pool here and reuse it when a later run (same model, table, seeds and pool settings) needs the same one: runs that differ only in training settings build it once.")
    parser.add_argument("--denoising_weight", type=float, nargs="+", default=[0.0], help="λ_i of the denoising loss mixed into Phase 2: one value or one per step.")
    parser.add_argument("--train_data_dir", type=str, default=None, help="Clean images for the denoising loss: Fashion-MNIST IDX files or an image folder (default: the teacher's samples); text-to-image: a captioned imagefolder (metadata.jsonl), whose captions are the prompts.")
    parser.add_argument("--conditioning_file", type=str, default=None, help="Class labels (one integer per line) for class-conditional models.")
    parser.add_argument("--learning_rate", type=float, default=None, help=f"AdamW learning rate (default: {LEARNING_RATES[False]:g}; {LEARNING_RATES[True]:g} with --use_lora, as diffusers' LoRA scripts).")
    parser.add_argument("--lr_scheduler", type=str, default="constant", help="diffusers.optimization scheduler name.")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning rate.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="Adam β1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="Adam β2.")
    parser.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam ε.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the tuned weights; Phase 1, evaluation and the output use it.")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="Cap of the EMA decay: diffusers' EMAModel ramps the decay as (1 + step)/(10 + step) up to it, so 0.999 is reached at step 8,990; before that the EMA spans about the last 11%% of the steps.")
    parser.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=None, help="Tune a LoRA adapter (peft) instead of all weights; the teacher is the model with the adapter off (default: on for text-to-image pipelines, off otherwise; --no-use_lora turns it off).")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA α (default: the rank).")
    parser.add_argument("--lora_layers", type=str, nargs="+", default=None, help="The layers that get LoRA adapters, comma separated as in diffusers' LoRA scripts (e.g. 'to_k,to_q,to_v,to_out.0') or as separate words; names match as suffixes. Default: attention projections, resnet convolutions and time-embedding projections (finetune.LORA_TARGET_MODULES); text-to-image pipelines: the attention projections, Linear layers only (named here, convolutions too: 'conv1,conv2,time_emb_proj,to_q,to_k,to_v,to_out.0' adapts the UNet's resnets as well).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Mixed precision (default: accelerate's config).")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimiser step.")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint-{step} folder every this many optimiser steps (and after every Phase 1).")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder, or 'latest'. A finished run resumed with a larger --phase2_steps trains its last Phase 2 on.")
    parser.add_argument("--stop_after_steps", type=int, default=None, help="Stop (without saving) after this many optimiser steps, as if killed.")
    parser.add_argument("--divergence_factor", type=float, default=10.0, help="A Phase-2 loss above this multiple of its running level is a spike (0: only non-finite losses stop the run).")
    parser.add_argument("--keep_best", action=argparse.BooleanOptionalAction, default=True, help="Save the weights (and tables) of the best evaluation (FD summed over the tuned counts, else endpoint RMSE) instead of the last; on the fixture a run's FD rose from 0.468 to 0.516 between its last two evaluations. Needs --eval_samples > 0.")
    parser.add_argument("--divergence_patience", type=int, default=5, help="Consecutive spiking steps after which Phase 2 has diverged and stops, keeping the last good checkpoint.")
    parser.add_argument("--eval_samples", type=int, default=256, help="Noises for the endpoint RMSE reported after every phase.")
    parser.add_argument("--eval_steps", type=int, default=None, help="Also evaluate every this many Phase-2 steps (learning curve).")
    parser.add_argument("--fd_classifier", type=str, default=None, help="Feature network folder (arch.py with load_classifier); adds FD to every evaluation.")
    parser.add_argument("--fd_data", type=str, default=None, help="Folder with the Fashion-MNIST test IDX files for the FD reference statistics.")
    parser.add_argument("--fd_samples", type=int, default=5000, help="Samples per FD evaluation.")
    parser.add_argument("--compare_nfe", type=int, nargs="*", default=[2, 3, 4, 5, 6, 8, 10], help="Step counts at which the final model is also measured with the --compare_table table, next to the base model.")
    parser.add_argument("--compare_reference", action=argparse.BooleanOptionalAction, default=True, help="Also measure the final and the base model with the --reference_steps reference solve (with FD: 2 × reference_steps × fd_samples model calls).")
    parser.add_argument("--compare_table", type=str, default="ddim_trailing", choices=["ddim_trailing", "ddim_leading", "karras", "loguniform"], help="Hand-made table (schedules.baseline_sigmas) for the --compare_nfe counts.")
    parser.add_argument("--channels_last", action="store_true", help="Keep the model in channels-last memory format (convolutions; see benchmarks/profile_phase2.py).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute the trained model's activations block by block in the backward pass (diffusers' enable_gradient_checkpointing): less memory, slower; for large models and for --phase2_target endpoint, which keeps every step's activations.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained model: inductor on CUDA; elsewhere only dynamo's tracing (backend 'eager'), as inductor's CPU build takes minutes.")
    parser.add_argument("--compile_mode", type=str, default=None, choices=["default", "reduce-overhead", "max-autotune"], help="torch.compile mode on CUDA (implies --compile): reduce-overhead replays the step's kernels as CUDA graphs, for steps bound by the host, as on small models.")
    parser.add_argument("--use_fused_adamw", action="store_true", help="AdamW's fused CUDA kernel (ignored off CUDA).")
    parser.add_argument("--report_to", type=str, default=None, help="Tracker(s) for accelerate: tensorboard, wandb, all.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to output_dir.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id (default: the output folder's name).")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return add_text_to_image_arguments(parser)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args = add_arguments(parser).parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Settings that cannot work, refused before anything is loaded (one-line ValueError)."""
    if args.lora_layers:  # 'to_q,to_v' (diffusers' scripts) or separate words
        args.lora_layers = [name.strip() for word in args.lora_layers for name in word.split(",") if name.strip()]
    if min(args.nfe) < 1 or min(args.compare_nfe, default=1) < 1:
        raise ValueError(f"--nfe and --compare_nfe take step counts ≥ 1; got {args.nfe} and {args.compare_nfe}")
    if len(args.denoising_weight) > 1 and any(len(args.denoising_weight) != n for n in args.nfe):
        raise ValueError(f"--denoising_weight takes 1 value or one per step ({args.nfe}); got {args.denoising_weight}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0; got {args.learning_rate}")
    if args.phase2_batch_steps and args.phase2_target not in ("trajectory", "auto"):
        raise ValueError(f"--phase2_batch_steps batches the steps of --phase2_target trajectory; got --phase2_target "
                         f"{args.phase2_target} ({'already one batch' if args.phase2_target == 'interval_average' else 'every step is back-propagated through the next'})")
    if args.reference_scheduler == "pipeline" and args.phase2_target not in ("endpoint", "auto"):
        raise ValueError(f"--reference_scheduler pipeline gives the teacher's endpoints only, and --phase2_target "
                         f"{args.phase2_target} needs its states at every σ; use --phase2_target endpoint")
    if args.divergence_factor != 0 and not args.divergence_factor > 1:
        raise ValueError("--divergence_factor must be > 1 (or 0: stop only at non-finite losses); "
                         f"got {args.divergence_factor}")
    if args.divergence_patience < 1 or args.checkpointing_steps < 1:
        raise ValueError("--divergence_patience and --checkpointing_steps must be ≥ 1; got "
                         f"{args.divergence_patience} and {args.checkpointing_steps}")
    if args.prompts_file:
        check_text_to_image_arguments(args)


# --- state that travels in a checkpoint ----------------------------------------------------------
NO_TIME = {"pool_s": 0.0, "step_s": 0.0, "steps": 0}


class TrainState:
    """Round/phase counters, the current σ tables, the metrics and the divergence monitor's state,
    saved in every checkpoint. `phase` is the phase to run next (1) or running (2); after the last
    Phase 1 it is 2 with `round == --rounds`: only the output is left."""

    def __init__(self):
        self.round, self.phase, self.global_step, self.step_in_phase = 0, 1, 0, 0
        self.tables: Dict[str, List[float]] = {}
        self.metrics: List[dict] = []
        self.divergence: dict = {}
        self.timing = dict(NO_TIME)  # Phase 2: seconds building teacher pools, seconds and count of optimiser steps
        self.losses: List[float] = []  # Phase-2 losses since the last evaluation (not checkpointed)
        self.window = (0, 0.0)  # optimiser steps and their seconds at the last evaluation (not checkpointed)
        self.best: dict = {}  # the best evaluation so far (training_eval.keep_if_best): step, round, measure, tables
        self.finished_phase2 = 0  # steps of the last finished Phase 2 (a larger --phase2_steps reopens it)

    def state_dict(self) -> dict:
        return {"round": self.round, "phase": self.phase, "global_step": self.global_step,
                "step_in_phase": self.step_in_phase, "tables": json.dumps(self.tables), "metrics": json.dumps(self.metrics),
                "divergence": json.dumps(self.divergence), "timing": json.dumps(self.timing), "best": json.dumps(self.best),
                "finished_phase2": self.finished_phase2}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.phase = int(state["round"]), int(state["phase"])
        self.global_step, self.step_in_phase = int(state["global_step"]), int(state["step_in_phase"])
        self.tables, self.metrics = json.loads(state["tables"]), json.loads(state["metrics"])
        self.divergence = json.loads(state.get("divergence", "{}"))
        self.timing = json.loads(state["timing"]) if "timing" in state else dict(NO_TIME)
        self.window = (self.timing["steps"], self.timing["step_s"])  # the next row's recent speed: this session's
        self.best = json.loads(state.get("best", "{}"))
        self.finished_phase2 = int(state.get("finished_phase2", 0))

    def throughput(self, global_batch: int) -> dict:
        """Seconds spent building teacher pools, and trajectories per second of the optimiser steps (evaluations and
        checkpoints left out): `samples_per_s` over all steps so far, `samples_per_s_recent` over the steps since the
        last call, the steady speed once a one-time cost (torch.compile's first steps) lies behind."""
        steps, seconds = self.timing["steps"], self.timing["step_s"]
        if not steps:
            return {}
        row = {"pool_s": round(self.timing["pool_s"], 1), "samples_per_s": round(steps * global_batch / seconds, 1)}
        if steps > self.window[0] and seconds > self.window[1]:
            row["samples_per_s_recent"] = round((steps - self.window[0]) * global_batch / (seconds - self.window[1]), 1)
        self.window = (steps, seconds)
        return row

    def loss_summary(self) -> dict:
        """Mean and largest Phase-2 loss since the last call (a transient between two evaluations shows in the
        largest), and a fresh window."""
        if not self.losses:
            return {}
        summary = {"loss_mean": float(sum(self.losses) / len(self.losses)), "loss_max": float(max(self.losses))}
        self.losses = []
        return summary


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (seed, round, step, process, …)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


# --- data ---------------------------------------------------------------------------------------
class Conditioning:
    """Rows of model keyword arguments that the training and evaluation paths cycle over: class labels
    (`{"class_labels": …}`), or encoded prompts with, for guidance, their negative prompts (`uncond`)."""

    def __init__(self, cond: dict, uncond: Optional[dict] = None):
        self.cond, self.uncond = cond, uncond

    def __len__(self) -> int:
        return len(next(iter(self.cond.values())))

    def rows(self, idx: torch.Tensor) -> dict:
        """The denoiser's `cond` (and `uncond`) keyword arguments for rows `idx` (taken modulo the row count)."""
        return extra_args(self.cond, self.uncond, idx)


def load_conditioning(path: Optional[str], device) -> Optional[torch.Tensor]:
    """Class labels from a file (one integer per line) for class-conditional models."""
    if path is None:
        return None
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    try:
        return torch.tensor([int(v) for v in lines], device=device)
    except ValueError:
        raise ValueError(f"{path}: expected one integer class label per line; for a text-to-image pipeline pass "
                         "the prompts with --prompts_file instead") from None


# --- phases -------------------------------------------------------------------------------------
def run_phase1(denoiser: SigmaDenoiser, args, round_: int, device, init=None,
               rows: Optional[Conditioning] = None, teacher: Optional[SigmaDenoiser] = None,
               text_to_image: bool = False) -> Dict[str, List[float]]:
    """Phase 1 on the current model: `optimize`'s Phase 1 for `--solver` (both ends of every table fixed), from the
    current tables, `init` ({nfe: table}) or `--phase1_init`; the current table, the stock ones and the learned ones
    are scored on `--phase1_validation_size` held-out noises and the best is kept (the current one on a tie), fitted to
    the `teacher`'s references (`--reference_scheduler`; the model's own when None). The conditioning rows (class
    labels, or prompts with their negative prompts) are cycled over the paths."""
    from .optimizer import optimize_schedule
    from .schedules import baseline_sigmas

    current = {n: [float(s) for s in (init[str(n)] if init else baseline_sigmas(args.phase1_init, n, denoiser.schedule))]
               for n in args.nfe}
    if args.phase1_iters == 0:  # tables held fixed: no reference solves
        return {str(n): table for n, table in current.items()}
    loss, select_by = phase1_measures(text_to_image)
    result = optimize_schedule(denoiser, nfes=list(args.nfe), solver=args.solver, objective=args.phase1_objective,
                               loss=loss, select_by=select_by, validation_size=args.phase1_validation_size,
                               num_iters=args.phase1_iters, batch_size=args.phase1_batch_size,
                               # the current tables compete as `existing` (winning ties); unscored, they are the start
                               init=None if args.phase1_validation_size else current,
                               existing={n: (table, args.solver) for n, table in current.items()},
                               reference_steps=args.reference_steps, reference_scheduler=args.reference_scheduler,
                               pool_size=args.phase1_pool_size, seed=args.seed + 1000 * round_, device=device, progress=False,
                               cond=None if rows is None else rows.cond, uncond=None if rows is None else rows.uncond,
                               reference_denoiser=teacher)
    return {str(n): [float(s) for s in result.tables[n]] for n in args.nfe}


# what decides a pool besides its table, size and seed keys: the teacher, its solve, its draws and its conditioning
POOL_ARGS = ("pretrained_model_name_or_path", "revision", "variant", "reference_steps", "pool_batch_size", "mixed_precision",
             "sample_shape", "conditioning_file", "prompts_file", "prompt_column", "train_data_dir", "caption_column",
             "negative_prompt", "guidance_scale", "resolution", "reference_scheduler")


def cached_pool(teacher: SigmaDenoiser, sigmas: torch.Tensor, size: int, args, keys: Sequence[int], device,
                rows: Optional[Conditioning] = None) -> dict:
    """:func:`build_pool` with the generator seeded by `keys`, through `--pool_cache_dir` when given: a pool built
    before with the same table, size, keys and :data:`POOL_ARGS` (and the model folder unchanged since) is loaded
    instead of solved again."""
    if not args.pool_cache_dir:
        return build_pool(teacher, sigmas, size, args, _generator(*keys), device, rows)
    model = args.pretrained_model_name_or_path
    what = {k: str(getattr(args, k, None)) for k in POOL_ARGS}
    what.update(table=[round(float(s), 9) for s in sigmas], size=size, keys=list(keys),
                model_mtime=os.path.getmtime(model) if os.path.isdir(model) else None)
    name = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.pool_cache_dir, f"pool-{name}.pt")
    if os.path.exists(path):
        logger.info("teacher pool from %s", path)
        return {k: v.to(device) if k == "states" else v for k, v in torch.load(path).items()}
    pool = build_pool(teacher, sigmas, size, args, _generator(*keys), device, rows)
    os.makedirs(args.pool_cache_dir, exist_ok=True)
    part = f"{path}.{os.getpid()}.tmp"  # runs of one call building the same pool side by side write apart
    torch.save({k: v.cpu() for k, v in pool.items()}, part)
    os.replace(part, path)  # whole or absent, should the run be killed while saving
    return pool


@torch.no_grad()
def build_pool(teacher: SigmaDenoiser, sigmas: torch.Tensor, size: int, args, generator: torch.Generator, device,
               rows: Optional[Conditioning] = None) -> dict:
    """`size` teacher trajectories at the scheduled σ's, `states` (`--reference_scheduler pipeline`: the start and
    the endpoint only), and the conditioning row of each, `rows` (a random draw; an index, so that prompt encodings
    are not copied per trajectory)."""
    states, picks = [], []
    pipeline = teacher_reference(teacher, args) if args.reference_scheduler == "pipeline" else None
    for start in range(0, size, args.pool_batch_size):
        n = min(args.pool_batch_size, size - start)
        noise = torch.randn((n, *args.sample_shape), generator=generator).to(device)
        pick = None if rows is None else torch.randint(len(rows), (n,), generator=generator)
        extra = {} if rows is None else rows.rows(pick)
        if pipeline is not None:  # the start and the pipeline's own image of the same noise
            end = pipeline(teacher, noise, extra or None)
            states.append(torch.stack([start_state(noise, teacher.schedule, sigmas[0]), end.to(noise)]))
        else:
            states.append(teacher_states(teacher, noise, sigmas, args.reference_steps, **extra))
        picks.append(pick)
    pool = {"states": torch.cat(states, 1)}
    if rows is not None:
        pool["rows"] = torch.cat(picks)
    return pool


# --- the run ------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> str:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .hub import load_model_and_scheduler_config
    from .text_to_image_training import half_precision_base, has_text_encoder, load_training_pipeline

    check_args(args)
    args.start_time = time.time()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)  # the global RNGs (the LoRA adapter's initial weights); every other draw has its own generator
    device = accelerator.device
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 1. model (of a text-to-image pipeline: with the prompts encoded, guided), frozen teacher, EMA, optimiser
    t2i = None
    if args.prompts_file or has_text_encoder(args.pretrained_model_name_or_path):
        t2i = load_training_pipeline(args, device, need_images=max(args.denoising_weight) > 0)
        model, base_config, args.sample_shape = t2i.model, t2i.encoded.scheduler_config, t2i.encoded.sample_shape
    else:
        model, base_config = load_model_and_scheduler_config(args.pretrained_model_name_or_path)
        args.sample_shape = sample_shape(model)
    resolve_targets(args, t2i and t2i.encoded)
    args.reference_steps = ((args.reference_steps or REFERENCE_STEPS) if args.reference_scheduler == "ode"
                            else pipeline_steps(args.reference_steps, t2i and t2i.encoded))
    start = starting_tables(args.phase1_init, args.nfe, base_config)  # a folder or peer: resolved (and checked) now
    args.start_tables = {str(n): t for n, t in start.items()} if isinstance(start, dict) else None
    args.text_to_image = t2i is not None
    args.use_lora = t2i is not None if args.use_lora is None else args.use_lora
    given_learning_rate, args.learning_rate = args.learning_rate, args.learning_rate or LEARNING_RATES[args.use_lora]
    args.clamp_samples = t2i is None  # images in [-1, 1]; latents are not clamped
    if args.use_lora:
        model.requires_grad_(False)
        layers = (args.lora_layers if args.lora_layers
                  else TEXT_TO_IMAGE_LORA_MODULES if t2i is not None else LORA_TARGET_MODULES)
        # text-to-image: Linear layers only, unless --lora_layers names the layers (convolutions included)
        kinds = (torch.nn.Linear,) if t2i is not None and not args.lora_layers else (torch.nn.Linear, torch.nn.Conv2d)
        targets = args.lora_targets = lora_target_modules(model, layers, kinds)
        model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, target_modules=targets,
                         in_place=t2i is not None)
        if t2i is not None and accelerator.mixed_precision in ("fp16", "bf16"):
            half_precision_base(model, accelerator.mixed_precision)
    teacher_module = make_teacher(model, args.use_lora).to(device)
    model.to(device).train()
    _speed_options(accelerator, model, teacher_module, args)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=args.ema_decay, foreach=True) if args.use_ema else None  # a few kernels, not 3 per weight
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=True if args.use_fused_adamw and device.type == "cuda" else None)
    total_steps = args.rounds * args.phase2_steps
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max(1, total_steps) * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if args.use_lora:
        adapter_only_checkpoints(accelerator, accelerator.unwrap_model(model))
    state = TrainState()
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(state)

    denoiser = t2i.denoiser if t2i is not None else (lambda m: SigmaDenoiser(m, base_config))
    student = denoiser(model)
    unwrapped = accelerator.unwrap_model(model)
    tuned = denoiser(unwrapped)  # for Phase 1 and evaluation, with the EMA weights
    teacher = denoiser(teacher_module)
    args.reference = teacher_reference(teacher, args).settings()  # what the targets and the RMSEs are measured against
    labels = load_conditioning(args.conditioning_file, device)
    rows = None if labels is None else Conditioning({"class_labels": labels})
    data = None
    if args.train_data_dir and labels is not None:
        raise ValueError("--train_data_dir with --conditioning_file: dataset labels are not read; leave out "
                         "--train_data_dir (the denoising loss then uses the teacher's labelled samples)")
    if t2i is not None:
        rows, data = Conditioning(t2i.encoded.cond, t2i.encoded.uncond), t2i.latents  # latent k has prompt k
    elif args.train_data_dir:
        data = load_images(args.train_data_dir, args.sample_shape)

    # 2. resume, and the fixed evaluation set (teacher references)
    resumed = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    if resumed:
        args.learning_rate = set_learning_rate(accelerator, optimizer, lr_scheduler, given_learning_rate)
        reopen_last_phase2(accelerator, args, state)
    if accelerator.is_main_process:  # after the resume: the learning rate in force
        accelerator.init_trackers("fewstep", config={k: str(v) for k, v in vars(args).items()})
    if ema is not None:
        ema.to(device)
    ev = eval_set(teacher, args, device, rows) if accelerator.is_main_process and args.eval_samples > 0 else None

    # 3. alternate the phases; a signal or an error saves a checkpoint before the run ends (checkpoints.py)
    evaluate = lambda pools=None: record(accelerator, state, "phase2", tuned, ev, args, pools, rows)  # noqa: E731
    with StopSignals() as guard:
        guard.saved(resumed and os.path.basename(os.path.normpath(resumed)))
        try:
            while True:
                if state.phase == 1:
                    tables = _phase1(accelerator, args, state, tuned, teacher, ema, rows, broadcast_object_list)
                    guard.unsaved()
                    state.tables, state.phase, state.step_in_phase, state.divergence = tables, 2, 0, {}
                    if accelerator.is_main_process and (args.phase1_iters or state.round == 0):  # held tables
                        with ema_weights(ema, trainable(unwrapped)):  # after Phase 2: its last row already says it
                            record(accelerator, state, "phase1", tuned, ev, args)
                    save_or_stop(accelerator, args, state, guard)
                if state.round >= args.rounds:
                    break
                if _phase2(accelerator, args, state, model, student, teacher, ema, optimizer, lr_scheduler, data,
                           rows, guard, evaluate if accelerator.is_main_process else None):
                    accelerator.print(f"stopped after {state.global_step} steps (--stop_after_steps)")
                    return args.output_dir
                state.round, state.phase, state.finished_phase2 = state.round + 1, 1, state.step_in_phase
                save_or_stop(accelerator, args, state, guard)

            # 4. the tuned model at every step count next to the base model, and the output folder
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                restore_best(args, state, unwrapped, ema)
                counts = compare_step_counts(args, state, tuned, teacher, ema, ev) if ev and args.rounds > 0 else []
                save_output(args, state, unwrapped, ema, base_config, counts, t2i)
                if args.push_to_hub:
                    push_to_hub(args)
        except TrainingStopped as stop:
            accelerator.print(str(stop))
            raise
        except Exception:
            save_after_error(accelerator, args, state, guard, optimizer)
            raise
        finally:
            accelerator.end_training()
    return args.output_dir


def _speed_options(accelerator, model, teacher_module, args) -> None:
    """`--channels_last` (model and teacher), `--gradient_checkpointing` (the trained model) and `--compile` (the
    trained model, and full tuning's frozen teacher copy: a LoRA teacher is the compiled model with its adapter off),
    before `accelerator.prepare`. The teacher runs without gradients, where diffusers' checkpointing does nothing.
    A LoRA run's compiled teacher built the fixture's 12,288-trajectory pool in 29 s, full tuning's uncompiled copy in
    89 s (2026-11-24); the compiled copy is not yet timed."""
    if args.gradient_checkpointing:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).enable_gradient_checkpointing()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        teacher_module.to(memory_format=torch.channels_last)
        accelerator.register_save_state_pre_hook(_contiguous_weights)
    if args.compile or args.compile_mode:
        compile_model(model, accelerator.device, args.compile_mode)
        if not args.use_lora:
            compile_model(teacher_module, accelerator.device, args.compile_mode)


def compile_backend(device) -> str:
    """inductor on CUDA; elsewhere dynamo's tracing only ('eager'): inductor's CPU build takes minutes."""
    return "inductor" if torch.device(device).type == "cuda" else "eager"


COMPILE_CACHE_ENTRIES = 64


def compile_model(model, device, mode: Optional[str] = None) -> None:
    """`torch.compile` of `model` in place with :func:`compile_backend`; `mode` (e.g. "reduce-overhead", CUDA graphs)
    applies to inductor only."""
    backend = compile_backend(device)
    kwargs = {"mode": mode} if mode and backend == "inductor" else {}
    # every compiled module shares nn.Module._call_impl's dynamo cache (default limit 8 entries; one tiny SD run used 6:
    # student and teacher, with and without gradients, training and evaluation shapes); past it dynamo runs eagerly
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch ≤ 2.6
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), COMPILE_CACHE_ENTRIES))
    logger.info("torch.compile(backend=%r%s) of the trained model", backend, f", mode={mode!r}" if kwargs else "")
    model.compile(backend=backend, **kwargs)


def _contiguous_weights(models, weights, output_dir) -> None:
    """`save_state` hook: safetensors refuses channels-last tensors, so save them contiguous."""
    for state_dict in weights:
        for key, value in state_dict.items():
            if torch.is_tensor(value) and not value.is_contiguous():
                state_dict[key] = value.contiguous()


def resolve_targets(args, encoded=None) -> None:
    """The default `--reference_scheduler` and `--phase2_target auto` made concrete: `args.reference_scheduler` (the
    ODE; with `auto`, the pipeline's own image where `reference.default_reference` picks it) and `args.phase2_targets`
    (the target of every count). `encoded`: a text-to-image run's encoded prompts."""
    if args.reference_scheduler is None:
        args.reference_scheduler = default_reference(encoded, quiet=True) if args.phase2_target == "auto" else "ode"
    args.phase2_targets = {n: auto_target(n, args.reference_scheduler) if args.phase2_target == "auto"
                           else args.phase2_target for n in args.nfe}
    logger.info("reference %s; Phase-2 target per count %s", args.reference_scheduler, args.phase2_targets)


def _to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queued work: a plain copy from pageable host
    memory to a GPU synchronises, so the host could not queue the next step's kernels ahead."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _synced(device, start: float) -> float:
    """Seconds since `start`, once the device has finished its queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _phase1(accelerator, args, state, tuned, teacher, ema, rows, broadcast_object_list) -> Dict[str, List[float]]:
    """Phase 1 on the main process (with the EMA weights); returns the tables, broadcast to every process."""
    tables = [None]
    if accelerator.is_main_process:
        with ema_weights(ema, trainable(tuned.model)):
            t0 = time.time()
            tables[0] = run_phase1(tuned, args, state.round, accelerator.device, init=state.tables or args.start_tables,
                                   rows=rows, teacher=teacher, text_to_image=args.text_to_image)
            logger.info("round %d phase 1: %.1f s, tables %s", state.round, time.time() - t0, tables[0])
    if accelerator.num_processes > 1:
        tables = broadcast_object_list(tables)
    return tables[0]


def reopen_last_phase2(accelerator, args, state: TrainState) -> None:
    """A finished run resumed with a larger `--phase2_steps`: train its last Phase 2 on to that many steps (the
    tables, optimiser and EMA go on from the checkpoint; the last Phase 1 then runs again)."""
    if state.round < args.rounds or not 0 < state.finished_phase2 < args.phase2_steps:
        return
    if args.lr_scheduler not in ("constant", "constant_with_warmup"):
        raise ValueError(f"--phase2_steps {args.phase2_steps} continues a finished run only with a constant "
                         f"--lr_scheduler (given: {args.lr_scheduler}, whose schedule ended at the run's last step)")
    accelerator.print(f"the resumed run had finished: its last Phase 2 goes on from step {state.finished_phase2} "
                      f"to --phase2_steps {args.phase2_steps}")
    state.round, state.phase, state.step_in_phase = args.rounds - 1, 2, state.finished_phase2


def _phase2(accelerator, args, state, model, student, teacher, ema, optimizer, lr_scheduler, data, rows, guard,
            evaluate=None) -> bool:
    """Phase 2 of the current round from `state.step_in_phase`; True if `--stop_after_steps` stopped it.

    Step k trains the count `--nfe[k % len(--nfe)]`. After every step: a diverged loss stops the run
    (`checkpoints.stop_if_diverged`), and a signal saves a checkpoint and stops it (`checkpoints.save_or_stop`)."""
    if state.step_in_phase >= args.phase2_steps:
        return False
    device, rank = accelerator.device, accelerator.process_index
    tables = {n: torch.tensor(state.tables[str(n)], dtype=torch.float32, device=device) for n in args.nfe}
    share = math.ceil(args.pool_size / accelerator.num_processes)
    start = time.perf_counter()
    with accelerator.autocast():
        pools = {n: cached_pool(teacher, tables[n], share, args, (args.seed, state.round, n, rank), device, rows)
                 for n in args.nfe}
    state.timing["pool_s"] += _synced(device, start)
    weights = args.denoising_weight if len(args.denoising_weight) > 1 else args.denoising_weight[0]
    model.train()
    while state.step_in_phase < args.phase2_steps:
        start = time.perf_counter()
        guard.unsaved()
        n = args.nfe[state.global_step % len(args.nfe)]
        pool, total = pools[n], 0.0
        for k in range(args.gradient_accumulation_steps):
            micro = state.global_step * args.gradient_accumulation_steps + k
            gen = _generator(args.seed, state.round, micro, rank, 1)
            drawn = torch.randint(pool["states"].shape[1], (args.train_batch_size,), generator=gen)
            pick = _to_device(drawn, device)
            states = pool["states"][:, pick]
            row = None if rows is None else pool["rows"][drawn]
            if data is None:  # the teacher's own samples
                x0 = states[-1]
            elif rows is not None:  # captioned images: the latent of each trajectory's own prompt
                x0 = data[row.to(data.device)].to(device)
            else:
                x0 = data[torch.randint(len(data), (len(pick),), generator=gen)].to(device)
            with accelerator.accumulate(model):
                loss, logs = phase2_loss(student, states, tables[n], args.phase2_targets[n], args.solver, x0=x0,
                                         denoising_weights=weights, step_weighting=args.phase2_step_weighting,
                                         generator=gen, loss=args.phase2_loss, batch_steps=args.phase2_batch_steps is not False, **({} if rows is None else rows.rows(row)))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            total = total + loss.detach().float()
        if ema is not None:
            ema.step(trainable(accelerator.unwrap_model(model)))
        state.global_step += 1
        state.step_in_phase += 1
        loss, stop = step_outcome(accelerator, total / args.gradient_accumulation_steps, guard)  # waits for the GPU
        state.timing["step_s"] += time.perf_counter() - start
        state.timing["steps"] += 1
        state.losses.append(loss)
        logs = {k: float(v) for k, v in logs.items()}  # the device is done with the step: no wait
        logs.update(loss=loss, lr=lr_scheduler.get_last_lr()[0], nfe=n, round=state.round)
        accelerator.log(logs, step=state.global_step)
        stop_if_diverged(accelerator, args, state, n, loss)
        if stop:
            save_or_stop(accelerator, args, state, guard)
        if evaluate is not None and args.eval_steps and state.global_step % args.eval_steps == 0:
            with ema_weights(ema, trainable(accelerator.unwrap_model(model))):
                evaluate(pools)
        if state.global_step % args.checkpointing_steps == 0:
            save_or_stop(accelerator, args, state, guard)
        if args.stop_after_steps is not None and state.global_step >= args.stop_after_steps:
            return True
    if evaluate is not None and not (args.eval_steps and state.global_step % args.eval_steps == 0):
        with ema_weights(ema, trainable(accelerator.unwrap_model(model))):
            evaluate(pools)
    return False


# --- output -------------------------------------------------------------------------------------
def save_output(args, state: TrainState, model, ema, base_config: dict, step_counts: Optional[List[dict]] = None,
                t2i=None) -> None:
    """scheduler/, unet/ or unet_lora/ (text-to-image: the LoRA in diffusers' format), metrics.json, sigmas.png and
    README.md in `args.output_dir`; `step_counts` are the rows of :func:`compare_step_counts`, `t2i` the
    :class:`~diffusers_fewstep.text_to_image_training.TrainingPipeline` of a text-to-image run."""
    from .model_card import save_model_card
    from .scheduler import LearnedScheduleScheduler
    from .text_to_image_training import save_lora

    targets = {str(n): t for n, t in args.phase2_targets.items()}
    provenance = {"base_model": args.pretrained_model_name_or_path, "phase1_objective": args.phase1_objective,
                  "phase2_target": targets, "rounds": args.rounds, "phase2_steps": args.phase2_steps,
                  "use_lora": args.use_lora, "reference": args.reference, "metrics": state.metrics}
    if t2i is not None:
        provenance["text_to_image"] = t2i.provenance()
    scheduler = LearnedScheduleScheduler.from_config(dict(base_config), sigma_tables=state.tables, solver=args.solver,
                                                     provenance=provenance)
    with ema_weights(ema, trainable(model)):
        if args.rounds > 0 and args.use_lora and t2i is not None:
            save_lora(t2i, model, args.output_dir)
        elif args.rounds > 0 and args.use_lora:
            model.save_pretrained(os.path.join(args.output_dir, "unet_lora"))
        elif args.rounds > 0:
            _save_pipeline(model, scheduler, args)
    scheduler.save_pretrained(os.path.join(args.output_dir, "scheduler"))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump({"metrics": state.metrics, "step_counts": step_counts or [], "tables": state.tables, "best": state.best, "args": {k: v for k, v in vars(args).items()
                                                                             if not k.startswith("hub_token")}}, f, indent=1)
    save_model_card(args.output_dir, base_model=args.pretrained_model_name_or_path, tables=state.tables,
                    metrics=state.metrics, solver=args.solver, use_lora=args.use_lora, tuned=args.rounds > 0,
                    hub_model_id=args.hub_model_id, step_counts=step_counts,
                    text_to_image=None if t2i is None else t2i.provenance(),
                    fixed_tables=args.phase1_init if args.phase1_iters == 0 else None, reference=args.reference,
                    targets=targets, kept=state.best)


def _save_pipeline(model, scheduler, args) -> None:
    """The tuned model as `unet/` (or `transformer/`); a full pipeline folder when the base pipeline
    has no other components (e.g. `DDPMPipeline`)."""
    import diffusers

    from .hub import load_json, resolve_folder

    root = resolve_folder(args.pretrained_model_name_or_path)
    index_file = os.path.join(root, "model_index.json")
    index = load_json(index_file) if os.path.isfile(index_file) else {}
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    sub = "transformer" if "transformer" in components else "unet"
    if components == {sub, "scheduler"} and hasattr(diffusers, index.get("_class_name", "")):
        pipe = getattr(diffusers, index["_class_name"])(**{sub: model, "scheduler": scheduler})
        pipe.save_pretrained(args.output_dir)
    else:
        model.save_pretrained(os.path.join(args.output_dir, sub))


def push_to_hub(args) -> str:
    """Create the Hub repo and upload the output folder (checkpoints, the best evaluation's copy of the weights, and
    logs excluded)."""
    from .hub import push_folder
    from .training_eval import BEST_WEIGHTS

    return push_folder(args.output_dir, args.hub_model_id, args.hub_private_repo, args.hub_token,
                       ["checkpoint-*", "checkpoint-*/**", BEST_WEIGHTS, f"{args.logging_dir}/**"])


def run(args: argparse.Namespace) -> int:
    """`diffusers-fewstep train` (single process; use `accelerate launch scripts/train_fewstep.py` for more).
    Returns the exit status: 0, or that of a run stopped early (:class:`~.checkpoints.TrainingStopped`)."""
    try:
        main(args)
    except TrainingStopped as stop:  # its one line is printed already
        return stop.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(run(parse_args()))
