"""Two gloo processes load a tiny model in 4-bit NF4 the way the train stage does under FSDP (staged in host memory,
the 4-bit weights in compute-dtype storage), shard it as the stage does, and train one SGD step on one row each;
process 0 also takes the same step on both rows without sharding, as one process would.

    python -m support.fsdp_loading MODEL_DIR OUT_DIR PORT

Each process writes rank<N>.json: the 4-bit bytes of the whole base and of what it kept after sharding, whether
every 4-bit layer kept its quantization constants, its loss, and the dtype a sharded module returns under the stage's
mixed precision and under accelerate's. Process 0 writes the adapter FSDP's step gave (gathered.safetensors), the
single-process one (single.safetensors, its loss in single.json) and the adapter before the step (before.safetensors).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from support.fsdp_gather import shard_as_the_stage

LEARNING_RATE = 20.0  # large, so the step moves every adapter weight well past the comparison's tolerance
ROWS, LENGTH = 2, 24  # one row per process, every token labelled: the two means average to the one-process mean


def four_bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def local_bytes(weight: torch.Tensor) -> int:
    """Bytes of `weight` this process holds: its shard when FSDP sharded it."""
    from torch.distributed.tensor import DTensor

    local = weight.to_local() if isinstance(weight, DTensor) else weight
    return local.numel() * local.element_size()


def build(model_dir: str) -> torch.nn.Module:
    """The stage's FSDP model: the loader's staged 4-bit base, LoRA on top (the same seed on every process)."""
    from alpaca_qlora.models.loading import load_model
    from alpaca_qlora.models.quantization import plan_quantization
    from alpaca_qlora.training.model import attach_lora
    from support.params import embedded_params

    model = attach_lora(load_model(model_dir, plan_quantization("nf4", "cpu"), device="cpu", shardable=True),
                        embedded_params(lora={"dropout": 0.0}).lora, quantized=True, gradient_checkpointing=False)
    seeded = torch.Generator().manual_seed(0)  # the same adapter in every build, whatever imports drew before
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1, generator=seeded)  # B starts at zero: make every adapter weight tell
    return model


def sgd_step(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= LEARNING_RATE * parameter.grad
    return loss.item()


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def single_process_step(model_dir: str, batch: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], dict]:
    """The loss, and the adapter before and after the step, of one process on the whole batch."""
    model = build(model_dir)
    before = adapter(model)
    return sgd_step(model, batch), before, adapter(model)


class Loss(torch.nn.Module):
    """A layer and a loss computed from it in fp32, as transformers' and Liger's losses are."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs).float().square().mean()


def output_dtypes() -> dict[str, str]:
    """The dtype of the loss a sharded module returns under the stage's mixed precision and under accelerate's."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import fully_shard

    from alpaca_qlora.training.sharding import reduce_in_fp32

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what accelerate does for a bf16 run
    policies = {"accelerate": plugin.mixed_precision_policy}
    reduce_in_fp32(plugin, torch.bfloat16)
    policies["stage"] = plugin.mixed_precision_policy
    dtypes = {}
    for name, policy in policies.items():
        module = fully_shard(Loss(), mp_policy=policy)
        dtypes[name] = str(module(torch.ones(2, 8)).dtype)
    return dtypes


def worker(rank: int, model_dir: str, out_dir: str, port: int) -> None:
    from alpaca_qlora.training.sharding import gather_trainable_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    batch = torch.randint(3, 32000, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    model = build(model_dir)
    layers = four_bit_layers(model)
    whole = sum(local_bytes(layer.weight) for layer in layers)
    shard_as_the_stage(model)
    facts = {
        "four_bit_bytes_whole": whole,
        "four_bit_bytes_kept": sum(local_bytes(layer.weight) for layer in layers),
        "four_bit_layers": len(layers),
        "constants_whole": all(layer.quant_state is not None and layer.quant_state.absmax.numel() * 64
                               == layer.in_features * layer.out_features for layer in layers),
        "loss": sgd_step(model, batch[rank:rank + 1]),
        "output_dtypes": output_dtypes(),
    }
    gathered = gather_trainable_state_dict(model)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(facts))
    if rank == 0:
        single_loss, before, single = single_process_step(model_dir, batch)
        Path(out_dir, "single.json").write_text(json.dumps({"loss": single_loss}))
        save_file(before, str(Path(out_dir, "before.safetensors")))
        save_file(single, str(Path(out_dir, "single.safetensors")))
        save_file({name: tensor.contiguous() for name, tensor in gathered.items()},
                  str(Path(out_dir, "gathered.safetensors")))
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(sys.argv[1], sys.argv[2], int(sys.argv[3])), nprocs=2)
