"""`python -m alpaca_qlora.sweep` (what `make sweep` runs) from a clean clone of a tiny DVC project: two workers,
one per "GPU", a grid of three experiments of which one fails. The stages are trivial python, so the test costs
DVC's own work only."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PREP = 'open("base.txt", "w").write("rows"); open(__import__("os").environ["SWEEP_PREP_LOG"], "a").write("ran\\n")\n'
# Fails for lora.r 99; the others wait (up to a minute) until two "GPUs" hold an experiment: a worker that ran the
# grid alone, one experiment after the other, never gets past the barrier.
TRAIN = textwrap.dedent('''
    import json, os, pathlib, sys, time, yaml
    from dvc.repo import Repo
    r = yaml.safe_load(open("params.yaml"))["lora"]["r"]
    if r == 99:
        sys.exit("lora.r 99 is this test's failing experiment")
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    barrier = pathlib.Path(os.environ["SWEEP_BARRIER"])
    (barrier / str(gpu)).touch()
    deadline = time.time() + 60
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.2)
    with Repo(".") as repo:
        remote = repo.config["remote"]["shared"]["url"]
    os.makedirs("metrics", exist_ok=True)
    json.dump({"overall": {"exact_match_delta": r / 100, "exact_match_delta_ci_low": r / 100 - 0.1,
                           "exact_match_delta_ci_high": r / 100 + 0.1, "exact_match_mcnemar_p": 0.01}},
              open("metrics/compare.json", "w"))
    json.dump({"gpu": gpu, "python": sys.executable, "remote": remote, "peers": len(list(barrier.iterdir())),
               "model_cache": os.environ.get("ALPACA_QLORA_MODEL_CACHE"), "cwd": os.getcwd()},
              open("metrics/env.json", "w"))
''')


def run(command: list[str], cwd: Path, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path or f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), ALPACA_QLORA_LOG_LEVEL="INFO", **env)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A committed tiny project (prep -> train) whose remote is a relative path, cloned fresh: no cache, no outs."""
    base = tmp_path_factory.mktemp("sweep")
    origin = base / "origin"
    origin.mkdir()
    (origin / "prep.py").write_text(PREP)
    (origin / "train.py").write_text(TRAIN)
    (origin / "params.yaml").write_text(yaml.safe_dump({"lora": {"r": 16}, "train": {"learning_rate": 1e-3}}))
    (origin / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prep": {"cmd": "python prep.py", "deps": ["prep.py"], "outs": ["base.txt"]},
        "train": {"cmd": "python train.py", "deps": ["train.py", "base.txt"], "params": ["lora.r", "train"],
                  "metrics": [{"metrics/compare.json": {"cache": False}}, {"metrics/env.json": {"cache": False}}]},
    }}))
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "test@example.com"],
                    ["git", "config", "user.name", "test"],
                    [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                    [sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", "../remote"],  # relative
                    ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        run(command, cwd=origin)
    run(["git", "clone", "-q", str(origin), str(base / "clone")], cwd=base)
    for command in (["git", "config", "user.email", "test@example.com"], ["git", "config", "user.name", "test"]):
        run(command, cwd=base / "clone")
    return base / "clone"


def test_a_grid_runs_one_worker_per_gpu_from_a_clean_clone_and_a_failure_shows_as_failed(clone, tmp_path):
    barrier, prep_log = tmp_path / "barrier", tmp_path / "prep.log"
    barrier.mkdir()
    without_venv = os.pathsep.join(part for part in os.environ["PATH"].split(os.pathsep)
                                   if Path(part) != Path(sys.executable).parent)  # the launcher must add it
    result = run([sys.executable, "-m", "alpaca_qlora.sweep", "lora.r=8,99,32", "--gpus", "0,1", "--name", "grid",
                  "--prepare", "prep"], cwd=clone, path=without_venv, SWEEP_BARRIER=str(barrier),
                 SWEEP_PREP_LOG=str(prep_log), ALPACA_QLORA_MODEL_CACHE="model-cache")

    report = (clone / "reports/sweep.md").read_text()
    assert report.endswith(result.stdout.split("| rank |", 1)[1])  # the table is printed too
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(row[2].strip(), row[3].strip()) for row in rows] == [("grid-3", "32"), ("grid-1", "8"), ("grid-2", "99")]
    assert (rows[0][4].strip(), rows[0][5].strip()) == ("+0.3200", "[+0.2200, +0.4200]")
    assert rows[1][4].strip() == "+0.0800 (n.s.)"  # its interval spans 0
    assert "failed: `dvc queue logs grid-2`" in rows[2][7]
    assert prep_log.read_text() == "ran\n"  # once, in the workspace; the experiments restored it from the cache

    from dvc.api import exp_show

    env = {row["Experiment"]: row for row in exp_show(str(clone)) if row["Experiment"] in ("grid-1", "grid-3")}
    assert {row["gpu"] for row in env.values()} == {0, 1}  # each on its own GPU ...
    assert all(row["peers"] == 2 for row in env.values())  # ... at the same time
    for row in env.values():
        assert ".dvc/tmp/exps" in row["cwd"]  # DVC's temporary clone, where relative paths would break
        assert row["python"] == sys.executable
        assert row["remote"] == str(clone.parent / "remote")
        assert row["model_cache"] == str(clone / "model-cache")
    status = run([sys.executable, "-m", "dvc", "queue", "status"], cwd=clone).stdout
    assert sorted(line.split()[1::3] for line in status.splitlines() if "grid-" in line) == [
        ["grid-1", "Success"], ["grid-2", "Failed"], ["grid-3", "Success"]]
    logs = subprocess.run([sys.executable, "-m", "dvc", "queue", "logs", "grid-2"], cwd=clone, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert "lora.r 99 is this test's failing experiment" in logs


def test_more_jobs_than_gpus_are_refused_since_each_plans_to_a_whole_card():
    from alpaca_qlora.errors import PipelineError
    from alpaca_qlora.sweep import worker_names

    assert [gpu for _, gpu in worker_names(None, ["0", "1"])] == ["0", "1"]
    assert [gpu for _, gpu in worker_names(3, [])] == [None, None, None]  # CPU: as many as asked
    with pytest.raises(PipelineError, match="at most one per GPU"):
        worker_names(3, ["0", "1"])
