"""Base model + adapter loaded for answering."""
from __future__ import annotations

import json

import pytest

from alpaca_qlora.adapter import save_adapter
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.inference import load_for_inference
from alpaca_qlora.training.trainer import run_training
from support.training import make_job, tokenized_rows


@pytest.fixture(scope="module")
def tokenized(tiny_mistral_dir):
    return tokenized_rows(tiny_mistral_dir)


def test_an_adapter_names_its_base_model_and_a_mismatch_is_refused(tiny_mistral_dir, tokenized, tmp_path):
    job = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=1)
    run_training(job, resume=False)
    save_adapter(job.model, job.tokenizer, tmp_path / "adapter", "card", model_name="org/other-model",
                 template=ALPACA)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/other-model"
    with pytest.raises(PipelineError, match="trained on base model 'org/other-model'"):
        load_for_inference(str(tiny_mistral_dir), "none", adapter_dir=tmp_path / "adapter", device="cpu")
