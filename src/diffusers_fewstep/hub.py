"""Loading diffusers model folders from a local path or a Hub id."""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple


def looks_like_hub_id(value: str) -> bool:
    """Whether `value` is shaped like a Hub repo id `owner/name` (one `/`, the Hub's characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def resolve_folder(path_or_id: str, subfolder: Optional[str] = None) -> str:
    """Local folder for a path or a Hub repo id (downloaded with `huggingface_hub.snapshot_download`)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download

    patterns = None if subfolder is None else [f"{subfolder}/*", "*.json"]
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except Exception as err:  # offline, private or missing
        raise OSError(f"{path_or_id!r} is neither a local folder nor a reachable Hub repo id: {err}") from err


def load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt config file {path}: {err}") from err


def load_model_and_scheduler_config(path_or_id: str, subfolder: Optional[str] = None, torch_dtype=None) -> Tuple:
    """(model, scheduler_config) from a diffusers pipeline folder: `scheduler/` plus `unet/` or `transformer/`."""
    root = resolve_folder(path_or_id)
    if subfolder:
        root = os.path.join(root, subfolder)
    sched_file = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_file):
        raise FileNotFoundError(f"no scheduler/scheduler_config.json in {root}; expected a diffusers pipeline folder")
    config = load_json(sched_file)
    for sub in ("unet", "transformer"):
        cfg = os.path.join(root, sub, "config.json")
        if os.path.isfile(cfg):
            import diffusers

            cls = getattr(diffusers, load_json(cfg)["_class_name"])
            kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
            return cls.from_pretrained(root, subfolder=sub, **kwargs), config
    raise FileNotFoundError(f"no unet/ or transformer/ model in {root}")
