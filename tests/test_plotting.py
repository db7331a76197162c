"""plotting.plot_training_curves: FD and RMSE against steps and wall time, one line per run and step count."""
import matplotlib
import pytest

matplotlib.use("Agg")

from diffusers_fewstep.plotting import plot_training_curves  # noqa: E402


def test_training_curves_draw_every_run_and_count_against_steps_and_time(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    runs = {"lr 2e-5": [{"global_step": 0, "elapsed_s": 20.0, "fd_nfe2": 7.3, "rmse_nfe2": 0.40},
                        {"global_step": 500, "elapsed_s": 245.0, "fd_nfe2": 6.2, "rmse_nfe2": 0.28, "rmse_pool_nfe2": 0.27},
                        {"global_step": 1000, "elapsed_s": 329.0, "fd_nfe2": 4.0, "rmse_nfe2": 0.24, "rmse_pool_nfe2": 0.2}],
            "lr 5e-5": [{"global_step": 0, "elapsed_s": 21.0, "rmse_nfe2": 0.40, "rmse_nfe4": 0.25},
                        {"global_step": 200, "elapsed_s": 234.0, "rmse_nfe2": 0.30, "rmse_nfe4": 0.20}]}
    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))
    path = plot_training_curves(runs, str(tmp_path / "curves.png"), title="t")
    assert (tmp_path / "curves.png").stat().st_size > 5000 and path.endswith("curves.png")
    axes = saved["fig"].axes
    assert len(axes) == 4  # FD and RMSE rows × (steps, wall time)
    fd_steps, fd_time, rmse_steps, rmse_time = axes
    assert fd_steps.get_yscale() == "log" and rmse_steps.get_yscale() == "linear"
    assert [line.get_label() for line in fd_steps.lines] == ["2 steps · lr 2e-5"]  # the other run measured no FD
    assert [line.get_label() for line in rmse_steps.lines] == [
        "2 steps · lr 2e-5", "2 steps · lr 2e-5 (trained-on pool)", "2 steps · lr 5e-5", "4 steps · lr 5e-5"]
    pool = rmse_steps.lines[1]  # dashed, in its run's colour, only where measured
    assert pool.get_linestyle() == "--" and pool.get_color() == rmse_steps.lines[0].get_color()
    assert list(pool.get_xdata()) == [500, 1000] and list(pool.get_ydata()) == [0.27, 0.2]
    assert list(fd_steps.lines[0].get_xdata()) == [0, 500, 1000]
    assert list(fd_time.lines[0].get_xdata()) == [20.0, 245.0, 329.0]
    assert list(rmse_time.lines[3].get_ydata()) == [0.25, 0.20]


def test_the_log_script_reads_the_evaluation_rows(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from plot_phase2_curves import main, read_rows

    log = tmp_path / "run.log"
    log.write_text("2026-11-23 15:34:23,608 INFO diffusers_fewstep.train: round 0 phase 1: 0.0 s, tables {'2': [1.0]}\n"
                   "2026-11-23 15:34:25,003 INFO diffusers_fewstep.train: round 0 phase1: {'round': 0, 'phase': 'phase1', "
                   "'global_step': 0, 'elapsed_s': 20.8, 'rmse_nfe2': 0.39807, 'fd_nfe2': 7.2886}\n"
                   "other line\n"
                   "2026-11-23 15:38:08,945 INFO diffusers_fewstep.train: round 0 phase2: {'round': 0, 'phase': 'phase2', "
                   "'global_step': 500, 'elapsed_s': 245.0, 'pool_s': 140.2, 'samples_per_s': 1530.0, "
                   "'rmse_nfe2': 0.27881, 'fd_nfe2': 6.2477}\n")
    rows = read_rows(str(log))
    assert [(r["global_step"], r["fd_nfe2"]) for r in rows] == [(0, 7.2886), (500, 6.2477)]
    out = main(["--run", f"a=b={log}", "--out", str(tmp_path / "c.png")])  # the label may hold '='
    assert out.endswith("c.png") and os.path.getsize(out) > 5000
    with pytest.raises(SystemExit, match="given twice"):  # one label for two runs would draw only the last
        main(["--run", f"x={log}", "--run", f"x={log}", "--out", str(tmp_path / "d.png")])


def test_the_step_count_script_reads_before_and_after_per_count(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from plot_phase2_steps import main

    def log(name, rows):
        path = tmp_path / name
        path.write_text("".join(f"x INFO diffusers_fewstep.train: round 0 phase2: {row}\n" for row in rows))
        return str(path)

    two = log("two.log", [{"global_step": 0, "fd_nfe2": 8.0}, {"global_step": 9, "fd_nfe2": 3.0},
                          {"global_step": 18, "fd_nfe2": 2.0}])
    both = log("both.log", [{"global_step": 0, "fd_nfe3": 6.0, "fd_nfe6": 1.5}, {"global_step": 9, "fd_nfe3": 1.2, "fd_nfe6": 2.5}])
    out = tmp_path / "s.png"
    ratios = main(["--limit", "m=0.5", "--run", f"m={two}", "--run", f"m={both}", "--out", str(out)])
    assert ratios == {"m": {2: (16.0, 4.0), 3: (12.0, 2.4), 6: (3.0, 5.0)}}  # first and last row over the limit
    assert os.path.getsize(out) > 5000
    with pytest.raises(SystemExit, match="m at 2 steps given twice"):
        main(["--limit", "m=0.5", "--run", f"m={two}", "--run", f"m={two}", "--out", str(out)])
    with pytest.raises(SystemExit, match="no --limit for family 'n'"):
        main(["--limit", "m=0.5", "--run", f"n={two}", "--out", str(out)])
