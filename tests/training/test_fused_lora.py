"""The fused LoRA projection against PEFT's: the same loss and adapter gradients (fp32 and NF4 bases, with and without
gradient checkpointing, under bf16 autocast), the same training losses, the same saved adapter, and a refusal where
it would compute something else (LoRA dropout)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import QuantizationPlan, probe_4bit
from alpaca_qlora.training.frozen_weights import (
    KEPT_ABSMAX,
    KEPT_WEIGHT,
    absmax_bytes,
    dequantized_bytes,
    drop_kept,
    frozen_weight,
    keep_absmax,
    keep_dequantized,
)
from alpaca_qlora.training.fused_lora import FusedLoraLinear, fuse_lora_layers, fused_4bit_bases
from alpaca_qlora.training.model import attach_lora
from support.params import embedded_params

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTED_LAYERS = 14  # 7 projections x the tiny Mistral's 2 decoder layers
BASES = ["unquantized", pytest.param("nf4", marks=pytest.mark.skipif(
    not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU"))]


def lora_model(model_dir, base: str, *, dtype=torch.float32, checkpointing: str = "off", dropout: float = 0.0):
    """The tiny Mistral with LoRA on the seven projections, the same on every call; lora_B random, since PEFT starts it
    at zero, where the adapter's term and lora_A's gradient vanish and a wrong one would go unseen. `checkpointing`:
    off, on, or offload (checkpoints in host memory, the layers run under no_grad first: the Mistral profile's)."""
    plan = QuantizationPlan(quantized=base == "nf4", reason="test", compute_dtype=dtype)
    lora = embedded_params(lora={"r": 8, "alpha": 16, "dropout": dropout, "target_modules": PROJECTIONS}).lora
    torch.manual_seed(0)
    model = attach_lora(load_model(str(model_dir), plan, device="cpu"), lora, quantized=plan.quantized,
                        gradient_checkpointing=checkpointing != "off", checkpoint_offload=checkpointing == "offload")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def training_loss(model, autocast_dtype=None) -> torch.Tensor:
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(**batch()).loss


def backward(loss: torch.Tensor, *, fused: bool) -> None:
    """loss.backward(), through the fused function in every adapted layer or in none, as `fused` says: a fused model
    that fell back to PEFT's forward would pass every comparison here unseen. Counted in backward, which every
    checkpointing mode runs once per layer (offloaded checkpoints keep no graph from the forward pass)."""
    calls = []
    unpatched = FusedLoraLinear.backward

    def counted(ctx, grad_output):
        calls.append(ctx)
        return unpatched(ctx, grad_output)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedLoraLinear, "backward", staticmethod(counted))
        loss.backward()
    assert len(calls) == (ADAPTED_LAYERS if fused else 0)


def loss_and_gradients(model, *, fused: bool, autocast_dtype=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = training_loss(model, autocast_dtype)
    backward(loss, fused=fused)
    return loss.detach(), {name: parameter.grad for name, parameter in model.named_parameters()
                           if parameter.requires_grad}


def peft_then_fused(model, autocast_dtype=None) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Loss and adapter gradients of the same model, through PEFT's forward and then fused."""
    peft = loss_and_gradients(model, fused=False, autocast_dtype=autocast_dtype)
    assert fuse_lora_layers(model) == ADAPTED_LAYERS
    return [peft, loss_and_gradients(model, fused=True, autocast_dtype=autocast_dtype)]


@pytest.mark.parametrize("checkpointing", ["off", "on", "offload"])
@pytest.mark.parametrize("base", BASES)
def test_fused_loss_and_adapter_gradients_are_pefts(tiny_mistral_dir, base, checkpointing):
    (peft_loss, peft_gradients), (fused_loss, fused_gradients) = peft_then_fused(
        lora_model(tiny_mistral_dir, base, checkpointing=checkpointing))
    assert len(fused_gradients) == 2 * ADAPTED_LAYERS and fused_gradients.keys() == peft_gradients.keys()
    # Not bitwise: the adapter's term is summed into the base output inside one addmm, and the two input gradients
    # inside another, where PEFT adds them after rounding each; fp32 reassociation moves the last bits only.
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-6, atol=0)
    for name, gradient in peft_gradients.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(fused_gradients[name], gradient, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("base", BASES)
def test_under_bf16_autocast_the_fused_path_keeps_pefts_dtypes_and_accuracy(tiny_mistral_dir, base):
    """The GPU's setting on CPU: a bf16 base (or NF4 computing in bf16), fp32 LoRA weights, bf16 autocast. The
    gradients come back in fp32, and no further from the fp32 model's than PEFT's are: the two paths round at other
    points, so they differ from each other by bf16 rounding (about 2% here), not by less."""
    _, exact = loss_and_gradients(lora_model(tiny_mistral_dir, base), fused=False)
    model = lora_model(tiny_mistral_dir, base, dtype=torch.bfloat16)
    (peft_loss, peft_gradients), (fused_loss, fused_gradients) = peft_then_fused(model, torch.bfloat16)
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-3, atol=0)
    assert {gradient.dtype for gradient in [*peft_gradients.values(), *fused_gradients.values()]} == {torch.float32}

    def mean_error(gradients: dict[str, torch.Tensor]) -> float:
        return sum(((gradients[name] - gradient).norm() / gradient.norm()).item()
                   for name, gradient in exact.items()) / len(exact)

    assert mean_error(fused_gradients) < 1.2 * mean_error(peft_gradients)


def adam_losses(model, *, fused: bool, steps: int = 4, optimizer: dict | None = None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **(optimizer or {}))
    losses = []
    for _ in range(steps):
        loss = training_loss(model)
        backward(loss, fused=fused)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("base", BASES)
def test_a_few_optimizer_steps_give_pefts_losses(tiny_mistral_dir, base):
    peft_losses = adam_losses(lora_model(tiny_mistral_dir, base, checkpointing="on"), fused=False)
    fused = lora_model(tiny_mistral_dir, base, checkpointing="on")
    fuse_lora_layers(fused)
    fused_losses = adam_losses(fused, fused=True)
    assert peft_losses[-1] < peft_losses[0] - 0.1  # the steps train: equal losses are not equal starts only
    assert fused_losses == pytest.approx(peft_losses, rel=1e-5)


@pytest.mark.parametrize("optimizer", [{"foreach": True}, {"fused": True}])
def test_every_step_computes_with_the_weights_the_optimizer_left(tiny_mistral_dir, optimizer):
    """The compute-dtype copies of the LoRA weights are cast again at every model forward: a fused AdamW updates
    the weights without moving their version counters, and copies kept from the first step would train on it
    unseen (each step's loss would still fall, through lora_B's gradients, but not as PEFT's does)."""
    peft_losses = adam_losses(lora_model(tiny_mistral_dir, "unquantized"), fused=False, optimizer=optimizer)
    fused = lora_model(tiny_mistral_dir, "unquantized")
    fuse_lora_layers(fused)
    weight = next(p for p in fused.parameters() if p.requires_grad)
    version = weight._version
    assert adam_losses(fused, fused=True, optimizer=optimizer) == pytest.approx(peft_losses, rel=1e-5)
    if optimizer.get("fused"):
        assert weight._version == version  # the premise: a fused step updates the weights, not their versions


def test_weights_written_through_data_reach_the_next_forward_by_any_entry(tiny_mistral_dir):
    """`param.data` writes move no version counter; the next forward, through the PeftModel or straight through the
    transformer inside it, still computes with the new weights."""
    peft = lora_model(tiny_mistral_dir, "unquantized")
    fused = lora_model(tiny_mistral_dir, "unquantized")
    fuse_lora_layers(fused)
    for model in (peft, fused):
        with torch.no_grad():
            model(**batch())
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.data.mul_(3)
    with torch.no_grad():
        expected = peft(**batch()).loss
        torch.testing.assert_close(fused.get_base_model()(**batch()).loss, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(fused(**batch()).loss, expected, rtol=1e-6, atol=0)


@pytest.mark.skipif(not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU")
def test_kept_dequantized_weights_give_the_same_step_without_dequantizing(tiny_mistral_dir):
    """What the memory plan keeps where the budget has room: the frozen NF4 weights dequantized once. The step is the
    one the fused function computes when it dequantizes each time, bit for bit, and it dequantizes nothing."""
    import bitsandbytes.functional

    model = lora_model(tiny_mistral_dir, "nf4", checkpointing="on")
    fuse_lora_layers(model)
    each_time = loss_and_gradients(model, fused=True)
    bases = fused_4bit_bases(model)
    assert len(bases) == ADAPTED_LAYERS
    keep_dequantized(bases, torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bitsandbytes.functional, "dequantize_4bit", lambda *args, **kwargs: pytest.fail("dequantized"))
        kept = loss_and_gradients(model, fused=True)
    assert torch.equal(kept[0], each_time[0])
    for name, gradient in each_time[1].items():
        assert torch.equal(kept[1][name], gradient), name
    assert dequantized_bytes(bases, torch.float32) == sum(base.__dict__[KEPT_WEIGHT].nbytes for base in bases)
    drop_kept(model)
    assert not any(KEPT_WEIGHT in base.__dict__ for base in bases)


@pytest.mark.skipif(not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU")
def test_kept_block_scales_give_the_same_step_with_one_kernel_a_weight(tiny_mistral_dir):
    """What the memory plan keeps first: each double-quantized weight's block scales in fp32. The step is the one
    computed when bitsandbytes dequantizes the scales at every call, bit for bit; its dequantize_4bit (scales, offset,
    weight) is no longer called, only the weight's own kernel."""
    import bitsandbytes.functional

    model = lora_model(tiny_mistral_dir, "nf4", checkpointing="on")
    fuse_lora_layers(model)
    each_time = loss_and_gradients(model, fused=True)
    bases = fused_4bit_bases(model)
    assert all(base.weight.quant_state.nested for base in bases)  # QLoRA's double quantization
    keep_absmax(bases)
    kernel = torch.ops.bitsandbytes.dequantize_4bit.default
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bitsandbytes.functional, "dequantize_4bit", lambda *args, **kwargs: pytest.fail("functional"))
        patch.setattr(torch.ops.bitsandbytes.dequantize_4bit, "default",
                      lambda *args: calls.append(args[1]) or kernel(*args))
        kept = loss_and_gradients(model, fused=True)
    assert torch.equal(kept[0], each_time[0])
    for name, gradient in each_time[1].items():
        assert torch.equal(kept[1][name], gradient), name
    # forward, recomputation and backward: three reads of each weight, every one from its kept scales
    assert len(calls) == 3 * len(bases)
    assert {id(absmax) for absmax in calls} == {id(base.__dict__[KEPT_ABSMAX]) for base in bases}
    assert absmax_bytes(bases) == sum(base.__dict__[KEPT_ABSMAX].nbytes for base in bases) > 0
    drop_kept(model)
    assert not any(KEPT_ABSMAX in base.__dict__ for base in bases)


@pytest.mark.skipif(not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU")
def test_scales_that_are_not_double_quantized_are_kept_by_reference():
    """Without double quantization the weight's scales are fp32 already: keeping them costs nothing and reads the
    same weight."""
    import bitsandbytes

    torch.manual_seed(0)
    base = bitsandbytes.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=False,
                                      quant_type="nf4")
    base.weight = bitsandbytes.nn.Params4bit(torch.randn(64, 128), requires_grad=False, compress_statistics=False,
                                             quant_type="nf4")
    base = base.to("cpu")
    assert not base.weight.quant_state.nested
    each_time = frozen_weight(base, torch.float32)
    keep_absmax([base])
    assert base.__dict__[KEPT_ABSMAX] is base.weight.quant_state.absmax and absmax_bytes([base]) == 0
    assert torch.equal(frozen_weight(base, torch.float32), each_time)


def test_the_saved_adapter_is_pefts(tiny_mistral_dir, tmp_path):
    """Fusing changes no parameter and no name: PEFT saves the same file, tensor for tensor."""
    from peft import get_peft_model_state_dict

    model = lora_model(tiny_mistral_dir, "unquantized")
    names_before = {name: tensor.shape for name, tensor in get_peft_model_state_dict(model).items()}
    model.save_pretrained(str(tmp_path / "peft"))
    fuse_lora_layers(model)
    assert {name: tensor.shape for name, tensor in get_peft_model_state_dict(model).items()} == names_before
    model.save_pretrained(str(tmp_path / "fused"))
    peft_adapter, fused_adapter = (load_file(str(tmp_path / name / "adapter_model.safetensors"))
                                   for name in ("peft", "fused"))
    assert len(fused_adapter) == 2 * ADAPTED_LAYERS and fused_adapter.keys() == peft_adapter.keys()
    for name, tensor in peft_adapter.items():
        assert torch.equal(fused_adapter[name], tensor), name


def test_lora_dropout_is_refused(tiny_mistral_dir):
    model = lora_model(tiny_mistral_dir, "unquantized", dropout=0.05)
    with pytest.raises(PipelineError, match=r"14 layers .*lora\.dropout=0\.05"):
        fuse_lora_layers(model)


def test_disabled_adapters_run_pefts_forward(tiny_mistral_dir):
    """A call the fused function does not reproduce goes to PEFT's forward: the base model's loss, adapter off."""
    model = lora_model(tiny_mistral_dir, "unquantized")
    fuse_lora_layers(model)
    with torch.no_grad():
        fused_off_loss = _loss_without_adapter(model)
        reference = load_model(str(tiny_mistral_dir), QuantizationPlan(False, "test", torch.float32), device="cpu")
        base_loss = reference(**batch()).loss
    torch.testing.assert_close(fused_off_loss, base_loss)


def _loss_without_adapter(model) -> torch.Tensor:
    with model.disable_adapter():
        return model(**batch()).loss
