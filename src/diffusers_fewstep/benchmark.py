"""`diffusers-fewstep benchmark`: every sampler side by side, in one run, on one noise bank (BENCHMARK.md).

Rows: diffusers' own schedulers for the model's family (:data:`~diffusers_fewstep.schedules.STOCK_SCHEDULERS`,
driven as BENCHMARK.md's peer script drives them), the published schedule optimisers we re-implemented
(:mod:`peers`: GITS, AYS), and our folders (`--learned`): each is what `diffusers-fewstep optimize` (or
`train`) wrote, sampled through the same stock loop with its `LearnedScheduleScheduler` (and, for a Phase-2
folder holding a tuned `unet/`, with the tuned model). Every row gets FD-FMNIST, endpoint RMSE against the
200-step reference and the time it took to learn its tables.

    diffusers-fewstep optimize --nfe 3 4 5 6 8 10 --output-dir outputs/fmnist
    diffusers-fewstep benchmark --learned outputs/fmnist --n 5000 --classifier CLASSIFIER_DIR --data FMNIST_DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import evaluation as ev
from . import peers
from .schedules import STOCK_SCHEDULERS, baseline_sigmas, diffusers_scheduler, stock_sigmas

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
    solvers: Dict[int, str] = field(default_factory=dict)
    folder: Optional[str] = None  # ours: the folder `optimize`/`train` wrote

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "group": self.group, "solver": self.solver, "note": self.note,
                "solvers": {str(k): v for k, v in self.solvers.items()},
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
    parser.add_argument("--out-dir", default="benchmarks/results", help="where results JSON and markdown go")
    parser.add_argument("--docs-dir", default=None, help="write results.md and figures/ here (e.g. docs)")
    parser.add_argument("--peer-samples", type=int, default=256, help="teacher samples for GITS and AYS")
    parser.add_argument("--inception", action="store_true",
                        help="also compute Inception FID when torchmetrics and its weights are available locally")
    parser.add_argument("--learned", nargs="+", default=[],
                        help="folders written by `diffusers-fewstep optimize` or `train` (scheduler/, and unet/ after Phase 2)")


# --- our rows ---------------------------------------------------------------------------------------------
def learned_row(folder: str, nfes) -> Row:
    """A row for a folder of ours: its scheduler's tables and solvers, the time each table took to learn (its own
    selection and learning plus the reference solves shared by the run), and whether it holds a tuned model."""
    from .hub import load_json

    config = load_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    if not config.get("sigma_tables"):
        raise ValueError(f"{folder}/scheduler/scheduler_config.json holds no sigma_tables; pass a folder that "
                         "`diffusers-fewstep optimize` or `train` wrote")
    tuned = any(os.path.isdir(os.path.join(folder, sub)) for sub in ("unet", "transformer"))
    name = os.path.basename(os.path.normpath(folder))
    per_nfe = (config.get("provenance") or {}).get("per_nfe", {})
    log_file = os.path.join(folder, "optimize_log.json")
    shared = load_json(log_file).get("shared", {}).get("seconds", 0.0) if os.path.isfile(log_file) else 0.0
    row = Row(f"{'tuned' if tuned else 'learned'}:{name}", f"ours: {name}" + (" (tuned model)" if tuned else ""),
              "tuned" if tuned else "ours", config.get("solver"), note=folder)
    for key, table in config["sigma_tables"].items():
        if int(key) in nfes:
            row.tables[int(key)] = table
            row.solvers[int(key)] = (config.get("solvers") or {}).get(key, config.get("solver"))
            if "seconds" in per_nfe.get(key, {}):
                row.learn_seconds[int(key)] = per_nfe[key]["seconds"] + shared
    row.folder = folder
    return row


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
        self.test_stats = {"fd_fmnist": ev.reference_statistics(net, args.data, self.device, args.batch_size)}
        if "fid_inception" in self.feature_nets:
            test = ev.fmnist_images(args.data, "test").to(self.device)
            self.test_stats["fid_inception"] = ev.feature_statistics(
                ev.extract_features(self.feature_nets["fid_inception"], test, args.batch_size))
        self.noise = ev.noise_bank(args.n, ev.sample_shape(denoiser), device=self.device)
        with ev.measure_cost(self.device, denoiser) as cost:
            self.reference = ev.reference_samples(denoiser, self.noise, batch_size=args.batch_size)
        self.reference_metrics = {**self.metrics(self.reference), "sample_seconds": cost.seconds}
        self.grids = {"200-step reference": self.reference[:GRID_SAMPLES].cpu()}

    def metrics(self, samples) -> dict:
        out = {k: ev.frechet_distance(ev.feature_statistics(ev.extract_features(f, samples, self.args.batch_size)),
                                      self.test_stats[k]) for k, f in self.feature_nets.items()}
        out["rmse"] = ev.endpoint_rmse(samples, self.reference)
        return out

    def samples(self, row: Row, nfe: int, model) -> torch.Tensor:
        """The row's samples at `nfe` steps: diffusers' schedulers and our folders through the stock loop, the
        re-implemented optimisers (and the check row) through our σ-space solvers."""
        from .scheduler import LearnedScheduleScheduler

        if row.group == "diffusers":
            scheduler = diffusers_scheduler(row.name, self.base_config)
            row.tables[nfe] = stock_sigmas(row.name, nfe, self.base_config)
        elif row.folder is not None:
            scheduler = LearnedScheduleScheduler.from_pretrained(row.folder, subfolder="scheduler")
        else:
            return ev.generate(self.denoiser, self.noise, row.tables[nfe], row.solver, self.args.batch_size)
        return peers.sample_diffusers(model, scheduler, self.noise, nfe, self.args.batch_size)

    def run_row(self, row: Row, nfes) -> None:
        model = self.denoiser.model
        if row.group == "tuned":
            from .hub import load_model_and_scheduler_config

            model = load_model_and_scheduler_config(row.folder)[0].to(self.device).eval()
        for nfe in nfes:
            if row.group != "diffusers" and nfe not in row.tables:
                continue
            try:
                with ev.measure_cost(self.device) as cost:
                    samples = self.samples(row, nfe, model)
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
    family = harness.denoiser.schedule.family
    rows = [Row(name, stock.label, "diffusers") for name, stock in STOCK_SCHEDULERS[family].items() if wanted(name)]
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
    from .hub import portable_model_ref

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
            lines.append(f"- {r['label']}: tables from `{portable_model_ref(r['note'])}`")
    lines += ["", "Row groups: diffusers 0.42 schedulers driven exactly as BENCHMARK.md's peer script; "
              "published schedule optimisers **re-implemented by us** from their papers (GITS: Chen et al. 2024; "
              "AYS: Sabour et al. 2024 — see `src/diffusers_fewstep/peers.py` for what differs) with the solver "
              "each is paired with; our folders (what `diffusers-fewstep optimize` or `train` wrote, sampled through "
              "the stock loop with their `LearnedScheduleScheduler`; their noises are independent of the evaluation "
              "bank); when selected, a check row running our σ-space DDIM on diffusers' trailing table. Learning "
              "times: GITS/AYS, one run for all NFEs (teacher trajectories included); ours, per NFE, that table's own "
              "scoring and learning plus the reference solves shared by the run.", "", tables_md, ""]
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
    from .hub import load_model_and_scheduler_config, portable_model_ref

    command = command_line()
    torch.backends.cuda.matmul.allow_tf32 = False
    model, base_config = load_model_and_scheduler_config(args.model)
    denoiser = SigmaDenoiser(model.to(args.device).eval(), base_config)
    start = time.perf_counter()
    harness = Harness(denoiser, base_config, args)
    print(f"reference FD {harness.reference_metrics['fd_fmnist']:.3f} "
          f"({harness.reference_metrics['sample_seconds']:.0f}s)", flush=True)
    rows = build_rows(harness, args) + [learned_row(folder, list(args.nfes)) for folder in args.learned]
    for row in rows:
        harness.run_row(row, args.nfes)
    record = {"command": command, "device": device_name(args.device), "date": now(), "model": portable_model_ref(args.model),
              "n": args.n, "nfes": list(args.nfes), "reference": harness.reference_metrics,
              "inception_note": None if "fid_inception" in harness.feature_nets else
              "skipped (weights not available locally; pass --inception where they are)",
              "seconds": time.perf_counter() - start, "rows": [r.to_dict() for r in rows]}
    record["summary"] = summary(rows, list(args.nfes), harness.reference_metrics["fd_fmnist"])
    write_outputs(record, rows, harness, args)
    return 0
