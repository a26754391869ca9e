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
from support import ROOT
from support.commands import free_port
from support.params import embedded_params
from support.training import assert_same_adapter


def test_no_launch_without_distribution_or_inside_a_launched_process(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert accelerate_command(embedded_params().train, "stages/train.py", "cpu") is None
    ddp = embedded_params(train={"distributed": "ddp", "num_processes": 2}).train
    command = accelerate_command(ddp, "stages/train.py", "cpu")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[-1] == "stages/train.py"
    assert command[command.index("--main_process_port") + 1] == "0"  # accelerate picks a free port: runs side by side
    one = accelerate_command(dataclasses.replace(ddp, num_processes=1), "stages/train.py", "cpu")
    assert "--multi_gpu" not in one  # accelerate refuses --multi_gpu with one process
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert accelerate_command(ddp, "stages/train.py", "cpu") is None


def test_fsdp_is_refused_on_cpu_and_more_processes_need_a_distributed_mode(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fsdp = embedded_params(train={"distributed": "fsdp", "num_processes": 2}).train
    with pytest.raises(PipelineError, match="fsdp needs CUDA GPUs.*accelerate"):
        accelerate_command(fsdp, "stages/train.py", "cpu")
    with pytest.raises(ConfigError, match="train.num_processes = 2 is invalid"):
        embedded_params(train={"num_processes": 2})
    with pytest.raises(ConfigError, match="train.distributed"):
        embedded_params(train={"distributed": "deepspeed"})


def environment(cwd: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(cwd),
               ALPACA_QLORA_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(cwd), capture_output=True, text=True)
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


def make_project(path: Path, model_dir: Path) -> Path:
    """A copy of the project on the tiny Mistral, formatted and ready to train a few deterministic steps."""
    for name in ("alpaca_qlora", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(sample_frac=0.02, eval_size=12)
    params["model"].update(name=str(model_dir), quantization="none")
    params["lora"].update(dropout=0.0)  # dropout masks would differ between one process and two
    params["train"].update(max_steps=3, micro_batch_size=2, max_seq_length=256, logging_steps=1, save_steps=100,
                           dvclive=False, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("fetch", "sample", "format"):
        run([sys.executable, f"stages/{stage}.py"], cwd=path)
    return path


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_doubled_accumulation(tmp_path, tiny_mistral_dir):
    project = make_project(tmp_path / "project", tiny_mistral_dir)

    single, single_adapter = train_in(project, gradient_accumulation_steps=2, distributed="none", num_processes=1)
    double, double_adapter = train_in(project, gradient_accumulation_steps=1, distributed="ddp", num_processes=2)

    assert single["processes"] == 1 and double["processes"] == 2
    assert single["steps"] == double["steps"] == 3
    # The same rows went through the model: one process saw all of them, two processes half each.
    assert double["tokens"] == single["tokens"] and double["labelled_tokens"] == single["labelled_tokens"]
    assert double["first_loss"] == pytest.approx(single["first_loss"], rel=1e-4)
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert_same_adapter(double_adapter, single_adapter)


@pytest.mark.slow
def test_fsdp2_shards_on_two_gloo_processes_and_the_gather_returns_the_adapter(tmp_path, tiny_mistral_dir):
    """The train stage's gather of a sharded adapter (torch.distributed.checkpoint.state_dict), on CPU; the output
    projection, which Liger's cross-entropy reads outside FSDP's gather, stays whole and everything else is sharded."""
    run([sys.executable, "-m", "support.fsdp_gather", str(tmp_path), str(free_port()), str(tiny_mistral_dir)],
        cwd=ROOT)
    out = tmp_path / "0"  # the first (only) model's results
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["sharded"] and rank["others_dtensor"] for rank in ranks)
    assert all(rank["whole"] == ["base_model.model.lm_head.weight"] for rank in ranks)
    assert ranks[1]["gathered"] == 0  # process 0 alone receives the weights
    before = load_file(str(out / "before.safetensors"))
    assert before and all("lora_" in name for name in before)
    assert_same_adapter(load_file(str(out / "gathered.safetensors")), before)


def multinode_command(machine_rank: int, port: int, processes: int) -> list[str]:
    """The README's multi-node recipe ("More than one GPU"), with this host as the head node."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no", "stages/train.py"]


@pytest.mark.slow
def test_two_machine_ranks_of_one_process_each_train_the_one_machine_runs_adapter(tmp_path, tiny_mistral_dir):
    """The multi-node recipe on one host: two `accelerate launch` "nodes" of one gloo process each."""
    project = make_project(tmp_path / "project", tiny_mistral_dir)
    one_node, one_node_adapter = train_in(project, gradient_accumulation_steps=1, distributed="ddp",
                                          num_processes=2)
    (project / "metrics/train.json").unlink()
    shutil.rmtree(project / "models/adapter")

    port = free_port()
    nodes = [subprocess.Popen(multinode_command(rank, port, processes=2), cwd=project, env=environment(project),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"machine rank {rank} failed ({node.returncode}):\n{output}"
    two_nodes = json.loads((project / "metrics/train.json").read_text())
    two_nodes_adapter = load_file(str(project / "models/adapter/adapter_model.safetensors"))

    assert two_nodes["processes"] == one_node["processes"] == 2
    assert two_nodes["tokens"] == one_node["tokens"] and two_nodes["steps"] == one_node["steps"]
    assert two_nodes["train_loss"] == pytest.approx(one_node["train_loss"], rel=1e-4)
    assert_same_adapter(two_nodes_adapter, one_node_adapter)
