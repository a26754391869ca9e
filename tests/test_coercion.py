"""Values read as the types the params declare: YAML and `dvc exp run -S` may give numbers and switches as text."""
from __future__ import annotations

import pytest
import yaml

from support.params import embedded_params


def test_max_new_tokens_param_accepts_auto_or_an_integer():
    assert embedded_params(eval={"max_new_tokens": "auto"}).eval.max_new_tokens == "auto"
    assert embedded_params(eval={"max_new_tokens": 96}).eval.max_new_tokens == 96
    assert embedded_params(eval={"max_new_tokens": "128"}).eval.max_new_tokens == 128  # as -S writes it
    for bad in ("lots", 0, True):
        with pytest.raises(ValueError, match="eval.max_new_tokens"):
            embedded_params(eval={"max_new_tokens": bad})
    with pytest.raises(ValueError, match="eval.max_new_tokens_cap"):
        embedded_params(eval={"max_new_tokens_cap": 0})
    with pytest.raises(ValueError, match="eval.min_short_answer"):
        embedded_params(eval={"min_short_answer": -1})


def test_numbers_written_as_text_are_numbers():
    # PyYAML reads `2e-4` as a string; `dvc exp run -S train.learning_rate=2e-4` writes exactly that.
    raw = yaml.safe_load("train: {learning_rate: 2e-4, max_steps: '10'}")
    assert raw["train"]["learning_rate"] == "2e-4"
    params = embedded_params(**raw)
    assert params.train.learning_rate == pytest.approx(2e-4)
    assert params.train.max_steps == 10
