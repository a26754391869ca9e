from __future__ import annotations

import re

import pytest

from alpaca_qlora.data.formatting import (
    encode_prompt,
    nearest_rank,
    require_training_examples,
    response_token_count,
    row_prompt,
    stop_margin,
    token_limit,
    tokenize_training_rows,
)
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_tokenizer
from support.alpaca_like import alpaca_like_rows

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


def test_auto_limit_covers_99_percent_of_references_and_respects_the_cap():
    counts = list(range(1, 1001))
    limit = token_limit("auto", counts, margin=3, cap=4096)
    assert limit["max_new_tokens"] == 990 + 3
    assert sum(count + 3 <= limit["max_new_tokens"] for count in counts) >= 0.99 * len(counts)
    assert limit["references_over_limit"] <= 0.01
    capped = token_limit("auto", counts, margin=3, cap=500)
    assert capped["max_new_tokens"] == 500 and capped["references_over_limit"] == pytest.approx(0.503)
    fixed = token_limit(64, counts, margin=3, cap=500)
    assert fixed["max_new_tokens"] == 64 and fixed["references_over_limit"] == pytest.approx(0.939)
    assert nearest_rank([5], 0.99) == 5


def test_auto_limit_on_real_shaped_references_with_a_real_tokenizer(tiny_mistral_dir):
    tokenizer = load_tokenizer(str(tiny_mistral_dir))
    rows = alpaca_like_rows(400)
    counts = [response_token_count(tokenizer, row["output"]) for row in rows]
    margin = stop_margin(tokenizer, ("### ",))
    assert 1 <= margin <= 6
    limit = token_limit("auto", counts, margin=margin, cap=4096)
    covered = sum(count + margin <= limit["max_new_tokens"] for count in counts)
    assert covered >= 0.99 * len(counts)
    assert limit["max_new_tokens"] > 3 * 64  # the old fixed limit of 64 would cut most of these references
    assert token_limit(64, counts, margin=margin, cap=4096)["references_over_limit"] > 0.5
