"""Few-step quality of stock and learned schedulers on a tiny Fashion-MNIST text-to-image pipeline.

    python benchmarks/t2i/evaluate_t2i.py --pipeline assets/fmnist-t2i-sd --classifier .stage/fixtures/fmnist-classifier \
        --data .stage/fashion-mnist --n 2000 --guidance 5 --out benchmarks/results/t2i-sd [--scheduler-folder F ...]

Prompts cycle over the 10 classes ("a photo of a sneaker", …). Every row starts from the same seeded initial latents
and runs the stock pipeline (`StableDiffusionPipeline` / `StableDiffusion3Pipeline`, classifier-free guidance, images
decoded by the pipeline's VAE) with only the scheduler swapped:

- the reference: the pipeline's own scheduler as shipped (SD: PNDM; SD3: FlowMatch Euler) at 50 steps;
- stock schedulers at each NFE (SD: DDIM, DPM-Solver++(2M), UniPC-bh2 and Euler with trailing spacing, Euler with
  Karras σ over the full range; SD3: FlowMatch Euler, DPM-Solver++(2M) and UniPC-bh2 with flow σ, `flow_shift` of the pipeline);
- each `--scheduler-folder` (a `LearnedScheduleScheduler`), at the NFEs it holds tables for.

Measures (decoded images as grey (n, 1, 32, 32) in [-1, 1], the classifier's space): fidelity = mean per-sample RMSE
against the reference image from the same latents; class accuracy = share of samples whose FD-classifier argmax is
the prompted class; FD-FMNIST against the Fashion-MNIST test set, with its sampling noise (`fd_std`: the standard
deviation over 20 bootstrap resamples of the generated set). Writes results.json, results.md and grid.png
(class rows × scheduler columns at `--grid-nfe` steps).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t2i_common import (CLASS_NAMES, eval_prompts, fmnist_labelled, load_pipeline, pick_device,  # noqa: E402
                        to_classifier_space)

# row key -> (diffusers class, config overrides, label)
FD_BOOTSTRAP = 20
SD_PEERS = {
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}, "DDIM trailing"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "timestep_spacing": "trailing"}, "DPM++(2M) trailing"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}, "DPM++(2M) Karras"),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2", "timestep_spacing": "trailing"},
              "UniPC bh2 trailing"),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "Euler trailing"),
    # Karras σ from the full range: Euler derives σ_max/σ_min from its spaced timesteps, and the "leading" spacing
    # that PNDM's config carries would start at σ(667) = 2.9 for 3 steps instead of σ_max = 14.6
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
                     "Euler Karras"),
}


def sd3_peers(shift: float) -> dict:
    flow = {"use_flow_sigmas": True, "flow_shift": shift, "prediction_type": "flow_prediction"}
    return {
        "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}, "FlowMatch Euler"),
        "dpmpp_2m_flow": ("DPMSolverMultistepScheduler", {**flow, "algorithm_type": "dpmsolver++", "solver_order": 2},
                          "DPM++(2M) flow"),
        "unipc_flow": ("UniPCMultistepScheduler", {**flow, "solver_order": 2, "solver_type": "bh2"}, "UniPC bh2 flow"),
    }


def log(msg: str) -> None:
    print(msg, flush=True)


def pipeline_kind(pipe) -> str:
    return "sd3" if hasattr(pipe, "transformer") and getattr(pipe, "transformer", None) is not None else "sd"


def peer_rows(pipe) -> dict:
    return SD_PEERS if pipeline_kind(pipe) == "sd" else sd3_peers(float(pipe.scheduler.config.get("shift", 1.0)))


def build_scheduler(class_name: str, base_config, overrides: dict):
    """`class_name` from the pipeline's scheduler config (keys the class does not take are dropped) + `overrides`."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    base = {k: v for k, v in dict(base_config).items() if k in accepted}
    return cls.from_config({**base, **overrides})


def initial_latents(pipe, n: int, seed: int, device) -> torch.Tensor:
    """The seeded initial latents every row starts from (drawn on `device`, as the pipelines draw them)."""
    denoiser = pipe.unet if pipeline_kind(pipe) == "sd" else pipe.transformer
    size = denoiser.config.sample_size
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(n, denoiser.config.in_channels, size, size, generator=generator, device=device)


@torch.no_grad()
def generate(pipe, scheduler, steps: int, prompts: List[str], latents: torch.Tensor, guidance: float,
             batch: int) -> torch.Tensor:
    """Decoded images in the classifier's space, (n, 1, 32, 32) in [-1, 1], batch by batch through the stock pipeline."""
    pipe.scheduler = scheduler
    out = []
    for j in range(0, len(prompts), batch):
        images = pipe(prompt=prompts[j:j + batch], num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents[j:j + batch].clone(), output_type="pt").images
        out.append(to_classifier_space(images))
    return torch.cat(out)


class Scorer:
    """Class accuracy and FD-FMNIST with the fixture classifier, fidelity against the reference images."""

    def __init__(self, classifier: str, data: str, labels: torch.Tensor, device, fd_ref_limit: int = 0):
        from diffusers_fewstep.evaluation import (extract_features, feature_statistics, load_fmnist_classifier,
                                                  reference_statistics)

        self.net = load_fmnist_classifier(classifier, device)
        self.device, self.labels = device, labels
        self.test_accuracy = None  # the classifier on real images, for scale, where they are at hand
        if fd_ref_limit or os.path.isfile(os.path.join(data, "t10k-images-idx3-ubyte.gz")):
            test, test_labels = fmnist_labelled(data, "test", fd_ref_limit)
            feats = extract_features(self.net, test.to(device))
            self.test_accuracy = self.accuracy(feats, test_labels)
            self.fd_reference, self.test_stats = f"Fashion-MNIST test ({len(test)} images)", feature_statistics(feats)
        else:  # only fd_statistics.npz was carried (written for this classifier)
            self.fd_reference = "Fashion-MNIST test (10000 images)"
            self.test_stats = reference_statistics(self.net, data, device)
        self.reference: Optional[torch.Tensor] = None

    def accuracy(self, feats: np.ndarray, labels: torch.Tensor) -> float:
        logits = self.net.head(torch.from_numpy(feats).float().to(self.device))
        return float((logits.argmax(1).cpu() == labels).float().mean())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Dict[str, float]:
        from diffusers_fewstep.evaluation import endpoint_rmse, extract_features, feature_statistics, frechet_distance

        feats = extract_features(self.net, images.to(self.device))
        fd = lambda rows: frechet_distance(feature_statistics(feats[rows]), self.test_stats)  # noqa: E731
        rng = np.random.default_rng(0)  # the sampling noise of FD at this n: bootstrap over the samples
        boot = [fd(rng.integers(0, len(feats), len(feats))) for _ in range(FD_BOOTSTRAP)]
        scores = {"accuracy": self.accuracy(feats, self.labels), "fd": fd(slice(None)), "fd_std": float(np.std(boot))}
        if self.reference is not None:
            scores["rmse"] = endpoint_rmse(images.cpu(), self.reference)
        return scores


def timed_row(pipe, scheduler, steps, ctx, scorer) -> tuple:
    t0 = time.time()
    images = generate(pipe, scheduler, steps, ctx["prompts"], ctx["latents"], ctx["guidance"], ctx["batch"]).cpu()
    seconds = time.time() - t0
    return images, {**scorer(images), "seconds": round(seconds, 2)}


def evaluate_rows(pipe, rows: dict, nfes: List[int], ctx: dict, scorer, grid: dict, grid_nfe: int) -> dict:
    """Every (row, NFE); `rows[key]` = (scheduler, label, NFEs it supports or None for all, extra info)."""
    results = {}
    for key, (scheduler, label, supported, info) in rows.items():
        entry = {"label": label, "scheduler": type(scheduler).__name__, **info, "results": {}}
        for nfe in nfes:
            if supported is not None and nfe not in supported:
                entry.setdefault("missing_nfes", []).append(nfe)
                continue
            with tuned_model(pipe, info):
                images, scores = timed_row(pipe, scheduler, nfe, ctx, scorer)
            entry["results"][str(nfe)] = scores
            if nfe == grid_nfe:
                grid[key] = images[:len(CLASS_NAMES)]
            log(f"{label:>28s} NFE {nfe:2d}: rmse {scores['rmse']:.4f} acc {scores['accuracy']:.4f} "
                f"FD {scores['fd']:.3f} ({scores['seconds']:.1f}s)")
        results[key] = entry
    return results


def all_rows(pipe, args) -> dict:
    base = pipe.scheduler.config
    rows = {}
    for key, (cls, overrides, label) in peer_rows(pipe).items():
        if args.rows and key not in args.rows:
            continue
        rows[key] = (build_scheduler(cls, base, overrides), label, None, {"config_overrides": overrides})
    for folder in args.scheduler_folder:
        name = os.path.basename(os.path.normpath(folder))
        rows[f"learned:{name}"] = learned_row(folder, name, base)
    return rows


def learned_row(folder: str, name: str, base_config) -> tuple:
    """(scheduler, label, its NFEs, info) for a learned schedule folder, checked against the pipeline's schedule. A
    `scripts/train_fewstep.py` output folder also holds the tuned model: its LoRA (`pytorch_lora_weights.safetensors`,
    diffusers' format) or its full `unet/`; the row then samples with it (`info["tuned"]`)."""
    from diffusers_fewstep import LearnedScheduleScheduler

    scheduler = LearnedScheduleScheduler.from_folder(folder)
    if hasattr(scheduler, "check_compatible"):
        scheduler.check_compatible(base_config)
    nfes = sorted(int(k) for k in scheduler.config.sigma_tables)
    # newer versions may learn a different solver per step count (`solver_for`)
    solvers = {str(n): scheduler.solver_for(n) if hasattr(scheduler, "solver_for") else scheduler.config.solver
               for n in nfes}
    tuned = next((kind for kind, path in TUNED.items() if os.path.exists(os.path.join(folder, path))), None)
    label = f"{'tuned' if tuned else 'learned'} {name} ({'/'.join(sorted(set(solvers.values())) or [scheduler.config.solver])}"
    label += f", {tuned})" if tuned else ")"
    return scheduler, label, set(nfes), {"folder": folder, "solvers": solvers, "tuned": tuned}


TUNED = {"LoRA": "pytorch_lora_weights.safetensors", "unet": os.path.join("unet", "config.json")}


@contextlib.contextmanager
def tuned_model(pipe, info: dict):
    """The pipeline samples with a row's tuned model inside the block (LoRA loaded, or the tuned UNet swapped in), and
    with its own model again after it."""
    if info.get("tuned") == "LoRA":
        pipe.load_lora_weights(info["folder"])
        try:
            yield
        finally:
            pipe.unload_lora_weights()
    elif info.get("tuned") == "unet":
        base = pipe.unet
        pipe.unet = type(base).from_pretrained(os.path.join(info["folder"], "unet")).to(base.device, base.dtype)
        try:
            yield
        finally:
            pipe.unet = base
    else:
        yield


# --- reports -----------------------------------------------------------------------------------------------------
MEASURES = [("rmse", "Fidelity: RMSE against the 50-step image from the same latents (lower is better)", "{:.4f}"),
            ("accuracy", "Class accuracy (higher is better)", "{:.3f}"),
            ("fd", "FD-FMNIST (lower is better)", "{:.2f}")]


def cell(scores: dict, key: str, fmt: str) -> str:
    """One table cell; FD with its bootstrap standard deviation where measured."""
    text = fmt.format(scores[key])
    return text + f" ± {scores['fd_std']:.2f}" if key == "fd" and "fd_std" in scores else text


def markdown(result: dict) -> str:
    ref = result["reference"]
    lines = [f"# Few-step schedulers on `{result['pipeline']}` ({result['pipeline_class']})", "",
             f"{result['n']} samples, prompts cycling over the 10 classes, guidance {result['guidance']}, "
             f"latent seed {result['seed']}, {result['device']}. FD against {result['fd_reference']}"
             + (f"; the classifier labels {result['classifier_test_accuracy']:.3f} of those real images correctly."
                if result["classifier_test_accuracy"] is not None else "."), "",
             f"Reference: {ref['label']}: class accuracy {ref['accuracy']:.3f}, FD {ref['fd']:.2f} "
             f"({ref['seconds']:.1f}s).", ""]
    nfes = result["nfes"]
    for key, title, fmt in MEASURES:
        lines += [f"## {title}", "", "| scheduler | " + " | ".join(str(k) for k in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for row in result["rows"].values():
            cells = [cell(row["results"][str(k)], key, fmt) if str(k) in row["results"] else "–" for k in nfes]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    grid = result["grid"]
    lines += [f"`grid.png`: class rows ({', '.join(CLASS_NAMES)}) × columns {', '.join(grid['columns'])} "
              f"at {grid['nfe']} steps (reference: {ref['steps']} steps).", ""]
    return "\n".join(lines)


def save_grid(path: str, columns: Dict[str, torch.Tensor], scale: int = 3) -> List[str]:
    """Class rows × scheduler columns, each cell a grey sample upscaled `scale`×, column keys on top, class names left."""
    from PIL import Image, ImageDraw

    cell, head, left = 32 * scale, 14, 64
    keys = list(columns)
    canvas = Image.new("L", (left + cell * len(keys), head + cell * len(CLASS_NAMES)), color=255)
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(CLASS_NAMES):
        draw.text((2, head + r * cell + cell // 2 - 5), name, fill=0)
    for c, key in enumerate(keys):
        x = left + c * cell
        draw.text((x + 2, 1), key.replace("learned:", "L:")[: cell // 6], fill=0)
        for r, image in enumerate(columns[key]):
            pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            canvas.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (x, head + r * cell))
    canvas.save(path)
    return keys


# --- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="pipeline folder (train_tiny_t2i.py output)")
    p.add_argument("--classifier", required=True, help="fmnist-classifier fixture folder (with arch.py)")
    p.add_argument("--data", required=True, help="folder with the Fashion-MNIST IDX .gz test files")
    p.add_argument("--out", required=True, help="output folder: results.json, results.md, grid.png")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scheduler-folder", action="append", default=[],
                   help="learned scheduler folder, or a train_fewstep.py output folder (its LoRA or unet/ is used too; repeatable)")
    p.add_argument("--nfes", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    p.add_argument("--rows", nargs="*", default=None, help="stock rows to run (default all): " +
                   ", ".join(list(SD_PEERS) + list(sd3_peers(3.0))))
    p.add_argument("--reference-steps", type=int, default=50)
    p.add_argument("--grid-nfe", type=int, default=4)
    p.add_argument("--batch", type=int, default=250, help="prompts per pipeline call")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fd-ref-limit", type=int, default=0, help="use the first N test images for FD (0: all)")
    p.add_argument("--device", default="")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.command = "python benchmarks/t2i/evaluate_t2i.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dev, t_start = pick_device(args.device), time.time()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pipe = load_pipeline(args.pipeline, dev)
    prompts, labels = eval_prompts(args.n)
    ctx = {"prompts": prompts, "latents": initial_latents(pipe, args.n, args.seed, dev), "guidance": args.guidance,
           "batch": args.batch}
    scorer = Scorer(args.classifier, args.data, labels, dev, args.fd_ref_limit)
    rows = all_rows(pipe, args)  # before the reference: a bad scheduler folder fails fast

    native = type(pipe.scheduler).from_config(pipe.scheduler.config)
    images, ref = timed_row(pipe, native, args.reference_steps, ctx, scorer)
    ref.update(label=f"{type(native).__name__} (as shipped), {args.reference_steps} steps",
               scheduler=type(native).__name__, steps=args.reference_steps)
    log(f"reference {ref['label']}: acc {ref['accuracy']:.4f} FD {ref['fd']:.3f} ({ref['seconds']:.1f}s)")
    scorer.reference, grid = images, {"reference": images[:len(CLASS_NAMES)]}

    results = evaluate_rows(pipe, rows, args.nfes, ctx, scorer, grid, args.grid_nfe)
    write_outputs(args, pipe, dev, ref, results, grid, scorer, time.time() - t_start)


def write_outputs(args, pipe, dev, ref, results, grid, scorer, seconds) -> None:
    import diffusers

    os.makedirs(args.out, exist_ok=True)
    columns = save_grid(os.path.join(args.out, "grid.png"), grid)
    result = {"pipeline": args.pipeline, "pipeline_class": type(pipe).__name__, "kind": pipeline_kind(pipe),
              "n": args.n, "guidance": args.guidance, "seed": args.seed, "nfes": args.nfes,
              "prompt_template": eval_prompts(1)[0][0].replace(CLASS_NAMES[0], "{class}"),
              "fd_reference": scorer.fd_reference, "classifier_test_accuracy": scorer.test_accuracy,
              "reference": ref, "rows": results,
              "grid": {"png": "grid.png", "nfe": args.grid_nfe, "columns": columns, "rows": CLASS_NAMES},
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
              "command": args.command,
              "wall_seconds": round(seconds, 1)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(result))
    log(f"wrote {args.out}/results.json, results.md, grid.png in {seconds:.0f}s")


if __name__ == "__main__":
    main()
