"""benchmarks/phase1_diagnostics.py: every candidate of a run scored by FD, and by fd_self at other feature σ's."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from diffusers import DDPMPipeline

from tiny_models import STAND_IN_CLASSIFIER, tiny_unconditional, write_idx_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from phase1_diagnostics import _spearman  # noqa: E402

def test_spearman_is_the_rank_correlation():
    assert _spearman([1, 2, 3, 4], [10, 30, 40, 90]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [9, 5, 2, 1]) == pytest.approx(-1.0)
    assert _spearman([3, 1, 2], [20, 30, 10]) == pytest.approx(-0.5)


def test_candidates_get_fd_and_fd_self_at_each_feature_sigma(tmp_path):
    DDPMPipeline(**tiny_unconditional()).save_pretrained(tmp_path / "model")
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "arch.py").write_text(STAND_IN_CLASSIFIER)
    data = tmp_path / "data"
    data.mkdir()
    write_idx_images(data / "t10k-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (64, 28, 28)))
    sample_shape = [1, 16, 16]  # tiny_unconditional's
    stock = {"name": "a+euler", "solver": "euler", "source": "stock", "scores": {"rmse": 0.2}}
    candidates = [dict(stock, table=[80.0, 1.0, 0.0]), dict(stock, name="b+euler", table=[80.0, 10.0, 0.0]),
                  dict(stock, name="c+dpmpp_2m", solver="dpmpp_2m", table=[80.0, 3.0, 0.0], kept=True)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "optimize_log.json").write_text(json.dumps({"settings": {"sample_shape": sample_shape},
                                                       "candidates": {"2": candidates}}))
    out = tmp_path / "diag.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "phase1_diagnostics.py"), "--model",
                           str(tmp_path / "model"), "--run", str(run), "--classifier", str(tmp_path / "net"), "--data",
                           str(data), "--n", "24", "--batch-size", "10", "--feature-sigmas", "0.1", "1", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())["nfes"]["2"]
    scored = record["candidates"]
    for m in ("fd_self@0.1", "fd_self@1"):
        values = [c["scores"][m] for c in scored]
        assert all(np.isfinite(values)) and min(values) >= 0 and len(set(values)) == 3
        pick = record["picks"][m]
        assert pick["name"] == min(scored, key=lambda c: c["scores"][m])["name"]
        assert pick["regret"] == pytest.approx(pick["fd"] / min(c["fd"] for c in scored))
        assert pick["spearman"] == pytest.approx(_spearman(values, [c["fd"] for c in scored]))
    # the two σ's read different features: the scores differ
    assert [c["scores"]["fd_self@0.1"] for c in scored] != [c["scores"]["fd_self@1"] for c in scored]
    assert "fd_self@1:" in proc.stdout
