"""Weights for generation: the 4-bit base dequantized once, LoRA folded or merged, and a name for the result.

bitsandbytes' 4-bit matmul for a batch of rows is dequantize + F.linear, so dequantizing once before decoding gives
the same weights without redoing it at every step. Folding keeps LoRA beside the base weight, as its own two small
GEMMs in the compute dtype with the add fused: fewer kernels per step, but the adapter rounded to bf16 on CUDA, so
it is an explicit option too. Merging LoRA is different: it rounds base + delta to the
compute dtype, which loses most of the delta's precision, so it is an explicit option whose results differ.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.quantization import is_4bit

log = logging.getLogger(__name__)


class DequantizedLinear(torch.nn.Linear):
    """A bitsandbytes Linear4bit's weights dequantized once: the forward bnb runs for a batch of rows, minus the
    per-call dequantization (inputs cast to the compute dtype, F.linear, result cast back like Linear4bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def dequantize_linear4bit(layer: Any) -> DequantizedLinear:
    """The plain linear equivalent of one bnb Linear4bit: weight = dequantize_4bit(packed, quant_state), in the
    layer's compute dtype, exactly as bnb's gemm_4bit fallback (dequantize + F.linear) builds it every call."""
    import bitsandbytes.functional as bnb_functional

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bnb repacks weights for its AVX512-BF16 CPU kernel at the first eval-mode forward (computing in bf16)
        raise PipelineError("dequantize_for_generation must run before the model's first forward on CPU: bitsandbytes "
                            "has repacked this layer for its AVX512-BF16 kernel.")
    weight = bnb_functional.dequantize_4bit(layer.weight.data, state)
    dtype = layer.compute_dtype or state.dtype
    with torch.device("meta"):
        linear = DequantizedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    linear.train(layer.training)
    return linear


def dequantize_for_generation(model: Any) -> int:
    """Replace every bitsandbytes Linear4bit (also the base layer inside PEFT LoRA layers, whose adapters stay
    unmerged) by a DequantizedLinear; returns how many were replaced. Costs the weights in the compute dtype
    and saves a dequantization of every weight at every decoding step."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if is_4bit(child):
                setattr(module, name, dequantize_linear4bit(child))
                replaced += 1
    if replaced:
        log.info("dequantized %d 4-bit linear layers for generation", replaced)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return replaced


def dequantized_fits(model: Any, *, reserve_share: float = 0.25) -> bool:
    """Whether the 4-bit layers, dequantized to their compute dtype, fit on the GPU beside what the process holds,
    with `reserve_share` of the card left for activations and the KV cache. False on a card too small for them (a
    7B model on 12 GB), where generation keeps the 4-bit layers."""
    if not torch.cuda.is_available():
        return False
    layers = [module for module in model.modules() if is_4bit(module)]
    if not layers:
        return False
    device = layers[0].weight.device
    if device.type != "cuda":
        return False
    needed = sum(layer.in_features * layer.out_features * torch.empty((), dtype=layer.compute_dtype or torch.bfloat16)
                 .element_size() for layer in layers)
    # the card's total memory, not what is free now: the same card gives both evaluations the same weights
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.cuda.memory_allocated(device) + needed <= (1 - reserve_share) * total


def merge_lora_for_generation(model: Any) -> int:
    """Fold every LoRA adapter into its (dequantized or full-precision) base weight, in the base weight's dtype.

    Changes precision: base + scaling * B @ A is rounded to bf16 (on CUDA) once, where the 4-bit path adds the
    adapter's output at every call. Run dequantize_for_generation first on a 4-bit model. Returns the count."""
    merged = 0
    for module, name, child, adapters in _lora_layers(model):
        base = child.get_base_layer()
        if is_4bit(base):
            raise PipelineError("merge_lora_for_generation needs dequantized base weights: "
                                "call dequantize_for_generation first.")
        weight = base.weight.data.float()
        for adapter in adapters:
            delta = child.lora_B[adapter].weight.data.float() @ child.lora_A[adapter].weight.data.float()
            weight = weight + delta * child.scaling[adapter]
        base.weight = torch.nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
        setattr(module, name, base)
        merged += 1
    if merged:
        log.info("merged %d LoRA layers into the base weights for generation", merged)
    return merged


class FoldedLoraLinear(torch.nn.Module):
    """A PEFT LoRA layer for inference in two kernels instead of PEFT's six (input cast to the adapter's fp32, two
    GEMMs, scale, add, cast back), which at decoding batch sizes are each launch-bound, 224 times per step on a 7B:
    x A^T, then the base output + that times (scaling B)^T in one addmm. The adapters (all active ones, stacked) are
    in the base's compute dtype, so on CUDA their weights and the rank-sized intermediate are rounded to bf16: the
    delta loses precision (far less than merging), and the answers are not bitwise PEFT's (measured in the README)."""

    def __init__(self, base_layer: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.lora_down = torch.nn.Parameter(down, requires_grad=False)  # (rank, in): the stacked A matrices
        self.lora_up = torch.nn.Parameter(up, requires_grad=False)  # (out, rank): the stacked B matrices, scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        hidden = torch.nn.functional.linear(x.to(self.lora_down.dtype), self.lora_down)
        if result.dtype != self.lora_up.dtype:
            return result + (hidden @ self.lora_up.t()).to(result.dtype)
        flat = result.reshape(-1, result.shape[-1])
        return torch.addmm(flat, hidden.reshape(-1, hidden.shape[-1]), self.lora_up.t()).view(result.shape)


def active_lora_layers(model: Any) -> list[tuple[Any, str, Any, list[str]]]:
    """(parent, attribute, layer, active adapters) for every PEFT LoRA layer whose adapters PEFT would apply (not
    disabled, not already merged), whatever their kind."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    found = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, LoraLayer) or child.disable_adapters or child.merged:
                continue
            found.append((module, name, child, [adapter for adapter in child.active_adapters
                                                if adapter in child.lora_A]))
    return found


def is_plain_lora(layer: Any, adapters: list[str]) -> bool:
    """Whether every one of `adapters` is plain LoRA, B A x times the scaling: not DoRA, another variant, or
    lora_bias, whose arithmetic folding, merging and grouping do not reproduce."""
    return not any(getattr(layer, "use_dora", {}).get(adapter) or adapter in getattr(layer, "lora_variant", {})
                   or getattr(layer, "lora_bias", {}).get(adapter) for adapter in adapters)


def _lora_layers(model: Any) -> list[tuple[Any, str, Any, list[str]]]:
    """active_lora_layers, refusing the kinds folding and merging cannot take."""
    found = active_lora_layers(model)
    for _, name, child, adapters in found:
        if not is_plain_lora(child, adapters):
            raise PipelineError("folding or merging LoRA for generation supports plain LoRA only (not DoRA, "
                                "variants or lora_bias): set eval.fold_lora and eval.merge_bf16 to false.")
        if not isinstance(child.get_base_layer(), torch.nn.Linear):
            raise PipelineError(f"cannot fold or merge LoRA into a {type(child.get_base_layer()).__name__} "
                                f"({name}): use eval.generation 'plain'.")
    return found


def fold_lora_for_generation(model: Any) -> int:
    """Replace every PEFT LoRA layer by a FoldedLoraLinear over the same base layer (4-bit or dequantized);
    returns how many. For inference only: the adapters can no longer be trained, disabled or saved."""
    folded = 0
    for module, name, child, adapters in _lora_layers(model):
        base = child.get_base_layer()
        if not adapters:
            continue
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
        if not dtype.is_floating_point:  # a 4-bit layer without a compute dtype: keep the adapter's own
            dtype = child.lora_A[adapters[0]].weight.dtype
        down = torch.cat([child.lora_A[adapter].weight.float() for adapter in adapters])
        up = torch.cat([child.lora_B[adapter].weight.float() * child.scaling[adapter] for adapter in adapters], dim=1)
        setattr(module, name, FoldedLoraLinear(base, down.to(dtype), up.to(dtype)))
        folded += 1
    if folded:
        log.info("folded %d LoRA layers for generation", folded)
    return folded


def describe_weights(model: Any, *, quantized: bool, dequantized: bool, merged: bool, folded: bool = False) -> str:
    """What the generating weights are, for the metrics: nf4, nf4-dequantized-bf16, merged-bf16, unquantized-fp32;
    `+lora-bf16` where the adapter was folded into the compute dtype."""
    dtype = str(getattr(model, "dtype", None) or next(model.parameters()).dtype).removeprefix("torch.")
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    if merged:
        return f"merged-{dtype}"
    base = (f"nf4-dequantized-{dtype}" if dequantized else "nf4") if quantized else f"unquantized-{dtype}"
    return f"{base}+lora-{dtype}" if folded else base


def prepare_for_generation(model: Any, *, requested: str, method: str, device: str, quantized: bool,
                           dequantized_on_load: bool, merge: bool, fold: bool) -> str:
    """Put the weights in the form `method` runs fastest on with the agreement shown, and name them.

    On CPU the loader already dequantized the 4-bit base to float64 (`dequantized_on_load`). On CUDA the base is
    dequantized once (bnb's batched 4-bit matmul is dequantize + F.linear: same weights) for the fast loop, for auto
    where the bf16 weights fit, and always before merging LoRA. Merging and folding change LoRA's precision, so
    both are explicit (`merge`, `fold`). An explicit graphed keeps bnb's own
    4-bit layers. For graphed on a dequantized base, unmerged and unfolded LoRA runs PEFT's arithmetic once per
    group of projections reading one input, and alone for the others (lora_groups.py: fewer kernels, the agreement
    measured in the README for graphed, not yet for fast)."""
    on_cuda = torch.device(device).type == "cuda"
    auto_graphed = on_cuda and requested == "auto" and method == "graphed"
    fast_weights = on_cuda and (method == "fast" or (auto_graphed and dequantized_fits(model)))
    dequantized = quantized and (dequantized_on_load or merge or fast_weights)
    if dequantized and not dequantized_on_load:
        dequantize_for_generation(model)
    merged = merge and merge_lora_for_generation(model) > 0  # the base model has no adapter to merge
    folded = fold and not merged and fold_lora_for_generation(model) > 0
    if on_cuda and method == "graphed" and dequantized and not merged and not folded:
        from alpaca_qlora.generation.lora_groups import group_lora_for_generation  # it imports this module

        group_lora_for_generation(model)
    return describe_weights(model, quantized=quantized, dequantized=dequantized, merged=merged, folded=folded)
