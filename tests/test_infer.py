"""The inference command: answers with base + adapter, exports a merged model, refuses a mismatched adapter."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alpaca_qlora import infer
from alpaca_qlora.config import LoraParams
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training import attach_lora, save_adapter

ROOT = Path(__file__).resolve().parents[1]


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


def _damaged_copy(project, tmp_path, damage) -> str:
    adapter = tmp_path / "adapter"
    shutil.copytree(project / "adapter", adapter)
    damage(adapter / "adapter_model.safetensors")
    return str(adapter)


def _nan_bytes(weights):
    """Every tensor's bytes overwritten with 0xFF (a NaN in every float format), the header kept."""
    data = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = b"\xff" * (len(data) - header_end)
    weights.write_bytes(bytes(data))


def _truncate(weights):
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "message"), [(_nan_bytes, "holds NaN or infinite weights"),
                                                  (_truncate, "is damaged")])
def test_a_damaged_adapter_is_refused_naming_the_file_and_the_fix(project, tmp_path, damage, message):
    adapter = _damaged_copy(project, tmp_path, damage)
    params = ["--params", str(project / "params.yaml"), "--adapter", adapter]
    for argv in (["What is 2+2?", *params], ["--merge", str(tmp_path / "merged"), *params]):
        with pytest.raises(PipelineError, match=message) as refused:
            infer.main(argv)
        assert f"{adapter}/adapter_model.safetensors" in str(refused.value)
        assert "dvc checkout" in str(refused.value) and "dvc repro train" in str(refused.value)
    assert not (tmp_path / "merged").exists()


def test_the_stage_exits_with_the_message_not_empty_answers(project, tmp_path):
    adapter = _damaged_copy(project, tmp_path, _nan_bytes)
    result = subprocess.run(
        [sys.executable, "-m", "alpaca_qlora.infer", "What is 2+2?", "--params", str(project / "params.yaml"),
         "--adapter", adapter], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2 and "holds NaN or infinite weights" in result.stderr
    assert "Traceback" not in result.stderr
