"""Safe output writing: atomic JSON, scheduler folders that survive a crash mid-write, merging σ tables of runs."""
import json
import os

import pytest

from diffusers_fewstep import DEFAULT_MODEL, LearnedScheduleScheduler, outputs
from diffusers_fewstep.checks import UsageError
from diffusers_fewstep.hub import load_json

BASE = load_json(os.path.join(DEFAULT_MODEL, "scheduler", "scheduler_config.json"))
T1 = [157.4, 0.0]
T4 = [157.4, 17.2, 3.42, 0.95, 0.0]
T4_NEW = [157.4, 23.0, 6.2, 1.79, 0.0]
T6 = [157.4, 33.5, 9.49, 3.42, 1.46, 0.58, 0.0]


def _crash(*args, **kwargs):
    raise OSError("simulated crash before the rename")


def test_atomic_write_json(tmp_path, monkeypatch):
    path = tmp_path / "log.json"
    outputs.atomic_write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError, match="simulated crash"):
        outputs.atomic_write_json(str(path), {"a": [3]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file, whole
    assert os.listdir(tmp_path) == ["log.json"]  # no temporary file left behind


def test_atomic_write_json_creates_the_folder_and_refuses_what_json_cannot_hold(tmp_path):
    path = tmp_path / "new" / "x.json"
    outputs.atomic_write_json(str(path), {"σ": 1.5})
    assert json.loads(path.read_text(encoding="utf-8")) == {"σ": 1.5}
    with pytest.raises(TypeError):
        outputs.atomic_write_json(str(path), {"x": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"σ": 1.5} and os.listdir(path.parent) == ["x.json"]


def test_write_scheduler_loads_with_from_pretrained(tmp_path):
    provenance = {"per_nfe": {"4": {"objective": "trajectory"}}, "base_model": "assets/fmnist-ddpm-eps"}
    outputs.write_scheduler(str(tmp_path), BASE, {4: T4, "6": T6}, None, "unipc", provenance)
    scheduler = LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert scheduler.available_nfes == [4, 6]
    assert scheduler.config.sigma_tables["4"] == T4 and scheduler.config.solver == "unipc"
    assert scheduler.config.provenance == provenance
    assert scheduler.config.num_train_timesteps == BASE["num_train_timesteps"]
    assert sorted(os.listdir(tmp_path)) == ["scheduler"] and os.listdir(tmp_path / "scheduler") == [
        "scheduler_config.json"]


def test_write_scheduler_crash_keeps_the_old_folder(tmp_path, monkeypatch):
    outputs.write_scheduler(str(tmp_path), BASE, {4: T4}, None, "euler", {})
    before = (tmp_path / "scheduler" / "scheduler_config.json").read_text()
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(OSError, match="simulated crash"):
        outputs.write_scheduler(str(tmp_path), BASE, {4: T4_NEW, 6: T6}, None, "euler", {})
    assert (tmp_path / "scheduler" / "scheduler_config.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["scheduler"]  # the temporary sibling folder is gone
    assert os.listdir(tmp_path / "scheduler") == ["scheduler_config.json"]


def test_write_scheduler_validates_before_writing(tmp_path):
    with pytest.raises(ValueError, match="strictly decreasing"):
        outputs.write_scheduler(str(tmp_path), BASE, {4: [157.4, 3.0, 17.2, 0.95, 0.0]}, None, "euler", {})
    assert not os.path.exists(tmp_path / "scheduler")


def test_write_scheduler_one_solver_for_all_needs_no_solvers_entry(tmp_path):
    scheduler = outputs.write_scheduler(str(tmp_path), BASE, {4: T4, 6: T6}, {4: "unipc", 6: "unipc"}, "unipc", {})
    assert scheduler.config.get("solvers") is None and scheduler.config.solver == "unipc"


def test_write_scheduler_keeps_per_nfe_solvers(tmp_path):
    outputs.write_scheduler(str(tmp_path), BASE, {4: T4, 6: T6}, {4: "unipc", 6: "euler"}, "euler", {})
    loaded = LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert loaded.config.solvers == {"4": "unipc", "6": "euler"}
    loaded.set_timesteps(4)
    assert loaded.active_solver == "unipc"


def test_read_scheduler_tables(tmp_path):
    assert outputs.read_scheduler_tables(str(tmp_path)) is None  # nothing there yet
    outputs.write_scheduler(str(tmp_path), BASE, {4: T4}, None, "euler", {"base_model": "m"})
    config = outputs.read_scheduler_tables(str(tmp_path))
    assert config["sigma_tables"] == {"4": T4} and config["provenance"] == {"base_model": "m"}
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text('{"sigma_tables": {"4": [157.4, ')  # cut short
    with pytest.raises(UsageError, match=r"^corrupt .*scheduler_config.json \(.*\); delete it or pass another output "
                                         r"folder$"):
        outputs.read_scheduler_tables(str(tmp_path))
    path.write_text(json.dumps(BASE))  # a model's own DDPMScheduler
    with pytest.raises(UsageError, match=r"holds a DDPMScheduler config, not learned σ tables; pass another output "
                                         r"folder$"):
        outputs.read_scheduler_tables(str(tmp_path))


def _existing(tmp_path, tables, solver="euler", provenance=None):
    outputs.write_scheduler(str(tmp_path), BASE, tables, None, solver, provenance or {})
    return outputs.read_scheduler_tables(str(tmp_path))


def test_merge_keeps_other_nfes(tmp_path):
    existing = _existing(tmp_path, {1: T1}, provenance={"per_nfe": {"1": {"rmse": 0.5}}, "base_model": "m"})
    tables, solvers, provenance = outputs.merge_tables(existing, {4: T4}, {4: "unipc"}, {4: {"rmse": 0.2}}, set())
    assert tables == {1: T1, 4: T4}
    assert solvers == {1: "euler", 4: "unipc"}
    assert provenance == {"per_nfe": {"1": {"rmse": 0.5}, "4": {"rmse": 0.2}}, "base_model": "m"}


def test_merge_replaces_only_what_replace_names(tmp_path):
    existing = _existing(tmp_path, {4: T4, 6: T6}, provenance={"per_nfe": {"4": {"r": 1}, "6": {"r": 2}}})
    new = {4: T4_NEW, 6: T6[:1] + [30.0] + T6[2:]}
    tables, solvers, provenance = outputs.merge_tables(existing, new, {4: "euler", 6: "unipc"}, {4: {"r": 3}, 6: {"r": 4}},
                                                       {4}, run_provenance={"tool": "optimize"})
    assert tables == {4: T4_NEW, 6: T6}  # 6 kept: not in `replace`
    assert solvers == {4: "euler", 6: "euler"}
    assert provenance == {"per_nfe": {"4": {"r": 3}, "6": {"r": 2}}, "tool": "optimize"}
    with pytest.raises(ValueError, match=r"replace names NFE \[8\] without a new table"):
        outputs.merge_tables(existing, new, {4: "euler", 6: "euler"}, {}, {8})


def test_merge_into_nothing_and_from_old_provenance(tmp_path):
    tables, solvers, provenance = outputs.merge_tables(None, {4: T4}, {4: "ipndm"}, {4: {"r": 1}}, set(),
                                                       run_provenance={"base_model": "m"})
    assert (tables, solvers, provenance) == ({4: T4}, {4: "ipndm"}, {"per_nfe": {"4": {"r": 1}}, "base_model": "m"})
    # a folder written before provenance was kept per NFE: its run-level provenance describes each of its tables
    old = {"objective": "trajectory", "base_model": "m"}
    existing = _existing(tmp_path, {6: T6}, solver="dpmpp_2m", provenance=old)
    tables, solvers, provenance = outputs.merge_tables(existing, {4: T4}, {4: "euler"}, {4: {"r": 1}}, set())
    assert solvers == {4: "euler", 6: "dpmpp_2m"}
    assert provenance == {"per_nfe": {"4": {"r": 1}, "6": old}, "base_model": "m"}
    with pytest.raises(UsageError, match="learned for m, not n;"):
        outputs.merge_tables(existing, {4: T4}, {4: "euler"}, {4: {}}, set(), run_provenance={"base_model": "n"})


def test_merge_refuses_tables_of_another_model(tmp_path):
    existing = _existing(tmp_path, {4: T4}, provenance={"per_nfe": {}, "base_model": "owner/model-a"})
    with pytest.raises(UsageError, match=r"^the folder holds tables learned for owner/model-a, not owner/model-b; "
                                         r"pass another output folder$"):
        outputs.merge_tables(existing, {6: T6}, {6: "euler"}, {6: {}}, set(), run_provenance={"base_model": "owner/model-b"})


def test_merged_tables_round_trip(tmp_path):
    existing = _existing(tmp_path, {1: T1}, provenance={"per_nfe": {"1": {"r": 1}}})
    tables, solvers, provenance = outputs.merge_tables(existing, {4: T4}, {4: "euler"}, {4: {"r": 2}}, set())
    outputs.write_scheduler(str(tmp_path), BASE, tables, solvers, "euler", provenance)
    scheduler = LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert scheduler.available_nfes == [1, 4] and scheduler.config.provenance["per_nfe"]["1"] == {"r": 1}
