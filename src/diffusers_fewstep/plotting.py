"""Plots of σ tables (learned against hand-made), for `optimize`, the benchmark and model cards."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

BASELINES = {"Karras ρ=7": "karras", "uniform t": "time_linspace", "logSNR (uniform log σ)": "loguniform",
             "DDIM trailing": "ddim_trailing"}


def _axes_plot(ax, tables: Mapping[str, Sequence[float]], title: Optional[str] = None):
    """Draw each table's positive σ's against the step index on a log σ axis."""
    for k, (label, table) in enumerate(tables.items()):
        values = [float(s) for s in table]
        positive = [(i, s) for i, s in enumerate(values) if s > 0]
        learned = "learned" in label.lower()
        ax.plot([i for i, _ in positive], [s for _, s in positive], marker="o" if learned else ".",
                linewidth=2.2 if learned else 1.0, linestyle="-" if learned else "--", label=label,
                zorder=3 if learned else 2)
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step i (model evaluation)")
    ax.set_ylabel("σ_i")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)


def plot_sigma_tables(tables: Mapping[str, Sequence[float]], path: str, title: Optional[str] = None) -> str:
    """Plot `{label: [σ_0, …, σ_N]}` on one log-scale axis and save it to `path` (PNG, …).

    Labels containing "learned" are drawn bold. A final σ = 0 is left out (log axis).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    _axes_plot(ax, tables, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_schedule_comparison(learned: Mapping[int, Sequence[float]], schedule, path: str,
                             title: Optional[str] = None) -> str:
    """One panel per NFE: the learned table against Karras, uniform-t, logSNR and DDIM-trailing tables
    of the same model (`schedule`, a :class:`~diffusers_fewstep.NoiseSchedule`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .schedules import baseline_sigmas

    nfes = sorted(int(n) for n in learned)
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.5 * len(nfes), 4), squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        tables: Dict[str, Sequence[float]] = {f"learned ({nfe} steps)": learned.get(nfe, learned.get(str(nfe)))}
        tables.update({label: baseline_sigmas(name, nfe, schedule).tolist() for label, name in BASELINES.items()})
        _axes_plot(ax, tables, f"{title} · NFE {nfe}" if title else f"NFE {nfe}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(runs: Mapping[str, Sequence[Mapping]], path: str, title: Optional[str] = None) -> str:
    """Learning curves of training runs: FD (log scale, when measured) and endpoint RMSE at every tuned step count,
    against optimiser steps and against wall time. `runs` maps a label to its metrics rows (`metrics.json`'s
    `metrics`: `global_step`, `elapsed_s`, `fd_nfe<N>`, `rmse_nfe<N>`, and Phase 2's `rmse_pool_nfe<N>`, drawn dashed:
    the RMSE on the trajectories trained on); an empty label names only the step count."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    measures = [m for m in ("fd", "rmse") if any(k.startswith(f"{m}_nfe") for rows in runs.values() for r in rows
                                                  for k in r)]
    fig, axes = plt.subplots(len(measures), 2, figsize=(10, 3.6 * len(measures)), squeeze=False)
    for row, measure in zip(axes, measures):
        for label, rows in runs.items():
            keys = sorted({k for r in rows for k in r if k.startswith(f"{measure}_nfe")}, key=lambda k: int(k[len(measure) + 4:]))
            for key in keys:
                points = [r for r in rows if key in r]
                name = f"{key[len(measure) + 4:]} steps" + (f" · {label}" if label else "")
                pool = f"rmse_pool_{key[len(measure) + 1:]}"
                pooled = [r for r in points if pool in r] if measure == "rmse" else []
                for ax, x in zip(row, ("global_step", "elapsed_s")):
                    line, = ax.plot([p[x] for p in points], [p[key] for p in points], marker="o", markersize=3, label=name)
                    if pooled:  # the same RMSE on the trajectories trained on, dashed in the same colour
                        ax.plot([p[x] for p in pooled], [p[pool] for p in pooled], linestyle="--", marker=".",
                                color=line.get_color(), label=f"{name} (trained-on pool)")
        for ax, x in zip(row, ("optimiser steps", "wall time (s)")):
            ax.set_xlabel(x)
            ax.set_ylabel(measure.upper())
            ax.set_yscale("log" if measure == "fd" else "linear")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
