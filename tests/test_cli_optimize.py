"""`diffusers-fewstep optimize` end to end on the vendored fixture DPM, with a tiny budget on CPU."""
import json
import os
import time

import pytest

from diffusers_fewstep import DEFAULT_MODEL, LearnedScheduleScheduler, learning
from diffusers_fewstep.adapter import NoiseSchedule
from diffusers_fewstep.cli import main
from diffusers_fewstep.hub import load_json
from diffusers_fewstep.schedules import validate_sigmas

FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
TINY = ["--max-iters", "2", "--batch-size", "2", "--pool-size", "2", "--validation-size", "4", "--reference-steps", "6",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny UNet with the fixture's scheduler config, saved as a pipeline folder (fast on CPU)."""
    import shutil

    import torch
    from diffusers import UNet2DModel

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(root / "unet")
    shutil.copytree(os.path.join(DEFAULT_MODEL, "scheduler"), root / "scheduler")
    return str(root)


def _check_output(out, nfes, objective):
    scheduler = LearnedScheduleScheduler.from_pretrained(str(out), subfolder="scheduler")
    base = load_json(os.path.join(DEFAULT_MODEL, "scheduler", "scheduler_config.json"))
    scheduler.check_compatible(base)  # same noise schedule as the model it was learned for
    schedule = NoiseSchedule(base)
    assert scheduler.available_nfes == nfes
    for nfe in nfes:
        table = validate_sigmas(scheduler.config.sigma_tables[str(nfe)], schedule.sigma_min, schedule.sigma_max)
        assert len(table) == nfe + 1
    assert scheduler.config.provenance["objective"] == objective
    assert not scheduler.config.provenance["base_model"].startswith("/")  # as given, never this machine's path
    log = json.loads((out / "optimize_log.json").read_text())
    assert os.path.getsize(out / "schedule.png") > 1000
    return scheduler, log


def test_cli_optimize_selects_per_step_count_and_prints_the_comparison(tmp_path, capsys, tiny_model):
    start = time.process_time()  # CPU seconds of this process (wall time depends on other load)
    assert main(["optimize", "--model", tiny_model, "--nfe", "3", *TINY, "--output-dir", str(tmp_path)]) == 0
    scheduler, log = _check_output(tmp_path, [3], "trajectory")
    record = scheduler.config.provenance["per_nfe"]["3"]
    names = {c["name"] for c in record["candidates"]}
    assert {"ddim_trailing+euler", "unipc_bh2+unipc", "dpmpp2m_karras+dpmpp_2m", "ddim_trailing+ipndm"} <= names
    assert record["select_by"] == "fd_self" and all("fd_self" in c["scores"] for c in record["candidates"])
    kept = min(record["candidates"], key=lambda c: c["scores"]["fd_self"])
    assert record["kept"] == kept["name"] and record["solver"] == kept["solver"]
    scheduler.set_timesteps(3)
    assert scheduler.active_solver == kept["solver"]
    out = capsys.readouterr().out
    assert "held-out fd_self" in out and "DDIM" in out and f"wrote {tmp_path}/scheduler" in out
    assert log["shared"]["num_evals"] == 6 + 6  # the 6-step references of the pool (2) and the held-out set (4)
    assert time.process_time() - start < 30
    # the model card: how to load it, and the kept table's score beside the best trailing / Karras / learned ones
    card = (tmp_path / "README.md").read_text()
    assert 'LearnedScheduleScheduler.from_pretrained("' in card and "![σ tables](schedule.png)" in card
    row = next(line for line in card.splitlines() if line.startswith("| 3 |"))
    best = lambda keep: min(c["scores"]["fd_self"] for c in record["candidates"] if keep(c))  # noqa: E731
    trailing = best(lambda c: c["source"] == "stock" and "trailing" in c["name"])
    karras = best(lambda c: c["source"] == "stock" and "karras" in c["name"])
    assert row.startswith(f"| 3 | {kept['name']} ({kept['solver']}) | fd_self | {kept['scores']['fd_self']:.4g} | "
                          f"{trailing:.4g} (")
    assert f"| {karras:.4g} (" in row and kept["scores"]["fd_self"] <= min(trailing, karras)


def test_a_second_run_adds_its_tables_and_keeps_the_better_one(tmp_path, capsys, tiny_model):
    run = ["optimize", "--model", tiny_model, "--solver", "euler", *TINY, "--output-dir", str(tmp_path)]
    assert main(run[:1] + ["--nfe", "2"] + run[1:]) == 0
    assert main(run[:1] + ["--nfe", "3"] + run[1:]) == 0
    scheduler = LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert scheduler.available_nfes == [2, 3] and set(scheduler.config.provenance["per_nfe"]) == {"2", "3"}
    card = (tmp_path / "README.md").read_text()  # rewritten from the merged tables
    assert "| 2 | " in card and "| 3 | " in card and "one of: 2, 3" in card
    table = scheduler.config.sigma_tables["3"]
    capsys.readouterr()
    # a run that learns nothing new: the table already there competes, wins, and stays
    assert main(run[:1] + ["--nfe", "3", "--starts", "0"] + run[1:]) == 0
    assert "NFE 3: kept the better table already in" in capsys.readouterr().out
    assert LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler").config.sigma_tables["3"] == table
    # a run that learns on from it replaces it with a better one, and says so
    assert main(run[:1] + ["--nfe", "3"] + run[1:]) == 0
    assert "NFE 3: replaced the table already in" in capsys.readouterr().out
    # --overwrite: the old table does not compete
    assert main(run[:1] + ["--nfe", "3", "--overwrite", "--starts", "0"] + run[1:]) == 0
    assert "(--overwrite)" in capsys.readouterr().out
    assert LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler").available_nfes == [2, 3]


def test_an_interrupted_run_keeps_the_step_counts_it_finished(tmp_path, monkeypatch, tiny_model):
    learn = learning.learn_trajectory

    def interrupted(run, start):
        if len(start.table) - 1 == 3:
            raise KeyboardInterrupt
        return learn(run, start)

    monkeypatch.setattr(learning, "learn_trajectory", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["optimize", "--model", tiny_model, "--nfe", "2", "3", "--solver", "euler", *TINY,
              "--output-dir", str(tmp_path)])
    scheduler = LearnedScheduleScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert scheduler.available_nfes == [2]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary leftovers


def test_cli_optimize_fd_data_scores_every_candidate_and_leaves_the_objective_alone(tmp_path, capsys, tiny_model):
    import torch

    data = tmp_path / "data.pt"
    torch.save(torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, data)
    run = lambda out, *extra: main(["optimize", "--model", tiny_model, "--nfe", "3", *TINY,  # noqa: E731
                                    "--output-dir", str(tmp_path / out), *extra])
    # --select-by fd_data: every candidate has it, the kept one has the lowest
    assert run("fd_data", "--data", str(data), "--select-by", "fd_data") == 0
    log = json.loads((tmp_path / "fd_data" / "optimize_log.json").read_text())
    cands = log["candidates"]["3"]
    assert log["settings"]["select_by"] == "fd_data" and log["settings"]["fd_data_images"] == 4
    assert len(cands) > 10 and all(c["scores"]["fd_data"] >= 0 for c in cands)
    kept = next(c for c in cands if c["kept"])
    assert kept["scores"]["fd_data"] == min(c["scores"]["fd_data"] for c in cands)
    record = LearnedScheduleScheduler.from_pretrained(str(tmp_path / "fd_data"), subfolder="scheduler")
    record = record.config.provenance  # the scheduler folder's copy of the candidates
    assert record["per_nfe"]["3"]["kept"] == kept["name"] and record["select_by"] == "fd_data"
    assert [c["scores"] for c in record["per_nfe"]["3"]["candidates"]] == [c["scores"] for c in cands]
    assert "held-out fd_data" in capsys.readouterr().out
    # --data alone: scored, not selected by; the tables and every other score as without --data
    assert run("with_data", "--solver", "euler", "--data", str(data)) == 0
    assert run("without", "--solver", "euler") == 0
    with_data, without = (json.loads((tmp_path / out / "optimize_log.json").read_text())
                          for out in ("with_data", "without"))
    assert with_data["settings"]["select_by"] == without["settings"]["select_by"] == "fd_self"
    assert all("fd_data" in c["scores"] for c in with_data["candidates"]["3"])
    assert not any("fd_data" in c["scores"] for c in without["candidates"]["3"])
    for c in with_data["candidates"]["3"]:
        del c["scores"]["fd_data"]
    assert with_data["candidates"] == without["candidates"] and with_data["history"] == without["history"]


@pytest.mark.skipif(not os.path.exists(FMNIST_TEST), reason="needs the dataset-fashion-mnist Debian package")
def test_cli_optimize_fixed_point_with_data(tmp_path):
    # the gradient-free solver on the propagated bound, x0 from Fashion-MNIST (IDX file)
    rc = main(["optimize", "--nfe", "3", "--objective", "bound_propagated", "--method", "fixed_point", "--solver", "euler",
               "--validation-size", "0", "--max-iters", "1", "--batch-size", "1", "--data", FMNIST_TEST, "--device",
               "cpu", "--quiet", "--output-dir", str(tmp_path)])
    assert rc == 0
    _, log = _check_output(tmp_path, [3], "bound_propagated")
    assert log["settings"]["x0_source"] == "data" and log["shared"]["num_evals"] == 0
    # each iteration: 3 intervals × (1 + 1 stratum) + 2 finite-difference calls at 2 interior points
    assert log["num_evals"]["3"] == len(log["history"]["3"]["bound"]) * (3 * 2 + 2 * 2)


def test_cli_optimize_from_a_diffusers_peer_table_keeps_its_ends(tmp_path):
    # start from diffusers' own UniPC table (the fixture's leading spacing: σ_0 = σ(t=666), far below σ_max)
    rc = main(["optimize", "--nfe", "3", "--solver", "unipc", "--init", "peer:unipc_bh2", "--validation-size", "0",
               "--max-iters", "2", "--batch-size", "1", "--pool-size", "1", "--reference-steps", "6", "--device", "cpu",
               "--quiet", "--output-dir", str(tmp_path)])
    assert rc == 0
    scheduler, _ = _check_output(tmp_path, [3], "trajectory")
    table = scheduler.config.sigma_tables["3"]
    assert scheduler.config.solver == "unipc"
    assert table[0] == pytest.approx(17.379, rel=1e-3) and table[2] == pytest.approx(0.958, rel=1e-3)  # fixed ends
    assert table[-1] == 0.0


def test_cli_optimize_text_to_image_pipeline(tmp_path, capsys):
    """`--prompts-file` makes --model a text-to-image pipeline: prompts encoded by the pipeline, guidance inside the
    denoiser, latents of the pipeline's shape; the scheduler folder then drives the stock pipeline."""
    import torch
    from diffusers import StableDiffusionPipeline

    from tiny_models import tiny_sd

    StableDiffusionPipeline(**tiny_sd()).save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\n\nan ankle boot\n")
    assert main(["optimize", "--model", str(tmp_path / "sd"), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--guidance-scale", "3", "--nfe", "2", "--solver", "euler", *TINY, "--output-dir", str(tmp_path / "out")]) == 0
    log = json.loads((tmp_path / "out" / "optimize_log.json").read_text())
    assert log["settings"]["sample_shape"] == [4, 16, 16]
    # text-to-image defaults: fitted to the many-step latents, kept by the RMSE of the decoded images (fidelity)
    assert (log["settings"]["loss"], log["settings"]["select_by"], log["settings"]["rmse_of"]) == (
        "l2", "rmse", "decoded images")
    assert "held-out rmse of decoded images" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    pipe.scheduler = LearnedScheduleScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
    image = pipe("a photo of a sneaker", num_inference_steps=2, guidance_scale=3, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_flux_pipeline_samples_with_the_learned_table(tmp_path):
    """FluxPipeline passes its own σ's unless the scheduler says `use_flow_sigmas`: tables learned for a Flux
    pipeline are the ones it samples with (and a VP scheduler does not claim flow σ's)."""
    import torch
    from diffusers import FluxPipeline

    from tiny_models import tiny_flux

    FluxPipeline(**tiny_flux()).save_pretrained(tmp_path / "flux")
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\nan ankle boot\n")
    assert main(["optimize", "--model", str(tmp_path / "flux"), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--height", "32", "--width", "32", "--nfe", "3", "--solver", "euler", *TINY,
                 "--output-dir", str(tmp_path / "out"), "--quiet"]) == 0
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LearnedScheduleScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
    table = pipe.scheduler.config.sigma_tables["3"]

    def sample():
        return pipe("a photo of a sneaker", num_inference_steps=3, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    latents = sample()
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.table_source == "learned (3 steps)"
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(table, rel=1e-6) and torch.isfinite(latents).all()
    pipe.scheduler = LearnedScheduleScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=False)
    assert float((sample() - latents).abs().max()) > 1e-3  # the pipeline's own σ's: another image
    assert pipe.scheduler.table_source == "sigmas passed to set_timesteps"
    assert LearnedScheduleScheduler().config.use_flow_sigmas is False


def test_cli_optimize_pushes_the_folder_with_its_card(tmp_path, capsys, monkeypatch, tiny_model):
    """--push-to-hub: the output folder (tables, plot, log, model card) goes to the Hub repo, created first."""
    import huggingface_hub

    calls = {}

    class Url:
        repo_id = "me/fewstep"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.update(create=(repo_id, kw)) or Url())
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kw: calls.update(upload=kw, files=sorted(os.listdir(kw["folder_path"]))))
    out = tmp_path / "fewstep"
    assert main(["optimize", "--model", tiny_model, "--nfe", "2", "--solver", "euler", *TINY, "--output-dir", str(out),
                 "--push-to-hub", "--hub-model-id", "me/fewstep"]) == 0
    assert calls["create"] == ("me/fewstep", {"exist_ok": True, "private": False, "token": None})
    assert calls["upload"]["repo_id"] == "me/fewstep" and calls["upload"]["folder_path"] == str(out)
    assert calls["files"] == ["README.md", "optimize_log.json", "schedule.png", "scheduler"]
    assert "uploaded to https://huggingface.co/me/fewstep" in capsys.readouterr().out


def test_the_issue_command_as_written_on_the_sd_fixture(tmp_path, monkeypatch, capsys):
    """`diffusers-fewstep optimize --model <sd fixture> --prompts prompts.txt --nfe 4 6` as written (`--prompts` is
    `--prompts-file`; no --output-dir: outputs/<model>-fewstep): tables for 4 and 6 steps fitted to the fixture's
    own 50-step PNDM image, which then load into StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    from diffusers_fewstep import DEFAULT_MODEL

    fixture = os.path.join(os.path.dirname(DEFAULT_MODEL), "fmnist-t2i-sd")
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\na photo of a bag\n")
    monkeypatch.chdir(tmp_path)
    cheap = ["--device", "cpu", "--max-iters", "1", "--pool-size", "2", "--validation-size", "4", "--batch-size", "2",
             "--starts", "0", "--reference-steps", "10", "--quiet"]  # the CPU budget, cut further for the test suite
    assert main(["optimize", "--model", fixture, "--prompts", "prompts.txt", "--nfe", "4", "6", *cheap]) == 0
    out = tmp_path / "outputs" / "fmnist-t2i-sd-fewstep"
    settings = json.loads((out / "optimize_log.json").read_text())["settings"]
    assert (settings["reference_scheduler"], settings["reference_solver"]) == ("pipeline", "PNDMScheduler")
    pipe = StableDiffusionPipeline.from_pretrained(fixture)
    pipe.scheduler = LearnedScheduleScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert pipe.scheduler.available_nfes == [4, 6]
    assert "wrote outputs/fmnist-t2i-sd-fewstep/scheduler" in capsys.readouterr().out

