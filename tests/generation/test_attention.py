"""The attention graphed decoding runs through: sdpa with enable_gqa, key/value heads unrepeated."""
from __future__ import annotations

import pytest
import torch

from support.generation import PROMPTS, run


def test_graphed_attends_through_sdpa_enable_gqa_then_restores_the_models_attention(embedded, monkeypatch):
    """The embedded model has fewer key/value heads than query heads: graphed must hand sdpa the key/value heads
    unrepeated, and leave the model's own attention in place for the next caller."""
    from alpaca_qlora.generation import attention

    model, tokenizer, _ = embedded
    seen, own = [], model.config._attn_implementation
    original = attention.sdpa_enable_gqa

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((query.shape[1], key.shape[1]))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_enable_gqa", spy)
    run(model, tokenizer, "graphed", max_new_tokens=4, prompts=PROMPTS[:2])
    assert seen and all(query_heads > kv_heads for query_heads, kv_heads in seen)
    assert model.config._attn_implementation == own
    seen.clear()
    run(model, tokenizer, "plain", max_new_tokens=4, prompts=PROMPTS[:2])
    assert not seen


@pytest.mark.parametrize("queries", [1, 5])
def test_sdpa_enable_gqa_equals_attention_over_repeated_heads(queries):
    """One decoding step (a padded mask) and a prompt (causal, no mask) against the textbook computation with each
    key/value head repeated for its query heads."""
    from alpaca_qlora.generation.attention import sdpa_enable_gqa

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, keys, dim = 2, 6, 2, 5, 8
    query = torch.randn(batch, heads, queries, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, keys, dim, generator=generator) for _ in range(2))
    mask = None
    allowed = torch.ones(batch, 1, queries, keys, dtype=torch.bool).tril(diagonal=keys - queries)
    if queries == 1:
        mask = allowed.clone()
        mask[0, ..., :2] = False  # row 0 is left-padded by two positions
        allowed = mask
    output, _ = sdpa_enable_gqa(None, query, key, value, mask, scaling=dim ** -0.5)
    repeated_key, repeated_value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    scores = (query @ repeated_key.transpose(-1, -2)) * dim ** -0.5
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ repeated_value
    assert output.shape == (batch, queries, heads, dim)
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
