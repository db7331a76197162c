"""Pilot: does fd_self at a larger feature sigma rank 3-step fixture tables like FD-FMNIST? CPU, fp32."""
import json, time, sys, torch
from diffusers_fewstep import evaluation as ev
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.features import ModelFeatures, pooled_features, frechet_distance
torch.manual_seed(0)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 256
d = SigmaDenoiser.from_pretrained("assets/fmnist-ddpm-eps").eval()
T = json.load(open("/tmp/sf/tables.json"))
tables = {k: v[1] for k, v in T.items()}
solvers = {k: v[0] for k, v in T.items()}

gen = torch.Generator().manual_seed(1)
noise = torch.randn(N, 1, 32, 32, generator=gen)
pnoise = torch.randn(N, 1, 32, 32, generator=gen)
t0 = time.time()
with torch.no_grad():
    ref = ev.reference_samples(d, noise, steps=int(sys.argv[2]) if len(sys.argv) > 2 else 25, batch_size=256)
    print(f"reference {time.time()-t0:.0f}s", flush=True)
    sig = [0.1, 0.3, 1.0, 3.0]
    feats = {s: ModelFeatures(d, sigma=s) for s in sig}
    rf = {s: pooled_features(feats[s], ref, pnoise) for s in sig}
    out = {}
    for name, table in tables.items():
        x = ev.generate(d, noise, table, solvers[name], 256)
        r = {"rmse": ev.endpoint_rmse(x, ref)}
        for s in sig:
            r[f"fd_{s}"] = frechet_distance(pooled_features(feats[s], x, pnoise), rf[s])
        out[name] = dict(r, table=table, solver=solvers[name])
        print(f"{name:24s} {solvers[name]:6s}", " ".join(f"{k} {v:.3f}" for k, v in r.items()), f"{time.time()-t0:.0f}s", flush=True)
json.dump(out, open(f"/tmp/sf/pilot-{N}.json", "w"), indent=1)
