"""LearnedScheduleScheduler against diffusers' own schedulers on the real fixture model, and its config life cycle."""
import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from diffusers_fewstep import LearnedScheduleScheduler, time_uniform_sigmas


def denoise_loop(unet, scheduler, noise, steps=None, **set_kwargs):
    scheduler.set_timesteps(steps, **set_kwargs) if steps is not None else scheduler.set_timesteps(**set_kwargs)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def learned_from(base, table, solver):
    return LearnedScheduleScheduler.from_config(base, sigma_tables={len(table) - 1: table}, solver=solver)


@pytest.mark.parametrize("nfe", [4, 10])
def test_reproduces_ddim_trailing(fixture_pipe, fixture_noise, nfe):
    base = fixture_pipe.scheduler.config
    ddim = DDIMScheduler.from_config(base, timestep_spacing="trailing", set_alpha_to_one=True)
    ours = learned_from(base, time_uniform_sigmas(nfe, learned_from(base, [1.0, 0.0], "euler").noise_schedule).tolist(),
                        "euler")
    ref = denoise_loop(fixture_pipe.unet, ddim, fixture_noise, nfe)
    out = denoise_loop(fixture_pipe.unet, ours, fixture_noise, nfe)
    assert torch.equal(ours.timesteps.round(), ddim.timesteps.float())
    assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("ref_cls,kwargs,solver", [
    (EulerDiscreteScheduler, {"use_karras_sigmas": True}, "euler"),
    (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing", "algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m"),
    (UniPCMultistepScheduler, {"timestep_spacing": "trailing", "solver_order": 2}, "unipc"),
])
def test_reproduces_diffusers_solvers_on_their_sigmas(fixture_pipe, fixture_noise, ref_cls, kwargs, solver):
    base = fixture_pipe.scheduler.config
    nfe = 6
    ref_sched = ref_cls.from_config(base, **kwargs)
    ref_sched.set_timesteps(nfe)
    ours = learned_from(base, ref_sched.sigmas.double().tolist(), solver)
    ref = denoise_loop(fixture_pipe.unet, ref_sched, fixture_noise, nfe)
    out = denoise_loop(fixture_pipe.unet, ours, fixture_noise, nfe)
    assert (out - ref).abs().max() < 1e-4


def test_tables_learned_for_one_solver_differ_from_another(fixture_pipe, fixture_noise):
    """Sanity: the solver choice matters (DPM++2M and DDIM differ by far more than the 1e-4 tolerance above)."""
    base = fixture_pipe.scheduler.config
    table = time_uniform_sigmas(4, learned_from(base, [1.0, 0.0], "euler").noise_schedule).tolist()
    a = denoise_loop(fixture_pipe.unet, learned_from(base, table, "euler"), fixture_noise, 4)
    b = denoise_loop(fixture_pipe.unet, learned_from(base, table, "dpmpp_2m"), fixture_noise, 4)
    assert (a - b).abs().max() > 1e-2


def test_works_unchanged_in_ddpm_pipeline_and_round_trips(fixture_pipe, tmp_path):
    base = fixture_pipe.scheduler.config
    # 4 steps: for step counts that do not divide 1000, DDIMScheduler steps to t − 1000//n but then evaluates
    # the model at the next (rounded) trailing timestep; our tables are self-consistent, so compare where both agree
    sched = learned_from(base, time_uniform_sigmas(4, learned_from(base, [1.0, 0.0], "euler").noise_schedule).tolist(),
                         "euler")
    ddim = DDIMScheduler.from_config(base, timestep_spacing="trailing", set_alpha_to_one=True)
    images = {}
    for name, s in (("ours", sched), ("ddim", ddim)):
        pipe = DDPMPipeline(unet=fixture_pipe.unet, scheduler=s)
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np").images
    assert np.abs(images["ours"] - images["ddim"]).max() < 1e-4
    # a whole pipeline holding our scheduler saves and reloads (model_index.json records our module)
    pipe = DDPMPipeline(unet=fixture_pipe.unet, scheduler=sched)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["scheduler"][0].split(".")[0] == "diffusers_fewstep" and index["scheduler"][1] == "LearnedScheduleScheduler"
    reloaded = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded.scheduler, LearnedScheduleScheduler)
    assert reloaded.scheduler.config.sigma_tables == sched.config.sigma_tables
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np").images
    assert np.abs(again - images["ours"]).max() < 1e-6


def test_save_pretrained_round_trip_is_plain_json(tmp_path):
    sched = LearnedScheduleScheduler(sigma_tables={4: [157.4, 17.0, 3.0, 0.5, 0.0], "6": [157.4, 40.0, 10.0, 3.0, 1.0, 0.2, 0.0]},
                                     solver="unipc", provenance={"base_model": "local", "objective": "trajectory"})
    sched.save_pretrained(tmp_path / "scheduler")
    raw = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert raw["sigma_tables"]["4"] == [157.4, 17.0, 3.0, 0.5, 0.0] and raw["solver"] == "unipc"
    loaded = LearnedScheduleScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.available_nfes == [4, 6]
    assert loaded.config.provenance["objective"] == "trajectory"
    loaded.set_timesteps(6)
    assert loaded.sigmas.tolist() == [157.4, 40.0, 10.0, 3.0, 1.0, 0.2, 0.0]
    assert len(loaded.timesteps) == 6 and loaded.timesteps[0] > loaded.timesteps[-1]


def test_retrieve_timesteps_with_sigmas_and_timesteps():
    sched = LearnedScheduleScheduler()
    timesteps, n = retrieve_timesteps(sched, sigmas=[80.0, 10.0, 1.0, 0.1])
    assert n == 4 and sched.sigmas.tolist() == [80.0, 10.0, 1.0, 0.1, 0.0]
    # timesteps are continuous log-σ interpolations, strictly decreasing, no two on one integer step
    assert (timesteps[:-1] - timesteps[1:]).min() > 1.0
    timesteps, n = retrieve_timesteps(sched, timesteps=[999, 500, 100])
    assert n == 3 and torch.allclose(sched.timesteps, torch.tensor([999.0, 500.0, 100.0]), atol=1e-3)


def test_missing_step_count_names_available_and_interpolation_is_labelled():
    tables = {4: [157.4, 17.0, 3.0, 0.5, 0.0], 8: [157.4, 60, 25.0, 10.0, 4.0, 1.5, 0.5, 0.1, 0.0]}
    sched = LearnedScheduleScheduler(sigma_tables=tables)
    with pytest.raises(ValueError, match=r"no σ table for 7 steps; tables exist for \[4, 8\]"):
        sched.set_timesteps(7)
    sched = LearnedScheduleScheduler(sigma_tables=tables, allow_interpolation=True)
    sched.set_timesteps(7)
    assert len(sched.sigmas) == 8 and float(sched.sigmas[0]) == pytest.approx(157.4) and sched.sigmas[-1] == 0
    assert "interpolated" in sched.table_source and "8-step" in sched.table_source
    assert (sched.sigmas[1:] < sched.sigmas[:-1]).all()


@pytest.mark.parametrize("table,message", [
    ([157.4, float("nan"), 1.0, 0.0], "non-finite"),
    ([157.4, 1.0, 3.0, 0.0], "strictly decreasing"),
    ([157.4, 3.0, 3.0, 0.0], "strictly decreasing"),
    ([500.0, 3.0, 1.0, 0.0], "above the model's σ_max"),
    ([157.4, 3.0, 0.001, 0.0], "below the model's σ_min"),
    ([157.4, 3.0, 1.0, -0.5], "strictly decreasing|negative"),
])
def test_bad_tables_rejected(table, message):
    with pytest.raises(ValueError, match=message):
        LearnedScheduleScheduler(sigma_tables={len(table) - 1: table})
    with pytest.raises(ValueError, match=message):
        LearnedScheduleScheduler().set_timesteps(sigmas=table)


def test_table_length_must_match_its_key_and_unknown_names_are_errors(tmp_path):
    with pytest.raises(ValueError, match="has 4 entries"):
        LearnedScheduleScheduler(sigma_tables={5: [157.4, 3.0, 1.0, 0.0]})
    for key in ("two", "2.0", "0", "-1"):
        with pytest.raises(ValueError, match=f"^σ table key '{key}' is not a step count \\("):
            LearnedScheduleScheduler(sigma_tables={key: [157.4, 1.0, 0.0]})
    with pytest.raises(ValueError, match="unknown solver"):
        LearnedScheduleScheduler(solver="heun3")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        LearnedScheduleScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="call `set_timesteps`"):
        LearnedScheduleScheduler().step(torch.zeros(1), 999, torch.zeros(1))
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text('{"_class_name": "LearnedScheduleScheduler", "sigma_tables": {')
    with pytest.raises(Exception, match="not a valid JSON"):
        LearnedScheduleScheduler.from_pretrained(tmp_path, subfolder="scheduler")


def test_check_compatible_rejects_other_model_families():
    sched = LearnedScheduleScheduler(sigma_tables={2: [157.4, 1.0, 0.0]})
    sched.check_compatible(DDIMScheduler().config)  # same linear-β ε model: fine
    with pytest.raises(ValueError, match="prediction_type"):
        sched.check_compatible(DDIMScheduler(prediction_type="v_prediction").config)
    with pytest.raises(ValueError, match="sigma_max"):
        sched.check_compatible(DDIMScheduler(beta_schedule="squaredcos_cap_v2").config)
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="family"):
        sched.check_compatible(FlowMatchEulerDiscreteScheduler(shift=3.0).config)


PER_NFE_TABLES = {4: [157.4, 17.0, 3.0, 0.5, 0.0], 6: [157.4, 40.0, 10.0, 3.0, 1.0, 0.2, 0.0],
                  8: [157.4, 60, 25.0, 10.0, 4.0, 1.5, 0.5, 0.1, 0.0]}


def test_per_nfe_solver_is_chosen_by_set_timesteps_and_used_by_step(fixture_pipe, fixture_noise):
    """`solvers` picks the solver per step count (the nearest table's for an interpolated run); `solver` covers the
    rest and explicit σ's. A 4-step run then samples exactly as a scheduler made for that solver alone."""
    base = fixture_pipe.scheduler.config
    sched = LearnedScheduleScheduler.from_config(base, sigma_tables=PER_NFE_TABLES, solver="euler",
                                                 solvers={4: "unipc", "8": "dpm++2m"}, allow_interpolation=True)
    assert sched.active_solver == "euler"
    picked = {}
    for steps in (3, 4, 5, 6, 7, 8):
        sched.set_timesteps(steps)
        picked[steps] = sched.active_solver
    assert picked == {3: "unipc", 4: "unipc", 5: "euler", 6: "euler", 7: "dpmpp_2m", 8: "dpmpp_2m"}
    sched.set_timesteps(sigmas=PER_NFE_TABLES[4][:-1])
    assert sched.active_solver == "euler"
    with pytest.raises(AttributeError):
        sched.active_solver = "ipndm"
    out = denoise_loop(fixture_pipe.unet, sched, fixture_noise, 4)
    alone = LearnedScheduleScheduler.from_config(base, sigma_tables=PER_NFE_TABLES, solver="unipc")
    assert torch.equal(out, denoise_loop(fixture_pipe.unet, alone, fixture_noise, 4))
    euler = LearnedScheduleScheduler.from_config(base, sigma_tables=PER_NFE_TABLES)
    assert (out - denoise_loop(fixture_pipe.unet, euler, fixture_noise, 4)).abs().max() > 1e-2


@pytest.mark.parametrize("solvers,message", [
    ({4: "heun"}, r"^solvers\['4'\]: unknown solver 'heun'; choose one of"),
    ({"four": "unipc"}, r"^solvers key 'four' is not a step count \("),
    ({5: "unipc"}, r"^solvers lists 'unipc' for 5 steps but there is no 5-step σ table; tables exist for \[4, 6, 8\]"),
])
def test_per_nfe_solver_validation(solvers, message):
    with pytest.raises(ValueError, match=message):
        LearnedScheduleScheduler(sigma_tables=PER_NFE_TABLES, solvers=solvers)


def test_per_nfe_solvers_round_trip_and_older_configs_load_unchanged(tmp_path):
    sched = LearnedScheduleScheduler(sigma_tables=PER_NFE_TABLES, solver="ipndm", solvers={8: "unipc", 4: "ddim"})
    sched.save_pretrained(tmp_path / "new")
    raw = json.loads((tmp_path / "new" / "scheduler_config.json").read_text())
    assert raw["solvers"] == {"4": "ddim", "8": "unipc"} and list(raw["solvers"]) == ["4", "8"]
    loaded = LearnedScheduleScheduler.from_pretrained(tmp_path / "new")
    assert [loaded.set_timesteps(n) or loaded.active_solver for n in (4, 6, 8)] == ["euler", "ipndm", "unipc"]
    # a config written before `solvers` existed: one solver for every table
    del raw["solvers"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "scheduler_config.json").write_text(json.dumps(raw))
    old = LearnedScheduleScheduler.from_pretrained(tmp_path / "old")
    assert old.config.solvers is None
    assert [old.set_timesteps(n) or old.active_solver for n in (4, 6, 8)] == ["ipndm"] * 3
