"""The model loader: pad choice, quantization plan, embedded conversion and answers."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models import embedded, quantization
from alpaca_qlora.models.embedded import CONVERSION_MARKER, EMBEDDED_SMOLLM2, embedded_model_dir, model_cache_dir
from alpaca_qlora.models.loading import load_model, load_tokenizer, resolve_model_source
from alpaca_qlora.models.quantization import QuantizationPlan, plan_quantization

# --- pad token ----------------------------------------------------------------------------------------------------


def test_mistral_pads_with_unk_on_the_requested_side(tiny_mistral_dir):
    tokenizer = load_tokenizer(str(tiny_mistral_dir), padding_side="left")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(str(tiny_mistral_dir), padding_side="middle")


def test_smollm2_pads_with_endoftext_not_its_eos(embedded_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.models.loading"):
        tokenizer = load_tokenizer(str(embedded_model_dir))
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert "pad == EOS" not in caplog.text
    # SmolLM2 adds no BOS (its "<|im_start|>" bos opens chat turns); formatting relies on special_prefix for this.
    assert tokenizer("Hello")["input_ids"] == tokenizer("Hello", add_special_tokens=False)["input_ids"]


def test_a_tokenizer_with_only_eos_pads_with_eos_and_says_so(tmp_path, caplog):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<eos>": 0, "hello": 1}, unk_token="<eos>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.models.loading"):
        tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert "pad == EOS" in caplog.text and "attention mask" in caplog.text


# --- sources ------------------------------------------------------------------------------------------------------


def test_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ALPACA_QLORA_MODEL_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert model_cache_dir() == Path.home() / ".cache" / "alpaca_qlora"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert model_cache_dir() == tmp_path / "hf" / "alpaca_qlora"
    monkeypatch.setenv("ALPACA_QLORA_MODEL_CACHE", str(tmp_path / "mine"))
    assert model_cache_dir() == tmp_path / "mine"


def test_sources_resolve_to_directories_or_hub_ids(tiny_mistral_dir, tmp_path):
    assert resolve_model_source(str(tiny_mistral_dir)) == str(tiny_mistral_dir.resolve())
    assert resolve_model_source("mistralai/Mistral-7B-Instruct-v0.2") == "mistralai/Mistral-7B-Instruct-v0.2"
    with pytest.raises(PipelineError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(PipelineError, match=EMBEDDED_SMOLLM2):
        resolve_model_source("embedded:gpt-5")


def test_an_unreachable_hub_id_names_the_offline_choices(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fails at once, as without network
    for load in (lambda: load_tokenizer("mistralai/Mistral-7B-Instruct-v0.2"),
                 lambda: load_model("mistralai/Mistral-7B-Instruct-v0.2", plan_quantization("none", "cpu"),
                                    device="cpu")):
        with pytest.raises(PipelineError) as error:
            load()
        assert EMBEDDED_SMOLLM2 in str(error.value) and "local model directory" in str(error.value)


# --- quantization plan --------------------------------------------------------------------------------------------


def test_plan_none_is_unquantized_fp32_on_cpu():
    plan = plan_quantization("none", "cpu")
    assert plan == QuantizationPlan(False, "model.quantization=none", torch.float32)


def test_plan_auto_on_cpu_uses_nf4_where_bitsandbytes_can():
    plan = plan_quantization("auto", "cpu")
    assert plan.quantized, plan.reason  # the pinned bitsandbytes 0.50.2 has a CPU 4-bit backend
    assert plan.compute_dtype == torch.float32 and "bitsandbytes" in plan.reason


def test_without_4bit_support_auto_falls_back_and_nf4_refuses(monkeypatch):
    monkeypatch.setattr(quantization, "probe_4bit", lambda device: (False, "no 4-bit backend for cpu"))
    plan = plan_quantization("auto", "cpu")
    assert not plan.quantized and "no 4-bit backend" in plan.reason
    with pytest.raises(PipelineError, match="nf4.*no 4-bit backend"):
        plan_quantization("nf4", "cpu")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_plans_nf4_in_bf16_where_supported(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(quantization, "probe_4bit", lambda device: (True, "fake CUDA bitsandbytes"))
    assert plan_quantization("auto", "cuda") == QuantizationPlan(True, "model.quantization=auto: fake CUDA "
                                                                 "bitsandbytes", expected)
    assert plan_quantization("none", "cuda").compute_dtype == expected


def test_bad_plan_requests_are_refused(monkeypatch):
    with pytest.raises(PipelineError, match="auto, nf4, none"):
        plan_quantization("int8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="no CUDA GPU"):
        plan_quantization("auto", "cuda")


# --- embedded conversion ------------------------------------------------------------------------------------------


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


# --- bad model sources --------------------------------------------------------------------------------------------


def test_a_missing_relative_model_path_is_named_at_once_not_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/my-base` has a hub id's owner/name shape: the local folder decides
    for name in ("models/my-base", "./my-base", "models/sub/my-base"):
        with pytest.raises(PipelineError, match="is a local path, and .* does not exist"):
            resolve_model_source(name)
    (tmp_path / "models" / "weights.bin").write_bytes(b"")
    with pytest.raises(PipelineError, match="is a file, not a model directory"):
        resolve_model_source("models/weights.bin")
    assert resolve_model_source("mistralai/Mistral-7B-Instruct-v0.2") == "mistralai/Mistral-7B-Instruct-v0.2"


def test_a_directory_that_is_not_a_model_is_named_with_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(PipelineError, match=r"is a directory but not a model: it has no config.json \(it holds "
                                            r"notes.txt\)"):
        resolve_model_source(str(tmp_path))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_model_directory_with_bad_tokenizer_files_names_the_directory(tiny_mistral_dir, tmp_path, damage):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_mistral_dir, model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if damage == "delete":
        tokenizer_file.unlink()
    else:
        tokenizer_file.write_bytes(tokenizer_file.read_bytes()[:1000])
    with pytest.raises(PipelineError, match=f"(?s)could not load the model directory {model_dir}.*tokenizer files"):
        load_tokenizer(resolve_model_source(str(model_dir)))


def test_truncated_model_weights_name_the_file(tiny_mistral_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_mistral_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PipelineError, match=f"{weights} is damaged .*download or save the model again"):
        load_model(str(model_dir), plan_quantization("none", "cpu"), device="cpu")
