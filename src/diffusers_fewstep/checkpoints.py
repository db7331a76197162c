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

The functions at the end apply these in `train.py`'s loop, the same on every process: :func:`step_outcome`
(loss and signal, reduced over processes), :func:`stop_if_diverged`, :func:`save_or_stop`,
:func:`save_after_error`, and :func:`set_learning_rate` for a resume with another learning rate.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from typing import List, Optional, Tuple

import torch

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
    """Rename every checkpoint after `step` to `diverged-checkpoint-{k}` (replacing one set aside by an earlier
    divergence of the same run); return the newest one left."""
    for d in checkpoints(output_dir):
        if int(d[len(PREFIX):]) > step:
            target = os.path.join(output_dir, DIVERGED_PREFIX + d)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(output_dir, d), target)
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


# --- the training loop's side (train.py): `args` are its options, `state` its TrainState ---------------
def set_learning_rate(accelerator, optimizer, lr_scheduler, lr: Optional[float]) -> float:
    """After a resume: a `--learning_rate` other than the checkpoint's replaces it (the schedule's factor kept); none
    given (`None`) keeps the checkpoint's. Returns the learning rate in force."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if lr is None or all(base == lr for base in scheduler.base_lrs):
        return scheduler.base_lrs[0]
    accelerator.print(f"--learning_rate {lr:g} replaces the checkpoint's {scheduler.base_lrs[0]:g}")
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = group["lr"] * lr / base
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return lr


def any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum") > 0)


def save_or_stop(accelerator, args, state, guard: StopSignals) -> None:
    """Save `checkpoint-{global_step}`; if a signal came meanwhile (to any process), stop here."""
    name = save_checkpoint(accelerator, args.output_dir, state.global_step, args.checkpoints_total_limit)
    guard.saved(name)
    if any_process(accelerator, guard.received is not None):
        raise TrainingStopped(guard.stop_message(name, state.global_step), 128 + (guard.received or 15))


def save_after_error(accelerator, args, state, guard: StopSignals, optimizer) -> None:
    """After an exception, save the last finished step if no checkpoint holds it. One process only: with
    several, the others may wait in a collective that never comes."""
    if not guard.has_unsaved:
        return
    if accelerator.num_processes > 1:
        accelerator.print(f"error after step {state.global_step}: no checkpoint saved (several processes); "
                          f"continue from {guard.last_saved} with --resume_from_checkpoint latest")
        return
    accelerator.step = state.global_step * args.gradient_accumulation_steps  # drop a half-accumulated step
    optimizer.zero_grad()
    try:
        name = save_checkpoint(accelerator, args.output_dir, state.global_step, args.checkpoints_total_limit)
    except Exception as err:  # the error may be the disk itself; the original error is raised next
        accelerator.print(f"error after step {state.global_step}, and saving a checkpoint failed too: {err!r}")
        return
    accelerator.print(f"error after step {state.global_step}: saved {name}; fix the cause and continue with "
                      "--resume_from_checkpoint latest")


def stop_if_diverged(accelerator, args, state, nfe: int, loss: float) -> None:
    """Stop Phase 2 if its loss diverged (:class:`DivergenceMonitor`), keeping the last good checkpoint."""
    monitor = DivergenceMonitor(args.divergence_factor, args.divergence_patience, state=state.divergence)
    reason = monitor.update(nfe, loss, state.global_step)
    if reason is None:
        return
    if accelerator.is_main_process:
        keep_checkpoints_before(args.output_dir, monitor.good_weights_step(state.global_step))
    accelerator.wait_for_everyone()
    left = checkpoints(args.output_dir)
    advice = f"lower --learning_rate (now {args.learning_rate:g})"
    then = (f"kept {left[-1]} (later ones renamed diverged-checkpoint-*); {advice} and continue with "
            "--resume_from_checkpoint latest") if left else f"no checkpoint from before it is left; {advice} and start again"
    raise TrainingStopped(f"Phase 2 diverged at step {state.global_step} ({nfe} steps, round {state.round}): "
                          f"{reason}; {then}")


def step_outcome(accelerator, loss: torch.Tensor, guard: StopSignals) -> Tuple[float, bool]:
    """The step's loss averaged over processes, and whether any process received a stop signal."""
    both = torch.stack([loss.float(), loss.new_tensor(float(guard.received is not None))])
    if accelerator.num_processes > 1:
        both = accelerator.reduce(both, "mean")
    return float(both[0]), bool(both[1] > 0)
