"""Training on several processes: where this process sits, the `accelerate launch` that starts the others, and
the token counts summed over all of them."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.training.data import TokenCounts


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a distributed run (torchrun / `accelerate launch` set these variables)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group() -> ProcessGroup:
    return ProcessGroup(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        world_size=int(os.environ.get("WORLD_SIZE", 1)))


def accelerate_command(train: Any, script: str, device: str) -> list[str] | None:
    """The `accelerate launch` command that reruns `script` on train.num_processes processes.

    None when no launch is needed: train.distributed is none, or this process was already started by a launcher.
    The DVC stage's command stays `python stages/train.py`; the stage re-executes itself under accelerate.
    """
    if train.distributed == "none" or "LOCAL_RANK" in os.environ:
        return None
    if train.distributed == "fsdp" and device != "cuda":
        # accelerate turns its FSDP plugin on for GPU process groups only; on CPU the run would silently be DDP.
        raise PipelineError("train.distributed=fsdp needs CUDA GPUs (accelerate runs FSDP on GPU process groups "
                            "only); use ddp (gloo) on CPU, or none.")
    if device == "cuda" and torch.cuda.device_count() < train.num_processes:
        raise PipelineError(f"train.num_processes={train.num_processes} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s); lower it or use a machine with more GPUs.")
    # The same launch for ddp and fsdp: FSDP is set up by the Trainer's arguments (training.sharding), so an
    # outside launcher (the README's multi-node recipe) needs no FSDP flags either.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--num_processes", str(train.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0"]  # 0: a free port, so two runs on one host (a sweep, CI) never collide
    if train.num_processes > 1:
        command += ["--multi_gpu"]  # torchrun under the hood: gloo on CPU, NCCL on GPUs
    return command + [script]


def all_reduce_counts(counts: TokenCounts) -> TokenCounts:
    """Tokens seen by all processes together (each process counts only its own micro-batches)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only, gloo CPU tensors
    totals = torch.tensor([counts.tokens, counts.labelled, counts.padded], dtype=torch.long,
                          device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(totals)
    tokens, labelled, padded = (int(value) for value in totals.tolist())
    return TokenCounts(tokens=tokens, labelled=labelled, padded=padded)

