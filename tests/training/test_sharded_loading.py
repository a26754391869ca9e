"""FSDP's loading: the base is staged in host memory, never whole on the training device; each process keeps its shard
of the 4-bit weights; and the sharded model trains the adapter one process trains."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca_qlora.config import ConfigError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import QuantizationPlan
from alpaca_qlora.training.sharding import fsdp_training_arguments
from support.commands import free_port
from support.params import embedded_params

ROOT = Path(__file__).resolve().parents[2]


def test_the_fsdp_loader_leaves_every_base_weight_off_the_training_device(tiny_mistral_dir):
    """Asked for CUDA (as the stage asks under FSDP), the loader stages the 4-bit base in host memory: on this CPU-only
    machine a single weight placed on the device would fail the load, and on a GPU machine the check below would."""
    plan = QuantizationPlan(quantized=True, reason="test", compute_dtype=torch.bfloat16)
    model = load_model(str(tiny_mistral_dir), plan, device="cuda", shardable=True)
    devices = {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]}
    assert devices == {"cpu"}
    four_bit = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and all(weight.dtype == torch.bfloat16 and weight.shape[1] == 1 for weight in four_bit)
    assert not hasattr(model, "hf_device_map")  # accelerate would check it against the training device


@pytest.mark.slow
def test_two_gloo_processes_keep_half_the_4bit_base_each_and_train_the_one_process_adapter(tmp_path,
                                                                                            tiny_mistral_dir):
    """The stage's FSDP loading and sharding on two gloo processes: each keeps half of every 4-bit weight's packed
    bytes and all of its quantization constants, and one SGD step on a row per process gives the adapter and loss
    one process gets on both rows."""
    subprocess.run([sys.executable, "-m", "support.fsdp_loading", str(tiny_mistral_dir), str(tmp_path),
                    str(free_port())], cwd=ROOT, check=True, capture_output=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["four_bit_layers"] == 14  # 7 projections x 2 layers
        assert rank["four_bit_bytes_kept"] == rank["four_bit_bytes_whole"] // 2
        assert rank["constants_whole"]
    single_loss = json.loads((tmp_path / "single.json").read_text())["loss"]
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(single_loss, rel=1e-5)
    gathered, single, before = (load_file(str(tmp_path / f"{name}.safetensors"))
                                for name in ("gathered", "single", "before"))
    assert gathered.keys() == single.keys() and len(single) == 28
    for name, weight in single.items():
        assert (weight - before[name]).abs().max() > 1e-3  # the step moved it: equality below is not the start's
        torch.testing.assert_close(gathered[name], weight, rtol=1e-4, atol=1e-5)
    # accelerate's bf16 policy hands back every sharded output (the loss too) in bf16; the stage's, as computed
    assert all(rank["output_dtypes"] == {"accelerate": "torch.bfloat16", "stage": "torch.float32"} for rank in ranks)


def test_fsdp_offload_reaches_fsdp2_as_its_cpu_offload_policy_and_needs_fsdp():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy
    from transformers import TrainingArguments

    def plugin(offload: bool) -> FullyShardedDataParallelPlugin:
        arguments = TrainingArguments(output_dir="unused", report_to=[], **fsdp_training_arguments(offload))
        return FullyShardedDataParallelPlugin(**arguments.fsdp_plugin_args)

    assert isinstance(plugin(True).cpu_offload, CPUOffloadPolicy)
    assert not isinstance(plugin(False).cpu_offload, CPUOffloadPolicy)
    assert embedded_params(train={"distributed": "fsdp", "num_processes": 2, "fsdp_offload": True}).train.fsdp_offload
    with pytest.raises(ConfigError, match="train.fsdp_offload"):
        embedded_params(train={"distributed": "ddp", "num_processes": 2, "fsdp_offload": True})
