"""The inference command: answers with base + adapter, exports a merged model, refuses a mismatched adapter."""
from __future__ import annotations

import pytest
import torch
import yaml

from alpaca_qlora import infer
from alpaca_qlora.config import LoraParams
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models import load_model, load_tokenizer, plan_quantization
from alpaca_qlora.training import attach_lora, save_adapter


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mistral_dir):
    root = tmp_path_factory.mktemp("infer")
    plan = plan_quantization("none", "cpu")
    model = attach_lora(load_model(str(tiny_mistral_dir), plan, device="cpu"), LoraParams(r=4, alpha=8),
                        quantized=False, gradient_checkpointing=False)
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.01)
    save_adapter(model, load_tokenizer(str(tiny_mistral_dir)), root / "adapter", "card",
                 base_model=str(tiny_mistral_dir))
    params = {"model": {"name": str(tiny_mistral_dir), "quantization": "none"}, "eval": {"max_new_tokens": 4}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_answers_an_instruction(project, capsys):
    infer.main(["What is 2+2?", "--params", str(project / "params.yaml"), "--adapter", str(project / "adapter")])
    assert capsys.readouterr().out.endswith("\n")


def test_merge_writes_a_loadable_model_with_the_adapter_folded_in(project, tiny_mistral_dir):
    infer.main(["--merge", str(project / "merged"), "--params", str(project / "params.yaml"),
                "--adapter", str(project / "adapter")])
    merged = load_model(str(project / "merged"), plan_quantization("none", "cpu"), device="cpu")
    base = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    merged_weight, base_weight = merged.state_dict()[name].float(), base.state_dict()[name].float()
    assert merged_weight.shape == base_weight.shape
    assert not torch.allclose(merged_weight, base_weight, atol=1e-4)


def test_a_missing_adapter_says_to_train_first(project):
    with pytest.raises(PipelineError, match="run `dvc repro train` first"):
        infer.main(["Hi", "--params", str(project / "params.yaml"), "--adapter", str(project / "nothing")])
