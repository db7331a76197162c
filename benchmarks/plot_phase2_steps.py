"""Phase 2 across step counts and model families, from training logs: FD over the family's limit (its base model's
200-step FD) against the step count, before tuning (the base model on the same table) and after (the last evaluation).

    python benchmarks/plot_phase2_steps.py --limit flow=1.485 --run "flow=RUN3.log" --run "flow=RUN4.log" --out f.png

Every count a log evaluates (`fd_nfeN` in its rows) becomes a point of that family.
"""
import argparse
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot_phase2_curves import read_rows  # noqa: E402

FD_KEY = re.compile(r"^fd_nfe(\d+)$")


def points(rows: list) -> dict:
    """{step count: (FD of the first row, FD of the last row)} over the counts the rows evaluate."""
    counts = sorted({int(m.group(1)) for row in rows for m in map(FD_KEY.match, row) if m})
    scored = {n: [row[f"fd_nfe{n}"] for row in rows if f"fd_nfe{n}" in row] for n in counts}
    return {n: (fds[0], fds[-1]) for n, fds in scored.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="FAMILY=PATH (a training log or metrics.json); repeat")
    p.add_argument("--limit", action="append", required=True, help="FAMILY=FD, the base model's 200-step FD")
    p.add_argument("--out", required=True, help="the figure (PNG)")
    p.add_argument("--title", default="Phase 2: FD over the 200-step limit, before and after tuning")
    args = p.parse_args(argv)
    limits = {family: float(value) for family, _, value in (spec.partition("=") for spec in args.limit)}
    families: dict = {}
    for spec in args.run:
        family, _, path = spec.partition("=")
        if family not in limits:
            raise SystemExit(f"no --limit for family {family!r}")
        for n, point in points(read_rows(path)).items():
            if n in families.setdefault(family, {}):
                raise SystemExit(f"{family} at {n} steps given twice ({path})")
            families[family][n] = point
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, (family, by_count) in enumerate(families.items()):
        counts = sorted(by_count)
        color = f"C{k}"
        ax.plot(counts, [by_count[n][0] / limits[family] for n in counts], "--o", color=color, alpha=0.5,
                label=f"{family}, base model")
        ax.plot(counts, [by_count[n][1] / limits[family] for n in counts], "-o", color=color,
                label=f"{family}, tuned (limit {limits[family]:g})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="steps (model evaluations)", ylabel="FD / 200-step FD of the base model", yscale="log",
           title=args.title)
    ax.set_xticks(sorted({n for by_count in families.values() for n in by_count}))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    return {family: {n: (before / limits[family], after / limits[family]) for n, (before, after) in by_count.items()}
            for family, by_count in families.items()}


if __name__ == "__main__":
    print(main())
