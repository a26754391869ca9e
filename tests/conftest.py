"""Shared fixtures: tiny offline models built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from alpaca_qlora.models import build_tiny_mistral


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """A 2-layer random Mistral with the real Mistral-7B tokenizer (from mistral-common)."""
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF into the real model cache (once; later sessions reuse it)."""
    from alpaca_qlora.models import embedded_model_dir as convert_once

    return convert_once()
