"""A decode-attention lever for the eval bench: sdpa over the key/value heads with `enable_gqa=True` and the mask.

transformers' own sdpa path (integrations/sdpa_attention.py) already avoids repeat_kv for a single query token by
folding the query heads of each key/value head into query positions (`pack_gqa`); it passes enable_gqa only without
a mask on CUDA, where torch's fused kernels take it. This variant always passes enable_gqa with the mask, so the
bench can measure which kernel torch picks for the masked decoding step against the library's choice.
"""
from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_enable_gqa"


def sdpa_enable_gqa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    q_length = query.shape[2]
    causal = bool(q_length > 1 and attention_mask is None and (is_causal if is_causal is not None else True))
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2).contiguous(), None


def use_attention(model: Any, name: str) -> str:
    """Switch the model (and its PEFT-wrapped base) to attention `name`, registering this module's variant;
    returns the previous implementation so the caller can switch back."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if name == NAME:
        AttentionInterface.register(NAME, sdpa_enable_gqa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    previous = config._attn_implementation
    config._attn_implementation = name
    return previous
