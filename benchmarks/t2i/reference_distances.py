"""How far apart are the images of several samplers of one text-to-image pipeline, from the same latents?

Pixel RMSE (the classifier's [-1, 1] space, as `evaluate_t2i.py` measures fidelity; pooled over the samples, and
the median sample's) between every pair of rows, each row a stock scheduler of `evaluate_t2i.py` or a folder of
learned tables at a step count, through the stock pipeline. A row `dpmpp_2m_flow:200` is
a near-exact solve of the model's ODE: it tells whether a few-step scheduler is close to the ODE's image or to the
pipeline's own many-step image.

    python benchmarks/t2i/reference_distances.py --pipeline assets/fmnist-t2i-sd3 --n 32 \\
        --rows flow_euler:50 dpmpp_2m_flow:200 dpmpp_2m_flow:8 unipc_flow:8 benchmarks/t2i/results/sd3-learned:8
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate_t2i import build_scheduler, generate, initial_latents, learned_row, peer_rows  # noqa: E402
from t2i_common import eval_prompts, load_pipeline  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--rows", nargs="+", required=True,
                        help="ROW:STEPS, ROW a stock row of evaluate_t2i.py or a folder of learned tables")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the distances as JSON here")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.pipeline, "cpu")
    prompts, _ = eval_prompts(args.n)  # evaluate_t2i.py's prompts, cycling over the classes
    latents = initial_latents(pipe, args.n, args.seed, "cpu")
    peers, images, base = peer_rows(pipe), {}, pipe.scheduler.config  # generate() swaps pipe.scheduler
    for row in args.rows:
        name, steps = row.rsplit(":", 1)
        if name in peers:
            cls, overrides, _ = peers[name]
            scheduler = build_scheduler(cls, base, overrides)
        else:
            scheduler = learned_row(name, os.path.basename(os.path.normpath(name)), base)[0]
        start = time.time()
        images[row] = generate(pipe, scheduler, int(steps), prompts, latents, args.guidance, args.batch)
        print(f"{row}: {time.time() - start:.0f} s", flush=True)
    per_sample = {a: {b: (images[a] - images[b]).pow(2).flatten(1).mean(1) for b in images if b != a} for a in images}
    # pooled RMSE (as evaluate_t2i.py's fidelity: a few far samples weigh in) and the median sample's RMSE
    rmse = {a: {b: round(float(v.mean().sqrt()), 4) for b, v in row.items()} for a, row in per_sample.items()}
    median = {a: {b: round(float(v.median().sqrt()), 4) for b, v in row.items()} for a, row in per_sample.items()}
    for a in images:
        print(a, " ".join(f"{b} {rmse[a][b]:.4f} (median {median[a][b]:.4f})" for b in rmse[a]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"pipeline": args.pipeline, "n": args.n, "guidance": args.guidance, "seed": args.seed,
                       "rows": args.rows, "rmse": rmse, "median_rmse": median}, f, indent=1)


if __name__ == "__main__":
    main()
