"""Generation batches: similar prompt lengths together, padded on the left, and each row's own new tokens."""
from __future__ import annotations

from alpaca_qlora.generation.batching import left_pad, length_sorted_batches, split_generated


def test_batches_take_the_longest_prompts_first_with_ties_in_row_order():
    assert length_sorted_batches([3, 7, 5, 7, 1], batch_size=2) == [[1, 3], [2, 0], [4]]
    assert length_sorted_batches([], batch_size=4) == []


def test_left_padding_puts_every_prompt_right_before_its_first_new_token():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_rows_new_tokens_end_at_eos_or_lose_the_batchs_padding():
    eos, pad = 2, 0
    assert split_generated([9, 4, eos, 0, 0], eos, pad) == ([9, 4], True)
    assert split_generated([9, 4, 0, 0], eos, pad) == ([9, 4], False)  # stopped by a marker, padded to the batch
    assert split_generated([eos], eos, pad) == ([], True)
