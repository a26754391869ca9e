"""The training model on each family's architecture (support/families.py: tiny random-init Llama 3, Qwen2.5, Qwen3,
Gemma 2, Gemma 3 text, Phi-3, each with its tokenizer): which targets attach, all-linear as PEFT resolves it, the
check before loading. Training, and the token rules per family, are tested through the stages, in
tests/stages/test_families.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoConfig

from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import SpeedSwitches, all_linear_targets, build_trainable_model, targeted_modules
from support import ROOT
from support.families import FAMILY_CONFIGS, FAMILY_LINEAR_NAMES
from support.params import embedded_params

DEFAULT_LORA = load_params(ROOT / "params.yaml").lora  # the seven projections
ALL_LINEAR_LORA = embedded_params(lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}).lora
PLAN = plan_quantization("none", "cpu")
PLAIN = SpeedSwitches(liger_kernels=False, gradient_checkpointing=False)


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request, tiny_family):
    """(family, its tiny model's directory)."""
    return request.param, tiny_family(request.param)


def build(model_dir, lora):
    return build_trainable_model(str(model_dir), PLAN, lora, PLAIN, device="cpu")


def test_the_seven_default_targets_attach_or_are_refused_naming_the_fused_layers(family):
    name, model_dir = family
    if name == "phi3":
        with pytest.raises(PipelineError, match=r"do not exist in this model; its linear layers are: "
                                                r"down_proj, gate_up_proj, lm_head, o_proj, qkv_proj\."):
            build(model_dir, DEFAULT_LORA)
        return
    assert targeted_modules(build(model_dir, DEFAULT_LORA)) == sorted(DEFAULT_LORA.target_modules)


def test_all_linear_wraps_every_linear_layer_but_the_head_and_is_known_before_allocation(family):
    name, model_dir = family
    base = load_model(str(model_dir), PLAN, device="cpu")
    assert base.config._attn_implementation == ("eager" if name == "gemma2" else "sdpa")  # sdpa can't soft-cap
    linear = {module_name for module_name, module in base.named_modules() if isinstance(module, torch.nn.Linear)}
    model = build(model_dir, ALL_LINEAR_LORA)
    wrapped = {module_name.removeprefix("base_model.model.") for module_name, module in model.named_modules()
               if hasattr(module, "lora_A")}
    assert wrapped == linear - {"lm_head"}
    assert targeted_modules(model) == FAMILY_LINEAR_NAMES[name]
    assert all_linear_targets(AutoConfig.from_pretrained(str(model_dir))) == FAMILY_LINEAR_NAMES[name]


def test_a_target_that_matches_nothing_fails_before_any_weight_is_loaded(tmp_path, tiny_family):
    """A directory with config.json alone: loading it would fail, so the error can only come from the early check."""
    built = tiny_family("phi3")
    (tmp_path / "config-only").mkdir()
    shutil.copy(built / "config.json", tmp_path / "config-only" / "config.json")
    with pytest.raises(PipelineError, match=r"\['q_proj', 'k_proj'.* its linear layers are: .*gate_up_proj"):
        build(tmp_path / "config-only", DEFAULT_LORA)


def test_the_rank_check_covers_what_all_linear_resolves_to(family):
    name, model_dir = family
    # k_proj and v_proj are 64 x 32 (two key-value heads of 16); Phi-3's smallest, o_proj, is 64 x 64
    limit = 64 if name == "phi3" else 32
    too_large = embedded_params(lora={"r": limit + 1, "alpha": 8, "target_modules": ["all-linear"]}).lora
    with pytest.raises(PipelineError, match=rf"lora\.r = {limit + 1} .* at most {limit} "):
        build(model_dir, too_large)
