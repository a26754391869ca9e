"""LoRA grouped by input for generation: PEFT's arithmetic run once for q/k/v and once for gate/up, alone for the
other projections."""
from __future__ import annotations

import collections

import pytest
import torch

from alpaca_qlora.generation import dequantize_for_generation, group_lora_for_generation, prepare_for_generation
from alpaca_qlora.generation.lora_groups import GroupedLoraMember
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.numerics import to_cpu_float64
from alpaca_qlora.models.quantization import QuantizationPlan, plan_quantization, probe_4bit
from bench.host_overhead import OperatorCount
from support.generation import bnb_default_path, run

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 415, 2936, 9060, 285, 1142], [1, 1014, 349, 264, 1369, 28723]])


def lora_model(model_dir, quantization: str, targets: list[str], **lora: object):
    """The tiny Mistral with a random (non-zero) LoRA on `targets`, on CPU's float64 generation path: from NF4 the
    4-bit bases are dequantized (PEFT's 4-bit LoRA class stays), unquantized bases are PEFT's lora.Linear."""
    from peft import LoraConfig, get_peft_model

    model = load_model(str(model_dir), plan_quantization(quantization, "cpu"), device="cpu")
    bnb_default_path(model)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets, init_lora_weights=False,
                        task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, config)
    to_cpu_float64(model, quantized=quantization == "nf4")
    return model, load_tokenizer(str(model_dir), padding_side="left")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_grouped_lora_gives_peft_logits_and_greedy_tokens(tiny_mistral_dir, quantization):
    model, tokenizer = lora_model(tiny_mistral_dir, quantization, SEVEN)
    before = logits(model)
    plain = run(model, tokenizer, "plain", markers=(), max_new_tokens=12)
    assert run(model, tokenizer, "fast", markers=(), max_new_tokens=12) == plain
    layers = model.config.num_hidden_layers
    assert group_lora_for_generation(model) == 4 * layers  # q/k/v, o, gate/up, down
    members = [module for module in model.modules() if isinstance(module, GroupedLoraMember)]
    assert len(members) == 7 * layers and sum(member.index == 0 for member in members) == 4 * layers
    for member in members:  # the members' weights are views of the stacked ones, stored once
        if len(member.group.layers) == 1:  # alone: its own weights, nothing stacked
            assert member.group.base_layer is None and not list(member.group.buffers())
            continue
        stacked = member.group.base_layer.weight.untyped_storage().data_ptr()
        assert member.lora_layer.get_base_layer().weight.untyped_storage().data_ptr() == stacked
    assert all(member.group.applies() for member in members)  # eval mode, as the model was: grouped forward
    assert group_lora_for_generation(model) == 0  # grouped already: nothing wrapped twice
    after = logits(model)
    # not bitwise: the wider GEMMs may sum each output's products in another order (float64: ~1e-16 relative)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    with model.disable_adapter():
        assert (logits(model) - before).abs().max() > 1e-3  # the adapter matters
    for method in ("plain", "fast", "graphed"):
        assert run(model, tokenizer, method, markers=(), max_new_tokens=12) == plain


def projection_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype each of the first layer's seven projections hands on, over one forward."""
    layer = model.get_base_model().model.layers[0]
    seen, hooks = {}, []
    for name in SEVEN:
        block = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
        hooks.append(getattr(block, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, output.dtype)))
    logits(model)
    for hook in hooks:
        hook.remove()
    return seen


def bf16_lora_model(model_dir, quantization: str, adapters: int = 1):
    """CUDA's dtypes on CPU: bf16 weights (NF4 dequantized after the adapters are set, PEFT's 4-bit LoRA class kept;
    or lora.Linear) with fp32 adapters, `adapters` of them active, in eval mode."""
    from peft import LoraConfig, get_peft_model

    model = load_model(str(model_dir), QuantizationPlan(quantization == "nf4", "test", torch.bfloat16), device="cpu")
    if quantization == "nf4":
        bnb_default_path(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False,
                                             task_type="CAUSAL_LM")).eval()
    if adapters == 2:
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=SEVEN, init_lora_weights=False,
                                               task_type="CAUSAL_LM"))
        model.base_model.set_adapter(["default", "second"])
        model.eval()
    if quantization == "nf4":
        dequantize_for_generation(model)
    return model


@pytest.mark.parametrize("quantization", [pytest.param("nf4", marks=pytest.mark.skipif(
    not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU")), "none"])
def test_in_the_gpus_dtypes_grouping_keeps_each_projections_output_dtype_and_the_logits(tiny_mistral_dir,
                                                                                       quantization):
    """CUDA's setting on CPU: bf16 weights (NF4 dequantized, PEFT's 4-bit LoRA class kept, which casts the adapter's
    output before adding it; or lora.Linear, which adds in fp32 and casts the sum) with fp32 adapters. Each grouped
    projection hands on PEFT's dtype, and the logits stay PEFT's within bf16 rounding (on this CPU they are equal)."""
    model = bf16_lora_model(tiny_mistral_dir, quantization)
    assert {p.dtype for name, p in model.named_parameters() if "lora_" in name} == {torch.float32}
    dtypes, before = projection_dtypes(model), logits(model)
    assert group_lora_for_generation(model) == 4 * model.config.num_hidden_layers
    assert projection_dtypes(model) == dtypes and set(dtypes.values()) == {torch.bfloat16}
    after = logits(model)
    assert after.dtype == before.dtype
    torch.testing.assert_close(after, before)  # bf16's tolerances


def dispatched(call) -> collections.Counter[str]:
    """The operators `call()` dispatches that run a kernel, by name (the host-overhead bench's count)."""
    with OperatorCount() as count:
        call()
    return collections.Counter({name.removeprefix("aten::"): calls for name, calls in count.calls.items()})


@pytest.mark.parametrize("adapters", [1, 2])
@pytest.mark.parametrize("quantization", [pytest.param("nf4", marks=pytest.mark.skipif(
    not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU")), "none"])
def test_a_projection_alone_is_peft_bit_for_bit_with_fewer_kernels(tiny_mistral_dir, quantization, adapters):
    """o_proj and down_proj have no sibling reading their input: alone they run PEFT's own GEMMs, so in CUDA's dtypes
    (bf16 base, fp32 adapter) their output is PEFT's bit for bit, with one or two adapters active, and of PEFT's
    kernels the copy of the base output (4-bit class) and a cast go: the cast is the store of the multiply (4-bit
    class, one per adapter) or of the last add (lora.Linear)."""
    model = bf16_lora_model(tiny_mistral_dir, quantization, adapters)
    layer = model.get_base_model().model.layers[0]
    assert len(layer.self_attn.o_proj.active_adapters) == adapters
    peft_layers = {"o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj}
    inputs = {name: torch.randn(3, 5, peft.in_features, generator=torch.Generator().manual_seed(2)).bfloat16()
              for name, peft in peft_layers.items()}
    with torch.no_grad():
        expected = {name: peft(inputs[name]) for name, peft in peft_layers.items()}
        peft_ops = dispatched(lambda: peft_layers["o_proj"](inputs["o_proj"]))
        group_lora_for_generation(model)
        alone = {"o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj}
        assert all(len(member.group.layers) == 1 for member in alone.values())
        for name, member in alone.items():
            output = member(inputs[name])
            assert output.dtype == torch.bfloat16 and torch.equal(output, expected[name]), name
        ops = dispatched(lambda: alone["o_proj"](inputs["o_proj"]))
    casts_saved = adapters if quantization == "nf4" else 1
    assert sum(ops.values()) == sum(peft_ops.values()) - casts_saved - (quantization == "nf4")  # clone: 4-bit only
    assert ops["clone"] == 0 and ops["_to_copy"] == peft_ops["_to_copy"] - casts_saved
    inputs_with_grad = inputs["o_proj"].clone().requires_grad_()  # autograd recording: the two-kernel form
    output = alone["o_proj"](inputs_with_grad)
    output.float().sum().backward()
    assert torch.equal(output, expected["o_proj"]) and inputs_with_grad.grad is not None


def test_member_called_with_another_input_computes_its_own(tiny_mistral_dir):
    model, _ = lora_model(tiny_mistral_dir, "none", SEVEN)
    group_lora_for_generation(model)
    attention = model.get_base_model().model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    torch.manual_seed(1)
    first, second = torch.randn(2, 3, 64, dtype=torch.float64), torch.randn(2, 3, 64, dtype=torch.float64)
    with torch.no_grad():
        own = {(name, id(x)): member.lora_layer(x) for name, member in (("q", q), ("k", k), ("v", v))
               for x in (first, second)}
        query = q(first)
        keys = k(first)  # the same tensor object: the group's slice, in the storage of q's output
        assert keys.untyped_storage().data_ptr() == query.untyped_storage().data_ptr()
        torch.testing.assert_close(keys, own["k", id(first)], rtol=1e-12, atol=1e-12)
        q(first)
        other = k(second)  # another input: its own output, not the slice for `first`
        assert other.untyped_storage().data_ptr() != query.untyped_storage().data_ptr()
        torch.testing.assert_close(other, own["k", id(second)], rtol=1e-12, atol=1e-12)
        values = v(first)  # the group forgot `first` at the mismatch: computed on its own, still right
        torch.testing.assert_close(values, own["v", id(first)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v(second), own["v", id(second)], rtol=1e-12, atol=1e-12)  # before any q call
        with model.disable_adapter():  # PEFT's own switch still reaches the grouped layers
            assert torch.equal(q(first), q.lora_layer.get_base_layer()(first))
        q.lora_layer.scaling["default"] *= 2  # PEFT's set_scale after grouping: the layer's own forward again
        assert not q.group.applies()
        assert torch.equal(q(first), q.lora_layer(first))


def test_projections_without_their_group_run_alone_and_variants_stay_as_peft_has_them(tiny_mistral_dir):
    from peft.tuners.lora import LoraLayer

    model, _ = lora_model(tiny_mistral_dir, "none", ["q_proj", "v_proj", "gate_proj", "up_proj"])
    before = logits(model)
    common = {"requested": "fast", "method": "fast", "device": "cpu", "quantized": False,
              "dequantized_on_load": False, "merge": False, "fold": False}
    prepare_for_generation(model, **common)
    assert not any(isinstance(module, GroupedLoraMember) for module in model.modules())  # CUDA only
    # q and v without k: each alone; gate and up: one group per layer
    assert group_lora_for_generation(model) == 3 * 2
    attention = model.get_base_model().model.layers[0].self_attn
    assert attention.q_proj.group is not attention.v_proj.group and len(attention.q_proj.group.layers) == 1
    assert len(model.get_base_model().model.layers[0].mlp.up_proj.group.layers) == 2
    torch.testing.assert_close(logits(model), before, rtol=1e-12, atol=1e-12)

    dora, _ = lora_model(tiny_mistral_dir, "none", SEVEN, use_dora=True)
    assert group_lora_for_generation(dora) == 0
    assert all(isinstance(layer.self_attn.q_proj, LoraLayer) for layer in dora.get_base_model().model.layers)
    mixed, _ = lora_model(tiny_mistral_dir, "none", SEVEN)
    mixed.base_model.model.model.layers[0].self_attn.k_proj.scaling["default"] = 3.0
    assert group_lora_for_generation(mixed) == 4 * 2 + 2  # layer 0's q, k and v each alone


def test_4bit_bases_are_not_grouped(tiny_mistral_dir):
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_mistral_dir), plan_quantization("nf4", "cpu"), device="cpu")
    bnb_default_path(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=SEVEN, task_type="CAUSAL_LM"))
    assert group_lora_for_generation(model) == 0


@pytest.mark.parametrize(("family", "groups_per_layer"), [("Qwen2", 4), ("Phi3", 4)])
def test_biases_are_stacked_and_fused_projections_run_alone(family, groups_per_layer):
    """Qwen2's q/k/v carry biases, stacked with the weights; Phi-3's qkv_proj and gate_up_proj are one layer each
    already: each of its four projections runs alone."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = getattr(transformers, f"{family}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(torch.float64).eval()
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert group_lora_for_generation(model) == groups_per_layer * 2
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-12, atol=1e-12)
    group = model.get_base_model().model.layers[0].self_attn.qkv_proj.group if family == "Phi3" else \
        model.get_base_model().model.layers[0].self_attn.q_proj.group
    assert group.applies()
    if family == "Qwen2":
        assert group.base_layer.bias.shape == (64 + 2 * 32,)
