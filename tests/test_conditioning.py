"""Text-to-image conditioning: prompts → encoded kwargs → a guided σ-space denoiser that reproduces the stock
pipelines (SD, SDXL, SD3) and drives the optimiser; dynamic shifting (`mu`); reading prompt files."""
import argparse
import functools
import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from diffusers_fewstep import NoiseSchedule, SigmaDenoiser
from diffusers_fewstep.adapter import SIGMA_MAX_CAP, flatten_kwargs, nest_kwargs
from diffusers_fewstep.conditioning import (add_arguments, encode_text_to_image, load_from_args, load_text_to_image,
                                            read_prompts)
from diffusers_fewstep.optimizer import optimize_schedule
from diffusers_fewstep.pipelines import FewStepSD3Pipeline, FewStepStableDiffusionPipeline
from diffusers_fewstep.schedules import validate_sigmas
from diffusers_fewstep.solvers import sample
from tiny_models import tiny_flux, tiny_sd, tiny_sd3, tiny_sdxl

FAMILIES = {"sd": (tiny_sd, StableDiffusionPipeline), "sdxl": (tiny_sdxl, StableDiffusionXLPipeline),
            "sd3": (tiny_sd3, StableDiffusion3Pipeline)}
PROMPTS = ["a red shirt", "a pair of boots", "a bag"]
GUIDANCE = 5.0


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, stock pipeline, its encoding of PROMPTS with guidance 5 and the negative prompt "blurry")."""
    build, cls = FAMILIES[request.param]
    pipe = quiet(cls(**build()))
    encoded = encode_text_to_image(pipe, PROMPTS, negative_prompt="blurry", guidance_scale=GUIDANCE, batch_size=2)
    return request.param, pipe, encoded


def _first_order_table(pipe, name):
    """Run settings for the stock pipeline and the same table in σ-space: DDIM trailing for VP (first order,
    last step to ᾱ = 1), FlowMatchEuler on explicit σ's below 1 for flow (its s = 1 start is σ = ∞)."""
    if name == "sd3":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.scheduler.set_timesteps(sigmas=[0.95, 0.7, 0.45, 0.2])
        s = pipe.scheduler.sigmas.double()
        return {"sigmas": [0.95, 0.7, 0.45, 0.2]}, s / (1 - s)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                               clip_sample=False)
    pipe.scheduler.set_timesteps(4)
    acp = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps].double()
    return {"num_inference_steps": 4}, torch.cat([((1 - acp) / acp).sqrt(), acp.new_zeros(1)])


def test_guided_denoiser_reproduces_the_pipeline(family):
    name, pipe, encoded = family
    run_kwargs, table = _first_order_table(pipe, name)
    noise = torch.randn(len(PROMPTS), *encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    reference = pipe(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS), guidance_scale=GUIDANCE, latents=noise.clone(),
                     output_type="latent", **run_kwargs).images
    schedule = encoded.denoiser.schedule
    sigmas = table.float()

    @torch.no_grad()
    def ours(denoiser, uncond):
        x = sample(denoiser, noise / schedule.native_scale(sigmas[0]), sigmas, "euler",
                   extra_args={"cond": encoded.cond, "uncond": uncond})
        return x * schedule.native_scale(sigmas[-1])

    scale = reference.abs().max()
    assert float((ours(encoded.denoiser, encoded.uncond) - reference).abs().max() / scale) < 1e-4  # measured ~1e-6
    unguided = SigmaDenoiser(encoded.denoiser.model, encoded.scheduler_config)
    assert float((ours(unguided, None) - reference).abs().max() / scale) > 1e-2  # guidance is what made it equal


def test_optimize_schedule_learns_a_valid_table(family):
    """Phase 1 end to end on the guided, prompt-conditioned denoiser: stock candidates scored on held-out
    paths with the model's own features, the best two learned further, one kept."""
    name, _, encoded = family
    result = optimize_schedule(encoded.denoiser, nfes=[3], cond=encoded.cond, uncond=encoded.uncond, solver="euler",
                               num_iters=3, batch_size=2, pool_size=2, validation_size=2, reference_steps=6,
                               sample_shape=encoded.sample_shape, progress=False, patience=None)
    schedule = encoded.denoiser.schedule
    table = validate_sigmas(result.tables[3], schedule.sigma_min, schedule.sigma_max)
    assert len(table) == 4 and table[-1] == 0.0 and result.solvers[3] == "euler"
    assert len(result.history[3]) == 2  # two starts learned further
    assert all(len(losses) == 3 and np.isfinite(losses).all() for losses in result.history[3].values())
    candidates = {c["name"]: c for c in result.candidates[3]}
    assert all(np.isfinite(list(c["scores"].values())).all() for c in candidates.values())
    learned = [c for c in candidates.values() if c["source"] == "learned"]
    for c in learned:  # gradients reached the table through the guided, conditioned model
        start = candidates[c["start"]]["table"]
        assert max(abs(a - b) / b for a, b in zip(c["table"][1:-1], start[1:-1])) > 1e-4
    kept = [c for c in candidates.values() if c["kept"]]
    assert len(kept) == 1 and kept[0]["table"] == result.tables[3]
    assert kept[0]["scores"]["fd_self"] == min(c["scores"]["fd_self"] for c in candidates.values())


def test_negative_prompt_changes_only_the_uncond_rows(family):
    name, pipe, encoded = family
    plain = encode_text_to_image(pipe, PROMPTS, guidance_scale=GUIDANCE)
    assert set(plain.cond) == set(plain.uncond) == set(encoded.cond)
    for key in encoded.cond:
        torch.testing.assert_close(plain.cond[key], encoded.cond[key], rtol=1e-5, atol=1e-6)
    changed = [k for k in encoded.uncond if (plain.uncond[k] - encoded.uncond[k]).abs().max() > 1e-3]
    assert "encoder_hidden_states" in changed
    if name == "sdxl":  # force_zeros_for_empty_prompt: no negative prompt means zero embeddings
        assert float(plain.uncond["encoder_hidden_states"].abs().max()) == 0.0
        assert "added_cond_kwargs.text_embeds" in changed
    per_prompt = encode_text_to_image(pipe, PROMPTS, negative_prompt=["blurry", "dark", "blurry"],
                                      guidance_scale=GUIDANCE)
    rows = (per_prompt.uncond["encoder_hidden_states"] - encoded.uncond["encoder_hidden_states"]).flatten(1).abs().amax(1)
    assert rows[0] == 0 and rows[2] == 0 and rows[1] > 1e-3


def test_rows_and_shapes(family):
    name, pipe, encoded = family
    assert encoded.sample_shape == encoded.denoiser.sample_shape == (4, 16, 16)
    assert (encoded.height, encoded.width) == (32, 32)
    keys = {"sd": {"encoder_hidden_states"},
            "sdxl": {"encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"},
            "sd3": {"encoder_hidden_states", "pooled_projections"}}[name]
    assert set(encoded.cond) == set(encoded.uncond) == keys
    assert all(v.shape[0] == len(PROMPTS) for v in [*encoded.cond.values(), *encoded.uncond.values()])
    # batched encoding (batch_size=2 over 3 prompts) equals encoding each prompt alone
    alone = encode_text_to_image(pipe, PROMPTS[1:2], negative_prompt="blurry", guidance_scale=GUIDANCE)
    for key in keys:
        torch.testing.assert_close(alone.cond[key][0], encoded.cond[key][1], rtol=1e-5, atol=1e-6)
    if name == "sdxl":  # micro-conditioning: original size = target size = (32, 32), crop (0, 0)
        assert encoded.cond["added_cond_kwargs.time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
        wide = encode_text_to_image(pipe, PROMPTS[:1], guidance_scale=GUIDANCE, height=32, width=64)
        assert wide.sample_shape == (4, 16, 32) and wide.cond["added_cond_kwargs.time_ids"][0].tolist() == [32, 64, 0, 0, 32, 64]


def test_guidance_defaults_follow_the_pipelines():
    sd = FewStepStableDiffusionPipeline(**tiny_sd())  # its __call__ takes **kwargs: the stock default applies
    assert encode_text_to_image(sd, PROMPTS[:1]).guidance_scale == 7.5
    assert encode_text_to_image(FewStepSD3Pipeline(**tiny_sd3()), PROMPTS[:1]).guidance_scale == 7.0
    assert encode_text_to_image(StableDiffusionXLPipeline(**tiny_sdxl()), PROMPTS[:1]).guidance_scale == 5.0
    off = encode_text_to_image(sd, PROMPTS[:1], guidance_scale=1.0)
    assert off.uncond is None and off.denoiser.guidance_scale == 1.0
    with pytest.raises(ValueError, match="multiples of 2 .* got 33×32"):  # the tiny VAE downsamples by 2
        encode_text_to_image(sd, PROMPTS[:1], height=33)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        encode_text_to_image(sd, PROMPTS[:1], negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="not supported for text-conditional"):
        encode_text_to_image(object(), PROMPTS)


def test_load_from_pretrained_frees_the_text_encoders(tmp_path, monkeypatch):
    """`load_text_to_image` loads with `DiffusionPipeline.from_pretrained` and drops the text encoders after encoding."""
    import diffusers

    StableDiffusionXLPipeline(**tiny_sdxl()).save_pretrained(tmp_path)
    loaded = []
    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--prompts-file", str(tmp_path / "prompts.txt"),
                              "--guidance-scale", "5", "--negative-prompt", "blurry", "--torch-dtype", "float32"])
    result = load_from_args(args, device="cpu")
    pipe = loaded[0]
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert result.prompts == PROMPTS and result.denoiser.model is pipe.unet and result.guidance_scale == 5.0
    expected = encode_text_to_image(StableDiffusionXLPipeline(**tiny_sdxl()), PROMPTS, negative_prompt="blurry",
                                    guidance_scale=5.0)
    for key in expected.cond:
        torch.testing.assert_close(result.cond[key], expected.cond[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.uncond[key], expected.uncond[key], rtol=1e-5, atol=1e-6)
    assert load_from_args(parser.parse_args(["--model", str(tmp_path)]), device="cpu") is None
    with pytest.raises(ValueError, match="neither a valid local path nor a valid repo id"):  # diffusers' own error
        load_text_to_image(str(tmp_path / "missing"), PROMPTS)


# --- nested kwargs ---------------------------------------------------------------------------------
def test_flat_and_nested_kwargs_reach_the_model_alike():
    nested = {"encoder_hidden_states": torch.ones(2, 3), "added_cond_kwargs": {"text_embeds": torch.zeros(2, 4),
                                                                               "time_ids": torch.ones(2, 6)}}
    flat = flatten_kwargs(nested)
    assert set(flat) == {"encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"}
    assert nest_kwargs(flat).keys() == nested.keys() and nest_kwargs(flat)["added_cond_kwargs"] == nested["added_cond_kwargs"]
    components = tiny_sdxl()
    den = SigmaDenoiser(components["unet"], components["scheduler"].config, guidance_scale=3.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 16, 64, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6) * 32}}
    uncond = {**cond, "added_cond_kwargs": {**cond["added_cond_kwargs"], "text_embeds": torch.zeros(2, 32)}}
    with torch.no_grad():
        d_nested, d_flat = den(x, 2.0, cond, uncond), den(x, 2.0, flatten_kwargs(cond), flatten_kwargs(uncond))
        d_cond = SigmaDenoiser(components["unet"], components["scheduler"].config)(x, 2.0, flatten_kwargs(cond))
    torch.testing.assert_close(d_nested, d_flat, rtol=0, atol=0)
    assert float((d_flat - d_cond).abs().max()) > 1e-3  # the pooled embedding reached the model


# --- dynamic shifting -----------------------------------------------------------------------------
@pytest.mark.parametrize("time_shift_type,mu", [("exponential", 0.8), ("exponential", 1.15), ("linear", 2.5)])
def test_dynamic_shifting_mu_matches_flow_match_euler(time_shift_type, mu):
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift_type).config
    schedule = NoiseSchedule(config, mu=mu)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(1000, mu=mu)  # t = 1000 … 1, i.e. unshifted s = k/1000 as the training grid
    s = scheduler.sigmas[:-1].flip(0).double()  # float32 s; compared in s = σ/(1+σ), where float32 is exact to 1e-7
    ours = schedule.train_sigmas / (1 + schedule.train_sigmas)
    torch.testing.assert_close(ours[:-1], s[:-1], rtol=1e-6, atol=0)  # s = 1 (σ = ∞) is capped at σ = 4096 by us
    assert s[-1] == 1 and schedule.sigma_max == pytest.approx(SIGMA_MAX_CAP)
    other = NoiseSchedule(config, mu=mu + 0.5)
    assert other.sigma_min > schedule.sigma_min * 1.1  # mu moves the σ range
    with pytest.raises(ValueError, match="pass `mu`"):
        NoiseSchedule(config)
    assert NoiseSchedule({**config, "mu": mu}).sigma_min == schedule.sigma_min  # a config may carry mu
    assert NoiseSchedule(schedule.config).sigma_min == schedule.sigma_min  # and the schedule's own config does
    assert NoiseSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config, mu=5.0).sigma_min == pytest.approx(
        NoiseSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config).sigma_min)  # mu only for dynamic configs


def test_dynamic_shift_falls_back_to_each_pipelines_max_shift():
    """A config without `max_shift` (a raw scheduler_config.json): at the largest image, mu is the pipeline's default
    max_shift, 1.16 for SD3 and 1.15 for Flux; half-way in tokens, half-way in shift."""
    from diffusers_fewstep.conditioning import dynamic_shift

    raw = {"use_dynamic_shifting": True}
    assert dynamic_shift(raw, 4096, "sd3") == pytest.approx(1.16)
    assert dynamic_shift(raw, 4096, "flux") == pytest.approx(1.15)
    assert dynamic_shift(raw, 2176, "sd3") == pytest.approx((0.5 + 1.16) / 2)
    assert dynamic_shift({}, 4096, "sd3") is None


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_mu_is_the_pipelines(name, monkeypatch):
    """With a dynamic-shifting scheduler, `mu` is what the pipeline passes to `set_timesteps`, for every size."""
    if name == "sd3":
        components = tiny_sd3()
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                                  max_image_seq_len=256)
        pipe = quiet(StableDiffusion3Pipeline(**components))
    else:
        pipe = quiet(FluxPipeline(**tiny_flux()))
    seen = {}
    original = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(original)  # pipelines inspect its signature
    def spy(self, *args, **kwargs):
        seen["mu"] = kwargs.get("mu")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", spy)
    mus = []
    for height in (32, 64):
        pipe(PROMPTS[0], num_inference_steps=2, height=height, width=32, output_type="latent")
        encoded = encode_text_to_image(pipe, PROMPTS[:1], height=height, width=32)
        assert encoded.mu is not None and encoded.mu == pytest.approx(seen["mu"], rel=1e-12)
        assert encoded.denoiser.sigma_min == pytest.approx(NoiseSchedule(pipe.scheduler.config, mu=seen["mu"]).sigma_min)
        mus.append(encoded.mu)
    assert mus[1] > mus[0] + 1e-3  # more image tokens, more shift


def test_decode_is_the_pipelines_own(family):
    """`TextToImage.decode` turns the pipeline's latents into the images its `__call__` returns (as [-1, 1])."""
    name, pipe, encoded = family
    run_kwargs, _ = _first_order_table(pipe, name)
    noise = torch.randn(len(PROMPTS), *encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    out = {kind: pipe(PROMPTS, guidance_scale=GUIDANCE, latents=noise.clone(), output_type=kind, **run_kwargs).images
           for kind in ("latent", "pt")}
    images = encoded.decode(out["latent"])
    assert images.shape == out["pt"].shape and images.dtype == torch.float32
    assert float((images - (2 * out["pt"] - 1)).abs().max()) < 1e-5
    assert float(images.std()) > 1e-3  # not a constant image


def test_releasing_the_vae_frees_it_from_decode():
    """The training script drops the VAE after encoding its images: `decode` must not keep it alive."""
    from diffusers_fewstep.conditioning import release

    pipe = quiet(StableDiffusionPipeline(**tiny_sd()))
    encoded = encode_text_to_image(pipe, PROMPTS[:1], guidance_scale=GUIDANCE)
    latents = torch.randn(2, *encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    assert encoded.decode(latents).shape == (2, 3, 32, 32)
    release(pipe, ["vae"], "cpu")
    with pytest.raises(ValueError, match="^the pipeline's VAE was released; decoding needs it$"):
        encoded.decode(latents)


# --- Flux (guidance-distilled, packed latents) -----------------------------------------------------
@pytest.fixture(scope="module")
def flux():
    pipe = quiet(FluxPipeline(**tiny_flux()))
    return pipe, encode_text_to_image(pipe, PROMPTS[:2], height=32, width=32, batch_size=1)


def test_flux_denoiser_reproduces_the_pipeline(flux):
    pipe, encoded = flux
    assert encoded.sample_shape == (256, 4) and encoded.uncond is None and encoded.guidance_scale == 3.5
    assert encoded.cond["guidance"].tolist() == [3.5, 3.5] and encoded.denoiser.guidance_scale == 1.0
    noise = torch.randn(2, *encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    reference = pipe(PROMPTS[:2], height=32, width=32, sigmas=[0.95, 0.7, 0.45, 0.2], latents=noise.clone(),
                     output_type="latent").images
    s = pipe.scheduler.sigmas.double()
    sigmas = (s / (1 - s)).float()
    schedule = encoded.denoiser.schedule

    @torch.no_grad()
    def ours(cond):
        x = sample(encoded.denoiser, noise / schedule.native_scale(sigmas[0]), sigmas, "euler", extra_args={"cond": cond})
        return x * schedule.native_scale(sigmas[-1])

    scale = reference.abs().max()
    assert float((ours(encoded.cond) - reference).abs().max() / scale) < 1e-4
    other_guidance = {**encoded.cond, "guidance": torch.full((2,), 1.0)}
    assert float((ours(other_guidance) - reference).abs().max() / scale) > 1e-3  # the guidance embedding matters


def test_flux_decode_unpacks_the_latents(flux):
    pipe, encoded = flux
    noise = torch.randn(2, *encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    out = {kind: pipe(PROMPTS[:2], height=32, width=32, num_inference_steps=2, latents=noise.clone(),
                      output_type=kind).images for kind in ("latent", "pt")}
    images = encoded.decode(out["latent"])
    assert images.shape == out["pt"].shape == (2, 3, 32, 32)
    assert float((images - (2 * out["pt"] - 1)).abs().max()) < 1e-5


def test_flux_optimize_schedule(flux):
    pipe, encoded = flux
    result = optimize_schedule(encoded.denoiser, nfes=[3], cond=encoded.cond, num_iters=2, batch_size=2, pool_size=2,
                               validation_size=2, reference_steps=6, progress=False, patience=None)
    schedule = encoded.denoiser.schedule
    assert len(validate_sigmas(result.tables[3], schedule.sigma_min, schedule.sigma_max)) == 4


def test_flux_errors_and_schnell(flux):
    pipe, encoded = flux
    assert encoded.mu is not None and encoded.denoiser.sigma_min != NoiseSchedule(pipe.scheduler.config, mu=0.0).sigma_min
    with pytest.raises(ValueError, match="negative prompts .* not supported for Flux"):
        encode_text_to_image(pipe, PROMPTS[:1], negative_prompt="blurry", height=32, width=32)
    with pytest.raises(ValueError, match="multiples of 2"):
        encode_text_to_image(pipe, PROMPTS[:1], height=33, width=32)
    schnell = encode_text_to_image(FluxPipeline(**tiny_flux(guidance_embeds=False)), PROMPTS[:1], height=32, width=32)
    assert set(schnell.cond) == {"encoder_hidden_states", "pooled_projections"}  # no guidance embedding
    with torch.no_grad():
        assert schnell.denoiser(torch.randn(1, 256, 4), 1.0, cond=schnell.cond).shape == (1, 256, 4)


# --- prompts files ------------------------------------------------------------------------------
def test_read_prompts_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red shirt\n\n   \n  a pair of boots  \na bag")
    assert read_prompts(str(path)) == ["a red shirt", "a pair of boots", "a bag"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts in"):
        read_prompts(str(path))
    with pytest.raises(ValueError, match="plain text file"):
        read_prompts(str(tmp_path / "prompts.txt"), column="caption")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_read_prompts_imagefolder_metadata(tmp_path):
    rows = [{"file_name": "0.png", "text": "a cat"}, {"file_name": "1.png", "text": "a dog", "caption": "dog"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_prompts(str(tmp_path)) == ["a cat", "a dog"]
    assert read_prompts(str(tmp_path), column="caption") == ["dog"]  # rows without it are skipped
    with pytest.raises(ValueError, match=r"no column 'prompt'; its columns are \['caption', 'file_name', 'text'\]"):
        read_prompts(str(tmp_path), column="prompt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl or metadata.csv"):
        read_prompts(str(tmp_path / "empty"))


def test_read_prompts_tables(tmp_path):
    (tmp_path / "p.csv").write_text('id,prompt\n1,"a cat, sitting"\n2,a dog\n')
    assert read_prompts(str(tmp_path / "p.csv"), column="prompt") == ["a cat, sitting", "a dog"]
    with pytest.raises(ValueError, match="no column 'text'.*--prompt-column"):
        read_prompts(str(tmp_path / "p.csv"))
    (tmp_path / "p.json").write_text(json.dumps(["a cat", "", "a dog"]))
    assert read_prompts(str(tmp_path / "p.json")) == ["a cat", "a dog"]
    (tmp_path / "r.json").write_text(json.dumps([{"text": "a cat"}, {"text": "a dog"}]))
    assert read_prompts(str(tmp_path / "r.json")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"caption": "a bird"}\n\n{"caption": "a fish"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl"), column="caption") == ["a bird", "a fish"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="not valid JSONL"):
        read_prompts(str(tmp_path / "bad.jsonl"))
