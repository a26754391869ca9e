"""The embedded model: converted from its GGUF once into the model cache, never half-finished, and it answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alpaca_qlora.models import embedded
from alpaca_qlora.models.embedded import CONVERSION_MARKER, EMBEDDED_SMOLLM2, embedded_model_dir, model_cache_dir
from alpaca_qlora.models.loading import load_model, load_tokenizer, resolve_model_source
from alpaca_qlora.models.quantization import QuantizationPlan, plan_quantization


def test_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ALPACA_QLORA_MODEL_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert model_cache_dir() == Path.home() / ".cache" / "alpaca_qlora"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert model_cache_dir() == tmp_path / "hf" / "alpaca_qlora"
    monkeypatch.setenv("ALPACA_QLORA_MODEL_CACHE", str(tmp_path / "mine"))
    assert model_cache_dir() == tmp_path / "mine"


def test_the_embedded_model_is_converted_once(embedded_model_dir, monkeypatch):
    def must_not_convert(gguf, out_dir):
        raise AssertionError("converted again")

    marker = embedded_model_dir / CONVERSION_MARKER
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    assert resolve_model_source(EMBEDDED_SMOLLM2) == str(embedded_model_dir)
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["dtype"] == "bfloat16"
    assert json.loads((embedded_model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in
                                                                                embedded_model_dir.iterdir()}


def fake_conversion(calls: list[Path]):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
    return convert


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(monkeypatch, tmp_path):
    monkeypatch.setenv("ALPACA_QLORA_MODEL_CACHE", str(tmp_path))

    def dies_midway(gguf: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "convert_gguf", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir()
    assert list(tmp_path.iterdir()) == []
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_conversion(calls))
    first = embedded_model_dir()
    assert embedded_model_dir() == first and len(calls) == 1
    assert (first / CONVERSION_MARKER).is_file() and [p.name for p in tmp_path.iterdir()] == [first.name]


def test_a_conversion_finished_elsewhere_first_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("ALPACA_QLORA_MODEL_CACHE", str(tmp_path))

    def slower_than_a_rival(gguf: Path, out_dir: Path) -> None:
        rival = out_dir.parent / out_dir.name[1:].rsplit(".", 1)[0]  # the target: ".<target>.<random>"
        rival.mkdir()
        (rival / CONVERSION_MARKER).write_text("{}")
        (rival / "who").write_text("rival")

    monkeypatch.setattr(embedded, "convert_gguf", slower_than_a_rival)
    target = embedded_model_dir()
    assert (target / "who").read_text() == "rival"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_different_gguf_gets_a_different_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("ALPACA_QLORA_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "convert_gguf", fake_conversion([]))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not the shipped file")
    shipped = embedded_model_dir()
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: other)
    assert embedded_model_dir() != shipped


def greedy_answer(model_dir: Path, plan: QuantizationPlan, question: str) -> str:
    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    model = load_model(str(model_dir), plan, device="cpu")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_the_converted_model_knows_the_capital_of_france(embedded_model_dir, quantization):
    plan = plan_quantization(quantization, "cpu")
    assert "Paris" in greedy_answer(embedded_model_dir, plan, "What is the capital of France?")
