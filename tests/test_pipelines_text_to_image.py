"""Few-step text-to-image pipelines (SD, SDXL, SD3 flow matching) against diffusers' own, with tiny components."""
import os

import numpy as np
import pytest
import torch
from diffusers import (DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from diffusers_fewstep import LearnedScheduleScheduler
from diffusers_fewstep.bundle import load_bundle, save_bundle
from diffusers_fewstep.pipelines import (FewStepSD3Pipeline, FewStepStableDiffusionPipeline,
                                         FewStepStableDiffusionXLPipeline)
from tiny_models import learned_scheduler, tiny_sd, tiny_sd3, tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {
    "sd": (tiny_sd, StableDiffusionPipeline, FewStepStableDiffusionPipeline, "fewstep_stable_diffusion.py"),
    "sdxl": (tiny_sdxl, StableDiffusionXLPipeline, FewStepStableDiffusionXLPipeline, "fewstep_stable_diffusion_xl.py"),
    "sd3": (tiny_sd3, StableDiffusion3Pipeline, FewStepSD3Pipeline, "fewstep_sd3.py"),
}
PROMPTS = ["a red shirt", "a pair of boots"]
NEGATIVE = ["blurry", "low quality"]




def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, stock pipeline class, few-step pipeline with a loaded bundle, components, bundle folder)."""
    build, stock_cls, fewstep_cls, _ = FAMILIES[request.param]
    components = build()
    bundle = tmp_path_factory.mktemp(f"bundle-{request.param}")
    save_bundle(bundle, learned_scheduler(components["scheduler"].config, steps=(3, 4)))
    pipe = quiet(fewstep_cls(**components)).load_fewstep(str(bundle))
    return request.param, stock_cls, pipe, components, str(bundle)


def run(pipe, steps=3, seed=0, output_type="np", **kwargs):
    kwargs = {"prompt": PROMPTS, "negative_prompt": NEGATIVE, "guidance_scale": 5.0, **kwargs}
    return pipe(num_inference_steps=steps, generator=seeded(seed), output_type=output_type, **kwargs).images


def test_matches_stock_pipeline(family):
    name, stock_cls, pipe, components, bundle = family
    images = run(pipe)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(pipe.scheduler.config.sigma_tables["3"], rel=1e-9)
    stock = quiet(stock_cls(**{**components, "scheduler": LearnedScheduleScheduler.from_pretrained(
        bundle, subfolder="scheduler")}))
    reference = run(stock)
    assert images.shape == reference.shape == (2, 32, 32, 3) and images.dtype == np.float32
    assert np.abs(images - reference).max() < 1e-4
    # classifier-free guidance and the negative prompt reach the model
    assert np.abs(run(pipe, guidance_scale=1.0) - images).max() > 1e-3
    assert np.abs(run(pipe, negative_prompt=["a cat", "a dog"]) - images).max() > 1e-3


def test_output_types_and_seeds(family):
    name, _, pipe, _, _ = family
    kwargs = {"prompt": "a bag", "negative_prompt": None}
    pt = run(pipe, output_type="pt", **kwargs)
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 32, 32) and pt.dtype == torch.float32
    assert 0 <= float(pt.min()) and float(pt.max()) <= 1
    pil = run(pipe, output_type="pil", **kwargs)
    assert len(pil) == 1 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    again = run(pipe, output_type="pt", **kwargs)
    other = run(pipe, output_type="pt", seed=1, **kwargs)
    torch.testing.assert_close(pt, again, rtol=0, atol=0)
    assert float((pt - other).abs().max()) > 1e-3


def test_callback_and_default_steps(family):
    name, _, pipe, _, _ = family
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, float(t), tuple(kwargs["latents"].shape)))
        return {}

    run(pipe, steps=None, callback_on_step_end=record)  # default: the largest learned count (4)
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    np.testing.assert_allclose([t for _, t, _ in seen], pipe.scheduler.timesteps.tolist(), rtol=1e-6)
    assert seen[0][2] == (2, 4, 16, 16)
    with pytest.raises(ValueError, match=r"no σ table for 8 steps; tables exist for \[3, 4\]"):
        run(pipe, steps=8)


def test_custom_pipeline_file(family, tmp_path):
    name, stock_cls, pipe, components, bundle = family
    stock_cls(**components).save_pretrained(tmp_path)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=os.path.join(ROOT, "pipelines", FAMILIES[name][3]),
                                               trust_remote_code=True, **no_t5)
    assert type(loaded) is type(pipe)
    with pytest.raises(ValueError, match="load_fewstep"):
        loaded(prompt="a bag", num_inference_steps=3)
    images = run(quiet(loaded).load_fewstep(bundle))
    np.testing.assert_allclose(images, run(pipe), atol=1e-5)


def test_mismatched_bundle_is_rejected(family, tmp_path):
    name, _, pipe, components, _ = family
    if name == "sd3":
        wrong = {"sigma_min": FlowMatchEulerDiscreteScheduler(shift=1.0).config,  # shift 1, the pipeline's is 3
                 "family": DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config}
    else:
        wrong = {"family": FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                 "sigma_max": DDPMScheduler().config,  # the fixture's linear β
                 "prediction_type": DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                                  beta_start=0.00085, beta_end=0.012).config}
    for i, (field, config) in enumerate(wrong.items()):
        save_bundle(tmp_path / str(i), learned_scheduler(config))
        with pytest.raises(ValueError, match=f"does not fit {type(pipe).__name__}.*{field}"):
            pipe.load_fewstep(str(tmp_path / str(i)))


def test_diffusers_format_lora_bundle(tmp_path):
    """A LoRA saved with diffusers' `save_lora_weights` loads through `load_lora_weights`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = tiny_sd()
    adapted["unet"].add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for key, p in adapted["unet"].named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(key)))
    scheduler = learned_scheduler(adapted["scheduler"].config, steps=(3,))
    save_bundle(tmp_path, scheduler)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(adapted["unet"]),
                                              safe_serialization=True)
    assert load_bundle(str(tmp_path)).lora_format == "diffusers"
    expected = run(quiet(FewStepStableDiffusionPipeline(**{**adapted, "scheduler": scheduler})))
    pipe = quiet(FewStepStableDiffusionPipeline(**tiny_sd())).load_fewstep(str(tmp_path))
    plain = quiet(FewStepStableDiffusionPipeline(**{**tiny_sd(), "scheduler": scheduler}))
    images = run(pipe)
    np.testing.assert_allclose(images, expected, atol=1e-4)
    assert np.abs(images - run(plain)).max() > 1e-3
