"""A train stage killed with SIGKILL after a checkpoint, and what its runs report: shared by the resume tests (CPU)
and bench/resume_check.py (the same on GPUs, DDP and FSDP)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

# What an interrupted-then-resumed run must report as the uninterrupted run does (metrics/train.json).
RUN_METRICS = ("steps", "epochs", "tokens", "labelled_tokens", "padding_fraction", "first_loss", "train_loss",
               "final_loss")
CURVES = ("loss", "learning_rate", "grad_norm")


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_train_after_checkpoint(command: list[str], cwd: Path, step: int, env: dict[str, str],
                                timeout_s: float = 300) -> None:
    """Start `command`, and once checkpoint-`step` is saved, SIGKILL the stages/train.py process and its workers.

    Its output goes to cwd/killed.log."""
    with (cwd / "killed.log").open("w") as log:
        parent = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout_s
    while not list(cwd.glob(f"models/checkpoints/*/checkpoint-{step}/trainer_state.json")):
        if parent.poll() is not None:
            raise AssertionError(f"{command} ended before checkpoint-{step}:\n{(cwd / 'killed.log').read_text()}")
        if time.monotonic() > deadline:
            kill_tree(parent)
            raise AssertionError(f"no checkpoint-{step} within {timeout_s} s:\n{(cwd / 'killed.log').read_text()}")
        time.sleep(0.02)
    time.sleep(0.1)
    train = [pid for pid in [parent.pid, *descendants(parent.pid)] if "stages/train.py" in cmdline(pid)][:1]
    if not train or parent.poll() is not None:
        kill_tree(parent)
        raise AssertionError("the run finished before it could be killed")
    for pid in [*train, *descendants(train[0])]:
        os.kill(pid, signal.SIGKILL)
    parent.wait()


def kill_tree(parent: subprocess.Popen) -> None:
    """SIGKILL a command and everything it started (the launcher and its workers hold GPUs)."""
    for pid in [*descendants(parent.pid), parent.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    parent.wait()


def curves(project: Path) -> dict[str, list[tuple[int, float]]]:
    """The dvclive curves of the last run (metrics/train_log)."""
    result = {}
    for name in CURVES:
        path = project / "metrics/train_log/plots/metrics/train" / f"{name}.tsv"
        with path.open(encoding="utf-8") as handle:
            result[name] = [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]
    return result


def resumed_from_step(project: Path) -> int:
    """A fact of the call, not of the result: it lives with the timing figures, out of `dvc metrics diff`."""
    return json.loads((project / "metrics/timing/train.json").read_text())["resumed_from_step"]
