"""The memory a training run needed: the GPU's peak while the model was loaded and sharded, its peak while training,
and the host's, for every process (what a card and a host must hold is the largest of them)."""
from __future__ import annotations

import resource
from typing import Any

import torch
from transformers import TrainerCallback


def host_peak_gib() -> float:
    """This process's peak resident memory: the base staged in host memory for FSDP counts here."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def gpu_peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def per_process(value: float) -> list[float]:
    """`value` of every process, in rank order (a collective: every process calls it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [round(value, 3)]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return [round(float(v), 3) for v in values]


class LoadingPeak(TrainerCallback):
    """The GPU peak from the start of the run until training begins, then a fresh peak for training.

    The Trainer shards the model (FSDP) inside `train()`, before its first step, so under FSDP this peak holds the
    loading and the sharding: the figure that decides whether a base fits a card at all.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_gib: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.device == "cuda":
            self.peak_gib = gpu_peak_gib()
            torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str, loading: LoadingPeak | None = None) -> dict[str, Any]:
    """The run's peaks for metrics: the largest over processes, and each process's (a collective)."""
    host = per_process(host_peak_gib())
    figures: dict[str, Any] = {"host_peak_memory_gib_per_process": host}
    if device != "cuda":
        return {"peak_memory_gib": max(host), "peak_memory_kind": "process_max_rss", **figures}
    training = per_process(gpu_peak_gib())
    figures.update(peak_memory_gib=max(training), peak_memory_kind="cuda_max_allocated",
                   peak_memory_gib_per_process=training)
    if loading is not None and loading.peak_gib is not None:
        figures["load_peak_memory_gib_per_process"] = per_process(loading.peak_gib)
    return figures
