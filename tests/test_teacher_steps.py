"""benchmarks/teacher_steps.py: how far a coarse Phase-2 teacher is from a fine one, on a tiny DDPM pipeline."""
import json
import os
import subprocess
import sys

from diffusers import DDPMPipeline

from tiny_models import tiny_unconditional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_error_shrinks_with_steps_and_vanishes_at_the_fine_grid(tmp_path):
    DDPMPipeline(**tiny_unconditional()).save_pretrained(tmp_path / "model")
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "teacher_steps.py"), "--model",
                          str(tmp_path / "model"), "--nfe", "3", "--steps", "3", "12", "48", "--fine", "48", "--n", "4",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    record = json.loads(out.read_text())
    rows = {r["steps"]: r["rmse_per_sigma"] for r in record["rows"]}
    assert len(record["table_sigmas"]) == 4 and all(len(r) == 3 for r in rows.values())
    assert max(rows[48]) == 0  # the fine solve against itself
    assert rows[3][-1] > rows[12][-1] > 0  # a coarser teacher ends further from the fine one
    assert "steps: RMSE against 48" in run.stdout
