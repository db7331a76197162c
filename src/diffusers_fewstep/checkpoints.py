"""Never lose a training run: `checkpoint-{step}` folders, a save when the run is killed, and a clean
stop with the last good checkpoint kept when the loss diverges.

- :func:`save_checkpoint` / :func:`resume`: `accelerator.save_state` / `load_state` in
  `OUTPUT/checkpoint-{step}` folders, `--checkpoints_total_limit`, `--resume_from_checkpoint latest`
  (diffusers' `train_unconditional.py` conventions).
- :class:`StopSignals`: SIGTERM or SIGINT while there is unsaved progress (Phase-2 steps since the
  last checkpoint) is deferred to the end of the step, which then saves a checkpoint and stops; while
  everything done is already on disk (Phase 1, building the teacher pool, the final evaluation) it
  stops at once. A second SIGINT stops at once without saving.
- :class:`DivergenceMonitor`: the Phase-2 loss has diverged when it is not finite, or when it stays
  above `factor` × its running level for `patience` consecutive steps (running level: an exponential
  moving average, per step count, of the losses that were not flagged).
- :func:`keep_checkpoints_before`: after a divergence, checkpoints saved after the last good step are
  renamed `diverged-checkpoint-{step}`, so `--resume_from_checkpoint latest` picks the good one.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from typing import List, Optional

PREFIX = "checkpoint-"
DIVERGED_PREFIX = "diverged-"


class TrainingStopped(RuntimeError):
    """The run stopped early for a reason stated in one line; `exit_code` is what the script exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# --- checkpoint folders ---------------------------------------------------------------------------
def checkpoints(output_dir: str) -> List[str]:
    """The `checkpoint-{step}` folder names in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    dirs = [d for d in os.listdir(output_dir) if d.startswith(PREFIX) and d[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda d: int(d[len(PREFIX):]))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int] = None) -> str:
    """`checkpoint-{step}` via `accelerator.save_state`, keeping at most `total_limit` checkpoints."""
    name = f"{PREFIX}{step}"
    if accelerator.is_main_process and total_limit is not None:
        existing = [d for d in checkpoints(output_dir) if d != name]
        for d in existing[: max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(os.path.join(output_dir, d))
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(output_dir, name))
    return name


def resume(accelerator, output_dir: str, checkpoint: Optional[str]) -> Optional[str]:
    """Load `checkpoint` (a folder, or 'latest' in `output_dir`); returns the folder or None."""
    if not checkpoint:
        return None
    path = checkpoint
    if path == "latest":
        found = checkpoints(output_dir)
        if not found:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
            return None
        path = os.path.join(output_dir, found[-1])
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(path)
    return path


def keep_checkpoints_before(output_dir: str, step: int) -> Optional[str]:
    """Rename every checkpoint after `step` to `diverged-checkpoint-{k}`; return the newest one left."""
    for d in checkpoints(output_dir):
        if int(d[len(PREFIX):]) > step:
            os.replace(os.path.join(output_dir, d), os.path.join(output_dir, DIVERGED_PREFIX + d))
    left = checkpoints(output_dir)
    return left[-1] if left else None


# --- signals ------------------------------------------------------------------------------------------
class StopSignals:
    """SIGTERM/SIGINT handlers for the training loop (a context manager; handlers restored on exit).

    `unsaved()` marks progress that no checkpoint holds (a Phase-2 step begins): a signal is then only
    recorded in `received`, and the loop saves and stops at the end of the step. `saved(name)` marks
    everything as on disk in checkpoint `name`: a signal then raises :class:`TrainingStopped` at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self.has_unsaved = False
        self.last_saved: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def unsaved(self) -> None:
        self.has_unsaved = True

    def saved(self, name: Optional[str]) -> None:
        self.has_unsaved, self.last_saved = False, name

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: out now, without saving
        self.received = signum
        if not self.has_unsaved:
            raise TrainingStopped(self.stop_message(), 128 + signum)

    def stop_message(self, saved: Optional[str] = None, step: Optional[int] = None) -> str:
        name = signal.Signals(self.received).name if self.received else "a signal to another process"
        if saved is not None:
            return (f"stopped by {name} after step {step}: saved {saved}; "
                    "continue with --resume_from_checkpoint latest")
        if self.last_saved is None:
            return f"stopped by {name} before the first checkpoint; nothing to resume: run the command again"
        return (f"stopped by {name}: nothing since {self.last_saved} was lost; "
                "continue with --resume_from_checkpoint latest")


# --- divergence ------------------------------------------------------------------------------------------
class DivergenceMonitor:
    """Flags a diverging loss; its state is a plain dict (kept in the checkpoint for exact resumes).

    A step is flagged when its loss is not finite or exceeds `factor` × the running level of its key
    (the step count it trained). The level is an exponential moving average (`decay`) of the key's
    unflagged losses, started by its first loss. The run has diverged at a non-finite loss, or after
    `patience` consecutive flagged steps. `factor=0` turns the level test off (non-finite still stops).
    """

    def __init__(self, factor: float = 10.0, patience: int = 5, decay: float = 0.9, state: Optional[dict] = None):
        self.factor, self.patience, self.decay = factor, patience, decay
        self.state = state if state is not None else {}
        self.state.setdefault("level", {})
        self.state.setdefault("streak", 0)
        self.state.setdefault("last_good_step", None)

    def update(self, key, loss: float, step: int) -> Optional[str]:
        """Record the loss of `step`; returns why the run diverged, or None."""
        level = self.state["level"]
        key = str(key)
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if key in level and self.factor and loss > self.factor * max(level[key], 1e-30):
            self.state["streak"] += 1
            if self.state["streak"] >= self.patience:
                return (f"loss {loss:.4g} stayed above {self.factor:g}× its running level {level[key]:.4g} "
                        f"for {self.state['streak']} steps")
            return None
        level[key] = loss if key not in level else self.decay * level[key] + (1 - self.decay) * loss
        self.state["streak"], self.state["last_good_step"] = 0, step
        return None

    def good_weights_step(self, step: int) -> int:
        """The newest step whose weights gave an unflagged loss: the loss of step s is computed on
        the weights after step s − 1."""
        last = self.state["last_good_step"]
        return max(0, (last if last is not None else step) - 1)
