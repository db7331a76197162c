"""Would the selection keep the resampled 4-step table at 5 and 6 steps on the flow model? CPU, 128 held-out noises."""
import json, time, torch
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.optimizer import optimize_schedule
log = json.load(open("/tmp/g/phase1-flow/runs/flow/optimize_log.json"))
t, s = log["tables"], log["solvers"]
d = SigmaDenoiser.from_pretrained("/tmp/g/fp32-flow").eval()
start = time.time()
r = optimize_schedule(d, nfes=[4, 5, 6], solver="unipc", starts=0, validation_size=128, pool_size=8, batch_size=32,
                      existing={n: (t[str(n)], s[str(n)]) for n in (4, 5, 6)}, progress=False)
for n in (4, 5, 6):
    for c in sorted(r.candidates[n], key=lambda c: c["scores"]["fd_self"]):
        print(n, f'{c["name"]:40s} {c["source"]:10s} fd_self {c["scores"]["fd_self"]:.3f} rmse {c["scores"]["rmse"]:.4f}', "KEPT" if c["kept"] else "")
print(f"{time.time() - start:.0f} s")
