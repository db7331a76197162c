#!/usr/bin/env python
"""Alternate schedule learning (Phase 1) and fine-tuning (Phase 2) for a diffusers model.

    accelerate launch scripts/train_fewstep.py --nfe 4 --rounds 2 --use_ema --output_dir fmnist-fewstep

Text-to-image pipelines (SD, SDXL, SD3) train a LoRA on prompts, guided as they sample:

    accelerate launch scripts/train_fewstep.py --pretrained_model_name_or_path assets/fmnist-t2i-sd \
      --prompts_file examples/prompts/fmnist_t2i.txt --guidance_scale 5 --nfe 2 3 --output_dir fmnist-t2i-fewstep

All options: `python scripts/train_fewstep.py --help` (see docs/training.md).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from diffusers_fewstep.train import parse_args, run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(parse_args()))
