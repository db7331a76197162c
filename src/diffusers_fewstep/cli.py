"""`diffusers-fewstep` console script: `optimize` (Phase 1), `benchmark`, `train` (Phase 1 ⇄ Phase 2)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with `add_arguments(parser)` and `run(args)`
COMMANDS = {
    "optimize": ("diffusers_fewstep.optimize_cli", "learn σ tables for a model (Phase 1)"),
    "benchmark": ("diffusers_fewstep.benchmark", "side-by-side benchmark of samplers and learned tables"),
    "train": ("diffusers_fewstep.train",
              "alternate Phase 1 and Phase 2 (`accelerate launch scripts/train_fewstep.py` for several GPUs)"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="diffusers-fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
