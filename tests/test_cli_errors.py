"""Bad input to `diffusers-fewstep`: one `diffusers-fewstep: error: …` line on stderr, exit status 2, checked
before any model is loaded; the traceback only with --verbose."""
import os
import subprocess
import sys

import pytest
import torch

from diffusers_fewstep import DEFAULT_MODEL, hub
from diffusers_fewstep.checks import UsageError
from diffusers_fewstep.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
PEERS = ("['ddim_leading', 'ddim_trailing', 'euler_karras', 'dpmpp2m_karras', 'dpmpp2m_lu', 'unipc_bh2', "
         "'unipc_bh2_karras', 'flow_euler', 'flow_euler_karras', 'flow_dpmpp2m', 'flow_unipc']")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """The checks run before any heavy work: loading a model here fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hub, "load_model_and_scheduler_config", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _error(capsys, argv):
    """Run the CLI, expect exit status 2 and exactly one stderr line; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def _optimize(tmp_path, *extra):
    return ["optimize", "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra]


def test_missing_model_folder(capsys, tmp_path):
    assert _error(capsys, _optimize(tmp_path, "--model", "./no-such-model")) == (
        "diffusers-fewstep: error: no model folder ./no-such-model; pass a diffusers pipeline folder or a Hub id")
    # shaped like a Hub id, but its first part is a local folder: a mistyped path
    assert _error(capsys, _optimize(tmp_path, "--model", "assets/fmnist-ddpm")) == (
        "diffusers-fewstep: error: no model folder assets/fmnist-ddpm; pass a diffusers pipeline folder or a Hub id")
    assert _error(capsys, ["train", "--pretrained_model_name_or_path", "/no/such/model"]) == (
        "diffusers-fewstep: error: no model folder /no/such/model; pass a diffusers pipeline folder or a Hub id")
    assert _error(capsys, ["benchmark", "--model", "a/b/c", "--device", "cpu"]) == (
        "diffusers-fewstep: error: no model folder a/b/c; pass a diffusers pipeline folder or a Hub id")


def test_missing_input_files(capsys, tmp_path):
    assert _error(capsys, _optimize(tmp_path, "--data", "nope.idx")) == (
        "diffusers-fewstep: error: --data nope.idx: no such file or folder; pass an existing path")
    assert _error(capsys, ["train", "--train_data_dir", str(tmp_path / "imgs")]) == (
        f"diffusers-fewstep: error: --train_data_dir {tmp_path / 'imgs'}: no such file or folder; pass an existing path")
    assert _error(capsys, ["train", "--conditioning_file", "labels.txt"]) == (
        "diffusers-fewstep: error: --conditioning_file labels.txt: no such file or folder; pass an existing path")
    assert _error(capsys, ["benchmark", "--device", "cpu", "--data", FMNIST, "--classifier", "no-net"]) == (
        "diffusers-fewstep: error: --classifier no-net: no such file or folder; pass an existing path")


def test_fd_data_selection_needs_data_and_an_unconditional_model(capsys, tmp_path):
    assert _error(capsys, _optimize(tmp_path, "--select-by", "fd_data")) == (
        "diffusers-fewstep: error: --select-by fd_data compares samples with clean data images; pass them (optimize "
        "--data: an IDX file, .pt tensor or image folder) or select by one of ['rmse', 'feature', 'fd_self']")
    torch.save(torch.zeros(4, 1, 8, 8), tmp_path / "data.pt")
    (tmp_path / "prompts.txt").write_text("a shoe\n")
    assert _error(capsys, _optimize(tmp_path, "--select-by", "fd_data", "--data", str(tmp_path / "data.pt"),
                                    "--prompts-file", str(tmp_path / "prompts.txt"))) == (
        "diffusers-fewstep: error: --select-by fd_data is for unconditional models: data images carry no prompts or "
        "labels; select by one of ['rmse', 'feature', 'fd_self']")


def test_cuda_without_cuda(capsys, tmp_path):
    assert _error(capsys, ["optimize", "--output-dir", str(tmp_path), "--device", "cuda"]) == (
        "diffusers-fewstep: error: --device cuda: torch finds no CUDA device on this machine; pass --device cpu")
    assert _error(capsys, ["benchmark", "--device", "gpu", "--classifier", str(tmp_path), "--data", str(tmp_path)]) == (
        "diffusers-fewstep: error: unknown --device 'gpu'; pass cpu or cuda")


def test_output_path_is_a_file(capsys, tmp_path):
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken"
    assert _error(capsys, ["optimize", "--output-dir", str(out), "--device", "cpu"]) == (
        f"diffusers-fewstep: error: --output-dir {out}: {out} is a file, not a folder; pass a folder path")
    assert _error(capsys, ["train", "--output_dir", str(out / "sub")]) == (
        f"diffusers-fewstep: error: --output_dir {out / 'sub'}: {out} is a file, not a folder; pass a folder path")
    assert _error(capsys, ["benchmark", "--device", "cpu", "--classifier", str(tmp_path), "--data", str(tmp_path),
                           "--out-dir", str(out)]) == (
        f"diffusers-fewstep: error: --out-dir {out}: {out} is a file, not a folder; pass a folder path")


def test_unknown_solver(capsys, tmp_path):
    assert _error(capsys, _optimize(tmp_path, "--solver", "heun")) == (
        "diffusers-fewstep: error: --solver heun: unknown solver 'heun'; choose one of "
        "['euler', 'dpmpp_2m', 'unipc', 'ipndm'] or auto")


def test_known_solvers_and_inits_pass(monkeypatch, tmp_path):
    from diffusers_fewstep import optimize_cli

    seen = []
    monkeypatch.setattr(optimize_cli, "run", lambda args: seen.append((args.solver, args.init)) or 0)
    for solver, init in [("auto", "karras"), ("ddim", "peer:unipc_bh2"), ("unipc", "time_linspace")]:
        assert main(_optimize(tmp_path, "--solver", solver, "--init", init, "--model", "someone/some-model")) == 0
    assert seen == [("auto", "karras"), ("ddim", "peer:unipc_bh2"), ("unipc", "time_linspace")]


def test_unknown_start_table(capsys, tmp_path):
    assert _error(capsys, _optimize(tmp_path, "--init", "cosine")) == (
        "diffusers-fewstep: error: --init cosine: unknown baseline schedule 'cosine'; expected karras, loguniform, "
        f"ddim_trailing or ddim_leading, or peer:<row> with a row of {PEERS}")
    assert _error(capsys, _optimize(tmp_path, "--init", "peer:heun")) == (
        f"diffusers-fewstep: error: --init peer:heun: unknown diffusers peer 'heun'; choose a row of {PEERS}")
    # train starts Phase 1 from a baseline only
    assert _error(capsys, ["train", "--phase1_init", "peer:unipc_bh2"]) == (
        "diffusers-fewstep: error: --phase1_init peer:unipc_bh2: unknown baseline schedule 'peer:unipc_bh2'; "
        "expected karras, loguniform, ddim_trailing or ddim_leading")


def test_argparse_errors_keep_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--solver", "heun"])
    assert exc.value.code == 2
    assert "invalid choice: 'heun'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_the_traceback(capsys, tmp_path, where):
    argv = _optimize(tmp_path, "--model", "./no-such-model")
    argv = ["--verbose", *argv] if where == "before" else [*argv, "--verbose"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "raise UsageError(" in err
    assert err.splitlines()[-1] == (
        "diffusers-fewstep: error: no model folder ./no-such-model; pass a diffusers pipeline folder or a Hub id")


def test_errors_from_the_run(capsys, monkeypatch, tmp_path):
    """Input errors the checks cannot see (a corrupt file, an unreachable Hub id) end in one line that says
    --verbose shows more; a genuine bug keeps its traceback."""
    from diffusers_fewstep import optimize_cli

    def corrupt(args):
        raise ValueError("corrupt config file x.json: Expecting value: line 1 column 1 (char 0)")

    monkeypatch.setattr(optimize_cli, "run", corrupt)
    assert _error(capsys, _optimize(tmp_path)) == (
        "diffusers-fewstep: error: corrupt config file x.json: Expecting value: line 1 column 1 (char 0) "
        "(--verbose shows the traceback)")

    def unreachable(args):
        raise OSError("'a/b' is neither a local folder nor a reachable Hub repo id: 401 Client Error.\n\n"
                      "Repository Not Found")

    monkeypatch.setattr(optimize_cli, "run", unreachable)
    assert _error(capsys, _optimize(tmp_path)) == (
        "diffusers-fewstep: error: 'a/b' is neither a local folder nor a reachable Hub repo id: 401 Client Error. "
        "Repository Not Found (--verbose shows the traceback)")

    def bug(args):
        raise UsageError("lowered by a module") if args.seed == 1 else IndexError("list index out of range")

    monkeypatch.setattr(optimize_cli, "run", bug)
    assert _error(capsys, _optimize(tmp_path, "--seed", "1")) == "diffusers-fewstep: error: lowered by a module"
    with pytest.raises(IndexError):
        main(_optimize(tmp_path))


def test_subprocess_one_line_and_status_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.run([sys.executable, "-m", "diffusers_fewstep.cli", "optimize", "--model", "./no-such-model",
                           "--output-dir", str(tmp_path), "--device", "cpu"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "diffusers-fewstep: error: no model folder ./no-such-model; pass a diffusers pipeline folder or a Hub id"]
    assert proc.stdout == ""


def test_existing_model_folder_and_hub_ids_pass(monkeypatch, tmp_path):
    from diffusers_fewstep import optimize_cli

    monkeypatch.setattr(optimize_cli, "run", lambda args: 0)
    for model in [DEFAULT_MODEL, "someone/some-model", "stabilityai/stable-diffusion-3.5-medium"]:
        assert main(_optimize(tmp_path, "--model", model)) == 0
