"""A tiny end-to-end benchmark run on CPU: tiny UNet, tiny feature network, tiny image set."""
import argparse
import json

import numpy as np
import pytest
import torch

from diffusers_fewstep import benchmark
from diffusers_fewstep.adapter import NoiseSchedule
from diffusers_fewstep.outputs import write_scheduler
from diffusers_fewstep.schedules import baseline_sigmas

from tiny_models import STAND_IN_CLASSIFIER, write_idx_images

DDPM_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False}
@pytest.fixture
def tiny_setup(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = tmp_path / "model"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(model / "unet")
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDPM_CONFIG))
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "arch.py").write_text(STAND_IN_CLASSIFIER)
    (tmp_path / "data").mkdir()
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28))
    write_idx_images(tmp_path / "data" / "t10k-images-idx3-ubyte.gz", images)
    # a folder as `optimize` writes it (here the trailing tables, UniPC at 3 steps and DDIM at 4)
    schedule = NoiseSchedule(DDPM_CONFIG)
    tables = {n: baseline_sigmas("ddim_trailing", n, schedule).tolist() for n in (3, 4)}
    write_scheduler(str(tmp_path / "ours"), DDPM_CONFIG, tables, {3: "unipc", 4: "euler"}, "euler",
                    {"per_nfe": {"3": {"seconds": 1.5}, "4": {"seconds": 2.5}}})
    (tmp_path / "ours" / "optimize_log.json").write_text(json.dumps({"shared": {"seconds": 0.5}}))
    return tmp_path


def parse(argv):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def test_tiny_end_to_end_benchmark(tiny_setup):
    root = tiny_setup
    args = parse(["--model", str(root / "model"), "--classifier", str(root / "classifier"), "--data", str(root / "data"),
                  "--n", "24", "--nfes", "3", "4", "--device", "cpu", "--batch-size", "16", "--peer-samples", "4",
                  "--rows", "ddim_trailing", "unipc_bh2", "gits_ipndm", "ays_dpmpp_2m", "sigma_ddim_trailing",
                  "--learned", str(root / "ours"), "--out-dir", str(root / "out"), "--docs-dir", str(root / "docs")])
    assert benchmark.run(args) == 0
    record = json.loads((root / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in record["rows"]}
    assert set(rows) == {"ddim_trailing", "unipc_bh2", "gits_ipndm", "ays_dpmpp_2m", "sigma_ddim_trailing",
                         "learned:ours"}
    for row in rows.values():
        for nfe in ("3", "4"):
            result = row["results"][nfe]
            assert result["fd_fmnist"] >= -1e-6 and 0 <= result["rmse"] < 2, (row["name"], result)
    # our σ-space DDIM on the trailing table reproduces diffusers' DDIM trailing (same noise, float32 on CPU)
    for nfe in ("3", "4"):
        assert rows["sigma_ddim_trailing"]["results"][nfe]["rmse"] == pytest.approx(
            rows["ddim_trailing"]["results"][nfe]["rmse"], abs=1e-4)
    # our folder runs through the stock loop with its scheduler: DDIM on the trailing table at 4 steps equals
    # diffusers' DDIM trailing; UniPC at 3 steps is another sampler
    assert rows["learned:ours"]["results"]["4"]["rmse"] == pytest.approx(rows["ddim_trailing"]["results"]["4"]["rmse"],
                                                                          abs=1e-4)
    assert rows["learned:ours"]["solvers"] == {"3": "unipc", "4": "euler"}
    # learning times: per NFE plus the run's shared reference solves for ours, measured in-run for GITS/AYS
    assert rows["learned:ours"]["results"]["4"]["learn_seconds"] == 3.0
    assert rows["gits_ipndm"]["results"]["3"]["learn_seconds"] > 0
    assert [s["nfe"] for s in record["summary"]] == [3, 4]
    assert record["reference"]["fd_fmnist"] >= -1e-6
    page = (root / "docs" / "results.md").read_text()
    assert "| ours: ours |" in page and "GITS + iPNDM" in page and "figures/fd_vs_nfe.png" in page
    for name in ("fd_vs_nfe.png", "sigma_tables.png", "samples_4_steps.png"):
        assert (root / "docs" / "figures" / name).stat().st_size > 1000


def test_summary_ratios():
    rows = [benchmark.Row("unipc_bh2", "UniPC", "diffusers", results={4: {"fd_fmnist": 2.0, "rmse": 0.1}}),
            benchmark.Row("gits_ipndm", "GITS", "optimiser", results={4: {"fd_fmnist": 4.0, "rmse": 0.1}}),
            benchmark.Row("learned:ours", "ours", "ours", "unipc", results={4: {"fd_fmnist": 1.0, "rmse": 0.1,
                                                                                  "learn_seconds": 30.0}}),
            benchmark.Row("sigma_ddim_trailing", "check", "check", "euler", results={4: {"fd_fmnist": 0.1, "rmse": 0.1}})]
    (best,) = benchmark.summary(rows, [4], reference_fd=0.5)
    assert best["ours"] == "learned:ours" and best["peer"] == "unipc_bh2"  # check rows are neither ours nor peers
    assert best["ratio"] == pytest.approx(0.5) and best["ours_over_reference"] == pytest.approx(2.0)
    assert best["learn_seconds"] == 30.0
