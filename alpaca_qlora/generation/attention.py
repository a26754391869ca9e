"""Decode attention for `graphed`: torch's sdpa over the key/value heads with `enable_gqa=True` and the mask.

transformers' sdpa path (the 5.17 the GPU image ships) repeats or re-lays out the keys and values of each
key/value head for its query heads whenever a mask is passed, which is every step of a padded batch, and those
copies run at every decoding step (README: evaluation generation). sdpa's `enable_gqa` reads each key/value head
once for its group of query heads. It is registered through transformers' AttentionInterface and switched on only
for the duration of a `graphed` run, and only over the library's own sdpa (other implementations carry terms this
function does not: soft-capping, sinks); its answers agree with `plain` on a sure model (measured in the README).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

GQA_SDPA = "sdpa_enable_gqa"


def sdpa_enable_gqa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, positions, dim) in, (batch, positions, heads,
    dim) out. Without a mask a prompt (more than one query position) attends causally, as the library's sdpa does."""
    causal = bool(query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else True))
    if causal and key.shape[2] != query.shape[2]:  # sdpa's is_causal aligns top-left: right only without a cache
        raise ValueError("sdpa_enable_gqa: a causal call without a mask needs as many keys as queries.")
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    """Make GQA_SDPA a name transformers resolves, once; the function is looked up at each call (a test wraps it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, lambda *args, **kwargs: sdpa_enable_gqa(*args, **kwargs))
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)


@contextmanager
def gqa_attention(network: Any) -> Iterator[None]:
    """Run the model's attention through sdpa_enable_gqa inside the block (masks built as for sdpa) where the model
    uses the library's sdpa, then restore the model's own implementation, also on error."""
    config = network.config
    own = config._attn_implementation
    if own != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = GQA_SDPA
    try:
        yield
    finally:
        config._attn_implementation = own
