"""Pilot 3: data-free measures on fixture tables of known FD: fd_self at sigma_f, and the denoising residual
E||D(x + s e, s) - x||^2 of the samples (how far off the model's manifold they are; no reference needed)."""
import json, os, sys, time, torch
from diffusers_fewstep import evaluation as ev
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.features import ModelFeatures, pooled_features, frechet_distance
N = 256
d = SigmaDenoiser.from_pretrained("assets/fmnist-ddpm-eps").eval()
T1 = json.load(open("/tmp/sf/tables.json")); T2 = json.load(open("/tmp/sf/tables2.json"))
keep3 = ["unipc_bh2+ipndm", "stock_unipc_bh2", "kept_1207", "learned_kept", "ddim_trailing_euler", "s0_10", "last_2.2", "s0_30"]
T = {**{k: T1[k] for k in keep3}, **T2}
gen = torch.Generator().manual_seed(1)
noise = torch.randn(N, 1, 32, 32, generator=gen)
pnoise = torch.randn(N, 1, 32, 32, generator=gen)
t0 = time.time()
cache = "/tmp/sf/ref-256-25.pt"
with torch.no_grad():
    if os.path.exists(cache):
        ref = torch.load(cache)
    else:
        ref = ev.reference_samples(d, noise, steps=25, batch_size=256); torch.save(ref, cache)
    print(f"reference {time.time()-t0:.0f}s", flush=True)
    sig = [0.1, 1.0]
    feats = {s: ModelFeatures(d, sigma=s) for s in sig}
    rf = {s: pooled_features(feats[s], ref, pnoise) for s in sig}
    imgs = ev.fmnist_images("/usr/share/datasets/fashion-mnist", "train")
    data = imgs[torch.randperm(len(imgs), generator=torch.Generator().manual_seed(3))[:N]]
    dnoise = torch.randn(N, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    df = {s: pooled_features(feats[s], data, dnoise) for s in sig}
    print("reference fd_data", {s: frechet_distance(pooled_features(feats[s], ref, pnoise), df[s]) for s in sig}, flush=True)
    def residual(x, s):
        return float((d(x + s * pnoise, torch.full((len(x),), s)) - x).pow(2).mean())
    base = {s: residual(ref, s) for s in (0.1, 0.3, 1.0)}
    print("reference residuals", base, flush=True)
    out = {"reference": base}
    for name, (solver, table) in T.items():
        x = ev.generate(d, noise, table, solver, 256)
        torch.save(x, f"/tmp/sf/samples-{name}.pt")
        r = {"rmse": ev.endpoint_rmse(x, ref)}
        for s in sig:
            px = pooled_features(feats[s], x, pnoise)
            r[f"fd_{s}"] = frechet_distance(px, rf[s])
            r[f"fdd_{s}"] = frechet_distance(px, df[s])
        for s in (0.1, 0.3, 1.0):
            r[f"res_{s}"] = residual(x, s)
        r["std"] = float(x.std()); r["absmean"] = float(x.abs().mean())
        out[name] = dict(r, table=table, solver=solver)
        print(f"{name:28s} {solver:8s}", " ".join(f"{k} {v:.4g}" for k, v in r.items()), f"{time.time()-t0:.0f}s", flush=True)
        json.dump(out, open("/tmp/sf/pilot3.json", "w"), indent=1)
