"""benchmarks/disjoint_tables.py: tables for `--nfe 2 4 8` whose interior σ's are not shared, read by --phase1_init."""
import json
import os
import subprocess
import sys

from diffusers import DDPMPipeline

from diffusers_fewstep.schedules import starting_tables
from tiny_models import tiny_unconditional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shifted_table_shares_only_sigma_max_and_loads_as_phase1_init(tmp_path):
    DDPMPipeline(**tiny_unconditional()).save_pretrained(tmp_path / "model")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "disjoint_tables.py"), str(tmp_path / "model"),
                          str(tmp_path / "tables")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    tables = starting_tables(str(tmp_path / "tables"), [2, 4, 8], config)
    assert [len(tables[n]) for n in (2, 4, 8)] == [3, 5, 9] and all(t[-1] == 0 for t in tables.values())
    assert set(tables[2][1:-1]) < set(tables[4][1:-1])  # trailing 2 and 4 are nested
    shared = set(tables[8][:-1]) & (set(tables[2][:-1]) | set(tables[4][:-1]))
    assert shared == {tables[8][0]} == {tables[4][0]}  # only σ_max
    assert all(a > b for a, b in zip(tables[8], tables[8][1:]))
