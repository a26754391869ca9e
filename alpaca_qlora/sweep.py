"""A grid of experiments through DVC's queue, N at a time and one GPU each, then ranked by EM delta.

    python -m alpaca_qlora.sweep lora.r=8,16,32 train.learning_rate=1e-4,2e-4 [--jobs N] [--gpus 0,1]

DVC queues the grid itself (`dvc exp run --queue -S lora.r=8,16,32 ...`, one experiment per combination), and
`dvc queue start -j N` runs N at a time, but every worker it starts inherits the one environment of that command
(dvc/repo/experiments/queue/celery.py, `_spawn_worker`): no worker can be given its own CUDA_VISIBLE_DEVICES, so
all N experiments would train on GPU 0. This starts the same workers (`dvc exp queue-worker`, the command `dvc
queue start` runs) itself, one per GPU with that GPU in its environment, and waits for them. The queue stays DVC's:
`dvc queue status`, `dvc queue logs NAME` and `dvc exp show` list every experiment, failed ones as failed.

A queued experiment runs in a git clone under .dvc/tmp/exps/, so what it needs is made findable from there first:
the venv's `python` and `dvc` (PATH), this checkout's package (PYTHONPATH), the converted base model's cache and
the DVC remote (absolute paths; .dvc/config's remote is relative to the clone). The stages the grid does not
change (data and evaluate_base) run once here, before the queue, so each experiment restores them from the cache.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.report import delta_with_interval, format_p, format_value
from alpaca_qlora.evaluation.significance import CONFIDENCE
from alpaca_qlora.stage import run_command

SHARED_STAGES = ("evaluate_base",)  # with their upstream data stages: nothing a grid of lora/train params changes
EM = "overall.exact_match"  # compare.json's keys: the fine-tuned minus base EM, its interval and McNemar p
OUT = Path("reports/sweep.md")
ON_INTERRUPT = ("the experiments that finished are kept (`dvc exp show`) and the rest may still be queued "
                "(`dvc queue status`): `dvc queue remove --queued` drops them before the grid is queued again")

log = logging.getLogger("sweep")


class SweepError(PipelineError):
    """The sweep cannot start as asked: workers already running, or no experiment queued."""


def run_dvc(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], check=True, env=env)


def workspace_env(environ: dict[str, str], root: Path) -> dict[str, str]:
    """The environment every experiment runs in, with everything it needs findable from .dvc/tmp/exps/<clone>."""
    from alpaca_qlora.models.embedded import model_cache_dir

    env = dict(environ, ALPACA_QLORA_MODEL_CACHE=str((root / model_cache_dir()).resolve()))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # "." is the experiment's own clone: its code, not the code of the checkout the venv was installed from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [".", env.get("PYTHONPATH", "")]))
    return env


def pin_remote(root: Path) -> None:
    """Write the default remote's relative URL as the absolute path it means here, in .dvc/config.local (which
    DVC copies into each experiment's clone), unless a local URL is set already. Nothing changes for this checkout."""
    from dvc.config_schema import RelPath
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        url = repo.config["remote"].get(name, {}).get("url") if name else None
        local_url = repo.config.read("local").get("remote", {}).get(name, {}).get("url")
    if isinstance(url, RelPath) and not local_url:
        run_dvc("remote", "modify", "--local", name, "url", str(url))
        log.info("remote %s pinned to %s in .dvc/config.local, so experiments' clones find it", name, url)


def default_gpus(environ: dict[str, str]) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES where set, else every GPU torch sees (none on CPU)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def worker_names(jobs: int | None, gpus: Sequence[str]) -> list[tuple[str, str | None]]:
    """(celery node name, GPU or None) per worker: one per GPU. Two workers on one card would each plan their
    training to the whole card's memory budget, so more jobs than GPUs are refused where there are GPUs."""
    if gpus and jobs and jobs > len(gpus):
        raise PipelineError(f"--jobs {jobs} with {len(gpus)} GPU(s): each experiment plans its training to a whole "
                            "card's memory (train.memory_budget_gib), so run at most one per GPU.")
    count = jobs or max(len(gpus), 1)
    return [(f"alpaca-sweep-{index + 1}-{os.getpid()}@localhost", gpus[index % len(gpus)] if gpus else None)
            for index in range(count)]


def run_workers(workers: Sequence[tuple[str, str | None]], env: dict[str, str], log_dir: Path) -> None:
    """Run DVC's queue workers until the queue is empty (each exits ~10 s after it finds no task)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, (name, gpu) in enumerate(workers):
        worker_env = env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=gpu)
        clean = ["--clean"] if index == 0 else []  # as `dvc queue start`: the first worker tidies the broker
        with open(log_dir / f"{name.split('@')[0]}.log", "w") as handle:
            processes.append(subprocess.Popen([sys.executable, "-m", "dvc", "exp", "queue-worker", name, *clean],
                                              env=worker_env, stdout=handle, stderr=subprocess.STDOUT))
        log.info("worker %s started%s", name, "" if gpu is None else f" on GPU {gpu}")
    for process in processes:
        process.wait()


def active_workers(root: Path) -> dict[str, Any]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.experiments.celery_queue.worker_status()


def column(row: dict[str, Any], name: str) -> Any:
    """A `dvc exp show` value by key; DVC prefixes a key with its file only where two files share it."""
    return next((value for key, value in row.items() if key == name or key.endswith(f":{name}")), None)


def metric(row: dict[str, Any], name: str) -> float | None:
    """A metric's value, None where the experiment has none (`dvc exp show` fills the gap with text such as "-")."""
    value = column(row, name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def ranked_rows(rows: Sequence[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """This sweep's experiments from `dvc exp show`, the best EM delta first; failed and unfinished ones last."""
    ours = [row for row in rows if str(row.get("Experiment") or "").startswith(f"{prefix}-")]
    return sorted(ours, key=lambda row: (metric(row, f"{EM}_delta") is None, -(metric(row, f"{EM}_delta") or 0),
                                         row["Experiment"]))


def param_text(value: Any) -> str:
    """`dvc exp show` reads every number as a float: lora.r 8 as 8.0; shown as written."""
    return f"{value:g}" if isinstance(value, float) else format_value(value)


def render_ranking(rows: Sequence[dict[str, Any]], params: Sequence[str]) -> str:
    """The results table: each experiment's params, fine-tuned minus base EM with its interval, and its state."""
    lines = [f"| rank | experiment | {' | '.join(params)} | EM delta vs base | {CONFIDENCE:.0%} interval | McNemar p "
             "| state |", "| ---: | --- |" + " ---: |" * len(params) + " ---: | :---: | ---: | --- |"]
    for rank, row in enumerate(rows, start=1):
        delta, interval = delta_with_interval(metric(row, f"{EM}_delta"), metric(row, f"{EM}_delta_ci_low"),
                                              metric(row, f"{EM}_delta_ci_high"))
        state = row.get("State") or "done"
        if state.lower() == "failed":
            state = f"failed: `dvc queue logs {row['Experiment']}`"
        values = " | ".join(param_text(column(row, name)) for name in params)
        lines.append(f"| {rank} | {row['Experiment']} | {values} | {delta} | {interval} | "
                     f"{format_p(metric(row, f'{EM}_mcnemar_p'))} | {state} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="+", help="key=v1,v2,... per param, as `dvc exp run -S` takes them")
    parser.add_argument("--jobs", type=int, help="experiments at a time (default: one per GPU, 1 without GPUs)")
    parser.add_argument("--gpus", help="comma-separated GPUs, one worker on each (default: CUDA_VISIBLE_DEVICES, "
                        "else all that torch sees)")
    parser.add_argument("--name", default=time.strftime("sweep-%m%d-%H%M%S"), help="experiment name prefix")
    parser.add_argument("--prepare", nargs="*", default=list(SHARED_STAGES),
                        help=f"stages run once before the queue ({' '.join(SHARED_STAGES)})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the ranking's markdown ({OUT})")
    arguments = parser.parse_args()
    root = Path.cwd()
    if active_workers(root):
        raise SweepError("DVC queue workers are running already and would take this grid's experiments without a "
                         "GPU of their own: wait for them, or `dvc queue stop`.")
    env = workspace_env(dict(os.environ), root)
    pin_remote(root)
    if arguments.prepare:
        run_dvc("repro", "--pull", *arguments.prepare, env=env)
    overrides = [flag for item in arguments.grid for flag in ("-S", item)]
    run_dvc("exp", "run", "--queue", "--name", arguments.name, *overrides, env=env)
    gpus = default_gpus(os.environ if arguments.gpus is None else {"CUDA_VISIBLE_DEVICES": arguments.gpus})
    run_workers(worker_names(arguments.jobs, gpus), env, root / ".dvc/tmp/sweep")
    from dvc.api import exp_show

    params = [item.split("=", 1)[0].split(":")[-1] for item in arguments.grid]
    table = render_ranking(ranked_rows(exp_show(str(root)), arguments.name), params)
    io.write_text(root / arguments.out, f"# Sweep {arguments.name}\n\n{table}")
    sys.stdout.write(table)
    log.info("wrote %s; `dvc queue status` and `dvc exp show` list the same experiments", arguments.out)


if __name__ == "__main__":
    run_command(main, name="the sweep", on_interrupt=ON_INTERRUPT)
