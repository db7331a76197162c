"""`diffusers-fewstep optimize`: learn and select σ tables for a model and save them as a scheduler folder.

    diffusers-fewstep optimize --model PIPELINE --nfe 3 4 5 6 8 10 --output-dir OUT

A second run into the same folder adds its tables to those there; a step count already there is
replaced only when the new table scores better on the held-out noises (the old one competes as a
candidate) or with `--overwrite`. Each step count is saved as soon as it is done.
"""
from __future__ import annotations

import argparse
import os

import torch

from .objectives import LOSSES
from .evaluation import sample_shape
from .optimizer import METHODS, OBJECTIVES, ScheduleResult, optimize_schedule
from .checks import UsageError
from .schedules import starting_tables
from .selection import MEASURES, check_measure, phase1_measures

# defaults by device: the reference solves and the held-out scoring dominate, and a CPU is ~100× slower
GPU_DEFAULTS = {"batch_size": 64, "reference_steps": 200, "pool_size": 512, "validation_size": 512, "max_iters": 60,
                "starts": 2}
CPU_DEFAULTS = {"batch_size": 4, "reference_steps": 32, "pool_size": 8, "validation_size": 16, "max_iters": 8,
                "starts": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffusers-fewstep optimize`."""
    from . import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="diffusers pipeline folder or Hub id (default: the vendored Fashion-MNIST DDPM)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8], help="step counts to learn tables for")
    parser.add_argument("--solver", default="auto",
                        help="auto (the best solver per step count), euler (= DDIM), dpmpp_2m, unipc or ipndm")
    parser.add_argument("--output-dir", default=None,
                        help="writes scheduler/, schedule.png, optimize_log.json, README.md (default: "
                             "outputs/<model folder or Hub name>-fewstep)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tables already in --output-dir even if they score better")
    parser.add_argument("--loss", default=None, choices=LOSSES,
                        help="endpoint loss of the trajectory objective (default: feature; l2 for text-to-image pipelines)")
    parser.add_argument("--select-by", default=None, choices=MEASURES,
                        help="held-out measure that keeps a table (default: fd_self, data-free, also with --data; "
                             "rmse for text-to-image pipelines, whose few-step images should match the many-step "
                             "image of the same latents; fd_data: Fréchet distance in the model's own features to "
                             "the --data images, needs --data)")
    parser.add_argument("--objective", default="trajectory", choices=OBJECTIVES, help="what the tables minimise")
    parser.add_argument("--method", default="adam", choices=METHODS, help="adam (gradients) or fixed_point (bounds)")
    parser.add_argument("--free-last", action="store_true", help="also learn the last positive σ of each table")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-iters", type=int, default=None, help="iterations per learned table (upper limit)")
    parser.add_argument("--starts", type=int, default=None, help="best-scoring candidates learned further per NFE")
    parser.add_argument("--batch-size", type=int, default=None, help="paths per iteration")
    parser.add_argument("--pool-size", type=int, default=None, help="training paths shared by all NFEs")
    parser.add_argument("--validation-size", type=int, default=None, help="held-out noises that score the candidates")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the table's logits")
    parser.add_argument("--reference-scheduler", default=None,
                        help="what the tables are fitted to and selected by, from the same noises: ode (a DPM-Solver++(2M) "
                             "solve of the ODE; the default) or pipeline (the image the pipeline makes: the model's own "
                             "diffusers scheduler at --reference-steps, by default the pipeline's own step count; the "
                             "default for text-to-image "
                             "pipelines whose scheduler is deterministic)")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="steps of the reference (default: ode 200, on a CPU 32; pipeline: the pipeline's default "
                             "num_inference_steps, SD and SDXL 50, SD3 and Flux 28)")
    parser.add_argument("--init", default=None,
                        help="one more candidate table per NFE: a baseline (ddim_trailing, karras, loguniform, ddim_leading), "
                             "peer:<a diffusers scheduler of schedules.STOCK_SCHEDULERS> or a folder of learned tables")
    parser.add_argument("--data", default=None,
                        help="clean images (IDX file, .pt tensor in [-1, 1] or image folder): x0 for the bound "
                             "objectives, and the reference set of the held-out fd_data score of every candidate "
                             "(it keeps the table only with --select-by fd_data)")
    parser.add_argument("--patience", type=int, default=30, help="early stopping patience (iterations)")
    parser.add_argument("--push-to-hub", action="store_true",
                        help="upload --output-dir (tables, plot, log, model card) to the Hub at the end")
    parser.add_argument("--hub-model-id", default=None, help="Hub repo id (default: the output folder's name)")
    parser.add_argument("--hub-private-repo", action="store_true", help="create the Hub repo private")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                        help="autocast of the model calls (default: bf16 on cuda)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute model calls in backward")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from .conditioning import add_arguments as add_text_to_image_arguments

    add_text_to_image_arguments(parser)


def existing_tables(config) -> dict:
    """`{nfe: (table, solver)}` of a `LearnedScheduleScheduler` config (`outputs.read_scheduler_tables`)."""
    if not config:
        return {}
    per_nfe = config.get("solvers") or {}
    return {int(k): (v, per_nfe.get(k, config.get("solver", "euler"))) for k, v in (config.get("sigma_tables") or {}).items()}


def save_merged(output_dir: str, base_config, result: ScheduleResult, existing_config, overwrite: bool,
                base_model: str) -> dict:
    """Add `result`'s tables to the folder's (atomically): an NFE already there is replaced when the new run kept
    a new table for it (the old one competed and lost) or with `overwrite`. Returns `{nfe: "added"|"replaced"|"kept"}`."""
    from .model_card import save_optimize_card
    from .outputs import atomic_write_json, merge_tables, write_scheduler
    from .plotting import plot_schedule_comparison

    old = existing_tables(existing_config)
    kept_old = {n for n in result.tables if not overwrite and _kept(result, n)["source"] == "existing"}
    replace = [n for n in result.tables if n in old and n not in kept_old]
    prov = result.provenance(base_model)
    tables, solvers, provenance = merge_tables(existing_config, result.tables, result.solvers, {
        n: r for n, r in ((int(k), v) for k, v in prov.pop("per_nfe").items())}, replace, run_provenance=prov)
    default = max(sorted(set(solvers.values())), key=list(solvers.values()).count)
    scheduler = write_scheduler(output_dir, base_config, tables, solvers, default, provenance)
    plot_schedule_comparison(tables, scheduler.noise_schedule, os.path.join(output_dir, "schedule.png"),
                             title=f"σ tables in {os.path.basename(os.path.abspath(output_dir))}")
    atomic_write_json(os.path.join(output_dir, "optimize_log.json"), result.log(base_model))
    save_optimize_card(output_dir, dict(scheduler.config))
    return {n: "kept" if n in kept_old else "replaced" if n in replace else "added" for n in result.tables}


def _kept(result: ScheduleResult, nfe: int) -> dict:
    return next(c for c in result.candidates[nfe] if c["kept"])


def summary_lines(result: ScheduleResult, measure: str) -> list:
    """Per NFE: the kept table against DDIM (trailing) and the best stock table, on the held-out noises."""
    s = result.settings
    of = " of decoded images" if measure == "rmse" and s.get("rmse_of") == "decoded images" else ""
    lines = [f"held-out {measure}{of} against the reference solutions ({s['reference_solver']}, {s['reference_steps']} "
             f"steps; lower is better; {s['validation_size']} noises the optimiser never trained on):",
             f"{'NFE':>4}  {'kept':<34} {measure:>9}  {'DDIM trailing':>13}  {'kept vs DDIM':>12}  best stock table"]
    for nfe in result.tables:
        cands = result.candidates[nfe]
        kept = next(c for c in cands if c["kept"])
        ddim = next((c for c in cands if c["name"] == "ddim_trailing+euler" and measure in c["scores"]), None)
        stock = [c for c in cands if c["source"] == "stock" and measure in c["scores"]]
        top = min(stock, key=lambda c: c["scores"][measure], default=None)
        score = kept["scores"].get(measure)
        change = f"{100 * (score / ddim['scores'][measure] - 1):+.0f}%" if ddim and score is not None else "–"
        lines.append(f"{nfe:>4}  {kept['name']:<34} {_num(score):>9}  {_num(ddim and ddim['scores'][measure]):>13}  "
                     f"{change:>12}  {top['name'] + ' ' + _num(top['scores'][measure]) if top else '–'}")
    return lines


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def default_output_dir(model: str) -> str:
    """`outputs/<name>-fewstep` for a model folder or Hub id (`user/name` → `name`)."""
    return os.path.join("outputs", os.path.basename(os.path.normpath(model)) + "-fewstep")


def run(args: argparse.Namespace) -> int:
    """Learn, select and save the tables; print the held-out comparison and where the files are."""
    from .adapter import SigmaDenoiser
    from .conditioning import load_from_args
    from .data import load_images
    from .hub import load_model_and_scheduler_config, portable_model_ref
    from .reference import default_reference, pipeline_steps
    from .outputs import read_scheduler_tables

    args.output_dir = args.output_dir or default_output_dir(args.model)
    try:  # before any model is loaded
        check_measure(args.select_by or "fd_self", has_data=bool(args.data), conditional=args.prompts_file is not None)
    except ValueError as err:
        raise UsageError(f"--select-by {err}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    existing_config = read_scheduler_tables(args.output_dir)
    t2i = load_from_args(args, device)  # a text-to-image pipeline with prompts, or None
    loss, select_by = phase1_measures(t2i is not None)
    args.loss, args.select_by = args.loss or loss, args.select_by or select_by
    args.reference_scheduler = args.reference_scheduler or default_reference(t2i, args.quiet)
    if t2i is not None:
        denoiser, config, cond, uncond = t2i.denoiser, t2i.scheduler_config, t2i.cond, t2i.uncond
    else:
        model, config = load_model_and_scheduler_config(args.model)
        denoiser, cond, uncond = SigmaDenoiser(model.to(device).eval(), config), None, None
    data = load_images(args.data, sample_shape(denoiser)) if args.data else None
    base_model = portable_model_ref(args.model)
    existing = {} if args.overwrite else existing_tables(existing_config)
    status = {}

    def save(nfe, result):  # each step count as soon as it is done, merged with the folder's tables
        status.update(save_merged(args.output_dir, config, result, existing_config, args.overwrite, base_model))

    result = optimize_schedule(
        denoiser, nfes=args.nfe, solver=args.solver, objective=args.objective, loss=args.loss,
        select_by=args.select_by, starts=pick("starts"), free_last=args.free_last, method=args.method,
        num_iters=pick("max_iters"), batch_size=pick("batch_size"), lr=args.lr,
        validation_size=pick("validation_size"), pool_size=pick("pool_size"), data=data, cond=cond, uncond=uncond,
        init=starting_tables(args.init, args.nfe, config), existing={n: v for n, v in existing.items() if n in args.nfe},
        reference_steps=pipeline_steps(args.reference_steps, t2i) if args.reference_scheduler == "pipeline" else pick("reference_steps"),
        reference_scheduler=args.reference_scheduler, seed=args.seed, device=device, progress=not args.quiet,
        patience=args.patience, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, decode=t2i and t2i.decode, on_table=save)
    if result.settings["validation_size"]:
        print("\n".join(summary_lines(result, args.select_by)))
    for nfe, what in status.items():
        if what != "added":
            reason = "--overwrite" if args.overwrite else "it scored better on the held-out noises"
            print(f"NFE {nfe}: {'replaced the table' if what == 'replaced' else 'kept the better table'} already in "
                  f"{args.output_dir}" + (f" ({reason})" if what == "replaced" else ""))
    every = sorted(set(result.tables) | set(existing_tables(existing_config)))
    print(f"wrote {args.output_dir}/scheduler (tables for {every} steps), {args.output_dir}/schedule.png, "
          f"{args.output_dir}/optimize_log.json, {args.output_dir}/README.md")
    if args.push_to_hub:
        from .hub import push_folder

        print(f"uploaded to https://huggingface.co/{push_folder(args.output_dir, args.hub_model_id, args.hub_private_repo)}")
    return 0


