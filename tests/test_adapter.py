"""The adapter folder as a user outside the project gets it: PEFT loads it onto the base, its tokenizer prompts as
the format stage did, its card carries Hub metadata and, released, the eval table."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_qlora.adapter import package_release, render_model_card, save_adapter
from alpaca_qlora.config import EMBEDDED_MODEL, EMBEDDED_MODEL_ORIGIN
from alpaca_qlora.data.formatting import IGNORE_INDEX, tokenize_training_rows
from alpaca_qlora.data.prompts import ALPACA, INSTRUCTION_CONTEXT
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.inference import check_adapter_matches
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import attach_lora
from support.params import embedded_params

ROWS = [
    {"id": "a", "instruction": "Name the chemical symbol of sodium.", "input": "", "output": "Na"},
    {"id": "b", "instruction": "Classify the number as even or odd.", "input": "7", "output": "odd"},
]
HUB_DATA = {"source": "hub", "hub_id": "yahma/alpaca-cleaned", "revision": "main",
            "resolved_commit": "12567cabf869d7c92e573c7c783905fc160e9639"}


def trained_like_adapter(model_dir):
    """A LoRA with non-zero B, so the adapter changes the logits and a lost weight would show."""
    model = attach_lora(load_model(str(model_dir), plan_quantization("none", "cpu"), device="cpu"),
                        embedded_params(lora={"r": 4, "alpha": 8, "dropout": 0.0}).lora, quantized=False,
                        gradient_checkpointing=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


def card(data=HUB_DATA, model_name="mistralai/Mistral-7B-Instruct-v0.2") -> str:
    return render_model_card(model_name=model_name, template=ALPACA, params={"lora": {"r": 4}},
                             metrics={"quantized": True, "final_loss": 1.0}, data=data,
                             training_data={"train_rows": 2})


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("template", [ALPACA, INSTRUCTION_CONTEXT], ids=lambda t: t.name)
def test_the_adapter_folder_alone_loads_with_peft_and_prompts_as_the_format_stage(tiny_mistral_dir, tmp_path,
                                                                                   template):
    model = trained_like_adapter(tiny_mistral_dir)
    training_tokenizer = load_tokenizer(str(tiny_mistral_dir))
    save_adapter(model, training_tokenizer, tmp_path / "adapter", card(), model_name=str(tiny_mistral_dir),
                 template=template)
    assert training_tokenizer.chat_template != template.chat_template("<s>")  # the training tokenizer is untouched

    base = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "adapter"))
    formatted, _ = tokenize_training_rows(ROWS, training_tokenizer, template, max_length=256, overlong="truncate")
    for row, example in zip(ROWS, formatted):
        prompt_ids = [i for i, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
        message = {"role": "user", "content": row["instruction"], "input": row["input"]}
        chat = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert chat["input_ids"] == prompt_ids
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert json.loads((tmp_path / "adapter" / "prompt_template.json").read_text()) == json.loads(
        json.dumps(asdict(template)))


def test_an_embedded_base_is_named_by_its_hub_origin_and_still_matches(tiny_mistral_dir, tmp_path):
    save_adapter(trained_like_adapter(tiny_mistral_dir), load_tokenizer(str(tiny_mistral_dir)), tmp_path / "a",
                 "card", model_name=EMBEDDED_MODEL, template=ALPACA)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_MODEL_ORIGIN
    assert len(config["target_modules"]) == 7 and config["target_modules"] == sorted(config["target_modules"])
    check_adapter_matches(tmp_path / "a", "/cache/converted-smollm2", EMBEDDED_MODEL)
    with pytest.raises(PipelineError, match="trained on base model"):
        check_adapter_matches(tmp_path / "a", "org/other", "org/other")


def test_the_card_has_hub_metadata_the_prompt_format_and_a_load_snippet():
    text = card()
    meta = front_matter(text)
    assert meta["base_model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert meta["datasets"] == ["yahma/alpaca-cleaned"] and HUB_DATA["resolved_commit"] in text
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "lora" in meta["tags"]
    assert ALPACA.with_input in text and ALPACA.without_input in text
    for line in ("PeftModel.from_pretrained(model, adapter)", "AutoTokenizer.from_pretrained(adapter)",
                 "apply_chat_template(messages, add_generation_prompt=True"):
        assert line in text


def test_the_embedded_models_card_names_its_origin_and_the_bundled_data():
    text = card({"source": "bundled", "bundled_version": "2"}, model_name=EMBEDDED_MODEL)
    meta = front_matter(text)
    assert meta["base_model"] == EMBEDDED_MODEL_ORIGIN and "datasets" not in meta
    assert "Q4_1 GGUF" in text and "bundled Alpaca-format rows (version 2)" in text


def test_the_release_is_the_adapter_with_the_eval_table_and_intervals(tiny_mistral_dir, tmp_path):
    save_adapter(trained_like_adapter(tiny_mistral_dir), load_tokenizer(str(tiny_mistral_dir)), tmp_path / "adapter",
                 card(), model_name=str(tiny_mistral_dir), template=ALPACA)
    compare = {"overall": {"n_rows": 200, "exact_match_delta": 0.19, "exact_match_delta_ci_low": 0.12,
                           "exact_match_delta_ci_high": 0.26, "exact_match_mcnemar_p": 0.0001, "f1_delta": 0.15,
                           "f1_delta_ci_low": 0.1, "f1_delta_ci_high": 0.2},
               "by_task_type": {"closed_qa": {"n_rows": 39, "exact_match_delta": None, "f1_delta": 0.27,
                                              "f1_delta_ci_low": 0.2, "f1_delta_ci_high": 0.35}}}
    package_release(tmp_path / "adapter", tmp_path / "release", compare)
    adapter_files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {path.name for path in (tmp_path / "release").iterdir()} == adapter_files
    released = (tmp_path / "release" / "README.md").read_text()
    assert released.startswith((tmp_path / "adapter" / "README.md").read_text().rstrip("\n"))
    assert "| overall (n=200) | +0.1900 [+0.1200, +0.2600] | +0.1500 [+0.1000, +0.2000] |" in released
    assert "| closed_qa (n=39) | n/a | +0.2700 [+0.2000, +0.3500] |" in released
    assert front_matter(released)["library_name"] == "peft"
