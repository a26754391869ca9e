"""What the training tests share: the rows of support/training.py, tokenized for the tiny Mistral."""
from __future__ import annotations

import pytest

from support.training import tokenized_rows


@pytest.fixture(scope="module")
def tokenized(tiny_mistral_dir):
    return tokenized_rows(tiny_mistral_dir)
