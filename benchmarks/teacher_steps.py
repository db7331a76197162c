"""How many steps does Phase 2's teacher need? RMSE of the `steps`-step reference trajectory
(`reference.trajectory`, the pool's teacher states) against a much finer one, at every σ of a table.

A Phase-2 pool entry costs `--reference_steps` model calls, a training step a few per trajectory: a teacher
that is accurate at fewer steps buys a larger pool (less over-fitting) for the same time.

    python benchmarks/teacher_steps.py --model assets/fmnist-ddpm-eps --nfe 4 --steps 12 25 50 100 --fine 400
"""
import argparse
import json

from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.evaluation import noise_bank, sample_shape
from diffusers_fewstep.reference import trajectory
from diffusers_fewstep.schedules import baseline_sigmas


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--table", default="ddim_trailing", help="the hand-made table (schedules.baseline_sigmas) the trajectory passes through")
    parser.add_argument("--steps", type=int, nargs="+", default=[12, 25, 50, 100])
    parser.add_argument("--fine", type=int, default=400, help="steps of the reference the others are compared with")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    denoiser = SigmaDenoiser.from_pretrained(args.model).eval()
    table = baseline_sigmas(args.table, args.nfe, denoiser.schedule)
    noise = noise_bank(args.n, sample_shape(denoiser), seed=args.seed)
    fine = trajectory(denoiser, noise, table, args.fine)
    rows = []
    for steps in args.steps:
        rmse = (trajectory(denoiser, noise, table, steps) - fine)[1:].pow(2).flatten(2).mean(-1).sqrt().mean(-1)
        rows.append({"steps": steps, "rmse_per_sigma": [round(float(r), 5) for r in rmse]})
        print(f"{steps:4d} steps: RMSE against {args.fine} at σ = {[round(float(s), 3) for s in table[1:]]}: "
              f"{rows[-1]['rmse_per_sigma']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "nfe": args.nfe, "table": args.table, "fine": args.fine, "n": args.n,
                       "table_sigmas": [float(s) for s in table], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
