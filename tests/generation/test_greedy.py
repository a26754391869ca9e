"""Our greedy loops against generate(): fast (own greedy loop, finished rows dropped, dequantized 4-bit base)
and graphed (static KV cache, the decoding step a CUDA graph on GPU, run eagerly here)."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.generation import dequantize_for_generation
from support.generation import PROMPTS, TEMPLATE, run


@pytest.mark.parametrize("method", ["fast", "graphed"])
def test_own_loop_matches_generate_with_rows_stopping_at_different_steps(embedded, method, monkeypatch):
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
    if method == "fast":  # finished rows kept, and fed their own tokens, until half the batch has finished
        from alpaca_qlora.generation import greedy

        monkeypatch.setattr(greedy, "DROP_FINISHED_SHARE", 2)
        assert run(model, tokenizer, method) == plain


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


def test_a_batch_prefilled_in_chunks_gives_the_whole_batchs_logits_and_tokens(tiny_mistral_dir, monkeypatch):
    """Chunks of two rows (float64, the CPU path): each chunk's shared first tokens run once, then each row's own;
    the logits and cached keys of every row's tokens are the whole batch's, and the tokens generate()'s."""
    from peft import LoraConfig, get_peft_model

    from alpaca_qlora.data.formatting import encode_prompt
    from alpaca_qlora.generation import greedy
    from alpaca_qlora.generation.batching import left_pad, length_sorted_batches
    from alpaca_qlora.models.loading import load_model, load_tokenizer
    from alpaca_qlora.models.quantization import plan_quantization

    torch.manual_seed(0)
    base = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu").to(torch.float64)
    base.config.sliding_window = None  # as Mistral-7B-v0.2's: its window (the context) gives sliding cache layers
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM")).to(torch.float64)
    tokenizer = load_tokenizer(str(tiny_mistral_dir), padding_side="left")
    prompts = PROMPTS + [TEMPLATE.render("Summarize the text.", "A long input " * k) for k in (3, 9, 20)]
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = length_sorted_batches([len(ids) for ids in encoded], len(encoded))[0]
    input_ids, attention_mask = left_pad([encoded[index] for index in order], tokenizer.pad_token_id)
    network = greedy.forward_model(model)
    capacity = input_ids.shape[1] + 4
    with torch.inference_mode():
        whole_logits, whole_cache, whole_mask = greedy.prefill(network, input_ids, attention_mask, capacity=capacity)
        monkeypatch.setattr(greedy, "PREFILL_ROWS", 2)
        chunk_logits, chunk_cache, chunk_mask = greedy.prefill(network, input_ids, attention_mask, capacity=capacity)
    assert torch.equal(whole_mask, attention_mask)
    assert torch.equal(chunk_mask.sum(dim=1), attention_mask.sum(dim=1))  # every row's tokens, no more
    holes = chunk_mask[:, 1:] < chunk_mask[:, :-1]  # a 1 then a 0: shared tokens, then padding, then its own
    assert holes.any(dim=1).sum() >= 2
    torch.testing.assert_close(chunk_logits, whole_logits, rtol=0, atol=1e-12)
    for whole, chunked in zip(whole_cache.layers, chunk_cache.layers, strict=True):
        assert chunked.keys.shape == whole.keys.shape
        for row in range(len(prompts)):
            torch.testing.assert_close(chunked.keys[row][:, chunk_mask[row].bool()],
                                       whole.keys[row][:, attention_mask[row].bool()], rtol=0, atol=1e-12)
        assert chunked.keys.isfinite().all()  # masked positions too: attention weighs them by zero
    assert run(model, tokenizer, "fast", prompts=prompts, batch_size=9) == \
        run(model, tokenizer, "plain", prompts=prompts, batch_size=9)
