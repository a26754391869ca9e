"""The frozen base weight as the fused LoRA function reads it, in one of three forms the memory plan chooses from.

- **NF4, dequantized afresh** at every forward, recomputation and backward, as bitsandbytes' own backward does, so
  that no dequantized copy outlives the matmul that needs it. With double quantization (QLoRA's recipe) each call
  first dequantizes the 8-bit block scales, adds their offset, then dequantizes the weight: three kernels, and
  bitsandbytes' Python around each, which sets the pace where a step is bound by the host (small micro-batches).
- **NF4 with its block scales kept in fp32** (keep_absmax): the scales bitsandbytes would compute at every call,
  computed once by its own code, so each call is one kernel through bitsandbytes' op. An eighth of the 4-bit
  weight's memory; the same values bit for bit.
- **A kept dequantized copy** (keep_dequantized): no kernel at all, for the weight's full size in the compute dtype.

The kept forms are plain attributes of the base layer (not parameters or buffers): what is stored and saved stays NF4.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from alpaca_qlora.models.quantization import is_4bit

KEPT_WEIGHT = "kept_dequantized_weight"  # the attribute keep_dequantized sets on a base layer
KEPT_ABSMAX = "kept_absmax"  # the attribute keep_absmax sets on a base layer


def frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight, (out_features, in_features), in `dtype`, from the cheapest form kept for it."""
    kept = base.__dict__.get(KEPT_WEIGHT)
    if kept is not None and kept.dtype == dtype:
        return kept
    if not is_4bit(base):
        return base.weight.to(dtype)
    state = quant_state(base)
    absmax = base.__dict__.get(KEPT_ABSMAX)
    if absmax is not None:
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            base.weight.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, state.dtype).to(dtype)
    import bitsandbytes

    return bitsandbytes.functional.dequantize_4bit(base.weight.view(-1, 1), state).to(dtype)


def quant_state(base: torch.nn.Module) -> Any:
    """The 4-bit weight's bitsandbytes QuantState. FSDP can drop it from the weight; Linear4bit.forward restores it so,
    first, and so does this."""
    import bitsandbytes

    bitsandbytes.nn.modules.fix_4bit_weight_quant_state_from_module(base)
    return base.weight.quant_state


def frozen_bias(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The base layer's bias in `dtype` (frozen: the fused function computes no gradient for it)."""
    return None if base.bias is None else base.bias.to(dtype)


def dequantized_bytes(bases: Iterable[torch.nn.Module], dtype: torch.dtype) -> int:
    """What keep_dequantized would hold for these bases in `dtype`."""
    return sum(base.out_features * base.in_features * dtype.itemsize for base in bases)


def absmax_bytes(bases: Iterable[torch.nn.Module]) -> int:
    """What keep_absmax would add for these 4-bit bases: fp32 scales where they are double-quantized (elsewhere
    the weight's own fp32 scales are kept by reference)."""
    states = [quant_state(base) for base in bases]
    return sum(state.absmax.numel() * torch.float32.itemsize for state in states if state.nested)


@torch.no_grad()
def keep_absmax(bases: Iterable[torch.nn.Module]) -> None:
    """Keep each 4-bit base's block scales in fp32, computed as bitsandbytes' dequantize_4bit computes them at every
    call (its 8-bit scales dequantized, plus their offset), so frozen_weight runs only the weight's own kernel."""
    import bitsandbytes

    for base in bases:
        state = quant_state(base)
        absmax = state.absmax
        if state.nested:
            absmax = bitsandbytes.functional.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        base.__dict__[KEPT_ABSMAX] = absmax.float()


@torch.no_grad()
def keep_dequantized(bases: Iterable[torch.nn.Module], dtype: torch.dtype) -> None:
    """Dequantize these frozen 4-bit weights once and keep them in `dtype` for the rest of the run: the same values
    the fused function would dequantize at every forward, recomputation and backward, without the kernels."""
    for base in bases:
        base.__dict__[KEPT_WEIGHT] = frozen_weight(base, dtype)


def drop_kept(model: torch.nn.Module) -> None:
    """Every kept form (dequantized copies, fp32 block scales) under `model`, fused now or not, dropped."""
    for module in model.modules():
        module.__dict__.pop(KEPT_WEIGHT, None)
        module.__dict__.pop(KEPT_ABSMAX, None)
