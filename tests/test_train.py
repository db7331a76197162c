"""train.py under `accelerate launch` on a tiny UNet2DModel (CPU): output loads and samples, exact resume, LoRA."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_fewstep.py")
# small everything: 8×8 images, 10-step references, a few optimiser steps
FAST = ["--nfe", "2", "--phase1_iters", "2", "--phase1_batch_size", "8", "--phase1_pool_size", "8",
        "--pool_size", "16", "--pool_batch_size", "16", "--train_batch_size", "8", "--reference_steps", "10",
        "--eval_samples", "8", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A DDPMPipeline folder with a 45k-parameter UNet2DModel (8×8, one channel)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    path = str(tmp_path_factory.mktemp("tiny") / "pipe")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def _launch(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tables(out):
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)["sigma_tables"]


def test_accelerate_launch_output_loads_into_a_pipeline_and_samples(tiny_pipeline, tmp_path):
    import diffusers_fewstep  # noqa: F401  (the pipeline's scheduler entry names our module)
    from diffusers import DDPMPipeline, UNet2DModel

    from diffusers_fewstep import LearnedScheduleScheduler, SigmaDenoiser
    from diffusers_fewstep.evaluation import generate

    out = str(tmp_path / "out")
    _launch("--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out, "--rounds", "1",
            "--phase2_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--use_ema", *FAST)
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LearnedScheduleScheduler) and pipe.scheduler.available_nfes == [2]
    # 1. the tuned weights differ from the base model's
    base = UNet2DModel.from_pretrained(tiny_pipeline, subfolder="unet")
    delta = max((a - b).abs().max() for a, b in zip(pipe.unet.parameters(), base.parameters()))
    assert delta > 1e-5
    # 2. the pipeline samples exactly what the σ-space solver gives on the learned table
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ours = generate(SigmaDenoiser(pipe.unet, pipe.scheduler.config), noise, _tables(out)["2"], "euler")
    assert images.shape == (2, 8, 8, 1)
    assert abs(torch.from_numpy(images).permute(0, 3, 1, 2) - (ours / 2 + 0.5)).max() < 1e-4
    # 3. bookkeeping: checkpoint limit, metrics per phase, model card
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)["metrics"]
    assert [(m["round"], m["phase"]) for m in metrics] == [(0, "phase1"), (0, "phase2"), (1, "phase1")]
    assert all(0 < m["rmse_nfe2"] < 10 for m in metrics)
    card = open(os.path.join(out, "README.md")).read()
    assert "sigmas.png" in card and "| 1 | Phase 1 (tables) | 3 |" in card
    assert os.path.getsize(os.path.join(out, "sigmas.png")) > 1000


def test_kill_and_resume_gives_the_uninterrupted_result(tiny_pipeline, tmp_path):
    from diffusers_fewstep.train import main, parse_args

    common = ["--pretrained_model_name_or_path", tiny_pipeline, "--rounds", "1", "--phase2_steps", "4",
              "--checkpointing_steps", "2", "--use_ema", "--gradient_accumulation_steps", "2", "--eval_samples", "0", *FAST[:-4], "--learning_rate", "1e-3"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    main(parse_args(common + ["--output_dir", full]))
    main(parse_args(common + ["--output_dir", killed, "--stop_after_steps", "3"]))  # dies after step 3 of Phase 2
    assert not os.path.exists(os.path.join(killed, "scheduler"))
    # the last checkpoint is from step 2, so step 3 is redone on resume, then step 4 and the final Phase 1
    assert sorted(d for d in os.listdir(killed) if d.startswith("checkpoint-")) == ["checkpoint-0", "checkpoint-2"]
    main(parse_args(common + ["--output_dir", killed, "--resume_from_checkpoint", "latest"]))
    assert _tables(killed) == _tables(full)
    from safetensors.torch import load_file

    a = load_file(os.path.join(full, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(killed, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # …and the tables did move away from the DDIM-trailing start
    from diffusers_fewstep.adapter import NoiseSchedule
    from diffusers_fewstep.schedules import baseline_sigmas
    from diffusers_fewstep.hub import load_json

    schedule = NoiseSchedule(load_json(os.path.join(tiny_pipeline, "scheduler", "scheduler_config.json")))
    start = baseline_sigmas("ddim_trailing", 2, schedule).tolist()
    assert abs(_tables(full)["2"][1] - start[1]) > 1e-3 * start[1]


def test_lora_output_loads_with_peft(tiny_pipeline, tmp_path):
    """LoRA, with an image-folder dataset for the mixed-in denoising loss."""
    import numpy as np
    from diffusers import UNet2DModel
    from peft import PeftModel
    from PIL import Image

    from diffusers_fewstep.data import load_images
    from diffusers_fewstep.train import main, parse_args

    data = tmp_path / "images"
    data.mkdir()
    for k in range(4):
        Image.fromarray(np.full((12, 12), 60 * k, np.uint8)).save(data / f"{k}.png")
    images = load_images(str(data), (1, 8, 8))
    assert images.shape == (4, 1, 8, 8) and float(images.min()) == -1.0 and float(images[3].mean()) > -0.5
    out = str(tmp_path / "lora")
    main(parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out, "--rounds", "1",
                     "--phase2_steps", "3", "--use_lora", "--lora_rank", "4", "--checkpointing_steps", "100",
                     "--train_data_dir", str(data), "--denoising_weight", "0.5",
                     *FAST[:-4], "--phase1_iters", "0", "--eval_samples", "0", "--learning_rate", "1e-2"]))
    assert not os.path.exists(os.path.join(out, "unet"))
    base = UNet2DModel.from_pretrained(tiny_pipeline, subfolder="unet")
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([20.0, 700.0])
    before = base(x, t).sample
    tuned = PeftModel.from_pretrained(base, os.path.join(out, "unet_lora"))
    after = tuned(x, timestep=t).sample
    assert (after - before).abs().max() > 1e-5  # the adapter was trained (B ≠ 0)
    merged = tuned.merge_and_unload()
    assert torch.allclose(merged(x, t).sample, after, atol=1e-5)
    assert "PeftModel.from_pretrained" in open(os.path.join(out, "README.md")).read()


def test_class_conditional_model_with_labels_file(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffusers_fewstep.train import main, parse_args

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=3)
    base = str(tmp_path / "cond")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(base)
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n2\n1\n")
    out = str(tmp_path / "out")
    main(parse_args(["--pretrained_model_name_or_path", base, "--output_dir", out, "--rounds", "1",
                     "--phase2_steps", "2", "--conditioning_file", str(labels), "--checkpointing_steps", "100",
                     *FAST]))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)["metrics"]
    assert len(metrics) == 3 and all(0 < m["rmse_nfe2"] < 10 for m in metrics)
    bad = tmp_path / "prompts.txt"
    bad.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="one integer class label per line"):
        main(parse_args(["--pretrained_model_name_or_path", base, "--output_dir", str(tmp_path / "bad"),
                         "--conditioning_file", str(bad), *FAST]))


def test_push_to_hub_creates_the_repo_and_uploads_without_checkpoints(tmp_path, monkeypatch):
    import huggingface_hub

    from diffusers_fewstep.train import parse_args, push_to_hub

    calls = {}

    class Url:
        repo_id = "me/fmnist-fewstep"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.update(create=(repo_id, kw)) or Url())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(upload=kw))
    args = parse_args(["--output_dir", str(tmp_path / "fmnist-fewstep"), "--push_to_hub", "--hub_private_repo"])
    assert push_to_hub(args) == "me/fmnist-fewstep"
    assert calls["create"][0] == "fmnist-fewstep" and calls["create"][1]["private"] is True
    upload = calls["upload"]
    assert upload["repo_id"] == "me/fmnist-fewstep" and upload["folder_path"] == args.output_dir
    assert "checkpoint-*" in upload["ignore_patterns"]
