"""Time one Phase-2 optimiser step on the fixture, for the speed options of `scripts/train_fewstep.py`.

One step is what `train._phase2` does per optimiser step: `finetune.phase2_loss` on a batch of teacher
trajectories (4-step DDIM-trailing table, `--target`), backward, gradient clipping, AdamW step. Variants:
fp32; bf16 autocast (`--mixed_precision bf16`); + channels-last weights (`--channels_last`); + torch.compile
(`--compile`); + fused AdamW (`--use_fused_adamw`); all three; the trajectory's N steps in one batched call
(`--phase2_batch_steps`), alone, compiled, and compiled with CUDA graphs (mode "reduce-overhead"); LoRA (peft) on `finetune.LORA_TARGET_MODULES`,
on the attention projections only, and on the Linear layers only (no convolution adapters). Then the
teacher trajectories: one batch per optimiser step (fresh) against the per-round pool `train.build_pool`
makes (`--pool_size`, amortised over `--phase2_steps`).

Each timing is the median of `--steps` repeats after `--warmup` (CUDA events on CUDA, wall clock
elsewhere); the table goes to stdout and everything to `--out` (JSON, rewritten after every variant, so a
run cut short keeps what it measured).

    PYTHONPATH=src python benchmarks/profile_phase2.py --out profile_phase2.json      # GPU: the fixture
    PYTHONPATH=src python benchmarks/profile_phase2.py --tiny --steps 2 --out p.json  # CPU smoke test
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from diffusers_fewstep import DEFAULT_MODEL  # noqa: E402
from diffusers_fewstep.adapter import SigmaDenoiser  # noqa: E402
from diffusers_fewstep.finetune import (LORA_ATTENTION_MODULES, LORA_TARGET_MODULES, add_lora,  # noqa: E402
                                        lora_target_modules, phase2_loss, teacher_states)
from diffusers_fewstep.evaluation import sample_shape  # noqa: E402
from diffusers_fewstep.schedules import baseline_sigmas  # noqa: E402
from diffusers_fewstep.train import _synced, build_pool, compile_backend, compile_model  # noqa: E402

# name -> settings; "lora": None (full fine-tuning) or the adapter's target set
VARIANTS = {
    "fp32": {},
    "bf16": {"bf16": True},
    "bf16+channels_last": {"bf16": True, "channels_last": True},
    "bf16+compile": {"bf16": True, "compile": True},
    "bf16+fused_adamw": {"bf16": True, "fused": True},
    "bf16+channels_last+compile+fused_adamw": {"bf16": True, "channels_last": True, "compile": True, "fused": True},
    "bf16+channels_last+batch_steps": {"bf16": True, "channels_last": True, "batch_steps": True},
    "fp32+batch_steps": {"batch_steps": True},
    "bf16+channels_last+batch_steps+compile": {"bf16": True, "channels_last": True, "batch_steps": True, "compile": True},
    "bf16+channels_last+batch_steps+cudagraphs": {"bf16": True, "channels_last": True, "batch_steps": True,
                                                  "compile": "reduce-overhead"},
    "bf16+lora": {"bf16": True, "lora": "all"},
    "bf16+lora_attention": {"bf16": True, "lora": "attention"},
    "bf16+lora_no_conv": {"bf16": True, "lora": "no_conv"},
}
POOL_VARIANTS = ("bf16", "bf16+channels_last")
TINY = {"batch_size": 8, "pool_batch_size": 16, "pool_size": 64, "reference_steps": 10, "warmup": 1}
FULL = {"batch_size": 128, "pool_batch_size": 1024, "pool_size": 8192, "reference_steps": 200, "warmup": 5}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=str, default=DEFAULT_MODEL, help="Pipeline folder (scheduler/ + unet/).")
    parser.add_argument("--tiny", action="store_true", help="A 45k-parameter 8×8 UNet and small sizes (CPU test).")
    parser.add_argument("--variants", type=str, nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="Variants to time.")
    parser.add_argument("--nfe", type=int, default=4, help="Steps of the table.")
    parser.add_argument("--target", type=str, default="trajectory", help="Phase-2 target (finetune.PHASE2_TARGETS).")
    parser.add_argument("--solver", type=str, default="euler", help="Few-step solver.")
    parser.add_argument("--batch_size", type=int, default=None, help="Trajectories per step (default 128; --tiny 8).")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first, compilation included (default 5; --tiny 1).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per variant.")
    parser.add_argument("--reference_steps", type=int, default=None, help="Teacher reference solve (default 200; --tiny 10).")
    parser.add_argument("--pool_batch_size", type=int, default=None, help="Batch of the pool's teacher solves (default 1024; --tiny 16).")
    parser.add_argument("--pool_size", type=int, default=None, help="Trajectories per round (default 8192; --tiny 64).")
    parser.add_argument("--pool_repeats", type=int, default=2, help="Timed repeats of each teacher solve.")
    parser.add_argument("--phase2_steps", type=int, default=1000, help="Optimiser steps per round the pool is amortised over.")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device.")
    parser.add_argument("--torch_profile", type=str, nargs="*", default=[], choices=list(VARIANTS),
                        help="Variants to trace with torch.profiler too (their top ops go beside --out).")
    parser.add_argument("--out", type=str, required=True, help="JSON file for the results.")
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- model and data ----------------------------------------------------------------------------------
def load_base(args):
    """(unet, scheduler config) of the fixture, or of a tiny random UNet with `--tiny`."""
    from diffusers import DDPMScheduler, UNet2DModel

    if not args.tiny:
        from diffusers_fewstep.hub import load_model_and_scheduler_config

        return load_model_and_scheduler_config(args.model)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    return unet, dict(DDPMScheduler().config)


def lora_targets(unet, which: str) -> list:
    if which == "attention":
        return lora_target_modules(unet, LORA_ATTENTION_MODULES)
    if which == "no_conv":
        return lora_target_modules(unet, LORA_TARGET_MODULES, layer_types=(nn.Linear,))
    return lora_target_modules(unet)


def build_student(args, settings: dict, config: dict):
    """The model of one variant as a σ-space denoiser, and its optimiser."""
    unet, _ = load_base(args)
    if settings.get("lora"):
        unet.requires_grad_(False)
        unet = add_lora(unet, rank=args.lora_rank, target_modules=lora_targets(unet, settings["lora"]))
    unet.to(args.device).train()
    if settings.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    if settings.get("compile"):
        mode = settings["compile"] if isinstance(settings["compile"], str) else None  # reduce-overhead: CUDA graphs
        compile_model(unet, args.device, mode)
    params = [p for p in unet.parameters() if p.requires_grad]
    fused = True if settings.get("fused") and torch.device(args.device).type == "cuda" else None
    return SigmaDenoiser(unet, config), torch.optim.AdamW(params, lr=1e-6, fused=fused), params


def autocast(args, settings: dict):
    device = torch.device(args.device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(settings.get("bf16")) and device.type == "cuda")


# --- timing ------------------------------------------------------------------------------------------------
def timed(fn, args, repeats: int, warmup: int) -> list:
    """Milliseconds of `fn()` for `repeats` calls after `warmup` (CUDA events on CUDA)."""
    cuda = torch.device(args.device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def summary(times: list) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "repeats": len(times)}


def time_variant(args, name: str, states, table, config) -> dict:
    """One optimiser step of Phase 2 in variant `name`."""
    settings = VARIANTS[name]
    cuda = torch.device(args.device).type == "cuda"
    torch._dynamo.reset()
    student, optimizer, params = build_student(args, settings, config)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(args, settings):
            loss, _ = phase2_loss(student, states, table, args.target, args.solver,
                                  batch_steps=bool(settings.get("batch_steps")))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # the first step (compilation included), timed alone
    first_s = _synced(args.device, t0)
    result = summary(timed(step, args, args.steps, max(0, args.warmup - 1)))
    if name in args.torch_profile:
        result["torch_profile"] = trace(step, args, name)
    result.update(settings=settings, first_step_s=round(first_s, 3), trainable_params=sum(p.numel() for p in params),
                  samples_per_s=args.batch_size / result["median_ms"] * 1000,
                  backend=compile_backend(args.device) if settings.get("compile") else None,
                  fused_adamw=bool(settings.get("fused")) and cuda,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    return result


def trace(step, args, name: str) -> dict:
    """torch.profiler over 3 steps of `step`: the ops by device time (and by CPU time) go to a text file beside
    `--out`; returns its path and, per step, the milliseconds of device work and of host (CPU) op time. Device work
    well below the step's time means the host sets the pace (kernel launches, waits for the device)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    by_device = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path = os.path.splitext(args.out)[0] + f"_trace_{name.replace('+', '_')}.txt"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"torch.profiler, 3 steps of {name}, sorted by {by_device}\n")
        f.write(events.table(sort_by=by_device, row_limit=40) + "\n\nsorted by self_cpu_time_total\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=25))
    device_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    host_us = sum(e.self_cpu_time_total for e in events)
    return {"path": path, "device_ms_per_step": device_us / 3000 if cuda else 0.0, "host_ms_per_step": host_us / 3000}


def time_pool(args, teacher_name: str, table, config) -> dict:
    """Teacher trajectories: a fresh batch per optimiser step against the per-round pool (`train.build_pool`)."""
    settings = VARIANTS[teacher_name]
    unet, _ = load_base(args)
    unet.to(args.device).eval()
    if settings.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    teacher = SigmaDenoiser(unet, config)
    opts = SimpleNamespace(pool_batch_size=args.pool_batch_size, sample_shape=sample_shape(unet),
                           reference_steps=args.reference_steps, reference_scheduler="ode")

    def solve(n):
        with autocast(args, settings):
            build_pool(teacher, table, n, opts, torch.Generator().manual_seed(0), args.device)

    per_batch = statistics.median(timed(lambda: solve(args.batch_size), args, args.pool_repeats, 1))
    per_pool_batch = statistics.median(timed(lambda: solve(args.pool_batch_size), args, args.pool_repeats, 1))
    batches = -(-args.pool_size // args.pool_batch_size)
    per_round_s = batches * per_pool_batch / 1000
    return {"teacher": teacher_name, "reference_steps": args.reference_steps,
            "fresh_per_step_ms": per_batch, "pool_batch_ms": per_pool_batch, "pool_size": args.pool_size,
            "pool_per_round_s": per_round_s, "pool_per_step_ms": per_round_s * 1000 / args.phase2_steps,
            "phase2_steps": args.phase2_steps}


# --- report ---------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    import diffusers

    device = torch.device(args.device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "model": "tiny UNet2DModel (8×8)" if args.tiny else args.model, "batch_size": args.batch_size,
            "nfe": args.nfe, "target": args.target, "solver": args.solver, "warmup": args.warmup,
            "steps": args.steps, "command": " ".join([os.path.basename(sys.executable), *sys.argv])}


def table_text(record: dict) -> str:
    lines = [f"Phase-2 optimiser step: {record['env']['device']}, batch {record['env']['batch_size']}, "
             f"{record['env']['nfe']}-step table, target {record['env']['target']}",
             f"{'variant':<40} {'ms/step':>9} {'p10–p90':>17} {'samples/s':>10} {'first s':>8} {'peak GiB':>9} {'trainable':>10}"]
    base = record["variants"].get("fp32", {}).get("median_ms")
    for name, r in record["variants"].items():
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        ratio = f"  ({base / r['median_ms']:.2f}× fp32)" if base else ""
        lines.append(f"{name:<40} {r['median_ms']:>9.2f} {r['p10_ms']:>8.2f}–{r['p90_ms']:<8.2f} "
                     f"{r['samples_per_s']:>10.0f} {r['first_step_s']:>8.2f} {mem:>9} {r['trainable_params']:>10}{ratio}")
    for name, r in record["variants"].items():
        if "torch_profile" in r:
            t = r["torch_profile"]
            lines.append(f"{name} traced: device work {t['device_ms_per_step']:.1f} ms, host ops "
                         f"{t['host_ms_per_step']:.1f} ms per step (under the profiler; {t['path']})")
    for p in record["pool"]:
        lines.append(f"teacher trajectories ({p['teacher']}, {p['reference_steps']}-step reference): fresh per step "
                     f"{p['fresh_per_step_ms']:.1f} ms; pool of {p['pool_size']} per round {p['pool_per_round_s']:.2f} s "
                     f"= {p['pool_per_step_ms']:.2f} ms per step over {p['phase2_steps']} steps")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    base, config = load_base(args)
    table = baseline_sigmas("ddim_trailing", args.nfe, SigmaDenoiser(base, config).schedule).float().to(args.device)
    teacher = SigmaDenoiser(base.to(args.device).eval(), config)
    noise = torch.randn((args.batch_size, *sample_shape(base)), generator=torch.Generator().manual_seed(0))
    with autocast(args, VARIANTS["bf16"]):
        states = teacher_states(teacher, noise.to(args.device), table, args.reference_steps)
    record = {"env": environment(args), "variants": {}, "pool": []}
    for name in args.variants:
        record["variants"][name] = time_variant(args, name, states, table, config)
        print(f"{name}: {record['variants'][name]['median_ms']:.2f} ms/step", flush=True)
        _write(record, args.out)
    for name in POOL_VARIANTS:
        record["pool"].append(time_pool(args, name, table, config))
        _write(record, args.out)
    print(table_text(record), flush=True)
    return record


def _write(record: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
