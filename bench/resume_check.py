"""A multi-GPU train stage killed with SIGKILL after a checkpoint resumes under `dvc repro` to the uninterrupted run.

Run from the project root with params.yaml already set for the run (train.distributed, num_processes, max_steps,
save_steps, dvclive on), as the `resume` phase of bench/gpu_run.sh does:

    python -m bench.resume_check --mode fsdp --kill-after 3 --out resume_fsdp.json

Three `dvc repro -s train` calls: one killed once checkpoint-K is on disk, one that resumes it, and one with
`--force` from step 0 (the finished run's checkpoints are gone) as the reference. The GPU kernels are not bitwise
deterministic, so the table gives each metric's and curve's largest relative difference instead of a pass/fail on
equality; `--tolerance` sets the figure the JSON's `within_tolerance` is judged against.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from support.killed_runs import RUN_METRICS, curves, kill_train_after_checkpoint, resumed_from_step

log = logging.getLogger("resume_check")
ROOT = Path.cwd()


def environment() -> dict[str, str]:
    """This process's environment, less what would make the stage think it is already a launched worker."""
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(DVC_NO_ANALYTICS="1")
    return env


def dvc(*arguments: str) -> None:
    command = [sys.executable, "-m", "dvc", *arguments]
    result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")


def run_report() -> dict[str, Any]:
    return {"metrics": json.loads((ROOT / "metrics/train.json").read_text()), "curves": curves(ROOT),
            "resumed_from_step": resumed_from_step(ROOT)}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def differences(resumed: dict[str, Any], whole: dict[str, Any]) -> dict[str, Any]:
    metrics = {key: relative(resumed["metrics"][key], whole["metrics"][key]) for key in RUN_METRICS}
    steps_match = {name: [step for step, _ in resumed["curves"][name]] == [step for step, _ in curve]
                   for name, curve in whole["curves"].items()}
    curve_diffs = {name: max((relative(a, b) for (_, a), (_, b) in zip(resumed["curves"][name], curve)), default=0.0)
                   for name, curve in whole["curves"].items()}
    return {"metrics": metrics, "curve_steps_match": steps_match, "curves": curve_diffs}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, help="the train.distributed value params.yaml holds (for the JSON)")
    parser.add_argument("--kill-after", type=int, required=True, help="kill once this checkpoint step is saved")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference allowed")
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()

    if not (ROOT / ".git").exists():  # the GPU machine gets the working tree without its git repository
        dvc("config", "--local", "core.no_scm", "true")
    log.info("%s: a run killed after checkpoint-%d", arguments.mode, arguments.kill_after)
    kill_train_after_checkpoint([sys.executable, "-m", "dvc", "repro", "-s", "train"], ROOT, arguments.kill_after,
                                environment())
    log.info("%s: dvc repro resumes it", arguments.mode)
    dvc("repro", "-s", "train")
    resumed = run_report()
    log.info("%s: dvc repro --force, the uninterrupted run", arguments.mode)
    dvc("repro", "-s", "--force", "train")
    whole = run_report()

    found = differences(resumed, whole)
    worst = max([*found["metrics"].values(), *found["curves"].values()])
    summary = {"mode": arguments.mode, "killed_after_checkpoint": arguments.kill_after,
               "resumed_from_step": resumed["resumed_from_step"], "whole_from_step": whole["resumed_from_step"],
               "processes": resumed["metrics"]["processes"], "sharded": resumed["metrics"]["sharded"],
               "resumed": resumed, "whole": whole, "relative_differences": found, "worst_relative": worst,
               "tolerance": arguments.tolerance,
               # a resume that fell back to step 0 would match the whole run too: it must have resumed
               "within_tolerance": worst <= arguments.tolerance and all(found["curve_steps_match"].values())
               and resumed["resumed_from_step"] == arguments.kill_after and whole["resumed_from_step"] == 0}
    io.write_json(arguments.out, summary)
    print(f"{'':<18}{'resumed':>14}{'uninterrupted':>16}{'rel. diff':>12}")
    for key in RUN_METRICS:
        print(f"{key:<18}{resumed['metrics'][key]:>14.6g}{whole['metrics'][key]:>16.6g}{found['metrics'][key]:>12.2e}")
    for name, diff in found["curves"].items():
        print(f"curve {name:<12}{'':>30}{diff:>12.2e}")
    print(f"resumed from step {summary['resumed_from_step']} ({summary['processes']} processes, sharded "
          f"{summary['sharded']}); within {arguments.tolerance:g}: {summary['within_tolerance']}")


if __name__ == "__main__":
    main()
