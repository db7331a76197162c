"""Loading diffusers model folders from a local path or a Hub id, and recording which one portably."""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Sequence, Tuple

# a folder of the Hub's download cache: .../models--<owner>--<name>/snapshots/<revision>[/subfolder]
HUB_CACHE_FOLDER = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+(?:/|$)")


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


def portable_model_ref(path_or_id: str) -> str:
    """The model as provenance records it: meaningful on another machine, revealing nothing of this one.

    - a Hub id, or a relative path: as given;
    - a folder of the Hub's download cache: its repo id (`owner/name`);
    - an absolute path under the working directory: relative to it (symlinks resolved);
    - any other absolute path: its folder name behind `…/` (`/home/alice/models/sd15` → `…/sd15`), which
      reads neither as a path nor as a Hub id; pass the model relative to the working directory to record more.
    """
    expanded = os.path.expanduser(path_or_id)
    if not os.path.isabs(expanded):
        return path_or_id
    cached = HUB_CACHE_FOLDER.search(expanded)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    path, cwd = os.path.realpath(expanded), os.path.realpath(os.getcwd())
    if os.path.commonpath([path, cwd]) == cwd:
        return os.path.relpath(path, cwd)
    return f"…/{os.path.basename(path)}"


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


def push_folder(folder: str, repo_id: Optional[str] = None, private: bool = False, token: Optional[str] = None,
                ignore_patterns: Sequence[str] = (), commit_message: str = "learned few-step schedule") -> str:
    """Create the Hub repo `repo_id` (default: the folder's name) and upload `folder` into it; returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id or os.path.basename(os.path.abspath(folder)), exist_ok=True, private=private,
                          token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                  ignore_patterns=list(ignore_patterns), token=token)
    return repo_id


def absent_components(path_or_id: str, **kwargs) -> List[str]:
    """Components a pipeline's `model_index.json` saved as None that its class does not list as optional (which
    `from_pretrained` then wants passed as None); [] where there is no such pipeline."""
    import diffusers
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path_or_id, **{k: v for k, v in kwargs.items()
                                                             if k in ("local_files_only", "token", "revision")})
    except (OSError, ValueError):  # no such folder or repo: from_pretrained says so in its own words
        return []
    optional = getattr(getattr(diffusers, index.get("_class_name", ""), None), "_optional_components", [])
    return [k for k, v in index.items() if isinstance(v, (list, tuple)) and list(v) == [None, None]
            and k not in optional]


def from_pretrained_call(cls: str, path_or_id: str) -> str:
    """`cls.from_pretrained("path_or_id"…)` as a user writes it, with the components saved as None passed as None."""
    absent = "".join(f", {name}=None" for name in absent_components(path_or_id, local_files_only=True))
    return f'{cls}.from_pretrained("{path_or_id}"{absent})'


def load_pipeline(path_or_id: str, **kwargs):
    """`DiffusionPipeline.from_pretrained(path_or_id, **kwargs)`, with every component its `model_index.json` saved
    as None passed as None: diffusers requires that for components that are not optional (`text_encoder_3` and
    `tokenizer_3` of an SD3 pipeline saved without T5)."""
    from diffusers import DiffusionPipeline

    absent = dict.fromkeys(absent_components(path_or_id, **kwargs))
    return DiffusionPipeline.from_pretrained(path_or_id, **{**absent, **kwargs})

