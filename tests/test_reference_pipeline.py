"""`reference_scheduler="pipeline"`: the reference is the image the model's own pipeline makes by default (its
diffusers scheduler, driven as the pipeline drives it, from the same noise), in the same convention as the ODE
reference, so that scoring and learning use it unchanged."""
import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, PNDMPipeline, PNDMScheduler,
                       StableDiffusion3Pipeline, StableDiffusionPipeline)

from diffusers_fewstep import SigmaDenoiser, reference
from diffusers_fewstep.cli import main
from diffusers_fewstep.conditioning import encode_text_to_image
from diffusers_fewstep.optimizer import optimize_schedule
from diffusers_fewstep.selection import extra_args
from test_reference import FLOW, VP, tiny_denoiser
from tiny_models import SD_SCHEDULER, tiny_flux, tiny_sd, tiny_sd3, tiny_unconditional

PROMPTS = ["a photo of a sneaker", "an ankle boot"]
STEPS = 8
PNDM_SD = {k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}  # the fixture's: steps_offset 1, ᾱ_0 at the end
DDIM_TRAILING = {**VP, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing", "set_alpha_to_one": True,
                 "clip_sample": False}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("pipeline_cls,scheduler_cls,prediction_type", [
    (DDIMPipeline, DDIMScheduler, "epsilon"), (DDIMPipeline, DDIMScheduler, "v_prediction"),
    (PNDMPipeline, PNDMScheduler, "epsilon")])  # PNDM with its Runge-Kutta warm-up steps
def test_unconditional_reference_is_the_pipeline_image(pipeline_cls, scheduler_cls, prediction_type):
    parts = tiny_unconditional(prediction_type=prediction_type)
    scheduler = scheduler_cls.from_config(parts["scheduler"].config)
    pipe = _quiet(pipeline_cls(unet=parts["unet"], scheduler=scheduler))
    images = pipe(batch_size=3, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # the pipeline's randn_tensor
    denoiser = SigmaDenoiser(parts["unet"], {**scheduler.config, "_class_name": scheduler_cls.__name__})
    truth = reference.choose("pipeline", denoiser, STEPS)
    ours = (truth(denoiser, noise) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert truth.settings() == {"reference_scheduler": "pipeline", "reference_solver": scheduler_cls.__name__,
                                "reference_steps": STEPS}
    assert np.abs(ours - images).max() < 1e-6 and np.abs(images - 0.5).max() > 0.1


def _sd(scheduler):
    return StableDiffusionPipeline(**{**tiny_sd(), "scheduler": scheduler})


SD_SCHEDULERS = {
    "sd-pndm": lambda: _sd(PNDMScheduler(skip_prk_steps=True, **PNDM_SD)),
    "sd-euler-v": lambda: StableDiffusionPipeline(**{**tiny_sd(prediction_type="v_prediction"), "scheduler": (
        EulerDiscreteScheduler(prediction_type="v_prediction", **{k: v for k, v in PNDM_SD.items()
                                                                  if k != "set_alpha_to_one"}))}),
    "sd3-flow": lambda: StableDiffusion3Pipeline(**tiny_sd3()),
    "flux-dynamic-shift": lambda: FluxPipeline(**tiny_flux()),
}


@pytest.mark.parametrize("name", list(SD_SCHEDULERS))
def test_guided_reference_is_the_pipeline_latent(name):
    """ε (PNDM as the SD fixture ships it), v (Euler: init_noise_sigma, scale_model_input), flow (SD3) and Flux
    (its own σ's, `mu`, guidance embedding): the pipeline reference equals the stock pipeline's latents."""
    pipe = _quiet(SD_SCHEDULERS[name]())
    size = {"height": 32, "width": 32} if name.startswith("flux") else {}
    t2i = encode_text_to_image(pipe, PROMPTS, guidance_scale=3.0, **size)
    noise = torch.randn(len(PROMPTS), *t2i.sample_shape, generator=torch.Generator().manual_seed(0))
    latents = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, latents=noise.clone(), output_type="latent",
                   **size).images
    truth = reference.choose("pipeline", t2i.denoiser, STEPS)
    ours = truth(t2i.denoiser, noise, extra_args(t2i.cond, t2i.uncond, torch.arange(len(PROMPTS))))
    assert truth.scheduler is not pipe.scheduler and type(truth.scheduler) is type(pipe.scheduler)
    assert float((ours - latents).abs().max() / latents.abs().max()) < 1e-5  # measured 0


@pytest.mark.parametrize("config,scheduler,tol", [
    (VP, DPMSolverMultistepScheduler(timestep_spacing="trailing", final_sigmas_type="zero"), 1e-5),  # measured 8e-7
    (FLOW, FlowMatchEulerDiscreteScheduler(shift=3.0), 2e-3)], ids=["vp-dpmsolver", "flow-euler"])  # first order: 1e-3
def test_pipeline_reference_has_the_ode_references_convention(config, scheduler, tol):
    """Many steps of a deterministic diffusers scheduler land where the ODE reference does, from the same noise:
    the same native-sample convention (diffusers' DPM-Solver++(2M) on the trailing grid is our ODE solve)."""
    denoiser = tiny_denoiser(config)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ode = reference.choose("ode", denoiser)(denoiser, noise)
    ours = reference.choose(scheduler, denoiser, 200)(denoiser, noise)
    assert float((ours - ode).norm() / ode.norm()) < tol


def test_optimize_scores_against_the_pipeline_reference():
    """With the model's own DDIM (trailing, 4 steps) as the reference, the stock 4-step DDIM table with the
    first-order solver reproduces it: held-out RMSE ≈ 0, where the ODE reference puts it far away."""
    denoiser = tiny_denoiser(DDIM_TRAILING)
    kwargs = dict(nfes=[4], solver="euler", loss="l2", select_by="rmse", num_iters=2, batch_size=4, pool_size=4,
                  validation_size=4, progress=False, patience=None)

    def ddim_rmse(result):
        return next(c["scores"]["rmse"] for c in result.candidates[4] if c["name"] == "ddim_trailing+euler")

    piped = optimize_schedule(denoiser, reference_scheduler="pipeline", reference_steps=4, **kwargs)
    ode = optimize_schedule(denoiser, reference_steps=50, **kwargs)
    assert ddim_rmse(piped) < 1e-4 * ddim_rmse(ode) and ddim_rmse(ode) > 1e-2
    assert {k: piped.settings[k] for k in ("reference_scheduler", "reference_solver", "reference_steps")} == {
        "reference_scheduler": "pipeline", "reference_solver": "DDIMScheduler", "reference_steps": 4}
    assert (ode.settings["reference_scheduler"], ode.settings["reference_solver"]) == ("ode", "dpmpp_2m")
    assert piped.provenance()["settings"]["reference_solver"] == "DDIMScheduler"
    assert piped.shared["num_evals"] == 2 * 4  # pool and held-out set, one batch each, 4 model calls


def test_bad_reference_choices_say_what_to_do():
    denoiser = tiny_denoiser(VP)
    with pytest.raises(ValueError, match=r"^unknown reference_scheduler 'sde'; choose 'ode' .* or 'pipeline'"):
        reference.choose("sde", denoiser)
    with pytest.raises(ValueError, match="names no class; pass a pipeline folder with one, or use reference_scheduler='ode'"):
        reference.choose("pipeline", tiny_denoiser({k: v for k, v in VP.items() if k != "_class_name"}))
    with pytest.raises(ValueError, match="adds fresh noise at every step"):
        reference.choose("pipeline", denoiser)  # VP names DDPMScheduler
    with pytest.raises(ValueError, match="'LearnedScheduleScheduler', not a stock diffusers scheduler"):
        reference.choose("pipeline", tiny_denoiser({**VP, "_class_name": "LearnedScheduleScheduler"}))


@pytest.mark.parametrize("given", [True, False], ids=["given", "default"])
def test_cli_reference_scheduler_pipeline(tmp_path, capsys, given):
    """`--reference-scheduler pipeline` (given, or the default of a text-to-image pipeline) on a saved SD pipeline
    with the fixture's PNDM config: fitted to 50 PNDM steps (the pipelines' default), and optimize_log.json / the
    scheduler's provenance say so."""
    _sd(PNDMScheduler(skip_prk_steps=True, **PNDM_SD)).save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\nan ankle boot\n")
    tiny = ["--max-iters", "1", "--batch-size", "2", "--pool-size", "2", "--validation-size", "2", "--device", "cpu",
            "--quiet", "--nfe", "2", "--solver", "euler", "--guidance-scale", "3"]
    assert main(["optimize", "--model", str(tmp_path / "sd"), "--prompts-file", str(tmp_path / "prompts.txt"), *tiny,
                 *(["--reference-scheduler", "pipeline"] if given else []), "--output-dir", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out" / "optimize_log.json").read_text())["settings"]
    assert (settings["reference_scheduler"], settings["reference_solver"], settings["reference_steps"]) == (
        "pipeline", "PNDMScheduler", 50)
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["provenance"]["settings"]["reference_solver"] == "PNDMScheduler"
    assert "against the reference solutions (PNDMScheduler, 50 steps;" in capsys.readouterr().out


def test_cli_pipeline_reference_takes_the_pipelines_own_step_count(tmp_path):
    """SD3's pipeline samples 28 steps by default (SD 50): the default pipeline reference of an SD3 pipeline is its
    FlowMatchEuler scheduler at 28 steps, and at --reference-steps when given."""
    from diffusers_fewstep.conditioning import default_steps

    pipe = StableDiffusion3Pipeline(**tiny_sd3())
    assert (default_steps(pipe), default_steps(_sd(PNDMScheduler(**PNDM_SD)))) == (28, 50)
    pipe.save_pretrained(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\n")
    tiny = ["--max-iters", "1", "--batch-size", "2", "--pool-size", "2", "--validation-size", "2", "--device", "cpu",
            "--quiet", "--nfe", "2", "--solver", "euler", "--starts", "0"]
    for extra, steps in (([], 28), (["--reference-steps", "6"], 6)):
        out = tmp_path / f"out{steps}"
        assert main(["optimize", "--model", str(tmp_path / "sd3"), "--prompts-file", str(tmp_path / "prompts.txt"),
                     *tiny, *extra, "--output-dir", str(out)]) == 0
        settings = json.loads((out / "optimize_log.json").read_text())["settings"]
        assert (settings["reference_solver"], settings["reference_steps"]) == ("FlowMatchEulerDiscreteScheduler", steps)


def test_cli_text_to_image_default_reference_falls_back_to_the_ode_for_a_stochastic_scheduler(tmp_path, capsys):
    from diffusers import EulerAncestralDiscreteScheduler

    _sd(EulerAncestralDiscreteScheduler(**{k: v for k, v in PNDM_SD.items() if k != "set_alpha_to_one"})).save_pretrained(
        tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\n")
    assert main(["optimize", "--model", str(tmp_path / "sd"), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-iters", "1", "--batch-size", "2", "--pool-size", "2", "--validation-size", "2", "--device", "cpu",
                 "--nfe", "2", "--solver", "euler", "--reference-steps", "4", "--output-dir", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out" / "optimize_log.json").read_text())["settings"]
    assert (settings["reference_scheduler"], settings["reference_solver"], settings["reference_steps"]) == (
        "ode", "dpmpp_2m", 4)
    assert ("reference: the ODE solve, not the pipeline's scheduler (reference_scheduler='pipeline': the model's "
            "EulerAncestralDiscreteScheduler adds fresh noise at every step, so a noise has no single reference "
            "solution)") in capsys.readouterr().out


def test_cli_reference_scheduler_errors(tmp_path, capsys):
    def error(*extra):
        assert main(["optimize", "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err.rstrip("\n")

    assert error("--reference-scheduler", "dpm") == (
        "diffusers-fewstep: error: --reference-scheduler dpm: unknown reference; choose ode (a DPM-Solver++(2M) solve "
        "of the ODE) or pipeline (the model's own diffusers scheduler, as its pipeline samples)")
    # the vendored fixture samples with DDPMScheduler (stochastic): refused before any reference solve
    assert error("--reference-scheduler", "pipeline", "--nfe", "2").startswith(
        "diffusers-fewstep: error: reference_scheduler='pipeline': the model's DDPMScheduler adds fresh noise at "
        "every step")
