"""benchmarks/profile_phase2.py runs on the CPU with a tiny model and reports every variant it was asked for."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["fp32", "bf16", "bf16+channels_last", "bf16+compile", "bf16+fused_adamw", "bf16+channels_last+compile+fused_adamw",
       "bf16+channels_last+batch_steps", "fp32+batch_steps", "bf16+channels_last+batch_steps+compile",
       "bf16+channels_last+batch_steps+cudagraphs", "bf16+lora", "bf16+lora_attention", "bf16+lora_no_conv"]
COMPILED = lambda name: "compile" in name or "cudagraphs" in name  # noqa: E731
NO_COMPILE = [v for v in ALL if not COMPILED(v)]


def _tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)


def _tiny_unet_params():
    return sum(p.numel() for p in _tiny_unet().parameters())


# the whole set traces the model twice with dynamo (~15 s of ~30 s on the shared 2-core CPU)
@pytest.mark.parametrize("variants", [NO_COMPILE, pytest.param(ALL, marks=pytest.mark.slow)], ids=["no_compile", "all"])
def test_profile_phase2_tiny_on_cpu(tmp_path, variants):
    out = tmp_path / "profile.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "src"))
    chosen = [] if variants == ALL else ["--variants", *variants, "--torch_profile", "fp32"]  # default: every variant
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_phase2.py"), "--tiny", "--steps", "2",
                           "--out", str(out), *chosen], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    timings = record["variants"]
    assert list(timings) == variants
    for name, r in timings.items():
        assert r["repeats"] == 2 and 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"], name
        assert r["samples_per_s"] == 8 / r["median_ms"] * 1000
        assert f"\n{name} " in proc.stdout
        assert r["backend"] == ("eager" if COMPILED(name) else None)  # inductor on CUDA only
    assert not timings["bf16+fused_adamw"]["fused_adamw"]  # CUDA only
    # full fine-tuning trains every weight; the LoRA target sets shrink: all > Linear layers only > attention only
    assert timings["fp32"]["trainable_params"] == _tiny_unet_params()
    lora = [timings[f"bf16+lora{s}"]["trainable_params"] for s in ("", "_no_conv", "_attention")]
    assert lora[0] > lora[1] > lora[2] > 0
    # teacher trajectories: the pool of 64 is 4 solves of 16, spread over 1000 steps
    assert [p["teacher"] for p in record["pool"]] == ["bf16", "bf16+channels_last"]
    for pool in record["pool"]:
        assert pool["pool_per_round_s"] == 4 * pool["pool_batch_ms"] / 1000
        assert pool["pool_per_step_ms"] == pool["pool_per_round_s"] * 1000 / 1000
        assert pool["fresh_per_step_ms"] > 0 and pool["reference_steps"] == 10
    assert record["env"]["batch_size"] == 8 and record["env"]["nfe"] == 4
    if variants == NO_COMPILE:  # the traced variant's op table: 3 steps × (4 forward + 4 backward) calls of each conv
        traced = timings["fp32"]["torch_profile"]
        assert traced["device_ms_per_step"] == 0.0 and traced["host_ms_per_step"] > 0  # no device on the CPU
        trace = open(traced["path"]).read()
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in _tiny_unet().modules())
        row = next(line for line in trace.splitlines() if line.strip().startswith("aten::convolution_backward"))
        assert int(row.split()[-1]) == 3 * 4 * convs
        assert "torch_profile" not in timings["bf16"]
