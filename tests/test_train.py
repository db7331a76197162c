"""train.py under `accelerate launch` on a tiny UNet2DModel (CPU): output loads and samples, exact resume, LoRA."""
import json
import os
import signal
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_fewstep.py")
# small everything: 8×8 images, 10-step references, a few optimiser steps
FAST = ["--nfe", "2", "--phase1_iters", "2", "--phase1_batch_size", "8", "--phase1_pool_size", "8", "--phase1_validation_size", "8",
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


def _launch(*args, processes: int = 1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes), "--num_machines", "1",
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
    assert "![learning curves](curves.png)" in card and os.path.getsize(os.path.join(out, "curves.png")) > 1000


def test_two_processes_train_one_model(tiny_pipeline, tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo): both processes step one model on their shares of the pool,
    the evaluations run on the main process, and every Phase-2 row carries the throughput and its losses."""
    out = str(tmp_path / "out")
    _launch("--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out, "--rounds", "1", "--phase2_steps", "4",
            "--eval_steps", "2", "--checkpointing_steps", "100", "--use_ema", "--no-compare_reference",
            *FAST[:FAST.index("--phase1_iters")], "--phase1_iters", "0", *FAST[FAST.index("--pool_size"):], processes=2)
    with open(os.path.join(out, "metrics.json")) as f:
        record = json.load(f)
    rows = record["metrics"]
    # tables held fixed (--phase1_iters 0): no second Phase-1 row repeating the last Phase-2 evaluation
    assert [(m["phase"], m["global_step"]) for m in rows] == [("phase1", 0), ("phase2", 2), ("phase2", 4)]
    assert record["args"]["train_batch_size"] == 8 and all(m["samples_per_s"] > 0 for m in rows[1:])
    assert rows[2]["rmse_nfe2"] != rows[0]["rmse_nfe2"]  # the model moved
    # each Phase-2 row summarises the losses of its own two steps
    assert "loss_mean" not in rows[0] and all(0 < m["loss_mean"] <= m["loss_max"] for m in rows[1:])
    assert rows[1]["loss_mean"] != rows[2]["loss_mean"]


def _resume_args(tiny_pipeline):
    return ["--pretrained_model_name_or_path", tiny_pipeline, "--rounds", "1", "--phase2_steps", "4",
            "--checkpointing_steps", "2", "--use_ema", "--gradient_accumulation_steps", "2", "--eval_samples", "0",
            *FAST[:-4], "--learning_rate", "1e-3", "--phase1_init", "ddim_leading"]  # a poor start: Phase 1 replaces it


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline, tmp_path_factory):
    """The output folder of the run the interrupted ones must reproduce."""
    from diffusers_fewstep.train import main, parse_args

    full = str(tmp_path_factory.mktemp("full") / "out")
    main(parse_args(_resume_args(tiny_pipeline) + ["--output_dir", full]))
    return full


def _weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def _interrupt_at(monkeypatch, name, call, action):
    """Make the `call`-th call of `train.<name>` run `action()` first (send a signal, raise)."""
    from diffusers_fewstep import train

    original, calls = getattr(train, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(train, name, wrapped)


def _boom():
    raise RuntimeError("boom")


# how the run dies -> (function hit, its call number, action, expected error and message, checkpoints left)
KILLS = {
    # SIGKILL-like: no save; the last checkpoint is from step 2, so step 3 is redone on resume
    "stop_after_steps": (None, 0, None, None, ["checkpoint-0", "checkpoint-2"]),
    # a signal during step 3 (phase2_loss calls 5–6: 2 micro-batches per step): the step ends, then it is saved
    "SIGTERM": ("phase2_loss", 5, lambda: os.kill(os.getpid(), signal.SIGTERM),
                (143, "stopped by SIGTERM after step 3: saved checkpoint-3; continue with --resume_from_checkpoint latest"),
                ["checkpoint-0", "checkpoint-2", "checkpoint-3"]),
    "SIGINT": ("phase2_loss", 6, lambda: os.kill(os.getpid(), signal.SIGINT),
               (130, "stopped by SIGINT after step 3: saved checkpoint-3"), ["checkpoint-0", "checkpoint-2", "checkpoint-3"]),
    # an error in the first of the 2 micro-batches of step 2: step 1 (the last finished one) is saved, with
    # accelerate's micro-batch counter put back so that the resumed accumulation syncs where it should
    "exception": ("phase2_loss", 3, _boom, (RuntimeError, "boom"), ["checkpoint-0", "checkpoint-1"]),
    # a signal in the last Phase 1, whose starting point checkpoint-4 holds: it stops at once
    "SIGTERM in Phase 1": ("run_phase1", 2, lambda: os.kill(os.getpid(), signal.SIGTERM),
                           (143, "stopped by SIGTERM: nothing since checkpoint-4 was lost"),
                           ["checkpoint-0", "checkpoint-2", "checkpoint-4"]),
}


@pytest.mark.parametrize("how", list(KILLS))
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_pipeline, uninterrupted, tmp_path, monkeypatch, capsys, how):
    from diffusers_fewstep.checkpoints import TrainingStopped
    from diffusers_fewstep.train import main, parse_args

    name, call, action, expected, left = KILLS[how]
    killed = str(tmp_path / "killed")
    args = _resume_args(tiny_pipeline) + ["--output_dir", killed]
    if name is None:
        main(parse_args(args + ["--stop_after_steps", "3"]))
    else:
        _interrupt_at(monkeypatch, name, call, action)
        error = TrainingStopped if isinstance(expected[0], int) else expected[0]
        with pytest.raises(error, match=expected[1]) as stopped:
            main(parse_args(args))
        if error is TrainingStopped:
            assert stopped.value.exit_code == expected[0]
            assert expected[1] in capsys.readouterr().out  # said in one line
        monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    assert not os.path.exists(os.path.join(killed, "scheduler"))
    assert sorted(d for d in os.listdir(killed) if d.startswith("checkpoint-")) == left
    main(parse_args(args + ["--resume_from_checkpoint", "latest"]))
    assert _tables(killed) == _tables(uninterrupted)
    a, b = _weights(uninterrupted), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_resumed_with_more_steps_trains_on_as_one_longer_run(tiny_pipeline, tmp_path, capsys):
    """A finished 2-step run, resumed with --phase2_steps 4, ends where an uninterrupted 4-step run ends (the held
    table: Phase 1 is a no-op, so the comparison is exact); a decaying learning-rate schedule is refused."""
    from diffusers_fewstep.train import main, parse_args

    args = _resume_args(tiny_pipeline)[:-2] + ["--phase1_iters", "0"]  # the DDIM-trailing table, held
    long, short = str(tmp_path / "long"), str(tmp_path / "short")
    main(parse_args(args + ["--output_dir", long]))
    main(parse_args([*args, "--output_dir", short, "--phase2_steps", "2"]))
    before = _weights(short)
    a = _weights(long)
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-4  # the two extra steps change the weights
    with pytest.raises(ValueError, match="continues a finished run only with a constant --lr_scheduler"):
        main(parse_args(args + ["--output_dir", short, "--lr_scheduler", "cosine", "--resume_from_checkpoint", "latest"]))
    capsys.readouterr()
    main(parse_args(args + ["--output_dir", short, "--resume_from_checkpoint", "latest"]))
    assert "its last Phase 2 goes on from step 2 to --phase2_steps 4" in capsys.readouterr().out
    b = _weights(short)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _tables(short) == _tables(long)


def test_the_uninterrupted_run_trained_and_learned(tiny_pipeline, uninterrupted):
    """The resume comparisons are not vacuous: Phase 1 replaced the DDIM-leading start (it starts at σ(500), far
    below σ_max) and the weights changed."""
    from diffusers import UNet2DModel

    from diffusers_fewstep.adapter import NoiseSchedule
    from diffusers_fewstep.hub import load_json
    from diffusers_fewstep.schedules import baseline_sigmas

    schedule = NoiseSchedule(load_json(os.path.join(tiny_pipeline, "scheduler", "scheduler_config.json")))
    start = baseline_sigmas("ddim_leading", 2, schedule).tolist()
    assert abs(_tables(uninterrupted)["2"][0] - start[0]) > 0.5 * start[0]
    base = UNet2DModel.from_pretrained(tiny_pipeline, subfolder="unet").state_dict()
    tuned = _weights(uninterrupted)
    assert max(float((tuned[k] - base[k]).abs().max()) for k in tuned) > 1e-5


def test_sigterm_from_outside_stops_the_script_with_a_resumable_checkpoint(tiny_pipeline, tmp_path):
    """The script itself, signalled by another process once Phase 2 has begun (wherever it then is: building
    the teacher pool, or mid-step), exits with 128 + 15 and one line naming a checkpoint to resume from."""
    import time

    out = str(tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "src"))
    cmd = [sys.executable, SCRIPT, "--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out,
           "--rounds", "1", "--phase2_steps", "100000", "--checkpointing_steps", "100000", *FAST[:-4], "--eval_samples", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(out, "checkpoint-0")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM") and line.endswith("continue with --resume_from_checkpoint latest")
    from diffusers_fewstep.checkpoints import checkpoints

    latest = checkpoints(out)[-1]
    assert latest in line and os.path.isfile(os.path.join(out, latest, "model.safetensors"))


def test_divergence_monitor_thresholds():
    from diffusers_fewstep.checkpoints import DivergenceMonitor

    def first_stop(losses, keys=None, **kw):
        monitor = DivergenceMonitor(**kw)
        for step, loss in enumerate(losses, 1):
            reason = monitor.update((keys or [4] * len(losses))[step - 1], loss, step)
            if reason:
                return step, reason, monitor.good_weights_step(step)
        return None

    # level 1 → 0.9 → 0.8 (EMA 0.9: 0.99, 0.971); five losses above 10× it in a row stop at the fifth
    step, reason, good = first_stop([1.0, 0.9, 0.8, 20, 20, 20, 20, 20])
    assert step == 8 and "above 10× its running level 0.971 for 5 steps" in reason
    assert good == 2  # step 3 was the last unflagged loss, computed on the weights after step 2
    assert first_stop([1.0, 9.9, 9.9, 9.9, 9.9, 9.9, 9.9]) is None  # below 10×: the level follows the loss
    assert first_stop([1.0, 20, 20, 20, 20, 1.0, 20, 20, 20, 20]) is None  # the streak restarts
    assert first_stop([1.0, 20, 20, 20], patience=3)[0] == 4
    assert first_stop([1.0, 0.5, float("nan")])[:2] == (3, "loss is nan")
    assert first_stop([1.0, float("inf")], factor=0)[0] == 2
    assert first_stop([1.0] + [1e9] * 10, factor=0) is None  # factor 0: only non-finite losses stop
    # one level per step count: 50 is normal for the 8-step loss (level 100), a spike for the 2-step one (level 1)
    assert first_stop([1.0, 100.0] + [50.0] * 10, keys=[2, 8] + [8] * 10) is None
    assert first_stop([1.0, 100.0] + [50.0] * 10, keys=[2, 8] + [2] * 10)[0] == 7


def test_huge_learning_rate_stops_and_keeps_the_last_good_checkpoint(tiny_pipeline, tmp_path, capsys):
    """Learning rate 1 blows the tiny model's loss up from 115 to ~10⁴–10⁶ at step 2: after 3 such steps
    (--divergence_patience 3) the run stops; checkpoints made after the last good weights are set aside, and
    resuming with a sane learning rate gives exactly what a fresh run at that rate gives."""
    from diffusers_fewstep.checkpoints import TrainingStopped, checkpoints
    from diffusers_fewstep.train import main, parse_args

    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    args = ["--pretrained_model_name_or_path", tiny_pipeline, "--rounds", "1", "--phase2_steps", "6",
            "--checkpointing_steps", "1", "--divergence_patience", "3", *FAST[:-4], "--eval_samples", "0"]
    with pytest.raises(TrainingStopped) as stopped:
        main(parse_args(args + ["--output_dir", out, "--learning_rate", "1"]))
    message = str(stopped.value)
    assert message.startswith("Phase 2 diverged at step 4 (2 steps, round 0): loss ")
    assert "above 10× its running level" in message and "for 3 steps; kept checkpoint-0" in message
    assert "lower --learning_rate (now 1) and continue with --resume_from_checkpoint latest" in message
    assert stopped.value.exit_code == 1 and message in capsys.readouterr().out
    level = float(message.split("running level ")[1].split(" ")[0])
    assert float(message.split(": loss ")[1].split(" ")[0]) > 10 * level
    assert checkpoints(out) == ["checkpoint-0"]
    assert sorted(d for d in os.listdir(out) if d.startswith("diverged-")) == [
        "diverged-checkpoint-1", "diverged-checkpoint-2", "diverged-checkpoint-3"]
    again = str(tmp_path / "again")  # resumed without --learning_rate: the checkpoint's rate goes on, not the default
    shutil.copytree(out, again)
    with pytest.raises(TrainingStopped, match=r"lower --learning_rate \(now 1\) and continue"):
        main(parse_args(args + ["--output_dir", again, "--resume_from_checkpoint", "latest"]))
    assert "replaces the checkpoint's" not in capsys.readouterr().out
    assert checkpoints(again) == ["checkpoint-0"]  # diverged again: the set-aside checkpoints replaced, not an OSError
    main(parse_args(args + ["--output_dir", out, "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest"]))
    assert "--learning_rate 0.001 replaces the checkpoint's 1" in capsys.readouterr().out
    main(parse_args(args + ["--output_dir", fresh, "--learning_rate", "1e-3"]))
    a, b = _weights(out), _weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_fail_before_anything_loads(tmp_path, capsys):
    from diffusers_fewstep.train import main, parse_args

    for bad, says in [(["--learning_rate", "0"], "--learning_rate must be > 0; got 0.0"),
                      (["--nfe", "4", "0"], "--nfe and --compare_nfe take step counts ≥ 1"),
                      (["--divergence_factor", "0.5"], "--divergence_factor must be > 1"),
                      (["--nfe", "2", "3", "--denoising_weight", "1", "1"], "takes 1 value or one per step"),
                      (["--phase2_target", "endpoint", "--phase2_batch_steps"],
                       "--phase2_batch_steps batches the steps of --phase2_target trajectory; got --phase2_target endpoint"),
                      (["--reference_scheduler", "pipeline", "--phase2_target", "trajectory"], "gives the teacher's endpoints only, and --phase2_target "
                       "trajectory needs its states at every σ; use --phase2_target endpoint")]:
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert says in capsys.readouterr().err
    args = parse_args(["--output_dir", str(tmp_path / "x"), "--pretrained_model_name_or_path", "/nonexistent"])
    args.learning_rate = -1.0  # as the `diffusers-fewstep train` subcommand passes it, unchecked by parse_args
    with pytest.raises(ValueError, match="--learning_rate must be > 0; got -1.0"):
        main(args)  # refused before the (missing) model is loaded


def test_train_state_keeps_the_phase2_timing_and_reports_throughput():
    from diffusers_fewstep.train import TrainState

    state = TrainState()
    assert state.throughput(64) == {}
    state.timing = {"pool_s": 3.04, "step_s": 2.0, "steps": 10}
    assert state.throughput(64) == {"pool_s": 3.0, "samples_per_s": 320.0, "samples_per_s_recent": 320.0}
    state.timing = {"pool_s": 3.04, "step_s": 2.5, "steps": 20}  # 10 more steps in 0.5 s: the recent speed is 4× the first
    assert state.throughput(64) == {"pool_s": 3.0, "samples_per_s": 512.0, "samples_per_s_recent": 1280.0}
    assert "samples_per_s_recent" not in state.throughput(64)  # no step since the last row
    saved = state.state_dict()
    again = TrainState()
    again.load_state_dict(saved)
    assert again.timing == state.timing
    del saved["timing"]  # a checkpoint written before the timing existed
    again.load_state_dict(saved)
    assert again.timing == {"pool_s": 0.0, "step_s": 0.0, "steps": 0}


def test_several_step_counts_trained_evaluated_and_compared(tiny_pipeline, tmp_path, monkeypatch):
    """--nfe 2 3: Phase 2 trains both counts in turn, every evaluation measures both, and at the end the tuned
    model is measured next to the base model at both, at counts it was not tuned for and at the reference solve."""
    from diffusers_fewstep import train

    trained = []
    original = train.phase2_loss
    monkeypatch.setattr(train, "phase2_loss", lambda student, states, sigmas, *a, **k: (
        trained.append(len(sigmas) - 1), original(student, states, sigmas, *a, **k))[1])
    out = str(tmp_path / "out")
    train.main(train.parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out, "--rounds", "1",
                                 "--phase2_steps", "5", "--eval_steps", "2", "--checkpointing_steps", "100", *FAST,
                                 "--nfe", "2", "3", "--compare_nfe", "3", "4", "--no-keep_best"]))
    assert trained == [2, 3, 2, 3, 2]
    with open(os.path.join(out, "metrics.json")) as f:
        record = json.load(f)
    assert [(m["phase"], m["global_step"]) for m in record["metrics"]] == [
        ("phase1", 0), ("phase2", 2), ("phase2", 4), ("phase2", 5), ("phase1", 5)]
    assert all(0 < m[f"rmse_nfe{n}"] < 10 for m in record["metrics"] for n in (2, 3))
    # every Phase-2 evaluation, the end of the phase included, also scores the trajectories trained on
    assert [m["global_step"] for m in record["metrics"] if "rmse_pool_nfe2" in m] == [2, 4, 5]
    assert all(0 < m[f"rmse_pool_nfe{n}"] < 10 for m in record["metrics"][1:4] for n in (2, 3))
    # throughput: none before the first Phase-2 step; one pool build per round, so its time stays put
    assert "samples_per_s" not in record["metrics"][0]
    assert all(m["samples_per_s"] > 0 for m in record["metrics"][1:])
    assert len({m["pool_s"] for m in record["metrics"][1:]}) == 1 and record["metrics"][1]["pool_s"] > 0
    rows = record["step_counts"]
    assert [(r["nfe"], r["table"], r["solver"], r["tuned_count"]) for r in rows] == [
        (2, "learned", "euler", True), (3, "learned", "euler", True), (3, "ddim_trailing", "euler", True),
        (4, "ddim_trailing", "euler", False), (10, "reference", "dpmpp_2m", False)]
    # the base model's reference solve is the evaluation reference itself; the tuned model has moved away from it
    assert rows[-1]["base_rmse"] == 0.0 and rows[-1]["tuned_rmse"] > 1e-4
    assert all(r["tuned_rmse"] != r["base_rmse"] for r in rows)
    # the last evaluation and the comparison measure the same model on the same tables
    assert rows[0]["tuned_rmse"] == record["metrics"][-1]["rmse_nfe2"]
    card = open(os.path.join(out, "README.md")).read()
    assert "Tuned for **2, 3** steps" in card
    assert "| 4 | ddim_trailing | euler | no | {:.4g} | {:.4g} |".format(rows[3]["tuned_rmse"], rows[3]["base_rmse"]) in card
    assert "| 10 | reference | dpmpp_2m | no | {:.4g} | 0 |".format(rows[4]["tuned_rmse"]) in card
    assert "**Other step counts may be worse.**" in card
    assert "10 steps (reference solve, `dpmpp_2m`): RMSE {:.4g} against the base model's 0".format(
        rows[4]["tuned_rmse"]) in card


def test_fixed_tables_skip_phase_one_and_the_reference_row_can_be_left_out(tiny_pipeline, tmp_path, monkeypatch):
    """--phase1_iters 0 holds --phase1_init's table without any reference solve (optimize_schedule is never called);
    --no-compare_reference leaves the reference solve out of the final comparison; --phase2_loss and --phase2_batch_steps
    reach the loss."""
    from diffusers_fewstep import optimizer, train
    from diffusers_fewstep.adapter import NoiseSchedule
    from diffusers_fewstep.schedules import baseline_sigmas

    monkeypatch.setattr(optimizer, "optimize_schedule", lambda *a, **k: pytest.fail("Phase 1 ran"))
    losses = []
    original = train.phase2_loss
    monkeypatch.setattr(train, "phase2_loss", lambda *a, **k: (losses.append((k["loss"], k["batch_steps"])),
                                                                  original(*a, **k))[1])
    out = str(tmp_path / "out")
    train.main(train.parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out, "--rounds", "1",
                                 "--phase2_steps", "2", "--checkpointing_steps", "100", *FAST, "--phase1_iters", "0",
                                 "--phase1_init", "ddim_trailing", "--phase2_loss", "pseudo_huber",
                                 "--phase2_target", "trajectory", "--no-phase2_batch_steps", "--compare_nfe", "4",
                                 "--no-compare_reference"]))
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    expected = baseline_sigmas("ddim_trailing", 2, NoiseSchedule(config)).tolist()
    assert _tables(out)["2"] == pytest.approx(expected, rel=1e-6)
    assert losses == [("pseudo_huber", False)] * 2  # the default batches the steps: off as asked
    with open(os.path.join(out, "metrics.json")) as f:
        rows = json.load(f)["step_counts"]
    assert [(r["nfe"], r["table"]) for r in rows] == [(2, "learned"), (4, "ddim_trailing")]
    card = open(os.path.join(out, "README.md")).read()  # the card does not call held tables learned
    assert "σ tables held fixed (`ddim_trailing`, not learned" in card and "learned for this model" not in card
    assert "| 0 | tables (held fixed) | 0 |" in card
    assert "(Phase-2 target: trajectory at 2 steps)" in card


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_weights_with_the_endpoint_target(tiny_pipeline, tmp_path, lora):
    """--gradient_checkpointing turns on diffusers' checkpointing of the trained UNet (also under a LoRA adapter) and
    changes no number: two endpoint-target steps end on the same weights as without it."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from diffusers_fewstep import train

    calls = []
    original = UNet2DModel.enable_gradient_checkpointing
    weights = {}
    for flag in ([], ["--gradient_checkpointing"]):
        out = str(tmp_path / f"out{len(flag)}")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(UNet2DModel, "enable_gradient_checkpointing", lambda self: (calls.append(len(flag)), original(self))[1])
            train.main(train.parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out,
                                         "--rounds", "1", "--phase2_steps", "2", "--checkpointing_steps", "100", *FAST,
                                         "--phase1_iters", "0", "--phase1_init", "ddim_trailing", "--eval_samples", "0",
                                         "--phase2_target", "endpoint", *(["--use_lora"] if lora else []), *flag]))
        path = os.path.join(out, "unet_lora" if lora else "unet")
        weights[len(flag)] = {k: v for f in os.listdir(path) if f.endswith(".safetensors")
                              for k, v in load_file(os.path.join(path, f)).items()}
    assert calls == [1]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    assert max((weights[0][k].float() - weights[1][k].float()).abs().max() for k in weights[0]) < 1e-6


def test_phase2_starts_from_the_tables_of_a_learned_folder(tiny_pipeline, tmp_path):
    """--phase1_init FOLDER (an optimize output) with --phase1_iters 0: Phase 2 tunes the model on exactly those
    tables; a count the folder lacks, or a folder learned for another model, stops the run before any work."""
    from diffusers_fewstep import LearnedScheduleScheduler, train
    from diffusers_fewstep.schedules import stock_sigmas

    with open(os.path.join(tiny_pipeline, "scheduler", "scheduler_config.json")) as f:
        base = json.load(f)
    learned = tmp_path / "learned"
    table = [float(base_sigma) for base_sigma in stock_sigmas("ddim_trailing", 2, base)]
    table[1] *= 0.7  # not a stock table
    LearnedScheduleScheduler.from_config(base, sigma_tables={"2": table}).save_pretrained(learned / "scheduler")
    out = str(tmp_path / "out")
    common = ["--pretrained_model_name_or_path", tiny_pipeline, "--rounds", "1", "--phase2_steps", "1",
              "--checkpointing_steps", "100", *FAST, "--phase1_iters", "0", "--no-compare_reference"]
    train.main(train.parse_args([*common, "--output_dir", out, "--phase1_init", str(learned)]))
    assert _tables(out)["2"] == pytest.approx(table, rel=1e-6)
    with pytest.raises(ValueError, match=r"has learned tables for \[2\] steps, not for \[3\]"):
        train.main(train.parse_args([*common, "--output_dir", str(tmp_path / "o2"), "--phase1_init", str(learned),
                                     "--nfe", "2", "3"]))
    other = tmp_path / "other"
    LearnedScheduleScheduler.from_config({**base, "beta_end": 0.03}, sigma_tables={"2": table}).save_pretrained(
        other / "scheduler")
    with pytest.raises(ValueError, match="learned for a different model"):
        train.main(train.parse_args([*common, "--output_dir", str(tmp_path / "o3"), "--phase1_init", str(other)]))


def test_model_card_warns_with_the_numbers_where_the_tuned_model_is_worse():
    from diffusers_fewstep.model_card import card_text

    rows = [{"nfe": 4, "table": "learned", "solver": "euler", "tuned_count": True, "tuned_fd": 2.62, "base_fd": 5.98,
             "tuned_rmse": 0.198, "base_rmse": 0.246},
            {"nfe": 8, "table": "ddim_trailing", "solver": "euler", "tuned_count": False, "tuned_fd": 0.85,
             "base_fd": 0.90, "tuned_rmse": 0.15, "base_rmse": 0.152},
            {"nfe": 200, "table": "reference", "solver": "dpmpp_2m", "tuned_count": False, "tuned_fd": 2.16,
             "base_fd": 0.234, "tuned_rmse": 0.1, "base_rmse": 0.0}]
    card = card_text("fmnist", {"4": [157.0, 3.0, 1.0, 0.3, 0.0]}, [], "euler", False, True, "me/x", rows)
    assert "| steps | table | solver | tuned for it | FD tuned | FD base | RMSE tuned | RMSE base |" in card
    assert "| 4 | learned | euler | yes | 2.62 | 5.98 | 0.198 | 0.246 |" in card
    assert ("Measured worse than the base model at 200 steps (reference solve, `dpmpp_2m`): FD 2.16 against the "
            "base model's 0.234. Use the base model at those counts.") in card
    assert "8 steps (ddim_trailing" not in card.split("may be worse")[1]  # better there: not in the warning
    rows[2]["tuned_fd"] = 0.2
    assert "it was not worse than the base model (FD)" in card_text("fmnist", {"4": [1.0, 0.0]}, [], "euler", False,
                                                                     True, "me/x", rows)
    # tuned for 4 steps and no better there than the base model: the card says so, with the numbers
    assert "Tuning did not help" not in card
    rows[0]["tuned_fd"] = 6.1
    alone = card_text("fmnist", {"4": [1.0, 0.0]}, [], "euler", False, True, "me/x", rows)
    assert ("No better than the base model with the same table at 4 steps: FD 6.1 against the base model's 5.98. "
            "Sample the base model with the learned table there, or train longer.") in alone
    rows[1]["tuned_count"], rows[1]["table"] = True, "learned"  # tuned for 4 and 8 steps at once: other advice
    together = card_text("fmnist", {"4": [1.0, 0.0], "8": [1.0, 0.0]}, [], "euler", False, True, "me/x", rows)
    assert "at 4 steps: FD 6.1 against the base model's 5.98. Sample the base model with the learned table there; " \
           "with several counts tuned at once, training longer may not help" in together \
           and "8 steps: FD" not in together.split("did not help")[1]


def test_speed_options_train_the_same_model_on_cpu(tiny_pipeline, tmp_path, monkeypatch):
    """--channels_last --compile --use_fused_adamw on the CPU (compile traces with the 'eager' backend, fused
    AdamW is left to CUDA): checkpoints save and the weights match the plain run's to float precision. The
    trajectory target batches its steps by default."""
    from diffusers_fewstep import train
    from diffusers_fewstep.checkpoints import checkpoints
    from diffusers_fewstep.train import main, parse_args

    batched, original = [], train.phase2_loss
    monkeypatch.setattr(train, "phase2_loss", lambda *a, **k: (batched.append(k["batch_steps"]), original(*a, **k))[1])

    args = ["--pretrained_model_name_or_path", tiny_pipeline, "--rounds", "1", "--phase2_steps", "3",
            "--checkpointing_steps", "1", *FAST[:-4], "--phase1_iters", "0", "--eval_samples", "0", "--learning_rate", "1e-3",
            "--phase2_target", "trajectory"]
    plain, fast = str(tmp_path / "plain"), str(tmp_path / "fast")
    main(parse_args(args + ["--output_dir", plain]))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, compile_model = [], train.compile_model
    monkeypatch.setattr(train, "compile_model", lambda module, *a: (compiled.append(module), compile_model(module, *a)))
    main(parse_args(args + ["--output_dir", fast, "--channels_last", "--compile", "--use_fused_adamw"]))
    assert counters["stats"]["unique_graphs"] > 0  # the model ran through dynamo
    assert len(compiled) == 2 and compiled[0] is not compiled[1]  # the trained model and the frozen teacher copy
    assert batched == [True] * 6
    # saving needs the contiguous-weights hook: safetensors refuses channels-last tensors
    assert checkpoints(fast) == ["checkpoint-0", "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    from diffusers import UNet2DModel

    base = UNet2DModel.from_pretrained(tiny_pipeline, subfolder="unet").state_dict()
    a, b = _weights(plain), _weights(fast)
    update = max(float((a[k] - base[k]).abs().max()) for k in a)
    differ = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Adam's normalised steps turn float-rounding differences of tiny gradients into visible ones
    assert update > 1e-3 and differ < 0.03 * update, (update, differ)


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
    default = json.load(open(os.path.join(out, "unet_lora", "adapter_config.json")))["target_modules"]
    assert {"conv1", "conv2", "time_emb_proj"} <= set(default)  # convolutions and time embeddings by default
    # --lora_layers (diffusers' LoRA scripts' option): only those layers
    out = str(tmp_path / "lora_attention")
    main(parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", out, "--rounds", "1",
                     "--phase2_steps", "1", "--use_lora", "--lora_layers", "to_q,to_v", "--checkpointing_steps", "100",
                     *FAST[:-4], "--phase1_iters", "0", "--eval_samples", "0"]))
    config = json.load(open(os.path.join(out, "unet_lora", "adapter_config.json")))
    assert sorted(config["target_modules"]) == ["to_q", "to_v"]
    learning_rate = lambda run: json.load(open(os.path.join(tmp_path, run, "metrics.json")))["args"]["learning_rate"]  # noqa: E731
    assert (learning_rate("lora"), learning_rate("lora_attention")) == (1e-2, 1e-4)  # given; LoRA's default
    with pytest.raises(ValueError, match=r"no Linear/Conv2d layer of UNet2DModel matches the LoRA targets \['to_qq'\]"):
        main(parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", str(tmp_path / "bad"),
                         "--use_lora", "--lora_layers", "to_qq", *FAST[:-4]]))


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
    assert "checkpoint-*" in upload["ignore_patterns"] and "best_weights.safetensors" in upload["ignore_patterns"]


def test_keep_best_saves_the_best_evaluation_not_the_last(tiny_pipeline, tmp_path, monkeypatch):
    """--keep_best (the default): evaluations ranked 5, 1, 3, 4 at steps 0, 2, 4, 5 — the output holds the weights
    of step 2, exactly those a run stopped at step 2 saves, the final comparison measures them, and the card says so."""
    from diffusers_fewstep import train, training_eval

    ranked = {0: 5.0, 2: 1.0, 4: 3.0, 5: 4.0}
    monkeypatch.setattr(training_eval, "row_quality", lambda row, nfes: ("rmse", ranked[row["global_step"]]))
    common = ["--pretrained_model_name_or_path", tiny_pipeline, "--rounds", "1", "--eval_steps", "2",
              "--checkpointing_steps", "100", *FAST, "--phase1_iters", "0", "--compare_nfe", "--no-compare_reference"]
    best, short = str(tmp_path / "best"), str(tmp_path / "short")
    train.main(train.parse_args([*common, "--phase2_steps", "5", "--output_dir", best]))
    train.main(train.parse_args([*common, "--phase2_steps", "2", "--output_dir", short, "--no-keep_best"]))
    a, b = _weights(best), _weights(short)
    assert all(torch.equal(a[k], b[k]) for k in a)
    record, other = (json.load(open(os.path.join(out, "metrics.json"))) for out in (best, short))
    assert record["best"]["global_step"] == 2 and [m["global_step"] for m in record["metrics"]] == [0, 2, 4, 5]
    assert record["step_counts"][0]["tuned_rmse"] == other["step_counts"][0]["tuned_rmse"]  # the kept model measured
    assert ("The weights and σ tables saved are those of the Phase-2 evaluation at step 2 (RMSE 1), the best of the "
            "evaluations above; the last, the Phase-2 evaluation at step 5, measured worse.") in open(
                os.path.join(best, "README.md")).read()
    assert "The weights and σ tables saved" not in open(os.path.join(short, "README.md")).read()
    # resumed into another folder, where the best weights are not: the last weights, and no claim about the best
    last, moved = str(tmp_path / "last"), str(tmp_path / "moved")
    train.main(train.parse_args([*common, "--phase2_steps", "5", "--output_dir", last, "--no-keep_best"]))
    final = max((d for d in os.listdir(best) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    train.main(train.parse_args([*common, "--phase2_steps", "5", "--output_dir", moved,
                                 "--resume_from_checkpoint", os.path.join(best, final)]))
    a, b = _weights(moved), _weights(last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(moved, "metrics.json")))["best"] == {}
    assert "The weights and σ tables saved" not in open(os.path.join(moved, "README.md")).read()
    from diffusers_fewstep.model_card import kept_text

    metrics = [{"global_step": 0, "phase": "phase1"}, {"global_step": 500, "phase": "phase2"}]
    untuned = kept_text({"global_step": 0, "phase": "phase1", "metric": "fd", "value": 2.9, "tables": {"2": [], "4": []}},
                        metrics)
    assert "the Phase-1 evaluation at step 0, the base model's: tuning did not improve on it (FD summed over" in untuned
    # the same step, but the last row is a later Phase 1 with other tables: the card names both evaluations
    tables_only = kept_text({"global_step": 500, "phase": "phase2", "metric": "fd", "value": 0.5, "tables": {"4": []}},
                            [*metrics, {"global_step": 500, "phase": "phase1"}])
    assert "the Phase-2 evaluation at step 500 (FD 0.5), the best of the evaluations above; the last, the Phase-1 " \
           "evaluation at step 500, measured worse" in tables_only


def test_pool_rmse_is_the_endpoint_rmse_of_the_pools_own_noises(tiny_pipeline):
    """`rmse_pool` (the generalisation gap's other half) is the evaluation's endpoint RMSE, measured from the native
    noises behind the pool's σ-space starts x(σ_0) against the pool's teacher endpoints."""
    from types import SimpleNamespace

    from diffusers_fewstep.adapter import SigmaDenoiser
    from diffusers_fewstep.evaluation import endpoint_rmse, generate
    from diffusers_fewstep.schedules import baseline_sigmas
    from diffusers_fewstep.train import build_pool
    from diffusers_fewstep.training_eval import pool_rmse

    teacher = SigmaDenoiser.from_pretrained(tiny_pipeline).eval()
    table = baseline_sigmas("ddim_trailing", 3, teacher.schedule).float()
    args = SimpleNamespace(sample_shape=(1, 8, 8), pool_batch_size=8, reference_steps=10, eval_samples=12,
                           solver="euler", clamp_samples=True, reference_scheduler="ode")
    pool = build_pool(teacher, table, 16, args, torch.Generator().manual_seed(0), "cpu")
    noise = pool["states"][0, :12] * teacher.schedule.native_scale(table[:1].double()).float()
    expected = endpoint_rmse(generate(teacher, noise, table), pool["states"][-1, :12].clamp(-1, 1))
    measured = pool_rmse(teacher, pool, table, args)
    assert expected > 1e-3 and abs(measured - expected) < 1e-4


def test_pool_cache_builds_a_pool_once_and_tells_pools_apart(tiny_pipeline, tmp_path, monkeypatch):
    """--pool_cache_dir: a second request with the same table, size and seeds loads the first pool (bitwise, no
    teacher call); another table, size or seed, or another --reference_steps, is solved afresh."""
    from types import SimpleNamespace

    from diffusers_fewstep import train
    from diffusers_fewstep.adapter import SigmaDenoiser
    from diffusers_fewstep.schedules import baseline_sigmas

    teacher = SigmaDenoiser.from_pretrained(tiny_pipeline).eval()
    calls = []
    original = train.teacher_states
    monkeypatch.setattr(train, "teacher_states", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = SimpleNamespace(pretrained_model_name_or_path=tiny_pipeline, sample_shape=(1, 8, 8), pool_batch_size=8,
                           reference_steps=10, pool_cache_dir=str(tmp_path / "pools"), reference_scheduler="ode")
    two, three = (baseline_sigmas("ddim_trailing", n, teacher.schedule).float() for n in (2, 3))
    first = train.cached_pool(teacher, two, 16, args, (0, 0, 2, 0), "cpu")
    assert len(calls) == 2 and len(os.listdir(args.pool_cache_dir)) == 1
    again = train.cached_pool(teacher, two, 16, args, (0, 0, 2, 0), "cpu")
    assert len(calls) == 2 and torch.equal(again["states"], first["states"])
    for table, size, keys in ((three, 16, (0, 0, 2, 0)), (two, 8, (0, 0, 2, 0)), (two, 16, (1, 0, 2, 0))):
        other = train.cached_pool(teacher, table, size, args, keys, "cpu")
        assert not (other["states"].shape == first["states"].shape and torch.equal(other["states"], first["states"]))
    args.reference_steps = 20
    train.cached_pool(teacher, two, 16, args, (0, 0, 2, 0), "cpu")
    assert len(calls) == 2 + 2 + 1 + 2 + 2 and len(os.listdir(args.pool_cache_dir)) == 5
    args.pool_cache_dir, args.reference_steps = None, 10  # off: always solved (the same pool again)
    assert torch.equal(train.cached_pool(teacher, two, 16, args, (0, 0, 2, 0), "cpu")["states"], first["states"])


def test_pipeline_reference_pool_holds_the_start_and_the_pipelines_own_image(tiny_pipeline, tmp_path):
    """--reference_scheduler pipeline: each pool trajectory is its σ-space start and the image the stock pipeline
    (here DDIMPipeline, 12 steps) makes from the same noise; a run on it trains with the endpoint target and
    defaults to the pipelines' 50 steps."""
    from types import SimpleNamespace

    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    from diffusers_fewstep import train
    from diffusers_fewstep.adapter import SigmaDenoiser
    from diffusers_fewstep.reference import start_state
    from diffusers_fewstep.schedules import baseline_sigmas

    base = DDPMPipeline.from_pretrained(tiny_pipeline)
    folder = str(tmp_path / "ddim")
    DDIMPipeline(unet=base.unet, scheduler=DDIMScheduler.from_config(base.scheduler.config)).save_pretrained(folder)
    teacher = SigmaDenoiser.from_pretrained(folder).eval()
    table = baseline_sigmas("ddim_trailing", 2, teacher.schedule).float()
    args = SimpleNamespace(sample_shape=(1, 8, 8), pool_batch_size=8, reference_steps=12, reference_scheduler="pipeline")
    pool = train.build_pool(teacher, table, 16, args, torch.Generator().manual_seed(0), "cpu")
    assert pool["states"].shape == (2, 16, 1, 8, 8)
    noise = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # the pool's first draw
    assert torch.allclose(pool["states"][0, :8], start_state(noise, teacher.schedule, table[0]), atol=1e-6)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=8, num_inference_steps=12, generator=torch.Generator().manual_seed(0), output_type="np").images
    ours = (pool["states"][1, :8].clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1)
    assert (ours - torch.from_numpy(images)).abs().max() < 1e-4

    out = str(tmp_path / "out")
    train.main(train.parse_args(["--pretrained_model_name_or_path", folder, "--output_dir", out, "--rounds", "1",
                                 "--phase2_steps", "2", "--checkpointing_steps", "100", *FAST, "--phase1_iters", "0",
                                 "--phase1_init", "ddim_trailing", "--phase2_target", "endpoint",
                                 "--reference_scheduler", "pipeline", "--reference_steps", "12"]))
    with open(os.path.join(out, "metrics.json")) as f:
        record = json.load(f)
    assert record["args"]["reference_scheduler"] == "pipeline" and [m["phase"] for m in record["metrics"]] == ["phase1", "phase2"]
    assert train.parse_args(["--reference_scheduler", "pipeline", "--phase2_target", "endpoint"]).reference_steps is None


def test_auto_settings_resolve_per_count_and_per_pipeline():
    """--phase2_target auto: the endpoint target at ≤ 2 steps, the trajectory target above, and as the default
    --reference_scheduler the pipeline's own image for a text-to-image pipeline with a deterministic scheduler (then every count
    trains on the endpoint), the ODE solve otherwise or when the target asks for states."""
    from types import SimpleNamespace

    from diffusers_fewstep.train import resolve_targets

    def resolved(scheduler=None, **flags):
        args = SimpleNamespace(**{"reference_scheduler": None, "phase2_target": "auto", "nfe": [2, 3, 4], **flags})
        resolve_targets(args, scheduler and SimpleNamespace(scheduler_config={"_class_name": scheduler}))
        return args.reference_scheduler, args.phase2_targets

    assert resolved() == ("ode", {2: "endpoint", 3: "trajectory", 4: "trajectory"})
    assert resolved("PNDMScheduler") == ("pipeline", {2: "endpoint", 3: "endpoint", 4: "endpoint"})
    assert resolved("DDPMScheduler") == ("ode", {2: "endpoint", 3: "trajectory", 4: "trajectory"})  # adds noise
    assert resolved("PNDMScheduler", phase2_target="trajectory") == ("ode", {n: "trajectory" for n in (2, 3, 4)})
    assert resolved("PNDMScheduler", phase2_target="endpoint") == ("ode", {n: "endpoint" for n in (2, 3, 4)})
    from diffusers_fewstep.train import parse_args

    defaults = parse_args([])  # the defaults: auto, one round, the table held fixed
    assert (defaults.phase2_target, defaults.reference_scheduler, defaults.rounds, defaults.phase1_iters) == ("auto", None, 1, 0)
    assert defaults.learning_rate is None  # resolved in main by --use_lora (test_lora_output_loads_with_peft)
    assert resolved("PNDMScheduler", reference_scheduler="ode") == ("ode", {2: "endpoint", 3: "trajectory",
                                                                           4: "trajectory"})


def test_pool_fit_warning_names_the_counts_that_fit_their_pool():
    """The fixture's 4-step run of 2026-11-23e: at step 1,000 the pool RMSE (.097) was within 20% of the fresh one
    (.116) and FD still fell: no warning; at step 2,000 (.079 against .111) FD had stopped: it fires."""
    from types import SimpleNamespace

    from diffusers_fewstep.training_eval import pool_fit_warning

    args = SimpleNamespace(nfe=[2, 4], pool_size=12288, reference_steps=100, reference_scheduler="ode")
    early = {"rmse_nfe2": 0.2, "rmse_pool_nfe2": 0.19, "rmse_nfe4": 0.116, "rmse_pool_nfe4": 0.097}
    late = {**early, "rmse_nfe4": 0.111, "rmse_pool_nfe4": 0.079}
    assert pool_fit_warning(early, args) == ""
    assert pool_fit_warning(late, args) == (
        "Phase 2 is fitting its teacher pool (4 steps: RMSE 0.079 on its trajectories against 0.111 on fresh noises); "
        "more steps may not help: raise --pool_size (now 12288), or a cheaper teacher for the same time "
        "(--reference_steps, now 100)")
    assert pool_fit_warning({"rmse_nfe2": 0.2, "rmse_nfe4": 0.1}, args) == ""  # no pool scored: nothing to say
    pipeline = SimpleNamespace(**{**vars(args), "reference_scheduler": "pipeline"})
    assert pool_fit_warning(late, pipeline).endswith("raise --pool_size (now 12288)")


def test_compiled_modules_stay_compiled_past_dynamos_default_cache_limit():
    """Student and teacher share nn.Module._call_impl's dynamo cache: their ten distinct calls (here: input ranks) are
    all traced, where dynamo's default limit of 8 entries would run the last two eagerly."""
    from torch._dynamo.utils import counters

    from diffusers_fewstep.train import compile_model

    class Tiny(torch.nn.Module):  # a module of our own: dynamo skips torch.nn's built-in ones
        def forward(self, x):
            return torch.nn.functional.silu(x) * 2

    torch._dynamo.reset()
    student, teacher = Tiny(), Tiny()
    compile_model(student, "cpu")
    compile_model(teacher, "cpu")
    counters.clear()
    for rank in range(1, 11):  # five input ranks each: ten entries in the one shared cache
        (student if rank <= 5 else teacher)(torch.ones((2,) * rank))
    assert counters["stats"]["unique_graphs"] == 10
    torch._dynamo.reset()


def test_compile_mode_reaches_inductor_only():
    """--compile_mode (CUDA graphs: reduce-overhead) goes to inductor on CUDA; the CPU's eager tracing takes no mode;
    --compile_mode alone turns compilation on."""
    from diffusers_fewstep.train import compile_model, parse_args

    calls = []
    model = SimpleNamespace(compile=lambda **kwargs: calls.append(kwargs))
    compile_model(model, "cuda", "reduce-overhead")
    compile_model(model, "cpu", "reduce-overhead")
    compile_model(model, "cuda")
    assert calls == [{"backend": "inductor", "mode": "reduce-overhead"}, {"backend": "eager"}, {"backend": "inductor"}]
    assert parse_args(["--compile_mode", "reduce-overhead"]).compile_mode == "reduce-overhead"


def test_targets_text_groups_the_counts_of_each_target():
    from diffusers_fewstep.model_card import targets_text

    assert targets_text({"8": "trajectory", "2": "endpoint", "4": "trajectory"}) == (
        "endpoint at 2 steps; trajectory at 4, 8 steps")
