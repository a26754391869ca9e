"""generate(): the method it resolves to, what auto runs on CPU, and every method stopping at an indented marker
line."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.data.formatting import encode_prompt
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation import generate, resolve_generation_method
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.stop_rule import clean_generation
from support.generation import PROMPTS, TEMPLATE, run

MARKERS = ALPACA.stop_markers


def test_generation_method_resolution(embedded):
    model, _, _ = embedded
    assert resolve_generation_method("plain") == "plain"
    assert resolve_generation_method("fast") == "fast"
    assert resolve_generation_method("graphed") == "graphed"
    assert resolve_generation_method("auto", "cuda") == "graphed"  # the fastest where the device has graphs
    assert resolve_generation_method("auto", "cpu") == "fast"  # drops finished rows; plain's tokens on CPU
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
        assert resolve_generation_method("auto", "cpu", model) == "plain"
    finally:
        model.generation_config.repetition_penalty = original


@pytest.mark.parametrize(("window", "method"), [(None, "graphed"), (32, "fast"), (8192, "graphed")])
def test_auto_on_cuda_avoids_graphed_where_a_sliding_window_applies(embedded, window, method):
    """graphed's static cache keeps every key in view; a window shorter than the context (Gemma 2 and 3) needs a
    cache that applies it. A window as long as the context (Phi-3.5-mini's) is none."""
    model, _, _ = embedded
    original = getattr(model.config, "sliding_window", None)
    model.config.sliding_window = window
    try:
        assert model.config.max_position_embeddings <= 8192
        assert resolve_generation_method("auto", "cuda", model) == method
        assert resolve_generation_method("auto", "cpu", model) == "fast"
    finally:
        model.config.sliding_window = original


def test_auto_is_fast_on_cpu_with_plain_tokens(embedded):
    model, tokenizer, _ = embedded
    generations, stats = generate(model, tokenizer, PROMPTS, max_new_tokens=30, batch_size=4,
                                  stop_markers=TEMPLATE.stop_markers, progress=False, method="auto")
    assert stats["generation"] == "fast"  # what the metrics record: the method that ran
    plain = run(model, tokenizer, "plain", max_new_tokens=30, batch_size=4)
    assert generations == plain
    assert len({g.new_tokens for g in plain}) >= 3  # rows finish at different steps: fast dropped some


@pytest.fixture(scope="module")
def scripted(tiny_mistral_dir):
    """The tiny Mistral made to answer `ANSWER` to any prompt: attention and MLP add nothing, so each position's
    logits depend on its token alone, and the embedding and head map every token of the chain to the next."""
    tokenizer = load_tokenizer(str(tiny_mistral_dir), padding_side="left")
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    prompt = "What is the capital of France?"  # any prompt text: its last token starts the chain
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    chain = [prompt_ids[-1], *answer_ids, tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain) <= model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        assert embed.data_ptr() != head.data_ptr()
        embed.zero_(), head.zero_()
        for slot, (token, following) in enumerate(zip(chain, chain[1:])):
            embed[token, slot] = 1.0
            head[following, slot] = 1.0
    return model, tokenizer, prompt, answer_ids


ANSWER = "Paris\n  ### Instruction: more"


@pytest.mark.parametrize("method", ["plain", "fast", "graphed"])
def test_generate_stops_at_an_indented_marker(scripted, method):
    model, tokenizer, prompt, answer_ids = scripted
    unstopped, _ = generate(model, tokenizer, [prompt], max_new_tokens=20, batch_size=1, stop_markers=(),
                            progress=False, method=method)
    assert unstopped[0].raw == ANSWER and unstopped[0].stopped_by_eos  # the script runs to EOS without markers
    [generation], _ = generate(model, tokenizer, [prompt], max_new_tokens=20, batch_size=1, stop_markers=MARKERS,
                               progress=False, method=method)
    assert not generation.stopped_by_eos and generation.new_tokens < len(answer_ids)
    assert generation.raw.endswith("###") and generation.raw.rstrip("#").rstrip(" ") == "Paris\n"
    assert clean_generation(generation.raw, MARKERS) == clean_generation(ANSWER, MARKERS) == "Paris"
