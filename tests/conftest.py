"""Shared fixtures: offline models built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from alpaca_qlora.models.embedded import EMBEDDED_SMOLLM2

from alpaca_qlora.models.loading import resolve_model_source
from support.mistral import build_tiny_mistral


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """A 2-layer random Mistral with the real Mistral-7B tokenizer (from mistral-common)."""
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF into the real model cache: ~25 s once per machine, then free."""
    return Path(resolve_model_source(EMBEDDED_SMOLLM2))
