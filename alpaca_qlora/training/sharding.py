"""FSDP2 (`fully_shard`) for the train stage: the Trainer's FSDP settings, and the adapter gathered for saving.

FSDP exists here for bases that do not fit one GPU: each process keeps 1/N of every decoder layer (the NF4 weights
stored in tensors of the compute dtype, `models.quantization.bnb_config(shardable=True)`, so they shard like any
other tensor) and all-gathers a layer just before it runs. It is configured through TrainingArguments, so the
launcher is the same plain `accelerate launch` as DDP's, and the README's multi-node recipe serves both.

- One FSDP unit per decoder layer (accelerate's transformer-based wrap on the model's `_no_split_modules`), and
  none per LoRA layer: PEFT's own FSDP wrap policy gives every LoRA A and B matrix a unit, hundreds of tiny
  collectives per step, which is FSDP1's route through accelerate and what this module replaced.
- Checkpoints hold the adapter and its optimizer state sharded (torch.distributed.checkpoint, one file per
  process): nothing gathers the 4-bit base to save a few megabytes of LoRA weights.
- The adapter for the stage's out is gathered with torch.distributed.checkpoint.state_dict, trainable weights only.
- The output projection stays whole on every process (`keep_output_projection_whole`), so Liger's kernels run
  under FSDP as under DDP.
- The base is staged in host memory (`models.loading.load_model(shardable=True)`) and `fully_shard` moves it to the
  GPU one unit at a time, keeping this process's shard: accelerate's rank-0 loading (`cpu_ram_efficient_loading`)
  skips 4-bit models, as Params4bit does not survive the move to the meta device it relies on.
- bitsandbytes' quantization constants (each layer's `quant_state`: absmax, code) are not parameters, so FSDP leaves
  them whole on every process; bitsandbytes puts them back on the gathered weight in `Linear4bit.forward`.
"""
from __future__ import annotations

from typing import Any

import torch

from alpaca_qlora.errors import PipelineError

FSDP_CONFIG: dict[str, Any] = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "state_dict_type": "SHARDED_STATE_DICT",
    "reshard_after_forward": True,  # free a layer's gathered weights after its forward: the memory FSDP is for
    "cpu_ram_efficient_loading": False,  # every process loads the (4-bit) base itself; rank-0 loading skips bnb
}


def fsdp_training_arguments(offload: bool = False) -> dict[str, Any]:
    """TrainingArguments for FSDP2 through accelerate (Trainer builds the FullyShardedDataParallelPlugin).

    `offload`: FSDP2's CPUOffloadPolicy, shards kept in host memory and copied in for each layer's gather, for cards
    too small for even a shard of the base."""
    return {"fsdp": True, "fsdp_config": {**FSDP_CONFIG, "cpu_offload": offload}}


def reduce_in_fp32(plugin: Any, compute_dtype: torch.dtype | None) -> None:
    """FSDP2's mixed precision with gradients reduced in fp32 and outputs left as computed, on the Trainer's plugin
    before it wraps the model.

    accelerate's policy for bf16 reduces in bf16 and casts every unit's output, the loss included, to bf16, so the
    loss FSDP logged was not DDP's; transformers' own FSDP plan uses this policy (param bf16, reduce fp32, output as
    computed).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is not None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                             output_dtype=None)


def keep_output_projection_whole(plugin: Any, model: torch.nn.Module, compute_dtype: torch.dtype | None,
                                 device: torch.device | str | None = None) -> None:
    """Leave the output projection out of FSDP's shards (FSDP2's ignored params), on the Trainer's plugin before it
    wraps the model.

    Liger's fused linear cross-entropy reads `lm_head.weight` directly, not through the module's call where FSDP
    would gather it, so a shard (a DTensor) reached the kernel and the first forward failed. The projection is
    frozen: keeping it whole costs its size on each GPU and no communication. FSDP's mixed precision no longer casts
    it, so it is cast to `compute_dtype` here, as the hidden states reaching it are; nor does `fully_shard` move it,
    so it is moved to the training `device` here (the base is staged in host memory).
    """
    projection = model.get_output_embeddings()
    if any(parameter.requires_grad for parameter in projection.parameters()):
        # FSDP never reduces ignored parameters: trained ones would drift apart between processes
        raise PipelineError("train.distributed=fsdp keeps the output projection unsharded, so it cannot be trained "
                            "there; remove lm_head from lora.target_modules, or use ddp.")
    if isinstance(plugin.ignored_modules, str):
        raise PipelineError(f"FSDP's ignored modules are set as a pattern ({plugin.ignored_modules!r}, e.g. from "
                            "FSDP_IGNORED_MODULES); unset it, the train stage names the modules FSDP leaves whole.")
    projection.to(device=device, dtype=compute_dtype)
    plugin.ignored_modules = [*(plugin.ignored_modules or []), projection]


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable weights, on process 0's CPU; the other processes get an empty dict.

    A collective: every process must call it. Frozen weights are skipped, so the 4-bit base is never gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    # torch keeps a frozen weight tied to another under its second name (Gemma's lm_head, the embeddings): drop it
    return {name: tensor for name, tensor in get_model_state_dict(model, options=options).items() if name in trainable}
