"""Training to a memory budget: which decoder layers keep their activations and which recompute them.

Recomputing a layer in backward (gradient checkpointing) costs a third pass over its weights; keeping its
activations costs memory. With `train.memory_budget_gib` the stage keeps as many layers as the budget holds and
checkpoints the rest, instead of checkpointing every layer while most of the card sits idle.

The costs are measured, not modelled: short training steps (forward and backward, no optimizer step) with every
layer checkpointed and with every layer kept, at two token counts, read the allocator's peak. A step's peak grows
linearly with the tokens of a micro-batch (varlen and flash attention keep no tokens-squared tensors), so two
counts give each mode's line, and the run's micro-batch is read off it; the peak with k layers kept lies between
the two modes, a k-th of the difference a layer. The process is then capped at the budget
(`set_per_process_memory_fraction`), so the allocator frees its cache and retries before it would pass it.

Under fused LoRA, memory the plan leaves over after the activations goes to the forms the frozen 4-bit weights are read
in (frozen_weights), the same values in each: first their block scales in fp32 (an eighth of the 4-bit weights'
memory, for two of the three dequantization kernels of every read and most of bitsandbytes' Python around them), then
dequantized copies, a layer at a time (no kernel at all). The base stays NF4 in what is stored and saved.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.training.frozen_weights import (
    absmax_bytes,
    dequantized_bytes,
    drop_kept,
    keep_absmax,
    keep_dequantized,
)
from alpaca_qlora.training.fused_lora import fused_4bit_bases

log = logging.getLogger(__name__)

GIB = 2**30
# `auto`: the card's memory less this share of it, at least AUTO_MARGIN_MIN_GIB: the CUDA context, cuBLAS and
# NCCL workspaces live outside PyTorch's allocator, which the budget caps.
AUTO_MARGIN_SHARE = 0.05
AUTO_MARGIN_MIN_GIB = 1.0
# On top of the measured activations: allocator fragmentation at the run's larger sizes and step-to-step jitter
# (packed bins, with grouped-query heads unrepeated, keep what the probe's dense rows keep: README).
ACTIVATION_HEADROOM = 1.1
PROBE_TOKENS = 512  # the larger probe, small enough for a 12 GB card with every layer kept; the smaller is half
OPTIMIZER_BYTES_PER_TRAINABLE = 4 + 4  # AdamW's two fp32 moments (gradients are in the probe's measured peak)


@dataclass(frozen=True)
class StepPeaks:
    """A training step's peak above what was allocated before it, as a line in the tokens of a micro-batch, with
    every layer checkpointed and with every layer kept."""

    layers: int
    checkpointed_base: float
    checkpointed_per_token: float
    kept_base: float
    kept_per_token: float

    def checkpointed(self, tokens: int) -> float:
        return max(0.0, self.checkpointed_base + self.checkpointed_per_token * tokens)

    def per_kept_layer(self, tokens: int) -> float:
        kept = max(0.0, self.kept_base + self.kept_per_token * tokens)
        return max(0.0, kept - self.checkpointed(tokens)) / self.layers


@dataclass(frozen=True)
class MemoryPlan:
    """Which layers recompute, and the peak the plan expects; recorded in the run's timing."""

    budget_gib: float
    tokens_per_micro_batch: int
    checkpointed_layers: tuple[int, ...]
    kept_layers: int
    expected_peak_gib: float
    fixed_gib: float
    dequantized_layers: int = 0  # the first layers: their frozen weights kept dequantized
    absmax_layers: int = 0  # the layers after those: their frozen weights' block scales kept in fp32

    def record(self) -> dict[str, Any]:
        """The plan's figures; the budget itself the stage records, plan or none."""
        return {f"memory_plan_{key}": value for key, value in dataclasses.asdict(self).items()
                if key not in ("checkpointed_layers", "budget_gib")} | {
                    "memory_plan_checkpointed_layers": len(self.checkpointed_layers)}


@dataclass(frozen=True)
class MemoryBudget:
    """What the stage asks of the plan: the budget, the most tokens a micro-batch holds, and whether checkpointing
    is the plan's to decide (gradient_checkpointing auto)."""

    gib: float
    tokens_per_micro_batch: int
    plans_layers: bool


def memory_budget(train: Any, device: str) -> MemoryBudget | None:
    """The train params' budget on this device: none on CPU (no device memory to plan) and under FSDP (each
    process holds a shard, which the plan's whole-model figures do not describe), where the cap is not applied."""
    if device != "cuda" or train.distributed == "fsdp":
        return None
    gib = resolve_budget_gib(train.memory_budget_gib, usable_bytes(torch.cuda.current_device()))
    return MemoryBudget(gib=gib, tokens_per_micro_batch=train.micro_batch_size * train.max_seq_length,
                        plans_layers=train.gradient_checkpointing == "auto")


def usable_bytes(device: int | torch.device) -> int:
    """The card's memory, or the share of it this process's allocator is capped at already (a bench running the
    stage as a smaller card would): the budget plans within that cap and its own cap never lifts it."""
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(device))


def prefer_expandable_segments() -> None:
    """Before CUDA's first allocation: expandable segments, so memory freed in one block size serves another and
    a capped process does not fail on fragmentation. A setting the user made stays."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def resolve_budget_gib(requested: str | float, total_bytes: int) -> float:
    """The budget in GiB of `total_bytes` (what the process may use): an explicit figure as given (refused above
    it), `auto` that less the margin."""
    total_gib = total_bytes / GIB
    if requested == "auto":
        return round(total_gib - max(AUTO_MARGIN_MIN_GIB, AUTO_MARGIN_SHARE * total_gib), 2)
    budget = float(requested)
    if budget > total_gib:
        raise PipelineError(f"train.memory_budget_gib = {budget:g} is more than this GPU has for this process "
                            f"({total_gib:.1f} GiB); use auto or a smaller figure.")
    return budget


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable decoder layers, in forward order (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        raise PipelineError("train.memory_budget_gib: this model has no checkpointable decoder layers to plan.")
    return layers


def _set_checkpointing(layers: Sequence[torch.nn.Module], on: bool) -> None:
    for layer in layers:
        layer.gradient_checkpointing = on


def _step_peak(model: torch.nn.Module, tokens: int, compute_dtype: torch.dtype) -> float:
    """Forward and backward over `tokens` random tokens under the training's autocast; the allocator's peak above
    what was allocated before."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, tokens), device=device, generator=torch.Generator(device).manual_seed(0))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    for parameter in model.parameters():
        parameter.grad = None
    return float(peak)


def measure_step_peaks(model: torch.nn.Module, compute_dtype: torch.dtype, *, tokens: int = PROBE_TOKENS
                       ) -> StepPeaks:
    """Four short steps: every layer checkpointed, then every layer kept, each at `tokens` and half as many.
    The model's checkpointing must be enabled; the flags the caller set are restored."""
    layers = decoder_layers(model)
    flags = [layer.gradient_checkpointing for layer in layers]
    small = tokens // 2
    was_training = model.training
    model.train()
    try:
        lines = []
        for checkpointed in (True, False):
            _set_checkpointing(layers, checkpointed)
            low, high = (_step_peak(model, count, compute_dtype) for count in (small, tokens))
            slope = (high - low) / (tokens - small)
            lines += [low - slope * small, slope]
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = flag
        model.train(was_training)
    return StepPeaks(len(layers), *lines)


def plan_layers(peaks: StepPeaks, *, budget_gib: float, fixed_bytes: float, tokens: int) -> MemoryPlan:
    """Keep the most layers the budget holds and checkpoint the first ones: backward frees the kept (last) layers'
    activations before it recomputes the checkpointed ones."""
    budget = budget_gib * GIB

    def peak(kept: int) -> float:
        return fixed_bytes + ACTIVATION_HEADROOM * (peaks.checkpointed(tokens) + kept * peaks.per_kept_layer(tokens))

    kept = next((count for count in range(peaks.layers, -1, -1) if peak(count) <= budget), None)
    if kept is None:
        raise PipelineError(
            f"train.memory_budget_gib = {budget_gib:g}: training needs about {peak(0) / GIB:.1f} GiB even with every "
            f"layer checkpointed ({fixed_bytes / GIB:.1f} GiB of weights, adapter and optimizer, {tokens} tokens a "
            "micro-batch). Lower train.micro_batch_size or train.max_seq_length, set train.checkpoint_offload=true, "
            "or raise the budget.")
    return MemoryPlan(budget_gib=budget_gib, tokens_per_micro_batch=tokens,
                      checkpointed_layers=tuple(range(peaks.layers - kept)), kept_layers=kept,
                      expected_peak_gib=round(peak(kept) / GIB, 2), fixed_gib=round(fixed_bytes / GIB, 2))


def plan_frozen_forms(plan: MemoryPlan, *, layers: int, dequantized_bytes: int, absmax_bytes: int) -> MemoryPlan:
    """What the budget holds beyond the kept activations goes to the frozen 4-bit weights' kept forms, a decoder layer
    at a time (the bytes are a layer's): fp32 block scales first, for as many layers as fit, since they save two of
    three kernels a read for a 32nd of a dequantized copy's memory; then, once every layer has its scales, dequantized
    copies from the first layers on (those recompute: three reads a step, against two), each replacing its layer's
    scales. Activations come before either: a kept activation saves a whole recomputation."""
    room = (plan.budget_gib - plan.expected_peak_gib) * GIB
    scaled = 0 if absmax_bytes <= 0 else max(0, min(layers, int(room // absmax_bytes)))
    room -= scaled * absmax_bytes
    every_layer_scaled = absmax_bytes <= 0 or scaled == layers  # else the room ran out on scales
    upgrade = dequantized_bytes - absmax_bytes  # a dequantized copy replaces its layer's scales
    dequantized = max(0, min(layers, int(room // upgrade))) if dequantized_bytes > 0 and every_layer_scaled else 0
    added = scaled * absmax_bytes + dequantized * upgrade
    return dataclasses.replace(plan, dequantized_layers=dequantized, absmax_layers=scaled - min(scaled, dequantized),
                               expected_peak_gib=round(plan.expected_peak_gib + added / GIB, 2))


def apply_plan(model: torch.nn.Module, plan: MemoryPlan, compute_dtype: torch.dtype) -> None:
    """Checkpointing on for the planned layers only (the model's checkpointing must already be enabled), and the
    frozen weights kept in the planned forms: the first layers dequantized, the others' block scales in fp32 where
    planned (what an earlier plan kept, dropped)."""
    checkpointed = set(plan.checkpointed_layers)
    drop_kept(model)
    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = index in checkpointed
        if index < plan.dequantized_layers:
            keep_dequantized(fused_4bit_bases(layer), compute_dtype)
        elif index < plan.dequantized_layers + plan.absmax_layers:
            keep_absmax(fused_4bit_bases(layer))


def fixed_bytes(model: torch.nn.Module, device: torch.device) -> float:
    """What the run holds outside a step's own peak: the weights and adapter now allocated, and the optimizer's
    moments to come."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return torch.cuda.memory_allocated(device) + trainable * OPTIMIZER_BYTES_PER_TRAINABLE


def cap_process_memory(budget_gib: float, device: torch.device) -> None:
    """PyTorch's allocator may hold at most the budget: it frees its cache and retries before passing it."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), device)


def plan_to_budget(model: torch.nn.Module, budget: MemoryBudget, compute_dtype: torch.dtype) -> MemoryPlan | None:
    """Where checkpointing is left to it, measure and keep the layers that fit, and give what is left to the frozen
    weights' kept forms; then cap the process at the budget (after the probe, which runs with every layer kept)."""
    device = next(model.parameters()).device
    drop_kept(model)  # what an earlier plan kept is not part of what this one measures
    plan = None
    if budget.plans_layers:
        tokens = budget.tokens_per_micro_batch
        peaks = measure_step_peaks(model, compute_dtype, tokens=max(2, min(PROBE_TOKENS, tokens)))
        plan = plan_layers(peaks, budget_gib=budget.gib, fixed_bytes=fixed_bytes(model, device), tokens=tokens)
        bases = [fused_4bit_bases(layer) for layer in decoder_layers(model)]
        plan = plan_frozen_forms(plan, layers=len(bases),
                                 dequantized_bytes=max(dequantized_bytes(layer, compute_dtype) for layer in bases),
                                 absmax_bytes=max(absmax_bytes(layer) for layer in bases))
        apply_plan(model, plan, compute_dtype)
        log.info("memory budget %.2f GiB, %d tokens a micro-batch: %d of %d layers keep their activations, %d "
                 "recompute; %d keep their frozen weights dequantized, %d their block scales in fp32 (expected peak "
                 "%.2f GiB)", budget.gib, tokens, plan.kept_layers, peaks.layers, len(plan.checkpointed_layers),
                 plan.dequantized_layers, plan.absmax_layers, plan.expected_peak_gib)
    else:
        log.info("memory budget %.2f GiB: the process is capped; gradient checkpointing as train params set it",
                 budget.gib)
    torch.cuda.empty_cache()
    cap_process_memory(budget.gib, device)
    return plan


__all__ = ["MemoryBudget", "MemoryPlan", "StepPeaks", "apply_plan", "measure_step_peaks", "memory_budget",
           "plan_frozen_forms", "plan_layers", "plan_to_budget", "prefer_expandable_segments", "resolve_budget_gib",
           "usable_bytes"]
