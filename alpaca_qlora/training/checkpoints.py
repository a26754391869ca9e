"""Checkpoints of an interrupted run: one trainer at a time, only sound ones resumed, the run's history carried.

- Fingerprint: a run's checkpoints live under models/checkpoints/<fingerprint of params and data>/, so only a
  run with the same params and the same training data resumes from them; other runs' directories are removed.

- Lock: two trainers sharing a checkpoint directory (an orphan of a killed `dvc repro` and the next one) would
  resume from each other's half-written checkpoints. The stage holds an flock on the checkpoint root while it runs;
  the OS drops it when the holder exits, however it exits.
- Validation: a checkpoint damaged by a crash or a full disk would fail the Trainer's resume the same way on every
  rerun. Each one is checked cheaply first; a bad one is set aside and the previous one used.
- History: the Trainer's checkpoint carries the log (trainer_state.json) but not what this pipeline counts itself
  (tokens); `run_history.json` in each checkpoint carries those, so a resumed run reports the whole run.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alpaca_qlora import io
from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
LOCK_HANDED_TO_WORKERS = "ALPACA_QLORA_CHECKPOINT_LOCK"  # set by a launcher whose workers share its lock
HISTORY_FILE = "run_history.json"
SET_ASIDE_PREFIX = "damaged-"


class CheckpointsBusy(PipelineError):
    """Another training run holds the checkpoint directory."""


def run_fingerprint(params: dict[str, Any], data_sha256: str) -> str:
    payload = json.dumps({"params": params, "data": data_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def remove_stale_runs(checkpoint_root: Path, keep: Path | None = None) -> None:
    if not checkpoint_root.is_dir():
        return
    for run_dir in checkpoint_root.iterdir():
        if run_dir != keep and run_dir.is_dir():  # the root's lock file stays
            shutil.rmtree(run_dir, ignore_errors=True)


def lock_checkpoints(root: Path) -> IO[str] | None:
    """Take the checkpoint root's lock for this process; it holds until the returned file closes or we exit.

    The stage process (or the launcher, before it re-executes under accelerate) takes it exclusively. Workers of
    that launcher join it shared (an exclusive request would wait on their own launcher), so the lock stays held
    while any of them runs, even one orphaned by a killed launcher. Under an outside launcher (the README's
    multi-node recipe), global rank 0 takes it and the other ranks take none.
    """
    shared = os.environ.get(LOCK_HANDED_TO_WORKERS) == str(root.resolve())
    if "LOCAL_RANK" in os.environ and not shared and int(os.environ.get("RANK", 0)) != 0:
        return None
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CheckpointsBusy(busy_message(path)) from None
    if not shared:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
    return handle


def share_lock_with_workers(handle: IO[str] | None, root: Path) -> None:
    """Before os.execv into `accelerate launch`: keep the lock across the exec, shared so the workers can join."""
    if handle is None:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # not atomic: another run may win the lock in between
    except BlockingIOError:
        raise CheckpointsBusy(busy_message(root / LOCK_NAME)) from None
    os.set_inheritable(handle.fileno(), True)
    os.environ[LOCK_HANDED_TO_WORKERS] = str(root.resolve())


def busy_message(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        pid, host, started = int(holder["pid"]), holder.get("host", "?"), holder.get("started", "?")
    except (OSError, ValueError, KeyError, TypeError):
        pid, host, started = None, "?", "?"
    who = f"process {pid} on {host} (started {started})" if pid else "another process"
    advice = (f"Wait for it to finish, or stop it (`kill {pid}`) and rerun: training resumes from its last "
              "checkpoint.")
    if pid and host == socket.gethostname() and not pid_alive(pid):
        advice = (f"Process {pid} has exited, but workers it started still hold the lock: list them with "
                  f"`fuser -v {path}`, stop them, and rerun.")
    return (f"{path.parent} is in use by another training run: {who} holds {path}. Two trainers would write the "
            f"same checkpoints, so this one stops without touching them. {advice}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def checkpoint_problem(checkpoint: Path, world_size: int = 1) -> str | None:
    """Why the Trainer could not resume from `checkpoint` (None if it can), from cheap checks of every file it reads.

    JSON files must parse; safetensors must be complete (safetensors checks the header's offsets against the file
    size without reading the tensors); torch.save files must be complete zip archives (a truncated one loses its
    central directory). Corruption inside a complete archive is not detected.
    """
    step = checkpoint_step(checkpoint)
    for name in ("trainer_state.json", HISTORY_FILE):
        try:
            recorded = io.read_json(checkpoint / name)
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as error:
            return f"{name} is unreadable ({error})"
        recorded_step = recorded.get("global_step", recorded.get("step")) if isinstance(recorded, dict) else None
        if recorded_step != step:
            return f"{name} records step {recorded_step}, not {step}"
        if name == HISTORY_FILE and not isinstance(recorded.get("counters"), dict):
            return f"{name} has no counters"
    required = {
        "model weights": ["adapter_model.safetensors", "model.safetensors", "pytorch_model_fsdp*"],
        "optimizer state": ["optimizer.pt", "optimizer.bin", "optimizer_0"],
        "scheduler state": ["scheduler.pt"],
        "RNG state": ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)],
    }
    for what, patterns in required.items():
        found = [pattern for pattern in patterns if any(checkpoint.glob(pattern))]
        if what == "RNG state" and len(found) < len(patterns):
            return f"{what} is missing ({', '.join(sorted(set(patterns) - set(found)))})"
        if not found:
            return f"{what} is missing (none of {', '.join(patterns)})"
    for path in sorted(checkpoint.rglob("*")):
        problem = file_problem(path)
        if problem:
            return f"{path.relative_to(checkpoint)} {problem}"
    return None


def file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                return None
        except (SafetensorError, OSError) as error:
            return f"is damaged ({error})"
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            with zipfile.ZipFile(path):
                return None
        except (zipfile.BadZipFile, OSError) as error:
            return f"is not a complete torch.save archive ({error})"
    return None


def resumable_checkpoint(run_dir: Path, world_size: int = 1, *, is_main: bool = True) -> Path | None:
    """The newest checkpoint that passes `checkpoint_problem`; newer damaged ones are set aside (by process 0).

    Every process decides the same from the same files. Setting a damaged checkpoint aside (renamed, so the
    Trainer's rotation and a later rerun ignore it) keeps it for a look until the run finishes and its directory
    goes.
    """
    candidates = sorted((path for path in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                         if path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()),
                        key=checkpoint_step, reverse=True)
    for candidate in candidates:
        problem = checkpoint_problem(candidate, world_size)
        if problem is None:
            return candidate
        if is_main:
            aside = candidate.with_name(SET_ASIDE_PREFIX + candidate.name)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(candidate, aside)
            log.warning("checkpoint %s is damaged: %s. It is set aside as %s; resuming from the one before it.",
                        candidate, problem, aside.name)
    if candidates and is_main:
        log.warning("no usable checkpoint in %s: training starts over from step 0.", run_dir)
    return None


def carried_counters(checkpoint: Path | None) -> dict[str, int]:
    """The counters a checkpoint carries (empty for a fresh start)."""
    if checkpoint is None:
        return {}
    return {name: int(value) for name, value in io.read_json(checkpoint / HISTORY_FILE)["counters"].items()}


class HistoryCheckpointer(TrainerCallback):
    """Writes the run's counters into each checkpoint, and makes each checkpoint close a logging window.

    `counters` returns the whole run's counters so far; it is a collective in a distributed run, so every process
    calls it (the Trainer calls on_save on all of them) and process 0 writes. Logging at every checkpoint means a
    resumed run's loss windows (each log averages the steps since the previous one) are an uninterrupted run's.
    """

    def __init__(self, counters: Callable[[], dict[str, int]]):
        self.counters = counters

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        counters = self.counters()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            io.write_json(checkpoint / HISTORY_FILE, {"step": state.global_step, "counters": counters})


def logged_losses(log_history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of each training log, from the Trainer's log history (a resumed run's includes the checkpoint's)."""
    return [(int(entry["step"]), float(entry["loss"])) for entry in log_history if "loss" in entry]


def mean_step_loss(log_history: Sequence[dict[str, Any]]) -> float | None:
    """Mean loss per optimizer step over the whole run, from the log: each log averages the steps since the last.

    The Trainer's own `training_loss` covers only the steps of the current `train()` call, so after a resume it
    is not the run's. The last step always saves, and so logs (HistoryCheckpointer), so the log covers every step.
    """
    losses = logged_losses(log_history)
    if not losses:
        return None
    total, previous = 0.0, 0
    for step, loss in losses:
        total += loss * (step - previous)
        previous = step
    return total / previous
