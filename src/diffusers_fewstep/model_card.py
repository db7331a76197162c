"""Model card (README.md) for a trained few-step output folder: loading snippet, σ plot, metrics per round,
and the tuned model against the base model at the step counts it was tuned for and at others."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from .hub import from_pretrained_call

SIGMA_PLOT = "sigmas.png"
CURVES_PLOT = "curves.png"  # FD / RMSE against steps and wall time, when a run measured more than once


def plot_tables(tables: Dict[str, Sequence[float]], path: str) -> str:
    """The σ tables on a log-σ-per-step plot (:func:`~diffusers_fewstep.plotting.plot_sigma_tables`)."""
    from .plotting import plot_sigma_tables

    ordered = sorted(tables.items(), key=lambda kv: int(kv[0]))
    return plot_sigma_tables({f"learned ({k} steps)": v for k, v in ordered}, path, title="learned σ tables")


def metrics_table(metrics: List[dict], phase1: str = "Phase 1 (tables)") -> str:
    """Markdown table: one row per (round, phase) with the endpoint RMSE for every NFE; `phase1` names the rows
    after Phase 1."""
    if not metrics:
        return "_no metrics recorded_"
    nfe = lambda k: int(k.split("nfe")[1])  # noqa: E731
    keys = sorted({k for row in metrics for k in row if k.startswith(("rmse_nfe", "fd_nfe"))}, key=lambda k: (nfe(k), k))
    head = "| round | after | optimiser steps | " + " | ".join(f"{k.split('_')[0].upper()} @ {nfe(k)} steps"
                                                              for k in keys) + " |"
    rule = "|" + "---|" * (3 + len(keys))
    body = [f"| {r['round']} | {phase1 if r['phase'] == 'phase1' else 'Phase 2 (model)'} | "
            f"{r['global_step']} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys) + " |" for r in metrics]
    return "\n".join([head, rule, *body])


def _row_label(row: dict) -> str:
    table = "reference solve" if row["table"] == "reference" else f"{row['table']} table"
    return f"{row['nfe']} steps ({table}, `{row['solver']}`)"


def step_counts_table(rows: List[dict]) -> str:
    """Markdown table of `training_eval.compare_step_counts` rows: tuned and base model side by side at every count."""
    metrics = [m for m in ("fd", "rmse") if any(f"tuned_{m}" in r for r in rows)]
    head = "| steps | table | solver | tuned for it | " + " | ".join(
        f"{m.upper()} tuned | {m.upper()} base" for m in metrics) + " |"
    rule = "|" + "---|" * (4 + 2 * len(metrics))
    body = [f"| {r['nfe']} | {r['table']} | {r['solver']} | {'yes' if r['tuned_count'] else 'no'} | " + " | ".join(
        f"{r.get(f'tuned_{m}', float('nan')):.4g} | {r.get(f'base_{m}', float('nan')):.4g}" for m in metrics) + " |"
        for r in rows]
    return "\n".join([head, rule, *body])


def specialisation_warning(rows: List[dict], nfes: Sequence[int]) -> str:
    """The warning that counts the model was not tuned for may be worse, with the measured numbers."""
    metric = "fd" if all("tuned_fd" in r for r in rows) else "rmse"
    worse = [r for r in rows if not r["tuned_count"] and r[f"tuned_{metric}"] > r[f"base_{metric}"]]
    counts = ", ".join(map(str, nfes))
    text = (f"**Other step counts may be worse.** This model was tuned for {counts} steps only; "
            "a model tuned for few steps specialises to them.")
    if not worse:
        return text + f" At the other counts measured above it was not worse than the base model ({metric.upper()})."
    found = "; ".join(f"{_row_label(r)}: {metric.upper()} {r[f'tuned_{metric}']:.4g} against the base model's "
                      f"{r[f'base_{metric}']:.4g}" for r in worse)
    return text + f" Measured worse than the base model at {found}. Use the base model at those counts."


def tuning_shortfall(rows: List[dict]) -> str:
    """A warning naming every count the model was tuned for where it measured no better than the base model with the
    same table ("" when tuning helped at all of them)."""
    metric = "fd" if all("tuned_fd" in r for r in rows) else "rmse"
    short = [r for r in rows if r["tuned_count"] and r["table"] == "learned"
             and r[f"tuned_{metric}"] >= r[f"base_{metric}"]]
    if not short:
        return ""
    found = "; ".join(f"{r['nfe']} steps: {metric.upper()} {r[f'tuned_{metric}']:.4g} against the base model's "
                      f"{r[f'base_{metric}']:.4g}" for r in short)
    together = len({r["nfe"] for r in rows if r["tuned_count"]}) > 1
    advice = ("; with several counts tuned at once, training longer may not help (a flow model tuned for 2, 4 and 8 "
              "steps at once stayed worse than the base model at 8 from step 1,200 to 2,400)" if together
              else ", or train longer")
    return (f"**Tuning did not help at every count it was meant for.** No better than the base model with the same "
            f"table at {found}. Sample the base model with the learned table there{advice}.")


def targets_text(targets: Dict[str, str]) -> str:
    """"endpoint at 2 steps; trajectory at 4, 8 steps" from `{count: target}`."""
    by_target: Dict[str, List[str]] = {}
    for n in sorted(targets, key=int):
        by_target.setdefault(targets[n], []).append(str(n))
    return "; ".join(f"{target} at {', '.join(counts)} steps" for target, counts in by_target.items())


def reference_text(settings: Optional[dict]) -> str:
    """What a run's targets and RMSEs are measured against, from its reference settings (`reference.Reference.settings`)."""
    settings = settings or {}
    steps = settings.get("reference_steps", "?")
    if settings.get("reference_scheduler") == "pipeline":
        return f"the image the pipeline's own {settings.get('reference_solver')} makes in {steps} steps"
    return f"the base model's {steps}-step DPM-Solver++(2M) solution"


def step_counts_section(rows: List[dict], nfes: Sequence[int], reference: Optional[dict] = None) -> str:
    if not rows:
        return ""
    zero = "" if (reference or {}).get("reference_scheduler") == "pipeline" else " (so the base model scores 0 on the reference solve)"
    return f"""
## Step counts

Tuned for **{", ".join(map(str, nfes))}** steps. Measured at the end of training on the evaluation noises, the
tuned model next to the base model with the same σ table and solver: at the counts it was tuned for (its learned
tables), at other counts with a hand-made table, and with a many-step DPM-Solver++(2M) solve. RMSE is
against {reference_text(reference)}{zero}.

{step_counts_table(rows)}

{tuning_shortfall(rows)}

{specialisation_warning(rows, nfes)}
"""


def text_to_image_use(base_model: str, repo_id: str, use_lora: bool, tuned: bool, nfe: int, info: dict) -> str:
    """The "Use" snippet of a text-to-image output folder (`info`: `TrainingPipeline.provenance()`): the base
    pipeline, the LoRA (or the tuned model), the learned scheduler, and the guidance scale it was trained with."""
    cls, component = info["pipeline"], info.get("component", "unet")
    lines = [f"pipe = {from_pretrained_call(cls, base_model)}"]
    if tuned and use_lora:
        lines.append(f'pipe.load_lora_weights("{repo_id}")  # pytorch_lora_weights.safetensors')
    elif tuned:
        lines.append(f'pipe.{component} = type(pipe.{component}).from_pretrained("{repo_id}", subfolder="{component}")')
    lines.append(f'pipe.scheduler = LearnedScheduleScheduler.from_pretrained("{repo_id}", subfolder="scheduler")')
    lines.append(f'image = pipe({info["example_prompt"]!r}, num_inference_steps={nfe}, '
                 f'guidance_scale={info["guidance_scale"]:g}).images[0]  # the guidance it was trained with')
    return (f"import diffusers_fewstep  # registers LearnedScheduleScheduler\nfrom diffusers import {cls}\n"
            "from diffusers_fewstep import LearnedScheduleScheduler\n\n" + "\n".join(lines))


def evaluation_name(row: dict) -> str:
    """An evaluation row (or `TrainState.best`) in words: "the Phase-2 evaluation at step 500"."""
    return f"the {row['phase'].replace('phase', 'Phase-')} evaluation at step {row['global_step']}"


def kept_is_last(kept: Optional[dict], metrics: List[dict]) -> bool:
    """Whether the kept evaluation (`TrainState.best`; none kept counts as yes) is the last row of `metrics`."""
    return not kept or not metrics or (kept["global_step"], kept["phase"]) == (
        metrics[-1]["global_step"], metrics[-1]["phase"])


def kept_text(kept: Optional[dict], metrics: List[dict]) -> str:
    """A line when the saved weights are not the last evaluation's (`--keep_best`): which step's, and why."""
    if kept_is_last(kept, metrics):
        return ""
    last = metrics[-1]
    name = kept["metric"].upper() + (" summed over the counts" if len(kept["tables"]) > 1 else "")
    base = ", the base model's: tuning did not improve on it" if kept["global_step"] == 0 else ""
    return (f"\nThe weights and σ tables saved are those of {evaluation_name(kept)}{base} ({name} {kept['value']:.4g}), "
            f"the best of the evaluations above; the last, {evaluation_name(last)}, measured worse.\n")


def card_text(base_model: str, tables: Dict[str, Sequence[float]], metrics: List[dict], solver: str,
              use_lora: bool, tuned: bool, repo_id: str, step_counts: Optional[List[dict]] = None,
              text_to_image: Optional[dict] = None, fixed_tables: Optional[str] = None,
              reference: Optional[dict] = None, targets: Optional[Dict[str, str]] = None,
              kept: Optional[dict] = None) -> str:
    """The card's markdown; `fixed_tables` names the tables of a run that held them fixed (`--phase1_iters 0`),
    `reference` the settings of what its RMSEs are measured against (:func:`reference_text`), `targets` the
    Phase-2 target of every tuned count, `kept` the evaluation whose weights were saved (:func:`kept_text`)."""
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
    curves_md = f"![learning curves]({CURVES_PLOT})\n" if len(metrics) > 1 else ""
    tables_md = "\n".join(f"- {n} steps: `[" + ", ".join(f"{s:.4g}" for s in tables[str(n)]) + "]`" for n in nfes)
    tuned_on = " and the model tuned on them (LoRA adapter)" if use_lora and tuned else " and the model tuned on them" if tuned else ""
    if tuned and targets:
        tuned_on += f" (Phase-2 target: {targets_text(targets)})"
    what = (f"σ tables held fixed (`{fixed_tables}`, not learned: `--phase1_iters 0`){tuned_on}" if fixed_tables
            else f"σ tables learned for this model{tuned_on}")
    use = f"""import diffusers_fewstep  # registers LearnedScheduleScheduler
from diffusers import DDPMPipeline, DiffusionPipeline
from diffusers_fewstep import LearnedScheduleScheduler
from peft import PeftModel

{load}
images = pipe(num_inference_steps={nfes[0]}).images"""
    if text_to_image is not None:
        use = text_to_image_use(base_model, repo_id, use_lora, tuned, nfes[0], text_to_image)
        what += (f" with classifier-free guidance {text_to_image['guidance_scale']:g} inside every step (sample with "
                 f"the same `guidance_scale`), on {text_to_image['num_prompts']} prompts at "
                 f"{text_to_image['height']}×{text_to_image['width']}")
    return f"""# Few-step sampling for {base_model}

{what}, for the `{solver}` solver at {", ".join(map(str, nfes))} steps, made with
`diffusers-fewstep` (alternating schedule learning and fine-tuning, after
"Optimizing Few-Step Sampler for Diffusion Probabilistic Model", [arXiv 2412.10786](https://arxiv.org/abs/2412.10786)).

## Use

```python
{use}
```

## σ tables

![σ tables]({SIGMA_PLOT})

{tables_md}

## Metrics per round

Endpoint RMSE of the few-step sampler against {reference_text(reference)}
from the same noise and, when measured, the Fréchet distance (FD) of its samples to the
reference images (lower is better for both), after each phase.

{metrics_table(metrics, "tables (held fixed)" if fixed_tables else "Phase 1 (tables)")}
{kept_text(kept, metrics)}{curves_md}
{step_counts_section(step_counts or [], nfes, reference)}"""


def save_model_card(output_dir: str, base_model: str, tables: Dict[str, Sequence[float]], metrics: List[dict],
                    solver: str = "euler", use_lora: bool = False, tuned: bool = True,
                    hub_model_id: Optional[str] = None, step_counts: Optional[List[dict]] = None,
                    text_to_image: Optional[dict] = None, fixed_tables: Optional[str] = None,
                    reference: Optional[dict] = None, targets: Optional[Dict[str, str]] = None,
                    kept: Optional[dict] = None):
    """Write `README.md` (a `huggingface_hub.ModelCard`) and the σ plot into `output_dir`; returns the card.
    `text_to_image` (a text-to-image run: pipeline class, guidance scale, prompts) gives its loading snippet; `kept`
    the evaluation whose weights were saved (`TrainState.best`)."""
    from huggingface_hub import ModelCard, ModelCardData

    plot_tables(tables, os.path.join(output_dir, SIGMA_PLOT))
    if len(metrics) > 1:
        from .plotting import plot_training_curves

        plot_training_curves({"": metrics}, os.path.join(output_dir, CURVES_PLOT), title="evaluations during training")
    repo_id = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    data = ModelCardData(library_name="diffusers", base_model=base_model if not os.path.isdir(base_model) else None,
                         tags=["diffusers", "diffusers-fewstep", "few-step-sampling"] + (["lora"] if use_lora else [])
                         + (["text-to-image"] if text_to_image else []))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + card_text(base_model, tables, metrics, solver, use_lora,
                                                                    tuned, repo_id, step_counts, text_to_image,
                                                                    fixed_tables, reference, targets, kept))
    card.save(os.path.join(output_dir, "README.md"))
    return card


# --- the model card of an `optimize` output folder ------------------------------------------------------
def _best(candidates: List[dict], measure: str, keep) -> Optional[dict]:
    scored = [c for c in candidates if keep(c) and measure in c.get("scores", {})]
    return min(scored, key=lambda c: c["scores"][measure], default=None)


def candidates_table(per_nfe: Dict[str, dict]) -> str:
    """Markdown: per step count, the kept table's held-out score next to the best stock table on trailing σ's, the
    best on Karras σ's and the best learned one (every candidate's scores are in the scheduler's provenance)."""
    head = ("| steps | kept (solver) | measure | kept | best trailing | best Karras | best learned |\n"
            "|---|---|---|---|---|---|---|")
    rows = []
    for nfe in sorted(per_nfe, key=int):
        record = per_nfe[nfe]
        measure, cands = record.get("select_by", "rmse"), record.get("candidates", [])
        kept = next((c for c in cands if c["name"] == record.get("kept")), None)
        cells = [_best(cands, measure, lambda c: c["source"] == "stock" and "trailing" in c["name"]),
                 _best(cands, measure, lambda c: c["source"] == "stock" and "karras" in c["name"]),
                 _best(cands, measure, lambda c: c["source"] in ("learned", "end", "resampled"))]
        show = lambda c: "–" if c is None else f"{c['scores'][measure]:.4g} ({c['name']})"  # noqa: E731
        score = "–" if kept is None or measure not in kept["scores"] else f"{kept['scores'][measure]:.4g}"
        rows.append(f"| {nfe} | {record.get('kept', '?')} ({record.get('solver', '?')}) | {measure} | {score} | "
                    + " | ".join(show(c) for c in cells) + " |")
    return "\n".join([head, *rows])


def save_optimize_card(output_dir: str, config: dict, hub_model_id: Optional[str] = None):
    """`README.md` (a `huggingface_hub.ModelCard`) of a folder `optimize` wrote, from its scheduler config
    (`config`: the `LearnedScheduleScheduler` config with its provenance): how to load it, the tables, and how each
    was chosen (:func:`candidates_table`)."""
    from huggingface_hub import ModelCard, ModelCardData

    prov = config.get("provenance") or {}
    base_model = prov.get("base_model") or "BASE_MODEL"
    repo_id = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    nfes = sorted(int(n) for n in config["sigma_tables"])
    solvers = config.get("solvers") or {}
    tables_md = "\n".join(f"- {n} steps, `{solvers.get(str(n), config.get('solver', 'euler'))}`: `["
                          + ", ".join(f"{s:.4g}" for s in config["sigma_tables"][str(n)]) + "]`" for n in nfes)
    settings = prov.get("settings") or {}
    prompt = "" if prov.get("model_class", "UNet2DModel") == "UNet2DModel" else "prompt, "
    reference = reference_text(settings)
    data = ModelCardData(library_name="diffusers", base_model=base_model if not os.path.isdir(base_model) else None,
                         tags=["diffusers", "diffusers-fewstep", "few-step-sampling", "scheduler"])
    text = f"""# Few-step σ tables for `{base_model}`

Learned with diffusers-fewstep's `optimize`: for each step count below, the σ table (and solver) kept among
stock diffusers tables and tables learned from them, scored on held-out noises against {reference} from the
same noise. The model itself is unchanged.

```python
import diffusers_fewstep  # registers LearnedScheduleScheduler
from diffusers import DiffusionPipeline
from diffusers_fewstep import LearnedScheduleScheduler

pipe = {from_pretrained_call("DiffusionPipeline", base_model)}
pipe.scheduler = LearnedScheduleScheduler.from_pretrained("{repo_id}", subfolder="scheduler")
images = pipe({prompt}num_inference_steps={nfes[0]}).images  # one of: {", ".join(map(str, nfes))}
```

## σ tables

![σ tables](schedule.png)

{tables_md}

## How each table was chosen

Held-out scores (lower is better) of the kept table, of the best stock table on trailing σ's, of the best on
Karras σ's and of the best learned table. By construction the kept table scores no worse than any candidate on
this measure (every candidate's scores are in `scheduler/scheduler_config.json`, `provenance.per_nfe`); the
measure is closeness to the reference from the same noise, not image quality itself.

{candidates_table(prov.get("per_nfe") or {})}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + text)
    card.save(os.path.join(output_dir, "README.md"))
    return card
