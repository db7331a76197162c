"""Up-front checks of command-line arguments, before any model is loaded, and `UsageError` for bad input.

`check_args` looks at the parsed options by attribute name, so one set of checks serves `optimize`, `benchmark`
and `train` (and any script that builds its options with their `add_arguments`). Each check raises `UsageError`
with one line that says what was wrong and what to do; `diffusers-fewstep` prints it without a traceback.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Mapping, Optional


class UsageError(ValueError):
    """Bad input from the user. The CLI prints the message as one line, without a traceback, and exits with 2."""


# attribute name -> kind of check
MODEL_OPTIONS = ("model", "pretrained_model_name_or_path", "tuned_model")
INPUT_PATHS = ("data", "train_data_dir", "conditioning_file", "classifier", "fd_classifier", "fd_data", "learned")
OUTPUT_DIRS = ("output_dir", "out_dir", "docs_dir")


def check_model(option: str, value: str) -> None:
    """An existing folder, or a Hub id `owner/name` whose `owner` is not a local folder (a mistyped path)."""
    from .hub import looks_like_hub_id

    if os.path.isdir(value) or (looks_like_hub_id(value) and not os.path.isdir(value.split("/")[0])):
        return
    raise UsageError(f"no model folder {value}; pass a diffusers pipeline folder or a Hub id")


def check_input_path(option: str, value) -> None:
    for path in [value] if isinstance(value, str) else value:
        if not os.path.exists(path):
            raise UsageError(f"{option} {path}: no such file or folder; pass an existing path")


def check_output_dir(option: str, value: str) -> None:
    """The folder may be missing (it is created), but neither it nor its nearest existing parent may be a file."""
    path = os.path.normpath(value)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if path and not os.path.isdir(path):
        raise UsageError(f"{option} {value}: {path} is a file, not a folder; pass a folder path")


def check_device(option: str, value: str) -> None:
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise UsageError(f"unknown {option} {value!r}; pass cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {value}: torch finds no CUDA device on this machine; pass {option} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"pass {option} cuda")


def check_solvers(option: str, value, allow_auto: bool = False) -> None:
    """Solver names as `solvers.canonical_solver` knows them (`auto` too where the option allows it)."""
    from .solvers import canonical_solver

    for name in [value] if isinstance(value, str) else value:
        if allow_auto and name == "auto":
            continue
        try:
            canonical_solver(name)
        except ValueError as err:
            raise UsageError(f"{option} {name}: {err}" + (" or auto" if allow_auto else "")) from None


def check_init(option: str, value: str, allow_peer: bool = True) -> None:
    """A hand-made table `schedules.baseline_sigmas` knows, or (where allowed) `peer:<row>` of a diffusers peer."""
    from .adapter import NoiseSchedule
    from .schedules import STOCK_SCHEDULERS, baseline_sigmas

    rows = [name for family in STOCK_SCHEDULERS.values() for name in family]
    peers = f"peer:<row> with a row of {rows}"
    if allow_peer and value.startswith("peer:"):
        row = value[len("peer:"):]
        if row not in rows:
            raise UsageError(f"{option} {value}: unknown diffusers peer {row!r}; choose a row of {rows}")
        return
    try:
        baseline_sigmas(value, 2, NoiseSchedule({"num_train_timesteps": 1000}))
    except ValueError as err:
        raise UsageError(f"{option} {value}: {err}" + (f", or {peers}" if allow_peer else "")) from None


def check_reference_scheduler(option: str, value: str) -> None:
    from .reference import REFERENCE_SCHEDULERS

    if value not in REFERENCE_SCHEDULERS:
        raise UsageError(f"{option} {value}: unknown reference; choose ode (a DPM-Solver++(2M) solve of the ODE) or "
                         "pipeline (the model's own diffusers scheduler, as its pipeline samples)")


CHECKS = {
    **{name: check_model for name in MODEL_OPTIONS},
    **{name: check_input_path for name in INPUT_PATHS},
    **{name: check_output_dir for name in OUTPUT_DIRS},
    "device": check_device,
    "solver": partial(check_solvers, allow_auto=True),
    "solvers": check_solvers,
    "init": check_init,
    "phase1_init": partial(check_init, allow_peer=False),
    "reference_scheduler": check_reference_scheduler,
}


def check_args(args, option_names: Optional[Mapping[str, str]] = None) -> None:
    """Raise `UsageError` for the first bad option in `args` (an `argparse.Namespace`), in the parser's order.

    Args:
        args (`argparse.Namespace`): parsed options; unset (`None`) ones and names starting with `_` are skipped.
        option_names (`Mapping[str, str]`, *optional*): attribute -> option as the user types it
            (`{"output_dir": "--output-dir"}`); defaults to `--<attribute>`.
    """
    for dest, value in vars(args).items():
        if value is None or dest.startswith("_") or dest not in CHECKS:
            continue
        CHECKS[dest]((option_names or {}).get(dest, f"--{dest}"), value)


def option_names(parser) -> dict:
    """attribute -> first option string of every option of an `argparse.ArgumentParser`."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
