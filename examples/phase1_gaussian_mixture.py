"""Phase 1 on the closed-form Gaussian-mixture model of the tests: true endpoint RMSE (RK4 solution)
of learned tables against DDIM trailing / Karras / logSNR / uniform-t, NFE 4, 6, 8, CPU.

    python examples/phase1_gaussian_mixture.py
"""
import os
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import sys, time, torch
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")]
from gaussian_mixture import random_mixture, exact_solution
from diffusers_fewstep.optimizer import optimize_schedule
from diffusers_fewstep.solvers import sample
from diffusers_fewstep.schedules import baseline_sigmas
gm = random_mixture(); s = gm.schedule
g = torch.Generator().manual_seed(1234)
x = torch.randn(256, 4, generator=g) * (s.sigma_max**2+1)**0.5
t=time.time(); ex = exact_solution(gm, x, s.sigma_max, steps=300).float(); print("exact", time.time()-t)
def err(table, solver): return float(((sample(gm, x, torch.tensor(table).float(), solver)-ex)**2).mean().sqrt())
runs = [("trajectory","adam","euler",60), ("trajectory","adam","dpmpp_2m",60), ("bound_propagated","adam","euler",60),
        ("bound_propagated","fixed_point","euler",30), ("bound","fixed_point","euler",30)]
for obj, method, solver, iters in runs:
    t=time.time()
    r = optimize_schedule(gm, nfes=[4,6,8], solver=solver, objective=obj, method=method, num_iters=iters, batch_size=128, pool_size=256, progress=False, reference_steps=100,
                          loss="l2", select_by="rmse", validation_size=0, init="ddim_trailing", free_last=True)
    print(obj, method, solver, "opt", round(time.time()-t,1), r.seconds)
    for n in (4,6,8):
        base = {name: err(baseline_sigmas(name,n,s).tolist(), solver) for name in ("ddim_trailing","karras","loguniform","time_linspace")}
        l = err(r.tables[n], solver)
        print(n, "learned", round(l,4), "best base", round(min(base.values()),4), "ratio", round(l/min(base.values()),3), [len(h) for h in r.history[n].values()])
        print("   baselines", {k: round(v, 4) for k, v in base.items()}, "table", [round(v, 4) for v in r.tables[n]])
