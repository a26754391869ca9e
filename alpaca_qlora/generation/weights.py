"""Weights for generation: the 4-bit base dequantized once, LoRA optionally merged, and a name for the result.

bitsandbytes' 4-bit matmul for a batch of rows is dequantize + F.linear, so dequantizing once before decoding gives
the same weights without redoing it at every step. Merging LoRA is different: it rounds base + delta to the compute
dtype once, which changes the weights' precision, so it is an explicit option whose results differ from the 4-bit
path.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)


class DequantizedLinear(torch.nn.Linear):
    """A bitsandbytes Linear4bit's weights dequantized once: the forward bnb runs for a batch of rows, minus the
    per-call dequantization (inputs cast to the compute dtype, F.linear, result cast back like Linear4bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def _linear4bit_class() -> type | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.nn.Linear4bit


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
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, linear4bit):
                setattr(module, name, dequantize_linear4bit(child))
                replaced += 1
    if replaced:
        log.info("dequantized %d 4-bit linear layers for generation", replaced)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return replaced


def dequantized_fits(model: Any, *, reserve_share: float = 0.25) -> bool:
    """Whether the 4-bit layers, dequantized to their compute dtype, fit on the GPU beside what the process holds,
    with `reserve_share` of the card left for activations and the KV cache. False on a card too small for them (a 7B model on 12 GB), where
    generation keeps the 4-bit layers."""
    linear4bit = _linear4bit_class()
    if linear4bit is None or not torch.cuda.is_available():
        return False
    layers = [module for module in model.modules() if isinstance(module, linear4bit)]
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
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    linear4bit = _linear4bit_class()
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, LoraLayer):
                continue
            base = child.get_base_layer()
            if linear4bit is not None and isinstance(base, linear4bit):
                raise PipelineError("merge_lora_for_generation needs dequantized base weights: "
                                    "call dequantize_for_generation first.")
            if not isinstance(base, torch.nn.Linear):
                raise PipelineError(f"cannot merge LoRA into a {type(base).__name__} ({name}).")
            weight = base.weight.data.float()
            for adapter in child.active_adapters:
                if adapter not in child.lora_A:
                    continue
                if getattr(child, "use_dora", {}).get(adapter) or adapter in getattr(child, "lora_variant", {}):
                    raise PipelineError("merging for generation supports plain LoRA only (not DoRA or variants).")
                delta = child.lora_B[adapter].weight.data.float() @ child.lora_A[adapter].weight.data.float()
                weight = weight + delta * child.scaling[adapter]
            base.weight = torch.nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
            setattr(module, name, base)
            merged += 1
    if merged:
        log.info("merged %d LoRA layers into the base weights for generation", merged)
    return merged


def describe_weights(model: Any, *, quantized: bool, dequantized: bool, merged: bool) -> str:
    """What the generating weights are, for the metrics: nf4, nf4-dequantized-bf16, merged-bf16, unquantized-fp32."""
    dtype = str(getattr(model, "dtype", None) or next(model.parameters()).dtype).removeprefix("torch.")
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    if merged:
        return f"merged-{dtype}"
    if quantized:
        return f"nf4-dequantized-{dtype}" if dequantized else "nf4"
    return f"unquantized-{dtype}"
