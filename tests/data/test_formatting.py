import re

import pytest

from alpaca_qlora.data.formatting import encode_prompt, require_training_examples, row_prompt, tokenize_training_rows
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_tokenizer

ROWS = [
    {"id": "a", "instruction": "Name the capital of France.", "input": "", "output": "Paris"},
    {"id": "b", "instruction": "Classify the sentiment.", "input": "I loved this film, truly.", "output": "positive"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_mistral_dir):
    return load_tokenizer(str(tiny_mistral_dir))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_a_max_seq_length_keeping_no_row_is_refused_with_the_length_that_keeps_rows(tokenizer, overlong):
    shortest_prompt = min(len(encode_prompt(tokenizer, row_prompt(ALPACA, row))) for row in ROWS)
    examples, counts = tokenize_training_rows(ROWS, tokenizer, ALPACA, max_length=16, overlong=overlong)
    assert examples == [] and counts["dropped_overlong"] == 2
    with pytest.raises(PipelineError, match="train.max_seq_length = 16 keeps none of the 2 training rows") as refused:
        require_training_examples(examples, ROWS, tokenizer, ALPACA, max_length=16, overlong=overlong)
    message = str(refused.value)
    if overlong == "truncate":
        assert f"the shortest prompt is {shortest_prompt} tokens" in message
    suggested = int(re.search(r"at least (\d+)", message).group(1))
    kept, _ = tokenize_training_rows(ROWS, tokenizer, ALPACA, max_length=suggested, overlong=overlong)
    fewer, _ = tokenize_training_rows(ROWS, tokenizer, ALPACA, max_length=suggested - 1, overlong=overlong)
    assert len(kept) >= 1 and fewer == []  # the suggested value is the smallest that keeps a row
    keeps_all = int(re.search(r"(\d+) keeps every row", message).group(1))
    whole, _ = tokenize_training_rows(ROWS, tokenizer, ALPACA, max_length=keeps_all, overlong="drop")
    assert len(whole) == len(ROWS)
