"""`diffusers-fewstep benchmark`: every sampler side by side, in one run, on one noise bank (BENCHMARK.md).

Rows: diffusers' own schedulers (driven as BENCHMARK.md's peer script drives them), the published
schedule optimisers we re-implemented (:mod:`peers`: GITS, AYS), our learned tables (one row per
solver; cached by `--learn` in `benchmarks/tables/learned_<solver>.json` with their learning time and
command) and, when given, a Phase-2 tuned model with its tables (`--tuned-model`). Every row gets
FD-FMNIST, endpoint RMSE against the 200-step reference and the time it took to learn its table.

    # 1. learn our tables (noise seed 0, independent of the evaluation bank, seed 1234) and cache them
    diffusers-fewstep benchmark --learn-only --solvers euler unipc --nfes 3 4 5 6 8 10
    # 2. measure everything and write JSON, markdown and docs/results.md with its figures
    diffusers-fewstep benchmark --n 5000 --classifier CLASSIFIER_DIR --data FMNIST_DIR
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from . import evaluation as ev
from . import peers
from .schedules import baseline_sigmas

OUR_SOLVERS = ("euler", "dpmpp_2m", "unipc", "ipndm")
SOLVER_LABELS = {"euler": "DDIM", "dpmpp_2m": "DPM++2M", "unipc": "UniPC bh2", "ipndm": "iPNDM"}
GRID_NFE = 4  # sample grids at this NFE
GRID_SAMPLES = 16


@dataclass
class Row:
    """One benchmark row: how its samples are made and what it scored, per NFE."""

    name: str
    label: str
    group: str  # "diffusers", "optimiser" (published, re-implemented), "ours", "tuned", "check"
    solver: Optional[str] = None
    tables: Dict[int, List[float]] = field(default_factory=dict)
    learn_seconds: Dict[int, float] = field(default_factory=dict)
    results: Dict[int, dict] = field(default_factory=dict)
    note: str = ""
    commands: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "group": self.group, "solver": self.solver, "note": self.note,
                "results": {str(k): v for k, v in self.results.items()},
                "tables": {str(k): v for k, v in self.tables.items()},
                "learn_seconds": {str(k): v for k, v in self.learn_seconds.items()}}


# --- arguments -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="diffusers pipeline folder or Hub id (scheduler/ + unet/)")
    parser.add_argument("--classifier", default=os.environ.get("FMNIST_CLASSIFIER", "../shared/fixtures/fmnist-classifier"),
                        help="folder of the FD feature network (arch.py + model.safetensors)")
    parser.add_argument("--data", default=os.environ.get("FMNIST_DATA", "/usr/share/datasets/fashion-mnist"),
                        help="folder with the Fashion-MNIST IDX files (t10k-*) for the FD reference set")
    parser.add_argument("--n", type=int, default=5000, help="evaluation samples per row (FD needs ≥ 5000)")
    parser.add_argument("--nfes", type=int, nargs="+", default=[3, 4, 5, 6, 8, 10], help="NFEs to evaluate / learn")
    parser.add_argument("--batch-size", type=int, default=2500, help="samples per model call when sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only these row names (default: all); e.g. ddim_trailing unipc_bh2 gits_ipndm learned_unipc")
    parser.add_argument("--tables-dir", default="benchmarks/tables", help="cache of learned tables (learned_<solver>.json)")
    parser.add_argument("--out-dir", default="benchmarks/results", help="where results JSON and markdown go")
    parser.add_argument("--docs-dir", default=None, help="write results.md and figures/ here (e.g. docs)")
    parser.add_argument("--peer-samples", type=int, default=256, help="teacher samples for GITS and AYS")
    parser.add_argument("--inception", action="store_true",
                        help="also compute Inception FID when torchmetrics and its weights are available locally")
    # learning our tables
    parser.add_argument("--learn", action="store_true", help="learn our tables first (and cache them), then measure")
    parser.add_argument("--learn-only", action="store_true", help="learn and cache our tables, measure nothing")
    parser.add_argument("--solvers", nargs="+", default=list(OUR_SOLVERS), help="solvers to learn tables for")
    parser.add_argument("--num-iters", type=int, default=150, help="optimiser iterations per table")
    parser.add_argument("--learn-batch-size", type=int, default=128, help="optimiser batch size")
    parser.add_argument("--init", default="ddim_trailing",
                        help="initial table for the optimiser: a baseline name or peer:<row> (e.g. peer:unipc_bh2)")
    parser.add_argument("--learn-seed", type=int, default=0, help="seed of the training noise (≠ evaluation seed 1234)")
    parser.add_argument("--optimizer-kwargs", default="{}", help="extra optimize_schedule keyword arguments (JSON)")
    parser.add_argument("--learn-note", default="", help="free text stored with the learned tables (e.g. GPU sharing)")
    parser.add_argument("--tables-tag", default="", help="suffix of the cache file (learned_<solver><tag>.json)")
    parser.add_argument("--wait-for-tables", type=float, default=0.0,
                        help="seconds to wait, after measuring the peers, for learners holding *.lock in --tables-dir")
    # Phase 2
    parser.add_argument("--tuned-model", default=None,
                        help="Phase-2 tuned model folder; its scheduler/ config must hold sigma_tables and solver "
                             "(a LearnedScheduleScheduler), or pass --tuned-tables")
    parser.add_argument("--tuned-tables", default=None, help="JSON with {'solver', 'tables': {nfe: σ}} for --tuned-model")


# --- learning and loading tables -----------------------------------------------------------------------
def initial_tables(init: str, nfes, base_config) -> Union[str, Dict[int, List[float]]]:
    """`--init`: a baseline name of `schedules.baseline_sigmas`, or `peer:<name>` for a diffusers peer's own
    σ's at every NFE (e.g. `peer:unipc_bh2`: learning then starts exactly from that peer's table)."""
    if not init.startswith("peer:"):
        return init
    tables = {}
    for nfe in nfes:
        scheduler = peers.diffusers_scheduler(init[len("peer:"):], base_config)
        scheduler.set_timesteps(nfe)
        tables[nfe] = [float(s) for s in scheduler.sigmas]
    return tables


def learn_tables(denoiser, args, command: str, base_config=None) -> None:
    """Learn our tables for every solver in `args.solvers` and cache them in `args.tables_dir`.

    One `optimize_schedule` call per solver for all NFEs. A table's time is what learning it alone
    costs: its own optimisation loop plus the reference solves of the training noise (shared by the NFEs).
    """
    from .optimizer import optimize_schedule

    os.makedirs(args.tables_dir, exist_ok=True)
    extra = json.loads(args.optimizer_kwargs)
    for solver in args.solvers:
        path = os.path.join(args.tables_dir, f"learned_{solver}{args.tables_tag}.json")
        start = time.perf_counter()
        result = optimize_schedule(denoiser, nfes=list(args.nfes), solver=solver, objective="trajectory",
                                   num_iters=args.num_iters, batch_size=args.learn_batch_size,
                                   init=initial_tables(args.init, args.nfes, base_config),
                                   seed=args.learn_seed, device=args.device, progress=False, **extra)
        shared = float(result.shared.get("seconds", 0.0))
        record = {"solver": solver, "tables": {str(k): [float(s) for s in v] for k, v in result.tables.items()},
                  "seconds": {str(k): float(v) + shared for k, v in result.seconds.items()},
                  "loop_seconds": {str(k): float(v) for k, v in result.seconds.items()},
                  "shared_seconds": shared, "total_seconds": time.perf_counter() - start,
                  "num_evals": {str(k): int(v) for k, v in result.num_evals.items()},
                  "shared_num_evals": int(result.shared.get("num_evals", 0)),
                  "settings": result.settings, "command": command, "device": device_name(args.device), "date": now(),
                  "note": args.learn_note}
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        for nfe, table in result.tables.items():
            print(f"learned {solver} NFE {nfe}: loop {result.seconds[nfe]:.1f}s + shared {shared:.1f}s: "
                  f"{[round(s, 4) for s in table]}", flush=True)


def load_learned_rows(tables_dir: str, nfes) -> List[Row]:
    """Our rows from the cached `learned_<solver>*.json` files (several files per solver are merged;
    NFEs outside `nfes` are left out)."""
    rows = []
    for solver in OUR_SOLVERS:
        paths = sorted(glob.glob(os.path.join(tables_dir, f"learned_{solver}*.json")))
        if not paths:
            continue
        row = Row(f"learned_{solver}", f"ours: learned + {SOLVER_LABELS[solver]}", "ours", solver)
        notes = []
        for path in paths:
            with open(path) as f:
                record = json.load(f)
            row.tables.update({int(k): v for k, v in record["tables"].items() if int(k) in nfes})
            row.learn_seconds.update({int(k): v for k, v in record.get("seconds", {}).items() if int(k) in nfes})
            row.commands.append(record.get("command"))
            notes.append(f"`{path}` ({record.get('device', '?')}, {record.get('date', '?')}"
                         + (f"; {record['note']}" if record.get("note") else "") + ")")
        row.note = "; ".join(notes)
        rows.append(row)
    return rows


def wait_for_learners(tables_dir: str, timeout: float) -> None:
    """Wait (up to `timeout` s) while learners running beside us hold `*.lock` files in `tables_dir`."""
    deadline = time.time() + timeout
    while glob.glob(os.path.join(tables_dir, "*.lock")) and time.time() < deadline:
        time.sleep(2)
    left = glob.glob(os.path.join(tables_dir, "*.lock"))
    if left:
        print(f"warning: learners still running after {timeout:.0f}s: {left}; measuring the tables cached so far",
              flush=True)


def load_tuned(args, nfes):
    """(denoiser, row) for a Phase-2 tuned model, or (None, None)."""
    if not args.tuned_model:
        return None, None
    from .adapter import SigmaDenoiser
    from .hub import load_json, resolve_folder

    denoiser = SigmaDenoiser.from_pretrained(args.tuned_model).to(args.device).eval()
    if args.tuned_tables:
        record = load_json(args.tuned_tables)
    else:
        record = load_json(os.path.join(resolve_folder(args.tuned_model), "scheduler", "scheduler_config.json"))
        record = {"solver": record.get("solver", "euler"), "tables": record.get("sigma_tables") or {},
                  "seconds": (record.get("provenance") or {}).get("seconds", {})}
    if not record["tables"]:
        raise ValueError(f"{args.tuned_model} has no sigma_tables in scheduler/scheduler_config.json; pass --tuned-tables")
    solver = record["solver"]
    tables = {int(k): v for k, v in record["tables"].items() if int(k) in nfes}
    seconds = {int(k): v for k, v in (record.get("seconds") or {}).items() if int(k) in nfes}
    return denoiser, Row("tuned_" + solver, f"ours: Phase 2 tuned model + {SOLVER_LABELS.get(solver, solver)}",
                         "tuned", solver, tables, seconds, note=args.tuned_model)


# --- measuring --------------------------------------------------------------------------------------------
class Harness:
    """Shared state of one run: model, noise bank, reference samples, feature statistics."""

    def __init__(self, denoiser, base_config, args):
        self.denoiser, self.base_config, self.args = denoiser, base_config, args
        self.device = torch.device(args.device)
        net = ev.load_fmnist_classifier(args.classifier, self.device)
        self.feature_nets = {"fd_fmnist": net}
        if args.inception:
            inception = ev.inception_feature_extractor(self.device)
            if inception is not None:
                self.feature_nets["fid_inception"] = inception
        test = ev.fmnist_images(args.data, "test").to(self.device)
        self.test_stats = {k: ev.feature_statistics(ev.extract_features(f, test, args.batch_size))
                           for k, f in self.feature_nets.items()}
        self.noise = ev.noise_bank(args.n, peers._sample_shape(denoiser), device=self.device)
        with ev.measure_cost(self.device, denoiser) as cost:
            self.reference = ev.reference_samples(denoiser, self.noise, batch_size=args.batch_size)
        self.reference_metrics = {**self.metrics(self.reference), "sample_seconds": cost.seconds}
        self.grids = {"200-step reference": self.reference[:GRID_SAMPLES].cpu()}

    def metrics(self, samples) -> dict:
        out = {k: ev.frechet_distance(ev.feature_statistics(ev.extract_features(f, samples, self.args.batch_size)),
                                      self.test_stats[k]) for k, f in self.feature_nets.items()}
        out["rmse"] = ev.endpoint_rmse(samples, self.reference)
        return out

    def run_row(self, row: Row, nfes, denoiser=None) -> None:
        denoiser = denoiser or self.denoiser
        for nfe in nfes:
            if row.group != "diffusers" and nfe not in row.tables:
                continue
            try:
                with ev.measure_cost(self.device, denoiser) as cost:
                    if row.group == "diffusers":
                        scheduler = peers.diffusers_scheduler(row.name, self.base_config)
                        samples = peers.sample_diffusers(denoiser.model, scheduler, self.noise, nfe, self.args.batch_size)
                        row.tables[nfe] = [float(s) for s in getattr(scheduler, "sigmas", [])]
                    else:
                        samples = ev.generate(denoiser, self.noise, row.tables[nfe], row.solver, self.args.batch_size)
                result = {**self.metrics(samples), "sample_seconds": cost.seconds}
                if nfe in row.learn_seconds:
                    result["learn_seconds"] = row.learn_seconds[nfe]
                if nfe == GRID_NFE:
                    self.grids[row.label] = samples[:GRID_SAMPLES].cpu()
            except Exception as err:  # record the failure and keep going, as the peer script does
                result = {"error": repr(err)[:300]}
            row.results[nfe] = result
            shown = " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
            print(f"{row.name:<22} NFE {nfe:>2}: {shown or result}", flush=True)


def build_rows(harness: Harness, args) -> List[Row]:
    """All rows in table order; GITS/AYS tables are learned here, timed."""
    nfes = list(args.nfes)
    wanted = (lambda name: True) if not args.rows else (lambda name: name in args.rows)
    rows = [Row(name, peers.DIFFUSERS_PEER_LABELS[name], "diffusers") for name in peers.DIFFUSERS_PEERS if wanted(name)]
    needed = {opt for name, (opt, _, _) in peers.OPTIMISER_PEERS.items() if wanted(name)}
    learned = peers.learn_peer_tables(harness.denoiser, nfes, device=harness.device, num_samples=args.peer_samples,
                                      batch_size=args.batch_size, optimisers=sorted(needed)) if needed else {}
    for name, (opt, solver, label) in peers.OPTIMISER_PEERS.items():
        if wanted(name):
            tables, seconds = learned[opt]
            rows.append(Row(name, label, "optimiser", solver, tables, {n: seconds for n in nfes},
                            note=f"all NFEs learned together in {seconds:.1f}s"))
    if wanted("sigma_ddim_trailing"):
        schedule = harness.denoiser.schedule
        rows.append(Row("sigma_ddim_trailing", "check: our σ-space DDIM on the trailing table", "check", "euler",
                        {n: baseline_sigmas("ddim_trailing", n, schedule).tolist() for n in nfes}))
    return rows


# --- reporting ------------------------------------------------------------------------------------------------
def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def _cell(result: Optional[dict]) -> str:
    if not result:
        return "–"
    if "error" in result:
        return "error"
    return f"{result['fd_fmnist']:.2f} ({result['rmse']:.3f})"


def best_rows(rows: List[Row], nfe: int, groups) -> Optional[Row]:
    scored = [r for r in rows if r.group in groups and "fd_fmnist" in r.results.get(nfe, {})]
    return min(scored, key=lambda r: r.results[nfe]["fd_fmnist"], default=None)


def summary(rows: List[Row], nfes, reference_fd: float) -> List[dict]:
    """Per NFE: our best row against the best peer row (diffusers + re-implemented optimisers)."""
    out = []
    for nfe in nfes:
        ours, peer = best_rows(rows, nfe, ("ours", "tuned")), best_rows(rows, nfe, ("diffusers", "optimiser"))
        if ours is None or peer is None:
            continue
        fd_ours, fd_peer = ours.results[nfe]["fd_fmnist"], peer.results[nfe]["fd_fmnist"]
        out.append({"nfe": nfe, "ours": ours.name, "fd_ours": fd_ours, "peer": peer.name, "fd_peer": fd_peer,
                    "ratio": fd_ours / fd_peer, "ours_over_reference": fd_ours / reference_fd,
                    "learn_seconds": ours.results[nfe].get("learn_seconds")})
    return out


def markdown_tables(rows: List[Row], nfes, reference: dict, best: List[dict]) -> str:
    lines = [f"FD-FMNIST (endpoint RMSE vs the 200-step reference); 200-step reference FD = "
             f"{reference['fd_fmnist']:.3f}. Lower is better.", "",
             "| row | solver | " + " | ".join(str(n) for n in nfes) + " | time to learn the table |",
             "|---|---|" + "---|" * len(nfes) + "---|"]
    for r in rows:
        learn = "none (hand-made)" if r.group in ("diffusers", "check") else _learn_text(r)
        lines.append(f"| {r.label} | {SOLVER_LABELS.get(r.solver, r.solver or 'diffusers')} | "
                     + " | ".join(_cell(r.results.get(n)) for n in nfes) + f" | {learn} |")
    if best:
        lines += ["", "| NFE | our best row | FD | best peer row | FD | ratio ours/peer | ours / 200-step FD |",
                  "|---|---|---|---|---|---|---|"]
        for b in best:
            lines.append(f"| {b['nfe']} | {b['ours']} | {b['fd_ours']:.3f} | {b['peer']} | {b['fd_peer']:.3f} | "
                         f"{b['ratio']:.2f} | {b['ours_over_reference']:.2f} |")
    return "\n".join(lines)


def _learn_text(row: Row) -> str:
    if not row.learn_seconds:
        return "?"
    if row.group == "optimiser":
        return f"{next(iter(row.learn_seconds.values())):.1f} s (all NFEs)"
    values = list(row.learn_seconds.values())
    return f"{min(values):.1f}–{max(values):.1f} s per NFE" if len(values) > 1 else f"{values[0]:.1f} s"


def plot_figures(rows: List[Row], nfes, reference: dict, grids: dict, schedule, figures_dir: str) -> Dict[str, str]:
    """FD vs NFE (log), σ tables at 4 and 6 NFE, sample grids at 4 NFE; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(figures_dir, exist_ok=True)
    paths = {}
    # 1. FD vs NFE
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"diffusers": ":", "optimiser": "--", "ours": "-", "tuned": "-", "check": (0, (1, 3))}
    for r in rows:
        xs = [n for n in nfes if "fd_fmnist" in r.results.get(n, {})]
        if xs:
            ax.plot(xs, [r.results[n]["fd_fmnist"] for n in xs], marker="o", ms=3, ls=styles[r.group],
                    lw=2.2 if r.group in ("ours", "tuned") else 1.2, label=r.label)
    ax.axhline(reference["fd_fmnist"], color="k", lw=0.8, label="200-step reference")
    ax.set(xscale="log", yscale="log", xlabel="NFE (model evaluations)", ylabel="FD-FMNIST", xticks=nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    paths["fd_vs_nfe"] = _save(fig, figures_dir, "fd_vs_nfe.png")
    # 2. σ tables
    show = [n for n in (4, 6) if n in nfes] or nfes[:1]
    fig, axes = plt.subplots(1, len(show), figsize=(6 * len(show), 4.5), squeeze=False)
    for ax, nfe in zip(axes[0], show):
        for name in ("ddim_trailing", "ddim_leading", "karras", "loguniform"):
            table = baseline_sigmas(name, nfe, schedule)[:-1].tolist()
            ax.plot(range(len(table)), table, ls=":", marker=".", label=f"{name} (hand-made)")
        for r in rows:
            shown = r.group in ("ours", "tuned") or (r.group == "optimiser" and not r.name.endswith("_euler"))
            if shown and nfe in r.tables:
                table = [s for s in r.tables[nfe] if s > 0]
                ax.plot(range(len(table)), table, marker="o", ms=3, lw=2 if r.group != "optimiser" else 1.2,
                        ls="-" if r.group != "optimiser" else "--", label=r.label)
        ax.set(yscale="log", xlabel="step i", ylabel="σ_i (final 0 not shown)", title=f"σ tables, NFE {nfe}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    paths["sigma_tables"] = _save(fig, figures_dir, "sigma_tables.png")
    # 3. sample grids
    if grids:
        fig, axes = plt.subplots(len(grids), 1, figsize=(GRID_SAMPLES * 0.55, len(grids) * 0.75), squeeze=False)
        for ax, (label, images) in zip(axes[:, 0], grids.items()):
            strip = torch.cat(list(images[:, 0]), dim=1).numpy()
            ax.imshow(strip, cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        paths["grids"] = _save(fig, figures_dir, f"samples_{GRID_NFE}_steps.png")
    return paths


def _save(fig, folder, name) -> str:
    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def results_page(record: dict, tables_md: str, figure_names: Dict[str, str]) -> str:
    """docs/results.md: how it was made, the tables, the figures and the σ tables of the optimisers."""
    learned = [r for r in record["rows"] if r["group"] in ("ours", "tuned")]
    lines = ["# Results: the side-by-side benchmark", "",
             "Generated by `diffusers-fewstep benchmark` (src/diffusers_fewstep/benchmark.py); do not edit by hand.", "",
             f"- command: `{record['command']}`",
             f"- device: {record['device']}", f"- date: {record['date']}",
             f"- model: `{os.path.relpath(record['model']) if os.path.isabs(record['model']) else record['model']}`; "
             f"{record['n']} samples per row from one noise bank (seed {ev.NOISE_SEED}, drawn on the device); "
             "UNet under bf16 autocast for every row; samples clamped to [-1, 1]",
             f"- wall time of the measurement: {record['seconds']:.0f} s",
             "- FD-FMNIST: Fréchet distance of 256-d classifier features against the 10,000 Fashion-MNIST test images; "
             "endpoint RMSE: per-sample RMSE against a 200-step DPM-Solver++(2M) solution from the same noise, "
             "averaged over samples."]
    if record.get("inception_note"):
        lines.append(f"- standard Inception FID: {record['inception_note']}")
    for r in learned:
        if r.get("note"):
            lines.append(f"- {r['label']}: tables from {r['note']}")
    for cmd in sorted({c for c in record.get("learn_commands", []) if c}):
        lines.append(f"- tables learned with: `{cmd}`")
    lines += ["", "Row groups: diffusers 0.42 schedulers driven exactly as BENCHMARK.md's peer script; "
              "published schedule optimisers **re-implemented by us** from their papers (GITS: Chen et al. 2024; "
              "AYS: Sabour et al. 2024 — see `src/diffusers_fewstep/peers.py` for what differs) with the solver "
              "each is paired with; our learned tables (Phase 1, trajectory objective, learned on noise seed "
              "independent of the evaluation bank); when selected, a check row running our σ-space DDIM on "
              "diffusers' trailing table. Learning times: GITS/AYS, one run for all NFEs (teacher "
              "trajectories included); ours, per NFE, that table's own optimisation loop plus the reference "
              "solves of the training noise (shared by all NFEs of one `optimize_schedule` call).", "", tables_md, ""]
    for key, title in (("fd_vs_nfe", "FD vs NFE (log scale)"), ("sigma_tables", "Learned σ tables against the baselines"),
                       ("grids", f"Samples at {GRID_NFE} steps (same noise in every row)")):
        if key in figure_names:
            lines += [f"## {title}", "", f"![{title}](figures/{os.path.basename(figure_names[key])})", ""]
    return "\n".join(lines) + "\n"


def write_outputs(record: dict, rows: List[Row], harness: Harness, args) -> None:
    nfes = list(args.nfes)
    tables_md = markdown_tables(rows, nfes, harness.reference_metrics, record["summary"])
    print(tables_md, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(tables_md + "\n")
    if args.docs_dir:
        figures = plot_figures(rows, nfes, harness.reference_metrics, harness.grids, harness.denoiser.schedule,
                               os.path.join(args.docs_dir, "figures"))
        with open(os.path.join(args.docs_dir, "results.md"), "w") as f:
            f.write(results_page(record, tables_md, figures))


def command_line() -> str:
    """The command that started this process, as a user would type it."""
    argv = [shlex.quote(a) for a in sys.argv]
    if len(argv) > 1 and argv[1] == "benchmark":
        return "diffusers-fewstep benchmark " + " ".join(argv[2:])
    if argv and argv[0].endswith("run_benchmark.py"):
        return "python benchmarks/run_benchmark.py " + " ".join(argv[1:])
    return " ".join(argv)


# --- entry point ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from .adapter import SigmaDenoiser
    from .hub import load_model_and_scheduler_config

    command = command_line()
    torch.backends.cuda.matmul.allow_tf32 = False
    model, base_config = load_model_and_scheduler_config(args.model)
    denoiser = SigmaDenoiser(model.to(args.device).eval(), base_config)
    if args.learn or args.learn_only:
        learn_tables(denoiser, args, command, base_config)
        if args.learn_only:
            return 0
    start = time.perf_counter()
    harness = Harness(denoiser, base_config, args)
    print(f"reference FD {harness.reference_metrics['fd_fmnist']:.3f} "
          f"({harness.reference_metrics['sample_seconds']:.0f}s)", flush=True)
    rows = build_rows(harness, args)
    for row in rows:
        harness.run_row(row, args.nfes)
    # our rows last, so that learners sharing the GPU (--wait-for-tables) can finish meanwhile
    wait_for_learners(args.tables_dir, args.wait_for_tables)
    ours = [r for r in load_learned_rows(args.tables_dir, list(args.nfes)) if not args.rows or r.name in args.rows]
    for row in ours:
        harness.run_row(row, args.nfes)
    rows += ours
    tuned_denoiser, tuned_row = load_tuned(args, list(args.nfes))
    if tuned_row is not None:
        harness.run_row(tuned_row, args.nfes, tuned_denoiser)
        rows.append(tuned_row)
    record = {"command": command, "device": device_name(args.device), "date": now(), "model": args.model,
              "n": args.n, "nfes": list(args.nfes), "reference": harness.reference_metrics,
              "inception_note": None if "fid_inception" in harness.feature_nets else
              "skipped (weights not available locally; pass --inception where they are)",
              "learn_commands": [c for r in ours for c in r.commands], "seconds": time.perf_counter() - start,
              "rows": [r.to_dict() for r in rows]}
    record["summary"] = summary(rows, list(args.nfes), harness.reference_metrics["fd_fmnist"])
    write_outputs(record, rows, harness, args)
    return 0
