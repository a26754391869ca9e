"""Our greedy loops against generate(): fast (own greedy loop, finished rows dropped, dequantized 4-bit base)
and graphed (static KV cache, the decoding step a CUDA graph on GPU, run eagerly here)."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.generation import dequantize_for_generation
from support.generation import PROMPTS, TEMPLATE, run


@pytest.mark.parametrize("method", ["fast", "graphed"])
def test_own_loop_matches_generate_with_rows_stopping_at_different_steps(embedded, method):
    model, tokenizer, _ = embedded
    plain = run(model, tokenizer, "plain")
    assert run(model, tokenizer, method) == plain
    lengths = {g.new_tokens for g in plain if g.stopped_by_eos}
    assert len(lengths) >= 3 and any(not g.stopped_by_eos for g in plain)  # EOS at several steps, and the limit
    # stop markers: the first word of two answers becomes a marker, so those rows stop by marker, not EOS
    markers = tuple(dict.fromkeys(g.raw.split()[0] for g in plain[:2] if g.raw.split()))
    plain_m = run(model, tokenizer, "plain", markers=markers)
    assert run(model, tokenizer, method, markers=markers) == plain_m
    assert any(not g.stopped_by_eos and g.new_tokens < 30 for g in plain_m)
    # batches of uneven size and a batch of one
    assert run(model, tokenizer, method, batch_size=4) == run(model, tokenizer, "plain", batch_size=4)


@pytest.mark.parametrize("method", ["fast", "graphed"])
def test_own_loop_with_lora_and_forced_eos(tiny_lora, method):
    """Random weights never stop: EOS's output row is made a scaled copy of a frequent token's, so rows stop
    (at different steps) wherever that token would have won; LoRA stays attached, unmerged."""
    model, tokenizer = tiny_lora
    prompts = PROMPTS + [TEMPLATE.render("Why?", "")]
    from alpaca_qlora.data.formatting import encode_prompt
    from alpaca_qlora.generation.batching import left_pad

    input_ids, attention_mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    with torch.no_grad():
        new_ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=30,
                                 do_sample=False)[:, input_ids.shape[1]:].tolist()
    first = {row[0] for row in new_ids}
    counts = {}
    for row in new_ids:
        for token in row[2:]:
            if token not in first:
                counts[token] = counts.get(token, 0) + 1
    frequent = max(counts, key=counts.get)
    head = model.get_base_model().lm_head.weight
    with torch.no_grad():
        head[tokenizer.eos_token_id] = head[frequent] * 1.01
    plain = run(model, tokenizer, "plain", markers=(), prompts=prompts)
    stops = sorted(g.new_tokens for g in plain if g.stopped_by_eos)
    assert len(set(stops)) >= 2, stops
    assert run(model, tokenizer, method, markers=(), prompts=prompts) == plain  # 4-bit bnb layers
    assert dequantize_for_generation(model) == 14
    assert run(model, tokenizer, method, markers=(), prompts=prompts) == plain
    assert run(model, tokenizer, method, markers=(), prompts=prompts, batch_size=3) == \
        run(model, tokenizer, "plain", markers=(), prompts=prompts, batch_size=3)
