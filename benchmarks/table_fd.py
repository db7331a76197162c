"""FD-FMNIST of σ tables given by hand: which table (and solver) samples best, on the benchmark's evaluation bank.

    python benchmarks/table_fd.py --model assets/fmnist-ddpm-eps --tables TABLES.json --n 2000 \\
        --classifier ../shared/fixtures/fmnist-classifier --data /usr/share/datasets/fashion-mnist

TABLES.json maps a name to `[solver, [σ_0, …, σ_N]]`. Every table samples the same noises (`noise_bank(n)`, drawn on
the device: CPU and CUDA banks differ) with our σ-space solver; one line per table: FD, seconds, the table.
`--cpu-bf16` autocasts the model calls on a CPU to bf16 (as they run on CUDA; about 2× faster there).
"""
import argparse
import json
import time

import torch

from diffusers_fewstep import evaluation as ev
from diffusers_fewstep.adapter import SigmaDenoiser


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/fmnist-ddpm-eps")
    p.add_argument("--tables", required=True, help="JSON: name -> [solver, table]")
    p.add_argument("--classifier", required=True, help="FD feature network folder")
    p.add_argument("--data", required=True, help="Fashion-MNIST folder (t10k-* or fd_statistics.npz)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cpu-bf16", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoiser = SigmaDenoiser.from_pretrained(args.model).to(device).eval()
    net = ev.load_fmnist_classifier(args.classifier, device)
    test_stats = ev.reference_statistics(net, args.data, device)
    noise = ev.noise_bank(args.n, ev.sample_shape(denoiser), device=device)
    with open(args.tables) as f:
        tables = json.load(f)
    for name, (solver, table) in tables.items():
        start = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.cpu_bf16 and device.type == "cpu"):
            samples = ev.generate(denoiser, noise, table, solver, args.batch_size)
        fd = ev.frechet_distance(ev.feature_statistics(ev.extract_features(net, samples)), test_stats)
        print(f"{name:30s} {solver:9s} fd={fd:.3f} {time.time() - start:.0f}s {[round(s, 3) for s in table]}", flush=True)


if __name__ == "__main__":
    main()
