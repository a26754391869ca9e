"""Checkpoints: one trainer at a time; a damaged checkpoint is found, named and skipped; an interrupted run (in
process, or the train stage killed with SIGKILL) resumes to the uninterrupted run's results."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alpaca_qlora import io
from alpaca_qlora.config import recorded_params
from alpaca_qlora.data.formatting import tokenize_training_rows
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.models.loading import load_tokenizer
from alpaca_qlora.training.checkpoints import (
    LOCK_HANDED_TO_WORKERS,
    LOCK_NAME,
    CheckpointsBusy,
    checkpoint_problem,
    lock_checkpoints,
    run_fingerprint,
    share_lock_with_workers,
)
from alpaca_qlora.training.trainer import run_training
from support import ROOT
from support.killed_runs import RUN_METRICS, curves, kill_train_after_checkpoint, resumed_from_step
from support.params import embedded_params
from support.training import Interrupt, make_job

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


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_mistral_dir, tokenized, tmp_path):
    first = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2, callbacks=[Interrupt(5)])
    with pytest.raises(KeyboardInterrupt):
        run_training(first, resume=True)
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    second = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2)
    metrics = run_training(second, resume=True).metrics
    assert metrics["resumed_from_step"] == 4
    assert metrics["steps"] == 6


def dvclive_curve(log_dir: Path, name: str) -> list[tuple[int, float]]:
    with (log_dir / "plots" / "metrics" / "train" / f"{name}.tsv").open(encoding="utf-8") as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]


def test_a_resumed_run_reports_the_uninterrupted_runs_metrics_and_curves(tiny_mistral_dir, tokenized, tmp_path):
    # Checkpoints at 3, 6 and 9 fall between the logs at even steps: the log window open at a checkpoint must not
    # be lost by the resume.
    settings = dict(max_steps=12, save_steps=3, logging_steps=2, dvclive=True)
    whole_job = make_job(tiny_mistral_dir, tokenized, tmp_path / "whole", **settings)
    whole = run_training(whole_job, resume=True).metrics
    interrupted = make_job(tiny_mistral_dir, tokenized, tmp_path / "parts", callbacks=[Interrupt(5)], **settings)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, resume=True)
    resumed_job = make_job(tiny_mistral_dir, tokenized, tmp_path / "parts", **settings)
    resumed = run_training(resumed_job, resume=True).metrics

    assert resumed["resumed_from_step"] == 3 and whole["resumed_from_step"] == 0
    for key in ("steps", "epochs", "tokens", "labelled_tokens", "padding_fraction", "first_loss"):
        assert resumed[key] == whole[key], key
    for key in ("train_loss", "final_loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5), key
    for name in ("loss", "learning_rate", "grad_norm"):
        whole_curve, resumed_curve = (dvclive_curve(job.log_dir, name) for job in (whole_job, resumed_job))
        assert [step for step, _ in resumed_curve] == [step for step, _ in whole_curve], name
        assert [value for _, value in resumed_curve] == pytest.approx([value for _, value in whole_curve], rel=1e-5)
    assert [step for step, _ in dvclive_curve(whole_job.log_dir, "loss")] == [1, 2, 3, 4, 6, 8, 9, 10, 12]


@pytest.fixture(scope="module")
def interrupted_run(tiny_mistral_dir, tokenized, tmp_path_factory) -> Path:
    """A run of 6 steps interrupted at step 5, leaving checkpoint-2 and checkpoint-4 (save_total_limit 2)."""
    path = tmp_path_factory.mktemp("interrupted")
    job = make_job(tiny_mistral_dir, tokenized, path, max_steps=6, save_steps=2, callbacks=[Interrupt(5)])
    with pytest.raises(KeyboardInterrupt):
        run_training(job, resume=True)
    assert sorted(p.name for p in (path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return path / "run"


DAMAGE = {
    "truncated adapter": ("adapter_model.safetensors", lambda path: os.truncate(path, path.stat().st_size // 2)),
    "empty trainer state": ("trainer_state.json", lambda path: path.write_text("")),
    "truncated optimizer": ("optimizer.pt", lambda path: os.truncate(path, path.stat().st_size - 100)),
    "missing scheduler": ("scheduler.pt", lambda path: path.unlink()),
    "missing RNG state": ("rng_state.pth", lambda path: path.unlink()),
    "missing run history": ("run_history.json", lambda path: path.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_checkpoint_damage_is_found_and_named(interrupted_run, tmp_path, damage):
    checkpoint = shutil.copytree(interrupted_run / "checkpoint-4", tmp_path / "checkpoint-4")
    assert checkpoint_problem(checkpoint) is None
    name, harm = DAMAGE[damage]
    harm(checkpoint / name)
    problem = checkpoint_problem(checkpoint)
    assert problem is not None and (name in problem or "RNG" in problem or "scheduler" in problem), problem


@pytest.mark.parametrize("damage", ["truncated adapter", "empty trainer state"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_mistral_dir, tokenized, interrupted_run, tmp_path,
                                                           caplog, damage):
    shutil.copytree(interrupted_run, tmp_path / "run")
    name, harm = DAMAGE[damage]
    harm(tmp_path / "run" / "checkpoint-4" / name)
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.training.checkpoints"):
        metrics = run_training(make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2),
                               resume=True).metrics
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
    assert any("checkpoint-4" in record.getMessage() and name in record.getMessage() for record in caplog.records)
    assert (tmp_path / "run" / "damaged-checkpoint-4").is_dir()


def test_with_no_sound_checkpoint_training_starts_over(tiny_mistral_dir, tokenized, interrupted_run, tmp_path,
                                                        caplog):
    shutil.copytree(interrupted_run, tmp_path / "run")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        (tmp_path / "run" / checkpoint / "trainer_state.json").write_text("")
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.training.checkpoints"):
        metrics = run_training(make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2),
                               resume=True).metrics
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 6
    assert "starts over" in caplog.text


def test_settings_of_the_machine_alone_change_neither_the_run_fingerprint_nor_the_card():
    """A resumed run may get another memory budget (another card): its checkpoints and adapter stay the same run's."""
    def recorded(**train):
        return recorded_params(embedded_params(train=train))

    base = recorded()
    assert "memory_budget_gib" not in base["train"] and "fsdp_offload" not in base["train"]
    assert recorded(memory_budget_gib=20) == base
    assert run_fingerprint(recorded(memory_budget_gib=20), "sha") == run_fingerprint(base, "sha")
    assert run_fingerprint(recorded(learning_rate=5e-4), "sha") != run_fingerprint(base, "sha")
