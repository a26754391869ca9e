"""The model loader: pad choice, model sources (directories, hub ids, the embedded name) and bad ones named."""
from __future__ import annotations

import logging
import shutil

import pytest

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.embedded import EMBEDDED_SMOLLM2
from alpaca_qlora.models.loading import load_model, load_tokenizer, resolve_model_source
from alpaca_qlora.models.quantization import plan_quantization


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
