"""The benches' LoRA targets: all-linear reaches PEFT and Unsloth as the train stage resolves it, not as a list."""
from __future__ import annotations

import inspect

import pytest
from transformers import MistralConfig

from alpaca_qlora.training.model import weightless_model
from bench.train_variants import VARIANTS, project_model, reference_lora_config, target_names
from support.params import embedded_params

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
CONFIG = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)


def wrapped(lora_config) -> list[str]:
    """The layer names PEFT wraps with this LoraConfig in the tiny architecture."""
    from peft import LoraModel

    tuner = LoraModel(weightless_model(CONFIG), lora_config, "default", low_cpu_mem_usage=True)
    return sorted({name.rsplit(".", 1)[-1] for name in tuner.targeted_module_names})


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_the_baseline_wraps_what_the_profile_targets(targets):
    lora = embedded_params(lora={"target_modules": targets}).lora
    expected = PROJECTIONS if targets == "all-linear" else targets
    assert wrapped(reference_lora_config(lora)) == expected


def test_unsloth_gets_all_linear_as_the_layer_names_peft_resolves():
    assert target_names(embedded_params(lora={"target_modules": "all-linear"}).lora, CONFIG) == PROJECTIONS
    assert target_names(embedded_params(lora={"target_modules": ["o_proj"]}).lora, CONFIG) == ["o_proj"]


def test_every_variant_sets_only_switches_project_model_takes():
    """A variant's key reaches project_model as an argument (packing, dequantized and scales excepted: build_variant
    takes them), so a misspelt one fails here rather than on the GPU."""
    switches = set(inspect.signature(project_model).parameters) | {"packing", "dequantized", "scales"}
    assert {variant: set(settings) - switches for variant, settings in VARIANTS.items()} == {
        variant: set() for variant in VARIANTS}
