"""FewStepUnconditionalPipeline and few-step bundles, with a tiny UNet2DModel and the vendored fixture."""
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from diffusers_fewstep import DEFAULT_MODEL, LearnedScheduleScheduler
from diffusers_fewstep.bundle import load_bundle, save_bundle
from diffusers_fewstep.pipelines import FewStepUnconditionalPipeline
from tiny_models import learned_scheduler, fake_learned_table, tiny_unconditional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMUNITY_FILE = os.path.join(ROOT, "pipelines", "fewstep_unconditional.py")




def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny():
    return tiny_unconditional()


@pytest.fixture()
def pipe(tiny):
    scheduler = learned_scheduler(tiny["scheduler"].config, steps=(3, 4))
    return quiet(FewStepUnconditionalPipeline(unet=tiny["unet"], scheduler=scheduler))


def stock_images(unet, scheduler, steps, batch_size=2, seed=0):
    """diffusers' own DDPMPipeline with the same learned scheduler swapped in."""
    stock = quiet(DDPMPipeline(unet=unet, scheduler=scheduler))
    return stock(batch_size=batch_size, num_inference_steps=steps, generator=seeded(seed), output_type="np").images


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc"])
def test_matches_stock_ddpm_pipeline(tiny, solver):
    scheduler = learned_scheduler(tiny["scheduler"].config, steps=(4,), solver=solver)
    pipe = quiet(FewStepUnconditionalPipeline(unet=tiny["unet"], scheduler=scheduler))
    ours = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    # the run used the learned table, not a stock one
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(scheduler.config.sigma_tables["4"], rel=1e-9)
    reference = stock_images(tiny["unet"], LearnedScheduleScheduler.from_config(scheduler.config), 4)
    assert ours.shape == reference.shape == (2, 16, 16, 1)
    assert np.abs(ours - reference).max() < 1e-4


def test_fixture_matches_stock_ddpm_pipeline():
    stock = DDPMPipeline.from_pretrained(DEFAULT_MODEL)
    scheduler = learned_scheduler(stock.scheduler.config, steps=(4,))
    pipe = quiet(FewStepUnconditionalPipeline(unet=stock.unet, scheduler=scheduler))
    ours = pipe(batch_size=2, num_inference_steps=4, generator=seeded(3), output_type="np").images
    reference = stock_images(stock.unet, LearnedScheduleScheduler.from_config(scheduler.config), 4, seed=3)
    assert ours.shape == (2, 32, 32, 1) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 1e-4
    assert ours.std() > 0.05  # an image, not a constant


def test_output_types(pipe):
    np_images = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="np").images
    pt_images = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images
    pil_images = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pil").images
    (as_tuple,) = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="np", return_dict=False)
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 16, 16, 1) and np_images.dtype == np.float32
    assert isinstance(pt_images, torch.Tensor) and pt_images.shape == (2, 1, 16, 16) and pt_images.dtype == torch.float32
    assert 0 <= np_images.min() and np_images.max() <= 1
    np.testing.assert_allclose(pt_images.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    np.testing.assert_array_equal(as_tuple, np_images)
    assert len(pil_images) == 2 and pil_images[0].size == (16, 16) and pil_images[0].mode == "L"
    np.testing.assert_allclose(np.asarray(pil_images[0]) / 255.0, np_images[0, ..., 0], atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=3, output_type="latent")


def test_seeds_reproduce(pipe):
    first = pipe(batch_size=2, num_inference_steps=4, generator=seeded(7), output_type="np").images
    again = pipe(batch_size=2, num_inference_steps=4, generator=seeded(7), output_type="np").images
    other = pipe(batch_size=2, num_inference_steps=4, generator=seeded(8), output_type="np").images
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.05
    # a list of generators seeds each image on its own, as in diffusers
    per_image = pipe(batch_size=2, num_inference_steps=4, generator=[seeded(7), seeded(8)], output_type="np").images
    single = pipe(batch_size=1, num_inference_steps=4, generator=seeded(8), output_type="np").images
    assert np.abs(per_image[1] - single[0]).max() < 1e-4
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=3, num_inference_steps=4, generator=[seeded(7), seeded(8)])


def test_given_latents_equal_seeded_noise(pipe):
    noise = torch.randn((2, 1, 16, 16), generator=seeded(5))
    from_latents = pipe(batch_size=2, num_inference_steps=4, latents=noise.clone(), output_type="np").images
    from_seed = pipe(batch_size=2, num_inference_steps=4, generator=seeded(5), output_type="np").images
    np.testing.assert_allclose(from_latents, from_seed, atol=1e-6)


def test_callback_on_step_end(pipe):
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    images = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np",
                  callback_on_step_end=record).images
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    np.testing.assert_allclose([t for _, t, _ in seen], pipe.scheduler.timesteps.tolist(), rtol=1e-6)
    plain = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    assert np.abs(images - plain).max() > 0.01  # the returned latents were used
    with pytest.raises(ValueError, match="not in"):
        pipe(num_inference_steps=4, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_step_count_picks_table(pipe):
    pipe(batch_size=1, generator=seeded(), output_type="np")
    assert pipe.scheduler.num_inference_steps == 4  # default: the largest learned count
    pipe(batch_size=1, num_inference_steps=3, generator=seeded(), output_type="np")
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(pipe.scheduler.config.sigma_tables["3"], rel=1e-9)
    with pytest.raises(ValueError, match=r"no σ table for 7 steps; tables exist for \[3, 4\]"):
        pipe(num_inference_steps=7)
    # an explicit σ table overrides the learned ones
    table = fake_learned_table(pipe.scheduler.config, 5)
    pipe(batch_size=1, sigmas=table[:-1], generator=seeded(), output_type="np")
    assert pipe.scheduler.num_inference_steps == 5


def test_needs_a_learned_scheduler(tiny):
    pipe = quiet(FewStepUnconditionalPipeline(unet=tiny["unet"], scheduler=DDPMScheduler()))
    with pytest.raises(ValueError, match="load_fewstep"):
        pipe(num_inference_steps=4)


# --- bundles ---------------------------------------------------------------------------------------
def test_bundle_round_trip(tmp_path, tiny, pipe):
    save_bundle(tmp_path / "bundle", pipe.scheduler)
    base = quiet(FewStepUnconditionalPipeline(unet=tiny["unet"], scheduler=tiny["scheduler"]))
    assert base.load_fewstep(str(tmp_path / "bundle")) is base
    assert isinstance(base.scheduler, LearnedScheduleScheduler)
    assert base.scheduler.config.sigma_tables == pipe.scheduler.config.sigma_tables
    loaded = base(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    direct = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    np.testing.assert_array_equal(loaded, direct)
    # a whole pipeline holding the learned scheduler saves and reloads
    base.save_pretrained(tmp_path / "pipeline")
    reloaded = quiet(FewStepUnconditionalPipeline.from_pretrained(tmp_path / "pipeline"))
    again = reloaded(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(again, direct, atol=1e-6)


def perturbed_unet(unet, scale=0.05, seed=1):
    tuned = UNet2DModel.from_config(unet.config)
    tuned.load_state_dict(unet.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return tuned.eval()


def test_bundle_with_tuned_unet(tmp_path, tiny, pipe):
    tuned = perturbed_unet(tiny["unet"])
    save_bundle(tmp_path, pipe.scheduler, model=tuned)
    assert load_bundle(str(tmp_path)).model_subfolder == "unet"
    base = quiet(FewStepUnconditionalPipeline(unet=tiny["unet"], scheduler=tiny["scheduler"])).load_fewstep(str(tmp_path))
    for loaded, expected in zip(base.unet.parameters(), tuned.parameters()):
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    images = base(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    expected = quiet(FewStepUnconditionalPipeline(unet=tuned, scheduler=pipe.scheduler))(
        batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    untuned = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(images, expected, atol=1e-4)
    assert np.abs(images - untuned).max() > 0.01
    # tuned weights and an adapter together are ambiguous
    os.makedirs(tmp_path / "lora")
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="at most one of tuned weights"):
        load_bundle(str(tmp_path))


def adapted_unet(unet, writer=None):
    """A copy of `unet` with a LoRA adapter that changes its output (peft initialises lora_B to zero)."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    config = LoraConfig(r=2, target_modules=["to_q", "to_v", "conv1"])
    copy = perturbed_unet(unet, scale=0.0)
    adapted = get_peft_model(copy, config) if writer == "peft" else inject_adapter_in_model(config, copy)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name.removeprefix("base_model.model."))))
    return adapted


@pytest.mark.parametrize("writer", ["save_bundle", "peft"])
def test_bundle_with_peft_lora(tmp_path, tiny, pipe, writer):
    adapted = adapted_unet(tiny["unet"], writer)
    if writer == "peft":  # what `PeftModel.save_pretrained` writes (the Phase-2 trainer's unet_lora/)
        save_bundle(tmp_path, pipe.scheduler)
        adapted.save_pretrained(tmp_path / "unet_lora")
    else:
        save_bundle(tmp_path, pipe.scheduler, lora_model=adapted)
    bundle = load_bundle(str(tmp_path))
    assert (bundle.lora_format, os.path.basename(bundle.lora_folder)) == (
        "peft", "unet_lora" if writer == "peft" else "lora")
    base = quiet(FewStepUnconditionalPipeline(unet=perturbed_unet(tiny["unet"], scale=0.0),
                                              scheduler=tiny["scheduler"])).load_fewstep(bundle)
    images = base(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    expected = quiet(FewStepUnconditionalPipeline(unet=adapted, scheduler=pipe.scheduler))(
        batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    untuned = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(images, expected, atol=1e-4)
    assert np.abs(images - untuned).max() > 0.01


def test_bundle_from_hub_id(tmp_path, monkeypatch, tiny, pipe):
    import huggingface_hub

    save_bundle(tmp_path, pipe.scheduler)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    base = quiet(FewStepUnconditionalPipeline(unet=tiny["unet"], scheduler=tiny["scheduler"]))
    base.load_fewstep("someone/fmnist-fewstep")
    assert calls == ["someone/fmnist-fewstep"]
    assert base.scheduler.config.sigma_tables == pipe.scheduler.config.sigma_tables


def test_not_a_bundle(tmp_path, pipe):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        pipe.load_fewstep(str(tmp_path))


@pytest.mark.parametrize("other, message", [
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "sigma_max"),
    (dict(prediction_type="v_prediction"), "prediction_type"),
    ("flow", "family"),
])
def test_mismatched_bundle_is_rejected(tmp_path, pipe, other, message):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = FlowMatchEulerDiscreteScheduler().config if other == "flow" else DDPMScheduler(**other).config
    save_bundle(tmp_path, learned_scheduler(config))
    before = pipe.scheduler
    with pytest.raises(ValueError, match=f"does not fit FewStepUnconditionalPipeline.*{message}"):
        pipe.load_fewstep(str(tmp_path))
    assert pipe.scheduler is before  # nothing was changed


def test_bundle_for_another_model_is_rejected(tmp_path, tiny, pipe):
    config = dict(tiny["unet"].config)
    config["block_out_channels"] = (8, 8)
    other_arch = UNet2DModel.from_config(config)
    save_bundle(tmp_path / "arch", pipe.scheduler, model=other_arch)
    with pytest.raises(ValueError, match="another architecture.*block_out_channels"):
        pipe.load_fewstep(str(tmp_path / "arch"))
    wrong_class = learned_scheduler(tiny["scheduler"].config, provenance={"model_class": "SD3Transformer2DModel"})
    save_bundle(tmp_path / "class", wrong_class)
    with pytest.raises(ValueError, match="learned for a SD3Transformer2DModel"):
        pipe.load_fewstep(str(tmp_path / "class"))


def test_custom_pipeline_file(tmp_path, tiny, pipe):
    DDPMPipeline(**tiny).save_pretrained(tmp_path / "model")
    save_bundle(tmp_path / "bundle", pipe.scheduler)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "model", custom_pipeline=COMMUNITY_FILE, trust_remote_code=True)
    assert type(loaded).__name__ == "FewStepUnconditionalPipeline"
    quiet(loaded).load_fewstep(str(tmp_path / "bundle"))
    images = loaded(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    expected = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(images, expected, atol=1e-4)
