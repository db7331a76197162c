"""Tables for one model tuned at several counts (`--nfe 2 4 8`) whose interior σ's are not shared (issue 12).

DDIM-trailing tables of 2, 4 and 8 steps are nested (timesteps 999/499 ⊂ 999/749/499/249 ⊂ 999/874/…/124): at a
shared σ the one network is asked for different steps. This writes a `LearnedScheduleScheduler` folder (what
`--phase1_init FOLDER` reads) with DDIM trailing at the counts given by `--trailing` and, at the counts given by
`--shifted`, the trailing timesteps moved down by half a step (999, then ⌊999 − (k + ½)·T/n⌋; at 8 steps 999, 811,
686, …, 61): only σ_max is then shared.

    python benchmarks/disjoint_tables.py MODEL OUT --trailing 2 4 --shifted 8
"""
import argparse
import json
import os

import torch

from diffusers_fewstep import LearnedScheduleScheduler, NoiseSchedule
from diffusers_fewstep.schedules import baseline_sigmas


def shifted_trailing(n: int, schedule: NoiseSchedule) -> list:
    """σ_max, then the n-step trailing timesteps moved down by half a step, then 0."""
    big_t = schedule.num_train_timesteps
    t = torch.tensor([big_t - 1.0] + [big_t - 1 - (k + 0.5) * big_t / n for k in range(1, n)]).floor()
    return torch.cat([schedule.t_to_sigma(t), torch.zeros(1)]).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--trailing", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--shifted", type=int, nargs="*", default=[8])
    args = parser.parse_args()
    config = json.load(open(os.path.join(args.model, "scheduler", "scheduler_config.json")))
    schedule = NoiseSchedule(config)
    tables = {str(n): baseline_sigmas("ddim_trailing", n, schedule).tolist() for n in args.trailing}
    tables.update({str(n): shifted_trailing(n, schedule) for n in args.shifted})
    LearnedScheduleScheduler.from_config(config, sigma_tables=tables).save_pretrained(args.out)
    for n, table in sorted(tables.items(), key=lambda kv: int(kv[0])):
        print(n, [round(s, 4) for s in table])


if __name__ == "__main__":
    main()
