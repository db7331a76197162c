"""Would the selection keep the resampled 6->8 table on the v-prediction model? CPU, 128 held-out noises."""
import json, time, torch
from diffusers_fewstep.adapter import SigmaDenoiser
from diffusers_fewstep.optimizer import optimize_schedule
log = json.load(open("/tmp/g/phase1-vpred/runs/vpred/optimize_log.json"))
t, s = log["tables"], log["solvers"]
d = SigmaDenoiser.from_pretrained("/tmp/g/fp32-vpred").eval()
start = time.time()
r = optimize_schedule(d, nfes=[6, 8], solver="unipc", starts=0, validation_size=128, pool_size=8, batch_size=32,
                      existing={6: (t["6"], s["6"]), 8: (t["8"], s["8"])}, progress=False)
for n in (6, 8):
    for c in sorted(r.candidates[n], key=lambda c: c["scores"]["fd_self"]):
        print(n, f'{c["name"]:40s} {c["source"]:10s} fd_self {c["scores"]["fd_self"]:.3f} rmse {c["scores"]["rmse"]:.4f}', "KEPT" if c["kept"] else "")
print(f"{time.time() - start:.0f} s")
