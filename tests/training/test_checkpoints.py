"""The train stage's checkpoints: one trainer at a time, and a run killed with SIGKILL resumes to the same results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alpaca_qlora import io
from alpaca_qlora.data.formatting import tokenize_training_rows
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.models.loading import load_tokenizer
from alpaca_qlora.training.checkpoints import (
    LOCK_HANDED_TO_WORKERS,
    LOCK_NAME,
    CheckpointsBusy,
    lock_checkpoints,
    share_lock_with_workers,
)
from support.killed_runs import RUN_METRICS, curves, kill_train_after_checkpoint, resumed_from_step

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from alpaca_qlora.training.checkpoints import lock_checkpoints
lock = lock_checkpoints(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def environment(cwd: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", LOCK_HANDED_TO_WORKERS)}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(cwd),
               ALPACA_QLORA_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(cwd), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def hold_lock(root: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], env=environment(ROOT),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_trainer_is_refused_naming_the_holder_until_the_holder_dies(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(CheckpointsBusy, match=rf"in use by another training run: process {holder.pid} .*"
                                                  rf"`kill {holder.pid}`"):
            lock_checkpoints(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    handle = lock_checkpoints(tmp_path)  # the OS released the killed holder's lock
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    handle.close()


def test_the_launchers_workers_share_its_lock_and_a_new_run_stays_out(tmp_path, monkeypatch):
    for name in ("LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(LOCK_HANDED_TO_WORKERS, "")  # restored after the launcher below sets it
    launcher = lock_checkpoints(tmp_path)
    share_lock_with_workers(launcher, tmp_path)
    assert os.get_inheritable(launcher.fileno())  # survives the launcher's os.execv into accelerate
    workers = []
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("RANK", rank)
        workers.append(lock_checkpoints(tmp_path))  # shared: no deadlock on their own launcher's lock
    assert all(worker is not None for worker in workers)
    launcher.close()  # a killed launcher: its workers still hold the lock
    monkeypatch.delenv(LOCK_HANDED_TO_WORKERS)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("RANK")
    with pytest.raises(CheckpointsBusy):
        lock_checkpoints(tmp_path)
    for worker in workers:
        worker.close()
    lock_checkpoints(tmp_path).close()


def test_under_an_outside_launcher_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCK_HANDED_TO_WORKERS, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")  # the second machine's first process
    assert lock_checkpoints(tmp_path) is None
    monkeypatch.setenv("RANK", "0")
    handle = lock_checkpoints(tmp_path)
    with pytest.raises(CheckpointsBusy):
        lock_checkpoints(tmp_path)
    handle.close()


def copy_project(path: Path, model_dir: Path, **train: object) -> Path:
    for name in ("alpaca_qlora", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "data/external/README.md"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(sample_frac=0.02, eval_size=12)
    params["model"].update(name=str(model_dir), quantization="none")
    params["lora"].update(dropout=0.0)
    params["train"].update(micro_batch_size=4, max_seq_length=256, learning_rate=1e-3, **train)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # fetch's description of the source, which the adapter's card cites; these tests write the formatted rows directly
    io.write_json(path / "metrics/data.json", {"source": "local", "path": "data/external/rows.jsonl"})
    return path


@pytest.mark.slow
def test_the_train_stage_refuses_while_another_run_holds_the_lock(tmp_path, tiny_mistral_dir):
    project = copy_project(tmp_path / "project", tiny_mistral_dir, max_steps=2, logging_steps=1, save_steps=100,
                           dvclive=False)
    rows = [{"id": str(n), "instruction": f"Add {n} and {n}.", "input": "", "output": str(2 * n)} for n in range(8)]
    examples, _ = tokenize_training_rows(rows, load_tokenizer(str(tiny_mistral_dir)), ALPACA, max_length=256,
                                         overlong="truncate")
    io.write_jsonl(project / "data/formatted/train.jsonl", examples)
    other_run = project / "models/checkpoints/0123456789abcdef/checkpoint-3"
    other_run.mkdir(parents=True)
    (other_run / "trainer_state.json").write_text('{"global_step": 3}')
    holder = hold_lock(project / "models/checkpoints")
    try:
        refused = run([sys.executable, "stages/train.py"], cwd=project, check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert refused.returncode == 2, refused.stderr
    assert f"process {holder.pid}" in refused.stderr and "in use by another training run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (other_run / "trainer_state.json").read_text() == '{"global_step": 3}'  # nothing touched
    assert not (project / "metrics/train.json").exists()

    run([sys.executable, "stages/train.py"], cwd=project)  # the holder is gone: the stage runs
    assert json.loads((project / "metrics/train.json").read_text())["steps"] == 2
    assert (project / "models/checkpoints" / LOCK_NAME).is_file()


def assert_same_run(resumed: dict, resumed_curves: dict, whole: dict, whole_curves: dict, rel: float) -> None:
    for key in RUN_METRICS:
        assert resumed[key] == pytest.approx(whole[key], rel=rel), key
    for name, curve in whole_curves.items():
        assert [step for step, _ in resumed_curves[name]] == [step for step, _ in curve], name
        assert [value for _, value in resumed_curves[name]] == pytest.approx([value for _, value in curve], rel=rel)


def dvc_project(project: Path) -> list[str]:
    """Make `project` a git + DVC repository with the formatted data in place; returns the dvc command."""
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "t"], [*dvc, "init", "-q"],
                    [*dvc, "config", "core.analytics", "false"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "project"], [*dvc, "repro", "format"]):
        run(command, cwd=project)
    return dvc


@pytest.mark.slow
def test_kill_dash_nine_after_a_checkpoint_then_dvc_repro_gives_the_uninterrupted_run(tmp_path, tiny_mistral_dir):
    project = copy_project(tmp_path / "project", tiny_mistral_dir, max_steps=12, save_steps=3, logging_steps=2)
    dvc = dvc_project(project)

    kill_train_after_checkpoint([*dvc, "repro", "train"], project, step=3, env=environment(project))
    run([*dvc, "repro", "train"], cwd=project)
    resumed = json.loads((project / "metrics/train.json").read_text())
    resumed_curves = curves(project)
    assert 3 <= resumed_from_step(project) <= 12

    run([*dvc, "repro", "--force", "train"], cwd=project)
    whole = json.loads((project / "metrics/train.json").read_text())
    assert resumed_from_step(project) == 0
    assert_same_run(resumed, resumed_curves, whole, curves(project), rel=1e-5)
    assert [step for step, _ in curves(project)["loss"]] == [1, 2, 3, 4, 6, 8, 9, 10, 12]


@pytest.mark.slow
def test_a_killed_two_process_ddp_run_resumes_under_dvc_repro_to_the_uninterrupted_run(tmp_path, tiny_mistral_dir):
    """Two gloo processes under accelerate, the launcher and its workers killed with SIGKILL after a checkpoint;
    `dvc repro` resumes. (FSDP runs on GPUs only: accelerate enables it for GPU process groups.)"""
    project = copy_project(tmp_path / "project", tiny_mistral_dir, max_steps=12, save_steps=3, logging_steps=2,
                           distributed="ddp", num_processes=2)
    dvc = dvc_project(project)

    kill_train_after_checkpoint([*dvc, "repro", "train"], project, step=3, env=environment(project))
    run([*dvc, "repro", "train"], cwd=project)
    resumed = json.loads((project / "metrics/train.json").read_text())
    resumed_curves = curves(project)
    assert 3 <= resumed_from_step(project) <= 12 and resumed["processes"] == 2 and not resumed["sharded"]

    run([*dvc, "repro", "--force", "train"], cwd=project)  # the finished run's checkpoints are gone: from step 0
    whole = json.loads((project / "metrics/train.json").read_text())
    assert resumed_from_step(project) == 0
    assert_same_run(resumed, resumed_curves, whole, curves(project), rel=1e-4)
