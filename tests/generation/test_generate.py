"""Our generation loops against generate(): fast (own greedy loop, finished rows dropped, dequantized 4-bit base)
and graphed (static KV cache, the decoding step a CUDA graph on GPU, run eagerly here)."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.config import ConfigError
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation import (
    dequantize_for_generation,
    describe_weights,
    fold_lora_for_generation,
    generate,
    merge_lora_for_generation,
    resolve_generation_method,
)
from alpaca_qlora.generation.weights import DequantizedLinear
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from support.params import embedded_params

TEMPLATE = get_template("alpaca")
QUESTIONS = ["What is the capital of France?", "Name the chemical symbol of sodium.", "Write a haiku about the sea.",
             "Classify 'I love it' as positive or negative.", "List three primary colors.", "What is 2+2?"]
PROMPTS = [TEMPLATE.render(question, "") for question in QUESTIONS]


def bnb_default_path(model) -> None:
    """On AVX512-BF16 CPUs bnb repacks 4-bit weights for a bf16 kernel at the first eval forward; keep it on the
    path CUDA takes for batches (dequantize + F.linear) so the comparison is the GPU's."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def run(model, tokenizer, method, markers=TEMPLATE.stop_markers, max_new_tokens=30, batch_size=6, prompts=PROMPTS):
    generations, stats = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  stop_markers=markers, progress=False, method=method)
    assert stats["generation"] == method
    return generations


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    plan = plan_quantization("auto", "cpu")
    model = load_model(str(embedded_model_dir), plan, device="cpu")
    bnb_default_path(model)
    return model, load_tokenizer(str(embedded_model_dir), padding_side="left"), plan


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


def test_dequantized_fast_path_matches_4bit_generate(embedded_model_dir):
    """The fast path as CUDA runs it: NF4 base dequantized once, own loop; tokens equal bnb 4-bit generate()."""
    plan = plan_quantization("nf4", "cpu")
    model = load_model(str(embedded_model_dir), plan, device="cpu")
    tokenizer = load_tokenizer(str(embedded_model_dir), padding_side="left")
    bnb_default_path(model)
    plain = run(model, tokenizer, "plain", max_new_tokens=20)
    assert dequantize_for_generation(model) == 30 * 7
    assert run(model, tokenizer, "fast", max_new_tokens=20) == plain
    assert describe_weights(model, quantized=True, dequantized=True, merged=False) == "nf4-dequantized-fp32"


@pytest.fixture()
def tiny_lora(tiny_mistral_dir):
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_mistral_dir), plan_quantization("nf4", "cpu"), device="cpu")
    bnb_default_path(model)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config), load_tokenizer(str(tiny_mistral_dir), padding_side="left")


def test_dequantized_linear_equals_bnb_batched_matmul(tiny_lora):
    """bnb's matmul for a batch of rows is dequantize_4bit + F.linear (CUDA's fallback, CPU's default kernel)."""
    import bitsandbytes

    model, _ = tiny_lora
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    torch.manual_seed(1)
    inputs = {id(layer): torch.randn(5, 3, layer.in_features) for layer in layers}
    expected = {id(layer): bitsandbytes.matmul_4bit(inputs[id(layer)], layer.weight,
                                                    quant_state=layer.weight.quant_state)
                for layer in layers}
    assert dequantize_for_generation(model) == len(layers) == 2 * 7
    replaced = [m for m in model.modules() if isinstance(m, DequantizedLinear)]
    assert not any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
    lora_bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert len(lora_bases) == 2 * 3 and all(isinstance(base, DequantizedLinear) for base in lora_bases)
    for layer, linear in zip(layers, replaced):
        assert torch.equal(linear(inputs[id(layer)]), expected[id(layer)])


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


def test_merge_changes_weights_only_explicitly(tiny_lora):
    model, tokenizer = tiny_lora
    with pytest.raises(PipelineError, match="dequantize_for_generation first"):
        merge_lora_for_generation(model)
    dequantize_for_generation(model)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert merge_lora_for_generation(model) == 6
        assert not any(hasattr(m, "lora_A") for m in model.modules())
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)  # fp32 here; bf16 on CUDA rounds base + delta once
    assert describe_weights(model, quantized=True, dequantized=True, merged=True) == "merged-fp32"


@pytest.mark.parametrize("dequantized", [False, True])
def test_folded_lora_gives_peft_logits_and_tokens(tiny_lora, dequantized):
    """Folding keeps the adapter beside the base layer (4-bit or dequantized): in fp32, as here, the same logits as
    PEFT's forward up to summation order, and the same greedy tokens, with a second active adapter stacked in."""
    from peft import LoraConfig

    from alpaca_qlora.generation.weights import FoldedLoraLinear

    model, tokenizer = tiny_lora
    torch.manual_seed(2)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    if dequantized:
        dequantize_for_generation(model)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    plain = run(model, tokenizer, "plain", markers=(), max_new_tokens=12)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fold_lora_for_generation(model) == 6
        after = model(input_ids=ids).logits
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert sorted(m.lora_down.shape[0] for m in model.modules() if isinstance(m, FoldedLoraLinear)) == [4] * 4 + [6] * 2
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert run(model, tokenizer, "graphed", markers=(), max_new_tokens=12) == plain
    assert describe_weights(model, quantized=True, dequantized=dequantized, merged=False, folded=True) == \
        ("nf4-dequantized-fp32+lora-fp32" if dequantized else "nf4+lora-fp32")


def test_folded_lora_in_bf16_adds_the_delta_within_bf16_rounding():
    """bf16, as on CUDA, with a delta as large as the base output: the fused add keeps the delta (not dropped, not
    scaled twice) to within bf16's rounding of the adapter and the sum."""
    from alpaca_qlora.generation.weights import FoldedLoraLinear

    torch.manual_seed(3)
    base = torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    down, up = torch.randn(8, 256) * 0.1, torch.randn(64, 8) * 0.1
    x = torch.randn(4, 6, 256).to(torch.bfloat16)
    with torch.no_grad():
        folded = FoldedLoraLinear(base, down.to(torch.bfloat16), up.to(torch.bfloat16))(x)
        exact = base(x).double() + (x.double() @ down.double().t()) @ up.double().t()
    assert folded.shape == (4, 6, 64) and folded.dtype == torch.bfloat16
    error = (folded.double() - exact).abs().max() / exact.abs().max()
    assert error < 2 ** -6, error
    assert (base(x).double() - exact).abs().max() / exact.abs().max() > 0.1  # the delta matters here


def test_prepare_for_generation_folds_or_merges_only_when_asked(tiny_lora):
    from alpaca_qlora.generation import prepare_for_generation

    model, _ = tiny_lora
    common = {"requested": "graphed", "method": "graphed", "device": "cpu", "quantized": True,
              "dequantized_on_load": False}
    assert prepare_for_generation(model, merge=False, fold=False, **common) == "nf4"
    assert sum(hasattr(m, "lora_A") for m in model.modules()) == 6
    with torch.no_grad(), model.disable_adapter():  # a disabled adapter is one PEFT would not apply: left alone
        assert fold_lora_for_generation(model) == 0
    assert prepare_for_generation(model, merge=True, fold=True, **common) == "merged-fp32"  # merging wins


def test_folding_refuses_lora_bias_rather_than_dropping_it(tiny_mistral_dir):
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(PipelineError, match="lora_bias"):
        fold_lora_for_generation(model)
    with pytest.raises(PipelineError, match="lora_bias"):
        merge_lora_for_generation(model)


def test_generation_method_resolution(embedded):
    model, _, _ = embedded
    assert resolve_generation_method("plain") == "plain"
    assert resolve_generation_method("fast") == "fast"
    assert resolve_generation_method("graphed") == "graphed"
    assert resolve_generation_method("auto", "cuda") == "graphed"  # the fastest where the device has graphs
    assert resolve_generation_method("auto", "cpu") == "plain"
    assert resolve_generation_method("auto", torch.device("cuda", 1)) == "graphed"
    with pytest.raises(PipelineError, match="generation method"):
        resolve_generation_method("turbo")
    original = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.2
    try:
        with pytest.raises(PipelineError, match="repetition_penalty"):
            generate(model, None, [], max_new_tokens=1, batch_size=1, stop_markers=(), method="fast")
        # auto never picks a loop that would refuse the model: plain applies the processors
        assert resolve_generation_method("auto", "cuda", model) == "plain"
    finally:
        model.generation_config.repetition_penalty = original


def test_eval_generation_params_validated():
    embedded = embedded_params().eval  # params.yaml: auto, which is plain generate() on CPU; LoRA kept apart
    assert embedded.generation == "auto" and embedded.merge_bf16 is False and embedded.fold_lora is False
    assert resolve_generation_method(embedded.generation, "cpu") == "plain"
    params = embedded_params(eval={"generation": "fast", "merge_bf16": "true"})
    assert params.eval.generation == "fast" and params.eval.merge_bf16 is True
    assert embedded_params(eval={"generation": "plain"}).eval.generation == "plain"
    with pytest.raises(ConfigError, match="eval.generation"):
        embedded_params(eval={"generation": "turbo"})
    with pytest.raises(ConfigError, match="eval.merge_bf16"):
        embedded_params(eval={"merge_bf16": "yes"})
    assert embedded_params(eval={"fold_lora": "true"}).eval.fold_lora is True
    with pytest.raises(ConfigError, match="exclude each other"):
        embedded_params(eval={"merge_bf16": "true", "fold_lora": "true"})


@pytest.mark.parametrize("stage", ["evaluate_base", "evaluate_finetuned"])
def test_evaluate_stages_declare_generation_params(stage):
    from alpaca_qlora.stage_params import declared_params

    assert {"eval.generation", "eval.merge_bf16", "eval.fold_lora"} <= set(declared_params(stage))


def test_graphed_refuses_batches_beyond_the_sliding_window(tiny_lora):
    """A static cache keeps every key in view: past a sliding window it would attend where the model does not."""
    model, tokenizer = tiny_lora
    config = model.get_base_model().config
    original, config.sliding_window = getattr(config, "sliding_window", None), 40
    try:
        with pytest.raises(PipelineError, match="sliding window"):
            run(model, tokenizer, "graphed", max_new_tokens=30, prompts=PROMPTS[:2])
    finally:
        config.sliding_window = original


def test_auto_is_plain_on_cpu_with_plain_tokens(embedded):
    model, tokenizer, _ = embedded
    generations, stats = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=12, batch_size=3,
                                  stop_markers=TEMPLATE.stop_markers, progress=False, method="auto")
    assert stats["generation"] == "plain"  # what the metrics record: the method that ran
    assert generations == run(model, tokenizer, "plain", max_new_tokens=12, prompts=PROMPTS[:3])


@pytest.mark.parametrize("check_every", [1, 3, 64])
def test_graphed_stop_checks_a_chunk_behind_keep_plain_tokens(embedded, check_every):
    """The host checks each chunk of steps while the next decodes, so the loop runs past the last stop; the
    rows keep exactly plain's tokens at every chunk size, and the phase timings are filled."""
    from alpaca_qlora.data.formatting import encode_prompt
    from alpaca_qlora.generation.batching import left_pad, split_generated
    from alpaca_qlora.generation.graphed import graphed_generate
    from alpaca_qlora.generation.stop_checks import MarkerCheck

    model, tokenizer, _ = embedded
    plain = run(model, tokenizer, "plain", max_new_tokens=20)
    input_ids, attention_mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    timings: dict[str, float] = {}
    rows = graphed_generate(model, input_ids, attention_mask, max_new_tokens=20, eos_token_id=tokenizer.eos_token_id,
                            marker_check=MarkerCheck(tokenizer, TEMPLATE.stop_markers), check_every=check_every,
                            timings=timings)
    texts = [tokenizer.decode(split_generated(r, tokenizer.eos_token_id, tokenizer.pad_token_id)[0],
                              skip_special_tokens=True) for r in rows]
    assert texts == [g.raw for g in plain]
    assert {"prefill", "capture", "decode", "host_check"} <= set(timings)


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
