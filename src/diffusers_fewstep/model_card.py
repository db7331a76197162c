"""Model card (README.md) for a trained few-step output folder: loading snippet, σ plot, metrics per round."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

SIGMA_PLOT = "sigmas.png"


def plot_tables(tables: Dict[str, Sequence[float]], path: str) -> str:
    """The σ tables on a log-σ-per-step plot (:func:`~diffusers_fewstep.plotting.plot_sigma_tables`)."""
    from .plotting import plot_sigma_tables

    ordered = sorted(tables.items(), key=lambda kv: int(kv[0]))
    return plot_sigma_tables({f"learned ({k} steps)": v for k, v in ordered}, path, title="learned σ tables")


def metrics_table(metrics: List[dict]) -> str:
    """Markdown table: one row per (round, phase) with the endpoint RMSE for every NFE."""
    if not metrics:
        return "_no metrics recorded_"
    nfe = lambda k: int(k.split("nfe")[1])  # noqa: E731
    keys = sorted({k for row in metrics for k in row if k.startswith(("rmse_nfe", "fd_nfe"))}, key=lambda k: (nfe(k), k))
    head = "| round | after | optimiser steps | " + " | ".join(f"{k.split('_')[0].upper()} @ {nfe(k)} steps"
                                                              for k in keys) + " |"
    rule = "|" + "---|" * (3 + len(keys))
    body = [f"| {r['round']} | {'Phase 1 (tables)' if r['phase'] == 'phase1' else 'Phase 2 (model)'} | "
            f"{r['global_step']} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys) + " |" for r in metrics]
    return "\n".join([head, rule, *body])


def card_text(base_model: str, tables: Dict[str, Sequence[float]], metrics: List[dict], solver: str,
              use_lora: bool, tuned: bool, repo_id: str) -> str:
    nfes = sorted(int(k) for k in tables)
    if not tuned:
        load = (f'pipe = DDPMPipeline.from_pretrained("{base_model}")  # or your pipeline class\n'
                f'pipe.scheduler = LearnedScheduleScheduler.from_pretrained("{repo_id}", subfolder="scheduler")')
    elif use_lora:
        load = (f'pipe = DDPMPipeline.from_pretrained("{base_model}")  # or your pipeline class\n'
                f'pipe.unet = PeftModel.from_pretrained(pipe.unet, "{repo_id}", subfolder="unet_lora").merge_and_unload()\n'
                f'pipe.scheduler = LearnedScheduleScheduler.from_pretrained("{repo_id}", subfolder="scheduler")')
    else:
        load = f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")  # scheduler/ is a LearnedScheduleScheduler'
    tables_md = "\n".join(f"- {n} steps: `[" + ", ".join(f"{s:.4g}" for s in tables[str(n)]) + "]`" for n in nfes)
    what = ("σ tables learned for this model" + (" and the model tuned on them (LoRA adapter)" if use_lora and tuned
                                                else " and the model tuned on them" if tuned else ""))
    return f"""# Few-step sampling for {base_model}

{what}, for the `{solver}` solver at {", ".join(map(str, nfes))} steps, made with
`diffusers-fewstep` (alternating schedule learning and fine-tuning, after
"Optimizing Few-Step Sampler for Diffusion Probabilistic Model", [arXiv 2412.10786](https://arxiv.org/abs/2412.10786)).

## Use

```python
import diffusers_fewstep  # registers LearnedScheduleScheduler
from diffusers import DDPMPipeline, DiffusionPipeline
from diffusers_fewstep import LearnedScheduleScheduler
from peft import PeftModel

{load}
images = pipe(num_inference_steps={nfes[0]}).images
```

## σ tables

![σ tables]({SIGMA_PLOT})

{tables_md}

## Metrics per round

Endpoint RMSE of the few-step sampler against the base model's many-step DPM-Solver++(2M)
solution from the same noise and, when measured, the Fréchet distance (FD) of its samples to the
reference images (lower is better for both), after each phase.

{metrics_table(metrics)}
"""


def save_model_card(output_dir: str, base_model: str, tables: Dict[str, Sequence[float]], metrics: List[dict],
                    solver: str = "euler", use_lora: bool = False, tuned: bool = True,
                    hub_model_id: Optional[str] = None):
    """Write `README.md` (a `huggingface_hub.ModelCard`) and the σ plot into `output_dir`; returns the card."""
    from huggingface_hub import ModelCard, ModelCardData

    plot_tables(tables, os.path.join(output_dir, SIGMA_PLOT))
    repo_id = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    data = ModelCardData(library_name="diffusers", base_model=base_model if not os.path.isdir(base_model) else None,
                         tags=["diffusers", "diffusers-fewstep", "few-step-sampling"] + (["lora"] if use_lora else []))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + card_text(base_model, tables, metrics, solver, use_lora,
                                                                    tuned, repo_id))
    card.save(os.path.join(output_dir, "README.md"))
    return card
