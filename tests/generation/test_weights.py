"""The weights generation runs on: a dequantized 4-bit base, LoRA merged or folded beside the base layer."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation import (
    dequantize_for_generation,
    describe_weights,
    fold_lora_for_generation,
    merge_lora_for_generation,
)
from alpaca_qlora.generation.weights import DequantizedLinear
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from support.generation import bnb_default_path, run


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
