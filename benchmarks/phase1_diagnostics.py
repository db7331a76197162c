"""Which held-out measure picks the table with the best FD? Scores every candidate of an `optimize` run by FD.

`diffusers-fewstep optimize` records, per step count, every candidate table (stock tables of every solver and
the learned ones) with its held-out scores (`rmse`, `feature`, `fd_self`, and `fd_data` when it was given `--data`)
in `optimize_log.json`. This script samples every candidate on the benchmark's evaluation bank (seed 1234,
independent of the optimiser's noises) and measures FD-FMNIST and endpoint RMSE, then reports, per measure, the FD
of the candidate it would keep against the best FD among all candidates (the regret; 1.00 = it picked the best).
With `--feature-sigmas`, it also scores every candidate by `fd_self` at each of those feature σ's on the same
bank (the samples against the bank's reference solves, `fd_self@σ`), and reports their regrets beside the run's own
measures: which σ the model's features should be read at for the selection to track FD.
The FD here is against the test split (t10k); give `optimize --data` other images (the training split) so that
`fd_data` is not scored on the images it is judged by:

    python benchmarks/phase1_diagnostics.py --model M --run OUT --classifier C --data D --n 2000 --out diag.json
"""
import argparse
import json
import os
import time

import torch

from diffusers_fewstep import evaluation as ev
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.features import ModelFeatures, frechet_distance, pooled_features
from diffusers_fewstep.selection import MEASURES


@torch.no_grad()  # nothing here is trained
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model the run learned for")
    p.add_argument("--run", required=True, help="the folder `diffusers-fewstep optimize` wrote (optimize_log.json)")
    p.add_argument("--classifier", required=True, help="FD feature network folder")
    p.add_argument("--data", required=True, help="Fashion-MNIST IDX folder (t10k-*)")
    p.add_argument("--n", type=int, default=2000, help="evaluation samples per candidate")
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--out", required=True, help="JSON with every candidate's FD and the regret of each measure")
    p.add_argument("--feature-sigmas", type=float, nargs="*", default=[],
                   help="also score every candidate by fd_self with the model's features read at these σ's")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    denoiser = SigmaDenoiser.from_pretrained(args.model).to(device).eval()
    with open(os.path.join(args.run, "optimize_log.json")) as f:
        log = json.load(f)
    net = ev.load_fmnist_classifier(args.classifier, device)
    test_stats = ev.reference_statistics(net, args.data, device)
    shape = tuple(log["settings"]["sample_shape"])
    noise = ev.noise_bank(args.n, shape, device=device)
    reference = ev.reference_samples(denoiser, noise, batch_size=args.batch_size)
    feature_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7)).to(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None  # as optimize scores on a GPU
    readers = {f"fd_self@{s:g}": ModelFeatures(denoiser, sigma=s, autocast_dtype=autocast) for s in args.feature_sigmas}
    ref_feats = {m: pooled_features(r, reference, feature_noise, batch_size=args.batch_size)
                 for m, r in readers.items()}
    out = {"model": args.model, "run": args.run, "n": args.n,
           "reference_fd": ev.frechet_distance(ev.feature_statistics(ev.extract_features(net, reference)), test_stats),
           "nfes": {}}
    for nfe, candidates in log["candidates"].items():
        for c in candidates:
            samples = ev.generate(denoiser, noise, c["table"], c["solver"], args.batch_size)
            c["fd"] = ev.frechet_distance(ev.feature_statistics(ev.extract_features(net, samples)), test_stats)
            c["rmse_eval"] = ev.endpoint_rmse(samples, reference)
            for m, r in readers.items():
                pooled = pooled_features(r, samples, feature_noise, batch_size=args.batch_size)
                c["scores"][m] = frechet_distance(pooled, ref_feats[m])
        best_fd = min(c["fd"] for c in candidates)
        stock_fd = min(c["fd"] for c in candidates if c["source"] == "stock")
        picks = {}
        for measure in [*MEASURES, *readers]:  # those the run scored, and those scored here
            scored = [c for c in candidates if measure in c["scores"]]
            if scored:
                pick = min(scored, key=lambda c: c["scores"][measure])
                picks[measure] = {"name": pick["name"], "fd": pick["fd"], "regret": pick["fd"] / best_fd,
                                  "vs_best_stock": pick["fd"] / stock_fd,
                                  "spearman": _spearman([c["scores"][measure] for c in scored], [c["fd"] for c in scored])}
        kept = next(c for c in candidates if c.get("kept"))
        out["nfes"][nfe] = {"best": min(candidates, key=lambda c: c["fd"])["name"], "best_fd": best_fd,
                            "best_stock_fd": stock_fd, "kept": kept["name"], "kept_fd": kept["fd"], "picks": picks,
                            "candidates": [{k: c[k] for k in ("name", "solver", "source", "scores", "fd", "rmse_eval")}
                                           for c in candidates]}
        shown = "  ".join(f"{m}: {v['name']} ×{v['regret']:.2f} (ρ {v['spearman']:.2f})" for m, v in picks.items())
        print(f"NFE {nfe}: best {out['nfes'][nfe]['best']} FD {best_fd:.3f} (stock {stock_fd:.3f}); kept "
              f"{kept['name']} FD {kept['fd']:.3f}; {shown}", flush=True)
        out["seconds"] = time.time() - start
        with open(args.out, "w") as f:  # after every step count: a run cut by a deadline keeps what it measured
            json.dump(out, f, indent=1)


def _spearman(a, b) -> float:
    """Rank correlation (no tie correction) of two lists."""
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]) if len(a) > 2 else float("nan")


if __name__ == "__main__":
    main()
