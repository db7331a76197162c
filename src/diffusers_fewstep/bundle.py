"""Few-step bundles: a learned schedule, optionally with the model tuned on its steps (DESIGN.md §6).

A bundle is an ordinary folder (local path or Hub repo id)::

    bundle/
      scheduler/scheduler_config.json   # LearnedScheduleScheduler: σ tables, solver, provenance (required)
      unet/ or transformer/             # tuned full weights (optional, Phase 2)
      lora/ (or unet_lora/, transformer_lora/)
                                        # or a LoRA adapter for the base model (optional, Phase 2):
                                        #   peft format:      adapter_config.json + adapter_model.safetensors
                                        #                     (`PeftModel.save_pretrained`, `save_bundle`)
                                        #   diffusers format: pytorch_lora_weights.safetensors (`save_lora_weights`)
      README.md                         # model card (optional)

:func:`load_bundle` reads one, :func:`apply_bundle` puts it into a pipeline after checking that it was
learned for that pipeline's model (:func:`check_bundle_compatible`), and :func:`save_bundle` writes one.
The few-step pipelines expose this as ``pipe.load_fewstep(path_or_hub_id)``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .hub import load_json, resolve_folder
from .scheduler import LearnedScheduleScheduler

logger = logging.getLogger(__name__)

DENOISER_NAMES = ("unet", "transformer")
LORA_SUBFOLDER = "lora"
LORA_FOLDERS = (LORA_SUBFOLDER, "unet_lora", "transformer_lora", ".")  # where load_bundle looks, in order
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class FewStepBundle:
    """What a bundle folder holds.

    Args:
        folder (`str`): the local folder (downloaded from the Hub when given a repo id).
        scheduler (`LearnedScheduleScheduler`): the learned σ tables.
        model_subfolder (`str`, *optional*): `"unet"` or `"transformer"` when the bundle holds tuned weights.
        lora_folder (`str`, *optional*): the folder holding a LoRA adapter.
        lora_format (`str`, *optional*): `"peft"` or `"diffusers"`.
    """

    folder: str
    scheduler: LearnedScheduleScheduler
    model_subfolder: Optional[str] = None
    lora_folder: Optional[str] = None
    lora_format: Optional[str] = None


def _find_lora(folder: str):
    for candidate in (os.path.normpath(os.path.join(folder, sub)) for sub in LORA_FOLDERS):
        if os.path.isfile(os.path.join(candidate, PEFT_CONFIG_FILE)):
            return candidate, "peft"
        if os.path.isfile(os.path.join(candidate, DIFFUSERS_LORA_FILE)):
            return candidate, "diffusers"
    return None, None


def load_bundle(path_or_hub_id: str) -> FewStepBundle:
    """Read a bundle from a local folder or a Hub repo id.

    Args:
        path_or_hub_id (`str`): a folder holding `scheduler/` (and optionally `unet/`, `transformer/` or `lora/`),
            or the id of a Hub repository with that layout.
    """
    folder = resolve_folder(str(path_or_hub_id))
    if not os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
        raise FileNotFoundError(
            f"{path_or_hub_id!r} is not a few-step bundle: it has no scheduler/scheduler_config.json "
            "(learn one with `diffusers-fewstep optimize`, or save one with `diffusers_fewstep.bundle.save_bundle`)")
    scheduler = LearnedScheduleScheduler.from_pretrained(folder, subfolder="scheduler")
    models = [name for name in DENOISER_NAMES if os.path.isfile(os.path.join(folder, name, "config.json"))]
    lora_folder, lora_format = _find_lora(folder)
    if len(models) > 1 or (models and lora_folder):
        raise ValueError(f"bundle {path_or_hub_id!r} holds {models + (['lora'] if lora_folder else [])}; "
                         "a bundle carries at most one of tuned weights (unet/ or transformer/) or a LoRA adapter")
    return FewStepBundle(folder, scheduler, models[0] if models else None, lora_folder, lora_format)


def pipeline_denoiser_name(pipe) -> str:
    """`"unet"` or `"transformer"`: the attribute of `pipe` holding the denoising model."""
    for name in DENOISER_NAMES:
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer`; few-step bundles need one")


def check_bundle_compatible(bundle: FewStepBundle, pipe) -> None:
    """Raise `ValueError` when `bundle` was learned for another model family or noise schedule than `pipe`'s.

    Compares (1) the noise schedule the tables were learned for with `pipe.scheduler.config`
    (`LearnedScheduleScheduler.check_compatible`), (2) the model class recorded in the provenance, if any,
    and (3) the tuned model's class and config with the pipeline's model.
    """
    where = f"bundle {bundle.folder!r}"
    try:
        bundle.scheduler.check_compatible(pipe.scheduler.config)
    except ValueError as err:
        raise ValueError(f"{where} does not fit {type(pipe).__name__}: {err}") from None
    name = pipeline_denoiser_name(pipe)
    model = getattr(pipe, name)
    provenance = bundle.scheduler.config.get("provenance") or {}
    learned_class = provenance.get("model_class")
    if learned_class and learned_class != type(model).__name__:
        raise ValueError(f"{where} was learned for a {learned_class}, but this pipeline's {name} is a "
                         f"{type(model).__name__}")
    base_model = provenance.get("base_model")
    pipe_model = pipe.config.get("_name_or_path")
    if base_model and pipe_model and os.path.basename(str(base_model).rstrip("/")) != os.path.basename(
            str(pipe_model).rstrip("/")):
        logger.warning("%s was learned for %s; this pipeline was loaded from %s", where, base_model, pipe_model)
    if bundle.model_subfolder:
        _check_tuned_model(bundle, name, model)


def _check_tuned_model(bundle: FewStepBundle, name: str, model) -> None:
    if bundle.model_subfolder != name:
        raise ValueError(f"bundle {bundle.folder!r} holds a tuned {bundle.model_subfolder}/, "
                         f"but this pipeline's model is its {name}")
    tuned = load_json(os.path.join(bundle.folder, name, "config.json"))
    if tuned.get("_class_name") != type(model).__name__:
        raise ValueError(f"bundle {bundle.folder!r} holds a tuned {tuned.get('_class_name')}, "
                         f"but this pipeline's {name} is a {type(model).__name__}")
    differ = sorted(k for k, v in model.config.items()
                    if not k.startswith("_") and k in tuned and _as_list(tuned[k]) != _as_list(v))
    if differ:
        details = ", ".join(f"{k}: bundle {tuned[k]!r} vs pipeline {model.config[k]!r}" for k in differ)
        raise ValueError(f"bundle {bundle.folder!r} holds a tuned {name} of another architecture ({details})")


def _as_list(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def apply_bundle(pipe, bundle: FewStepBundle, adapter_name: str = "fewstep"):
    """Check `bundle` against `pipe`, then set its scheduler and load its tuned weights or LoRA adapter.

    Args:
        pipe (`DiffusionPipeline`): any pipeline with a `unet` or a `transformer` and a `scheduler`.
        bundle (`FewStepBundle`): from :func:`load_bundle`.
        adapter_name (`str`, *optional*, defaults to `"fewstep"`): the name the LoRA adapter is loaded under.
    """
    check_bundle_compatible(bundle, pipe)
    name = pipeline_denoiser_name(pipe)
    if bundle.model_subfolder:
        current = getattr(pipe, name)
        tuned = type(current).from_pretrained(bundle.folder, subfolder=name, torch_dtype=current.dtype)
        pipe.register_modules(**{name: tuned.to(current.device)})
    if bundle.lora_folder:
        _load_lora(pipe, name, bundle, adapter_name)
    # a fresh scheduler per pipeline: schedulers carry per-run state
    pipe.register_modules(scheduler=LearnedScheduleScheduler.from_config(bundle.scheduler.config))
    return pipe


def _load_lora(pipe, name: str, bundle: FewStepBundle, adapter_name: str) -> None:
    if bundle.lora_format == "diffusers":
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"{type(pipe).__name__} cannot load diffusers-format LoRA weights "
                             f"({DIFFUSERS_LORA_FILE}); save the adapter in peft format instead (save_bundle)")
        pipe.load_lora_weights(bundle.lora_folder, adapter_name=adapter_name)
        return
    load_peft_adapter(getattr(pipe, name), bundle.lora_folder, adapter_name)


def load_peft_adapter(model: torch.nn.Module, folder: str, adapter_name: str = "fewstep") -> torch.nn.Module:
    """Inject the LoRA adapter saved in `folder` (peft format) into `model`, in place."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(folder)
    state = load_file(os.path.join(folder, PEFT_WEIGHTS_FILE))
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}  # PeftModel.save_pretrained keys
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA adapter in {folder} does not fit this {type(model).__name__}: "
                         f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    return model


def save_bundle(save_directory: str, scheduler: LearnedScheduleScheduler, model: Optional[torch.nn.Module] = None,
                lora_model: Optional[torch.nn.Module] = None, adapter_name: str = "default",
                push_to_hub: bool = False, repo_id: Optional[str] = None, **hub_kwargs) -> str:
    """Write a bundle folder (and optionally upload it to the Hub).

    Args:
        save_directory (`str`): the folder to write.
        scheduler (`LearnedScheduleScheduler`): the learned tables; written to `scheduler/`.
        model (`torch.nn.Module`, *optional*): tuned full weights; written to `unet/` or `transformer/`.
        lora_model (`torch.nn.Module`, *optional*): a model carrying a peft LoRA adapter `adapter_name`;
            the adapter alone is written to `lora/` in peft format.
        adapter_name (`str`, *optional*, defaults to `"default"`): which adapter of `lora_model` to save.
        push_to_hub (`bool`, *optional*, defaults to `False`): upload the folder to `repo_id`.
        repo_id (`str`, *optional*): Hub repository; defaults to the folder's name.
    """
    if model is not None and lora_model is not None:
        raise ValueError("pass either `model` (tuned weights) or `lora_model` (an adapter), not both")
    os.makedirs(save_directory, exist_ok=True)
    scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))
    if model is not None:
        name = "transformer" if "Transformer" in type(model).__name__ else "unet"
        model.save_pretrained(os.path.join(save_directory, name))
    if lora_model is not None:
        _save_peft_adapter(lora_model, os.path.join(save_directory, LORA_SUBFOLDER), adapter_name)
    if push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id or os.path.basename(os.path.abspath(save_directory)), exist_ok=True,
                              **hub_kwargs).repo_id
        upload_folder(repo_id=repo_id, folder_path=save_directory, commit_message="Upload few-step bundle")
    return save_directory


def _save_peft_adapter(model: torch.nn.Module, folder: str, adapter_name: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"`lora_model` has no peft adapter named {adapter_name!r} (adapters: {list(configs)})")
    os.makedirs(folder, exist_ok=True)
    configs[adapter_name].save_pretrained(folder)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(folder, PEFT_WEIGHTS_FILE))
