"""Training to a memory budget: which decoder layers keep their activations and which recompute them.

Recomputing a layer in backward (gradient checkpointing) costs a third pass over its weights; keeping its
activations costs memory. With `train.memory_budget_gib` the stage keeps as many layers as the budget holds and
checkpoints the rest, instead of checkpointing every layer while most of the card sits idle.

What a layer keeps is measured, not modelled: one short forward pass with every layer's activations kept counts the
bytes each layer saves for backward (`saved_tensors_hooks`, each storage once, weights excluded). Activations grow
with the tokens of a micro-batch (varlen and flash attention keep no tokens-squared tensors), so the counts scale
to the run's micro-batch. The process is then capped at the budget (`set_per_process_memory_fraction`), so the
allocator frees its cache and retries before it would pass it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)

GIB = 2**30
# `auto`: the card's memory less this share of it, at least AUTO_MARGIN_MIN_GIB: the CUDA context, cuBLAS and
# NCCL workspaces live outside PyTorch's allocator, which the budget caps.
AUTO_MARGIN_SHARE = 0.05
AUTO_MARGIN_MIN_GIB = 1.0
# Allocator fragmentation and what the probe cannot see (autograd's temporaries), on top of the measured bytes.
ACTIVATION_HEADROOM = 1.15
PROBE_TOKENS = 256
OPTIMIZER_BYTES_PER_TRAINABLE = 4 + 4 + 4  # fp32 gradient and AdamW's two moments per trainable parameter


@dataclass(frozen=True)
class LayerCosts:
    """Bytes per token of the micro-batch: what each decoder layer keeps for backward without checkpointing, what a
    checkpointed layer keeps (its input), and what the model keeps outside its decoder layers (embeddings, loss)."""

    kept: tuple[float, ...]
    checkpointed: float
    outside_layers: float


@dataclass(frozen=True)
class MemoryPlan:
    """Which layers recompute, and the peak the plan expects; recorded in the run's timing."""

    budget_gib: float
    tokens_per_micro_batch: int
    checkpointed_layers: tuple[int, ...]
    kept_layers: int
    expected_peak_gib: float
    fixed_gib: float

    def record(self) -> dict[str, Any]:
        return {f"memory_plan_{key}": value for key, value in dataclasses.asdict(self).items()
                if key != "checkpointed_layers"} | {"memory_plan_checkpointed_layers": len(self.checkpointed_layers)}


@dataclass(frozen=True)
class MemoryBudget:
    """What the stage asks of the plan: the budget, the most tokens a micro-batch holds, whether checkpointing is
    the plan's to decide (gradient_checkpointing auto), and whether checkpoints wait in host memory."""

    gib: float
    tokens_per_micro_batch: int
    plans_layers: bool
    offloaded_checkpoints: bool


def memory_budget(train: Any, device: str) -> MemoryBudget | None:
    """The train params' budget on this device: none on CPU (no device memory to plan) and under FSDP (each
    process holds a shard, which the plan's whole-model figures do not describe), where the cap is not applied."""
    if device != "cuda" or train.distributed == "fsdp":
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    gib = resolve_budget_gib(train.memory_budget_gib, total)
    return MemoryBudget(gib=gib, tokens_per_micro_batch=train.micro_batch_size * train.max_seq_length,
                        plans_layers=train.gradient_checkpointing == "auto",
                        offloaded_checkpoints=train.checkpoint_offload)


def resolve_budget_gib(requested: str | float, total_bytes: int) -> float:
    """The budget in GiB: an explicit figure as given (refused above the card), `auto` the card less the margin."""
    total_gib = total_bytes / GIB
    if requested == "auto":
        return round(total_gib - max(AUTO_MARGIN_MIN_GIB, AUTO_MARGIN_SHARE * total_gib), 2)
    budget = float(requested)
    if budget > total_gib:
        raise PipelineError(f"train.memory_budget_gib = {budget:g} is more than this GPU has ({total_gib:.1f} GiB); "
                            "use auto or a smaller figure.")
    return budget


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable decoder layers, in forward order (transformers' GradientCheckpointingLayer)."""
    layers = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")
              and type(module).__name__.endswith(("DecoderLayer", "Block"))]
    if not layers:
        raise PipelineError("train.memory_budget_gib: this model has no checkpointable decoder layers to plan.")
    return layers


@contextlib.contextmanager
def _every_layer_kept(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    flags = [layer.gradient_checkpointing for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = flag


def measure_layer_costs(model: torch.nn.Module, *, tokens: int = PROBE_TOKENS) -> LayerCosts:
    """One training-mode forward pass over `tokens` random tokens with every layer keeping its activations; the
    bytes saved for backward, per layer and outside the layers, divided by the tokens. No backward runs."""
    layers = decoder_layers(model)
    weights = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    buckets = [0] * (len(layers) + 1)  # the last one: outside the decoder layers
    current = [len(layers)]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen and storage.device.type != "meta":
            seen.add(storage.data_ptr())
            buckets[current[0]] += storage.nbytes()
        return tensor

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, index=index: current.__setitem__(0, index)))
        hooks.append(layer.register_forward_hook(lambda *_: current.__setitem__(0, len(layers))))
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, tokens), device=device, generator=torch.Generator(device).manual_seed(0))
    was_training = model.training
    model.train()
    try:
        with _every_layer_kept(layers), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(input_ids=ids, labels=ids, use_cache=False)
            del output
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    embeddings = model.get_input_embeddings()  # a checkpointed layer keeps its input: hidden states of this dtype
    return LayerCosts(kept=tuple(count / tokens for count in buckets[:-1]),
                      checkpointed=embeddings.embedding_dim * embeddings.weight.element_size(),
                      outside_layers=buckets[-1] / tokens)


def plan_layers(costs: LayerCosts, *, budget_gib: float, fixed_bytes: float, tokens: int,
                offloaded_checkpoints: bool) -> MemoryPlan:
    """Keep the most layers the budget holds and checkpoint the first ones: backward frees the kept (last) layers'
    activations before it recomputes the checkpointed ones. The peak is the fixed bytes and the checkpoints, plus
    the kept layers' activations at the end of forward or one layer recomputed, whichever is more, plus one layer's
    worth of gradients in flight during backward."""
    budget = budget_gib * GIB
    layer_count = len(costs.kept)
    checkpoint = 0.0 if offloaded_checkpoints else costs.checkpointed * tokens
    kept_bytes = [cost * tokens * ACTIVATION_HEADROOM for cost in costs.kept]
    base = fixed_bytes + costs.outside_layers * tokens * ACTIVATION_HEADROOM

    largest = max(kept_bytes)

    def peak(kept: int) -> float:
        checkpointed = layer_count - kept
        activations = max(sum(kept_bytes[layer_count - kept:]), largest if checkpointed else 0.0)
        return base + checkpointed * checkpoint + activations + largest

    kept = next((count for count in range(layer_count, -1, -1) if peak(count) <= budget), None)
    if kept is None:
        raise PipelineError(
            f"train.memory_budget_gib = {budget_gib:g}: training needs about {peak(0) / GIB:.1f} GiB even with every "
            f"layer checkpointed{' and offloaded' if offloaded_checkpoints else ''} ({fixed_bytes / GIB:.1f} GiB of "
            f"weights, adapter and optimizer, {tokens} tokens a micro-batch). Lower train.micro_batch_size or "
            "train.max_seq_length, set train.checkpoint_offload=true, or raise the budget.")
    return MemoryPlan(budget_gib=budget_gib, tokens_per_micro_batch=tokens,
                      checkpointed_layers=tuple(range(layer_count - kept)), kept_layers=kept,
                      expected_peak_gib=round(peak(kept) / GIB, 2), fixed_gib=round(fixed_bytes / GIB, 2))


def apply_plan(model: torch.nn.Module, plan: MemoryPlan) -> None:
    """Checkpointing on for the planned layers only (the model's checkpointing must already be enabled)."""
    checkpointed = set(plan.checkpointed_layers)
    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = index in checkpointed


def fixed_bytes(model: torch.nn.Module, device: torch.device) -> float:
    """What the run holds whatever the layers keep: the weights and adapter now allocated, and the trainable
    parameters' gradients and optimizer moments to come."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return torch.cuda.memory_allocated(device) + trainable * OPTIMIZER_BYTES_PER_TRAINABLE


def cap_process_memory(budget_gib: float, device: torch.device) -> None:
    """PyTorch's allocator may hold at most the budget: it frees its cache and retries before passing it."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), device)


def plan_to_budget(model: torch.nn.Module, budget: MemoryBudget) -> MemoryPlan | None:
    """Cap the process at the budget and, where checkpointing is left to it, keep the layers that fit."""
    device = next(model.parameters()).device
    cap_process_memory(budget.gib, device)
    if not budget.plans_layers:
        log.info("memory budget %.2f GiB: the process is capped; gradient checkpointing as train params set it",
                 budget.gib)
        return None
    tokens = budget.tokens_per_micro_batch
    costs = measure_layer_costs(model, tokens=min(PROBE_TOKENS, tokens))
    plan = plan_layers(costs, budget_gib=budget.gib, fixed_bytes=fixed_bytes(model, device), tokens=tokens,
                       offloaded_checkpoints=budget.offloaded_checkpoints)
    apply_plan(model, plan)
    torch.cuda.empty_cache()
    log.info("memory budget %.2f GiB, %d tokens a micro-batch: %d of %d layers keep their activations, %d recompute "
             "(expected peak %.2f GiB)", budget.gib, tokens, plan.kept_layers, len(costs.kept),
             len(plan.checkpointed_layers), plan.expected_peak_gib)
    return plan


__all__ = ["LayerCosts", "MemoryBudget", "MemoryPlan", "apply_plan", "measure_layer_costs", "memory_budget",
           "plan_layers", "plan_to_budget", "resolve_budget_gib"]
