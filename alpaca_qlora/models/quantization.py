"""Whether the base loads in 4-bit NF4 (bitsandbytes) or unquantized, decided openly and recorded in the metrics."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError

QUANTIZATION_CHOICES = ("auto", "nf4", "none")


@dataclass(frozen=True)
class QuantizationPlan:
    """Whether the base is loaded in 4-bit NF4, why, and the dtype matmuls run in; recorded in the metrics."""

    quantized: bool
    reason: str
    compute_dtype: torch.dtype


def is_4bit(layer: torch.nn.Module) -> bool:
    """Whether `layer` is a bitsandbytes 4-bit linear layer (bitsandbytes may be missing where the base is not)."""
    try:
        import bitsandbytes
    except ImportError:
        return False
    return isinstance(layer, bitsandbytes.nn.Linear4bit)


@functools.cache
def probe_4bit(device: str) -> tuple[bool, str]:
    """Try bitsandbytes' NF4 once per device: a quantize/dequantize round trip of a small tensor (milliseconds)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional

        weights = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(weights, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state)
        error = (restored.float() - weights).abs().mean().item()
    except Exception as problem:  # bitsandbytes raises many types when a backend is missing
        return False, f"bitsandbytes 4-bit is unavailable on {device} ({type(problem).__name__}: {problem})"
    if error > 0.2:  # well above a working NF4 round trip of N(0, 1) data; a broken backend returns noise
        return False, f"bitsandbytes NF4 on {device} gave a round-trip error of {error:.3f}"
    return True, f"bitsandbytes {bitsandbytes.__version__} supports NF4 on {device}"


def _device_type(device: str) -> str:
    try:
        return torch.device(device).type
    except RuntimeError as error:
        raise PipelineError(f"unknown device {device!r}: use 'cpu' or 'cuda'.") from error


def _cuda_compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def plan_quantization(requested: str, device: str) -> QuantizationPlan:
    """Decide 4-bit or not, openly: the reason lands in metrics/train.json and the eval metrics.

    CPU computes in fp32: on CPUs without native bf16 (AVX2-only, like our CI) bnb's bf16 path is much slower
    (README, "Details that matter"), and fp32 is the exact one.
    """
    if requested not in QUANTIZATION_CHOICES:
        raise PipelineError(f"model.quantization={requested!r}: use one of {', '.join(QUANTIZATION_CHOICES)}.")
    device_type = _device_type(device)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device {device!r} requested but torch sees no CUDA GPU; use device 'cpu'.")
        compute_dtype = _cuda_compute_dtype()
    else:
        compute_dtype = torch.float32
    if requested == "none":
        return QuantizationPlan(False, "model.quantization=none", compute_dtype)
    supported, why = probe_4bit(device)
    if supported:
        return QuantizationPlan(True, f"model.quantization={requested}: {why}", compute_dtype)
    if requested == "nf4":
        raise PipelineError(f"model.quantization=nf4 but {why}; use model.quantization=auto (falls back to "
                            f"unquantized) or none, or install a bitsandbytes with 4-bit support for {device}.")
    return QuantizationPlan(False, f"model.quantization=auto: {why}; loading unquantized", compute_dtype)


def bnb_config(plan: QuantizationPlan, *, shardable: bool = False) -> Any:
    """QLoRA's recipe: NF4 weights, double-quantized constants, matmuls in the plan's dtype.

    `shardable` stores the packed 4-bit weights in tensors of the compute dtype, so FSDP can flatten and shard them
    together with the model's other weights (FSDP + QLoRA as accelerate and PEFT document it).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=plan.compute_dtype if shardable else torch.uint8,
    )
