"""The training model: the builder the train stage and the bench call (the base, Liger if switched on, then LoRA),
the speed switches by device, the frozen weights' dtype, and target modules checked."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import (
    LORA_CONFIG_NAMES,
    SpeedSwitches,
    apply_liger_kernels,
    attach_lora,
    build_trainable_model,
    lora_config_kwargs,
    prepare_quantized_model,
    resolve_speed_switches,
    validate_lora_rank,
)
from support import ROOT
from support.params import embedded_params
from support.training import make_job

LORA = load_params(ROOT / "params.yaml").lora  # the embedded profile's LoRA: r=16 on the seven projections


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_builder_gives_the_load_then_lora_sequence_bit_for_bit(tiny_mistral_dir, checkpointing):
    plan = plan_quantization("none", "cpu")
    torch.manual_seed(0)
    built = build_trainable_model(str(tiny_mistral_dir), plan, LORA, SpeedSwitches(False, checkpointing),
                                  device="cpu")
    torch.manual_seed(0)
    by_hand = attach_lora(load_model(str(tiny_mistral_dir), plan, device="cpu"), LORA, quantized=False,
                          gradient_checkpointing=checkpointing)
    assert built.state_dict().keys() == by_hand.state_dict().keys()
    assert all(torch.equal(value, by_hand.state_dict()[key]) for key, value in built.state_dict().items())
    trainable = {name for name, parameter in built.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == set(LORA.target_modules)
    assert built.base_model.model.model.gradient_checkpointing is checkpointing


def test_the_builder_honours_the_liger_switch(tiny_mistral_dir):
    with pytest.raises(PipelineError, match="liger_kernels"):
        build_trainable_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), LORA,
                              SpeedSwitches(liger_kernels=True, gradient_checkpointing=False), device="cpu")


def test_every_lora_key_reaches_peft_under_its_name(tiny_mistral_dir):
    """A `lora:` key added to LoraParams but not to LoraConfig's names (or renamed wrongly) fails here, and every
    value arrives: each one differs from PEFT's default, so a key that was dropped on the way would show."""
    from peft import LoraConfig

    lora = embedded_params(lora={"r": 3, "alpha": 7, "dropout": 0.25, "target_modules": ["q_proj", "down_proj"],
                                 "bias": "lora_only", "use_rslora": True, "use_dora": True}).lora
    defaults = LoraConfig()
    peft_names = {field.name for field in dataclasses.fields(LoraConfig)}
    for field in dataclasses.fields(lora):
        peft_name = LORA_CONFIG_NAMES.get(field.name, field.name)
        assert peft_name in peft_names, f"lora.{field.name} has no LoraConfig argument {peft_name}: map it"
        assert getattr(defaults, peft_name) != getattr(lora, field.name), f"give lora.{field.name} a non-default"
    assert set(lora_config_kwargs(lora)) == {LORA_CONFIG_NAMES.get(field.name, field.name)
                                            for field in dataclasses.fields(lora)}
    model = attach_lora(load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu"), lora,
                        quantized=False, gradient_checkpointing=False)
    config = model.peft_config["default"]
    for field in dataclasses.fields(lora):
        arrived = getattr(config, LORA_CONFIG_NAMES.get(field.name, field.name))
        expected = getattr(lora, field.name)
        assert (set(arrived) == set(expected)) if field.name == "target_modules" else arrived == expected, field.name
    assert config.task_type == "CAUSAL_LM"


def test_a_typo_in_target_modules_is_refused(tiny_mistral_dir, tokenized, tmp_path):
    with pytest.raises(PipelineError, match=r"\['qproj'\] do not exist"):
        make_job(tiny_mistral_dir, tokenized, tmp_path,
                 lora=embedded_params(lora={"target_modules": ["qproj", "v_proj"]}).lora)


def test_liger_kernels_are_refused_without_cuda(tiny_mistral_dir):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        apply_liger_kernels(model, "cpu")


def test_frozen_weights_keep_the_compute_dtype_unless_fp32_is_asked(tiny_mistral_dir):
    from transformers import AutoModelForCausalLM

    for frozen_dtype, expected in (("compute", torch.bfloat16), ("fp32", torch.float32)):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir), dtype=torch.bfloat16)
        model = prepare_quantized_model(model, gradient_checkpointing=False, frozen_dtype=frozen_dtype)
        assert model.get_input_embeddings().weight.dtype == expected
        assert model.lm_head.weight.dtype == expected
        assert not any(p.requires_grad for p in model.parameters())


def test_speed_switches_resolve_by_device():
    """auto: Liger and checkpointing on CUDA (measured to pay there), off on CPU; explicit values win."""
    auto = embedded_params().train
    assert resolve_speed_switches(auto, "cpu", liger_installed=True) == SpeedSwitches(False, False)
    assert resolve_speed_switches(auto, "cuda", liger_installed=True) == SpeedSwitches(True, True)
    assert resolve_speed_switches(auto, "cuda", liger_installed=False) == SpeedSwitches(False, True)
    # under FSDP too: the stage keeps the output projection, which Liger's cross-entropy reads, unsharded
    fsdp = dataclasses.replace(auto, distributed="fsdp", num_processes=2)
    assert resolve_speed_switches(fsdp, "cuda", liger_installed=True) == SpeedSwitches(True, True)
    forced = dataclasses.replace(auto, gradient_checkpointing=True, liger_kernels=False)
    assert resolve_speed_switches(forced, "cpu") == SpeedSwitches(False, True)
    offload = dataclasses.replace(auto, checkpoint_offload=True)
    with pytest.raises(PipelineError, match="gradient_checkpointing=true"):
        resolve_speed_switches(offload, "cpu")
    assert resolve_speed_switches(offload, "cuda", liger_installed=True).gradient_checkpointing


def test_fused_lora_on_auto_only_where_it_computes_the_adapter():
    """auto: on CUDA for plain LoRA without dropout, not under fsdp (untested there) nor on CPU; true forces it."""
    params = embedded_params(lora={"dropout": 0.0})
    fused = resolve_speed_switches(params.train, "cuda", params.lora, liger_installed=True)
    assert fused == SpeedSwitches(True, True, fused_lora=True)
    assert not resolve_speed_switches(params.train, "cpu", params.lora).fused_lora
    for lora in ({"dropout": 0.05}, {"dropout": 0.0, "use_dora": True}, {"dropout": 0.0, "bias": "all"}):
        other = embedded_params(lora=lora)
        assert not resolve_speed_switches(other.train, "cuda", other.lora, liger_installed=True).fused_lora, lora
    fsdp = dataclasses.replace(params.train, distributed="fsdp", num_processes=2)
    assert not resolve_speed_switches(fsdp, "cuda", params.lora, liger_installed=True).fused_lora
    forced = dataclasses.replace(params.train, fused_lora=True)
    assert resolve_speed_switches(forced, "cpu", params.lora).fused_lora


TARGETS = ["q_proj", "k_proj", "v_proj"]


class Block(torch.nn.Module):
    """Attention-shaped projections: q 64 -> 64, k and v 64 -> 16 (grouped keys and values)."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 64, bias=False)
        self.k_proj = torch.nn.Linear(64, 16, bias=False)
        self.v_proj = torch.nn.Linear(64, 16, bias=False)
        self.embed = torch.nn.Embedding(100, 64)


def lora(r: int):
    return embedded_params(lora={"r": r, "alpha": r, "target_modules": TARGETS}).lora


def attach(r: int):
    return attach_lora(Block(), lora(r), quantized=False, gradient_checkpointing=False)


@pytest.mark.parametrize("r", [100000, 17])
def test_a_rank_above_the_smallest_adapted_layer_is_refused(r):
    with pytest.raises(PipelineError, match=rf"lora\.r = {r} .*k_proj.* 64 x 16.* at most 16"):
        attach(r)


def test_an_adapter_that_is_a_large_share_of_the_model_warns(caplog):
    with caplog.at_level(logging.WARNING):
        validate_lora_rank(Block(), lora(8))  # 8 x (128 + 80 + 80) = 2,304 of the model's 12,544 params: 18%
    assert "lora.r" not in caplog.text
    with caplog.at_level(logging.WARNING):
        validate_lora_rank(Block(), lora(15))  # 4,320 adapter params: 34% of the model
    assert "lora.r = 15" in caplog.text and "% of" in caplog.text
