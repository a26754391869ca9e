"""The generation tests' models: the embedded SmolLM2 in 4-bit, and the tiny Mistral in 4-bit with an unmerged
LoRA adapter."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from support.generation import bnb_default_path


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    plan = plan_quantization("auto", "cpu")
    model = load_model(str(embedded_model_dir), plan, device="cpu")
    bnb_default_path(model)
    return model, load_tokenizer(str(embedded_model_dir), padding_side="left"), plan


@pytest.fixture()
def tiny_lora(tiny_mistral_dir):
    from peft import LoraConfig, get_peft_model

    model = load_model(str(tiny_mistral_dir), plan_quantization("nf4", "cpu"), device="cpu")
    bnb_default_path(model)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config), load_tokenizer(str(tiny_mistral_dir), padding_side="left")
