"""Learning curves of `scripts/train_fewstep.py` runs from their logs (or metrics.json files), in one figure.

The training script logs every evaluation as `round R phaseN: {...}` (the rows of `metrics.json`); this reads those
rows and draws FD and endpoint RMSE against optimiser steps and wall time (`plotting.plot_training_curves`):

    python benchmarks/plot_phase2_curves.py --run "lr 2e-5, batch 256=RUN.log" --run "lr 5e-5=OTHER.log" --out curves.png
"""
import argparse
import ast
import json
import re

from diffusers_fewstep.plotting import plot_training_curves

ROW = re.compile(r"round \d+ phase\d?: (\{.*\})\s*$")


def read_rows(path: str) -> list:
    """The evaluation rows of a training log, or `metrics` of a metrics.json."""
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)["metrics"]
    with open(path) as f:
        return [ast.literal_eval(m.group(1)) for m in map(ROW.search, f) if m]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="LABEL=PATH (a training log or metrics.json); repeat")
    p.add_argument("--out", required=True, help="the figure (PNG)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, _, path = spec.rpartition("=")
        if label in runs:
            raise SystemExit(f"--run label {label!r} given twice: each run needs its own label")
        runs[label] = read_rows(path)
        if not runs[label]:
            raise SystemExit(f"no evaluation rows in {path}")
    return plot_training_curves(runs, args.out, args.title)


if __name__ == "__main__":
    print(main())
