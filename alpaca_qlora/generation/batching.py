"""Batches for generation: rows of similar prompt length together, padded on the left, and each row's new tokens.

Padding goes on the left so every row's next token comes right after its own prompt; sorting by length keeps
that padding small, and the order the rows are answered in never changes an answer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of `batch_size`, longest prompts first (ties by index, so the batches are fixed)."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


def unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of a left-padded batch without its padding: the inverse of left_pad."""
    width = input_ids.shape[1]
    return [input_ids[row, width - length :] for row, length in enumerate(attention_mask.sum(dim=1).tolist())]


def split_generated(new_ids: Sequence[int], eos_token_id: int, pad_token_id: int) -> tuple[list[int], bool]:
    """The tokens a row really generated (up to EOS) and whether EOS ended it."""
    ids = list(new_ids)
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id)], True
    while ids and ids[-1] == pad_token_id:  # rows stopped by a marker are padded to the batch's length
        ids.pop()
    return ids, False
