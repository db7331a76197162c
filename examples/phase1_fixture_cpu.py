"""Small CPU check of Phase 1 on the vendored fixture: endpoint RMSE of a learned first-order table
against hand-made tables, on held-out noises, versus BENCHMARK.md's 200-step DPM-Solver++(2M) reference.

    PYTHONPATH=src python examples/phase1_fixture_cpu.py --nfe 4 --eval-samples 48 --max-iters 25
"""
import argparse
import json
import time

import torch

from diffusers_fewstep import DEFAULT_MODEL, SigmaDenoiser
from diffusers_fewstep.optimizer import optimize_schedule
from diffusers_fewstep.schedules import baseline_sigmas, time_uniform_sigmas
from diffusers_fewstep.solvers import sample


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--solver", default="euler")
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--max-iters", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pool-size", type=int, default=32)
    p.add_argument("--train-reference-steps", type=int, default=100)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    denoiser = SigmaDenoiser.from_pretrained(DEFAULT_MODEL).eval()
    schedule = denoiser.schedule
    # 1. learn (training noises from seed 0)
    start = time.perf_counter()
    result = optimize_schedule(denoiser, nfes=[args.nfe], solver=args.solver, num_iters=args.max_iters,
                               batch_size=args.batch_size, pool_size=args.pool_size,
                               reference_steps=args.train_reference_steps, seed=0, progress=True)
    learn_seconds = time.perf_counter() - start
    # 2. held-out noises (seed 1234) and their 200-step reference
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(args.eval_samples, 1, 32, 32, generator=g)
    x = noise / float(schedule.native_scale(torch.tensor(schedule.sigma_max)))
    with torch.no_grad():
        ref = torch.cat([sample(denoiser, xb, time_uniform_sigmas(200, schedule).float(), "dpmpp_2m")
                         for xb in x.split(16)])
        tables = {"learned": result.tables[args.nfe]}
        tables.update({name: baseline_sigmas(name, args.nfe, schedule).tolist()
                       for name in ("ddim_trailing", "karras", "loguniform")})
        rmse = {}
        for name, table in tables.items():
            out = torch.cat([sample(denoiser, xb, torch.tensor(table, dtype=torch.float32), args.solver)
                             for xb in x.split(16)])
            rmse[name] = float((out - ref).pow(2).flatten(1).mean(1).sqrt().mean())  # per-sample RMSE, averaged
    report = {"nfe": args.nfe, "solver": args.solver, "rmse": rmse, "tables": tables, "learn_seconds": learn_seconds,
              "history": result.history[args.nfe], "settings": vars(args)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
