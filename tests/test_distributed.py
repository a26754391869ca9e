"""The train stage under accelerate: the launch command, and a 2-process gloo run equal to one process."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alpaca_qlora.config import ConfigError
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.training.distributed import accelerate_command
from support.params import embedded_params

ROOT = Path(__file__).resolve().parents[1]


def test_no_launch_without_distribution_or_inside_a_launched_process(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert accelerate_command(embedded_params().train, "stages/train.py", "cpu") is None
    ddp = embedded_params(train={"distributed": "ddp", "num_processes": 2}).train
    command = accelerate_command(ddp, "stages/train.py", "cpu")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[-1] == "stages/train.py"
    one = accelerate_command(dataclasses.replace(ddp, num_processes=1), "stages/train.py", "cpu")
    assert "--multi_gpu" not in one  # accelerate refuses --multi_gpu with one process
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert accelerate_command(ddp, "stages/train.py", "cpu") is None


def test_fsdp_is_refused_on_cpu_and_more_processes_need_a_distributed_mode(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fsdp = embedded_params(train={"distributed": "fsdp", "num_processes": 2}).train
    with pytest.raises(PipelineError, match="fsdp needs CUDA"):
        accelerate_command(fsdp, "stages/train.py", "cpu")
    with pytest.raises(ConfigError, match="train.num_processes = 2 is invalid"):
        embedded_params(train={"num_processes": 2})
    with pytest.raises(ConfigError, match="train.distributed"):
        embedded_params(train={"distributed": "deepspeed"})


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(cwd),
               ALPACA_QLORA_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def train_in(project: Path, **train: object) -> tuple[dict, dict[str, torch.Tensor]]:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "stages/train.py"], cwd=project)
    metrics = json.loads((project / "metrics/train.json").read_text())
    return metrics, load_file(str(project / "models/adapter/adapter_model.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_doubled_accumulation(tmp_path, tiny_mistral_dir):
    project = tmp_path / "project"
    for name in ("alpaca_qlora", "stages"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(sample_frac=0.02, eval_size=12)
    params["model"].update(name=str(tiny_mistral_dir), quantization="none")
    params["lora"].update(dropout=0.0)  # dropout masks would differ between one process and two
    params["train"].update(max_steps=3, micro_batch_size=2, max_seq_length=256, logging_steps=1, save_steps=100,
                           dvclive=False, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("fetch", "sample", "format"):
        run([sys.executable, f"stages/{stage}.py"], cwd=project)

    single, single_adapter = train_in(project, gradient_accumulation_steps=2, distributed="none", num_processes=1)
    double, double_adapter = train_in(project, gradient_accumulation_steps=1, distributed="ddp", num_processes=2)

    assert single["processes"] == 1 and double["processes"] == 2
    assert single["steps"] == double["steps"] == 3
    # The same rows went through the model: one process saw all of them, two processes half each.
    assert double["tokens"] == single["tokens"] and double["labelled_tokens"] == single["labelled_tokens"]
    assert double["first_loss"] == pytest.approx(single["first_loss"], rel=1e-4)
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert single_adapter.keys() == double_adapter.keys()
    for name, weight in single_adapter.items():
        torch.testing.assert_close(double_adapter[name], weight, rtol=1e-4, atol=1e-5)
