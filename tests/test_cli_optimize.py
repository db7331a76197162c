"""`diffusers-fewstep optimize` end to end on the vendored fixture DPM, with a tiny budget on CPU."""
import json
import os
import time

import pytest

from diffusers_fewstep import DEFAULT_MODEL, LearnedScheduleScheduler
from diffusers_fewstep.adapter import NoiseSchedule
from diffusers_fewstep.cli import main
from diffusers_fewstep.hub import load_json
from diffusers_fewstep.schedules import validate_sigmas

FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def _check_output(out, nfes, objective):
    scheduler = LearnedScheduleScheduler.from_pretrained(str(out), subfolder="scheduler")
    base = load_json(os.path.join(DEFAULT_MODEL, "scheduler", "scheduler_config.json"))
    scheduler.check_compatible(base)  # same noise schedule as the model it was learned for
    schedule = NoiseSchedule(base)
    assert scheduler.available_nfes == nfes
    for nfe in nfes:
        table = validate_sigmas(scheduler.config.sigma_tables[str(nfe)], schedule.sigma_min, schedule.sigma_max)
        assert len(table) == nfe + 1 and table[-1] == 0.0
    assert scheduler.config.provenance["objective"] == objective
    assert scheduler.config.provenance["base_model"] == DEFAULT_MODEL
    log = json.loads((out / "optimize_log.json").read_text())
    assert set(log["tables"]) == {str(n) for n in nfes}
    assert os.path.getsize(out / "schedule.png") > 1000
    return scheduler, log


def test_cli_optimize_trajectory(tmp_path):
    start = time.process_time()  # CPU seconds of this process (wall time depends on other load)
    rc = main(["optimize", "--nfe", "3", "--max-iters", "2", "--batch-size", "1", "--pool-size", "1",
               "--reference-steps", "6", "--device", "cpu", "--quiet", "--output-dir", str(tmp_path)])
    assert rc == 0
    scheduler, log = _check_output(tmp_path, [3], "trajectory")
    assert len(log["history"]["3"]) == 2 and log["num_evals"]["3"] == 2 * 3
    assert log["shared"]["num_evals"] == 6  # one 6-step reference solve of the pool
    assert scheduler.config.solver == "euler"
    assert time.process_time() - start < 60


@pytest.mark.skipif(not os.path.exists(FMNIST_TEST), reason="needs the dataset-fashion-mnist Debian package")
def test_cli_optimize_fixed_point_with_data(tmp_path):
    # the gradient-free solver on the propagated bound, x0 from Fashion-MNIST (IDX file)
    rc = main(["optimize", "--nfe", "3", "--objective", "bound_propagated", "--method", "fixed_point",
               "--max-iters", "1", "--batch-size", "1", "--data", FMNIST_TEST, "--device", "cpu", "--quiet",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    _, log = _check_output(tmp_path, [3], "bound_propagated")
    assert log["settings"]["x0_source"] == "data" and log["shared"]["num_evals"] == 0
    # each iteration: 3 intervals × (1 + 1 stratum) + 2 finite-difference calls at 2 interior points
    assert log["num_evals"]["3"] == len(log["history"]["3"]) * (3 * 2 + 2 * 2)


def test_cli_optimize_from_a_diffusers_peer_table_with_learnable_start(tmp_path, capsys):
    # start from diffusers' own UniPC table (leading spacing: σ_0 = σ(t=750), far below σ_max) and keep σ_0 free
    rc = main(["optimize", "--nfe", "3", "--solver", "unipc", "--init", "peer:unipc_bh2", "--learn-start",
               "--max-iters", "2", "--batch-size", "1", "--pool-size", "1", "--reference-steps", "6",
               "--device", "cpu", "--quiet", "--output-dir", str(tmp_path)])
    assert rc == 0
    scheduler, log = _check_output(tmp_path, [3], "trajectory")
    assert scheduler.config.solver == "unipc" and log["settings"]["learn_start"] is True
    sigma_0 = scheduler.config.sigma_tables["3"][0]
    schedule = NoiseSchedule(load_json(os.path.join(DEFAULT_MODEL, "scheduler", "scheduler_config.json")))
    assert 5.0 < sigma_0 < 0.5 * schedule.sigma_max  # near UniPC's own 17.4 after two steps, not pinned to 157
    capsys.readouterr()
    assert main(["optimize", "--nfe", "3", "--init", "peer:heun", "--device", "cpu", "--quiet",
                 "--output-dir", str(tmp_path / "bad")]) == 2
    assert "error: --init peer:heun: unknown diffusers peer 'heun'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work
