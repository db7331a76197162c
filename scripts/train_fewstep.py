#!/usr/bin/env python
"""Alternate schedule learning (Phase 1) and fine-tuning (Phase 2) for a diffusers model.

    accelerate launch scripts/train_fewstep.py --nfe 4 --rounds 2 --use_ema --output_dir fmnist-fewstep

All options: `python scripts/train_fewstep.py --help` (see docs/training.md).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from diffusers_fewstep.train import parse_args, run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(parse_args()))
