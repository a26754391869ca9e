"""The train stage's model builder, which the bench calls too: the base, Liger if switched on, then LoRA."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import (
    LORA_CONFIG_NAMES,
    SpeedSwitches,
    attach_lora,
    build_trainable_model,
    lora_config_kwargs,
)
from support.params import embedded_params

ROOT = Path(__file__).resolve().parents[1]
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
