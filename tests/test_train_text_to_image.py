"""train.py on text-to-image pipelines (tiny SD, SDXL, SD3 and the Fashion-MNIST SD fixture, CPU): the output loads
with the pipeline's own `from_pretrained` + `load_lora_weights` and samples exactly what the script's student does;
guidance inside teacher and student; prompts from a file or a captioned image folder; resume; refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusers_fewstep import LearnedScheduleScheduler
from diffusers_fewstep.pipelines import (FewStepSD3Pipeline, FewStepStableDiffusionPipeline,
                                         FewStepStableDiffusionXLPipeline)
from tiny_models import tiny_sd, tiny_sd3, tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_fewstep.py")
FIXTURE = os.path.join(ROOT, "assets", "fmnist-t2i-sd")
PROMPTS = ["a red shirt", "a pair of boots", "a bag"]
GUIDANCE = 5.0
# small everything: 2-step tables, 10-step references, 3 optimiser steps, no hand-made comparison rows
FAST = ["--nfe", "2", "--phase1_iters", "2", "--phase1_batch_size", "4", "--phase1_pool_size", "4", "--phase1_validation_size", "4",
        "--pool_size", "8", "--pool_batch_size", "8", "--train_batch_size", "4", "--reference_steps", "10",
        "--eval_samples", "4", "--compare_nfe", "--rounds", "1", "--phase2_steps", "3", "--checkpointing_steps", "100",
        "--guidance_scale", str(GUIDANCE)]
FAMILIES = {"sd": (tiny_sd, StableDiffusionPipeline), "sdxl": (tiny_sdxl, StableDiffusionXLPipeline),
            "sd3": (tiny_sd3, StableDiffusion3Pipeline)}
FEWSTEP = {"sd": FewStepStableDiffusionPipeline, "sdxl": FewStepStableDiffusionXLPipeline, "sd3": FewStepSD3Pipeline}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Pipeline folders of the tiny SD, SDXL and SD3 components, and a prompts file."""
    root = tmp_path_factory.mktemp("t2i")
    for name, (build, cls) in FAMILIES.items():
        cls(**build()).save_pretrained(root / name)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _spy(monkeypatch, module, name, calls):
    """Record every call of `module.name` as (args, kwargs, result)."""
    original = getattr(module, name)

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, spy)


def _run(monkeypatch, base, out, *extra):
    """train.main in this process; returns what it saved the LoRA from, its teacher solves and its Phase-1 calls."""
    from diffusers_fewstep import optimizer, text_to_image_training, train

    saves, solves, phase1 = [], [], []
    _spy(monkeypatch, text_to_image_training, "save_lora", saves)
    _spy(monkeypatch, train, "teacher_states", solves)
    _spy(monkeypatch, optimizer, "optimize_schedule", phase1)
    train.main(train.parse_args(["--pretrained_model_name_or_path", str(base), "--output_dir", str(out), *FAST,
                                 *extra]))
    monkeypatch.undo()
    return saves, solves, phase1


def _loaded(cls, base, out=None, lora=True):
    """The stock pipeline from `base`, with the output folder's LoRA (`load_lora_weights`) and scheduler."""
    none = {"text_encoder_3": None, "tokenizer_3": None} if cls is StableDiffusion3Pipeline else {}  # saved without T5
    pipe = quiet(cls.from_pretrained(str(base), **none))
    if out is not None and lora:
        pipe.load_lora_weights(str(out))
    if out is not None:
        pipe.scheduler = LearnedScheduleScheduler.from_pretrained(str(out), subfolder="scheduler")
    return pipe


def _rows(training, k):
    """The denoiser kwargs of the first `k` prompts (rows of the script's encodings)."""
    from diffusers_fewstep.selection import extra_args

    return extra_args(training.encoded.cond, training.encoded.uncond, torch.arange(k))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_output_loads_with_load_lora_weights_and_samples_what_the_student_does(saved, tmp_path, monkeypatch,
                                                                                     name):
    from diffusers_fewstep.evaluation import generate

    _, cls = FAMILIES[name]
    out = tmp_path / "out"
    saves, solves, phase1 = _run(monkeypatch, saved / name, out, "--prompts_file", str(saved / "prompts.txt"),
                                 "--learning_rate", "1e-2", "--reference_scheduler", "ode")  # the teacher's ODE solve
    # 1. the folder: the LoRA in diffusers' format, the scheduler, the model card; LoRA was on by default
    assert {"pytorch_lora_weights.safetensors", "scheduler", "README.md", "metrics.json"} <= set(os.listdir(out))
    assert not os.path.exists(out / "unet_lora")
    card = (out / "README.md").read_text()
    assert f"{cls.__name__}.from_pretrained" in card and 'pipe.load_lora_weights("out")' in card
    assert f"guidance_scale={GUIDANCE:g}" in card
    (training, model, _), _, _ = saves[0]
    component = "transformer" if name == "sd3" else "unet"
    assert training.component == component and training.encoded.guidance_scale == GUIDANCE
    # the empty negative prompt, the same for every prompt, is kept once
    assert {len(v) for v in training.encoded.cond.values()} == {3}
    assert {len(v) for v in training.encoded.uncond.values()} == {1}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and n.rsplit(".lora_", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0"))
                           for n in trained)
    # 2. the stock pipeline with the output loaded samples what the script's student computes, in as many model
    #    calls as num_inference_steps (guidance inside each call)
    pipe = _loaded(cls, saved / name, out)
    table = pipe.scheduler.config.sigma_tables["2"]
    noise = torch.randn(3, *training.encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = getattr(pipe, component).register_forward_hook(lambda *a: calls.append(1))
    latents = pipe(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise.clone(),
                   output_type="latent").images
    handle.remove()
    assert len(calls) == 2
    student = training.denoiser(model).eval()
    with torch.no_grad():
        ours = generate(student, noise, table, "euler", extra_args=_rows(training, 3), clamp=False)
    assert student.num_evals == 2
    scale = float(latents.abs().max())
    assert float((latents - ours).abs().max()) < 1e-4 * scale
    # 3. the LoRA changes the output: the base pipeline with the same scheduler samples something else
    base = _loaded(cls, saved / name, out, lora=False)
    base_latents = base(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise.clone(),
                        output_type="latent").images
    assert float((latents - base_latents).abs().max()) > 2e-3 * scale  # ≥ 20× the agreement above
    images = pipe(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise.clone(), output_type="np").images
    assert images.shape == (3, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    # the folder is also a few-step bundle (`load_fewstep`: the diffusers-format LoRA at its root)
    fewstep = FEWSTEP[name].from_pretrained(str(saved / name), **({"text_encoder_3": None, "tokenizer_3": None}
                                                                   if name == "sd3" else {}))
    quiet(fewstep).load_fewstep(str(out))
    bundled = fewstep(PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise.clone(),
                      output_type="latent").images
    assert float((bundled - latents).abs().max()) < 1e-4 * scale
    # 4. the teacher's reference solves are the *base* model's guided trajectories (adapter off, also after
    #    training): its 10-step solve equals the base pipeline on the same grid with the same solver (DPM++ 2M)
    from diffusers_fewstep.reference import reference_sigmas, solve

    (teacher, _, _, _), kwargs, _ = solves[0]
    assert teacher.guidance_scale == GUIDANCE and set(kwargs) == {"cond", "uncond"}
    grid = reference_sigmas(teacher.schedule, 10).tolist()
    with torch.no_grad():
        solved = solve(teacher, noise, 10, extra_args=_rows(training, 3))
    base.scheduler = LearnedScheduleScheduler.from_config(base.scheduler.config, sigma_tables={"10": grid},
                                                          solver="dpmpp_2m")
    reference = base(PROMPTS, num_inference_steps=10, guidance_scale=GUIDANCE, latents=noise.clone(),
                     output_type="latent").images
    assert float((solved - reference).abs().max()) < 1e-4 * float(reference.abs().max())
    # 5. Phase 1 learned the tables on the same prompts, guided
    learned = [kw for _, kw, _ in phase1]
    assert len(learned) == 2 and all(kw["cond"] is training.encoded.cond and kw["uncond"] is training.encoded.uncond
                                     and len(kw["cond"]["encoder_hidden_states"]) == 3 for kw in learned)
    assert all(args[0].guidance_scale == GUIDANCE for args, _, _ in phase1)


def test_lora_on_convolutions_reloads_exactly(saved, tmp_path, monkeypatch):
    """--lora_layers naming convolutions adapts them too, and the LoRA file reloads with `load_lora_weights` to the
    same UNet output. (With diffusers' `convert_state_dict_to_diffusers` the attention keys were renamed and the
    convolution keys not, and the reloaded UNet lost its attention adapters: 0.098 off on a 1.1 output.)"""
    out = tmp_path / "out"
    layers = ["conv1,conv2", "time_emb_proj", "proj_in,proj_out", "to_q,to_k,to_v,to_out.0"]  # both spellings
    saves, _, _ = _run(monkeypatch, saved / "sd", out, "--prompts_file", str(saved / "prompts.txt"),
                       "--learning_rate", "1e-2", "--phase1_iters", "0", "--lora_layers", *layers)
    (training, model, _), _, _ = saves[0]
    trained = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"conv1", "conv2", "time_emb_proj", "proj_in", "proj_out", "to_q", "to_k", "to_v", "0"}
    pipe = _loaded(StableDiffusionPipeline, saved / "sd", out)
    base = _loaded(StableDiffusionPipeline, saved / "sd")
    kwargs = _rows(training, 1)["cond"]
    x = torch.randn(1, *training.encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        ours, loaded, plain = (m(x, t, **kwargs).sample for m in (model.float(), pipe.unet, base.unet))
    assert float((ours - loaded).abs().max()) < 1e-4 * float(ours.abs().max())
    assert float((loaded - plain).abs().max()) > 1e-2 * float(ours.abs().max())  # the adapter changed the UNet


def _captioned_folder(root, captions):
    """An imagefolder dataset: k.png (a flat colour per image) and metadata.jsonl with file_name and text."""
    from PIL import Image

    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for k, caption in enumerate(captions):
            Image.fromarray(np.full((40, 48, 3), (60 * k, 255 - 60 * k, 30 * k), np.uint8)).save(root / f"{k}.png")
            f.write(json.dumps({"file_name": f"{k}.png", "text": caption}) + "\n")
    return root


@pytest.mark.parametrize("name", ["sd", "sdxl-mean-std", "sd3"])
def test_encoded_images_decode_as_the_vae_round_trip(name, tmp_path):
    """`encode_images` is the inverse of the pipelines' decoding (`TextToImage.decode`): SD's scaling, SD3's
    shift_factor and, where an SDXL VAE sets latents_mean/latents_std, those too (encoding once ignored them)."""
    from diffusers_fewstep.conditioning import encode_text_to_image
    from diffusers_fewstep.text_to_image_training import encode_images

    build, cls = FAMILIES[name.split("-")[0]]
    pipe = cls(**build())
    if name == "sdxl-mean-std":
        channels = pipe.vae.config.latent_channels
        pipe.vae.register_to_config(latents_mean=[0.3 * k - 0.2 for k in range(channels)],
                                    latents_std=[0.5 + 0.25 * k for k in range(channels)])
    folder = _captioned_folder(tmp_path / "images", PROMPTS[:2])
    latents = encode_images(pipe.vae, [str(folder / f"{k}.png") for k in range(2)], 32, 32, "cpu")
    decoded = encode_text_to_image(pipe, PROMPTS[:1], height=32, width=32).decode(latents)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(folder / f"{k}.png").convert("RGB").resize(
        (32, 32), Image.BICUBIC))) for k in range(2)]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        expected = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    assert float((decoded - expected).abs().max()) < 1e-4
    assert float(latents.std()) > 1e-3


def test_captioned_folder_pairs_each_image_with_its_caption_and_full_tuning_saves_the_model(saved, tmp_path,
                                                                                            monkeypatch):
    """--train_data_dir in the imagefolder layout: the captions are the prompts, and the denoising loss of each
    trajectory uses the VAE latent of the image whose caption conditions it. --no-use_lora: the tuned UNet is saved
    as unet/ and, put into the stock pipeline, samples what the script's student does."""
    from diffusers import UNet2DConditionModel

    from diffusers_fewstep import text_to_image_training, train
    from diffusers_fewstep.evaluation import generate

    captions = ["a red shirt", "a pair of boots", "", "a bag"]  # an empty caption is the empty prompt
    data = _captioned_folder(tmp_path / "data", captions)
    losses, loaded, saves = [], [], []
    _spy(monkeypatch, train, "phase2_loss", losses)
    _spy(monkeypatch, text_to_image_training, "load_training_pipeline", loaded)
    _spy(monkeypatch, train, "_save_pipeline", saves)
    out = tmp_path / "out"
    train.main(train.parse_args(["--pretrained_model_name_or_path", str(saved / "sd"), "--output_dir", str(out), *FAST,
                                 "--train_data_dir", str(data), "--denoising_weight", "0.5", "--no-use_lora",
                                 "--learning_rate", "1e-3"]))
    monkeypatch.undo()
    training = loaded[0][2]
    assert training.encoded.prompts == captions and training.latents.shape == (4, 4, 16, 16)
    # 1. the latents are the pipeline VAE's (centre-cropped to 32×32, scaled as the pipeline scales)
    pipe = _loaded(StableDiffusionPipeline, saved / "sd")
    from PIL import Image, ImageOps

    pixels = np.asarray(ImageOps.fit(Image.open(data / "1.png").convert("RGB"), (32, 32), Image.BICUBIC))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(training.latents[1:2], expected, rtol=1e-4, atol=1e-5)
    # 2. every denoising target is the latent of the trajectory's own caption
    embeds = training.encoded.cond["encoder_hidden_states"]
    for _, kwargs, (_, logs) in losses:
        assert "denoising" in logs and logs["denoising"] > 0
        for x0, cond in zip(kwargs["x0"], kwargs["cond"]["encoder_hidden_states"]):
            k = int((training.latents - x0).flatten(1).abs().amax(1).argmin())
            assert torch.equal(x0, training.latents[k]) and torch.equal(cond, embeds[k])
    # 3. full fine-tuning: unet/ in the stock pipeline samples what the student does
    assert os.path.isdir(out / "unet") and not os.path.exists(out / "pytorch_lora_weights.safetensors")
    assert 'pipe.unet = type(pipe.unet).from_pretrained("out", subfolder="unet")' in (out / "README.md").read_text()
    model = saves[0][0][0]
    pipe.unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    pipe.scheduler = LearnedScheduleScheduler.from_pretrained(str(out), subfolder="scheduler")
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    latents = pipe(captions[:2], num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise.clone(),
                   output_type="latent").images
    with torch.no_grad():
        ours = generate(training.denoiser(model).eval(), noise, pipe.scheduler.config.sigma_tables["2"], "euler",
                        extra_args=_rows(training, 2), clamp=False)
    assert float((latents - ours).abs().max()) < 1e-4 * float(latents.abs().max())


def test_stopped_run_resumes_to_the_uninterrupted_lora(saved, tmp_path):
    """The in-place (diffusers) LoRA adapter travels in the checkpoints, alone: stopped after step 3 of 4 and resumed
    from checkpoint-2, the run ends with the same tables and bit-identical LoRA weights, which did train."""
    from safetensors.torch import load_file

    from diffusers_fewstep.train import main, parse_args

    args = ["--pretrained_model_name_or_path", str(saved / "sd"), "--prompts_file", str(saved / "prompts.txt"), *FAST,
            "--phase2_steps", "4", "--checkpointing_steps", "2", "--eval_samples", "0", "--learning_rate", "1e-2",
            "--phase2_target", "auto"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    main(parse_args(args + ["--output_dir", str(full)]))
    main(parse_args(args + ["--output_dir", str(killed), "--stop_after_steps", "3"]))
    assert not os.path.exists(killed / "pytorch_lora_weights.safetensors")
    main(parse_args(args + ["--output_dir", str(killed), "--resume_from_checkpoint", "latest"]))
    tables = [json.loads((d / "scheduler" / "scheduler_config.json").read_text())["sigma_tables"] for d in (full, killed)]
    assert tables[0] == tables[1]
    # --phase2_target auto for a text-to-image pipeline with a deterministic scheduler: its own image is the target
    record = json.loads((full / "metrics.json").read_text())
    scheduler = json.loads((saved / "sd" / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert record["args"]["reference"] == {"reference_scheduler": "pipeline", "reference_solver": scheduler,
                                           "reference_steps": 10}
    assert record["args"]["phase2_targets"] == {"2": "endpoint"}
    card = (full / "README.md").read_text()
    assert f"against the image the pipeline's own {scheduler} makes in 10 steps" in card
    assert "(LoRA adapter) (Phase-2 target: endpoint at 2 steps)" in card
    a, b = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4  # B starts at 0: it trained
    # the checkpoints hold the adapter only (as diffusers' LoRA scripts save them), not the frozen UNet
    saved = load_file(str(killed / "checkpoint-2" / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert len(saved) == len(a)
    with pytest.raises(ValueError, match="does not hold this model's LoRA adapter .* resume with the run's --lora_rank"):
        main(parse_args(args + ["--output_dir", str(killed), "--resume_from_checkpoint", "latest", "--lora_rank", "4"]))


def test_text_to_image_settings_are_refused_in_one_line(saved, tmp_path, capsys):
    from diffusers_fewstep.cli import main as cli
    from diffusers_fewstep.train import main, parse_args

    prompts = str(saved / "prompts.txt")
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n")
    for bad, says in [(["--conditioning_file", str(labels)], "--conditioning_file holds class labels"),
                      (["--fd_classifier", str(tmp_path)], "--fd_classifier measures pixel images"),
                      (["--train_data_dir", str(tmp_path)], "either with --prompts_file or as the captions")]:
        with pytest.raises(SystemExit):
            parse_args(["--prompts_file", prompts, *bad])
        assert says in capsys.readouterr().err
    base = ["--pretrained_model_name_or_path", str(saved / "sd"), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="is a text-to-image pipeline: pass its prompts with --prompts_file"):
        main(parse_args(base))
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl or metadata.csv"):
        main(parse_args(base + ["--train_data_dir", str(tmp_path)]))
    from diffusers import DDPMPipeline

    from tiny_models import tiny_unconditional

    DDPMPipeline(**tiny_unconditional()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="DDPMPipeline is not supported for text-conditional"):
        main(parse_args(["--pretrained_model_name_or_path", str(tmp_path / "ddpm"), "--prompts_file", prompts,
                         "--output_dir", str(tmp_path / "o")]))
    # through the console script: one line, exit status 2
    capsys.readouterr()
    assert cli(["train", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusers-fewstep: error: ") and "--prompts_file" in err[0]


def test_guided_phase2_losses_keep_each_row_with_its_trajectory(saved):
    """The batched losses of a guided student (cond and uncond rows repeated over the N steps of one batch) equal
    the same losses computed one trajectory at a time, and the trajectory's with all steps in one call
    (`batch_steps`), as does the endpoint target's; guidance changes them."""
    from diffusers import DiffusionPipeline

    from diffusers_fewstep.conditioning import encode_text_to_image
    from diffusers_fewstep.finetune import phase2_loss, teacher_states

    encoded = encode_text_to_image(DiffusionPipeline.from_pretrained(str(saved / "sd")), PROMPTS, guidance_scale=GUIDANCE)
    student = encoded.denoiser
    table = torch.tensor([14.6, 3.0, 0.6, 0.0])
    noise = torch.randn(3, *encoded.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = teacher_states(student, noise, table, 10, cond=encoded.cond, uncond=encoded.uncond) * 1.01
        for target in ("interval_average", "trajectory"):
            batched = phase2_loss(student, states, table, target, cond=encoded.cond, uncond=encoded.uncond)[1]
            one = [phase2_loss(student, states[:, k:k + 1], table, target,
                               cond={n: v[k:k + 1] for n, v in encoded.cond.items()},
                               uncond={n: v[k:k + 1] for n, v in encoded.uncond.items()})[1] for k in range(3)]
            for i in range(3):
                mean = sum(o[f"step_{i}"] for o in one) / 3
                assert abs(batched[f"step_{i}"] - mean) < 1e-4 * mean, (target, i)
            if target == "trajectory":  # the N steps in one call (cond and uncond rows repeated): the same losses
                steps = phase2_loss(student, states, table, target, cond=encoded.cond, uncond=encoded.uncond,
                                    batch_steps=True)[1]
                for i in range(3):
                    assert abs(steps[f"step_{i}"] - batched[f"step_{i}"]) < 1e-4 * batched[f"step_{i}"], i
        # the endpoint target (gradients through the whole guided solve): the batch's loss is the mean of each row's
        end = float(phase2_loss(student, states, table, "endpoint", cond=encoded.cond, uncond=encoded.uncond)[0])
        ends = [float(phase2_loss(student, states[:, k:k + 1], table, "endpoint",
                                  cond={n: v[k:k + 1] for n, v in encoded.cond.items()},
                                  uncond={n: v[k:k + 1] for n, v in encoded.uncond.items()})[0]) for k in range(3)]
        assert end > 0 and abs(end - sum(ends) / 3) < 1e-4 * end
        student.guidance_scale = 1.0
        unguided = phase2_loss(student, states, table, "interval_average", cond=encoded.cond)[1]
    assert abs(unguided["step_1"] - batched["step_1"]) > 0.05 * batched["step_1"]


def test_read_captioned_folder_reads_csv_and_other_columns(tmp_path):
    from diffusers_fewstep.text_to_image_training import read_captioned_folder

    (tmp_path / "metadata.csv").write_text("file_name,caption\nsub/a.png,a coat\nb.png,\n")
    files, captions = read_captioned_folder(str(tmp_path), "caption")
    assert files == [str(tmp_path / "sub" / "a.png"), str(tmp_path / "b.png")] and captions == ["a coat", ""]
    with pytest.raises(ValueError, match="has no column 'text'"):
        read_captioned_folder(str(tmp_path))


def test_lora_base_weights_in_half_precision_under_mixed_precision(saved):
    """As diffusers' LoRA scripts: with bf16 the frozen weights are bf16 (half the memory) and the adapter float32."""
    from diffusers import UNet2DConditionModel

    from diffusers_fewstep.finetune import TEXT_TO_IMAGE_LORA_MODULES, add_lora
    from diffusers_fewstep.text_to_image_training import half_precision_base

    unet = UNet2DConditionModel.from_pretrained(str(saved / "sd"), subfolder="unet").requires_grad_(False)
    unet = add_lora(unet, rank=4, target_modules=TEXT_TO_IMAGE_LORA_MODULES, in_place=True)
    half_precision_base(unet, "bf16")
    dtypes = {(p.requires_grad, p.dtype) for p in unet.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(torch.randn(1, 4, 16, 16, dtype=torch.bfloat16), 500,
                   encoder_hidden_states=torch.randn(1, 16, 32)).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_accelerate_launch_on_the_fashion_mnist_text_to_image_fixture(tmp_path):
    """`accelerate launch scripts/train_fewstep.py` on the trained SD-style fixture with a prompts file: the output
    loads with `StableDiffusionPipeline.from_pretrained` + `load_lora_weights` + the learned scheduler, samples
    images, differs from the base model, and equals the student of the script's last checkpoint."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from diffusers_fewstep import SigmaDenoiser
    from diffusers_fewstep.conditioning import encode_text_to_image
    from diffusers_fewstep.evaluation import generate
    from diffusers_fewstep.finetune import TEXT_TO_IMAGE_LORA_MODULES, add_lora

    prompts = ["a photo of a sneaker", "a photo of a bag", "a picture of a dress", "trouser"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--pretrained_model_name_or_path", FIXTURE,
           "--prompts_file", str(tmp_path / "prompts.txt"), "--output_dir", str(out), *FAST, "--learning_rate", "1e-2",
           "--lora_rank", "8", "--no-keep_best"]  # the last checkpoint's weights, not the best evaluation's
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = _loaded(StableDiffusionPipeline, FIXTURE, out)
    base = _loaded(StableDiffusionPipeline, FIXTURE, out, lora=False)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda p, kind: p(prompts, num_inference_steps=2, guidance_scale=GUIDANCE, latents=noise.clone(),  # noqa: E731
                            output_type=kind).images
    latents, base_latents, images = run(pipe, "latent"), run(base, "latent"), run(pipe, "np")
    assert images.shape == (4, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    scale = float(latents.abs().max())
    assert float((latents - base_latents).abs().max()) > 2e-3 * scale
    # the student as the script's last checkpoint holds it: the fixture's UNet with the adapter and those weights
    last = max((d for d in os.listdir(out) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    unet = UNet2DConditionModel.from_pretrained(FIXTURE, subfolder="unet").requires_grad_(False)
    unet = add_lora(unet, rank=8, target_modules=TEXT_TO_IMAGE_LORA_MODULES, in_place=True)
    missing, unexpected = unet.load_state_dict(load_file(str(out / last / "model.safetensors")), strict=False)
    assert not unexpected and missing and not any("lora_" in k for k in missing)  # the checkpoint holds the adapter
    encoded = encode_text_to_image(base, prompts, guidance_scale=GUIDANCE)
    student = SigmaDenoiser(unet.eval(), base.scheduler.config, guidance_scale=GUIDANCE)
    with torch.no_grad():
        ours = generate(student, noise, pipe.scheduler.config.sigma_tables["2"], "euler",
                        extra_args={"cond": encoded.cond, "uncond": encoded.uncond}, clamp=False)
    assert float((latents - ours).abs().max()) < 1e-4 * scale
    # docs/training.md's evaluation recipe: the LoRA fused into a full pipeline folder (its own scheduler kept)
    fused = quiet(StableDiffusionPipeline.from_pretrained(FIXTURE))
    fused.load_lora_weights(str(out))
    fused.fuse_lora()
    fused.unload_lora_weights()
    fused.save_pretrained(str(tmp_path / "fused"))
    fused = _loaded(StableDiffusionPipeline, tmp_path / "fused", out, lora=False)
    assert float((run(fused, "latent") - latents).abs().max()) < 1e-4 * scale


def test_pipeline_loaded_once_encoders_freed_and_offloaded(saved, monkeypatch):
    """One `from_pretrained`; the prompts are encoded with the pipeline's own encode_prompt on the CPU under
    --offload_text_encoders, then the text encoders and the VAE are dropped and the model and the encodings go to
    the training device (here the meta device, which the text encoders never reach)."""
    import diffusers

    from diffusers_fewstep import text_to_image_training
    from diffusers_fewstep.train import parse_args

    loads, encodes = [], []
    original = diffusers.DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(original(cls, *a, **k)) or loads[-1]))
    _spy(monkeypatch, text_to_image_training, "encode_text_to_image", encodes)
    args = parse_args(["--pretrained_model_name_or_path", str(saved / "sdxl"), "--prompts_file",
                       str(saved / "prompts.txt"), "--offload_text_encoders", "--guidance_scale", "5"])
    training = text_to_image_training.load_training_pipeline(args, torch.device("meta"), need_images=False)
    assert len(loads) == 1 and len(encodes) == 1 and encodes[0][0][6] == torch.device("cpu")
    pipe = loads[0]
    assert all(getattr(pipe, n) is None for n in ("text_encoder", "text_encoder_2", "vae"))
    assert training.model is pipe.unet and training.model.device.type == "meta"
    assert {v.device.type for v in (*training.encoded.cond.values(), *training.encoded.uncond.values())} == {"meta"}
    assert training.pipeline_class is StableDiffusionXLPipeline and training.encoded.prompts == PROMPTS
