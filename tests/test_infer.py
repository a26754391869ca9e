"""The inference command: answers with base + adapter, exports a merged model, refuses a mismatched adapter."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alpaca_qlora import infer
from alpaca_qlora.config import load_params
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation import generate
from alpaca_qlora.models.inference import load_for_inference
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.stop_rule import clean_generation
from support import ROOT


@pytest.fixture(scope="module")
def project(adapter_project):
    return adapter_project


def evaluation_answer(project: Path, instruction: str, *, adapter: bool) -> str:
    """The answer the evaluate stage's path gives: the same loader, template, greedy generation and cleanup."""
    params = load_params(project / "params.yaml")
    template = get_template(params.data.template)
    loaded = load_for_inference(params.model.name, params.model.quantization,
                                adapter_dir=project / "adapter" if adapter else None, device="cpu")
    generations, _ = generate(loaded.model, loaded.tokenizer, [template.render(instruction, "")],
                              max_new_tokens=params.eval.max_new_tokens, batch_size=params.eval.batch_size,
                              stop_markers=template.stop_markers, progress=False)
    return clean_generation(generations[0].raw, template.stop_markers)


def test_answers_an_instruction_as_the_evaluation_does(project, capsys):
    arguments = ["What is 2+2?", "--params", str(project / "params.yaml"), "--adapter", str(project / "adapter")]
    infer.main(arguments)
    answer = capsys.readouterr().out
    infer.main(arguments + ["--base-only"])
    base_answer = capsys.readouterr().out
    assert answer == evaluation_answer(project, "What is 2+2?", adapter=True) + "\n"
    assert base_answer == evaluation_answer(project, "What is 2+2?", adapter=False) + "\n"
    assert answer.strip() and answer != base_answer  # the adapter is used, and the check compares real text


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


@pytest.mark.parametrize("instruction", ["   ", "\t\n"])
def test_a_blank_instruction_is_refused_before_loading(monkeypatch, capsys, instruction):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a blank instruction")

    monkeypatch.setattr(infer, "load_for_inference", no_load)
    with pytest.raises(SystemExit) as exit_info:
        infer.main([instruction])
    assert exit_info.value.code == 2
    assert "instruction" in capsys.readouterr().err
