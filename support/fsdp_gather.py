"""Two gloo processes shard tiny PEFT models with FSDP2 (`fully_shard`) on CPU and gather each adapter with the train
stage's `gather_trainable_state_dict`; process 0 saves what it gathered beside the weights before sharding, for the
i-th model in OUT_DIR/i/.

    python -m support.fsdp_gather OUT_DIR PORT MODEL_DIR [MODEL_DIR ...] [--all-linear]

The Trainer cannot run FSDP on CPU (accelerate turns its FSDP plugin on for GPU process groups only), so this drives
torch's `fully_shard` directly, as accelerate does on GPUs: one unit per decoder layer, then the root, with the
parameters the stage's `keep_output_projection_whole` names left out of the shards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file


def shard_as_the_stage(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """`fully_shard` per decoder layer, then the root, leaving out what `keep_output_projection_whole` names; returns
    the parameters left whole."""
    from accelerate.utils.fsdp_utils import get_parameters_from_modules
    from torch.distributed.fsdp import fully_shard

    from alpaca_qlora.training.sharding import keep_output_projection_whole

    plugin = SimpleNamespace(ignored_modules=None)  # what accelerate's plugin carries into fully_shard
    keep_output_projection_whole(plugin, model, compute_dtype=None)
    whole = get_parameters_from_modules(plugin.ignored_modules, model, torch.device("cpu"))  # as accelerate does
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, ignored_params=whole)
    fully_shard(model, ignored_params=whole)
    return whole


def worker(rank: int, out_dir: str, port: int, model_dirs: list[str], all_linear: bool) -> None:
    from support.params import embedded_params

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    lora = embedded_params(lora={"target_modules": ["all-linear"]} if all_linear else {}).lora
    for index, model_dir in enumerate(model_dirs):
        out = Path(out_dir, str(index))
        out.mkdir(parents=True, exist_ok=True)
        shard_and_gather(rank, model_dir, out, lora)
    dist.destroy_process_group()


def shard_and_gather(rank: int, model_dir: str, out: Path, lora) -> None:
    from torch.distributed.tensor import DTensor

    from alpaca_qlora.models.loading import load_model
    from alpaca_qlora.models.quantization import plan_quantization
    from alpaca_qlora.training.model import attach_lora
    from alpaca_qlora.training.sharding import gather_trainable_state_dict, is_sharded

    torch.manual_seed(0)
    model = attach_lora(load_model(model_dir, plan_quantization("none", "cpu"), device="cpu", shardable=True),
                        lora, quantized=False, gradient_checkpointing=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # B starts at zero: make every adapter weight tell
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    projection = model.get_output_embeddings().weight
    whole = shard_as_the_stage(model)
    gathered = gather_trainable_state_dict(model)
    names = {parameter: name for name, parameter in model.named_parameters()}
    facts = {"sharded": is_sharded(model), "gathered": len(gathered),
             "whole": sorted(names[p] for p in model.parameters() if not isinstance(p, DTensor)),
             "whole_is_the_output_projection": whole == {projection},
             "others_dtensor": all(isinstance(p, DTensor) for p in model.parameters() if p not in whole)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))
    if rank == 0:
        save_file(before, str(Path(out, "before.safetensors")))
        save_file({name: tensor.contiguous() for name, tensor in gathered.items()},
                  str(Path(out, "gathered.safetensors")))


if __name__ == "__main__":
    import argparse

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("port", type=int)
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--all-linear", action="store_true", help="lora.target_modules all-linear (default: seven)")
    args = parser.parse_args()
    mp.spawn(worker, args=(args.out_dir, args.port, args.model_dirs, args.all_linear), nprocs=2)
