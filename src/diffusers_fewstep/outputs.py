"""Safe output writing: atomic JSON files, and learned σ tables merged into an existing scheduler folder.

A run writes each file to a temporary sibling, flushes it to disk and renames it over the old one (`os.replace`
is atomic on POSIX and Windows), so a crash leaves either the old file or the new one, never half a file.
A second run into the same folder adds its tables (`merge_tables`); provenance is kept per NFE::

    {"per_nfe": {"4": {...}, "6": {...}}, "base_model": ..., ...run-level keys}
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .checks import UsageError
from .hub import load_json

SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
# provenance keys that must agree between the runs whose tables share a folder
SAME_MODEL_KEYS = ("base_model", "model_class")


# --- atomic files ------------------------------------------------------------------------------------
def _fsync_and_replace(tmp: str, path: str) -> None:
    """Flush the finished file `tmp` to disk, then rename it over `path` (atomic)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # the rename itself survives a power cut (POSIX)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_json(path: str, obj: Any) -> None:
    """Write `obj` as JSON to `path` through a temporary file in the same folder: old file or new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # not mkstemp: keep the umask's permissions
            json.dump(obj, f, indent=2)
        _fsync_and_replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# --- scheduler folders -------------------------------------------------------------------------------
def read_scheduler_tables(output_dir: str) -> Optional[dict]:
    """The `LearnedScheduleScheduler` config in `output_dir/scheduler/`, or None when there is none yet."""
    path = os.path.join(output_dir, SCHEDULER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        config = load_json(path)
    except ValueError as err:
        raise UsageError(f"corrupt {path} ({err.__cause__}); delete it or pass another output folder") from err
    if config.get("_class_name") != "LearnedScheduleScheduler":
        raise UsageError(f"{path} holds a {config.get('_class_name')} config, not learned σ tables; "
                         "pass another output folder")
    return config


def write_scheduler(output_dir: str, base_scheduler_config: Mapping, tables: Mapping[Any, Sequence[float]],
                    solvers: Optional[Mapping[Any, str]], solver: str, provenance: dict):
    """Save a `LearnedScheduleScheduler` holding `tables` to `output_dir/scheduler/`, atomically.

    Args:
        output_dir (`str`): the run's folder (created if missing).
        base_scheduler_config (`Mapping`): the model's scheduler config (noise schedule).
        tables (`Mapping[int | str, list[float]]`): `{nfe: [σ_0, …, σ_nfe]}`.
        solvers (`Mapping[int | str, str]`, *optional*): the solver of each table, where they differ from `solver`.
        solver (`str`): the solver of every table `solvers` does not name.
        provenance (`dict`): `{"per_nfe": {...}, ...run-level keys}`.

    Returns:
        The `LearnedScheduleScheduler` (validated before anything is written).
    """
    scheduler = _build_scheduler(base_scheduler_config, tables, solvers, solver, provenance)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".scheduler-")
    try:
        scheduler.save_pretrained(tmp)
        target = os.path.join(output_dir, "scheduler")
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(tmp):
            _fsync_and_replace(os.path.join(tmp, name), os.path.join(target, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return scheduler


def _build_scheduler(base_scheduler_config, tables, solvers, solver, provenance):
    from .scheduler import LearnedScheduleScheduler

    per_nfe = {str(n): s for n, s in (solvers or {}).items()}
    extra = {"solvers": per_nfe} if any(s != solver for s in per_nfe.values()) else {}  # one solver: no entry
    return LearnedScheduleScheduler.from_config(
        dict(base_scheduler_config), sigma_tables={str(n): [float(s) for s in t] for n, t in tables.items()},
        solver=solver, provenance=provenance, **extra)


# --- merging the tables of several runs ---------------------------------------------------------------
def merge_tables(existing_config: Optional[Mapping], new_tables: Mapping[int, List[float]],
                 new_solvers: Mapping[int, str], new_provenance_per_nfe: Mapping[int, dict],
                 replace: Iterable[int] = (), run_provenance: Optional[dict] = None,
                 ) -> Tuple[Dict[int, List[float]], Dict[int, str], dict]:
    """Tables, solvers and provenance of a folder after a new run: the new NFEs are added, an NFE both hold keeps
    its existing table unless `replace` names it. A pure function; the caller decides `replace` (`--overwrite`,
    or the new table scores better).

    Args:
        existing_config (`Mapping`, *optional*): `read_scheduler_tables(output_dir)`; None for an empty folder.
        new_tables (`Mapping[int, list[float]]`): the run's `{nfe: σ table}`.
        new_solvers (`Mapping[int, str]`): the solver of each new table.
        new_provenance_per_nfe (`Mapping[int, dict]`): provenance of each new table (objective, metrics, seconds).
        replace (`Iterable[int]`): NFEs whose existing table the new one replaces.
        run_provenance (`dict`, *optional*): run-level keys (base model, tool); they update the existing ones, and
            a different `base_model` or `model_class` is refused.

    Returns:
        `(tables, solvers, provenance)`: `{nfe: σ table}` and `{nfe: solver}` sorted by NFE, and
        `{"per_nfe": {"<nfe>": {...}}, **run-level keys}`.
    """
    old_tables, old_solvers, old_per_nfe, run_level = _split_config(existing_config)
    _check_same_model(run_level, run_provenance or {})
    unknown = sorted(set(replace) - set(new_tables))
    if unknown:
        raise ValueError(f"replace names NFE {unknown} without a new table; replace only NFEs of new_tables")
    take = sorted(n for n in new_tables if n not in old_tables or n in set(replace))
    tables = {**old_tables, **{n: list(new_tables[n]) for n in take}}
    solvers = {**old_solvers, **{n: new_solvers[n] for n in take}}
    per_nfe = {**old_per_nfe, **{n: new_provenance_per_nfe.get(n, {}) for n in take}}
    order = sorted(tables)
    provenance = {"per_nfe": {str(n): per_nfe[n] for n in order if n in per_nfe}, **run_level, **(run_provenance or {})}
    return {n: tables[n] for n in order}, {n: solvers[n] for n in order}, provenance


def _split_config(config: Optional[Mapping]):
    """(tables, solvers, per-NFE provenance, run-level provenance) of an existing config, keyed by int NFE."""
    config = config or {}
    tables = {int(n): list(t) for n, t in (config.get("sigma_tables") or {}).items()}
    named = config.get("solvers") or {}
    solvers = {n: named.get(str(n), config.get("solver", "euler")) for n in tables}
    provenance = dict(config.get("provenance") or {})
    if "per_nfe" in provenance:
        per_nfe = {int(n): p for n, p in provenance.pop("per_nfe").items() if int(n) in tables}
        return tables, solvers, per_nfe, provenance
    # written before provenance was kept per NFE: the record describes each of its tables; its model stays run-level
    model = {k: provenance[k] for k in SAME_MODEL_KEYS if k in provenance}
    return tables, solvers, {n: dict(provenance) for n in tables} if provenance else {}, model


def _check_same_model(old: Mapping, new: Mapping) -> None:
    for key in SAME_MODEL_KEYS:
        if old.get(key) and new.get(key) and old[key] != new[key]:
            raise UsageError(f"the folder holds tables learned for {old[key]}, not {new[key]}; "
                             "pass another output folder")
