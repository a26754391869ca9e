"""Running the project's commands in a test's scratch project: this interpreter's venv first on PATH, the checkout
on PYTHONPATH (unless `env` names another), quiet logs, and the output in the failure message."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import ROOT


def run(command: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "PYTHONPATH": str(ROOT), "ALPACA_QLORA_LOG_LEVEL": "WARNING", **env}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    """A local TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd)


def run_together(commands: list[tuple[list[str], Path, dict[str, str]]], at_once: int = 2,
                 **env: str) -> list[subprocess.CompletedProcess]:
    """(command, cwd, env) each, `at_once` at a time, unchecked; one torch thread each, so the processes share the
    cores rather than fight over them (most of a tiny pipeline's time is each stage's imports, on one core)."""
    def one(job: tuple[list[str], Path, dict[str, str]]) -> subprocess.CompletedProcess:
        command, cwd, own_env = job
        return run(command, cwd, check=False, OMP_NUM_THREADS="1", **{**env, **own_env})

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return list(pool.map(one, commands))
