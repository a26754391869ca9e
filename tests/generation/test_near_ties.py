"""The CPU fast loop decoding with a float32 copy while float64 decides the near ties: float64's tokens, a margin
that does the work, and the fallback when float32 strays too far."""
from __future__ import annotations

import logging

import pytest
import torch

from alpaca_qlora.data.formatting import encode_prompt
from alpaca_qlora.generation import generate, greedy
from alpaca_qlora.generation.batching import left_pad
from alpaca_qlora.generation.near_ties import NearTieCheck
from alpaca_qlora.models import numerics
from alpaca_qlora.models.inference import load_for_inference, with_float32_copy
from alpaca_qlora.models.numerics import float32_copy
from support.generation import PROMPTS, QUESTIONS, TEMPLATE


@pytest.fixture(scope="module")
def float64_lora(tiny_mistral_dir):
    """A random tiny Mistral with LoRA in float64: its logits are nearly tied at many steps (the hard case)."""
    from peft import LoraConfig, get_peft_model

    from alpaca_qlora.models.loading import load_model, load_tokenizer
    from alpaca_qlora.models.quantization import plan_quantization

    torch.manual_seed(0)
    base = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu").to(torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM")).to(torch.float64)
    return model.eval(), load_tokenizer(str(tiny_mistral_dir), padding_side="left")


def perturbed(model, scale: float):
    """A float32 copy whose output projection is off by noise of `scale`: a CPU whose float32 rounds worse."""
    copied = float32_copy(model)
    head = copied.get_base_model().lm_head.weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)) * scale)
    return copied


def greedy_ids(model, tokenizer, tie_check=None):
    input_ids, attention_mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    return greedy.greedy_generate(model, input_ids, attention_mask, max_new_tokens=30, eos_token_id=-1,
                                  tie_check=tie_check)


def test_float32_copy_with_float64_deciding_near_ties_gives_the_float64_tokens(embedded_model_dir):
    """What the evaluate stage runs on CPU: the embedded model's answers equal plain generate()'s in float64, the
    first row's first pick was decided (and measured) in float64, and float32's error stayed far under the margin."""
    loaded = with_float32_copy(load_for_inference(str(embedded_model_dir), "auto", device="cpu"))
    assert {p.dtype for p in loaded.float32_copy.parameters()} == {torch.float32}
    assert "float32 copy" in loaded.numeric_path["decoding"]
    prompts = [TEMPLATE.render(q, "") for q in QUESTIONS]
    settings = {"max_new_tokens": 30, "batch_size": 4, "stop_markers": TEMPLATE.stop_markers, "progress": False}
    plain, _ = generate(loaded.model, loaded.tokenizer, prompts, method="plain", **settings)
    fast, stats = generate(loaded.model, loaded.tokenizer, prompts, method="auto", float32_copy=loaded.float32_copy,
                           **settings)
    assert fast == plain and not stats["near_tie_float32_dropped"]
    assert stats["near_tie_float64_decisions"] >= 2  # one sampled first pick per batch of 4, at least
    assert 0 < stats["near_tie_float32_error_max"] < 0.01 / 4


def test_the_margin_sends_the_picks_float32_would_get_wrong_to_float64(float64_lora):
    model, tokenizer = float64_lora
    reference = greedy_ids(model, tokenizer)
    assert greedy_ids(float32_copy(model), tokenizer) == reference  # plain float32: too close to float64 to differ
    coarse = perturbed(model, 1e-4)
    assert greedy_ids(coarse, tokenizer) != reference  # a coarser float32 flips near ties
    check = NearTieCheck(greedy.forward_model(model), margin=0.032)
    assert greedy_ids(coarse, tokenizer, check) == reference
    steps = len(PROMPTS) * 30
    assert 0 < check.decisions < steps  # float64 decided some picks, not every one
    assert check.error_max < 0.032 / 4


def test_rows_leaving_the_batch_keep_their_own_sequences_for_float64(float64_lora):
    """Rows stop at different steps (EOS made a token they reach at different steps) and leave the batch; with
    float64 deciding every pick (an infinite margin), a sequence handed to the wrong row would change the tokens."""
    model, tokenizer = float64_lora
    input_ids, attention_mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    free = greedy.greedy_generate(model, input_ids, attention_mask, max_new_tokens=30, eos_token_id=-1)
    firsts = {}  # token -> the step each row first generates it at
    for row in free:
        for step, token in enumerate(row):
            firsts.setdefault(token, {}).setdefault(id(row), step)
    eos = max(firsts, key=lambda token: (len(set(firsts[token].values())), len(firsts[token])))
    assert len(set(firsts[eos].values())) >= 3  # rows finish at three steps or more

    def run(network, tie_check=None):
        return greedy.greedy_generate(network, input_ids, attention_mask, max_new_tokens=30, eos_token_id=eos,
                                      tie_check=tie_check)

    expected = run(model)
    check = NearTieCheck(greedy.forward_model(model), margin=float("inf"))
    assert run(perturbed(model, 1e-6), check) == expected
    assert check.decisions == sum(len(row) for row in expected)  # every pick of every row, none of a finished one


def test_float32_found_too_coarse_leaves_the_batch_to_float64(float64_lora, caplog):
    model, tokenizer = float64_lora
    settings = {"max_new_tokens": 20, "batch_size": 3, "stop_markers": (), "progress": False}
    expected, _ = generate(model, tokenizer, PROMPTS, method="fast", **settings)
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.generation"):
        answers, stats = generate(model, tokenizer, PROMPTS, method="fast", float32_copy=perturbed(model, 1e-2),
                                  **settings)
    assert answers == expected
    assert "answering in float64 alone" in caplog.text
    assert stats["near_tie_float32_error_max"] > 0.01 / 4 and stats["near_tie_float32_dropped"]


def test_the_float32_copy_is_the_float64_model_narrowed_and_none_where_the_host_lacks_the_memory(float64_lora,
                                                                                                 monkeypatch):
    model, _ = float64_lora
    copied = float32_copy(model)
    originals, narrowed = dict(model.named_parameters()), dict(copied.named_parameters())
    assert narrowed.keys() == originals.keys() and all(p.dtype == torch.float32 for p in narrowed.values())
    for name, parameter in originals.items():
        assert torch.equal(narrowed[name].double(), parameter), name  # exact: every float64 weight came from float32
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert (copied.get_input_embeddings().weight is copied.get_output_embeddings().weight) == tied
    assert all(buffer.dtype == torch.float32 for buffer in copied.buffers() if buffer.is_floating_point())
    needed = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    monkeypatch.setattr(numerics, "available_host_bytes", lambda: needed)  # no room for the reserve beside it
    assert float32_copy(model) is None
    monkeypatch.setattr(numerics, "available_host_bytes", lambda: needed + numerics.FLOAT32_COPY_RESERVE_BYTES)
    assert float32_copy(model) is not None


def test_no_float32_copy_where_float32_matmuls_may_run_narrower(float64_lora):
    model, _ = float64_lora
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # lets oneDNN take bf16 for float32 matmuls
        assert float32_copy(model) is None
    finally:
        torch.set_float32_matmul_precision(before)
    assert float32_copy(model) is not None
