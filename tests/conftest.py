"""Shared fixtures: offline models built once per test session (they apply in every folder below).

tests/ mirrors the package, one file per module: tests/test_<module>.py for alpaca_qlora/<module>.py and
tests/<subpackage>/test_<module>.py for alpaca_qlora/<subpackage>/<module>.py (generation/__init__'s generate() in
tests/generation/test_generate.py, data/bundled/ in tests/data/test_bundled.py). Runs of whole stages through DVC or
their scripts are in tests/stages/, of a bench in tests/bench/, and tests of support/'s helpers in tests/support/.
A subfolder's conftest.py holds what its tests share as fixtures; helpers shared as code live in support/
(imported from the project root, with ROOT, the root's path).

No folder is a package (no __init__.py), so pytest imports each test file by its basename: basenames must be
unique across tests/ (pytest says so at collection otherwise).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from alpaca_qlora.adapter import save_adapter
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.models.embedded import EMBEDDED_SMOLLM2
from alpaca_qlora.models.loading import load_model, load_tokenizer, resolve_model_source
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import attach_lora
from support.families import build_tiny_family
from support.family_tokenizers import save_family_tokenizer
from support.mistral import build_tiny_mistral
from support.params import embedded_params, write_embedded_params

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # `make test` runs a worker per core (pytest-xdist): one thread each, and in the stages they start, so that
    # workers do not spin-wait on each other's cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """A 2-layer random Mistral with the real Mistral-7B tokenizer (from mistral-common)."""
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def family_tokenizer(tmp_path_factory):
    """family -> a folder holding its tokenizer (support/family_tokenizers.py), each built once per test session
    (Gemma 2 shares Gemma 3's)."""
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        source = "gemma3-text" if family == "gemma2" else family
        if source not in built:
            built[source] = save_family_tokenizer(source, tmp_path_factory.mktemp(f"tokenizer-{source}"))
        return built[source]
    return folder


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, family_tokenizer):
    """family -> the folder of its tiny random-init model with its tokenizer (support/families.py), built once."""
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_family(family, tmp_path_factory.mktemp(f"tiny-{family}"),
                                              family_tokenizer(family))
        return built[family]
    return folder


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF into the real model cache: ~25 s once per machine, then free."""
    return Path(resolve_model_source(EMBEDDED_SMOLLM2))


@pytest.fixture(scope="session")
def adapter_project(tmp_path_factory, tiny_mistral_dir) -> Path:
    """A folder with a saved adapter on the tiny Mistral and a params.yaml naming that base, as a trained project has.
    The adapter is large enough to change the greedy answers, so a command that dropped it would show."""
    root = tmp_path_factory.mktemp("adapter-project")
    lora = embedded_params(lora={"r": 4, "alpha": 8}).lora
    model = attach_lora(load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu"), lora,
                        quantized=False, gradient_checkpointing=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    save_adapter(model, load_tokenizer(str(tiny_mistral_dir)), root / "adapter", "card",
                 model_name=str(tiny_mistral_dir), template=ALPACA)
    write_embedded_params(root / "params.yaml", model={"name": str(tiny_mistral_dir), "quantization": "none"},
                          eval={"max_new_tokens": 12})
    return root
